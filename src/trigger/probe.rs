//! The trigger's probe listener: a TCP listener on the trigger's own LAN address that plays a
//! camera for the server's site profile (so measuring the NAT never touches a camera). Every
//! accepted connection gets a short banner, then is read until EOF (bounded) and closed. A UDP
//! responder beside it answers every datagram to its sender (mapping and filtering tests). A UDP
//! responder beside it answers every datagram to its sender (mapping and filtering tests).

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
            let (mut s, peer) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // E.g. out of file descriptors: retrying at once would spin.
                    tracing::warn!("probe listener accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                continue;
            };
            tokio::spawn(async move {
                let _permit = permit;
                tracing::debug!(%peer, "probe connection");
                let _ = s.write_all(PROBE_BANNER).await;
                let mut buf = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_secs(10), async { while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {} })
                    .await;
            });
        }
    });
    let udp_port = match tokio::net::UdpSocket::bind(SocketAddr::from((lan_ip, 0))).await {
        Ok(u) => {
            let p = u.local_addr()?.port();
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                loop {
                    let Ok((_, from)) = u.recv_from(&mut buf).await else {
                        continue;
                    };
                    let _ = u.send_to(format!("beckon-probe {from}\n").as_bytes(), from).await;
                }
            });
            Some(p)
        }
        Err(e) => {
            tracing::warn!("no UDP probe responder: {e}");
            None
        }
    };
    tracing::info!(tcp = %format!("{lan_ip}:{port}"), udp = ?udp_port, "probe listener ready (the server measures the site's NAT against it)");
    Ok(Probe { ip: lan_ip, tcp_port: port, udp_port })
}
