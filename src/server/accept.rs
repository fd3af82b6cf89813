//! First connection module (patent S1/S2, S3/S4): accepts triggers on the TLS control link,
//! authenticates them per site, records their reports, and carries indications to them.

use super::{Shared, SiteSession};
use crate::link::{write_frame, FrameReader, LinkError};
use crate::wire::control::{CameraReport, ErrorCode, Message, MAX_CAMERAS, MAX_NAME, MAX_SERVICES};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

/// Most control links at once (each is a trigger or someone pretending to be one).
pub const MAX_LINKS: usize = 1024;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Triggers ping every 5 s; a link silent for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Frames queued towards one trigger.
pub const OUT_QUEUE: usize = 256;
/// Frames a trigger may send per second (sustained / burst): pings, reports and one result per
/// indication the server sent stay far below; a flood closes the link.
pub const FRAMES_PER_SEC: u32 = 2500;
pub const FRAME_BURST: u32 = 5000;
/// A trigger reports once per link; a second `report` on the same link this soon closes it.
/// Why: every report is written to disk (fsync) and, with a probe, starts a measurement of the
/// site's NAT that takes server ports for seconds: a trigger sending reports in a loop would
/// take ports and disk time from every other site.
pub const REPORT_MIN_INTERVAL: Duration = Duration::from_secs(10);

pub async fn run(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let limit = Arc::new(Semaphore::new(MAX_LINKS));
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { tracing::warn!("control accept: {e}"); tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "control link refused: {MAX_LINKS} links open");
            continue;
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            watch_liveness(&tcp);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%peer, "control link: TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "control link: TLS handshake timed out");
                    return;
                }
            };
            session(shared, tls, peer, shutdown).await;
        });
    }
}

