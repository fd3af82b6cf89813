//! The server's TUN device, with Linux TUN offload (`IFF_VNET_HDR`, TSO/USO).
//!
//! Why: without offload the kernel cuts every TCP super-packet (up to 64 KB, as the camera's
//! stack or a NIC's GRO made it) into MTU-sized packets before the TUN, and beckon pays a `read`,
//! a queue slot and a smoltcp pass per 1.5 KB; the TUN's queue overflows under load. With offload
//! a direct connection's data arrives as one super-packet per read, and smoltcp takes it as one
//! large segment (it accepts segments beyond the MTU as long as they fit the window).
//!
//! With offload, every read and write carries a 10-byte `virtio_net_hdr` first. Reads are
//! classified by [`classify`] (sans-IO): ordinary packets get their transport checksum completed
//! when the kernel left it partial; TCP super-packets are passed whole with their checksum
//! marked as verified by the kernel (it checked every segment before merging, or made them
//! itself); UDP super-packets (USO) are split into datagrams. Writes prepend an all-zero header:
//! "ordinary packet, checksums complete".

use super::rx_pool;
use anyhow::Result;
use smoltcp::wire::checksum;
use std::io::{self, IoSlice, IoSliceMut};
use tun_rs::{VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_UDP_L4, VIRTIO_NET_HDR_LEN};

const F_NEEDS_CSUM: u8 = 1;
const F_DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_ECN: u8 = 0x80;
/// Kernel queue in front of the TUN, in packets (super-packets with offload). The default
/// (500) overflowed under load without offload. 1,000 overflowed with one camera: where packets
/// arrive MSS-sized (no GRO on the path, as through the lab's WAN relay) a sender that bursts
/// its window (cubic, Linux's default) puts 1,500 packets (a 2 MiB window) in front of the
/// reader at once; through the lab's 20 ms WAN one bulk download lost 30-800 packets per
/// 100 MB there, retransmitted them, reached 0.57-0.82 of the port-forward, and the drops made
/// the overload guard refuse every new client for 5 s. With 10,000 it lost none and reached
/// 0.95-1.08 (A/B in one lab). Its cost, only while the reader falls behind: 10,000 packets,
/// at most about 650 MB of kernel memory if all were 64 KB super-packets (a flood of ordinary
/// packets to `public_ip` about 20 MB); the overload guard reacts to the drops beyond it.
const TX_QUEUE_LEN: u32 = 10_000;
/// Most datagrams a UDP super-packet is split into (64 KB / 512 B).
const MAX_SEGMENTS: usize = 128;
const MTU: usize = 1500;

pub struct ServerTun {
    dev: tun_rs::AsyncDevice,
    offload: bool,
}

/// Whether a packet's transport checksum still needs checking by beckon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// The kernel verified it (or generated the packet); the field may even be partial.
    Verified,
    /// Complete but unchecked: whoever consumes the packet must verify it.
    Unverified,
}

/// Reusable read buffers: the virtio-net header and the packet of one read (read apart, so the
/// packet starts its buffer and can be handed on whole), plus room for a split UDP super-packet.
pub struct RxBuf {
    hdr: [u8; VIRTIO_NET_HDR_LEN],
    body: Vec<u8>,
    segs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    held: Held,
}

enum Held {
    Nothing,
    Whole { len: usize, csum: Checksum },
    Split(usize),
}

impl Default for RxBuf {
    fn default() -> Self {
        RxBuf { hdr: [0; VIRTIO_NET_HDR_LEN], body: rx_pool::take(), segs: Vec::new(), sizes: Vec::new(), held: Held::Nothing }
    }
}

impl RxBuf {
    /// The packets of the last read, each with its checksum status.
    pub fn packets(&self) -> impl Iterator<Item = (&[u8], Checksum)> {
        let split = if let Held::Split(n) = self.held { n } else { 0 };
        self.whole().into_iter().chain(self.segs.iter().zip(&self.sizes).take(split).map(|(b, &n)| (&b[..n], Checksum::Verified)))
    }

