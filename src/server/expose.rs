//! Platform-facing exposures: the listeners unchanged platform clients (a VMS, ffmpeg, VLC) use.
//! UDP exposures feed client datagrams to the stack.

use crate::catalog::Proto;
use crate::config::{ExposeConfig, ServerConfig};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

/// Events the stack handles.
pub enum StackEvent {
    ClientDatagram { expose: usize, client: SocketAddr, payload: Vec<u8> },
    Snapshot(tokio::sync::oneshot::Sender<super::stack::StackSnapshot>),
}

pub struct Exposure {
    pub cfg: ExposeConfig,
    pub udp: Option<Arc<UdpSocket>>,
}

pub async fn bind_all(cfg: &ServerConfig, tx: mpsc::Sender<StackEvent>, shutdown: watch::Receiver<bool>) -> Result<Vec<Exposure>> {
    let mut out = Vec::new();
    for (i, e) in cfg.exposes.iter().enumerate() {
        match e.proto {
            Proto::Udp => {
                let sock = Arc::new(
                    UdpSocket::bind(e.listen).await.with_context(|| format!("expose[{i}] ({}): binding udp {}", e.camera, e.listen))?,
                );
                tracing::info!(camera = %e.camera, service = %e.service(), listen = %e.listen, "exposure ready");
                tokio::spawn(udp_listener(i, sock.clone(), tx.clone(), shutdown.clone()));
                out.push(Exposure { cfg: e.clone(), udp: Some(sock) });
            }
            // TCP exposures are served by `tcp_expose`.
            Proto::Tcp => out.push(Exposure { cfg: e.clone(), udp: None }),
        }
    }
    Ok(out)
}

async fn udp_listener(expose: usize, sock: Arc<UdpSocket>, tx: mpsc::Sender<StackEvent>, mut shutdown: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, client) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors from a client that went away surface here; keep serving.
                Err(e) => { tracing::debug!("exposure {expose}: {e}"); continue; }
            },
            _ = shutdown.changed() => return,
        };
        let ev = StackEvent::ClientDatagram { expose, client, payload: buf[..n].to_vec() };
        if tx.try_send(ev).is_err() {
            tracing::debug!("stack busy: client datagram dropped");
        }
    }
}
