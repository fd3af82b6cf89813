//! The UDP mapping table and the signalling-form traversal (patent S6–S10) as a sans-IO state
//! machine: inputs are datagrams, ICMP errors and timer ticks with an explicit `now`; outputs are
//! [`Action`]s the driver carries out (indications to a trigger, datagrams to the camera through
//! the userspace stack, datagrams back to the platform client).
//!
//! One *flow* per (exposure, platform client): each gets its own server port, hence its own NAT
//! mapping, so two clients of one exposure never see each other's answers.

use super::keepalive::KeepaliveKind;
use crate::wire::control::MAX_PD1;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// Server ports handed to flows; outside the host's usual ephemeral range is not required
/// because `public_ip` belongs to beckon alone.
pub const PORT_RANGE: std::ops::RangeInclusive<u16> = 20000..=60999;
/// Datagrams held per flow while its mapping is being set up.
pub const MAX_QUEUED: usize = 16;
/// Keepalives sent without any answer before a mapping is declared lost.
pub const MAX_UNANSWERED: u32 = 2;
/// A client datagram to a mapping that has not answered anything for this long re-triggers.
/// (At most; with keepalives on it is at most two keepalive intervals.)
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// While pending, a client datagram re-sends the indication at most this often.
pub const REINDICATE_AFTER: Duration = Duration::from_secs(1);

/// How long after its camera last spoke a mapping's keepalive is due: between 3/4 of the
/// interval and the whole of it, spread by the flow's server port. Why: flows whose cameras
/// spoke at the same moment (a burst of clients, a server restart) would otherwise stay in step
/// for good, each keepalive round a burst of one keepalive per flow. 10,000 flows answered
/// within 2.5 s gave bursts of ≈ 1,000 keepalives per 250 ms tick in the bench, and the answers
/// overflowed the server's TUN queue (4,000 dropped in 30 s); flows whose answers were lost
/// twice were dropped as dead. Spread, such a round covers a quarter of the interval, and every
/// keepalive still goes out within the interval (never later).
pub fn keepalive_due(every: Duration, server_port: u16) -> Duration {
    // Multiplicative hashing of the 16-bit port (Knuth): neighbouring ports land far apart.
    let spread = (u32::from(server_port).wrapping_mul(40_503) & 0xffff) as f64 / 65_536.0;
    every.mul_f64(1.0 - spread / 4.0)
}

/// What a flow targets, resolved by the driver from config and registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub site: String,
    pub camera: String,
    pub camera_ip: Ipv4Addr,
    pub camera_port: u16,
    pub keepalive: KeepaliveKind,
    /// The site NAT's public address as the trigger's control link shows it: a first answer
    /// from any other address is not the camera's (someone guessed the server port).
    pub nat_ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// Indication sent, no answer from the camera yet.
    Pending { last_indication: Instant },
    /// The camera answered from this public endpoint (its NAT mapping).
    Mapped { public: SocketAddrV4, since: Instant },
}

#[derive(Debug, Clone)]
pub struct Flow {
    pub expose: usize,
    pub client: SocketAddr,
    pub server_port: u16,
    pub target: Target,
    pub state: FlowState,
    pub created: Instant,
    pub last_client: Instant,
    pub last_from_camera: Option<Instant>,
    /// First datagram sent to the camera since it last said anything.
    pub awaiting_reply_since: Option<Instant>,
    pub keepalive_sent_at: Option<Instant>,
    pub unanswered_keepalives: u32,
    pub queued: VecDeque<Vec<u8>>,
    pub stats: FlowStats,
}

