//! Indication → trigger packet (patent S6/S7; docs/protocol.md "indication", "The trigger packet
//! P3"). A compromised or malicious server controls every field of an indication. Whatever it
//! sends, `inject::build_p3` either refuses or builds one well-formed IPv4 packet whose camera end
//! is a service in the trigger's own config (or its probe), whose server end is exactly the
//! indication's server_ip:server_port, that fits the TUN MTU and has valid checksums;
//! `check_server_ip` passes only the announced public_ip. `trigger_packet::build` is fuzzed on
//! its own with arbitrary addressing as well.
#![no_main]

use arbitrary::Arbitrary;
use base64::Engine as _;
use beckon::catalog::{Proto, Service};
use beckon::config::TriggerConfig;
use beckon::trigger::inject::{build_p3, check_server_ip};
use beckon::wire::control::{Command, Direction, ErrorCode, Indication, Probe, MAX_PD1};
use beckon::wire::trigger_packet::{self, Addressing, MAX_PACKET};
use libfuzzer_sys::fuzz_target;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket};
use std::net::Ipv4Addr;
use std::sync::OnceLock;

const TRIGGER_TOML: &str = r#"
server = "203.0.113.1:7443"
ca = "ca.pem"
site = "a"
token = "a-long-random-secret"

[[camera]]
name = "sip"
ip = "198.18.1.10"
device_type = "gb28181"

[[camera]]
name = "hik"
ip = "198.18.1.11"
device_type = "hikvision"
ports = ["udp/8000"]

[[camera]]
name = "odd"
ip = "10.0.0.7"
device_type = "generic"
ports = ["tcp/1", "udp/65535"]
"#;

const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
const PROBE: Probe = Probe { ip: Ipv4Addr::new(198, 18, 1, 2), tcp_port: 4000, udp_port: Some(4001) };

fn cfg() -> &'static TriggerConfig {
    static CFG: OnceLock<TriggerConfig> = OnceLock::new();
    CFG.get_or_init(|| {
        let c: TriggerConfig =
            beckon::config::parse(std::path::Path::new("fuzz-trigger.toml"), TRIGGER_TOML).expect("fixed trigger config parses");
        c.validate(std::path::Path::new("fuzz-trigger.toml")).expect("and is valid");
        c
    })
}

/// Addresses the fuzzer should hit often: configured cameras, the probe, public_ip, strangers.
const IPS: [Ipv4Addr; 7] = [
    Ipv4Addr::new(198, 18, 1, 10),
    Ipv4Addr::new(198, 18, 1, 11),
    Ipv4Addr::new(10, 0, 0, 7),
    Ipv4Addr::new(198, 18, 1, 2),
    PUBLIC_IP,
    Ipv4Addr::new(198, 18, 1, 12),
    Ipv4Addr::new(255, 255, 255, 255),
];
const PORTS: [u16; 9] = [5060, 554, 80, 8000, 1, 65535, 4000, 4001, 0];

