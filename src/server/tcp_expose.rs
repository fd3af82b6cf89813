//! TCP exposures: every platform-client connection gets its own camera connection, direct
//! through the site's NAT when the site profile found a strategy that works, otherwise (or when
//! the direct attempt fails) trigger-assisted. Bytes are spliced both ways with backpressure;
//! half-close and reset are propagated; everything is freed on close.

use super::tcp_conn::{ConnRecord, DirectParams, Shard};
use super::tcp_strategy::{timing_pays, Pipelining, Strategy, STEER_LEAD};
use super::Shared;
use crate::catalog::Proto;
use crate::config::ExposeConfig;
use anyhow::{Context, Result};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Direct attempt budget before falling back to the assisted path.
pub const DIRECT_TIMEOUT: Duration = Duration::from_secs(3);
/// smoltcp receive buffer per direct connection, which is also the largest window the camera
/// may fill: sized from the site's WAN round trip (plus [`SERVICE_LATENCY`]) so that one
/// connection can carry the exposure's `rate_mbit` (a window of W bytes carries at most W per
/// round trip), between these bounds. The floor is what a LAN-like path needs for ≈ 1 GB/s on
/// a busy host ([`SERVICE_LATENCY`]); at 40 ms and the default 128 Mbit/s (672 KB) it is the
/// floor too. A large ring costs memory only where the client falls behind: smoltcp is patched
/// (vendor/smoltcp/BECKON-PATCH.md) so that a drained ring starts again at its front, and a
/// connection whose client keeps up touches only its first pages.
pub const DIRECT_BUFFER_FLOOR: usize = 2 * 1024 * 1024;
pub const DIRECT_BUFFER_MAX: usize = 16 * 1024 * 1024;
/// Receive buffers of all open direct connections together: beyond this, new connections get
/// `DIRECT_BUFFER` whatever their path. A ring is resident whole while its client falls
/// behind (a bulk download to a slow client); this keeps the sum bounded however many clients
/// come and whatever `rate_mbit` says.
pub const DIRECT_WINDOWS_TOTAL: usize = 2 * 1024 * 1024 * 1024;
/// The receive buffer of a direct connection opened while [`DIRECT_WINDOWS_TOTAL`] is taken.
pub const DIRECT_BUFFER: usize = 256 * 1024;
/// smoltcp send buffer (towards the camera: requests and RTSP control, rarely bulk).
pub const DIRECT_TX_BUFFER: usize = 64 * 1024;
/// After timed steered-resync steps failed at a site, its connections go step by step for this
/// long; after a connection failed past its handshake, the site's connections skip its strategy
/// for this long.
pub const FAILURE_BACKOFF: Duration = Duration::from_secs(600);
/// A refused client (for `max_tcp_clients`, or by the overload guard) is logged at most once
/// per this and reason (a flood of clients must not flood the log); each line counts the
/// refusals since the one before.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long a busy host may keep beckon from a connection's received data. The window has to
/// cover this as well as the path: while the shard waits for a core, the camera keeps sending
/// only as long as the window lasts. Measured on the 2-core lab box with a LAN-like path
/// (0.07 ms), cameras sending with BBR: 1.4-1.5 GB/s bulk needed ≈ 2 MB of window; with 256 KiB
/// the camera stalled on window updates (1.8× as many ACKs written, ≈ 20 % less throughput,
/// `scripts/bench.sh`). With cubic cameras (1.9 GB/s) windows grow to 16 MiB either way.
pub const SERVICE_LATENCY: Duration = Duration::from_millis(2);

/// The receive buffer for a direct connection that should carry `rate` bytes/s over a path with
/// round trip `rtt` (unknown: none) on a busy host.
pub fn path_buffer(rtt: Option<Duration>, rate: f64) -> usize {
    let want = ((rtt.unwrap_or_default() + SERVICE_LATENCY).as_secs_f64() * rate) as usize;
    want.clamp(DIRECT_BUFFER_FLOOR, DIRECT_BUFFER_MAX)
}