#[derive(Debug, Clone, Default)]
pub struct FlowStats {
    pub indications: u64,
    pub keepalives_sent: u64,
    pub keepalives_answered: u64,
    pub datagrams_to_camera: u64,
    pub datagrams_from_camera: u64,
    pub bytes_to_camera: u64,
    pub bytes_from_camera: u64,
    pub last_keepalive_answer: Option<Instant>,
    pub mapped_at: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask the site's trigger to inject `payload` as a UDP datagram server_port → camera.
    Indicate {
        site: String,
        camera_ip: Ipv4Addr,
        camera_port: u16,
        server_port: u16,
        payload: Vec<u8>,
    },
    /// Send through the userspace stack from `server_port` to the learned mapping.
    ToCamera {
        server_port: u16,
        to: SocketAddrV4,
        payload: Vec<u8>,
    },
    /// Relay to the platform client through the exposure's listener.
    ToClient {
        expose: usize,
        client: SocketAddr,
        payload: Vec<u8>,
    },
    /// Bind / release a server port in the userspace stack.
    OpenPort(u16),
    ClosePort(u16),
}

/// Events worth a log line and a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct TableCounters {
    pub flows_created: u64,
    pub mappings_learned: u64,
    pub mappings_dropped: u64,
    pub retriggers: u64,
    pub unsolicited_datagrams: u64,
    pub dropped_client_datagrams: u64,
}

pub struct UdpMappings {
    flows: HashMap<u16, Flow>,
    by_client: HashMap<(usize, SocketAddr), u16>,
    keepalive: Option<Duration>,
    idle_timeout: Duration,
    max_flows: usize,
    rng: rand::rngs::StdRng,
    pub counters: TableCounters,
}

impl UdpMappings {
    pub fn new(keepalive: Option<Duration>, idle_timeout: Duration, max_flows: usize, seed: u64) -> Self {
        UdpMappings {
            flows: HashMap::new(),
            by_client: HashMap::new(),
            keepalive,
            idle_timeout,
            max_flows,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            counters: TableCounters::default(),
        }
    }

    pub fn flows(&self) -> impl Iterator<Item = &Flow> {
        self.flows.values()
    }

    pub fn flow(&self, server_port: u16) -> Option<&Flow> {
        self.flows.get(&server_port)
    }

    fn fresh_port(&mut self) -> Option<u16> {
        for _ in 0..64 {
            let p = self.rng.random_range(PORT_RANGE);
            if !self.flows.contains_key(&p) {
                return Some(p);
            }
        }
        None
    }

    fn indicate(flow: &mut Flow, now: Instant, payload: Vec<u8>) -> Action {
        flow.stats.indications += 1;
        flow.state = FlowState::Pending { last_indication: now };
        Action::Indicate {
            site: flow.target.site.clone(),
            camera_ip: flow.target.camera_ip,
            camera_port: flow.target.camera_port,
            server_port: flow.server_port,
            payload,
        }
    }

    /// A platform client sent a datagram to exposure `expose`.
    pub fn client_datagram(&mut self, now: Instant, expose: usize, client: SocketAddr, target: &Target, payload: Vec<u8>) -> Vec<Action> {
        let mut out = Vec::new();
        if payload.len() + 8 > MAX_PD1 {
            // Would not fit one trigger packet / one MTU to the camera either.
            self.counters.dropped_client_datagrams += 1;
            return out;
        }
        let port = match self.by_client.get(&(expose, client)) {
            Some(p) => *p,
            None => {
                if self.flows.len() >= self.max_flows {
                    self.counters.dropped_client_datagrams += 1;
                    return out;
                }
                let Some(port) = self.fresh_port() else {
                    self.counters.dropped_client_datagrams += 1;
                    return out;
                };
                let mut flow = Flow {
                    expose,
                    client,
                    server_port: port,
                    target: target.clone(),
                    state: FlowState::Pending { last_indication: now },
                    created: now,
                    last_client: now,
                    last_from_camera: None,
                    awaiting_reply_since: None,
                    keepalive_sent_at: None,
                    unanswered_keepalives: 0,
                    queued: VecDeque::new(),
                    stats: FlowStats::default(),
                };
                self.counters.flows_created += 1;
                out.push(Action::OpenPort(port));
                out.push(Self::indicate(&mut flow, now, payload));
                self.flows.insert(port, flow);
                self.by_client.insert((expose, client), port);
                return out;
            }
        };
        let flow = self.flows.get_mut(&port).expect("index and table agree");
        flow.last_client = now;
        match flow.state {
            FlowState::Pending { last_indication } => {
                if now.duration_since(last_indication) >= REINDICATE_AFTER {
                    // The first trigger packet (or the answer) was lost; the client retried.
                    out.push(Self::indicate(flow, now, payload));
                } else if flow.queued.len() < MAX_QUEUED {
                    flow.queued.push_back(payload);
                } else {
                    self.counters.dropped_client_datagrams += 1;
                }
            }
            FlowState::Mapped { public, .. } => {
                let reply_timeout = self.keepalive.map_or(REPLY_TIMEOUT, |k| (k * 2).min(REPLY_TIMEOUT));
                let stale = flow.awaiting_reply_since.is_some_and(|t| now.duration_since(t) >= reply_timeout);
                if stale {
                    // Nothing came back for a while: the NAT probably forgot the mapping.
                    self.counters.retriggers += 1;
                    flow.awaiting_reply_since = None;
                    out.push(Self::indicate(flow, now, payload));
                } else {
                    flow.awaiting_reply_since.get_or_insert(now);
                    flow.stats.datagrams_to_camera += 1;
                    flow.stats.bytes_to_camera += payload.len() as u64;
                    out.push(Action::ToCamera { server_port: port, to: public, payload });
                }
            }
        }
        out
    }