/// TCP keepalive of a trigger's link: idle this long, then probes this often, this many.
const LINK_KEEPALIVE_IDLE: Duration = Duration::from_secs(20);
const LINK_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const LINK_KEEPALIVE_PROBES: u32 = 3;
/// A link whose sent data stays unacknowledged this long is closed (`TCP_USER_TIMEOUT`). With
/// keepalive on, Linux also takes it as the limit for unanswered probes: the silence after
/// which a link is closed, counted from the last thing the trigger sent.
const LINK_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Let the kernel close a link whose trigger vanished without a word (the site's NAT lost its
/// state, the trigger's host lost power): the trigger's FIN or RST then never arrives. The
/// control link would notice by its own idle timeout, but an assist link has none (yamux sends
/// nothing while idle): it stayed open until the trigger came back, holding a `MAX_LINKS` slot, and
/// the site's status showed an assist link of a trigger long gone. Now a link that hears
/// nothing from its trigger for 30 s is closed (probes from 20 s of silence on; a reset in
/// answer to one closes it at once).
fn watch_liveness(tcp: &tokio::net::TcpStream) {
    let s = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(LINK_KEEPALIVE_IDLE)
        .with_interval(LINK_KEEPALIVE_INTERVAL)
        .with_retries(LINK_KEEPALIVE_PROBES);
    if let Err(e) = s.set_tcp_keepalive(&keepalive).and_then(|_| s.set_tcp_user_timeout(Some(LINK_USER_TIMEOUT))) {
        tracing::warn!("control link: TCP keepalive not set ({e}); a vanished trigger's link stays open");
    }
}

/// Close a link that never authenticated. It gets no frame at all (nothing that tells a stranger
/// what it got wrong); the reason is in the server's log. A short pause slows token guessing.
async fn refuse<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, why: &str) {
    tracing::debug!("closing an unauthenticated link: {why}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = tokio::io::AsyncWriteExt::shutdown(w).await;
}

async fn session(
    shared: Arc<Shared>,
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let (rd, mut wr) = tokio::io::split(tls);
    let mut reader = FrameReader::new(rd);

    // Register must come first, promptly.
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await;
    let (site, token, assist) = match first {
        Ok(Ok(Message::Register { site, token, agent })) => {
            tracing::debug!(%peer, %site, %agent, "register");
            (site, token, false)
        }
        Ok(Ok(Message::AssistAttach { site, token })) => (site, token, true),
        Ok(Ok(other)) => {
            shared.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "control link: expected register, got {}", kind(&other));
            return refuse(&mut wr, "the first frame must be register").await;
        }
        Ok(Err(LinkError::Frame(e))) => {
            shared.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "control link: {e}");
            return refuse(&mut wr, &e.to_string()).await;
        }
        Ok(Err(e)) => {
            tracing::info!(%peer, "control link closed before register: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "control link: no register within {HANDSHAKE_TIMEOUT:?}");
            return refuse(&mut wr, "register timed out").await;
        }
    };
    let authorised =
        shared.cfg.sites.iter().any(|s| s.name == site && bool::from(subtle::ConstantTimeEq::ct_eq(s.token.as_bytes(), token.as_bytes())));
    if !authorised {
        shared.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, site = %site, "trigger refused: unknown site or wrong token");
        return refuse(&mut wr, "unknown site or wrong token").await;
    }
    if assist {
        return assist_link(shared, site, reader, wr, peer, shutdown).await;
    }

    let (tx, mut rx) = mpsc::channel::<Message>(OUT_QUEUE);
    let (kick_tx, mut kick_rx) = oneshot::channel();
    let id = shared.next_id();
    let previous = shared
        .sessions
        .lock()
        .unwrap()
        .insert(site.clone(), SiteSession { id, tx: tx.clone(), public: peer, since: Instant::now(), kick: Some(kick_tx) });
    if let Some(mut old) = previous {
        // Documented policy: the newest trigger of a site wins (a restarted trigger must not wait
        // for its old link to time out).
        tracing::warn!(site = %site, old = %old.public, new = %peer, "second trigger for site: replacing the older link");
        if let Some(k) = old.kick.take() {
            let _ = k.send(());
        }
    }
    let unsaved = shared.registry.lock().unwrap().record_registration(&site, peer.to_string());
    persist(unsaved);
    tracing::info!(site = %site, trigger_public = %peer, "trigger registered");
    let _ =
        tx.try_send(Message::Registered { site: site.clone(), trigger_public: peer.to_string(), public_ip: Some(shared.cfg.public_ip) });

    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if write_frame(&mut wr, &m).await.is_err() {
                break;
            }
        }
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
    });

    let mut budget = crate::rate_limit::TokenBucket::new(FRAMES_PER_SEC, FRAME_BURST, Instant::now());
    let mut last_report = None;
    let reason = loop {
        let msg = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, reader.next()) => r,
            _ = &mut kick_rx => break "replaced by a newer trigger of the same site".to_string(),
            _ = shutdown.changed() => break "server shutting down".to_string(),
        };
        match msg {
            Err(_) => break format!("silent for {IDLE_TIMEOUT:?}"),
            Ok(Err(LinkError::Frame(e))) => break format!("bad frame: {}", refuse_frame(&shared, &tx, e.code(), e.to_string())),
            Ok(Err(e)) => break e.to_string(),
            Ok(Ok(_)) if !budget.allow(Instant::now()) => {
                break refuse_frame(&shared, &tx, ErrorCode::RateLimited, format!("more than {FRAMES_PER_SEC} frames/s"));
            }
            Ok(Ok(Message::Report { .. })) if last_report.is_some_and(|t: Instant| t.elapsed() < REPORT_MIN_INTERVAL) => {
                let message = format!("more than one report per {}s", REPORT_MIN_INTERVAL.as_secs());
                break refuse_frame(&shared, &tx, ErrorCode::RateLimited, message);
            }
            Ok(Ok(m)) => {
                if matches!(m, Message::Report { .. }) {
                    last_report = Some(Instant::now());
                }
                if let Err(why) = handle(&shared, &site, peer, &tx, m) {
                    break refuse_frame(&shared, &tx, ErrorCode::BadFrame, why);
                }
            }
        }
    };
    {
        let mut sessions = shared.sessions.lock().unwrap();
        if sessions.get(&site).is_some_and(|s| s.id == id) {
            sessions.remove(&site);
        }
    }
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    tracing::info!(site = %site, trigger_public = %peer, "trigger link closed: {reason}");
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Register { .. } => "register",
        Message::Registered { .. } => "registered",
        Message::Report { .. } => "report",
        Message::ReportAck { .. } => "report_ack",
        Message::Indication(_) => "indication",
        Message::IndicationResult { .. } => "indication_result",
        Message::Error { .. } => "error",
        Message::Ping { .. } => "ping",
        Message::Pong { .. } => "pong",
        Message::AssistAttach { .. } => "assist_attach",
        Message::Open { .. } => "open",
        Message::OpenResult { .. } => "open_result",
    }
}

/// A frame (or a rate) the server does not accept from a registered trigger: counted in
/// `bad_frames`, answered with an `error` frame; returns `message`, the reason the caller closes
/// the link with.
fn refuse_frame(shared: &Shared, tx: &mpsc::Sender<Message>, code: ErrorCode, message: String) -> String {
    shared.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
    let _ = tx.try_send(Message::error(code, message.clone(), None));
    message
}

