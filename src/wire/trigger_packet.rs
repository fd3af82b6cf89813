//! The trigger packet P3 (patent S7): IPv4 header with source = server public IP and
//! destination = camera, followed by PD1 unchanged except for a recomputed checksum.
//!
//! The trigger trusts nothing in PD1: ports must equal the indication's fields, lengths must
//! agree, and the result must fit the MTU.

use crate::catalog::Proto;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket};
use std::net::Ipv4Addr;

pub const IPV4_HEADER: usize = 20;
/// Largest P3; the TUN MTU.
pub const MAX_PACKET: usize = 1500;
/// TTL of injected packets; the trigger host's forwarding takes one off.
pub const TTL: u8 = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("PD1 of {0} bytes is too short for a {1} header")]
    TooShort(usize, Proto),
    #[error("P3 would be {0} bytes, over the {MAX_PACKET}-byte MTU")]
    TooLong(usize),
    #[error("PD1 ports {0}->{1} differ from the indication's {2}->{3}")]
    PortMismatch(u16, u16, u16, u16),
    #[error("PD1 UDP length field {0} differs from its size {1}")]
    BadUdpLength(u16, usize),
    #[error("PD1 TCP header length {0} is invalid")]
    BadTcpHeader(usize),
}

/// Fields of an indication that shape P3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addressing {
    pub proto: Proto,
    pub src: Ipv4Addr,
    pub src_port: u16,
    pub dst: Ipv4Addr,
    pub dst_port: u16,
}

/// Build P3. `ident` is the IPv4 identification (random per packet in production).
pub fn build(a: &Addressing, pd1: &[u8], ident: u16) -> Result<Vec<u8>, BuildError> {
    let total = IPV4_HEADER + pd1.len();
    if total > MAX_PACKET {
        return Err(BuildError::TooLong(total));
    }
    let (sport, dport) = match a.proto {
        Proto::Udp => {
            if pd1.len() < 8 {
                return Err(BuildError::TooShort(pd1.len(), a.proto));
            }
            let udp = UdpPacket::new_unchecked(pd1);
            if udp.len() as usize != pd1.len() {
                return Err(BuildError::BadUdpLength(udp.len(), pd1.len()));
            }
            (udp.src_port(), udp.dst_port())
        }
        Proto::Tcp => {
            if pd1.len() < 20 {
                return Err(BuildError::TooShort(pd1.len(), a.proto));
            }
            let tcp = TcpPacket::new_unchecked(pd1);
            let hl = tcp.header_len() as usize;
            if !(20..=60).contains(&hl) || hl > pd1.len() {
                return Err(BuildError::BadTcpHeader(hl));
            }
            (tcp.src_port(), tcp.dst_port())
        }
    };
    if (sport, dport) != (a.src_port, a.dst_port) {
        return Err(BuildError::PortMismatch(sport, dport, a.src_port, a.dst_port));
    }

    let mut buf = vec![0u8; total];
    let src = a.src;
    let dst = a.dst;
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut buf[..]);
        ip.set_version(4);
        ip.set_header_len(IPV4_HEADER as u8);
        ip.set_dscp(0);
        ip.set_ecn(0);
        ip.set_total_len(total as u16);
        ip.set_ident(ident);
        ip.clear_flags();
        ip.set_dont_frag(true);
        ip.set_frag_offset(0);
        ip.set_hop_limit(TTL);
        ip.set_next_header(match a.proto {
            Proto::Udp => IpProtocol::Udp,
            Proto::Tcp => IpProtocol::Tcp,
        });
        ip.set_src_addr(src);
        ip.set_dst_addr(dst);
        ip.fill_checksum();
    }
    let payload = &mut buf[IPV4_HEADER..];
    payload.copy_from_slice(pd1);
    let (s, d) = (IpAddress::Ipv4(src), IpAddress::Ipv4(dst));
    match a.proto {
        Proto::Udp => UdpPacket::new_unchecked(payload).fill_checksum(&s, &d),
        Proto::Tcp => TcpPacket::new_unchecked(payload).fill_checksum(&s, &d),
    }
    Ok(buf)
}

