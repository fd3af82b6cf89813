//! One direct TCP connection to a camera: its own smoltcp Interface + socket (a *shard*: one
//! Interface per connection, because smoltcp scans every socket per packet and collapses with
//! thousands on one Interface), a traversal [`Attempt`], and the splice to the platform client.
//! Packets reach a shard from the TUN reader through [`PortRoutes`](super::port_routes::PortRoutes),
//! keyed by the server port.

use super::tcp_strategy::{Attempt, Out, Pipelining, State, Strategy};
use super::Shared;
use crate::catalog::Proto;
use crate::wire::control::Direction;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::port_routes::RouteGuard;
use super::queue_device::QueueDevice;
use super::rx_window::{RxWindowTuner, UNKNOWN_ROUND_TRIP};

/// Live facts about one platform-client connection, shown in `beckon status`.
pub struct ConnRecord {
    pub id: u64,
    pub camera: String,
    pub service: String,
    pub client: String,
    pub started: Instant,
    pub info: Mutex<ConnInfo>,
    pub to_camera: AtomicU64,
    pub from_camera: AtomicU64,
    pub trigger_packets: AtomicU64,
    /// A direct connection's receive window now, in bytes (0: none, not spliced yet).
    pub window: AtomicU64,
}

impl ConnRecord {
    pub fn new(id: u64, camera: String, service: String, client: String) -> Self {
        ConnRecord {
            id,
            camera,
            service,
            client,
            started: Instant::now(),
            info: Mutex::new(ConnInfo { path: "connecting".into(), ..Default::default() }),
            to_camera: AtomicU64::new(0),
            from_camera: AtomicU64::new(0),
            trigger_packets: AtomicU64::new(0),
            window: AtomicU64::new(0),
        }
    }

    pub fn status(&self) -> crate::status::ConnectionStatus {
        let i = self.info.lock().unwrap().clone();
        crate::status::ConnectionStatus {
            id: self.id,
            camera: self.camera.clone(),
            service: self.service.clone(),
            client: self.client.clone(),
            path: i.path,
            strategy: i.strategy.map(|s| s.name().to_string()),
            steering: i.strategy.and_then(|s| s.steering()),
            public_endpoint: i.public,
            setup_ms: i.setup_ms,
            round_trips: i.round_trips,
            timed_steps: i.timed_steps,
            warm: i.warm,
            note: i.note,
            age_secs: self.started.elapsed().as_secs(),
            trigger_packets: self.trigger_packets.load(Ordering::Relaxed),
            bytes_to_camera: self.to_camera.load(Ordering::Relaxed),
            bytes_from_camera: self.from_camera.load(Ordering::Relaxed),
            window_kib: Some(self.window.load(Ordering::Relaxed) / 1024).filter(|&k| k > 0),
        }
    }
}

#[derive(Default, Clone)]
pub struct ConnInfo {
    /// "connecting", "direct", "assisted", "failed"
    pub path: String,
    pub strategy: Option<Strategy>,
    pub public: Option<String>,
    pub setup_ms: Option<u64>,
    pub round_trips: u32,
    pub timed_steps: u32,
    /// The connection was pre-opened (`warm`) before the client came.
    pub warm: bool,
    /// Why the direct path was not used, if it was not.
    pub note: Option<String>,
}

/// What became of a window's growth ([`Shard::grow_window`]).
enum Growth {
    Done,
    /// Not now (the budget of all windows is taken, or bytes are buffered): ask again.
    Later,
    /// Never: the window scale agreed with the camera cannot announce it.
    Never,
}

pub struct DirectParams {
    pub strategy: Strategy,
    pub site: String,
    /// The camera's private address:port (what the trigger targets).
    pub camera: SocketAddrV4,
    /// The camera's address inside the userspace stack.
    pub virt: Ipv4Addr,
    pub timeout: Duration,
    /// The receive buffer (window) the connection opens with, and the most it may grow to
    /// while its splice runs ([`RxWindowTuner`]); equal: fixed.
    pub rx_buffer: usize,
    pub rx_buffer_max: usize,
    /// The site's WAN round trip as last measured (this connection's own setup may measure it
    /// again); times the window's growth.
    pub site_rtt: Option<Duration>,
    pub tx_buffer: usize,
    pub keepalive: Option<Duration>,
    /// Timed steered-resync steps (connections a client waits for).
    pub pipelining: Option<Pipelining>,
}