    /// The last read, if it was one packet.
    pub fn whole(&self) -> Option<(&[u8], Checksum)> {
        match self.held {
            Held::Whole { len, csum } => Some((&self.body[..len], csum)),
            _ => None,
        }
    }

    /// Take the last read's packet (see [`RxBuf::whole`]) as an owned buffer. A large one (a TCP
    /// super-packet) is handed over with its read buffer, which a pooled one replaces: that
    /// saves a copy of every byte a direct connection carries. A small one is copied, so a
    /// 64 KiB buffer never travels for an ACK.
    pub fn take_whole(&mut self) -> Option<Vec<u8>> {
        let Held::Whole { len, .. } = self.held else { return None };
        self.held = Held::Nothing;
        if len < HANDOVER_MIN {
            return Some(self.body[..len].to_vec());
        }
        let mut pkt = std::mem::replace(&mut self.body, rx_pool::take());
        pkt.truncate(len);
        Some(pkt)
    }
}

/// Packets at least this long leave the reader with their buffer (see [`RxBuf::take_whole`]):
/// a queued packet then holds at most twice its length, and the replacement buffer needs at
/// most as many bytes zeroed (its tail beyond the packet it last held) as the copy would have
/// moved.
const HANDOVER_MIN: usize = rx_pool::BUF_LEN / 2;

/// What one offload read holds, decided from its virtio-net header.
#[derive(Debug, PartialEq, Eq)]
pub enum Classified {
    /// One packet, the whole read after the header (checksum completed if it was partial).
    Packet { csum: Checksum },
    /// A UDP super-packet: split it, taking its headers to be `hdr_len` bytes long.
    SplitUdp { hdr_len: u16 },
    /// Nothing usable (IPv6 super-packets, unknown GSO types, short reads).
    Drop,
}

/// Classify one offload read: its virtio-net header `hdr` and the packet `pkt` after it.
/// Completes a partial checksum of an ordinary packet in place.
pub fn classify(hdr: &[u8], pkt: &mut [u8]) -> Classified {
    if hdr.len() < VIRTIO_NET_HDR_LEN || pkt.is_empty() {
        return Classified::Drop;
    }
    let Ok(hdr) = VirtioNetHdr::decode(&hdr[..VIRTIO_NET_HDR_LEN]) else {
        return Classified::Drop;
    };
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE if hdr.flags & F_NEEDS_CSUM != 0 => {
            let (cs, co) = (hdr.csum_start as usize, hdr.csum_offset as usize);
            let at = cs + co;
            if cs >= pkt.len() || at + 2 > pkt.len() {
                return Classified::Drop;
            }
            let initial = u16::from_be_bytes([pkt[at], pkt[at + 1]]);
            pkt[at..at + 2].fill(0);
            let sum = !checksum::combine(&[initial, checksum::data(&pkt[cs..])]);
            // For UDP a computed 0 is sent as 0xffff (0 means "no checksum"), as the kernel does.
            let sum = if sum == 0 { 0xffff } else { sum };
            pkt[at..at + 2].copy_from_slice(&sum.to_be_bytes());
            Classified::Packet { csum: Checksum::Verified }
        }
        GSO_NONE if hdr.flags & F_DATA_VALID != 0 => Classified::Packet { csum: Checksum::Verified },
        GSO_NONE => Classified::Packet { csum: Checksum::Unverified },
        VIRTIO_NET_HDR_GSO_TCPV4 => Classified::Packet { csum: Checksum::Verified },
        // On the forward path the kernel's hdr_len is only a hint (the linear part of its
        // buffer): the headers end 8 bytes after the UDP header starts (tun-rs's own reader
        // does the same).
        VIRTIO_NET_HDR_GSO_UDP_L4 if pkt[0] >> 4 == 4 && (hdr.csum_start as usize) + 8 <= pkt.len() => {
            Classified::SplitUdp { hdr_len: hdr.csum_start + 8 }
        }
        _ => Classified::Drop,
    }
}

