//! Second connection module: the camera-facing `public_ip`, served by beckon's own TUN and
//! userspace stack (never by host-kernel sockets: a kernel would answer unexpected packets with
//! RST or ICMP and kill mappings). This file is the thin async shell: one task reads the TUN,
//! hands TCP packets to their connection's shard (each with its own smoltcp interface, see
//! `tcp_conn`), serves the UDP flows itself and carries out the [`UdpMappings`] state machine's
//! actions.
//!
//! UDP needs no stack: a flow is a server port, so a datagram is parsed and built with
//! smoltcp's wire types and found in a hash map, O(1) per datagram whatever the number of
//! flows (one smoltcp UDP socket per flow made every packet walk all of them).

use super::expose::{Exposure, StackEvent};
use super::keepalive::KeepaliveKind;
use super::tun::{Checksum, RxBuf};
use super::udp_mapping::{Action, FlowState, TableCounters, Target, UdpMappings};
use super::Shared;
use crate::rate_limit::LogThrottle;
use crate::status::MappingStatus;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4Message, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, TcpPacket, UdpPacket, UdpRepr,
};
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Packets waiting to be written to the TUN. The queue is drained after every event, and one
/// event (a keepalive tick) emits at most one packet per flow, so this bound drops nothing in
/// normal operation.
const TX_QUEUE: usize = 2 * MAX_FLOWS;
/// Flows without a client datagram for this long are freed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
const MAX_FLOWS: usize = 10_000;
const TTL: u8 = 64;

/// What the admin endpoint gets from the stack.
pub struct StackSnapshot {
    pub mappings: Vec<MappingStatus>,
    pub counters: TableCounters,
    pub bytes_to_cameras: u64,
    pub bytes_from_cameras: u64,
    /// Client datagrams the stack dropped: its queue towards a client full, or its exposure's
    /// camera or service not reported.
    pub client_drops: u64,
}

pub struct Stack {
    shared: Arc<Shared>,
    tun: Arc<super::tun::ServerTun>,
    public_ip: Ipv4Addr,
    exposes: Vec<Exposure>,
    table: UdpMappings,
    tx: VecDeque<Vec<u8>>,
    bytes_to_cameras: u64,
    bytes_from_cameras: u64,
    client_queue_drops: u64,
    /// Client datagrams of an exposure whose camera is not (yet) reported with its service, and
    /// per exposure when to log one: a client sending many such datagrams must not make this
    /// thread write a log line each (at most one per [`UNSERVED_LOG_EVERY`]).
    unserved: u64,
    unserved_log: Vec<LogThrottle>,
    /// Where the kernel counts the packets it dropped in front of the TUN (its queue full);
    /// `None` once it could not be read at all. And its last value read: a later failed read
    /// keeps it, so that a failed read is no burst of drops.
    tun_drops_path: Option<std::path::PathBuf>,
    tun_drops: Option<u64>,
}

/// How often an exposure logs client datagrams it cannot serve (they are counted in
/// `dropped_client_datagrams`).
const UNSERVED_LOG_EVERY: Duration = Duration::from_secs(10);

