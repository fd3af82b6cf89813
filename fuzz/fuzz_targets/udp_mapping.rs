//! The UDP mapping table (`server::udp_mapping::UdpMappings`) driven by an arbitrary sequence of
//! platform-client datagrams, datagrams arriving at `public_ip:port` from anyone (the camera's
//! NAT, other hosts, private sources, SIP answers or garbage), ICMP unreachables and clock
//! ticks.
//!
//! Oracles: no panic; at most `max_flows` flows, one per (exposure, client), each on its own
//! port; every OpenPort is matched by one ClosePort and open ports are exactly the flows' ports;
//! an answer is relayed only from the flow's learned, non-private mapping, and only to that
//! flow's client; datagrams to the camera go only to the learned mapping; indications carry at
//! most MAX_PD1 bytes.
#![no_main]

use arbitrary::Arbitrary;
use beckon::server::keepalive::KeepaliveKind;
use beckon::server::udp_mapping::{is_private, Action, FlowState, Target, UdpMappings};
use beckon::wire::control::MAX_PD1;
use libfuzzer_sys::fuzz_target;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

#[derive(Arbitrary, Debug, Clone, Copy)]
enum From {
    /// The NAT of the flow's camera (public), one of a few ports.
    Nat(u8),
    /// The camera's private address (an untranslated leak).
    Private,
    /// Someone else on the internet.
    Stranger(u8),
    Any(u32, u16),
    /// The flow's current mapping, if it has one.
    Mapping,
}

