//! Indication module (patent S6): builds the indication P2 for a camera and hands it to the
//! site's connected trigger.

use super::Shared;
use crate::catalog::Proto;
use crate::wire::control::{Command, Indication, Message};
use crate::wire::trigger_packet::{udp_pd1, Addressing};
use base64::Engine as _;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;

#[derive(Debug, thiserror::Error)]
pub enum IndicateError {
    #[error("the trigger of site {0:?} is not connected")]
    NotConnected(String),
    #[error("the control link of site {0:?} is congested")]
    Congested(String),
}

/// Send an indication carrying a UDP datagram (signalling form) from `public_ip:server_port`
/// to `camera_ip:camera_port`. Returns the indication id.
pub fn udp(shared: &Shared, site: &str, camera_ip: Ipv4Addr, camera_port: u16, server_port: u16, payload: &[u8]) -> Result<u64, IndicateError> {
    let a = Addressing { proto: Proto::Udp, src: shared.cfg.public_ip, src_port: server_port, dst: camera_ip, dst_port: camera_port };
    let pd1 = udp_pd1(&a, payload);
    let id = shared.next_id();
    let ind = Indication {
        id,
        camera_ip,
        camera_port,
        server_ip: shared.cfg.public_ip,
        server_port,
        proto: Proto::Udp,
        command: Command::Inject,
        pd1: base64::engine::general_purpose::STANDARD.encode(&pd1),
    };
    let sessions = shared.sessions.lock().unwrap();
    let s = sessions.get(site).ok_or_else(|| IndicateError::NotConnected(site.to_string()))?;
    s.tx.try_send(Message::Indication(ind)).map_err(|_| IndicateError::Congested(site.to_string()))?;
    shared.stats.indications_sent.fetch_add(1, Ordering::Relaxed);
    tracing::info!(site, id, camera = %format!("{camera_ip}:{camera_port}"), server_port, bytes = pd1.len(), "indication sent");
    Ok(id)
}