impl Stack {
    pub fn new(shared: Arc<Shared>, tun: Arc<super::tun::ServerTun>, exposes: Vec<Exposure>) -> Self {
        let table = UdpMappings::new(shared.cfg.keepalive(), IDLE_TIMEOUT, MAX_FLOWS, rand::random());
        let unserved_log = vec![LogThrottle::new(UNSERVED_LOG_EVERY); exposes.len()];
        let tun_drops_path = Some(format!("/sys/class/net/{}/statistics/tx_dropped", shared.cfg.tun_name).into());
        Stack {
            public_ip: shared.cfg.public_ip,
            shared,
            tun,
            exposes,
            table,
            tx: VecDeque::new(),
            bytes_to_cameras: 0,
            bytes_from_cameras: 0,
            client_queue_drops: 0,
            unserved: 0,
            unserved_log,
            tun_drops_path,
            tun_drops: None,
        }
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<StackEvent>, mut shutdown: watch::Receiver<bool>) {
        let mut rx = RxBuf::default();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = self.tun.recv(&mut rx) => match r {
                    Ok(()) => self.ingress_read(&mut rx),
                    Err(e) => { tracing::error!("TUN read failed: {e}; stack stops"); return; }
                },
                ev = events.recv() => match ev {
                    Some(ev) => self.event(ev),
                    None => return,
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    let acts = self.table.tick(now);
                    self.apply(acts);
                    self.watch_overload(now);
                }
                _ = shutdown.changed() => return,
            }
            while let Some(p) = self.tx.pop_front() {
                if let Err(e) = self.tun.send(&p).await {
                    tracing::debug!("TUN write: {e}");
                }
            }
        }
    }

    /// Feed the overload guard the camera packets dropped so far: by the kernel in front of the
    /// TUN (its queue was full) and by the reader in front of the connections' queues. With
    /// `overload_guard = false` it is never fed, so it never reports overload.
    fn watch_overload(&mut self, now: Instant) {
        if !self.shared.cfg.overload_guard {
            return;
        }
        if let Some(path) = &self.tun_drops_path {
            match std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(n) => self.tun_drops = Some(n),
                None if self.tun_drops.is_none() => {
                    tracing::warn!(path = %path.display(), "cannot read the TUN's drop counter; the overload guard sees only drops inside beckon");
                    self.tun_drops_path = None;
                }
                None => {}
            }
        }
        let total = self.tun_drops.unwrap_or(0) + self.shared.port_routes.dropped_packets();
        if self.shared.overload.lock().unwrap().observe(now, total) {
            tracing::warn!(
                drops_per_tick = super::overload::DROPS_PER_TICK,
                hold_secs = super::overload::HOLD.as_secs(),
                "server overloaded: dropping camera packets (more than drops_per_tick in 250 ms); new TCP clients are refused for hold_secs"
            );
        }
    }

    /// What one TUN read holds. A TCP packet goes to its shard as an owned buffer (a
    /// super-packet with its read buffer, not copied: see [`RxBuf::take_whole`]).
    fn ingress_read(&mut self, rx: &mut RxBuf) {
        if let Some((pkt, csum)) = rx.whole() {
            match parse_ingress(pkt, csum, self.public_ip) {
                Ingress::Tcp { dst_port } => {
                    if let Some(pkt) = rx.take_whole() {
                        self.shared.port_routes.dispatch_tcp(dst_port, pkt);
                    }
                }
                other => self.ingress(pkt, other),
            }
            return;
        }
        for (pkt, csum) in rx.packets() {
            self.ingress(pkt, parse_ingress(pkt, csum, self.public_ip))
        }
    }

    /// A packet `pkt` from the TUN, parsed: TCP to its shard, UDP to its flow or probe, ICMP
    /// errors about our mappings to the table, echo requests answered; everything else is
    /// dropped silently (no RST, no port unreachable: silence never kills a NAT mapping).
    fn ingress(&mut self, pkt: &[u8], parsed: Ingress<'_>) {
        match parsed {
            Ingress::Tcp { dst_port } => {
                self.shared.port_routes.dispatch_tcp(dst_port, pkt.to_vec());
            }
            Ingress::Udp { dst_port, from, payload } => {
                if self.shared.port_routes.dispatch_udp(dst_port, pkt) {
                    return;
                }
                let acts = self.table.camera_datagram(Instant::now(), dst_port, from, payload.to_vec());
                self.apply(acts);
            }
            Ingress::Unreachable { server_port, to } => self.table.unreachable(Instant::now(), server_port, to),
            Ingress::EchoReply(reply) => self.queue(reply),
            Ingress::Ignore => {}
        }
    }

    fn queue(&mut self, pkt: Vec<u8>) {
        if self.tx.len() < TX_QUEUE {
            self.tx.push_back(pkt);
        } else {
            tracing::debug!("TUN transmit queue full; packet dropped");
        }
    }

    fn event(&mut self, ev: StackEvent) {
        match ev {
            StackEvent::ClientDatagram { expose, client, payload } => {
                let Some(target) = self.target(expose) else {
                    return;
                };
                let acts = self.table.client_datagram(Instant::now(), expose, client, &target, payload);
                self.apply(acts);
            }
            StackEvent::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
        }
    }

    /// Resolve an exposure to its camera from the registry (what the trigger reported).
    fn target(&mut self, expose: usize) -> Option<Target> {
        let e = &self.exposes.get(expose)?.cfg;
        let reg = self.shared.registry.lock().unwrap();
        let cam = match reg.registry.camera(e.site(), e.camera_name()) {
            Some(cam) if cam.services.contains(&e.service()) => cam,
            unserved => {
                let why = match unserved {
                    None => "camera not reported by its trigger (yet)",
                    Some(_) => "the camera's report does not list this service",
                };
                self.unserved += 1;
                if self.unserved_log[expose].hit(Instant::now()).is_some() {
                    tracing::warn!(camera = %e.camera, service = %e.service(), "client datagram dropped: {why} (logged at most every 10 s; counted in dropped_client_datagrams)");
                }
                return None;
            }
        };
        Some(Target {
            site: e.site().to_string(),
            camera: e.camera_name().to_string(),
            camera_ip: cam.ip,
            camera_port: e.port,
            keepalive: KeepaliveKind::for_device_type(&cam.device_type),
            nat_ip: self.shared.nat_ip(e.site()),
        })
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                // A flow's port is its key in the table: datagrams are looked up there, nothing
                // to bind or unbind.
                Action::OpenPort(_) | Action::ClosePort(_) => {}
                Action::ToCamera { server_port, to, payload } => {
                    match udp_datagram(SocketAddrV4::new(self.public_ip, server_port), to, &payload) {
                        Some(p) => {
                            self.bytes_to_cameras += payload.len() as u64;
                            self.queue(p);
                        }
                        None => tracing::debug!(server_port, len = payload.len(), "datagram too large for IPv4; dropped"),
                    }
                }
                Action::ToClient { expose, client, payload } => {
                    // Only a camera's datagram, accepted by its flow, becomes one of these.
                    self.bytes_from_cameras += payload.len() as u64;
                    if let Some(sock) = self.exposes.get(expose).and_then(|e| e.udp.as_ref()) {
                        if sock.try_send_to(&payload, client).is_err() {
                            self.client_queue_drops += 1;
                        }
                    }
                }
                Action::Indicate { site, camera_ip, camera_port, server_port, payload } => {
                    if let Err(e) = super::indicate::udp(&self.shared, &site, camera_ip, camera_port, server_port, &payload) {
                        self.shared.stats.indication_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!("cannot reach {site}/{camera_ip}:{camera_port}: {e}");
                    }
                }
            }
        }
    }

    fn snapshot(&self) -> StackSnapshot {
        let now = Instant::now();
        let mut mappings: Vec<MappingStatus> = self
            .table
            .flows()
            .map(|f| {
                let e = &self.exposes[f.expose].cfg;
                let (state, public) = match f.state {
                    FlowState::Pending { .. } => ("pending", None),
                    FlowState::Mapped { public, .. } => ("mapped", Some(public.to_string())),
                };
                MappingStatus {
                    camera: e.camera.clone(),
                    service: e.service().to_string(),
                    expose_listen: e.listen.to_string(),
                    client: f.client.to_string(),
                    server_port: f.server_port,
                    public_endpoint: public,
                    state: state.into(),
                    reached_by: "udp-signalling".into(),
                    age_secs: now.duration_since(f.created).as_secs(),
                    indications: f.stats.indications,
                    keepalive: serde_json::to_value(f.target.keepalive).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
                    keepalives_sent: f.stats.keepalives_sent,
                    keepalives_answered: f.stats.keepalives_answered,
                    last_keepalive_answer_secs_ago: f.stats.last_keepalive_answer.map(|t| now.duration_since(t).as_secs()),
                    datagrams_to_camera: f.stats.datagrams_to_camera,
                    datagrams_from_camera: f.stats.datagrams_from_camera,
                    bytes_to_camera: f.stats.bytes_to_camera,
                    bytes_from_camera: f.stats.bytes_from_camera,
                }
            })
            .collect();
        mappings.sort_by(|a, b| (&a.camera, &a.client).cmp(&(&b.camera, &b.client)));
        StackSnapshot {
            mappings,
            counters: self.table.counters,
            bytes_to_cameras: self.bytes_to_cameras,
            bytes_from_cameras: self.bytes_from_cameras,
            client_drops: self.client_queue_drops + self.unserved,
        }
    }
}

