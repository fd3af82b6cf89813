//! The server's parsing and rewriting of packets from the wire (anyone on the internet can send
//! packets to `public_ip`): `wire::rewrite::{endpoint, rewrite}` and
//! `server::stack::unreachable_for` (ICMP errors about our UDP mappings).
//!
//! Oracles: no panic; a successful rewrite puts exactly the requested (address, port) at that
//! end, touches only the address, port and the two checksums, keeps valid checksums valid, and
//! rewriting back restores the packet; `unreachable_for` only reports ICMP destination-unreachable
//! errors that quote a UDP datagram from `public_ip`.
#![no_main]

use arbitrary::Arbitrary;
use beckon::server::stack::unreachable_for;
use beckon::wire::rewrite::{endpoint, rewrite, End};
use libfuzzer_sys::fuzz_target;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket};
use std::net::{Ipv4Addr, SocketAddrV4};

const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);

#[derive(Arbitrary, Debug)]
enum Shape {
    /// Bytes as they came.
    Raw(Vec<u8>),
    /// A plausible IPv4 header in front of the bytes (so the fuzzer spends its time past
    /// `new_checked`); `fix` repairs the IP and transport checksums.
    Ip { proto: u8, ihl: u8, flags_frag: u16, src: u32, dst: u32, body: Vec<u8>, fix: bool },
    /// An ICMP error (type/code from the input) quoting `inner` as if it came from public_ip.
    Icmp { icmp_type: u8, code: u8, inner_proto: u8, inner_ihl: u8, inner: Vec<u8>, inner_src_public: bool, truncate: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    shape: Shape,
    src_end: bool,
    to_ip: u32,
    to_port: u16,
}

fn ip_header(proto: u8, ihl: u8, flags_frag: u16, src: u32, dst: u32, body: &[u8]) -> Vec<u8> {
    let hl = 4 * (5 + (ihl as usize % 11)); // 20..=60
    let mut p = vec![0u8; hl + body.len()];
    p[hl..].copy_from_slice(body);
    let total = p.len().min(u16::MAX as usize) as u16;
    p.truncate(total as usize);
    let mut ip = Ipv4Packet::new_unchecked(&mut p[..]);
    ip.set_version(4);
    ip.set_header_len(hl as u8);
    ip.set_total_len(total);
    ip.set_hop_limit(60);
    ip.set_next_header(IpProtocol::from(proto));
    ip.set_src_addr(Ipv4Addr::from(src).into());
    ip.set_dst_addr(Ipv4Addr::from(dst).into());
    p[6..8].copy_from_slice(&flags_frag.to_be_bytes());
    Ipv4Packet::new_unchecked(&mut p[..]).fill_checksum();
    p
}

/// Recompute the transport checksum if the packet is a whole TCP/UDP packet.
fn fix_transport(p: &mut [u8]) {
    let Ok(ip) = Ipv4Packet::new_checked(&*p) else {
        return;
    };
    let (s, d) = (IpAddress::Ipv4(ip.src_addr()), IpAddress::Ipv4(ip.dst_addr()));
    let (hl, total, proto) = (ip.header_len() as usize, ip.total_len() as usize, ip.next_header());
    let t = &mut p[hl..total];
    match proto {
        IpProtocol::Tcp if TcpPacket::new_checked(&*t).is_ok() => TcpPacket::new_unchecked(t).fill_checksum(&s, &d),
        IpProtocol::Udp if UdpPacket::new_checked(&*t).is_ok() => UdpPacket::new_unchecked(t).fill_checksum(&s, &d),
        _ => {}
    }
}

/// (IP header checksum valid, transport checksum valid) where they can be judged.
fn checksums(p: &[u8]) -> Option<(bool, bool)> {
    let ip = Ipv4Packet::new_checked(p).ok()?;
    let (s, d) = (IpAddress::Ipv4(ip.src_addr()), IpAddress::Ipv4(ip.dst_addr()));
    let t = match ip.next_header() {
        IpProtocol::Tcp => TcpPacket::new_checked(ip.payload()).ok()?.verify_checksum(&s, &d),
        IpProtocol::Udp => UdpPacket::new_checked(ip.payload()).ok()?.verify_checksum(&s, &d),
        _ => return None,
    };
    Some((ip.verify_checksum(), t))
}

fuzz_target!(|inp: Input| {
    let pkt = match &inp.shape {
        Shape::Raw(b) => b.clone(),
        Shape::Ip { proto, ihl, flags_frag, src, dst, body, fix } => {
            let mut p = ip_header(*proto, *ihl, *flags_frag, *src, *dst, body);
            if *fix {
                fix_transport(&mut p);
            }
            p
        }
        Shape::Icmp { icmp_type, code, inner_proto, inner_ihl, inner, inner_src_public, truncate } => {
            let src = if *inner_src_public { u32::from(PUBLIC_IP) } else { 0x0a000001 };
            let mut q = ip_header(*inner_proto, *inner_ihl, 0, src, 0xcb007102, inner);
            // ICMP errors quote the header + 8 bytes, sometimes less or more.
            let keep = q.len().saturating_sub(*truncate as usize);
            q.truncate(keep);
            let mut icmp = vec![*icmp_type, *code, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(&q);
            ip_header(1, 0, 0, 0xcb007102, u32::from(PUBLIC_IP), &icmp)
        }
    };

    // ICMP: only destination-unreachable about our own UDP datagrams.
    // (The stack asks only about ICMP packets.)
    if let Ok(ip) =
        Ipv4Packet::new_checked(&pkt[..]).map_err(drop).and_then(|ip| if ip.next_header() == IpProtocol::Icmp { Ok(ip) } else { Err(()) })
    {
        if let Some((_port, _to)) = unreachable_for(&ip, PUBLIC_IP) {
            let icmp = ip.payload();
            assert_eq!(icmp[0], 3, "only destination unreachable");
            let inner = &icmp[8..];
            assert!(inner.len() >= 20);
            assert_eq!(inner[9], 17, "quoted packet is UDP");
            assert_eq!(Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]), PUBLIC_IP);
        }
    }

    let end = if inp.src_end { End::Src } else { End::Dst };
    let to = SocketAddrV4::new(Ipv4Addr::from(inp.to_ip), inp.to_port);
    let before = endpoint(&pkt, end);
    let sums = checksums(&pkt);
    let mut p = pkt.clone();
    match rewrite(&mut p, end, to) {
        Ok(()) => {
            let orig = before.expect("a packet rewrite accepts has endpoints");
            assert_eq!(endpoint(&p, end), Ok(to));
            let other = if inp.src_end { End::Dst } else { End::Src };
            assert_eq!(endpoint(&p, other), endpoint(&pkt, other));
            // Only the address, the port and the two checksums change.
            let ip = Ipv4Packet::new_checked(&pkt[..]).unwrap();
            let hl = ip.header_len() as usize;
            let (a, port) = match end {
                End::Src => (12, hl),
                End::Dst => (16, hl + 2),
            };
            let tcs = hl + if ip.next_header() == IpProtocol::Tcp { 16 } else { 6 };
            for i in 0..pkt.len() {
                let allowed =
                    (10..12).contains(&i) || (a..a + 4).contains(&i) || (port..port + 2).contains(&i) || (tcs..tcs + 2).contains(&i);
                if !allowed {
                    assert_eq!(p[i], pkt[i], "byte {i} changed");
                }
            }
            // Valid checksums stay valid.
            if let (Some((ip_ok, t_ok)), Some((ip_ok2, t_ok2))) = (sums, checksums(&p)) {
                if ip_ok {
                    assert!(ip_ok2, "IP checksum broken by rewrite");
                }
                if t_ok {
                    assert!(t_ok2, "transport checksum broken by rewrite");
                }
            }
            // And back.
            let mut q = p.clone();
            rewrite(&mut q, end, orig).expect("rewrite back");
            assert_eq!(endpoint(&q, end), Ok(orig));
            if sums.is_some_and(|(i, t)| i && t) {
                let back = checksums(&q).unwrap();
                assert!(back.0 && back.1);
            }
        }
        Err(_) => assert_eq!(p, pkt, "a refused rewrite leaves the packet alone"),
    }
});
