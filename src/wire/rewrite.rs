//! In-place address rewriting of IPv4 TCP/UDP packets with incremental checksum updates
//! (RFC 1624): the server's userspace stack talks to a per-camera virtual address, the wire
//! carries the camera's NAT mapping; every packet crossing between the two is rewritten here.

use smoltcp::wire::{IpProtocol, Ipv4Packet};
use std::net::{Ipv4Addr, SocketAddrV4};

/// Which end of the packet to rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error("not a well-formed IPv4 packet")]
    BadIp,
    #[error("fragmented packet")]
    Fragment,
    #[error("not TCP or UDP")]
    Protocol,
    #[error("transport header truncated")]
    Truncated,
}

/// One's-complement checksum update for a 16-bit field change (RFC 1624, eqn. 3).
pub fn update16(sum: u16, old: u16, new: u16) -> u16 {
    let mut acc = (!sum as u32) + (!old as u32 & 0xffff) + new as u32;
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

fn update32(sum: u16, old: u32, new: u32) -> u16 {
    let s = update16(sum, (old >> 16) as u16, (new >> 16) as u16);
    update16(s, old as u16, new as u16)
}

/// The (address, port) of one end of a TCP/UDP packet.
pub fn endpoint(pkt: &[u8], end: End) -> Result<SocketAddrV4, RewriteError> {
    let ip = Ipv4Packet::new_checked(pkt).map_err(|_| RewriteError::BadIp)?;
    let hl = ip.header_len() as usize;
    let t = &pkt[hl..ip.total_len() as usize];
    if t.len() < 4 {
        return Err(RewriteError::Truncated);
    }
    Ok(match end {
        End::Src => SocketAddrV4::new(ip.src_addr(), u16::from_be_bytes([t[0], t[1]])),
        End::Dst => SocketAddrV4::new(ip.dst_addr(), u16::from_be_bytes([t[2], t[3]])),
    })
}

/// Rewrite one end's address and port, fixing the IPv4 header checksum and the TCP/UDP checksum
/// incrementally (both cover the address through the pseudo-header).
pub fn rewrite(pkt: &mut [u8], end: End, to: SocketAddrV4) -> Result<(), RewriteError> {
    let (hl, proto, total) = {
        let ip = Ipv4Packet::new_checked(&*pkt).map_err(|_| RewriteError::BadIp)?;
        if ip.more_frags() || ip.frag_offset() != 0 {
            return Err(RewriteError::Fragment);
        }
        (ip.header_len() as usize, ip.next_header(), ip.total_len() as usize)
    };
    let csum_at = match proto {
        IpProtocol::Tcp => 16,
        IpProtocol::Udp => 6,
        _ => return Err(RewriteError::Protocol),
    };
    if total < hl + csum_at + 2 || (proto == IpProtocol::Tcp && total < hl + 20) || (proto == IpProtocol::Udp && total < hl + 8) {
        return Err(RewriteError::Truncated);
    }
    let addr_at = match end {
        End::Src => 12,
        End::Dst => 16,
    };
    let port_at = hl + if end == End::Src { 0 } else { 2 };
    let old_addr = u32::from_be_bytes(pkt[addr_at..addr_at + 4].try_into().unwrap());
    let new_addr = u32::from(*to.ip());
    let old_port = u16::from_be_bytes([pkt[port_at], pkt[port_at + 1]]);
    let new_port = to.port();

    // IPv4 header checksum.
    let ipsum = u16::from_be_bytes([pkt[10], pkt[11]]);
    pkt[10..12].copy_from_slice(&update32(ipsum, old_addr, new_addr).to_be_bytes());
    pkt[addr_at..addr_at + 4].copy_from_slice(&new_addr.to_be_bytes());

    // Transport checksum (UDP checksum 0 means "none" and stays 0).
    let c = hl + csum_at;
    let tsum = u16::from_be_bytes([pkt[c], pkt[c + 1]]);
    if !(proto == IpProtocol::Udp && tsum == 0) {
        let mut s = update32(tsum, old_addr, new_addr);
        s = update16(s, old_port, new_port);
        if proto == IpProtocol::Udp && s == 0 {
            s = 0xffff;
        }
        pkt[c..c + 2].copy_from_slice(&s.to_be_bytes());
    }
    pkt[port_at..port_at + 2].copy_from_slice(&new_port.to_be_bytes());
    Ok(())
}

/// An IPv4 address as smoltcp wants it.
pub fn v4(a: Ipv4Addr) -> smoltcp::wire::Ipv4Address {
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{IpAddress, TcpPacket, UdpPacket};

    fn tcp_packet(payload: &[u8]) -> Vec<u8> {
        let a = crate::wire::trigger_packet::Addressing {
            proto: crate::catalog::Proto::Tcp,
            src: "203.0.113.2".parse().unwrap(),
            src_port: 554,
            dst: "203.0.113.100".parse().unwrap(),
            dst_port: 40000,
        };
        let mut seg = vec![0u8; 20 + payload.len()];
        {
            let mut t = TcpPacket::new_unchecked(&mut seg[..]);
            t.set_src_port(554);
            t.set_dst_port(40000);
            t.set_header_len(20);
            t.set_ack(true);
            t.set_seq_number(smoltcp::wire::TcpSeqNumber(123456));
        }
        seg[20..].copy_from_slice(payload);
        crate::wire::trigger_packet::build(&a, &seg, 7).unwrap()
    }

    fn verify(pkt: &[u8]) -> bool {
        let ip = Ipv4Packet::new_checked(pkt).unwrap();
        let (s, d) = (IpAddress::Ipv4(ip.src_addr()), IpAddress::Ipv4(ip.dst_addr()));
        ip.verify_checksum()
            && match ip.next_header() {
                IpProtocol::Tcp => TcpPacket::new_checked(ip.payload()).unwrap().verify_checksum(&s, &d),
                _ => UdpPacket::new_checked(ip.payload()).unwrap().verify_checksum(&s, &d),
            }
    }

    #[test]
    fn rewritten_packets_have_valid_checksums() {
        let mut p = tcp_packet(b"RTSP/1.0 200 OK\r\n\r\n");
        rewrite(&mut p, End::Src, "198.19.128.1:554".parse().unwrap()).unwrap();
        assert!(verify(&p));
        assert_eq!(endpoint(&p, End::Src).unwrap(), "198.19.128.1:554".parse().unwrap());
        rewrite(&mut p, End::Dst, "203.0.113.100:41234".parse().unwrap()).unwrap();
        assert!(verify(&p));
        assert_eq!(endpoint(&p, End::Dst).unwrap().port(), 41234);
        // Round trip restores the bytes exactly.
        let orig = tcp_packet(b"x");
        let mut q = orig.clone();
        rewrite(&mut q, End::Src, "198.19.128.1:9".parse().unwrap()).unwrap();
        rewrite(&mut q, End::Src, "203.0.113.2:554".parse().unwrap()).unwrap();
        assert_eq!(q, orig);
    }

    #[test]
    fn udp_rewrite_and_rejections() {
        let a = crate::wire::trigger_packet::Addressing {
            proto: crate::catalog::Proto::Udp,
            src: "203.0.113.100".parse().unwrap(),
            src_port: 1,
            dst: "198.18.1.10".parse().unwrap(),
            dst_port: 5060,
        };
        let mut p = crate::wire::trigger_packet::build(&a, &crate::wire::trigger_packet::udp_pd1(&a, b"hi"), 1).unwrap();
        rewrite(&mut p, End::Dst, "203.0.113.2:6000".parse().unwrap()).unwrap();
        assert!(verify(&p));
        assert_eq!(rewrite(&mut [0u8; 10], End::Src, "1.2.3.4:1".parse().unwrap()), Err(RewriteError::BadIp));
        let mut short = tcp_packet(b"");
        short.truncate(30);
        short[2..4].copy_from_slice(&30u16.to_be_bytes());
        assert!(rewrite(&mut short, End::Src, "1.2.3.4:1".parse().unwrap()).is_err());
    }

    proptest::proptest! {
        #[test]
        fn incremental_equals_full_recompute(payload in proptest::collection::vec(proptest::num::u8::ANY, 0..1400),
                                             ip: u32, port: u16, src: bool) {
            let mut p = tcp_packet(&payload);
            let end = if src { End::Src } else { End::Dst };
            rewrite(&mut p, end, SocketAddrV4::new(ip.into(), port)).unwrap();
            proptest::prop_assert!(verify(&p));
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..100)) {
            let mut d = data.clone();
            let _ = rewrite(&mut d, End::Src, "1.2.3.4:5".parse().unwrap());
            let _ = endpoint(&data, End::Dst);
        }
    }
}