/// If `ip` is an ICMP destination-unreachable about a UDP datagram we sent from
/// `public_ip:port`, return (port, the datagram's destination).
pub fn unreachable_for(ip: &Ipv4Packet<&[u8]>, public_ip: std::net::Ipv4Addr) -> Option<(u16, SocketAddrV4)> {
    let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
    if icmp.msg_type() != Icmpv4Message::DstUnreachable {
        return None;
    }
    let inner = Ipv4Packet::new_checked(icmp.data()).ok().or_else(|| {
        // The quoted packet is truncated (header + 8 bytes): parse without the length check.
        let d = icmp.data();
        (d.len() >= 28).then(|| Ipv4Packet::new_unchecked(d))
    })?;
    if inner.next_header() != IpProtocol::Udp || inner.src_addr() != public_ip {
        return None;
    }
    let hl = inner.header_len() as usize;
    let quoted = icmp.data().get(hl..hl + 8)?;
    let udp = UdpPacket::new_unchecked(quoted);
    Some((udp.src_port(), SocketAddrV4::new(inner.dst_addr(), udp.dst_port())))
}

/// What a packet from the TUN is for the stack (sans-IO: parsing only, no state).
#[derive(Debug, PartialEq, Eq)]
pub enum Ingress<'a> {
    /// A TCP segment for a server port (its shard's, if any); checksum verified.
    Tcp { dst_port: u16 },
    /// A UDP datagram for a server port; checksum verified.
    Udp { dst_port: u16, from: SocketAddrV4, payload: &'a [u8] },
    /// ICMP destination-unreachable about a datagram we sent from `server_port` to `to`.
    Unreachable { server_port: u16, to: SocketAddrV4 },
    /// An echo request to `public_ip`: this is the reply.
    EchoReply(Vec<u8>),
    /// Not for beckon, malformed, a fragment, or a bad checksum.
    Ignore,
}

