//! Property tests for the UDP mapping table (`server::udp_mapping`), through its public API only:
//! random sequences of platform-client datagrams, datagrams arriving at `public_ip` from the
//! camera's NAT, strangers and private sources, ICMP unreachables and clock ticks. No root, no
//! network: the table is sans-IO.
//!
//! Payloads: ASCII, arbitrary bytes, text with multi-byte characters, and SIP responses (some
//! answering a keepalive) with a header line of arbitrary text.

use beckon::server::keepalive::KeepaliveKind;
use beckon::server::udp_mapping::{is_private, Action, FlowState, Target, UdpMappings, MAX_QUEUED, PORT_RANGE};
use beckon::wire::control::MAX_PD1;
use proptest::collection::vec;
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

const NAT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

fn target(kind: KeepaliveKind) -> Target {
    Target {
        site: "a".into(),
        camera: "cam".into(),
        camera_ip: Ipv4Addr::new(198, 18, 1, 10),
        camera_port: 5060,
        keepalive: kind,
        nat_ip: None,
    }
}

fn client(n: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10_000 + n))
}

#[derive(Debug, Clone, Copy)]
enum From {
    /// The flow's learned mapping (or the NAT's usual port while pending).
    Mapping,
    /// The camera's NAT, on some port.
    Nat(u16),
    /// The camera's own private address: an untranslated leak.
    Private,
    /// Another host on the internet.
    Stranger(u8),
}

#[derive(Debug, Clone)]
enum Op {
    Client {
        expose: usize,
        client: u16,
        payload: Vec<u8>,
    },
    /// A datagram to the port of the `pick`-th live flow (by port order).
    Camera {
        pick: usize,
        from: From,
        payload: Vec<u8>,
    },
    /// A datagram to any port (mostly none of ours).
    CameraAnyPort {
        port: u16,
        payload: Vec<u8>,
    },
    /// An ICMP unreachable about the `pick`-th flow's mapping.
    Unreachable {
        pick: usize,
    },
    /// Let time pass (ms), then run the timers.
    Tick(u64),
}

fn ascii() -> impl Strategy<Value = Vec<u8>> {
    vec(0x20u8..0x7f, 0..48)
}

/// Any bytes, or printable text with multi-byte characters (a GB28181 camera's Chinese names).
fn binary() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![vec(any::<u8>(), 0..48), "\\PC{0,16}".prop_map(String::into_bytes)]
}

/// A SIP response, possibly answering keepalive `n`.
fn sip_answer() -> impl Strategy<Value = Vec<u8>> {
    (1u64..6, any::<bool>(), any::<bool>(), "\\PC{0,12}").prop_map(|(n, ours, compact, line)| {
        let id = if ours { format!("beckon-ka-{n}@0.0.0.0") } else { format!("cam-{n}") };
        let h = if compact { "i" } else { "Call-ID" };
        format!("SIP/2.0 200 OK\r\n{line}\r\nCSeq: {n} OPTIONS\r\n{h}: {id}\r\n\r\n").into_bytes()
    })
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![3 => ascii(), 2 => sip_answer(), 1 => binary(), 1 => Just(Vec::new())]
}

fn from() -> impl Strategy<Value = From> {
    prop_oneof![
        6 => Just(From::Mapping),
        2 => (6000u16..6003).prop_map(From::Nat),
        1 => Just(From::Private),
        1 => any::<u8>().prop_map(From::Stranger),
    ]
}

fn op(clients: u16) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..2, 0..clients, payload())
            .prop_map(|(expose, client, payload)| Op::Client { expose, client, payload }),
        4 => (any::<usize>(), from(), payload())
            .prop_map(|(pick, from, payload)| Op::Camera { pick, from, payload }),
        1 => (any::<u16>(), ascii()).prop_map(|(port, payload)| Op::CameraAnyPort { port, payload }),
        1 => any::<usize>().prop_map(|pick| Op::Unreachable { pick }),
        4 => prop_oneof![0u64..1500, 1500u64..30_000].prop_map(Op::Tick),
    ]
}

/// The table plus everything the properties need to know about its history.
struct Harness {
    m: UdpMappings,
    kind: KeepaliveKind,
    max_flows: usize,
    now: Instant,
    /// Ports between OpenPort and ClosePort.
    open: HashSet<u16>,
    opens: HashMap<u16, u32>,
    closes: HashMap<u16, u32>,
}