#[derive(Arbitrary, Debug)]
enum Payload {
    Bytes(Vec<u8>),
    /// A SIP response carrying the Call-ID of keepalive n, with extra header text.
    SipAnswer {
        n: u8,
        compact: bool,
        extra: String,
    },
    Empty,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Client { expose: u8, client: u8, sip: bool, payload: Payload, big: bool },
    Camera { port: PortPick, from: From, payload: Payload },
    Unreachable { port: PortPick, from: From },
    Tick(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum PortPick {
    /// The n-th live flow's port.
    Flow(u8),
    Any(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    keepalive_secs: Option<u8>,
    idle_secs: u8,
    max_flows: u8,
    seed: u64,
    ops: Vec<Op>,
}

fn target(sip: bool) -> Target {
    Target {
        site: "a".into(),
        camera: if sip { "sip" } else { "cam" }.into(),
        camera_ip: Ipv4Addr::new(198, 18, 1, if sip { 10 } else { 11 }),
        camera_port: 5060,
        keepalive: if sip { KeepaliveKind::SipOptions } else { KeepaliveKind::EmptyDatagram },
        // Half the targets know their NAT's address (as when the trigger is connected).
        nat_ip: if sip { Some(Ipv4Addr::new(203, 0, 113, 2)) } else { None },
    }
}

fn payload(p: &Payload) -> Vec<u8> {
    match p {
        Payload::Bytes(b) => b.clone(),
        Payload::SipAnswer { n, compact, extra } => {
            let id = if *compact { "i" } else { "Call-ID" };
            format!("SIP/2.0 200 OK\r\n{extra}\r\n{id}: beckon-ka-{n}@0.0.0.0\r\n\r\n").into_bytes()
        }
        Payload::Empty => Vec::new(),
    }
}

fuzz_target!(|inp: Input| {
    let keepalive = inp.keepalive_secs.map(|s| Duration::from_secs(s as u64 % 30 + 1));
    let idle = Duration::from_secs(inp.idle_secs as u64 % 120 + 1);
    let max_flows = inp.max_flows as usize % 8 + 1;
    let mut m = UdpMappings::new(keepalive, idle, max_flows, inp.seed);
    let mut now = Instant::now();
    let mut open: HashSet<u16> = HashSet::new();

    for op in inp.ops.iter().take(128) {
        let mut ports: Vec<u16> = m.flows().map(|f| f.server_port).collect();
        ports.sort();
        let pick = |p: PortPick| match p {
            PortPick::Flow(i) if !ports.is_empty() => ports[i as usize % ports.len()],
            PortPick::Flow(i) => 20000 + i as u16,
            PortPick::Any(p) => p,
        };
        let from_addr = |f: From, port: u16, m: &UdpMappings| -> SocketAddrV4 {
            match f {
                From::Nat(i) => SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 6000 + (i % 4) as u16),
                From::Private => SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 10), 5060),
                From::Stranger(i) => SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, i), 6000),
                From::Any(a, p) => SocketAddrV4::new(a.into(), p),
                From::Mapping => match m.flow(port).map(|f| f.state) {
                    Some(FlowState::Mapped { public, .. }) => public,
                    _ => SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 6000),
                },
            }
        };
        let (acts, camera_in) = match op {
            Op::Client { expose, client, sip, payload: p, big } => {
                let mut data = payload(p);
                if *big {
                    data.resize(MAX_PD1 - 8 + (data.len() % 3), 0x55); // around the limit
                }
                let client = SocketAddr::from(([127, 0, 0, 1], 1000 + (*client % 8) as u16));
                (m.client_datagram(now, (*expose % 3) as usize, client, &target(*sip), data), None)
            }
            Op::Camera { port, from, payload: p } => {
                let port = pick(*port);
                let from = from_addr(*from, port, &m);
                let before = m.flow(port).map(|f| (f.expose, f.client, f.state));
                let acts = m.camera_datagram(now, port, from, payload(p));
                (acts, Some((port, from, before)))
            }
            Op::Unreachable { port, from } => {
                let port = pick(*port);
                let to = from_addr(*from, port, &m);
                m.unreachable(now, port, to);
                (vec![], None)
            }
            Op::Tick(ms) => {
                now += Duration::from_millis(*ms as u64 * 4);
                (m.tick(now), None)
            }
        };

        for a in &acts {
            match a {
                Action::OpenPort(p) => {
                    assert!(open.insert(*p), "port {p} opened twice");
                    assert!(beckon::server::udp_mapping::PORT_RANGE.contains(p));
                }
                Action::ClosePort(p) => assert!(open.remove(p), "port {p} closed but not open"),
                Action::Indicate { server_port, payload, .. } => {
                    assert!(open.contains(server_port), "indication for a closed port");
                    assert!(payload.len() + 8 <= MAX_PD1);
                }
                Action::ToCamera { server_port, to, .. } => {
                    let f = m.flow(*server_port).expect("datagram for a flow");
                    let FlowState::Mapped { public, .. } = f.state else { panic!("datagram to the camera of an unmapped flow") };
                    assert_eq!(*to, public);
                    assert!(!is_private(*to.ip()));
                }
                Action::ToClient { expose, client, .. } => {
                    let (port, from, before) = camera_in.expect("only camera datagrams reach clients");
                    let f = m.flow(port).expect("answer for a live flow");
                    assert_eq!((f.expose, f.client), (*expose, *client), "answer to another client");
                    let (bexp, bcl, _) = before.expect("the flow existed");
                    assert_eq!((bexp, bcl), (*expose, *client));
                    assert!(
                        matches!(f.state, FlowState::Mapped { public, .. } if public == from),
                        "relayed a datagram from {from}, not the learned mapping"
                    );
                    assert!(!is_private(*from.ip()));
                }
            }
        }

        // Table-wide invariants.
        let flows: Vec<_> = m.flows().collect();
        assert!(flows.len() <= max_flows, "{} flows, max {max_flows}", flows.len());
        let live: HashSet<u16> = flows.iter().map(|f| f.server_port).collect();
        assert_eq!(live, open, "open ports and flows disagree");
        let mut by_client = HashMap::new();
        for f in &flows {
            assert!(by_client.insert((f.expose, f.client), f.server_port).is_none(), "two flows for one client");
            assert!(f.queued.len() <= beckon::server::udp_mapping::MAX_QUEUED);
            if let FlowState::Mapped { public, .. } = f.state {
                assert!(!is_private(*public.ip()));
            }
        }
    }
});