/// Classify a packet read from the TUN. `csum` says whether the kernel already verified the
/// transport checksum (a TCP super-packet's is only partial and must not be checked again).
pub fn parse_ingress(pkt: &[u8], csum: Checksum, public_ip: Ipv4Addr) -> Ingress<'_> {
    let Ok(ip) = Ipv4Packet::new_checked(pkt) else {
        return Ingress::Ignore; // garbage
    };
    if ip.version() != 4 || ip.dst_addr() != public_ip || !ip.verify_checksum() {
        return Ingress::Ignore;
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Ingress::Ignore; // no reassembly: cameras' answers and TCP segments fit the MTU
    }
    if csum == Checksum::Unverified && !transport_checksum_ok(&ip) {
        return Ingress::Ignore;
    }
    let body = &pkt[ip.header_len() as usize..ip.total_len() as usize];
    match ip.next_header() {
        IpProtocol::Tcp => match TcpPacket::new_checked(body) {
            Ok(t) => Ingress::Tcp { dst_port: t.dst_port() },
            Err(_) => Ingress::Ignore,
        },
        IpProtocol::Udp => match UdpPacket::new_checked(body) {
            Ok(u) => {
                let payload = &body[8..u.len() as usize];
                Ingress::Udp { dst_port: u.dst_port(), from: SocketAddrV4::new(ip.src_addr(), u.src_port()), payload }
            }
            Err(_) => Ingress::Ignore,
        },
        IpProtocol::Icmp => {
            if let Some((server_port, to)) = unreachable_for(&ip, public_ip) {
                Ingress::Unreachable { server_port, to }
            } else {
                echo_reply(&ip).map_or(Ingress::Ignore, Ingress::EchoReply)
            }
        }
        _ => Ingress::Ignore,
    }
}

