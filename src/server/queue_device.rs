//! A smoltcp `phy::Device` over two packet queues. smoltcp stays sans-IO: the async shell
//! (a TCP shard) fills `rx` with packets from the TUN and drains `tx` into it.

use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium};
use std::collections::VecDeque;

/// Packets smoltcp may queue for transmission before the shell drains them.
const TX_QUEUE: usize = 4096;
/// The camera-facing path's MTU (the TUN's).
pub const MTU: usize = 1500;

#[derive(Default)]
pub struct QueueDevice {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
}

pub struct RxTok(Vec<u8>);
pub struct TxTok<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.0);
        // smoltcp has copied what it keeps: a TUN read buffer goes back to the reader's pool.
        super::rx_pool::give(self.0);
        r
    }
}

impl smoltcp::phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;
    fn receive(&mut self, _t: smoltcp::time::Instant) -> Option<(RxTok, TxTok<'_>)> {
        let p = self.rx.pop_front()?;
        Some((RxTok(p), TxTok(&mut self.tx)))
    }
    fn transmit(&mut self, _t: smoltcp::time::Instant) -> Option<TxTok<'_>> {
        (self.tx.len() < TX_QUEUE).then_some(TxTok(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = MTU;
        // The TUN reader verified (or the kernel did) every TCP checksum before dispatch; a TCP
        // super-packet's checksum field is only partial, so smoltcp must not check it again.
        c.checksum.tcp = Checksum::Tx;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
    use smoltcp::socket::tcp;
    use smoltcp::time::Instant;
    use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

    struct Host {
        iface: Interface,
        dev: QueueDevice,
        sockets: SocketSet<'static>,
        handle: SocketHandle,
    }

    fn host(ip: [u8; 4], rx: usize) -> Host {
        host_tx(ip, rx, 4096)
    }

    fn host_tx(ip: [u8; 4], rx: usize, tx: usize) -> Host {
        let mut dev = QueueDevice::default();
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut dev, Instant::from_millis(0));
        iface.update_ip_addrs(|a| a.push(IpCidr::new(IpAddress::v4(ip[0], ip[1], ip[2], ip[3]), 24)).unwrap());
        let mut sockets = SocketSet::new(Vec::new());
        let mut sock = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; rx]), tcp::SocketBuffer::new(vec![0; tx]));
        // As the shards run it (and the clock stands still here: no delayed ACK would fire).
        sock.set_ack_delay(None);
        sock.set_nagle_enabled(false);
        let handle = sockets.add(sock);
        Host { iface, dev, sockets, handle }
    }

    impl Host {
        fn sock(&mut self) -> &mut tcp::Socket<'static> {
            self.sockets.get_mut(self.handle)
        }
    }

    /// `server` listens on 198.18.0.1:80 and `client` connects to it.
    fn connect(server: &mut Host, client: &mut Host) {
        server.sock().listen(80).unwrap();
        let cx = client.iface.context();
        client.sockets.get_mut::<tcp::Socket>(client.handle).connect(cx, (IpAddress::v4(198, 18, 0, 1), 80), 40000).unwrap();
        shuttle(client, server);
    }

    /// An rx sink on `server`'s socket that takes up to `take` bytes of each payload (at first:
    /// all) and records them in `out`.
    #[allow(clippy::type_complexity)]
    fn recording_sink(server: &mut Host) -> (std::sync::Arc<std::sync::Mutex<Vec<u8>>>, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let take = Arc::new(AtomicUsize::new(usize::MAX));
        let (o, t) = (out.clone(), take.clone());
        server.sock().set_rx_sink(Some(tcp::RxSink(Box::new(move |p: &[u8]| {
            let k = t.load(Ordering::Relaxed).min(p.len());
            o.lock().unwrap().extend_from_slice(&p[..k]);
            k
        }))));
        (out, take)
    }

    /// Carry packets across until the client's sends are all acknowledged (at most 20 rounds:
    /// a window that stays closed leaves them queued, which the caller checks).
    fn deliver(client: &mut Host, server: &mut Host) {
        for _ in 0..20 {
            shuttle(client, server);
            if client.sock().send_queue() == 0 {
                break;
            }
        }
    }

    /// Poll both hosts and carry their packets across until neither has anything to say.
    fn shuttle(a: &mut Host, b: &mut Host) {
        for _ in 0..50 {
            a.iface.poll(Instant::from_millis(0), &mut a.dev, &mut a.sockets);
            b.iface.poll(Instant::from_millis(0), &mut b.dev, &mut b.sockets);
            if a.dev.tx.is_empty() && b.dev.tx.is_empty() {
                return;
            }
            b.dev.rx.extend(a.dev.tx.drain(..));
            a.dev.rx.extend(b.dev.tx.drain(..));
        }
        panic!("the two stacks kept talking");
    }

    /// The patched smoltcp (vendor/smoltcp/BECKON-PATCH.md): a receive ring that was drained
    /// takes the next bytes at its front, so a reader that keeps up touches only the ring's
    /// first pages; bytes that are still buffered stay where they are.
    #[test]
    fn drained_receive_ring_restarts_at_its_front() {
        let (mut server, mut client) = (host([198, 18, 0, 1], 1000), host([198, 18, 0, 2], 1000));
        connect(&mut server, &mut client);
        assert_eq!(server.sock().state(), tcp::State::Established);

        // 900 bytes, read at once: the ring is empty again, its read position at 900.
        assert_eq!(client.sock().send_slice(&[1; 900]).unwrap(), 900);
        shuttle(&mut client, &mut server);
        assert_eq!(server.sock().recv(|b| (b.len(), b.len())).unwrap(), 900);

        // The next 500 bytes are contiguous: written at the front, not 100 at the end + 400.
        assert_eq!(client.sock().send_slice(&[2; 500]).unwrap(), 500);
        shuttle(&mut client, &mut server);
        assert_eq!(server.sock().recv(|b| (b.len(), b.to_vec())).unwrap(), vec![2; 500]);

        // While bytes are buffered nothing moves: 300 + 300 arrive in order behind each other.
        let data: Vec<u8> = (0..600).map(|i| (i % 251) as u8).collect();
        assert_eq!(client.sock().send_slice(&data[..300]).unwrap(), 300);
        shuttle(&mut client, &mut server);
        assert_eq!(client.sock().send_slice(&data[300..]).unwrap(), 300);
        shuttle(&mut client, &mut server);
        let mut got = vec![0; 1000];
        let n = server.sock().recv_slice(&mut got).unwrap();
        assert_eq!(&got[..n], &data[..]);

        // Out of order, with the read position away from the front: A is buffered, C arrives
        // before B, A is read (the ring is empty, C waits out of order), then B comes. C must
        // stay where it was put: the ring starts again at its front only when nothing waits.
        assert_eq!(client.sock().send_slice(&[3; 100]).unwrap(), 100);
        shuttle(&mut client, &mut server);
        let mut segment = |fill: u8| {
            assert_eq!(client.sock().send_slice(&[fill; 100]).unwrap(), 100);
            client.iface.poll(Instant::from_millis(0), &mut client.dev, &mut client.sockets);
            assert_eq!(client.dev.tx.len(), 1);
            client.dev.tx.pop_front().unwrap()
        };
        let (b, c) = (segment(4), segment(5));
        server.dev.rx.push_back(c);
        server.iface.poll(Instant::from_millis(0), &mut server.dev, &mut server.sockets);
        server.dev.tx.clear(); // its duplicate ACK
        assert_eq!(server.sock().recv(|b| (b.len(), b.to_vec())).unwrap(), vec![3; 100]);
        server.dev.rx.push_back(b);
        shuttle(&mut client, &mut server);
        let n = server.sock().recv_slice(&mut got).unwrap();
        assert_eq!(&got[..n], [[4; 100], [5; 100]].concat());
    }

    /// The vendored smoltcp's D-SACK (BECKON-PATCH.md): a data segment received twice (a
    /// retransmission whose original was only late) draws an ACK whose first SACK block is that
    /// segment, below the acknowledgement number (RFC 2883), so a Linux sender can undo a cut
    /// of its congestion window; a segment beyond the window draws a plain ACK.
    #[test]
    fn a_segment_received_twice_is_reported_as_a_duplicate() {
        use smoltcp::wire::{Ipv4Packet, TcpPacket, TcpRepr};
        let (mut server, mut client) = (host([198, 18, 0, 1], 1000), host([198, 18, 0, 2], 1000));
        connect(&mut server, &mut client);
        assert_eq!(client.sock().send_slice(&[7; 100]).unwrap(), 100);
        client.iface.poll(Instant::from_millis(0), &mut client.dev, &mut client.sockets);
        let seg = client.dev.tx.pop_front().unwrap();
        let seq = TcpPacket::new_checked(&seg[20..]).unwrap().seq_number();
        let reply = |server: &mut Host, pkt: Vec<u8>| {
            server.dev.rx.push_back(pkt);
            server.iface.poll(Instant::from_millis(0), &mut server.dev, &mut server.sockets);
            let out = server.dev.tx.pop_front().expect("an ACK");
            let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
            let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
            let caps = smoltcp::phy::ChecksumCapabilities::ignored();
            let repr = TcpRepr::parse(&tcp, &ip.src_addr().into(), &ip.dst_addr().into(), &caps).unwrap();
            (repr.ack_number.unwrap(), repr.sack_ranges)
        };
        let (ack, sacks) = reply(&mut server, seg.clone());
        assert_eq!(ack, seq + 100);
        assert_eq!(sacks, [None, None, None], "a new segment is not reported");
        let (ack, sacks) = reply(&mut server, seg.clone());
        assert_eq!(ack, seq + 100);
        assert_eq!(sacks[0], Some((seq.0 as u32, (seq + 100).0 as u32)), "the duplicate, as the first block");
        // Far beyond the window: not a duplicate, no D-SACK block.
        let mut far = seg.clone();
        TcpPacket::new_unchecked(&mut far[20..]).set_seq_number(seq + 100_000);
        let (_, sacks) = reply(&mut server, far);
        assert_eq!(sacks[0], None, "an out-of-window segment is not a duplicate");
        assert_eq!(server.sock().recv_queue(), 100);
    }

    /// The vendored smoltcp's rx sink (BECKON-PATCH.md): in-order bytes that arrive while the
    /// ring is empty go to the sink, as many as it takes, the rest into the ring; taken bytes
    /// are acknowledged and do not close the window; bytes that waited out of order never go
    /// to the sink; and the sink plus the ring give the stream in order.
    #[test]
    fn rx_sink_takes_in_order_bytes_before_the_ring() {
        use std::sync::atomic::Ordering;
        let (mut server, mut client) = (host([198, 18, 0, 1], 1000), host([198, 18, 0, 2], 1000));
        connect(&mut server, &mut client);
        let (out, take) = recording_sink(&mut server);
        let data: Vec<u8> = (0..4000).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        let mut send = |client: &mut Host, server: &mut Host, n: usize| {
            assert_eq!(client.sock().send_slice(&data[sent..sent + n]).unwrap(), n);
            sent += n;
            shuttle(client, server);
        };

        // The sink takes everything: nothing is buffered, all is acknowledged, and the window
        // stays whole (two 900-byte sends through a 1000-byte ring with nobody reading it).
        send(&mut client, &mut server, 900);
        send(&mut client, &mut server, 900);
        assert_eq!(out.lock().unwrap().len(), 1800);
        assert_eq!(server.sock().recv_queue(), 0);
        assert_eq!(client.sock().send_queue(), 0, "taken bytes are acknowledged");

        // It takes 100 of 300: 200 are buffered. While they are, the sink is not offered more.
        take.store(100, Ordering::Relaxed);
        send(&mut client, &mut server, 300);
        send(&mut client, &mut server, 300);
        assert_eq!(out.lock().unwrap().len(), 1900);
        assert_eq!(server.sock().recv_queue(), 500);
        let buffered = server.sock().recv(|b| (b.len(), b.to_vec())).unwrap();
        out.lock().unwrap().extend_from_slice(&buffered);

        // It takes nothing (a full client socket): the bytes are buffered as without a sink.
        take.store(0, Ordering::Relaxed);
        send(&mut client, &mut server, 200);
        assert_eq!(server.sock().recv_queue(), 200);
        let buffered = server.sock().recv(|b| (b.len(), b.to_vec())).unwrap();
        out.lock().unwrap().extend_from_slice(&buffered);

        // Out of order while the ring is empty: D waits in the reassembler. B arrives in order
        // but leaves a gap before D: it is not given to the sink either (the waiting bytes'
        // places are counted from the ring's end). C fills the gap: B, C, D are buffered.
        take.store(usize::MAX, Ordering::Relaxed);
        let mut segment = |n: usize| {
            assert_eq!(client.sock().send_slice(&data[sent..sent + n]).unwrap(), n);
            sent += n;
            client.iface.poll(Instant::from_millis(0), &mut client.dev, &mut client.sockets);
            assert_eq!(client.dev.tx.len(), 1);
            client.dev.tx.pop_front().unwrap()
        };
        let (b, c, d) = (segment(100), segment(100), segment(100));
        for p in [d, b] {
            server.dev.rx.push_back(p);
            server.iface.poll(Instant::from_millis(0), &mut server.dev, &mut server.sockets);
            server.dev.tx.clear(); // its (duplicate) ACK
        }
        server.dev.rx.push_back(c);
        shuttle(&mut client, &mut server);
        assert_eq!(out.lock().unwrap().len(), 2600, "reassembled bytes go to the ring");
        assert_eq!(server.sock().recv_queue(), 300);
        let buffered = server.sock().recv(|b| (b.len(), b.to_vec())).unwrap();
        out.lock().unwrap().extend_from_slice(&buffered);
        assert_eq!(client.sock().send_queue(), 0);

        // Then in-order bytes go to the sink again; a duplicate of a segment that was taken is
        // not offered again; the whole stream arrived, in order.
        assert_eq!(client.sock().send_slice(&data[2900..3700]).unwrap(), 800);
        client.iface.poll(Instant::from_millis(0), &mut client.dev, &mut client.sockets);
        let copy = client.dev.tx.front().cloned().expect("a segment");
        shuttle(&mut client, &mut server);
        server.dev.rx.push_back(copy);
        shuttle(&mut client, &mut server);
        assert_eq!(server.sock().recv_queue(), 0);
        assert_eq!(*out.lock().unwrap(), data[..3700]);
    }

    /// The rx sink with a receive ring large enough for window scaling, and a FIN behind data
    /// the sink takes only in part: every byte and the FIN are acknowledged, the rest is read
    /// from the ring, then the stream ends.
    #[test]
    fn rx_sink_with_window_scaling_and_a_fin() {
        use std::sync::atomic::Ordering;
        const RING: usize = 256 * 1024; // window scale 2
        let (mut server, mut client) = (host_tx([198, 18, 0, 1], RING, 4096), host_tx([198, 18, 0, 2], 4096, 2 * RING));
        connect(&mut server, &mut client);
        let (out, take) = recording_sink(&mut server);
        let data: Vec<u8> = (0..(2 * RING + 1000)).map(|i| (i % 251) as u8).collect();

        // Twice the ring through the sink, nobody reading the ring: the window stays open.
        assert_eq!(client.sock().send_slice(&data[..2 * RING]).unwrap(), 2 * RING);
        deliver(&mut client, &mut server);
        assert_eq!(client.sock().send_queue(), 0, "all acknowledged");
        assert_eq!(server.sock().recv_queue(), 0);

        // 1000 bytes and a FIN, the sink takes 300: the FIN is acknowledged with the data.
        take.store(300, Ordering::Relaxed);
        assert_eq!(client.sock().send_slice(&data[2 * RING..]).unwrap(), 1000);
        client.sock().close();
        shuttle(&mut client, &mut server);
        assert_eq!(client.sock().send_queue(), 0);
        assert_eq!(client.sock().state(), tcp::State::FinWait2, "data and FIN acknowledged");
        assert_eq!(server.sock().state(), tcp::State::CloseWait);
        assert_eq!(server.sock().recv_queue(), 700);
        let rest = server.sock().recv(|b| (b.len(), b.to_vec())).unwrap();
        out.lock().unwrap().extend_from_slice(&rest);
        assert_eq!(server.sock().recv(|b| (b.len(), ())), Err(tcp::RecvError::Finished));
        assert_eq!(*out.lock().unwrap(), data);
    }

    /// The vendored smoltcp's growable receive buffer (BECKON-PATCH.md, section 3): the window
    /// scale of a connection covers `set_rx_capacity_max`; a larger buffer is taken only while
    /// nothing is buffered, and the camera may then fill the larger window.
    #[test]
    fn receive_buffer_grows_while_empty_within_the_window_scale() {
        const RING: usize = 64 * 1024; // window scale 1 alone: at most 128 KiB can be announced
        const GROWN: usize = 256 * 1024;
        let data: Vec<u8> = (0..(100 * 1024 + GROWN)).map(|i| (i % 251) as u8).collect();

        // Without a declared maximum the scale cannot announce the larger buffer: refused.
        let (mut server, mut client) = (host_tx([198, 18, 0, 1], RING, 4096), host_tx([198, 18, 0, 2], 4096, 4096));
        connect(&mut server, &mut client);
        assert_eq!(server.sock().rx_window_announceable(), 65535 << 1);
        assert!(server.sock().grow_rx_buffer(tcp::SocketBuffer::new(vec![0; GROWN])).is_err());

        let (mut server, mut client) = (host_tx([198, 18, 0, 1], RING, 4096), host_tx([198, 18, 0, 2], 4096, 2 * GROWN));
        server.sock().set_rx_capacity_max(GROWN);
        connect(&mut server, &mut client);
        assert_eq!(server.sock().rx_window_announceable(), 65535 << 3);
        let mut got = Vec::new();

        // 100 KiB, nobody reading: 64 KiB fill the ring (less what the scale's unit of 8 bytes
        // cannot announce), the rest waits at the client.
        assert_eq!(client.sock().send_slice(&data[..100 * 1024]).unwrap(), 100 * 1024);
        deliver(&mut client, &mut server);
        assert!(RING - server.sock().recv_queue() < 8, "{} of {RING} buffered", server.sock().recv_queue());
        assert!(server.sock().grow_rx_buffer(tcp::SocketBuffer::new(vec![0; GROWN])).is_err(), "bytes are buffered");
        while server.sock().recv_queue() > 0 || client.sock().send_queue() > 0 {
            got.extend(server.sock().recv(|b| (b.len(), b.to_vec())).unwrap());
            deliver(&mut client, &mut server);
        }

        // Empty: a smaller buffer is refused, the larger one taken.
        assert!(server.sock().grow_rx_buffer(tcp::SocketBuffer::new(vec![0; RING / 2])).is_err());
        assert!(server.sock().grow_rx_buffer(tcp::SocketBuffer::new(vec![0; GROWN])).is_ok());
        assert_eq!(server.sock().recv_capacity(), GROWN);

        // The client may now put almost 256 KiB into the window, still nobody reading.
        let rest = &data[100 * 1024..];
        assert_eq!(client.sock().send_slice(rest).unwrap(), rest.len());
        deliver(&mut client, &mut server);
        assert_eq!(client.sock().send_queue(), 0, "all of it fit the grown window");
        assert_eq!(server.sock().recv_queue(), GROWN);
        while server.sock().recv_queue() > 0 {
            got.extend(server.sock().recv(|b| (b.len(), b.to_vec())).unwrap());
        }
        assert_eq!(got, data);
    }
}
