//! Which task owns a server port on `public_ip`: the TUN reader hands each camera-facing packet
//! to the owner of its destination port. A direct TCP connection (shard) owns one TCP port; a
//! site-profile probe owns one UDP port in [`UDP_PROBE_PORTS`]. UDP flows of the mapping table
//! are not routed here: the stack task serves them itself.

use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Packets queued from the TUN reader to one TCP shard (full: dropped, TCP retransmits). A full
/// receive window (256 KiB) is ≈ 180 MSS-sized segments; with TUN offload a packet may be a
/// 64 KB super-packet, so this also bounds a shard's queue to ≈ 16 MB.
const SHARD_QUEUE: usize = 256;
/// Packets queued to one UDP probe.
const PROBE_QUEUE: usize = 64;
/// Server ports for direct TCP connections (TCP and UDP port spaces are separate).
const TCP_PORTS: std::ops::RangeInclusive<u16> = 20000..=60999;
/// UDP ports for profile probes: outside the UDP flows' range
/// ([`PORT_RANGE`](super::udp_mapping::PORT_RANGE)), so they never collide.
pub const UDP_PROBE_PORTS: std::ops::RangeInclusive<u16> = 61000..=61999;

type Routes = Mutex<HashMap<u16, mpsc::Sender<Vec<u8>>>>;

#[derive(Default)]
pub struct PortRoutes {
    tcp: Routes,
    udp: Routes,
}

/// Ownership of a TCP server port; released on drop.
pub struct RouteGuard {
    routes: Arc<PortRoutes>,
    pub port: u16,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        self.routes.tcp.lock().unwrap().remove(&self.port);
    }
}

/// Ownership of a UDP probe port; released on drop.
pub struct UdpClaim {
    routes: Arc<PortRoutes>,
    pub port: u16,
}

impl Drop for UdpClaim {
    fn drop(&mut self) {
        self.routes.udp.lock().unwrap().remove(&self.port);
    }
}

/// A fresh, unpredictable port from `range` and the queue its packets arrive on.
fn claim(routes: &Routes, range: std::ops::RangeInclusive<u16>, queue: usize) -> Option<(u16, mpsc::Receiver<Vec<u8>>)> {
    let mut map = routes.lock().unwrap();
    let mut rng = rand::rng();
    for _ in 0..64 {
        let port = rng.random_range(range.clone());
        if let std::collections::hash_map::Entry::Vacant(e) = map.entry(port) {
            let (tx, rx) = mpsc::channel(queue);
            e.insert(tx);
            return Some((port, rx));
        }
    }
    None
}

/// Hand a packet to the owner of `port`; false if nobody owns it.
fn dispatch(routes: &Routes, port: u16, pkt: &[u8]) -> bool {
    match routes.lock().unwrap().get(&port) {
        Some(tx) => {
            let _ = tx.try_send(pkt.to_vec()); // full: drop (TCP retransmits, probes retry)
            true
        }
        None => false,
    }
}

impl PortRoutes {
    pub fn claim_tcp(self: &Arc<Self>) -> Option<(RouteGuard, mpsc::Receiver<Vec<u8>>)> {
        let (port, rx) = claim(&self.tcp, TCP_PORTS, SHARD_QUEUE)?;
        Some((RouteGuard { routes: self.clone(), port }, rx))
    }

    pub fn claim_udp(self: &Arc<Self>) -> Option<(UdpClaim, mpsc::Receiver<Vec<u8>>)> {
        let (port, rx) = claim(&self.udp, UDP_PROBE_PORTS, PROBE_QUEUE)?;
        Some((UdpClaim { routes: self.clone(), port }, rx))
    }

    pub fn dispatch_tcp(&self, port: u16, pkt: &[u8]) -> bool {
        dispatch(&self.tcp, port, pkt)
    }

    pub fn dispatch_udp(&self, port: u16, pkt: &[u8]) -> bool {
        UDP_PROBE_PORTS.contains(&port) && dispatch(&self.udp, port, pkt)
    }
}