/// An IPv4/UDP packet from `from` to `to` carrying `payload`, checksums filled; `None` if it
/// does not fit an IPv4 packet. DF stays clear: the kernel fragments what exceeds a link's MTU,
/// as it would for a host's own socket.
pub fn udp_datagram(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Option<Vec<u8>> {
    let udp = UdpRepr { src_port: from.port(), dst_port: to.port() };
    let udp_len = udp.header_len() + payload.len();
    let ip = Ipv4Repr { src_addr: *from.ip(), dst_addr: *to.ip(), next_header: IpProtocol::Udp, payload_len: udp_len, hop_limit: TTL };
    let total = ip.buffer_len() + udp_len;
    if total > u16::MAX as usize {
        return None;
    }
    let mut buf = vec![0u8; total];
    let caps = ChecksumCapabilities::default();
    let mut pkt = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut pkt, &caps);
    pkt.set_dont_frag(false);
    // smoltcp writes ident 0; fragments of different datagrams must not share one.
    pkt.set_ident(rand::random());
    pkt.fill_checksum();
    let (src, dst): (Ipv4Address, Ipv4Address) = (*from.ip(), *to.ip());
    let mut u = UdpPacket::new_unchecked(pkt.payload_mut());
    udp.emit(&mut u, &src.into(), &dst.into(), payload.len(), |b| b.copy_from_slice(payload), &caps);
    Some(buf)
}

/// The TCP or UDP checksum of `ip` (other protocols have their own checks where parsed).
fn transport_checksum_ok(ip: &Ipv4Packet<&[u8]>) -> bool {
    let (src, dst) = (ip.src_addr().into(), ip.dst_addr().into());
    match ip.next_header() {
        IpProtocol::Tcp => TcpPacket::new_checked(ip.payload()).is_ok_and(|t| t.verify_checksum(&src, &dst)),
        IpProtocol::Udp => UdpPacket::new_checked(ip.payload()).is_ok_and(|u| u.verify_checksum(&src, &dst)),
        _ => true,
    }
}

