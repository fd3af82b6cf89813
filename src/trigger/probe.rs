//! The trigger's probe listener: a TCP listener on the trigger's own LAN address that plays a
//! camera for the server's site profile (so measuring the NAT never touches a camera). Every
//! accepted connection gets a short banner, then is read until EOF (bounded) and closed.

use crate::wire::control::{Probe, PROBE_BANNER};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub async fn start(lan_ip: Ipv4Addr) -> anyhow::Result<Probe> {
    let l = tokio::net::TcpListener::bind(SocketAddr::from((lan_ip, 0))).await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
        loop {
            let Ok((mut s, peer)) = l.accept().await else {
                continue;
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                continue;
            };
            tokio::spawn(async move {
                let _permit = permit;
                tracing::debug!(%peer, "probe connection");
                let _ = s.write_all(PROBE_BANNER).await;
                let mut buf = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                })
                .await;
            });
        }
    });
    tracing::info!(addr = %format!("{lan_ip}:{port}"), "probe listener ready (the server measures the site's NAT against it)");
    Ok(Probe {
        ip: lan_ip,
        tcp_port: port,
    })
}