/// Why a direct attempt failed, and whether timed steps were involved (then a step-by-step
/// attempt may still work).
#[derive(Debug)]
pub struct ConnectFailure {
    pub why: String,
    pub timed: bool,
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

impl From<&str> for ConnectFailure {
    fn from(why: &str) -> Self {
        ConnectFailure { why: why.into(), timed: false }
    }
}

pub struct Shard {
    shared: Arc<Shared>,
    site: String,
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    pub attempt: Attempt,
    rx: super::port_routes::PacketRx,
    _route: RouteGuard,
    /// The receive buffer, counted in `Shared::windows` while the shard lives (grown with it).
    window: super::byte_budget::Reservation,
    rx_buffer_max: usize,
    site_rtt: Option<Duration>,
    epoch: Instant,
    record: Arc<ConnRecord>,
}

impl Shard {
    /// Run the attempt until the connection is established (Ok) or the attempt failed (Err,
    /// with the reason). A failed shard is dropped: its port is released, nothing lingers.
    pub async fn connect(shared: Arc<Shared>, p: DirectParams, record: Arc<ConnRecord>) -> Result<Shard, ConnectFailure> {
        let peer = super::port_quarantine::Peer { site: p.site.clone(), camera: p.camera };
        let (route, rx) = shared.port_routes.claim_tcp(peer).ok_or("no free server port")?;
        let public = shared.cfg.public_ip;
        let mut device = QueueDevice::default();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand::random(); // unpredictable ISNs
        let epoch = Instant::now();
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::from_millis(0));
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(public), 32)).unwrap();
        });
        iface.routes_mut().add_default_ipv4_route(public).unwrap();
        let mut sock = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; p.rx_buffer]), tcp::SocketBuffer::new(vec![0; p.tx_buffer]));
        sock.set_rx_capacity_max(p.rx_buffer_max.max(p.rx_buffer));
        sock.set_nagle_enabled(false);
        sock.set_ack_delay(None);
        if let Some(k) = p.keepalive {
            // Probes the camera's own stack answers; they also refresh the NAT mapping.
            sock.set_keep_alive(Some(k.into()));
            sock.set_timeout(Some((k * 3).max(Duration::from_secs(30)).into()));
        }
        let mut sockets = SocketSet::new(Vec::new());
        let handle = sockets.add(sock);
        let server = SocketAddrV4::new(public, route.port);
        let now = Instant::now();
        let mut attempt = Attempt::new(p.strategy, server, p.camera, SocketAddrV4::new(p.virt, p.camera.port()), now, p.timeout);
        if let Some(pl) = p.pipelining {
            attempt = attempt.with_pipelining(pl);
        }
        attempt.nat_ip = shared.nat_ip(&p.site);
        let window = shared.windows.reserve(p.rx_buffer);
        let mut shard = Shard {
            shared,
            site: p.site,
            iface,
            device,
            sockets,
            handle,
            attempt,
            rx,
            _route: route,
            window,
            rx_buffer_max: p.rx_buffer_max,
            site_rtt: p.site_rtt,
            epoch,
            record,
        };
        let outs = shard.attempt.start(now, &mut rand::rng());
        shard.process(outs).await;
        loop {
            shard.pump().await;
            let timed = shard.attempt.failed_by_timing();
            if let Some(why) = shard.attempt.failed() {
                return Err(ConnectFailure { why: why.to_string(), timed });
            }
            let st = shard.sockets.get::<tcp::Socket>(handle).state();
            if shard.attempt.state == State::Established && st == tcp::State::Established {
                shard.shared.learn_from(&shard.site, &shard.attempt);
                return Ok(shard);
            }
            if shard.attempt.state == State::Established && st == tcp::State::Closed {
                return Err(ConnectFailure { why: "the camera's answer did not complete the handshake".into(), timed });
            }
            // The attempt's timers are ticked by the next `pump`.
            shard.wait_input(Instant::now() + Duration::from_secs(1)).await;
        }
    }

    fn smol_now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn wake_at(&mut self) -> Instant {
        let now = Instant::now();
        let smol = self.iface.poll_delay(self.smol_now(), &self.sockets).map(|d| now + Duration::from_micros(d.total_micros()));
        let mut t = now + Duration::from_secs(1);
        for c in [smol, self.attempt.poll_at()].into_iter().flatten() {
            t = t.min(c);
        }
        t
    }

    async fn process(&mut self, outs: Vec<Out>) {
        for o in outs {
            match o {
                Out::Indicate { to_server, pd1 } => {
                    let dir = if to_server { Direction::ToServer } else { Direction::ToCamera };
                    self.record.trigger_packets.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = super::indicate::send(
                        &self.shared,
                        &self.site,
                        Proto::Tcp,
                        dir,
                        self.attempt.camera,
                        self.attempt.server.port(),
                        &pd1,
                    ) {
                        tracing::warn!("{e}");
                    }
                }
                Out::Connect => {
                    let virt = self.attempt.virt;
                    let server = self.attempt.server;
                    let remote = IpEndpoint::new(IpAddress::Ipv4(*virt.ip()), virt.port());
                    let local = IpEndpoint::new(IpAddress::Ipv4(*server.ip()), server.port());
                    let cx = self.iface.context();
                    if let Err(e) = self.sockets.get_mut::<tcp::Socket>(self.handle).connect(cx, remote, local) {
                        tracing::error!("smoltcp connect: {e}");
                    }
                }
                Out::ToWire(p) => {
                    if let Err(e) = self.shared.tun().send(&p).await {
                        tracing::debug!("TUN write: {e}");
                    }
                }
                Out::ToStack(p) => self.device.rx.push_back(p),
            }
        }
    }

    /// Process the packets that arrive, or wait for the stack's next timer, at most until
    /// `deadline`.
    async fn wait_input(&mut self, deadline: Instant) {
        let wake = self.wake_at().min(deadline);
        tokio::select! {
            p = self.rx.recv() => if let Some(p) = p {
                self.wire_batch(p).await;
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }

    /// Take `first` and every packet already queued for this shard, so smoltcp processes them in
    /// one poll (one ACK for the batch instead of one per segment, fewer wakeups).
    async fn wire_batch(&mut self, first: Vec<u8>) {
        let outs = self.attempt.from_wire(first, Instant::now());
        self.process(outs).await;
        for _ in 0..64 {
            let Some(p) = self.rx.try_recv() else { break };
            let outs = self.attempt.from_wire(p, Instant::now());
            self.process(outs).await;
        }
    }

    /// Let smoltcp process input and emit output until it has nothing more to say.
    async fn pump(&mut self) {
        let outs = self.attempt.tick(Instant::now());
        self.process(outs).await;
        for _ in 0..64 {
            let now = self.smol_now();
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            if self.device.tx.is_empty() {
                break;
            }
            let tx: Vec<Vec<u8>> = self.device.tx.drain(..).collect();
            for p in tx {
                let outs = self.attempt.from_stack(p, Instant::now());
                self.process(outs).await;
            }
        }
    }

    /// The connection's receive buffer: the largest window the camera may fill.
    pub fn window(&self) -> usize {
        self.sockets.get::<tcp::Socket>(self.handle).recv_capacity()
    }

    /// Hand a pre-opened connection to a client's record (keeping the trigger packets it cost).
    pub fn adopt(&mut self, record: Arc<ConnRecord>) {
        record.trigger_packets.store(self.record.trigger_packets.load(Ordering::Relaxed), Ordering::Relaxed);
        self.record = record;
    }

    /// Catch up on what arrived while the connection sat idle; true if it is still open both
    /// ways (the camera may have closed an idle connection).
    pub async fn still_open(&mut self) -> bool {
        while let Some(p) = self.rx.try_recv() {
            self.wire_batch(p).await;
        }
        self.pump().await;
        self.sockets.get::<tcp::Socket>(self.handle).state() == tcp::State::Established
    }

    /// Reset the camera connection now (smoltcp sends its RST at once).
    async fn abort(&mut self) {
        self.sockets.get_mut::<tcp::Socket>(self.handle).abort();
        self.pump().await;
    }

    /// Reset the connection (one RST to the camera) and free everything.
    pub async fn reset(mut self) {
        self.abort().await;
    }

    /// Close an unused pre-opened connection politely (FIN, at most `limit` for the camera's
    /// answer), so the camera frees it; then everything is dropped.
    pub async fn close_unused(mut self, limit: Duration) {
        self.sockets.get_mut::<tcp::Socket>(self.handle).close();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            self.pump().await;
            if matches!(self.sockets.get::<tcp::Socket>(self.handle).state(), tcp::State::Closed | tcp::State::TimeWait) {
                return;
            }
            self.wait_input(deadline).await;
        }
        self.abort().await;
    }

    /// The profile probe: the trigger's listener sends a banner first; seeing it proves data
    /// flows from the "camera" side through the NAT, not just the handshake.
    pub async fn read_banner(mut self, want: &[u8], limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        while Instant::now() < deadline {
            self.pump().await;
            let s = self.sockets.get_mut::<tcp::Socket>(self.handle);
            if s.can_recv() {
                let _ = s.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                });
                if got.len() >= want.len() {
                    s.close();
                    self.pump().await;
                    return if got.starts_with(want) { Ok(()) } else { Err("unexpected banner".into()) };
                }
            }
            self.wait_input(deadline).await;
        }
        self.abort().await;
        Err("handshake completed but no data came through (the NAT drops the camera's segments)".into())
    }

    /// Splice bytes between the platform client and the camera until both sides are done.
    /// Camera bytes go into the client socket straight from the packet while smoltcp's receive
    /// buffer is empty (`set_client_sink`), else from that buffer (`try_write`); when the
    /// client's socket is full, smoltcp's buffer fills and its window closes: that is the
    /// backpressure towards the camera.
    pub async fn splice(mut self, client: tokio::net::TcpStream) {
        let sink_failed = self.set_client_sink(&client);
        let mut tuner = self.window_tuner();
        let (mut cr, mut cw) = client.into_split();
        let mut cbuf = vec![0u8; 16 * 1024];
        let mut client_full = false;
        let mut client_eof = false;
        let mut camera_eof = false;
        'splice: loop {
            self.pump().await;
            if let Some(why) = self.attempt.failed() {
                // After the handshake only a step 4 the NAT did not take fails a connection: the
                // camera never answered. The client is reset (it reconnects); the site's next
                // connections skip the strategy (and timed steps, if they were used) for a while.
                let strategy = self.attempt.strategy.label();
                tracing::warn!(camera = %self.record.camera, client = %self.record.client, strategy = %strategy, "direct connection failed: {why}; resetting the client");
                {
                    let mut i = self.record.info.lock().unwrap();
                    i.path = "failed".into();
                    i.note = Some(why.to_string());
                }
                self.shared.stats.tcp_connections_failed.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                if self.attempt.failed_by_timing() {
                    self.shared.timing_failed.failed(self.site.clone(), now);
                } else {
                    self.shared.strategy_failed.failed((self.site.clone(), strategy), now);
                }
                self.abort().await;
                crate::splice::reset_on_drop(cw.as_ref());
                cw.forget();
                break;
            }
            let sink_error = sink_failed.lock().unwrap().take();
            if let Some(e) = sink_error {
                // The sink met the error first (and took it from the socket, so a read may now
                // see a clean end): the client is gone, reset the camera side as below.
                tracing::debug!("client write error: {e}");
                self.abort().await;
                break 'splice;
            }
            if let Some(size) = tuner.poll(self.record.from_camera.load(Ordering::Relaxed), Instant::now()) {
                match self.grow_window(size) {
                    Growth::Done => {
                        tuner.grown(size);
                        continue; // let smoltcp announce the larger window
                    }
                    Growth::Later => {}
                    Growth::Never => tuner.stop(),
                }
            }
            let s = self.sockets.get_mut::<tcp::Socket>(self.handle);
            let mut delivered = 0;
            while !client_full && s.can_recv() {
                match s.recv(|b| match cw.try_write(b) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                }) {
                    Ok(Ok(n)) => delivered += n,
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => client_full = true,
                    Ok(Err(e)) => {
                        tracing::debug!("client write error: {e}");
                        self.abort().await; // the client is gone: reset the camera side
                        break 'splice;
                    }
                    Err(_) => break,
                }
            }
            if delivered > 0 {
                self.record.from_camera.fetch_add(delivered as u64, Ordering::Relaxed);
                continue; // the window opened: let smoltcp announce it
            }
            let state = s.state();
            // Only the camera's FIN is a half-close; a reset or a timeout (Closed without it) is
            // passed on as a reset below.
            let camera_fin = matches!(state, tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait);
            if !s.can_recv() && camera_fin && !camera_eof {
                camera_eof = true;
                let _ = cw.shutdown().await; // half-close towards the client
            }
            if matches!(state, tcp::State::Closed | tcp::State::TimeWait) && !s.can_recv() {
                if state == tcp::State::Closed && !(client_eof && camera_eof) {
                    // The camera reset (or the connection timed out): reset the client too. The
                    // write half must not send a FIN when it is dropped (the client would read a
                    // clean end first): forget it, the stream closes with linger 0 (RST).
                    tracing::info!(camera = %self.record.camera, client_eof, camera_eof, "camera connection closed abruptly; resetting the client");
                    crate::splice::reset_on_drop(cw.as_ref());
                    cw.forget();
                }
                break;
            }
            let room = s.send_capacity() - s.send_queue();
            let wake = self.wake_at();
            tokio::select! {
                p = self.rx.recv() => if let Some(p) = p {
                    self.wire_batch(p).await;
                },
                r = cr.read(&mut cbuf[..room.clamp(1, 16 * 1024)]), if !client_eof && room > 0 => {
                    let s = self.sockets.get_mut::<tcp::Socket>(self.handle);
                    match r {
                        Ok(0) => { client_eof = true; s.close(); }
                        Ok(n) => {
                            let _ = s.send_slice(&cbuf[..n]);
                            self.record.to_camera.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) => { tracing::debug!("client read error: {e}"); self.abort().await; break; } // client reset: reset the camera side
                    }
                },
                w = cw.writable(), if client_full => match w {
                    Ok(()) => client_full = false,
                    Err(e) => {
                        tracing::debug!("client write error: {e}");
                        self.abort().await;
                        break;
                    }
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        // The sink holds its own descriptor of the client socket: close it with the splice.
        self.sockets.get_mut::<tcp::Socket>(self.handle).set_rx_sink(None);
    }

    /// The window's growth for this connection's splice: timed by the round trip its setup
    /// measured (else the site's), plus the host's service allowance.
    fn window_tuner(&self) -> RxWindowTuner {
        let round_trip = self.attempt.rtt.or(self.site_rtt).unwrap_or(UNKNOWN_ROUND_TRIP) + super::tcp_expose::SERVICE_LATENCY;
        let received = self.record.from_camera.load(Ordering::Relaxed);
        self.record.window.store(self.window() as u64, Ordering::Relaxed);
        RxWindowTuner::new(self.window(), self.rx_buffer_max, round_trip, received, Instant::now())
    }

    /// Give the connection a receive buffer (window) of `size` bytes, if the budget of all
    /// windows has room and smoltcp's ring is empty now (else `Later`: the tuner asks again).
    /// `Never` where smoltcp refuses an empty ring's growth: the window scale agreed with the
    /// camera cannot announce it (a camera without window scaling: 64 KiB at most).
    fn grow_window(&mut self, size: usize) -> Growth {
        let old = self.window();
        if size > self.sockets.get::<tcp::Socket>(self.handle).rx_window_announceable() {
            return Growth::Never;
        }
        let Some(more) = size.checked_sub(old).and_then(|extra| self.shared.windows.try_reserve(extra)) else {
            return Growth::Later;
        };
        let s = self.sockets.get_mut::<tcp::Socket>(self.handle);
        if s.recv_queue() > 0 {
            return Growth::Later; // cheaper than allocating a ring smoltcp would refuse
        }
        match s.grow_rx_buffer(tcp::SocketBuffer::new(vec![0; size])) {
            Ok(()) => {
                self.window.absorb(more);
                self.record.window.store(size as u64, Ordering::Relaxed);
                self.shared.stats.tcp_windows_grown.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(camera = %self.record.camera, client = %self.record.client, from_kib = old / 1024, to_kib = size / 1024, "receive window grown");
                Growth::Done
            }
            Err(_) => Growth::Later, // bytes wait out of order
        }
    }

    /// Camera bytes that arrive in order while smoltcp's receive buffer is empty go from the
    /// packet straight into the client socket (the vendored smoltcp's rx sink), which saves
    /// copying every byte into the buffer first when the client keeps up. The sink writes
    /// without blocking through its own descriptor of the client socket (a `dup`, so that it
    /// can never write to a reused descriptor number); what the socket does not take goes into
    /// smoltcp's buffer and on by the usual path (`try_write`). A write error other than a full
    /// socket is kept in the returned slot for the splice, since the kernel reports a reset
    /// only once. The sink takes nothing more after one.
    fn set_client_sink(&mut self, client: &tokio::net::TcpStream) -> Arc<Mutex<Option<std::io::Error>>> {
        use std::io::Write;
        use std::os::fd::AsFd;
        let failed = Arc::new(Mutex::new(None));
        let Ok(fd) = client.as_fd().try_clone_to_owned() else {
            return failed; // out of descriptors: every byte takes the buffered path
        };
        let direct = std::net::TcpStream::from(fd); // non-blocking: the file status is shared
        let record = self.record.clone();
        let slot = failed.clone();
        let mut broken = false;
        let sink = move |payload: &[u8]| {
            if broken {
                return 0;
            }
            match (&direct).write(payload) {
                Ok(n) => {
                    record.from_camera.fetch_add(n as u64, Ordering::Relaxed);
                    n
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    broken = true;
                    *slot.lock().unwrap() = Some(e);
                    0
                }
            }
        };
        self.sockets.get_mut::<tcp::Socket>(self.handle).set_rx_sink(Some(tcp::RxSink(Box::new(sink))));
        failed
    }
}