impl ServerTun {
    /// Create the TUN with offload, or without it (with a warning) where the kernel refuses.
    pub fn create(name: &str) -> Result<ServerTun> {
        let offloaded = crate::hostnet::tun_builder(name).offload(true).tx_queue_len(TX_QUEUE_LEN).build_async();
        let (dev, offload) = match offloaded {
            Ok(dev) => (dev, true),
            Err(e) => {
                // Creating it without offload tells whether offload was the problem: its error
                // (name in use, no CAP_NET_ADMIN) is the one to report.
                let dev = crate::hostnet::create_tun(name)?;
                tracing::warn!("TUN offload unavailable ({e}); one packet per read, slower direct TCP");
                return Ok(ServerTun { dev, offload: false });
            }
        };
        crate::hostnet::tun_created(name);
        tracing::info!(tun = name, offload, "TUN device created");
        Ok(ServerTun { dev, offload })
    }

    /// Read what the kernel has for the TUN: one packet, one TCP super-packet or a split UDP
    /// super-packet. Bad reads leave `rx` empty.
    pub async fn recv(&self, rx: &mut RxBuf) -> io::Result<()> {
        rx.held = Held::Nothing;
        if !self.offload {
            let n = self.dev.recv(&mut rx.body).await?;
            if n <= rx.body.len() {
                rx.held = Held::Whole { len: n, csum: Checksum::Unverified };
            }
            return Ok(());
        }
        let n = self.dev.recv_vectored(&mut [IoSliceMut::new(&mut rx.hdr), IoSliceMut::new(&mut rx.body)]).await?;
        // The kernel reports a packet's whole length even where it did not fit the buffers.
        let Some(len) = n.checked_sub(VIRTIO_NET_HDR_LEN).filter(|&len| len <= rx.body.len()) else {
            tracing::debug!(len = n, "TUN read dropped: shorter than its virtio-net header, or longer than 64 KiB");
            return Ok(());
        };
        match classify(&rx.hdr, &mut rx.body[..len]) {
            Classified::Packet { csum } => rx.held = Held::Whole { len, csum },
            Classified::SplitUdp { hdr_len } => {
                if rx.segs.is_empty() {
                    rx.segs = vec![vec![0; MTU]; MAX_SEGMENTS];
                    rx.sizes = vec![0; MAX_SEGMENTS];
                }
                let Ok(mut hdr) = VirtioNetHdr::decode(&rx.hdr) else { return Ok(()) };
                hdr.hdr_len = hdr_len;
                match tun_rs::gso_split(&mut rx.body[..len], hdr, &mut rx.segs, &mut rx.sizes, 0, false) {
                    Ok(k) => rx.held = Held::Split(k),
                    Err(e) => tracing::debug!("UDP super-packet dropped: {e}"),
                }
            }
            Classified::Drop => tracing::debug!(len = n, "TUN read dropped: not an IPv4 packet beckon serves"),
        }
        Ok(())
    }

