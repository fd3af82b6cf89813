//! Connection module (patent S1/S2): keeps the TLS control link to the server up, registers,
//! reports (again after every reconnect), answers indications, and reconnects with capped
//! exponential backoff and jitter so a restarted server is not hit by every trigger at once.

use super::inject::Injector;
use super::report::report;
use crate::config::TriggerConfig;
use crate::link::{write_frame, FrameReader, LinkError};
use crate::wire::control::{ErrorCode, Message, Probe};
use rand::Rng;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pings keep the link's NAT mapping fresh and find a dead link (e.g. after the NAT lost its
/// state and answered the server with RST) within one interval.
pub const PING_EVERY: Duration = Duration::from_secs(5);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Trigger packets per second (sustained / burst) a trigger injects at most.
pub const INDICATIONS_PER_SEC: u32 = 1000;
pub const INDICATION_BURST: u32 = 2000;

/// Capped exponential backoff with jitter (each delay drawn from [d/2, d]).
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap, attempt: 0 }
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
    /// Next delay; `unit` in [0, 1) is the jitter draw.
    pub fn next(&mut self, unit: f64) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        let d = exp.min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        d.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }
}

enum Ended {
    Shutdown,
    Lost { registered: bool, reason: String },
}

pub async fn run(
    cfg: TriggerConfig,
    probe: Option<Probe>,
    server: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
    injector: Injector,
    registrations: watch::Sender<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match session(&cfg, probe, server, &connector, &name, &injector, &registrations, &mut shutdown).await {
            Ended::Shutdown => return,
            Ended::Lost { registered, reason } => {
                if registered {
                    backoff.reset();
                }
                let delay = backoff.next(rand::rng().random());
                tracing::warn!(server = %server, "control link down: {reason}; reconnecting in {delay:.1?}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

async fn session(
    cfg: &TriggerConfig,
    probe: Option<Probe>,
    server: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    name: &rustls::pki_types::ServerName<'static>,
    injector: &Injector,
    registrations: &watch::Sender<u64>,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let lost = |registered: bool, reason: String| Ended::Lost { registered, reason };
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(server)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return lost(false, format!("connect: {e}")),
        Err(_) => return lost(false, "connect timed out".into()),
    };
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return lost(false, format!("TLS: {e} (is `ca` the server's ca.pem and `server_name` the name in its certificate?)")),
        Err(_) => return lost(false, "TLS handshake timed out".into()),
    };
    let (rd, mut wr) = tokio::io::split(tls);
    let mut reader = FrameReader::new(rd);
    let register =
        Message::Register { site: cfg.site.clone(), token: cfg.token.clone(), agent: format!("beckon/{}", env!("CARGO_PKG_VERSION")) };
    if let Err(e) = write_frame(&mut wr, &register).await {
        return lost(false, format!("sending register: {e}"));
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, reader.next()).await {
        Ok(Ok(Message::Registered { site, trigger_public, public_ip })) => {
            let server_ip = match (cfg.server_public_ip, public_ip) {
                (Some(pin), Some(announced)) if pin != announced => {
                    tracing::error!(%pin, %announced, "the server announces another public_ip than `server_public_ip` pins; refusing it");
                    return lost(false, "server public_ip does not match the pin".into());
                }
                (Some(pin), _) => Some(pin),
                (None, announced) => announced,
            };
            injector.set_server_ip(server_ip);
            // A new control session: the assist link is renewed with it.
            registrations.send_modify(|g| *g += 1);
            tracing::info!(%site, %trigger_public, public_ip = ?server_ip, "registered with the server");
        }
        Ok(Ok(Message::Error { code, message, .. })) => {
            if code == ErrorCode::Unauthorized {
                tracing::error!(site = %cfg.site, "server refused this trigger: {message}; check `site` and `token` against the server's [[site]]");
            }
            return lost(false, format!("server refused registration: {message}"));
        }
        Ok(Ok(other)) => return lost(false, format!("unexpected first frame {other:?}")),
        Ok(Err(LinkError::Closed)) => {
            // The server closes an unauthenticated link without a word.
            tracing::error!(site = %cfg.site, "server refused this trigger (it closed the link after register): check `site` and `token` against the server's [[site]], and that `server` is a beckon server");
            return lost(false, "server closed the link after register".into());
        }
        Ok(Err(e)) => return lost(false, format!("waiting for registration: {e}")),
        Err(_) => return lost(false, "no answer to register".into()),
    }
    if let Err(e) = write_frame(&mut wr, &report(cfg, probe)).await {
        return lost(true, format!("sending report: {e}"));
    }

    // A compromised server must not turn the trigger into a packet cannon on the camera LAN.
    let mut budget = crate::rate_limit::TokenBucket::new(INDICATIONS_PER_SEC, INDICATION_BURST, std::time::Instant::now());
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let mut nonce = 0u64;
    loop {
        let msg = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, reader.next()) => r,
            _ = ping.tick() => {
                nonce += 1;
                if let Err(e) = write_frame(&mut wr, &Message::Ping { nonce }).await {
                    return lost(true, format!("ping: {e}"));
                }
                continue;
            }
            _ = shutdown.changed() => {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
                return Ended::Shutdown;
            }
        };
        let reply = match msg {
            Err(_) => return lost(true, format!("server silent for {IDLE_TIMEOUT:?}")),
            Ok(Err(LinkError::Frame(e))) => {
                let _ = write_frame(&mut wr, &Message::error(e.code(), e.to_string(), None)).await;
                return lost(true, format!("bad frame from server: {e}"));
            }
            Ok(Err(e)) => return lost(true, e.to_string()),
            Ok(Ok(m)) => match m {
                Message::ReportAck { cameras } => {
                    tracing::info!(cameras, "server recorded the camera report");
                    None
                }
                Message::Indication(ind) if !budget.allow(std::time::Instant::now()) => {
                    tracing::warn!(id = ind.id, "indication refused: more than {INDICATIONS_PER_SEC}/s");
                    Some(Message::Error {
                        code: ErrorCode::RateLimited,
                        message: format!("more than {INDICATIONS_PER_SEC} indications/s"),
                        id: Some(ind.id),
                    })
                }
                Message::Indication(ind) => Some(match injector.inject(&ind).await {
                    Ok(n) => {
                        tracing::info!(id = ind.id, camera = %format!("{}:{}", ind.camera_ip, ind.camera_port), proto = %ind.proto,
                            server = %format!("{}:{}", ind.server_ip, ind.server_port), bytes = n,
                            total_packets = injector.packets.load(Ordering::Relaxed), "trigger packet injected");
                        Message::IndicationResult { id: ind.id, injected_bytes: n }
                    }
                    Err((code, message)) => {
                        tracing::warn!(id = ind.id, ?code, "indication refused: {message}");
                        Message::Error { code, message, id: Some(ind.id) }
                    }
                }),
                Message::Ping { nonce } => Some(Message::Pong { nonce }),
                Message::Pong { .. } => None,
                Message::Error { code, message, .. } => {
                    tracing::warn!(?code, "server reported: {message}");
                    None
                }
                other => {
                    let _ =
                        write_frame(&mut wr, &Message::Error { code: ErrorCode::BadFrame, message: "unexpected frame".into(), id: None })
                            .await;
                    return lost(true, format!("unexpected frame from server: {other:?}"));
                }
            },
        };
        if let Some(r) = reply {
            if let Err(e) = write_frame(&mut wr, &r).await {
                return lost(true, format!("writing: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(b.next(1.0), Duration::from_millis(500));
        assert_eq!(b.next(1.0), Duration::from_secs(1));
        assert_eq!(b.next(0.0), Duration::from_secs(1)); // 2 s, jittered to half
        for _ in 0..40 {
            assert!(b.next(1.0) <= Duration::from_secs(30));
        }
        assert_eq!(b.next(0.0), Duration::from_secs(15));
        b.reset();
        assert_eq!(b.next(1.0), Duration::from_millis(500));
    }
}