impl Harness {
    fn new(kind: KeepaliveKind, keepalive: Option<u64>, idle: u64, max_flows: usize, seed: u64) -> Self {
        Harness {
            m: UdpMappings::new(keepalive.map(Duration::from_secs), Duration::from_secs(idle), max_flows, seed),
            kind,
            max_flows,
            now: Instant::now(),
            open: HashSet::new(),
            opens: HashMap::new(),
            closes: HashMap::new(),
        }
    }

    fn ports(&self) -> Vec<u16> {
        let mut p: Vec<u16> = self.m.flows().map(|f| f.server_port).collect();
        p.sort();
        p
    }

    fn mapping_of(&self, port: u16) -> Option<SocketAddrV4> {
        match self.m.flow(port)?.state {
            FlowState::Mapped { public, .. } => Some(public),
            FlowState::Pending { .. } => None,
        }
    }

    fn addr(&self, f: From, port: u16) -> SocketAddrV4 {
        match f {
            From::Mapping => self.mapping_of(port).unwrap_or(SocketAddrV4::new(NAT_IP, 6000)),
            From::Nat(p) => SocketAddrV4::new(NAT_IP, p),
            From::Private => SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 10), 5060),
            From::Stranger(i) => SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, i), 6000),
        }
    }

    /// Apply one op; check every action against the table; return the actions.
    fn apply(&mut self, op: &Op) -> Result<Vec<Action>, TestCaseError> {
        let now = self.now;
        let (acts, camera_in) = match op {
            Op::Client { expose, client: c, payload } => {
                (self.m.client_datagram(now, *expose, client(*c), &target(self.kind), payload.clone()), None)
            }
            Op::Camera { pick, from, payload } => {
                let ports = self.ports();
                let port = if ports.is_empty() { PORT_RANGE.start() + (*pick % 100) as u16 } else { ports[*pick % ports.len()] };
                let from = self.addr(*from, port);
                let before = self.m.flow(port).map(|f| (f.expose, f.client));
                let acts = self.m.camera_datagram(now, port, from, payload.clone());
                (acts, Some((port, from, before)))
            }
            Op::CameraAnyPort { port, payload } => {
                let from = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 53);
                let before = self.m.flow(*port).map(|f| (f.expose, f.client));
                let acts = self.m.camera_datagram(now, *port, from, payload.clone());
                (acts, Some((*port, from, before)))
            }
            Op::Unreachable { pick } => {
                let ports = self.ports();
                if let Some(&port) = ports.get(pick % ports.len().max(1)) {
                    let to = self.addr(From::Mapping, port);
                    self.m.unreachable(now, port, to);
                }
                (Vec::new(), None)
            }
            Op::Tick(ms) => {
                self.now += Duration::from_millis(*ms);
                (self.m.tick(self.now), None)
            }
        };
        for a in &acts {
            match a {
                Action::OpenPort(p) => {
                    prop_assert!(PORT_RANGE.contains(p), "port {} outside the range", p);
                    prop_assert!(self.open.insert(*p), "port {} opened while open", p);
                    *self.opens.entry(*p).or_default() += 1;
                }
                Action::ClosePort(p) => {
                    prop_assert!(self.open.remove(p), "port {} closed while not open", p);
                    *self.closes.entry(*p).or_default() += 1;
                }
                Action::Indicate { server_port, payload, site, camera_ip, camera_port } => {
                    prop_assert!(self.open.contains(server_port));
                    prop_assert!(payload.len() + 8 <= MAX_PD1);
                    let t = target(self.kind);
                    prop_assert_eq!((site, *camera_ip, *camera_port), (&t.site, t.camera_ip, t.camera_port));
                }
                Action::ToCamera { server_port, to, .. } => {
                    // Only ever to the flow's learned mapping, never to a private address.
                    prop_assert_eq!(self.mapping_of(*server_port), Some(*to));
                    prop_assert!(!is_private(*to.ip()));
                }
                Action::ToClient { expose, client: c, .. } => {
                    let Some((port, from, before)) = camera_in else {
                        return Err(TestCaseError::fail("ToClient without a camera datagram"));
                    };
                    // A client's answers come only from its own flow's learned mapping.
                    prop_assert_eq!(before, Some((*expose, *c)), "answer to another client");
                    let f = self.m.flow(port).expect("flow still there");
                    prop_assert_eq!((f.expose, f.client), (*expose, *c));
                    prop_assert_eq!(self.mapping_of(port), Some(from), "relayed from a stranger");
                    prop_assert!(!is_private(*from.ip()));
                }
            }
        }
        self.check_table()?;
        Ok(acts)
    }

    fn check_table(&self) -> Result<(), TestCaseError> {
        let flows: Vec<_> = self.m.flows().collect();
        prop_assert!(flows.len() <= self.max_flows, "{} flows > max {}", flows.len(), self.max_flows);
        let mut ports = HashSet::new();
        let mut clients = HashSet::new();
        for f in &flows {
            prop_assert!(ports.insert(f.server_port), "two flows share port {}", f.server_port);
            prop_assert!(clients.insert((f.expose, f.client)), "two flows for {:?}", (f.expose, f.client));
            prop_assert!(f.queued.len() <= MAX_QUEUED);
            if let FlowState::Mapped { public, .. } = f.state {
                prop_assert!(!is_private(*public.ip()));
            }
        }
        prop_assert_eq!(&ports, &self.open, "open ports and flows disagree");
        Ok(())
    }
}

