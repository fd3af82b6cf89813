//! What the server reads from its TUN: with offload, a virtio-net header and a packet
//! (`server::tun::classify`), then the stack's parsing (`server::stack::parse_ingress`). Anyone
//! on the internet can send packets to `public_ip`; the header comes from the kernel.
//!
//! Inputs: raw bytes, or UDP datagrams and echo requests to `public_ip` (optionally with one
//! byte corrupted), each also behind an arbitrary virtio-net header.
//!
//! Oracles: no panic; a classified packet lies inside the read; a UDP datagram reported with a
//! checksum the stack had to verify does verify, and its payload lies inside the packet; an
//! echo reply is a valid ICMP echo reply from `public_ip`.
#![no_main]

use arbitrary::Arbitrary;
use beckon::server::stack::{parse_ingress, udp_datagram, Ingress};
use beckon::server::tun::{classify, Checksum, Classified};
use libfuzzer_sys::fuzz_target;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket};
use std::net::{Ipv4Addr, SocketAddrV4};

const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);

fn check(pkt: &[u8], csum: Checksum) {
    match parse_ingress(pkt, csum, PUBLIC_IP) {
        Ingress::Udp { payload, .. } => {
            let ip = Ipv4Packet::new_checked(pkt).expect("parsed as IPv4");
            let udp = UdpPacket::new_checked(ip.payload()).expect("parsed as UDP");
            if csum == Checksum::Unverified {
                assert!(udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
            }
            let (start, end) = (payload.as_ptr() as usize, payload.as_ptr() as usize + payload.len());
            assert!(start >= pkt.as_ptr() as usize && end <= pkt.as_ptr() as usize + pkt.len());
        }
        Ingress::EchoReply(reply) => {
            let ip = Ipv4Packet::new_checked(&reply[..]).expect("reply is IPv4");
            assert!(ip.verify_checksum());
            assert_eq!(Ipv4Addr::from(ip.src_addr()), PUBLIC_IP);
            let icmp = Icmpv4Packet::new_checked(ip.payload()).expect("reply is ICMP");
            let repr = Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).expect("valid ICMP");
            assert!(matches!(repr, Icmpv4Repr::EchoReply { .. }));
        }
        Ingress::Tcp { .. } | Ingress::Unreachable { .. } | Ingress::Ignore => {}
    }
}

/// What the fuzzer builds: raw bytes, or well-formed packets to `public_ip` (so it spends its
/// time past the header checks), each optionally corrupted at one byte.
#[derive(Arbitrary, Debug)]
enum Body {
    Raw(Vec<u8>),
    Udp { src: u32, sport: u16, dport: u16, payload: Vec<u8> },
    Echo { ident: u16, seq: u16, data: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    body: Body,
    corrupt: Option<(u16, u8)>,
    /// A virtio-net header in front (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset).
    vnet: Option<(u8, u8, u16, u16, u16, u16)>,
}

fn build(body: &Body) -> Vec<u8> {
    match body {
        Body::Raw(b) => b.clone(),
        Body::Udp { src, sport, dport, payload } => {
            udp_datagram(SocketAddrV4::new(Ipv4Addr::from(*src), *sport), SocketAddrV4::new(PUBLIC_IP, *dport), payload).unwrap_or_default()
        }
        Body::Echo { ident, seq, data } => {
            let caps = ChecksumCapabilities::default();
            let req = Icmpv4Repr::EchoRequest { ident: *ident, seq_no: *seq, data };
            let ip = Ipv4Repr {
                src_addr: Ipv4Addr::new(198, 51, 100, 7),
                dst_addr: PUBLIC_IP,
                next_header: IpProtocol::Icmp,
                payload_len: req.buffer_len(),
                hop_limit: 64,
            };
            let mut buf = vec![0u8; ip.buffer_len() + req.buffer_len()];
            if buf.len() > 65_535 {
                return Vec::new();
            }
            let mut pkt = Ipv4Packet::new_unchecked(&mut buf[..]);
            ip.emit(&mut pkt, &caps);
            req.emit(&mut Icmpv4Packet::new_unchecked(pkt.payload_mut()), &caps);
            buf
        }
    }
}

fuzz_target!(|input: Input| {
    let mut pkt = build(&input.body);
    if let Some((at, x)) = input.corrupt {
        if !pkt.is_empty() {
            let i = at as usize % pkt.len();
            pkt[i] ^= x;
        }
    }
    // As a plain packet (TUN without offload: the stack verifies every checksum).
    check(&pkt, Checksum::Unverified);
    // As an offload read: header + packet.
    if let Some((flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)) = input.vnet {
        let mut raw = vec![flags, gso_type];
        for v in [hdr_len, gso_size, csum_start, csum_offset] {
            raw.extend_from_slice(&v.to_ne_bytes());
        }
        raw.extend_from_slice(&pkt);
        let (hdr, pkt) = raw.split_at_mut(10);
        if let Classified::Packet { csum } = classify(hdr, pkt) {
            check(pkt, csum);
        }
    }
});