/// The answer to an ICMP echo request (operators ping `public_ip` to see the stack is up).
fn echo_reply(ip: &Ipv4Packet<&[u8]>) -> Option<Vec<u8>> {
    let caps = ChecksumCapabilities::default();
    let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
    let Icmpv4Repr::EchoRequest { ident, seq_no, data } = Icmpv4Repr::parse(&icmp, &caps).ok()? else {
        return None;
    };
    let reply = Icmpv4Repr::EchoReply { ident, seq_no, data };
    let ipr = Ipv4Repr {
        src_addr: ip.dst_addr(),
        dst_addr: ip.src_addr(),
        next_header: IpProtocol::Icmp,
        payload_len: reply.buffer_len(),
        hop_limit: TTL,
    };
    let mut buf = vec![0u8; ipr.buffer_len() + reply.buffer_len()];
    let mut pkt = Ipv4Packet::new_unchecked(&mut buf[..]);
    ipr.emit(&mut pkt, &caps);
    reply.emit(&mut Icmpv4Packet::new_unchecked(pkt.payload_mut()), &caps);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn udp_datagram_parses_back_with_valid_checksums() {
        let (from, to) = (ep("203.0.113.100:40000"), ep("203.0.113.2:5060"));
        let p = udp_datagram(from, to, b"OPTIONS").unwrap();
        let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert!(ip.verify_checksum());
        assert!(!ip.dont_frag());
        assert_eq!((ip.src_addr(), ip.dst_addr()), (*from.ip(), *to.ip()));
        let u = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(u.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
        assert_eq!((u.src_port(), u.dst_port(), u.payload()), (40000, 5060, &b"OPTIONS"[..]));
        // An empty payload is the generic keepalive.
        assert_eq!(udp_datagram(from, to, b"").unwrap().len(), 28);
        assert!(udp_datagram(from, to, &vec![0; 65_508]).is_none());
        assert_eq!(udp_datagram(from, to, &vec![0; 65_507]).unwrap().len(), 65_535);
    }

    #[test]
    fn ingress_classifies_and_checks() {
        let public = Ipv4Addr::new(203, 0, 113, 100);
        let (cam, srv) = (ep("203.0.113.2:5060"), ep("203.0.113.100:40000"));
        let good = udp_datagram(cam, srv, b"SIP/2.0 200 OK").unwrap();
        let want = Ingress::Udp { dst_port: 40000, from: cam, payload: &b"SIP/2.0 200 OK"[..] };
        assert_eq!(parse_ingress(&good, Checksum::Unverified, public), want);
        // Not for public_ip.
        assert_eq!(parse_ingress(&good, Checksum::Unverified, Ipv4Addr::new(203, 0, 113, 99)), Ingress::Ignore);
        // A corrupted payload: dropped unless the kernel vouched for the checksum.
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 0xff;
        assert_eq!(parse_ingress(&bad, Checksum::Unverified, public), Ingress::Ignore);
        assert!(matches!(parse_ingress(&bad, Checksum::Verified, public), Ingress::Udp { dst_port: 40000, .. }));
        // A fragment is not reassembled.
        let mut frag = good.clone();
        let mut ip = Ipv4Packet::new_unchecked(&mut frag[..]);
        ip.set_more_frags(true);
        ip.fill_checksum();
        assert_eq!(parse_ingress(&frag, Checksum::Unverified, public), Ingress::Ignore);
        // Truncated and empty input.
        assert_eq!(parse_ingress(&good[..25], Checksum::Unverified, public), Ingress::Ignore);
        assert_eq!(parse_ingress(&[], Checksum::Verified, public), Ingress::Ignore);
    }

    #[test]
    fn echo_request_gets_a_reply_and_nothing_else_does() {
        let caps = ChecksumCapabilities::default();
        let req = Icmpv4Repr::EchoRequest { ident: 7, seq_no: 3, data: b"hello" };
        let ipr = Ipv4Repr {
            src_addr: Ipv4Addr::new(203, 0, 113, 1),
            dst_addr: Ipv4Addr::new(203, 0, 113, 100),
            next_header: IpProtocol::Icmp,
            payload_len: req.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; ipr.buffer_len() + req.buffer_len()];
        let mut pkt = Ipv4Packet::new_unchecked(&mut buf[..]);
        ipr.emit(&mut pkt, &caps);
        req.emit(&mut Icmpv4Packet::new_unchecked(pkt.payload_mut()), &caps);
        let reply = echo_reply(&Ipv4Packet::new_checked(&buf[..]).unwrap()).unwrap();
        let ip = Ipv4Packet::new_checked(&reply[..]).unwrap();
        assert_eq!(ip.dst_addr(), Ipv4Addr::new(203, 0, 113, 1));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(Icmpv4Repr::parse(&icmp, &caps).unwrap(), Icmpv4Repr::EchoReply { ident: 7, seq_no: 3, data: b"hello" });
        // A reply is not answered (no ping-pong between two stacks).
        assert!(echo_reply(&ip).is_none());
    }
}