/// PD1 for the UDP signalling form: UDP header + payload with the checksum over the
/// server → camera pseudo-header (the datagram the server would send without a NAT).
pub fn udp_pd1(a: &Addressing, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut buf = vec![0u8; len];
    let mut udp = UdpPacket::new_unchecked(&mut buf[..]);
    udp.set_src_port(a.src_port);
    udp.set_dst_port(a.dst_port);
    udp.set_len(len as u16);
    udp.payload_mut().copy_from_slice(payload);
    udp.fill_checksum(&IpAddress::Ipv4(a.src), &IpAddress::Ipv4(a.dst));
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(proto: Proto) -> Addressing {
        Addressing { proto, src: "203.0.113.100".parse().unwrap(), src_port: 40000, dst: "198.18.1.10".parse().unwrap(), dst_port: 5060 }
    }

    #[test]
    fn udp_p3_has_valid_checksums_and_fields() {
        let a = addr(Proto::Udp);
        let pd1 = udp_pd1(&a, b"OPTIONS sip:cam SIP/2.0\r\n\r\n");
        let p3 = build(&a, &pd1, 0x1234).unwrap();
        let ip = Ipv4Packet::new_checked(&p3[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.src_addr(), a.src);
        assert_eq!(ip.dst_addr(), a.dst);
        assert_eq!(ip.hop_limit(), TTL);
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(&IpAddress::Ipv4(a.src), &IpAddress::Ipv4(a.dst)));
        assert_eq!(udp.payload(), b"OPTIONS sip:cam SIP/2.0\r\n\r\n");
    }

    #[test]
    fn tcp_syn_p3_checksum_is_recomputed() {
        let a = Addressing { dst_port: 554, ..addr(Proto::Tcp) };
        let mut pd1 = vec![0u8; 20];
        {
            let mut t = TcpPacket::new_unchecked(&mut pd1[..]);
            t.set_src_port(40000);
            t.set_dst_port(554);
            t.set_header_len(20);
            t.set_syn(true);
            t.set_seq_number(smoltcp::wire::TcpSeqNumber(99));
            t.set_checksum(0xdead); // garbage the trigger must fix
        }
        let p3 = build(&a, &pd1, 1).unwrap();
        let ip = Ipv4Packet::new_checked(&p3[..]).unwrap();
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(t.verify_checksum(&IpAddress::Ipv4(a.src), &IpAddress::Ipv4(a.dst)));
        assert!(t.syn());
    }

    #[test]
    fn hostile_pd1_is_refused() {
        let a = addr(Proto::Udp);
        assert_eq!(build(&a, &[0; 4], 0), Err(BuildError::TooShort(4, Proto::Udp)));
        let other = Addressing { dst_port: 22, ..a };
        let pd1 = udp_pd1(&other, b"x");
        assert_eq!(build(&a, &pd1, 0), Err(BuildError::PortMismatch(40000, 22, 40000, 5060)));
        let mut pd1 = udp_pd1(&a, b"xy");
        pd1[5] = 200; // length field lies
        assert!(matches!(build(&a, &pd1, 0), Err(BuildError::BadUdpLength(..))));
        let pd1 = udp_pd1(&a, &[0; 1500]);
        assert!(matches!(build(&a, &pd1, 0), Err(BuildError::TooLong(_))));
        let t = Addressing { proto: Proto::Tcp, ..a };
        let mut pd1 = vec![0u8; 20];
        pd1[12] = 0x10; // data offset 4 bytes
        assert!(matches!(build(&t, &pd1, 0), Err(BuildError::BadTcpHeader(4))));
    }

    proptest::proptest! {
        #[test]
        fn build_never_panics(pd1 in proptest::collection::vec(proptest::num::u8::ANY, 0..1600), tcp: bool) {
            let a = addr(if tcp { Proto::Tcp } else { Proto::Udp });
            let _ = build(&a, &pd1, 0);
        }
    }
}
