//! Indication module (patent S6): builds the indication P2 for a camera and hands it to the
//! site's connected trigger.

use super::Shared;
use crate::catalog::Proto;
use crate::wire::control::{Command, Direction, Indication, Message};
use crate::wire::trigger_packet::{udp_pd1, Addressing};
use base64::Engine as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;

#[derive(Debug, thiserror::Error)]
pub enum IndicateError {
    #[error("the trigger of site {0:?} is not connected")]
    NotConnected(String),
    #[error("the control link of site {0:?} is congested")]
    Congested(String),
}

/// Send an indication: the trigger injects `pd1` (a transport header + payload) between
/// `public_ip:server_port` and `camera`, in `direction`. Returns the indication id.
pub fn send(
    shared: &Shared,
    site: &str,
    proto: Proto,
    direction: Direction,
    camera: SocketAddrV4,
    server_port: u16,
    pd1: &[u8],
) -> Result<u64, IndicateError> {
    let id = shared.next_id();
    let ind = Indication {
        id,
        camera_ip: *camera.ip(),
        camera_port: camera.port(),
        server_ip: shared.cfg.public_ip,
        server_port,
        proto,
        command: Command::Inject,
        pd1: base64::engine::general_purpose::STANDARD.encode(pd1),
        direction,
    };
    let sessions = shared.sessions.lock().unwrap();
    let s = sessions.get(site).ok_or_else(|| IndicateError::NotConnected(site.to_string()))?;
    s.tx.try_send(Message::Indication(ind)).map_err(|_| IndicateError::Congested(site.to_string()))?;
    shared.stats.indications_sent.fetch_add(1, Ordering::Relaxed);
    tracing::info!(site, id, %proto, ?direction, %camera, server_port, bytes = pd1.len(), "indication sent");
    Ok(id)
}

/// Signalling form: the trigger sends the client's datagram to the camera as if from the server.
pub fn udp(
    shared: &Shared,
    site: &str,
    camera_ip: Ipv4Addr,
    camera_port: u16,
    server_port: u16,
    payload: &[u8],
) -> Result<u64, IndicateError> {
    let a = Addressing { proto: Proto::Udp, src: shared.cfg.public_ip, src_port: server_port, dst: camera_ip, dst_port: camera_port };
    send(shared, site, Proto::Udp, Direction::ToCamera, SocketAddrV4::new(camera_ip, camera_port), server_port, &udp_pd1(&a, payload))
}