/// Bind every TCP exposure; returns the tasks keeping pre-opened connections (awaited at
/// shutdown: they reset their connections).
pub async fn bind_all(shared: &Arc<Shared>, shutdown: watch::Receiver<bool>) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut warm_tasks = Vec::new();
    for (i, e) in shared.cfg.exposes.iter().enumerate() {
        if e.proto != Proto::Tcp {
            continue;
        }
        let l = TcpListener::bind(e.listen).await.with_context(|| format!("expose[{i}] ({}): binding tcp {}", e.camera, e.listen))?;
        tracing::info!(camera = %e.camera, service = %e.service(), listen = %e.listen, warm = e.warm, "exposure ready");
        let pool = Arc::new(WarmPool::default());
        if e.warm > 0 {
            warm_tasks.push(tokio::spawn(warm_loop(shared.clone(), e.clone(), pool.clone(), shutdown.clone())));
        }
        tokio::spawn(accept_loop(shared.clone(), e.clone(), l, pool, shutdown.clone()));
    }
    Ok(warm_tasks)
}

async fn accept_loop(shared: Arc<Shared>, e: ExposeConfig, l: TcpListener, pool: Arc<WarmPool>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (client, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(err) => { tracing::warn!("accept on {}: {err}", e.listen); tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            },
            _ = shutdown.changed() => return,
        };
        if shared.overload.lock().unwrap().overloaded(Instant::now()) {
            refuse(&shared, &e, &client, peer, Refusal::Overloaded);
            continue;
        }
        let Ok(permit) = shared.tcp_clients.clone().try_acquire_owned() else {
            refuse(&shared, &e, &client, peer, Refusal::Full);
            continue;
        };
        let shared = shared.clone();
        let e = e.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            let _permit = permit;
            handle(shared, e, pool, client, peer).await;
        });
    }
}

/// Why a TCP client is turned away.
#[derive(Clone, Copy)]
enum Refusal {
    /// `max_tcp_clients` are being served.
    Full,
    /// The server is dropping camera packets (`overload_guard`, [`super::overload`]).
    Overloaded,
}

/// Turn a client away: with a reset, so that it cannot take an empty answer for a complete one
/// (the socket is closed as `client` drops).
fn refuse(shared: &Shared, e: &ExposeConfig, client: &TcpStream, peer: SocketAddr, why: Refusal) {
    let (counter, log) = match why {
        Refusal::Full => (&shared.stats.tcp_clients_refused, &shared.refusals),
        Refusal::Overloaded => (&shared.stats.tcp_clients_refused_overloaded, &shared.refusals_overloaded),
    };
    counter.fetch_add(1, Ordering::Relaxed);
    crate::splice::reset_on_drop(client);
    let logged = log.lock().unwrap().hit(Instant::now());
    if let Some(refused) = logged {
        match why {
            Refusal::Full => tracing::warn!(
                listen = %e.listen,
                %peer,
                refused,
                max_tcp_clients = shared.cfg.max_tcp_clients,
                "TCP client refused (reset): max_tcp_clients are being served"
            ),
            Refusal::Overloaded => tracing::warn!(
                listen = %e.listen,
                %peer,
                refused,
                "TCP client refused (reset): the server is overloaded (it is dropping camera packets)"
            ),
        }
    }
}

/// The camera a client of `e` reaches, if its trigger reported it with this service.
fn camera_of(shared: &Shared, e: &ExposeConfig) -> Result<SocketAddrV4, &'static str> {
    let reg = shared.registry.lock().unwrap();
    let cam = reg.registry.camera(e.site(), e.camera_name()).ok_or("camera not reported by its trigger (yet)")?;
    if !cam.services.contains(&e.service()) {
        return Err("the camera's report does not list this service");
    }
    Ok(SocketAddrV4::new(cam.ip, e.port))
}

