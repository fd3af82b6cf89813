//! TCP exposures: every platform-client connection gets its own camera connection, direct
//! through the site's NAT when the site profile found a strategy that works, otherwise (or when
//! the direct attempt fails) trigger-assisted. Bytes are spliced both ways with backpressure;
//! half-close and reset are propagated; everything is freed on close.

use super::tcp_conn::{ConnRecord, DirectParams, Shard};
use super::tcp_strategy::Strategy;
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
/// smoltcp socket buffers per direct connection (bounds the window: 256 KiB at 20 ms RTT is
/// ~100 Mbit/s, far above a camera stream).
pub const DIRECT_BUFFER: usize = 256 * 1024;
/// Platform-client connections per exposure at once.
pub const MAX_CLIENTS: usize = 4096;

pub async fn bind_all(shared: &Arc<Shared>, shutdown: watch::Receiver<bool>) -> Result<()> {
    for (i, e) in shared.cfg.exposes.iter().enumerate() {
        if e.proto != Proto::Tcp {
            continue;
        }
        let l = TcpListener::bind(e.listen).await.with_context(|| format!("expose[{i}] ({}): binding tcp {}", e.camera, e.listen))?;
        tracing::info!(camera = %e.camera, service = %e.service(), listen = %e.listen, "exposure ready");
        tokio::spawn(accept_loop(shared.clone(), e.clone(), l, shutdown.clone()));
    }
    Ok(())
}

async fn accept_loop(shared: Arc<Shared>, e: ExposeConfig, l: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let (client, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(err) => { tracing::warn!("accept on {}: {err}", e.listen); tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(listen = %e.listen, "too many clients; connection refused");
            continue;
        };
        let shared = shared.clone();
        let e = e.clone();
        tokio::spawn(async move {
            let _permit = permit;
            handle(shared, e, client, peer).await;
        });
    }
}

async fn handle(shared: Arc<Shared>, e: ExposeConfig, client: TcpStream, peer: SocketAddr) {
    let _ = client.set_nodelay(true);
    let cam = {
        let reg = shared.registry.lock().unwrap();
        reg.registry.camera(e.site(), e.camera_name()).cloned()
    };
    let Some(cam) = cam else {
        tracing::warn!(camera = %e.camera, client = %peer, "connection closed: camera not reported by its trigger (yet)");
        return;
    };
    if !cam.services.contains(&e.service()) {
        tracing::warn!(camera = %e.camera, service = %e.service(), "connection closed: the camera's report does not list this service");
        return;
    }
    let camera = SocketAddrV4::new(cam.ip, e.port);
    let record = Arc::new(ConnRecord::new(shared.next_id(), e.camera.clone(), e.service().to_string(), peer.to_string()));
    shared.conns.lock().unwrap().insert(record.id, record.clone());
    let t0 = Instant::now();
    let site = e.site().to_string();

    let profile = shared.profiles.lock().unwrap().get(&site).map(|p| (p.direct_order.clone(), p.summary.clone()));
    let (order, mut note) = match profile {
        None => (Vec::new(), Some("no site profile yet".to_string())),
        Some((order, summary)) => {
            let note = order.is_empty().then_some(summary);
            (order, note)
        }
    };
    // The profile's working strategies, cheapest first; each failure moves on to the next
    // (e.g. the other steering method), then to the assisted path.
    let mut failures = Vec::new();
    for strategy in order.iter().filter_map(|l| Strategy::from_label(l)) {
        let params = DirectParams {
            strategy,
            site: site.clone(),
            camera,
            virt: shared.virt_addr(&site, e.camera_name()),
            timeout: DIRECT_TIMEOUT,
            buffer: DIRECT_BUFFER,
            keepalive: shared.cfg.keepalive(),
        };
        match Shard::connect(shared.clone(), params, record.clone()).await {
            Ok(shard) => {
                let setup = t0.elapsed().as_millis() as u64;
                let public = shard.attempt.public.map(|p| p.to_string());
                {
                    let mut i = record.info.lock().unwrap();
                    i.path = "direct".into();
                    i.strategy = Some(strategy);
                    i.public = public.clone();
                    i.setup_ms = Some(setup);
                    i.round_trips = shard.attempt.round_trips;
                    i.note = (!failures.is_empty()).then(|| failures.join("; "));
                }
                shared.stats.tcp_connections_direct.fetch_add(1, Ordering::Relaxed);
                tracing::info!(camera = %e.camera, client = %peer, strategy = %strategy.label(), public = public.as_deref().unwrap_or("-"),
                    setup_ms = setup, round_trips = shard.attempt.round_trips,
                    trigger_packets = record.trigger_packets.load(Ordering::Relaxed), "direct TCP connection up");
                shard.splice(client).await;
                finish(&shared, &record, true);
                return;
            }
            Err(why) => {
                shared.stats.tcp_direct_fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(camera = %e.camera, client = %peer, strategy = %strategy.label(), "direct attempt failed: {why}");
                failures.push(format!("{} failed: {why}", strategy.label()));
            }
        }
    }
    if !failures.is_empty() {
        note = Some(failures.join("; "));
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
