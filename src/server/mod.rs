//! The server (public side): first connection module (`accept`), resource-record module
//! (`record`), indication module (`indicate`), second connection module (`stack`: TUN reader,
//! UDP flows with the `udp_mapping` table; `tcp_conn`: one smoltcp shard per direct TCP connection,
//! fed through `port_routes`), keepalive module (`keepalive`), plus the platform-facing
//! exposures (`expose`) and the admin endpoint (`admin`).

pub mod accept;
pub mod admin;
pub mod assist;
pub mod byte_budget;
pub mod cooldown;
pub mod expose;
pub mod indicate;
pub mod keepalive;
pub mod overload;
pub mod port_quarantine;
pub mod port_routes;
pub mod profile;
pub mod queue_device;
pub mod record;
pub mod rx_pool;
pub mod rx_window;
pub mod stack;
pub mod tcp_conn;
pub mod tcp_expose;
pub mod tcp_strategy;
pub mod tun;
pub mod udp_mapping;

use crate::config::ServerConfig;
use crate::hostnet::{self, SysctlGuard};
use crate::status::{CameraStatus, Counters, ProfileStatus, SiteStatus, StatusDoc};
use anyhow::{Context, Result};
use record::RegistryStore;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};

/// A connected trigger's control session.
pub struct SiteSession {
    pub id: u64,
    pub tx: mpsc::Sender<crate::wire::control::Message>,
    pub public: SocketAddr,
    pub since: Instant,
    /// Closes the session when another trigger registers for the same site.
    pub kick: Option<oneshot::Sender<()>>,
}

/// Control-plane counters (atomics: updated from many session tasks).
#[derive(Default)]
pub struct ControlStats {
    pub indications_sent: AtomicU64,
    pub indication_errors: AtomicU64,
    pub trigger_packets_injected: AtomicU64,
    pub bytes_injected_by_triggers: AtomicU64,
    pub auth_failures: AtomicU64,
    pub bad_frames: AtomicU64,
    pub tcp_connections_direct: AtomicU64,
    pub tcp_connections_warm: AtomicU64,
    pub tcp_connections_assisted: AtomicU64,
    pub tcp_connections_failed: AtomicU64,
    pub tcp_direct_fallbacks: AtomicU64,
    pub tcp_windows_grown: AtomicU64,
    pub tcp_clients_refused: AtomicU64,
    pub tcp_clients_refused_overloaded: AtomicU64,
    /// Bytes of connections that have closed (open ones are summed from their records).
    pub tcp_bytes_direct_closed: AtomicU64,
    pub tcp_bytes_assisted_closed: AtomicU64,
}

pub struct Shared {
    pub cfg: ServerConfig,
    pub registry: Mutex<RegistryStore>,
    pub sessions: Mutex<HashMap<String, SiteSession>>,
    pub stats: ControlStats,
    pub started: Instant,
    pub next_id: AtomicU64,
    /// The server's TUN, shared by the UDP stack and the TCP shards (set once at start).
    pub tun: std::sync::OnceLock<Arc<tun::ServerTun>>,
    pub port_routes: Arc<port_routes::PortRoutes>,
    pub assist: Mutex<HashMap<String, assist::AssistHandle>>,
    pub profiles: Mutex<HashMap<String, crate::status::ProfileStatus>>,
    pub conns: Mutex<HashMap<u64, Arc<tcp_conn::ConnRecord>>>,
    /// Per site: what its last steered connection showed (predicts the next one's step 1), and
    /// when timed steps last failed there (they are then left out for a while).
    pub steer_hints: Mutex<HashMap<String, tcp_strategy::SteerHint>>,
    pub timing_failed: cooldown::Cooldown<String>,
    /// Per (site, strategy label): a connection of that strategy failed after its handshake
    /// (the camera never answered through the NAT); connections skip it for a while.
    pub strategy_failed: cooldown::Cooldown<(String, String)>,
    /// Per site: the WAN round trip its last direct connection measured (sizes the windows).
    pub site_rtt: Mutex<HashMap<String, std::time::Duration>>,
    /// Receive buffers of all open direct connections (`DIRECT_WINDOWS_TOTAL`).
    pub windows: byte_budget::ByteBudget,
    /// One permit per TCP client being served, of all exposures (`max_tcp_clients`).
    pub tcp_clients: Arc<tokio::sync::Semaphore>,
    /// When a refused TCP client is logged (`tcp_expose::REFUSAL_LOG_EVERY`): one throttle for
    /// `max_tcp_clients`, one for the overload guard.
    pub refusals: Mutex<crate::rate_limit::LogThrottle>,
    pub refusals_overloaded: Mutex<crate::rate_limit::LogThrottle>,
    /// Whether the server is dropping camera packets now (fed by the stack's tick, only with
    /// `overload_guard`).
    pub overload: Mutex<overload::OverloadGuard>,
    /// Per-camera addresses inside the userspace stack (never on the wire).
    virt: Mutex<HashMap<(String, String), std::net::Ipv4Addr>>,
}