    /// A datagram arrived at `public_ip:server_port` from `from`.
    pub fn camera_datagram(&mut self, now: Instant, server_port: u16, from: SocketAddrV4, payload: Vec<u8>) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(flow) = self.flows.get_mut(&server_port) else {
            self.counters.unsolicited_datagrams += 1;
            return out;
        };
        match flow.state {
            FlowState::Pending { .. } => {
                // An untranslated answer leaked by the NAT is not a mapping, nor is an answer
                // from anywhere but the site's NAT.
                if is_private(*from.ip()) || flow.target.nat_ip.is_some_and(|ip| ip != *from.ip()) {
                    self.counters.unsolicited_datagrams += 1;
                    return out;
                }
                flow.state = FlowState::Mapped { public: from, since: now };
                flow.stats.mapped_at = Some(now);
                self.counters.mappings_learned += 1;
                tracing::info!(camera = %format!("{}/{}", flow.target.site, flow.target.camera), server_port,
                    public = %from, "learned NAT mapping");
                for q in flow.queued.drain(..) {
                    flow.stats.datagrams_to_camera += 1;
                    flow.stats.bytes_to_camera += q.len() as u64;
                    out.push(Action::ToCamera { server_port, to: from, payload: q });
                }
            }
            FlowState::Mapped { public, .. } => {
                if from != public {
                    self.counters.unsolicited_datagrams += 1;
                    return out;
                }
            }
        }
        flow.last_from_camera = Some(now);
        flow.awaiting_reply_since = None;
        flow.stats.datagrams_from_camera += 1;
        flow.stats.bytes_from_camera += payload.len() as u64;
        let keepalive_answer = match flow.target.keepalive.is_answer(&payload) {
            // Recognisable answers are always ours, also a late one to an earlier keepalive.
            Some(certain) => certain,
            // Undecidable protocol: it answers the keepalive if no client request went out since.
            None => flow.keepalive_sent_at.is_some_and(|sent| flow.last_client < sent),
        };
        // Anything from the camera proves the mapping alive.
        flow.unanswered_keepalives = 0;
        if keepalive_answer {
            flow.keepalive_sent_at = None;
            flow.stats.keepalives_answered += 1;
            flow.stats.last_keepalive_answer = Some(now);
        } else {
            out.push(Action::ToClient { expose: flow.expose, client: flow.client, payload });
        }
        out
    }

    /// An ICMP port/host unreachable came back for a datagram from `server_port` to `to`:
    /// the NAT no longer has the mapping. Re-trigger on the next client datagram at once.
    pub fn unreachable(&mut self, now: Instant, server_port: u16, to: SocketAddrV4) {
        if let Some(flow) = self.flows.get_mut(&server_port) {
            if let FlowState::Mapped { public, .. } = flow.state {
                if public == to {
                    tracing::info!(server_port, public = %to, "NAT mapping gone (ICMP unreachable); next datagram re-triggers");
                    // Backdate so the next client datagram re-indicates immediately.
                    flow.awaiting_reply_since = Some(now.checked_sub(REPLY_TIMEOUT).unwrap_or(now));
                }
            }
        }
    }

    /// Timers: keepalives, dead mappings, idle flows. Call at least every second.
    /// A mapping's keepalive is due [`keepalive_due`] after its camera last spoke; a second one
    /// half an interval after an unanswered one; the mapping is dropped two intervals after.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let mut remove = Vec::new();
        for (port, flow) in self.flows.iter_mut() {
            if now.duration_since(flow.last_client) >= self.idle_timeout {
                remove.push(*port);
                continue;
            }
            let FlowState::Mapped { public, since } = flow.state else {
                continue;
            };
            let Some(every) = self.keepalive else {
                continue;
            };
            let heard = flow.last_from_camera.unwrap_or(since).max(since);
            let quiet = now.duration_since(heard);
            if quiet < keepalive_due(every, *port) {
                continue; // the camera spoke recently: its NAT refreshed the mapping
            }
            // A mapping that stopped answering is noticed within two keepalive intervals of its
            // last sign of life: a keepalive after one interval, a second one half an interval
            // later, and the verdict at two intervals.
            if quiet >= every * 2 && flow.unanswered_keepalives >= MAX_UNANSWERED {
                tracing::warn!(camera = %format!("{}/{}", flow.target.site, flow.target.camera), server_port = *port,
                    public = %public, "mapping stopped answering keepalives; dropped (next datagram re-triggers)");
                self.counters.mappings_dropped += 1;
                remove.push(*port);
                continue;
            }
            if flow.keepalive_sent_at.is_some_and(|ka| now.duration_since(ka) < every / 2) || flow.unanswered_keepalives >= MAX_UNANSWERED {
                continue;
            }
            flow.unanswered_keepalives += 1;
            flow.keepalive_sent_at = Some(now);
            flow.stats.keepalives_sent += 1;
            let server = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, *port);
            let payload = flow.target.keepalive.payload(
                flow.stats.keepalives_sent,
                server,
                SocketAddrV4::new(flow.target.camera_ip, flow.target.camera_port),
            );
            out.push(Action::ToCamera { server_port: *port, to: public, payload });
        }
        for port in remove {
            if let Some(f) = self.flows.remove(&port) {
                self.by_client.remove(&(f.expose, f.client));
                out.push(Action::ClosePort(port));
            }
        }
        out
    }
}