/// Open a direct connection with the site profile's working strategies, cheapest first; each
/// failure moves on to the next (e.g. the other steering method). `Err` carries why each
/// failed, or why none was tried.
async fn connect_direct(
    shared: &Arc<Shared>,
    e: &ExposeConfig,
    camera: SocketAddrV4,
    record: &Arc<ConnRecord>,
    pre_opening: bool,
) -> Result<(Shard, Strategy, Vec<String>), Vec<String>> {
    let site = e.site();
    let profile = shared.profiles.lock().unwrap().get(site).map(|p| (p.direct_order.clone(), p.summary.clone()));
    let order = match profile {
        None => return Err(vec!["no site profile yet".to_string()]),
        Some((order, summary)) if order.is_empty() => return Err(vec![summary]),
        Some((order, _)) => order,
    };
    let mut failures = Vec::new();
    let site_rtt = shared.site_rtt.lock().unwrap().get(site).copied();
    let mut rx_buffer = path_buffer(site_rtt, e.rate_bytes());
    if !shared.windows.fits(rx_buffer) {
        rx_buffer = DIRECT_BUFFER;
    }
    for strategy in order.iter().filter_map(|l| Strategy::from_label(l)) {
        if shared.strategy_failed.is_left_out(&(site.to_string(), strategy.label()), Instant::now()) {
            failures.push(format!("{} skipped: a connection with it failed after its handshake lately", strategy.label()));
            continue;
        }
        // Timed steps only where a client waits (pre-opening has time), where the path is long
        // enough for them to save time, and not for a while after they failed at this site
        // (also earlier in this same connection).
        let timing_ok = !pre_opening && timing_pays(site_rtt) && !shared.timing_failed.is_left_out(site, Instant::now());
        let mut pipelining = timing_ok.then(|| {
            let hint = shared.steer_hints.lock().unwrap().get(site).copied();
            let predicted = hint.zip(shared.nat_ip(site)).and_then(|(h, nat)| h.predict(strategy, nat, camera));
            Pipelining { lead: STEER_LEAD, predicted }
        });
        loop {
            let params = DirectParams {
                strategy,
                site: site.to_string(),
                camera,
                virt: shared.virt_addr(site, e.camera_name()),
                timeout: DIRECT_TIMEOUT,
                rx_buffer,
                rx_buffer_max: DIRECT_BUFFER_MAX,
                site_rtt,
                tx_buffer: DIRECT_TX_BUFFER,
                keepalive: shared.cfg.keepalive(),
                pipelining,
            };
            match Shard::connect(shared.clone(), params, record.clone()).await {
                Ok(shard) => return Ok((shard, strategy, failures)),
                Err(f) if f.timed => {
                    // The timing or the prediction did not hold here: step by step at once, and
                    // no timed steps at this site for a while.
                    tracing::warn!(camera = %e.camera, strategy = %strategy.label(), "timed steps failed ({f}); retrying step by step");
                    shared.timing_failed.failed(site.to_string(), Instant::now());
                    failures.push(format!("{} with timed steps failed: {f}", strategy.label()));
                    pipelining = None;
                }
                Err(f) => {
                    if pre_opening {
                        // No client is waiting: not a fallback, and the pool retries on its own.
                        tracing::debug!(camera = %e.camera, strategy = %strategy.label(), "pre-opening attempt failed: {f}");
                    } else {
                        shared.stats.tcp_direct_fallbacks.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(camera = %e.camera, client = %record.client, strategy = %strategy.label(), "direct attempt failed: {f}");
                    }
                    failures.push(format!("{} failed: {f}", strategy.label()));
                    break;
                }
            }
        }
    }
    Err(failures)
}