/// Camera addresses inside the userspace stack come from here; they never appear on any wire.
pub const VIRTUAL_BASE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 19, 128, 1);
pub const VIRTUAL_COUNT: u32 = 32_000;

impl Shared {
    pub fn new(cfg: ServerConfig, registry: RegistryStore) -> Self {
        Shared {
            registry: Mutex::new(registry),
            sessions: Mutex::new(HashMap::new()),
            stats: ControlStats::default(),
            started: Instant::now(),
            next_id: AtomicU64::new(1),
            tun: std::sync::OnceLock::new(),
            port_routes: Arc::new(port_routes::PortRoutes::default()),
            assist: Mutex::new(HashMap::new()),
            profiles: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            steer_hints: Mutex::new(HashMap::new()),
            timing_failed: cooldown::Cooldown::new(tcp_expose::FAILURE_BACKOFF),
            strategy_failed: cooldown::Cooldown::new(tcp_expose::FAILURE_BACKOFF),
            site_rtt: Mutex::new(HashMap::new()),
            windows: byte_budget::ByteBudget::new(tcp_expose::DIRECT_WINDOWS_TOTAL),
            tcp_clients: Arc::new(tokio::sync::Semaphore::new(cfg.max_tcp_clients)),
            refusals: Mutex::new(crate::rate_limit::LogThrottle::new(tcp_expose::REFUSAL_LOG_EVERY)),
            refusals_overloaded: Mutex::new(crate::rate_limit::LogThrottle::new(tcp_expose::REFUSAL_LOG_EVERY)),
            overload: Mutex::new(overload::OverloadGuard::default()),
            virt: Mutex::new(HashMap::new()),
            cfg,
        }
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The public address of a site's NAT, as the trigger's control link arrives from it.
    pub fn nat_ip(&self, site: &str) -> Option<std::net::Ipv4Addr> {
        match self.sessions.lock().unwrap().get(site)?.public.ip() {
            std::net::IpAddr::V4(ip) => Some(ip),
            std::net::IpAddr::V6(_) => None,
        }
    }

    pub fn tun(&self) -> &tun::ServerTun {
        self.tun.get().expect("TUN is set before any connection starts")
    }

    /// The virtual address of `site/camera` inside the userspace stack (stable while running).
    pub fn virt_addr(&self, site: &str, camera: &str) -> std::net::Ipv4Addr {
        let mut v = self.virt.lock().unwrap();
        let n = v.len() as u32 % VIRTUAL_COUNT;
        *v.entry((site.to_string(), camera.to_string())).or_insert_with(|| (u32::from(VIRTUAL_BASE) + n).into())
    }

    /// What a site's direct connection that came up showed about its path: the steering hint
    /// (predicts the next connection's step 1) and the WAN round trip (sizes windows, decides
    /// whether timing pays).
    pub fn learn_from(&self, site: &str, attempt: &tcp_strategy::Attempt) {
        let mut hints = self.steer_hints.lock().unwrap();
        let hint = hints.get(site).copied().unwrap_or_default();
        if let Some(learned) = hint.learn(attempt) {
            hints.insert(site.to_string(), learned);
        }
        drop(hints);
        if let Some(rtt) = attempt.rtt {
            self.site_rtt.lock().unwrap().insert(site.to_string(), rtt);
        }
    }

    /// What on-demand steered connections of `site` time (see `tcp_strategy::Pipelining`).
    fn timed_steps_summary(&self, site: &str, profile: Option<&ProfileStatus>, nat: Option<std::net::Ipv4Addr>) -> Option<String> {
        if let Some((since, left)) = self.timing_failed.left_out(site, Instant::now()) {
            return Some(format!("none for {} s more (they failed {} s ago)", left.as_secs() + 1, since.as_secs()));
        }
        let rtt = self.site_rtt.lock().unwrap().get(site).copied();
        if let Some(r) = rtt.filter(|_| !tcp_strategy::timing_pays(rtt)) {
            let (rtt, lead) = (r.as_secs_f64() * 1e3, tcp_strategy::STEER_LEAD.as_millis());
            return Some(format!("none (the WAN round trip, {rtt:.1} ms, is not longer than the {lead} ms lead: nothing to save)"));
        }
        let hint = *self.steer_hints.lock().unwrap().get(site)?;
        // What the site's first direct strategy would be predicted with (any camera port will do).
        let first = profile?.direct_order.first().and_then(|l| tcp_strategy::Strategy::from_label(l))?;
        if !matches!(first, tcp_strategy::Strategy::SteeredResync(_)) {
            return None; // only steered-resync has steps to time
        }
        let nat = nat?;
        let probe = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 1);
        Some(match hint.predict(first, nat, probe) {
            Some(_) => "steps 2+3 and 4 (the NAT kept the port at the last steered connection: the mapping is predicted)".into(),
            None if hint.port_preserved => "step 4 (no steering TTL known yet for the mapping's prediction)".into(),
            None => "step 4 (the NAT changed the port at the last steered connection)".into(),
        })
    }