/// Addresses that are never a NAT's public side (RFC 1918, CGN, benchmarking 198.18/15,
/// loopback, link-local).
pub fn is_private(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(kind: KeepaliveKind) -> Target {
        Target {
            site: "a".into(),
            camera: "cam1".into(),
            camera_ip: "198.18.1.10".parse().unwrap(),
            camera_port: 5060,
            keepalive: kind,
            nat_ip: None,
        }
    }
    const NAT: &str = "203.0.113.2:5060";
    fn client(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], n))
    }
    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    /// Flow set up: client 1 on exposure 0, mapped at NAT. Returns (table, server port).
    fn mapped(t0: Instant, keepalive: Option<u64>, kind: KeepaliveKind) -> (UdpMappings, u16) {
        let mut m = UdpMappings::new(keepalive.map(Duration::from_secs), Duration::from_secs(300), 100, 1);
        let a = m.client_datagram(t0, 0, client(1), &target(kind), b"hello".to_vec());
        let port = match &a[..] {
            [Action::OpenPort(p), Action::Indicate { server_port, payload, .. }] => {
                assert_eq!(p, server_port);
                assert_eq!(payload, b"hello");
                *p
            }
            other => panic!("{other:?}"),
        };
        let a = m.camera_datagram(t0, port, NAT.parse().unwrap(), b"answer".to_vec());
        assert_eq!(a, vec![Action::ToClient { expose: 0, client: client(1), payload: b"answer".to_vec() }]);
        (m, port)
    }

    #[test]
    fn later_datagrams_go_straight_to_the_mapping() {
        let t0 = Instant::now();
        let (mut m, port) = mapped(t0, None, KeepaliveKind::EmptyDatagram);
        for i in 0..10 {
            let a = m.client_datagram(t0, 0, client(1), &target(KeepaliveKind::EmptyDatagram), vec![i]);
            assert_eq!(a, vec![Action::ToCamera { server_port: port, to: NAT.parse().unwrap(), payload: vec![i] }]);
            m.camera_datagram(t0, port, NAT.parse().unwrap(), vec![i]);
        }
        assert_eq!(m.flow(port).unwrap().stats.indications, 1);
        assert_eq!(m.counters.mappings_learned, 1);
    }

    #[test]
    fn only_the_sites_nat_can_answer_a_pending_flow() {
        let t0 = Instant::now();
        let mut m = UdpMappings::new(None, Duration::from_secs(300), 100, 1);
        let tg = Target { nat_ip: Some("203.0.113.2".parse().unwrap()), ..target(KeepaliveKind::EmptyDatagram) };
        let a = m.client_datagram(t0, 0, client(1), &tg, b"x".to_vec());
        let Action::OpenPort(p) = a[0] else { panic!() };
        assert!(m.camera_datagram(t0, p, "203.0.113.66:5060".parse().unwrap(), b"hijack".to_vec()).is_empty());
        assert_eq!(m.camera_datagram(t0, p, NAT.parse().unwrap(), b"ok".to_vec()).len(), 1);
    }

    #[test]
    fn two_clients_get_separate_ports_and_answers() {
        let t0 = Instant::now();
        let (mut m, p1) = mapped(t0, None, KeepaliveKind::EmptyDatagram);
        let a = m.client_datagram(t0, 0, client(2), &target(KeepaliveKind::EmptyDatagram), b"x".to_vec());
        let Action::OpenPort(p2) = a[0] else { panic!() };
        assert_ne!(p1, p2);
        let a = m.camera_datagram(t0, p2, "203.0.113.2:6000".parse().unwrap(), b"for2".to_vec());
        assert_eq!(a, vec![Action::ToClient { expose: 0, client: client(2), payload: b"for2".to_vec() }]);
    }

    #[test]
    fn strangers_and_private_sources_are_not_mappings() {
        let t0 = Instant::now();
        let mut m = UdpMappings::new(None, Duration::from_secs(300), 100, 1);
        let a = m.client_datagram(t0, 0, client(1), &target(KeepaliveKind::EmptyDatagram), b"x".to_vec());
        let Action::OpenPort(p) = a[0] else { panic!() };
        assert!(m.camera_datagram(t0, p, "198.18.1.10:5060".parse().unwrap(), b"leak".to_vec()).is_empty());
        assert!(m.camera_datagram(t0, p.wrapping_add(1), NAT.parse().unwrap(), b"x".to_vec()).is_empty());
        m.camera_datagram(t0, p, NAT.parse().unwrap(), b"ok".to_vec());
        assert!(m.camera_datagram(t0, p, "203.0.113.9:5060".parse().unwrap(), b"spoof".to_vec()).is_empty());
        assert_eq!(m.counters.unsolicited_datagrams, 3);
    }

    #[test]
    fn pending_datagrams_queue_then_flush_and_reindicate_after_a_second() {
        let t0 = Instant::now();
        let tg = target(KeepaliveKind::EmptyDatagram);
        let mut m = UdpMappings::new(None, Duration::from_secs(300), 100, 1);
        let a = m.client_datagram(t0, 0, client(1), &tg, b"1".to_vec());
        let Action::OpenPort(p) = a[0] else { panic!() };
        assert!(m.client_datagram(t0, 0, client(1), &tg, b"2".to_vec()).is_empty());
        let a = m.client_datagram(secs(t0, 2), 0, client(1), &tg, b"3".to_vec());
        assert!(matches!(&a[..], [Action::Indicate { payload, .. }] if payload == b"3"));
        let a = m.camera_datagram(secs(t0, 2), p, NAT.parse().unwrap(), b"r".to_vec());
        assert_eq!(a.len(), 2, "queued datagram then the answer: {a:?}");
    }

    #[test]
    fn keepalives_hold_answered_and_never_reach_the_client() {
        let t0 = Instant::now();
        let (mut m, port) = mapped(t0, Some(2), KeepaliveKind::EmptyDatagram);
        let mut sent = 0;
        for s in 1..=20 {
            for a in m.tick(secs(t0, s)) {
                if let Action::ToCamera { payload, .. } = a {
                    assert!(payload.is_empty());
                    sent += 1;
                    // The echo-like camera answers; it must be swallowed.
                    assert!(m.camera_datagram(secs(t0, s), port, NAT.parse().unwrap(), b"cam: ".to_vec()).is_empty());
                }
            }
        }
        assert_eq!(sent, 10);
        let f = m.flow(port).unwrap();
        assert_eq!(f.stats.keepalives_answered, 10);
        assert_eq!(f.stats.indications, 1);
    }

    #[test]
    fn silent_mapping_is_dropped_after_unanswered_keepalives() {
        let t0 = Instant::now();
        let (mut m, port) = mapped(t0, Some(2), KeepaliveKind::SipOptions);
        let mut closed = false;
        for s in 1..=12 {
            for a in m.tick(secs(t0, s)) {
                if a == Action::ClosePort(port) {
                    closed = true;
                }
                if let Action::ToCamera { payload, .. } = a {
                    assert!(payload.starts_with(b"OPTIONS "));
                }
            }
        }
        assert!(closed);
        assert_eq!(m.counters.mappings_dropped, 1);
        // The next datagram creates a new flow and re-triggers.
        let a = m.client_datagram(secs(t0, 13), 0, client(1), &target(KeepaliveKind::SipOptions), b"again".to_vec());
        assert!(matches!(&a[..], [Action::OpenPort(_), Action::Indicate { .. }]));
    }

    #[test]
    fn silence_is_noticed_within_two_keepalive_intervals() {
        let t0 = Instant::now();
        let (mut m, port) = mapped(t0, Some(2), KeepaliveKind::EmptyDatagram);
        let mut sent = Vec::new();
        let mut dropped_at = None;
        for i in 1..=40 {
            let now = t0 + Duration::from_millis(250 * i);
            for a in m.tick(now) {
                match a {
                    Action::ToCamera { .. } => sent.push(now.duration_since(t0).as_millis()),
                    Action::ClosePort(p) if p == port => dropped_at = dropped_at.or(Some(now.duration_since(t0))),
                    _ => {}
                }
            }
        }
        // Due within the interval (3/4 to all of it, by port), on the next 250 ms tick.
        let due = keepalive_due(Duration::from_secs(2), port).as_millis();
        let first = due.div_ceil(250) * 250;
        assert!((1500..=2000).contains(&first), "{first}");
        assert_eq!(sent, vec![first, first + 1000], "a keepalive within one interval, a retry half an interval later");
        assert_eq!(dropped_at, Some(Duration::from_secs(4)), "dropped two intervals after the last answer");
    }

    /// Flows whose cameras all answered at the same moment do not send their keepalives in one
    /// burst: they spread over a quarter of the interval, and none is later than the interval.
    #[test]
    fn keepalives_of_flows_that_spoke_together_are_spread() {
        let t0 = Instant::now();
        let every = Duration::from_secs(20);
        let mut m = UdpMappings::new(Some(every), Duration::from_secs(300), 2000, 7);
        let tg = target(KeepaliveKind::EmptyDatagram);
        for i in 0..1000u16 {
            let c: SocketAddr = format!("127.0.0.1:{}", 30000 + i).parse().unwrap();
            let a = m.client_datagram(t0, 0, c, &tg, b"x".to_vec());
            let Action::OpenPort(p) = a[0] else { panic!("{a:?}") };
            assert_eq!(m.camera_datagram(t0, p, NAT.parse().unwrap(), b"ok".to_vec()).len(), 1);
        }
        let mut per_tick = Vec::new();
        for i in 1..=80 {
            let sent = m.tick(t0 + Duration::from_millis(250 * i)).iter().filter(|a| matches!(a, Action::ToCamera { .. })).count();
            per_tick.push(sent);
        }
        assert_eq!(per_tick.iter().sum::<usize>(), 1000, "one keepalive per flow within the interval");
        assert!(per_tick[..59].iter().all(|&n| n == 0), "none before 3/4 of the interval: {per_tick:?}");
        let busiest = *per_tick.iter().max().unwrap();
        assert!(busiest <= 100, "1000 keepalives over 20 ticks: the busiest tick sent {busiest}");
    }

    #[test]
    fn sip_answers_are_swallowed_but_camera_messages_relayed() {
        let t0 = Instant::now();
        let (mut m, port) = mapped(t0, Some(2), KeepaliveKind::SipOptions);
        let a = m.tick(secs(t0, 2));
        let Some(Action::ToCamera { payload, .. }) = a.first() else { panic!("{a:?}") };
        let req = String::from_utf8(payload.clone()).unwrap();
        let call_id = req.lines().find(|l| l.starts_with("Call-ID")).unwrap();
        let answer = format!("SIP/2.0 200 OK\r\n{call_id}\r\n\r\n").into_bytes();
        assert!(m.camera_datagram(secs(t0, 2), port, NAT.parse().unwrap(), answer).is_empty());
        let msg = b"MESSAGE sip:platform SIP/2.0\r\nCall-ID: cam-1\r\n\r\n".to_vec();
        assert_eq!(m.camera_datagram(secs(t0, 3), port, NAT.parse().unwrap(), msg.clone()).len(), 1);
    }

    #[test]
    fn icmp_unreachable_or_silence_retriggers() {
        let t0 = Instant::now();
        let tg = target(KeepaliveKind::EmptyDatagram);
        let (mut m, port) = mapped(t0, None, KeepaliveKind::EmptyDatagram);
        m.unreachable(secs(t0, 30), port, NAT.parse().unwrap());
        let a = m.client_datagram(secs(t0, 30), 0, client(1), &tg, b"q".to_vec());
        assert!(matches!(&a[..], [Action::Indicate { .. }]), "{a:?}");
        m.camera_datagram(secs(t0, 30), port, "203.0.113.2:7000".parse().unwrap(), b"r".to_vec());
        // No answer to a datagram for REPLY_TIMEOUT: the next one re-triggers.
        assert_eq!(m.client_datagram(secs(t0, 40), 0, client(1), &tg, b"1".to_vec()).len(), 1);
        let a = m.client_datagram(secs(t0, 46), 0, client(1), &tg, b"2".to_vec());
        assert!(matches!(&a[..], [Action::Indicate { .. }]), "{a:?}");
        assert_eq!(m.counters.retriggers, 2);
        assert_eq!(m.flow(port).unwrap().stats.indications, 3);
    }

    #[test]
    fn idle_flows_are_freed_and_table_is_bounded() {
        let t0 = Instant::now();
        let tg = target(KeepaliveKind::EmptyDatagram);
        let mut m = UdpMappings::new(None, Duration::from_secs(60), 2, 1);
        m.client_datagram(t0, 0, client(1), &tg, vec![]);
        m.client_datagram(t0, 0, client(2), &tg, vec![]);
        assert!(m.client_datagram(t0, 0, client(3), &tg, vec![]).is_empty());
        assert_eq!(m.counters.dropped_client_datagrams, 1);
        let closed = m.tick(secs(t0, 61)).iter().filter(|a| matches!(a, Action::ClosePort(_))).count();
        assert_eq!(closed, 2);
        assert_eq!(m.flows().count(), 0);
    }

    #[test]
    fn private_ranges() {
        for p in ["10.1.1.1", "192.168.0.1", "172.16.0.1", "198.18.1.10", "198.19.0.1", "100.64.0.1", "127.0.0.1"] {
            assert!(is_private(p.parse().unwrap()), "{p}");
        }
        for p in ["203.0.113.2", "198.51.100.1", "198.20.0.1", "8.8.8.8"] {
            assert!(!is_private(p.parse().unwrap()), "{p}");
        }
    }
}
