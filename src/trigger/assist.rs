//! Trigger side of the assisted TCP path: keeps the assist link (a second TLS connection,
//! yamux-multiplexed) to the server; for each stream the server opens, checks the allowlist,
//! connects to the camera with an ordinary TCP connection and splices the bytes.

use super::connect::Backoff;
use crate::catalog::{Proto, Service};
use crate::config::TriggerConfig;
use crate::link::{write_frame, FrameReader};
use crate::wire::control::{Message, Probe};
use futures::future::poll_fn;
use rand::Rng;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(
    cfg: Arc<TriggerConfig>,
    probe: Option<Probe>,
    server: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
    mut registrations: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    // The assist link follows the control link: it is opened once the trigger is registered and
    // renewed whenever the control link registers again (after a server restart or a NAT that
    // lost its state, the old assist link is likely dead too, and nobody would notice until the
    // next stream).
    tokio::select! {
        _ = registrations.wait_for(|g| *g > 0) => {}
        _ = shutdown.changed() => return,
    }
    loop {
        registrations.borrow_and_update();
        let r = tokio::select! {
            r = link(&cfg, probe, server, &connector, &name) => r,
            _ = registrations.changed() => {
                tracing::info!("control link registered again: renewing the assist link");
                backoff.reset();
                continue;
            }
            _ = shutdown.changed() => return,
        };
        let up_for_a_while = r.as_ref().is_ok_and(|d| *d > Duration::from_secs(30));
        if up_for_a_while {
            backoff.reset();
        }
        let delay = backoff.next(rand::rng().random());
        match r {
            Ok(_) => tracing::info!("assist link closed; reconnecting in {delay:.1?}"),
            Err(e) => tracing::warn!("assist link: {e}; reconnecting in {delay:.1?}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = registrations.changed() => backoff.reset(),
            _ = shutdown.changed() => return,
        }
    }
}

/// One assist link lifetime; Ok(how long it was up).
async fn link(
    cfg: &Arc<TriggerConfig>,
    probe: Option<Probe>,
    server: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    name: &rustls::pki_types::ServerName<'static>,
) -> Result<Duration, String> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(server))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let mut tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
        .await
        .map_err(|_| "TLS timed out".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
    write_frame(&mut tls, &Message::AssistAttach { site: cfg.site.clone(), token: cfg.token.clone() }).await.map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(tls);
    match tokio::time::timeout(CONNECT_TIMEOUT, reader.next()).await {
        Ok(Ok(Message::Registered { .. })) => {}
        Ok(Ok(Message::Error { message, .. })) => return Err(format!("server refused the assist link: {message}")),
        Ok(Ok(other)) => return Err(format!("unexpected answer {other:?}")),
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("no answer to assist_attach".into()),
    }
    // yamux frames may have arrived together with `registered`: replay them first.
    let (tls, leftover) = reader.into_parts();
    let (rd, wr) = tokio::io::split(tls);
    let io = tokio::io::join(tokio::io::AsyncReadExt::chain(std::io::Cursor::new(leftover), rd), crate::server::assist::frame_writer(wr));
    tracing::info!("assist link up");
    let started = std::time::Instant::now();
    let mut conn = yamux::Connection::new(io.compat(), crate::server::assist::yamux_config(), yamux::Mode::Server);
    poll_fn(|cx| loop {
        match conn.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(stream))) => {
                tokio::spawn(serve_stream(cfg.clone(), probe, stream));
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::info!("assist link error: {e}");
                return Poll::Ready(());
            }
            Poll::Ready(None) => return Poll::Ready(()),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await;
    Ok(started.elapsed())
}

async fn serve_stream(cfg: Arc<TriggerConfig>, probe: Option<Probe>, stream: yamux::Stream) {
    let mut reader = FrameReader::new(stream.compat());
    let Ok(Ok(Message::Open { camera_ip, port })) = tokio::time::timeout(CONNECT_TIMEOUT, reader.next()).await else {
        return;
    };
    let service = Service { proto: Proto::Tcp, port };
    let allowed = cfg.allows(camera_ip, service) || probe.is_some_and(|p| p.ip == camera_ip && p.tcp_port == port);
    let (mut s, leftover) = reader.into_parts();
    if !allowed {
        tracing::warn!(camera = %format!("{camera_ip}:{port}"), "assist open refused: not a configured camera service");
        let _ = write_frame(
            &mut s,
            &Message::OpenResult {
                ok: false,
                error: Some(format!("{camera_ip}:{port} ({service}) is not a configured camera service of this trigger")),
            },
        )
        .await;
        return;
    }
    let camera = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((camera_ip, port))).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let _ = write_frame(&mut s, &Message::OpenResult { ok: false, error: Some(format!("connect {camera_ip}:{port}: {e}")) }).await;
            return;
        }
        Err(_) => {
            let _ = write_frame(&mut s, &Message::OpenResult { ok: false, error: Some(format!("connect {camera_ip}:{port}: timed out")) })
                .await;
            return;
        }
    };
    let _ = camera.set_nodelay(true);
    if write_frame(&mut s, &Message::OpenResult { ok: true, error: None }).await.is_err() {
        return;
    }
    tracing::info!(camera = %format!("{camera_ip}:{port}"), "assisted connection to camera opened");
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    crate::splice::relay(camera, s, leftover, &up, &down).await;
    let (u, d) = (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed));
    tracing::info!(camera = %format!("{camera_ip}:{port}"), to_camera = d, from_camera = u, "assisted connection closed");
}