fn kind() -> impl Strategy<Value = KeepaliveKind> {
    prop_oneof![Just(KeepaliveKind::EmptyDatagram), Just(KeepaliveKind::SipOptions)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// No two flows share a server port; one flow per (exposure, client); open ports are exactly
    /// the flows' ports; datagrams to the camera go only to a flow's learned, public mapping; a
    /// client's answers come only from its own flow's mapping (checked on every action in
    /// `Harness::apply`).
    #[test]
    fn table_invariants_hold(
        kind in kind(),
        keepalive in prop_oneof![Just(None), (1u64..30).prop_map(Some)],
        idle in 1u64..120,
        max_flows in 1usize..12,
        seed in any::<u64>(),
        ops in vec(op(6), 1..120),
    ) {
        let mut h = Harness::new(kind, keepalive, idle, max_flows, seed);
        for o in &ops {
            h.apply(o)?;
        }
    }

    /// More clients than flows: the table never grows past max_flows, and every refused client
    /// datagram is counted.
    #[test]
    fn flows_never_exceed_max_flows(
        max_flows in 1usize..8,
        clients in vec((0usize..3, 0u16..40), 1..200),
        seed in any::<u64>(),
    ) {
        let mut h = Harness::new(KeepaliveKind::EmptyDatagram, Some(20), 600, max_flows, seed);
        let mut distinct = HashSet::new();
        for (expose, c) in clients {
            let new = !h.m.flows().any(|f| f.expose == expose && f.client == client(c));
            let full = h.m.flows().count() >= max_flows;
            let dropped = h.m.counters.dropped_client_datagrams;
            let acts = h.apply(&Op::Client { expose, client: c, payload: b"x".to_vec() })?;
            if new && full {
                prop_assert!(acts.is_empty());
                prop_assert_eq!(h.m.counters.dropped_client_datagrams, dropped + 1);
            }
            if new && !full {
                distinct.insert((expose, c));
            }
        }
        prop_assert_eq!(h.m.flows().count(), distinct.len().min(max_flows));
    }

    /// Whatever happened, once clients fall silent for idle_timeout (timers running every
    /// second), every flow is gone, and every OpenPort was matched by exactly one ClosePort.
    #[test]
    fn idle_timeout_frees_every_flow_and_port(
        kind in kind(),
        keepalive in prop_oneof![Just(None), (1u64..30).prop_map(Some)],
        idle in 1u64..120,
        max_flows in 1usize..12,
        seed in any::<u64>(),
        ops in vec(op(6), 1..80),
    ) {
        let mut h = Harness::new(kind, keepalive, idle, max_flows, seed);
        for o in &ops {
            h.apply(o)?;
        }
        for _ in 0..=idle {
            h.apply(&Op::Tick(1000))?;
        }
        prop_assert_eq!(h.m.flows().count(), 0);
        prop_assert!(h.open.is_empty());
        prop_assert_eq!(&h.opens, &h.closes, "OpenPort and ClosePort do not pair up");
    }

    /// Keepalive answers are not passed to the client. SIP: a response carrying a keepalive's
    /// Call-ID that arrives while a keepalive is outstanding is swallowed; any other datagram
    /// from the mapping is relayed. Empty-datagram keepalives: a datagram that arrives while a
    /// keepalive is outstanding and no client datagram has been sent since is swallowed; any
    /// other is relayed.
    #[test]
    fn keepalive_answers_are_not_relayed(
        kind in kind(),
        keepalive in 1u64..30,
        seed in any::<u64>(),
        ops in vec(op(3), 1..120),
    ) {
        let mut h = Harness::new(kind, Some(keepalive), 600, 8, seed);
        for o in &ops {
            let (port, outstanding, client_since) = match o {
                Op::Camera { pick, .. } => {
                    let ports = h.ports();
                    if ports.is_empty() {
                        (None, false, false)
                    } else {
                        let p = ports[pick % ports.len()];
                        let f = h.m.flow(p).unwrap();
                        (Some(p), f.keepalive_sent_at.is_some(),
                         f.keepalive_sent_at.is_some_and(|s| f.last_client >= s))
                    }
                }
                _ => (None, false, false),
            };
            let was_mapped = port.and_then(|p| h.mapping_of(p));
            let acts = h.apply(o)?;
            let (Some(port), Op::Camera { from, payload, .. }) = (port, o) else { continue };
            let Some(mapping) = was_mapped else { continue };
            if h.addr(*from, port) != mapping {
                continue; // strangers are covered by table_invariants_hold
            }
            let relayed = acts.iter().any(|a| matches!(a, Action::ToClient { .. }));
            // A recognisable SIP keepalive answer is always swallowed (also a late one); an
            // undecidable datagram only while a keepalive is outstanding and no client request
            // went out since.
            let expect_swallowed = match kind {
                KeepaliveKind::SipOptions => is_keepalive_answer(payload),
                KeepaliveKind::EmptyDatagram => outstanding && !client_since,
            };
            prop_assert_eq!(relayed, !expect_swallowed,
                "kind {:?}, keepalive outstanding {}, payload {:?}", kind, outstanding,
                String::from_utf8_lossy(payload));
        }
    }
}

fn is_keepalive_answer(p: &[u8]) -> bool {
    let s = String::from_utf8_lossy(p);
    s.starts_with("SIP/2.0 ") && s.lines().any(|l| l.starts_with("Call-ID: beckon-ka-") || l.starts_with("i: beckon-ka-"))
}

/// Mapped flow for client 1 on exposure 0 at NAT_IP:6000; returns (harness, port).
fn mapped(kind: KeepaliveKind, keepalive: u64) -> (Harness, u16) {
    let mut h = Harness::new(kind, Some(keepalive), 600, 8, 1);
    h.apply(&Op::Client { expose: 0, client: 1, payload: b"REGISTER".to_vec() }).unwrap();
    let port = h.ports()[0];
    let acts = h.apply(&Op::Camera { pick: 0, from: From::Nat(6000), payload: b"SIP/2.0 200 OK\r\n\r\n".to_vec() }).unwrap();
    assert_eq!(acts.len(), 1);
    (h, port)
}

/// A SIP answer whose header line has a multi-byte character across byte 8 (e.g. a GB28181
/// camera's Chinese display name, `To: 张三 <sip:…>`) must not panic the server's UDP stack.
/// Found by `fuzz/fuzz_targets/udp_mapping.rs` (the check sliced `&str` at fixed byte offsets).
#[test]
fn regression_sip_answer_with_multibyte_header_does_not_panic() {
    let (mut h, _port) = mapped(KeepaliveKind::SipOptions, 2);
    let acts = h.apply(&Op::Tick(2000)).unwrap();
    assert!(matches!(&acts[..], [Action::ToCamera { .. }]), "{acts:?}");
    let answer = "SIP/2.0 200 OK\r\nTo: 张三 <sip:34020000001320000001@3402000000>\r\n\r\n";
    h.apply(&Op::Camera { pick: 0, from: From::Mapping, payload: answer.as_bytes().to_vec() }).unwrap();
}

/// Two keepalives outstanding (the first answer late): the answer to the second must not reach
/// the platform client either (docs/protocol.md: keepalive answers are never relayed). Found by
/// fuzzing; a SIP answer carrying a `beckon-ka-` Call-ID is now recognised with no keepalive pending.
#[test]
fn regression_late_second_sip_keepalive_answer_is_not_relayed() {
    let (mut h, _port) = mapped(KeepaliveKind::SipOptions, 2);
    let mut sent = Vec::new();
    for _ in 0..2 {
        for a in h.apply(&Op::Tick(2000)).unwrap() {
            if let Action::ToCamera { payload, .. } = a {
                sent.push(String::from_utf8(payload).unwrap());
            }
        }
    }
    assert_eq!(sent.len(), 2, "two keepalives outstanding");
    for req in &sent {
        let call_id = req.lines().find(|l| l.starts_with("Call-ID:")).unwrap();
        let answer = format!("SIP/2.0 200 OK\r\n{call_id}\r\n\r\n").into_bytes();
        let acts = h.apply(&Op::Camera { pick: 0, from: From::Mapping, payload: answer }).unwrap();
        assert!(acts.is_empty(), "keepalive answer relayed: {acts:?} for {call_id}");
    }
}
