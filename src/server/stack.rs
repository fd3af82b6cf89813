//! Second connection module: the camera-facing `public_ip`, served by beckon's own TUN +
//! smoltcp stack (never by host-kernel sockets: a kernel would answer unexpected packets with
//! RST or ICMP and kill mappings). This file is the thin async shell: it moves packets between
//! the TUN and smoltcp, and carries out the [`UdpMappings`] state machine's actions.

use super::expose::{Exposure, StackEvent};
use super::keepalive::KeepaliveKind;
use super::udp_mapping::{Action, FlowState, TableCounters, Target, UdpMappings};
use super::Shared;
use crate::status::MappingStatus;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::udp;
use smoltcp::wire::{HardwareAddress, Icmpv4Message, Icmpv4Packet, IpAddress, IpCidr, IpEndpoint, IpProtocol, Ipv4Packet, UdpPacket};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Packets queued between TUN and smoltcp in either direction.
const DEVICE_QUEUE: usize = 4096;
const MTU: usize = 1500;
/// Flows without a client datagram for this long are freed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
const MAX_FLOWS: usize = 10_000;
/// Per-flow smoltcp UDP buffers: a burst of datagrams, not a stream.
const UDP_SLOTS: usize = 32;
const UDP_BYTES: usize = 32 * 1024;

/// A `phy::Device` over two packet queues; the async loop fills/drains them against the TUN.
#[derive(Default)]
pub struct QueueDevice {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
}

pub struct RxTok(Vec<u8>);
pub struct TxTok<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
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
        (self.tx.len() < DEVICE_QUEUE).then(|| TxTok(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = MTU;
        c
    }
}

/// What the admin endpoint gets from the stack.
pub struct StackSnapshot {
    pub mappings: Vec<MappingStatus>,
    pub counters: TableCounters,
    pub bytes_to_cameras: u64,
    pub bytes_from_cameras: u64,
    pub client_queue_drops: u64,
}

pub struct Stack {
    shared: Arc<Shared>,
    tun: Arc<tun_rs::AsyncDevice>,
    exposes: Vec<Exposure>,
    device: QueueDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    ports: HashMap<u16, SocketHandle>,
    table: UdpMappings,
    epoch: Instant,
    bytes_to_cameras: u64,
    bytes_from_cameras: u64,
    client_queue_drops: u64,
}