/// Write a registry change to disk on a blocking thread, without the registry's lock.
fn persist(unsaved: super::record::Unsaved) {
    tokio::task::spawn_blocking(move || {
        if let Err(e) = unsaved.save() {
            tracing::error!("registry write failed: {e:#}");
        }
    });
}

/// One frame from a registered trigger. `Err` closes the link.
fn handle(shared: &Arc<Shared>, site: &str, peer: SocketAddr, tx: &mpsc::Sender<Message>, m: Message) -> Result<(), String> {
    match m {
        Message::Report { cameras, probe } => {
            validate_report(&cameras)?;
            let direct_tcp = shared.cfg.sites.iter().any(|s| s.name == site && s.direct_tcp);
            match probe {
                Some(probe) if direct_tcp => super::profile::on_report(shared, site, probe, peer.ip()),
                _ => super::profile::record_without_measuring(
                    shared,
                    site,
                    if direct_tcp { "the trigger has no probe listener" } else { "direct TCP disabled for this site (direct_tcp = false)" },
                ),
            }
            let n = cameras.len();
            for c in &cameras {
                tracing::info!(site, camera = %c.name, ip = %c.ip, device_type = %c.device_type,
                    services = %c.services.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","), "camera reported");
            }
            // An unchanged report (a trigger that reconnected) is not written again.
            if let Some(unsaved) = shared.registry.lock().unwrap().record_report(site, cameras) {
                persist(unsaved);
            }
            let _ = tx.try_send(Message::ReportAck { cameras: n });
        }
        Message::IndicationResult { id, injected_bytes } => {
            shared.stats.trigger_packets_injected.fetch_add(1, Ordering::Relaxed);
            shared.stats.bytes_injected_by_triggers.fetch_add(injected_bytes as u64, Ordering::Relaxed);
            tracing::debug!(site, id, injected_bytes, "trigger packet injected");
        }
        Message::Error { code, message, id } => {
            shared.stats.indication_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(site, ?code, ?id, "trigger reported: {message}");
        }
        Message::Ping { nonce } => {
            let _ = tx.try_send(Message::Pong { nonce });
        }
        Message::Pong { .. } => {}
        other => return Err(format!("unexpected {} frame from a trigger", kind(&other))),
    }
    Ok(())
}

fn validate_report(cameras: &[CameraReport]) -> Result<(), String> {
    if cameras.len() > MAX_CAMERAS {
        return Err(format!("report lists {} cameras, limit is {MAX_CAMERAS}", cameras.len()));
    }
    let mut names = std::collections::HashSet::new();
    for c in cameras {
        if c.name.is_empty() || c.name.len() > MAX_NAME || c.name.contains('/') {
            return Err(format!("camera name {:?} is invalid (1-{MAX_NAME} bytes, no '/')", c.name));
        }
        if !names.insert(&c.name) {
            return Err(format!("camera {:?} reported twice", c.name));
        }
        if c.device_type.len() > MAX_NAME || c.services.len() > MAX_SERVICES {
            return Err(format!("camera {:?}: device type or service list too long", c.name));
        }
    }
    Ok(())
}

/// The assist link of an authenticated trigger: after `registered`, the TLS stream carries yamux.
async fn assist_link<R, W>(
    shared: Arc<Shared>,
    site: String,
    reader: FrameReader<R>,
    mut wr: W,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if write_frame(
        &mut wr,
        &Message::Registered { site: site.clone(), trigger_public: peer.to_string(), public_ip: Some(shared.cfg.public_ip) },
    )
    .await
    .is_err()
    {
        return;
    }
    // Anything read past the attach frame is already yamux: replay it first.
    let (rd, leftover) = reader.into_parts();
    let rd = tokio::io::AsyncReadExt::chain(std::io::Cursor::new(leftover), rd);
    let id = shared.next_id();
    let (handle, driver) = super::assist::serve(tokio::io::join(rd, super::assist::frame_writer(wr)), id);
    shared.assist.lock().unwrap().insert(site.clone(), handle);
    tracing::info!(site = %site, trigger_public = %peer, "assist link up");
    tokio::select! {
        _ = driver => {}
        _ = shutdown.changed() => {}
    }
    let mut links = shared.assist.lock().unwrap();
    if links.get(&site).is_some_and(|h| h.id == id) {
        links.remove(&site);
    }
    tracing::info!(site = %site, trigger_public = %peer, "assist link closed");
}