    /// Sites, cameras and control counters; mappings come from the stack.
    fn status(&self, stack: stack::StackSnapshot) -> StatusDoc {
        let reg = self.registry.lock().unwrap();
        let sessions = self.sessions.lock().unwrap();
        let sites = self
            .cfg
            .sites
            .iter()
            .map(|s| {
                let rec = reg.registry.sites.get(&s.name);
                let sess = sessions.get(&s.name);
                let profile = self.profiles.lock().unwrap().get(&s.name).cloned();
                let nat = sess.and_then(|x| match x.public.ip() {
                    std::net::IpAddr::V4(ip) => Some(ip),
                    std::net::IpAddr::V6(_) => None,
                });
                let timed_steps = self.timed_steps_summary(&s.name, profile.as_ref(), nat);
                SiteStatus {
                    name: s.name.clone(),
                    connected: sess.is_some(),
                    trigger_public: sess.map(|x| x.public.to_string()).or_else(|| rec.and_then(|r| r.trigger_public.clone())),
                    connected_secs: sess.map(|x| x.since.elapsed().as_secs()),
                    assist_link: self.assist.lock().unwrap().contains_key(&s.name),
                    last_registered_unix: rec.and_then(|r| r.last_registered_unix),
                    cameras: rec
                        .map(|r| {
                            r.cameras
                                .iter()
                                .map(|c| CameraStatus {
                                    name: c.name.clone(),
                                    ip: c.ip.to_string(),
                                    device_type: c.device_type.clone(),
                                    services: c.services.iter().map(|s| s.to_string()).collect(),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    profile,
                    timed_steps,
                }
            })
            .collect();
        let mut connections: Vec<_> = self.conns.lock().unwrap().values().map(|c| c.status()).collect();
        connections.sort_by_key(|c| c.id);
        let open_bytes =
            |path: &str| connections.iter().filter(|c| c.path == path).map(|c| c.bytes_to_camera + c.bytes_from_camera).sum::<u64>();
        let (open_direct, open_assisted) = (open_bytes("direct"), open_bytes("assisted"));
        let st = &self.stats;
        let t = stack.counters;
        StatusDoc {
            version: env!("CARGO_PKG_VERSION").into(),
            public_ip: self.cfg.public_ip.to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            keepalive_secs: self.cfg.keepalive_secs,
            overloaded: self.overload.lock().unwrap().overloaded(Instant::now()),
            sites,
            mappings: stack.mappings,
            connections,
            counters: Counters {
                tcp_connections_direct: st.tcp_connections_direct.load(Ordering::Relaxed),
                tcp_connections_warm: st.tcp_connections_warm.load(Ordering::Relaxed),
                tcp_connections_assisted: st.tcp_connections_assisted.load(Ordering::Relaxed),
                tcp_connections_failed: st.tcp_connections_failed.load(Ordering::Relaxed),
                tcp_direct_fallbacks: st.tcp_direct_fallbacks.load(Ordering::Relaxed),
                tcp_windows_grown: st.tcp_windows_grown.load(Ordering::Relaxed),
                tcp_clients_refused: st.tcp_clients_refused.load(Ordering::Relaxed),
                tcp_clients_refused_overloaded: st.tcp_clients_refused_overloaded.load(Ordering::Relaxed),
                tcp_bytes_direct: st.tcp_bytes_direct_closed.load(Ordering::Relaxed) + open_direct,
                tcp_bytes_assisted: st.tcp_bytes_assisted_closed.load(Ordering::Relaxed) + open_assisted,
                indications_sent: st.indications_sent.load(Ordering::Relaxed),
                indication_errors: st.indication_errors.load(Ordering::Relaxed),
                trigger_packets_injected: st.trigger_packets_injected.load(Ordering::Relaxed),
                bytes_injected_by_triggers: st.bytes_injected_by_triggers.load(Ordering::Relaxed),
                bytes_direct_to_cameras: stack.bytes_to_cameras,
                bytes_direct_from_cameras: stack.bytes_from_cameras,
                flows_created: t.flows_created,
                mappings_learned: t.mappings_learned,
                mappings_dropped: t.mappings_dropped,
                retriggers: t.retriggers,
                unsolicited_datagrams: t.unsolicited_datagrams,
                dropped_client_datagrams: t.dropped_client_datagrams + stack.client_drops,
                auth_failures: st.auth_failures.load(Ordering::Relaxed),
                bad_frames: st.bad_frames.load(Ordering::Relaxed),
                camera_packets_dropped: self.port_routes.dropped_packets(),
            },
        }
    }
}

/// Run the server until SIGINT/SIGTERM.
pub async fn run(cfg: ServerConfig) -> Result<()> {
    crate::tls::install_crypto_provider();
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| format!("creating state_dir {}", cfg.state_dir.display()))?;
    let (cert, key) = match &cfg.tls {
        Some(t) => (t.cert.clone(), t.key.clone()),
        None => crate::tls::ensure_dev_material(&cfg.state_dir)?,
    };
    let tls = crate::tls::server_config(&cert, &key)?;
    let registry = RegistryStore::open(&cfg.state_dir)?;
    tracing::info!(sites = registry.registry.sites.len(), "registry loaded from {}", cfg.state_dir.display());

    // Host side of public_ip: forwarding on, the route into our TUN, proxy ARP on the WAN.
    let mut sysctls = SysctlGuard::default();
    sysctls.ensure("net.ipv4.ip_forward", "1")?;
    // The TUN reader gets an OS thread and a runtime of its own (`stack_thread`), and the TUN is
    // registered with that runtime's I/O driver, so that it is woken by its own thread.
    let stack_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the TUN reader's runtime")?;
    let tun = {
        let _in_stack_rt = stack_rt.enter();
        tun::ServerTun::create(&cfg.tun_name)?
    };
    let public = format!("{}/32", cfg.public_ip);
    hostnet::ip(&["route", "replace", &public, "dev", &cfg.tun_name]).context("routing public_ip into the TUN")?;
    let _proxy = match &cfg.wan_interface {
        Some(wan) => {
            // Proxy-ARP replies are otherwise delayed by up to 0.8 s (proxy_delay), which would
            // add to the first answer of every camera whose NAT has no ARP entry yet.
            sysctls.ensure(&format!("net.ipv4.neigh.{wan}.proxy_delay"), "0")?;
            Some(ProxyArp::add(cfg.public_ip.to_string(), wan.clone())?)
        }
        None => None,
    };

    let shared = Arc::new(Shared::new(cfg.clone(), registry));
    let tun = Arc::new(tun);
    let _ = shared.tun.set(tun.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (engine_tx, engine_rx) = mpsc::channel(4096);

    let exposes = expose::bind_all(&cfg, engine_tx.clone(), shutdown_rx.clone()).await?;
    let warm_tasks = tcp_expose::bind_all(&shared, shutdown_rx.clone()).await?;
    let control = tokio::net::TcpListener::bind(cfg.control_listen)
        .await
        .with_context(|| format!("binding control_listen {} (is the address on this host?)", cfg.control_listen))?;
    let admin =
        tokio::net::TcpListener::bind(cfg.admin_listen).await.with_context(|| format!("binding admin_listen {}", cfg.admin_listen))?;

    let stack = stack::Stack::new(shared.clone(), tun, exposes);
    let stack_task = stack_thread(stack_rt, stack.run(engine_rx, shutdown_rx.clone()))?;
    let accept_task = tokio::spawn(accept::run(shared.clone(), control, tls, shutdown_rx.clone()));
    let admin_task = tokio::spawn(admin::run(shared.clone(), engine_tx.clone(), admin, shutdown_rx.clone()));
    tracing::info!(control = %cfg.control_listen, public_ip = %cfg.public_ip, admin = %cfg.admin_listen,
        keepalive_secs = cfg.keepalive_secs, "server running");

    // The data path runs on its own thread: if it ends before a signal (a panic there), the
    // server must not stay up with its control links open and no data path. Exit with an error
    // (the service manager restarts it) instead.
    let mut stack_task = stack_task;
    let stack_died = tokio::select! {
        _ = crate::signals::wait() => false,
        _ = &mut stack_task => true,
    };
    tracing::info!("shutting down");
    if stack_died {
        tracing::error!("the data path (TUN thread) stopped unexpectedly; exiting");
    }
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), async {
        if !stack_died {
            let _ = stack_task.await;
        }
        let _ = accept_task.await;
        let _ = admin_task.await;
        for t in warm_tasks {
            let _ = t.await;
        }
    })
    .await;
    if stack_died {
        anyhow::bail!("the data path (TUN thread) stopped unexpectedly (see the log above)");
    }
    // Dropping the TUN (inside the stack) removes its route; guards undo the rest.
    Ok(())
}

/// Run the stack (the TUN reader) on its own OS thread, in its own single-threaded runtime.
/// Why: as one task among the shards on the shared runtime, the reader waited behind every
/// shard woken by the last burst; with 1,400 paced streams that wait outlasted the kernel's
/// queue in front of the TUN (then 1,000 packets; `tun::TX_QUEUE_LEN`), the kernel dropped
/// packets, and the cameras' retransmissions made it worse until every stream stalled. A thread
/// of its own is scheduled by the kernel as soon as the TUN has data. Returns when the stack ends.
fn stack_thread(
    rt: tokio::runtime::Runtime,
    run: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::sync::oneshot::Receiver<()>> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("beckon-tun".into())
        .spawn(move || {
            rt.block_on(run);
            let _ = done_tx.send(());
        })
        .context("starting the TUN reader's thread")?;
    Ok(done_rx)
}

/// `ip neigh add proxy PUBLIC_IP dev WAN`, removed on drop: the server host answers ARP for
/// public_ip on the WAN and forwards what arrives into the TUN.
struct ProxyArp {
    ip: String,
    dev: String,
}

impl ProxyArp {
    fn add(ip: String, dev: String) -> Result<Self> {
        hostnet::ip(&["neigh", "replace", "proxy", &ip, "dev", &dev])
            .with_context(|| format!("adding the proxy-ARP entry for public_ip on wan_interface {dev:?}"))?;
        tracing::info!(ip = %ip, dev = %dev, "proxy ARP entry added");
        Ok(ProxyArp { ip, dev })
    }
}

impl Drop for ProxyArp {
    fn drop(&mut self) {
        match hostnet::ip(&["neigh", "del", "proxy", &self.ip, "dev", &self.dev]) {
            Ok(_) => tracing::info!(ip = %self.ip, "proxy ARP entry removed"),
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
}