#[derive(Arbitrary, Debug)]
enum Ip {
    Known(u8),
    Any(u32),
}
impl Ip {
    fn get(&self) -> Ipv4Addr {
        match self {
            Ip::Known(i) => IPS[*i as usize % IPS.len()],
            Ip::Any(a) => Ipv4Addr::from(*a),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Port {
    Known(u8),
    Any(u16),
}
impl Port {
    fn get(&self) -> u16 {
        match self {
            Port::Known(i) => PORTS[*i as usize % PORTS.len()],
            Port::Any(p) => *p,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Pd1 {
    /// Raw bytes, base64-encoded correctly.
    Bytes(Vec<u8>),
    /// Raw bytes, with the ports (and for UDP the length field) patched to what the indication
    /// says, so the fuzzer gets past the consistency checks.
    Consistent { header: Vec<u8>, tcp_hl: u8 },
    /// Whatever string the server puts into the JSON.
    Text(String),
}

#[derive(Arbitrary, Debug)]
struct Input {
    camera_ip: Ip,
    camera_port: Port,
    server_ip: Ip,
    server_port: Port,
    tcp: bool,
    to_server: bool,
    pd1: Pd1,
    probe: bool,
    announced: Option<Ip>,
    /// Second part: trigger_packet::build with arbitrary addressing.
    raw_src: u32,
    raw_dst: u32,
    raw_sport: u16,
    raw_dport: u16,
    raw_tcp: bool,
    raw_ident: u16,
    raw_pd1: Vec<u8>,
}

fuzz_target!(|inp: Input| {
    let cfg = cfg();
    let proto = if inp.tcp { Proto::Tcp } else { Proto::Udp };
    let direction = if inp.to_server { Direction::ToServer } else { Direction::ToCamera };
    let (camera_ip, camera_port) = (inp.camera_ip.get(), inp.camera_port.get());
    let (server_ip, server_port) = (inp.server_ip.get(), inp.server_port.get());
    let (sport, dport) = match direction {
        Direction::ToCamera => (server_port, camera_port),
        Direction::ToServer => (camera_port, server_port),
    };
    let pd1 = match &inp.pd1 {
        Pd1::Bytes(b) => base64::engine::general_purpose::STANDARD.encode(b),
        Pd1::Consistent { header, tcp_hl } => {
            let min = if inp.tcp { 20 } else { 8 };
            let mut b = header.clone();
            if b.len() < min {
                b.resize(min, 0);
            }
            b[0..2].copy_from_slice(&sport.to_be_bytes());
            b[2..4].copy_from_slice(&dport.to_be_bytes());
            if inp.tcp {
                b[12] = (tcp_hl & 0xf0) | (b[12] & 0x0f);
            } else {
                let len = b.len() as u16;
                b[4..6].copy_from_slice(&len.to_be_bytes());
            }
            base64::engine::general_purpose::STANDARD.encode(&b)
        }
        Pd1::Text(s) => s.clone(),
    };
    let ind = Indication { id: 1, camera_ip, camera_port, server_ip, server_port, proto, command: Command::Inject, pd1, direction };
    let probe = inp.probe.then_some(PROBE);

    // The server-end check of `Injector::inject`.
    let announced = inp.announced.as_ref().map(Ip::get);
    match check_server_ip(announced, &ind) {
        Ok(()) => assert_eq!(announced, Some(ind.server_ip)),
        Err((code, _)) => {
            assert_eq!(code, ErrorCode::NotAllowed);
            assert_ne!(announced, Some(ind.server_ip));
        }
    }

    let service = Service { proto, port: camera_port };
    let is_probe = probe.is_some_and(|p| {
        p.ip == camera_ip
            && match proto {
                Proto::Tcp => p.tcp_port == camera_port,
                Proto::Udp => p.udp_port == Some(camera_port),
            }
    });
    let allowed = cfg.allows(camera_ip, service) || is_probe;
    match build_p3(cfg, probe, &ind) {
        Ok(p3) => {
            assert!(allowed, "built a packet for {camera_ip}:{camera_port} ({service}) outside the allowlist");
            let (src, dst) = match direction {
                Direction::ToCamera => ((server_ip, server_port), (camera_ip, camera_port)),
                Direction::ToServer => ((camera_ip, camera_port), (server_ip, server_port)),
            };
            check_packet(&p3, proto, src, dst);
            // PD1 is carried unchanged except for the transport checksum.
            let raw = base64::engine::general_purpose::STANDARD.decode(&ind.pd1).unwrap();
            assert!(raw.len() <= MAX_PD1);
            let cs = if inp.tcp { 16 } else { 6 };
            assert_eq!(p3[20..20 + cs], raw[..cs]);
            assert_eq!(p3[20 + cs + 2..], raw[cs + 2..]);
        }
        Err((code, _)) => {
            if !allowed {
                assert_eq!(code, ErrorCode::NotAllowed, "allowlist is checked first");
            } else {
                assert_eq!(code, ErrorCode::InjectFailed);
            }
        }
    }

    // The packet builder on its own.
    let a = Addressing {
        proto: if inp.raw_tcp { Proto::Tcp } else { Proto::Udp },
        src: Ipv4Addr::from(inp.raw_src),
        src_port: inp.raw_sport,
        dst: Ipv4Addr::from(inp.raw_dst),
        dst_port: inp.raw_dport,
    };
    if let Ok(p) = trigger_packet::build(&a, &inp.raw_pd1, inp.raw_ident) {
        check_packet(&p, a.proto, (a.src, a.src_port), (a.dst, a.dst_port));
        assert_eq!(Ipv4Packet::new_checked(&p[..]).unwrap().ident(), inp.raw_ident);
    }
});

/// One IPv4 packet src → dst of `proto`, no options, no fragments, DF, TTL 64, ≤ MTU, both
/// checksums valid.
fn check_packet(p: &[u8], proto: Proto, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) {
    assert!(p.len() <= MAX_PACKET, "P3 of {} bytes", p.len());
    let ip = Ipv4Packet::new_checked(p).expect("P3 parses as IPv4");
    assert_eq!(ip.version(), 4);
    assert_eq!(ip.header_len(), 20);
    assert_eq!(ip.total_len() as usize, p.len());
    assert!(ip.verify_checksum());
    assert!(ip.dont_frag() && !ip.more_frags() && ip.frag_offset() == 0);
    assert_eq!(ip.hop_limit(), trigger_packet::TTL);
    assert_eq!(Ipv4Addr::from(ip.src_addr()), src.0);
    assert_eq!(Ipv4Addr::from(ip.dst_addr()), dst.0);
    let (s, d) = (IpAddress::Ipv4(ip.src_addr()), IpAddress::Ipv4(ip.dst_addr()));
    match proto {
        Proto::Udp => {
            assert_eq!(ip.next_header(), IpProtocol::Udp);
            let u = UdpPacket::new_checked(ip.payload()).expect("UDP parses");
            assert_eq!(u.len() as usize, ip.payload().len());
            assert_eq!((u.src_port(), u.dst_port()), (src.1, dst.1));
            assert!(u.verify_checksum(&s, &d), "UDP checksum");
        }
        Proto::Tcp => {
            assert_eq!(ip.next_header(), IpProtocol::Tcp);
            let t = TcpPacket::new_checked(ip.payload()).expect("TCP parses");
            assert!((20..=60).contains(&(t.header_len() as usize)));
            assert_eq!((t.src_port(), t.dst_port()), (src.1, dst.1));
            assert!(t.verify_checksum(&s, &d), "TCP checksum");
        }
    }
}