    /// Write one complete IPv4 packet (checksums filled).
    pub async fn send(&self, pkt: &[u8]) -> io::Result<()> {
        if self.offload {
            let hdr = [0u8; VIRTIO_NET_HDR_LEN];
            self.dev.send_vectored(&[IoSlice::new(&hdr), IoSlice::new(pkt)]).await?;
        } else {
            self.dev.send(pkt).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_hdr(flags: u8, gso_type: u8, csum_start: u16, csum_offset: u16, pkt: &[u8]) -> Vec<u8> {
        let mut v = vec![flags, gso_type];
        v.extend_from_slice(&0u16.to_ne_bytes()); // hdr_len
        v.extend_from_slice(&1448u16.to_ne_bytes()); // gso_size
        v.extend_from_slice(&csum_start.to_ne_bytes());
        v.extend_from_slice(&csum_offset.to_ne_bytes());
        v.extend_from_slice(pkt);
        v
    }

    fn datagram() -> Vec<u8> {
        let from = "203.0.113.2:5060".parse().unwrap();
        let to = "203.0.113.100:40000".parse().unwrap();
        crate::server::stack::udp_datagram(from, to, b"SIP/2.0 200 OK").unwrap()
    }

    /// Classify a contiguous read (header + packet) as the reader sees it.
    fn classify_read(raw: &mut [u8]) -> Classified {
        let (hdr, pkt) = raw.split_at_mut(VIRTIO_NET_HDR_LEN.min(raw.len()));
        classify(hdr, pkt)
    }

    #[test]
    fn partial_checksum_is_completed() {
        let good = datagram();
        // What the kernel hands over for CHECKSUM_PARTIAL: the pseudo-header sum, not inverted.
        let mut partial = good.clone();
        let udp_len = (good.len() - 20) as u16;
        let pseudo = checksum::combine(&[checksum::data(&good[12..20]), 17, udp_len]);
        partial[26..28].copy_from_slice(&pseudo.to_be_bytes());
        let mut raw = with_hdr(F_NEEDS_CSUM, GSO_NONE, 20, 6, &partial);
        assert_eq!(classify_read(&mut raw), Classified::Packet { csum: Checksum::Verified });
        assert_eq!(&raw[10..], &good[..]);
    }

    #[test]
    fn headers_decide_what_needs_checking() {
        let pkt = datagram();
        for (flags, gso, want) in [
            (0, GSO_NONE, Classified::Packet { csum: Checksum::Unverified }),
            (F_DATA_VALID, GSO_NONE, Classified::Packet { csum: Checksum::Verified }),
            (F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, Classified::Packet { csum: Checksum::Verified }),
            (F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4 | GSO_ECN, Classified::Packet { csum: Checksum::Verified }),
            (F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, Classified::SplitUdp { hdr_len: 28 }),
            (F_NEEDS_CSUM, 4 /* TCPV6 */, Classified::Drop),
        ] {
            let mut raw = with_hdr(flags, gso, 20, 16, &pkt);
            assert_eq!(classify_read(&mut raw), want, "flags {flags} gso {gso}");
        }
    }

    #[test]
    fn bad_reads_are_dropped_not_panicking() {
        let pkt = datagram();
        // A checksum offset beyond the packet, a header-only read, a short header.
        let mut raw = with_hdr(F_NEEDS_CSUM, GSO_NONE, 20, 60_000, &pkt);
        assert_eq!(classify_read(&mut raw), Classified::Drop);
        let mut raw = with_hdr(F_NEEDS_CSUM, GSO_NONE, 20, 6, &[]);
        assert_eq!(classify_read(&mut raw), Classified::Drop);
        assert_eq!(classify_read(&mut raw[..5]), Classified::Drop);
        let mut raw = with_hdr(F_NEEDS_CSUM, GSO_NONE, u16::MAX, u16::MAX, &pkt);
        assert_eq!(classify_read(&mut raw), Classified::Drop);
        // A UDP super-packet whose UDP header would start beyond the packet.
        let mut raw = with_hdr(F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, u16::MAX - 8, 6, &pkt);
        assert_eq!(classify_read(&mut raw), Classified::Drop);
    }

    #[test]
    fn large_packets_leave_with_their_buffer_small_ones_are_copied() {
        let mut rx = RxBuf::default();
        assert_eq!(rx.take_whole(), None);
        // A small packet: copied, and the read buffer stays.
        rx.body[..3].copy_from_slice(b"ack");
        rx.held = Held::Whole { len: 3, csum: Checksum::Verified };
        let buf = rx.body.as_ptr();
        let small = rx.take_whole().unwrap();
        assert_eq!(small, b"ack");
        assert_eq!(rx.body.as_ptr(), buf);
        assert!(rx.whole().is_none(), "taken once");
        // A super-packet: its buffer goes with it, the reader gets another one as long.
        rx.body[..HANDOVER_MIN].fill(7);
        rx.held = Held::Whole { len: HANDOVER_MIN, csum: Checksum::Verified };
        let big = rx.take_whole().unwrap();
        assert_eq!(big.as_ptr(), buf);
        assert_eq!(big.len(), HANDOVER_MIN);
        assert!(big.iter().all(|&b| b == 7));
        assert_ne!(rx.body.as_ptr(), buf);
        assert_eq!(rx.body.len(), rx_pool::BUF_LEN);
    }
}