impl Stack {
    pub fn new(shared: Arc<Shared>, tun: Arc<tun_rs::AsyncDevice>, exposes: Vec<Exposure>) -> Self {
        let mut device = QueueDevice::default();
        let mut config = Config::new(HardwareAddress::Ip);
        // smoltcp's default seed is 0: every ISN and port would be predictable.
        config.random_seed = rand::random();
        let epoch = Instant::now();
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::from_millis(0));
        let public = shared.cfg.public_ip;
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(public.into()), 32)).expect("one address fits");
        });
        // Everything leaves through the TUN; the host kernel routes it on.
        iface.routes_mut().add_default_ipv4_route(public.into()).expect("one route fits");
        let table = UdpMappings::new(shared.cfg.keepalive(), IDLE_TIMEOUT, MAX_FLOWS, rand::random());
        Stack {
            shared,
            tun,
            exposes,
            device,
            iface,
            sockets: SocketSet::new(Vec::new()),
            ports: HashMap::new(),
            table,
            epoch,
            bytes_to_cameras: 0,
            bytes_from_cameras: 0,
            client_queue_drops: 0,
        }
    }

    fn smol_now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<StackEvent>, mut shutdown: watch::Receiver<bool>) {
        let mut buf = vec![0u8; 65536];
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = self.tun.recv(&mut buf) => match r {
                    // Packets for TCP shards or probes are handed off: nothing for the UDP stack to do.
                    Ok(n) => if !self.ingress(&buf[..n]) { continue },
                    Err(e) => { tracing::error!("TUN read failed: {e}; stack stops"); return; }
                },
                ev = events.recv() => match ev {
                    Some(ev) => self.event(ev),
                    None => return,
                },
                _ = tick.tick() => {
                    let acts = self.table.tick(Instant::now());
                    self.apply(acts);
                }
                _ = shutdown.changed() => return,
            }
            self.pump().await;
        }
    }

    /// A packet from the TUN: watch for ICMP errors about our mappings, then hand it to smoltcp.
    /// Returns false when the packet was handed to a TCP shard or a probe (or dropped), true when
    /// the UDP stack got it.
    fn ingress(&mut self, pkt: &[u8]) -> bool {
        let Ok(ip) = Ipv4Packet::new_checked(pkt) else {
            return false; // IPv6 or garbage
        };
        let dst = crate::wire::rewrite::endpoint(pkt, crate::wire::rewrite::End::Dst);
        match (ip.next_header(), dst) {
            // Camera-facing TCP belongs to the connection shard that owns the server port.
            (IpProtocol::Tcp, Ok(dst)) if self.shared.tcp_routes.dispatch(dst.port(), pkt) => return false,
            (IpProtocol::Udp, Ok(dst))
                if crate::server::tcp_conn::UDP_PROBE_PORTS.contains(&dst.port())
                    && self.shared.tcp_routes.dispatch_udp(dst.port(), pkt) =>
            {
                return false
            }
            (IpProtocol::Icmp, _) => {
                if let Some((port, to)) = unreachable_for(&ip, self.shared.cfg.public_ip) {
                    self.table.unreachable(Instant::now(), port, to);
                }
            }
            _ => {}
        }
        if self.device.rx.len() < DEVICE_QUEUE {
            self.device.rx.push_back(pkt.to_vec());
        }
        true
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
    fn target(&self, expose: usize) -> Option<Target> {
        let e = &self.exposes.get(expose)?.cfg;
        let reg = self.shared.registry.lock().unwrap();
        let Some(cam) = reg.registry.camera(e.site(), e.camera_name()) else {
            tracing::warn!(camera = %e.camera, "client datagram dropped: camera not reported by its trigger (yet)");
            return None;
        };
        if !cam.services.contains(&e.service()) {
            tracing::warn!(camera = %e.camera, service = %e.service(), "client datagram dropped: the camera's report does not list this service");
            return None;
        }
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
                Action::OpenPort(port) => {
                    let rx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; UDP_SLOTS], vec![0; UDP_BYTES]);
                    let tx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; UDP_SLOTS], vec![0; UDP_BYTES]);
                    let mut s = udp::Socket::new(rx, tx);
                    if let Err(e) = s.bind(IpEndpoint::new(IpAddress::Ipv4(self.shared.cfg.public_ip.into()), port)) {
                        tracing::error!(port, "binding server port: {e}");
                        continue;
                    }
                    self.ports.insert(port, self.sockets.add(s));
                }
                Action::ClosePort(port) => {
                    if let Some(h) = self.ports.remove(&port) {
                        self.sockets.remove(h);
                    }
                }
                Action::ToCamera { server_port, to, payload } => {
                    let Some(h) = self.ports.get(&server_port) else {
                        continue;
                    };
                    let ep = IpEndpoint::new(IpAddress::Ipv4((*to.ip()).into()), to.port());
                    match self.sockets.get_mut::<udp::Socket>(*h).send_slice(&payload, ep) {
                        Ok(()) => self.bytes_to_cameras += payload.len() as u64,
                        Err(e) => tracing::debug!(server_port, "send to camera: {e}"),
                    }
                }
                Action::ToClient { expose, client, payload } => {
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

    /// Run smoltcp, deliver what its sockets received, and write its output to the TUN.
    async fn pump(&mut self) {
        for _ in 0..4 {
            let now = self.smol_now();
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            let mut received = Vec::new();
            for (&port, &h) in &self.ports {
                let s = self.sockets.get_mut::<udp::Socket>(h);
                while let Ok((data, meta)) = s.recv() {
                    let IpAddress::Ipv4(ip) = meta.endpoint.addr;
                    received.push((port, SocketAddrV4::new(ip, meta.endpoint.port), data.to_vec()));
                }
            }
            if received.is_empty() && self.device.rx.is_empty() {
                break;
            }
            for (port, from, data) in received {
                self.bytes_from_cameras += data.len() as u64;
                let acts = self.table.camera_datagram(Instant::now(), port, from, data);
                self.apply(acts);
            }
        }
        let now = self.smol_now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        while let Some(p) = self.device.tx.pop_front() {
            if let Err(e) = self.tun.send(&p).await {
                tracing::debug!("TUN write: {e}");
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
            client_queue_drops: self.client_queue_drops,
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
    if inner.next_header() != IpProtocol::Udp || std::net::Ipv4Addr::from(inner.src_addr()) != public_ip {
        return None;
    }
    let hl = inner.header_len() as usize;
    let quoted = icmp.data().get(hl..hl + 8)?;
    let udp = UdpPacket::new_unchecked(quoted);
    Some((udp.src_port(), SocketAddrV4::new(inner.dst_addr().into(), udp.dst_port())))
}