async fn handle(shared: Arc<Shared>, e: ExposeConfig, pool: Arc<WarmPool>, client: TcpStream, peer: SocketAddr) {
    let _ = client.set_nodelay(true);
    let camera = match camera_of(&shared, &e) {
        Ok(c) => c,
        Err(why) => {
            tracing::warn!(camera = %e.camera, client = %peer, "connection closed: {why}");
            return;
        }
    };
    let record = Arc::new(ConnRecord::new(shared.next_id(), e.camera.clone(), e.service().to_string(), peer.to_string()));
    shared.conns.lock().unwrap().insert(record.id, record.clone());
    let t0 = Instant::now();
    let site = e.site().to_string();

    let (direct, note) = match pool.take(camera).await {
        Some((mut shard, strategy)) => {
            pool.refill.notify_one();
            shard.adopt(record.clone());
            (Some((shard, strategy, Vec::new(), true)), None)
        }
        None => match connect_direct(&shared, &e, camera, &record, false).await {
            Ok((shard, strategy, failures)) => (Some((shard, strategy, failures, false)), None),
            Err(why) => (None, Some(why.join("; "))),
        },
    };
    if let Some((shard, strategy, failures, warm)) = direct {
        let setup = t0.elapsed().as_millis() as u64;
        let public = shard.attempt.public.map(|p| p.to_string());
        let round_trips = if warm { 0 } else { shard.attempt.round_trips };
        let timed_steps = if warm { 0 } else { shard.attempt.timed_steps() };
        {
            let mut i = record.info.lock().unwrap();
            i.path = "direct".into();
            i.strategy = Some(strategy);
            i.public = public.clone();
            i.setup_ms = Some(setup);
            i.round_trips = round_trips;
            i.timed_steps = timed_steps;
            i.warm = warm;
            i.note = (!failures.is_empty()).then(|| failures.join("; "));
        }
        shared.stats.tcp_connections_direct.fetch_add(1, Ordering::Relaxed);
        if warm {
            shared.stats.tcp_connections_warm.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(camera = %e.camera, client = %peer, strategy = %strategy.label(), public = public.as_deref().unwrap_or("-"),
            setup_ms = setup, round_trips, timed_steps, window_kib = shard.window() / 1024, warm, trigger_packets = record.trigger_packets.load(Ordering::Relaxed), "direct TCP connection up");
        shard.splice(client).await;
        finish(&shared, &record, true);
        return;
    }

    // Right after a (re)registration the assist link may still be on its way: wait briefly.
    let mut handle = shared.assist.lock().unwrap().get(&site).cloned();
    for _ in 0..30 {
        if handle.is_some() || !shared.sessions.lock().unwrap().contains_key(&site) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        handle = shared.assist.lock().unwrap().get(&site).cloned();
    }
    let opened = match handle {
        Some(h) => h.open(camera).await,
        None => Err(format!("the trigger of site {site:?} has no assist link")),
    };
    match opened {
        Ok((stream, leftover)) => {
            let setup = t0.elapsed().as_millis() as u64;
            {
                let mut i = record.info.lock().unwrap();
                i.path = "assisted".into();
                i.setup_ms = Some(setup);
                i.note = note;
            }
            shared.stats.tcp_connections_assisted.fetch_add(1, Ordering::Relaxed);
            tracing::info!(camera = %e.camera, client = %peer, setup_ms = setup, "assisted TCP connection up (bytes relayed by the trigger)");
            crate::splice::relay(client, stream, leftover, &record.to_camera, &record.from_camera).await;
            finish(&shared, &record, false);
        }
        Err(why) => {
            shared.stats.tcp_connections_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(camera = %e.camera, client = %peer, "cannot reach the camera: {why}");
            crate::splice::reset_on_drop(&client); // the client sees the failure at once
            shared.conns.lock().unwrap().remove(&record.id);
        }
    }
}

fn finish(shared: &Shared, record: &ConnRecord, direct: bool) {
    let bytes = record.to_camera.load(Ordering::Relaxed) + record.from_camera.load(Ordering::Relaxed);
    let c = if direct { &shared.stats.tcp_bytes_direct_closed } else { &shared.stats.tcp_bytes_assisted_closed };
    c.fetch_add(bytes, Ordering::Relaxed);
    shared.conns.lock().unwrap().remove(&record.id);
    tracing::info!(camera = %record.camera, client = %record.client, to_camera = record.to_camera.load(Ordering::Relaxed),
        from_camera = record.from_camera.load(Ordering::Relaxed), secs = record.started.elapsed().as_secs(), "TCP connection closed");
}

/// How long a pre-opened connection may wait for a client: shorter than the idle limits servers
/// put on a connection that has not sent its request yet (Apache's `mod_reqtimeout` allows
/// 20 s). Its replacement is opened from `WARM_RENEW_AT` on, so the pool does not run empty.
const WARM_MAX_AGE: Duration = Duration::from_secs(15);
const WARM_RENEW_AT: Duration = Duration::from_secs(12);
/// How long a camera gets to answer the FIN of an unused connection before it is reset.
const WARM_CLOSE: Duration = Duration::from_secs(2);

/// Pre-opened direct connections of one exposure (`warm = N`), freshest last.
#[derive(Default)]
pub struct WarmPool {
    idle: std::sync::Mutex<std::collections::VecDeque<Warm>>,
    refill: tokio::sync::Notify,
}

struct Warm {
    shard: Shard,
    strategy: Strategy,
    camera: SocketAddrV4,
    opened: Instant,
}

impl WarmPool {
    /// The freshest pre-opened connection to `camera` that is still open, if any.
    async fn take(&self, camera: SocketAddrV4) -> Option<(Shard, Strategy)> {
        loop {
            let w = self.idle.lock().unwrap().pop_back()?;
            if w.camera != camera || w.opened.elapsed() >= WARM_MAX_AGE {
                tokio::spawn(w.shard.close_unused(WARM_CLOSE));
                continue;
            }
            let mut shard = w.shard;
            if shard.still_open().await {
                return Some((shard, w.strategy));
            }
            tracing::info!(camera = %camera, "pre-opened connection was closed by the camera; discarded");
            tokio::spawn(shard.close_unused(WARM_CLOSE)); // answer its FIN: the camera frees it now
        }
    }

    /// Connections that need no replacement yet.
    fn fresh(&self) -> usize {
        self.idle.lock().unwrap().iter().filter(|w| w.opened.elapsed() < WARM_RENEW_AT).count()
    }

    /// Remove the connections that waited too long.
    fn expired(&self) -> Vec<Shard> {
        let mut idle = self.idle.lock().unwrap();
        let (old, fresh): (Vec<Warm>, Vec<Warm>) = idle.drain(..).partition(|w| w.opened.elapsed() >= WARM_MAX_AGE);
        idle.extend(fresh);
        old.into_iter().map(|w| w.shard).collect()
    }

    fn drain(&self) -> Vec<Shard> {
        self.idle.lock().unwrap().drain(..).map(|w| w.shard).collect()
    }
}

/// Keep `e.warm` direct connections pre-opened: open replacements before the old ones expire,
/// refill after a client took one, and back off while the direct path cannot work (no profile
/// yet, camera not reported, trigger offline, attempts failing). On shutdown the pooled
/// connections are reset, so cameras do not keep them.
async fn warm_loop(shared: Arc<Shared>, e: ExposeConfig, pool: Arc<WarmPool>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::ZERO;
    loop {
        for shard in pool.expired() {
            tokio::spawn(shard.close_unused(WARM_CLOSE));
        }
        let wait = if pool.fresh() >= e.warm || backoff > Duration::ZERO {
            backoff.max(Duration::from_secs(1))
        } else {
            let trigger_online = shared.sessions.lock().unwrap().contains_key(e.site());
            match camera_of(&shared, &e) {
                Ok(camera) if trigger_online => {
                    let record = Arc::new(ConnRecord::new(0, e.camera.clone(), e.service().to_string(), "(pre-opened)".into()));
                    let opened = tokio::select! {
                        r = connect_direct(&shared, &e, camera, &record, true) => r,
                        _ = shutdown.changed() => break,
                    };
                    match opened {
                        Ok((shard, strategy, _)) => {
                            tracing::debug!(camera = %e.camera, "direct connection pre-opened");
                            pool.idle.lock().unwrap().push_back(Warm { shard, strategy, camera, opened: Instant::now() });
                        }
                        Err(why) => {
                            tracing::debug!(camera = %e.camera, "pre-opening a direct connection: {}", why.join("; "));
                            backoff = Duration::from_secs(5);
                        }
                    }
                }
                _ => backoff = Duration::from_secs(2),
            }
            continue;
        };
        tokio::select! {
            _ = pool.refill.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => break,
        }
        backoff = Duration::ZERO;
    }
    for shard in pool.drain() {
        shard.reset().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_carries_the_rate_over_the_path_within_bounds() {
        let rate = 128e6 / 8.0;
        assert_eq!(path_buffer(None, rate), DIRECT_BUFFER_FLOOR);
        assert_eq!(path_buffer(Some(Duration::from_micros(70)), rate), DIRECT_BUFFER_FLOOR);
        assert_eq!(path_buffer(Some(Duration::from_millis(40)), rate), DIRECT_BUFFER_FLOOR);
        assert_eq!(path_buffer(Some(Duration::from_millis(200)), rate), 3_232_000);
        assert_eq!(path_buffer(Some(Duration::from_secs(2)), rate), DIRECT_BUFFER_MAX);
        assert_eq!(path_buffer(Some(Duration::from_millis(40)), 1e9), DIRECT_BUFFER_MAX);
        // A fast exposure on a LAN-like path: the window covers the host's service latency.
        let fast = 10_000e6 / 8.0;
        assert_eq!(path_buffer(None, fast), 2_500_000);
        assert!((2_587_000..=2_588_000).contains(&path_buffer(Some(Duration::from_micros(70)), fast)));
    }
}
