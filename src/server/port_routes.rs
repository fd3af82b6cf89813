//! Which task owns a server port on `public_ip`: the TUN reader hands each camera-facing packet
//! to the owner of its destination port. A direct TCP connection (shard) owns one TCP port; a
//! site-profile probe owns one UDP port in [`UDP_PROBE_PORTS`]. UDP flows of the mapping table
//! are not routed here: the stack task serves them itself.

use super::byte_budget::{ByteBudget, Reservation};
use super::port_quarantine::{Peer, PortQuarantine};
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;

/// Packet bytes queued from the TUN reader to one TCP shard (beyond: dropped, TCP retransmits):
/// the largest window (`DIRECT_BUFFER_MAX`, 16 MiB) and some slack. A camera never has more
/// than its window in flight, so a shard that falls behind for a moment loses nothing, whether
/// its packets come as 64 KB super-packets (TUN offload) or as MSS-sized segments (a path
/// without GRO, where 256 packets, the bound before, held ≈ 370 KB and dropped bursts of a
/// 2 MiB window: 800-1,700 drops per 100 MB through the lab's 20 ms WAN). Counted by packet
/// length; the memory behind it is at most twice that (a handed-over read buffer holds at most
/// twice its packet, see `tun::RxBuf::take_whole`), and all queues share [`QUEUED_BYTES_MAX`].
const SHARD_QUEUE_BYTES: usize = super::tcp_expose::DIRECT_BUFFER_MAX + 1024 * 1024;
/// Packets queued to one TCP shard: [`SHARD_QUEUE_BYTES`] of segments down to an MSS of 544
/// bytes; a queue of small packets (ACKs) is bounded here.
const SHARD_QUEUE: usize = 32 * 1024;
/// Packets and bytes queued to one UDP probe.
const PROBE_QUEUE: usize = 64;
const PROBE_QUEUE_BYTES: usize = 1024 * 1024;
/// Buffer bytes queued to all shards and probes together. Each queue is bounded on its own, but
/// thousands of shards that all fall behind (an overloaded server) could otherwise hold GBs of
/// super-packets; beyond this the reader drops, as the kernel does when the TUN queue is full.
pub const QUEUED_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Server ports for direct TCP connections (TCP and UDP port spaces are separate).
const TCP_PORTS: std::ops::RangeInclusive<u16> = 20000..=60999;
/// UDP ports for profile probes: outside the UDP flows' range
/// ([`PORT_RANGE`](super::udp_mapping::PORT_RANGE)), so they never collide.
pub const UDP_PROBE_PORTS: std::ops::RangeInclusive<u16> = 61000..=61999;

/// A port's queue: its sending end, and the bytes queued in it.
struct Route {
    tx: mpsc::Sender<Queued>,
    queued: ByteBudget,
}

type Routes = Mutex<HashMap<u16, Route>>;

pub struct PortRoutes {
    tcp: Routes,
    udp: Routes,
    /// Bytes of the packets in all queues (see [`QUEUED_BYTES_MAX`]).
    queued: ByteBudget,
    /// Packets dropped because a queue or the budget was full.
    dropped: AtomicU64,
    /// TCP ports recently used towards a camera (see [`super::port_quarantine`]).
    quarantine: Mutex<PortQuarantine>,
}

impl Default for PortRoutes {
    fn default() -> Self {
        PortRoutes {
            tcp: Routes::default(),
            udp: Routes::default(),
            queued: ByteBudget::new(QUEUED_BYTES_MAX),
            dropped: AtomicU64::new(0),
            quarantine: Mutex::default(),
        }
    }
}

/// A packet in a queue, counted in [`PortRoutes`]'s budget and its port's until it is taken or
/// dropped (also when its queue is dropped with it).
pub struct Queued {
    pkt: Vec<u8>,
    _counted: Reservation,
    _counted_for_port: Reservation,
}

/// The receiving end of a port's packet queue.
pub struct PacketRx(mpsc::Receiver<Queued>);

impl PacketRx {
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.0.recv().await.map(|q| q.pkt)
    }

    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        self.0.try_recv().ok().map(|q| q.pkt)
    }
}

/// Ownership of a TCP server port towards one camera; released on drop, and then held back
/// from that camera for a while.
pub struct RouteGuard {
    routes: Arc<PortRoutes>,
    pub port: u16,
    peer: Peer,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        // Held before it is free (under the routes' lock, taken first as in `claim_tcp`): a
        // claim for the same camera in between must not get it.
        let mut routes = self.routes.tcp.lock().unwrap();
        self.routes.quarantine.lock().unwrap().release(Instant::now(), self.peer.clone(), self.port);
        routes.remove(&self.port);
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

/// Random draws for a free port that is also `usable`, and as many more for any free port.
const DRAWS: usize = 64;

/// A fresh, unpredictable port from `range` and the queue its packets arrive on: a free port
/// that is `usable`, or, if [`DRAWS`] random tries found none, any free port.
fn claim(
    routes: &Routes,
    range: std::ops::RangeInclusive<u16>,
    queue: usize,
    queue_bytes: usize,
    mut usable: impl FnMut(u16) -> bool,
) -> Option<(u16, PacketRx)> {
    let mut map = routes.lock().unwrap();
    let mut rng = rand::rng();
    for draw in 0..2 * DRAWS {
        let port = rng.random_range(range.clone());
        if draw < DRAWS && !usable(port) {
            continue;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = map.entry(port) {
            let (tx, rx) = mpsc::channel(queue);
            e.insert(Route { tx, queued: ByteBudget::new(queue_bytes) });
            return Some((port, PacketRx(rx)));
        }
    }
    None
}

impl PortRoutes {
    /// A TCP server port for a connection to `peer`: not one used towards it in the last
    /// [`HOLD`](super::port_quarantine::HOLD) unless the range is that crowded.
    pub fn claim_tcp(self: &Arc<Self>, peer: Peer) -> Option<(RouteGuard, PacketRx)> {
        let now = Instant::now();
        // The quarantine's lock is taken inside `claim`, under the routes' lock (the order
        // `RouteGuard::drop` keeps too), once for all draws.
        let mut quarantine = None;
        let (port, rx) = claim(&self.tcp, TCP_PORTS, SHARD_QUEUE, SHARD_QUEUE_BYTES, |port| {
            !quarantine.get_or_insert_with(|| self.quarantine.lock().unwrap()).holds(now, &peer, port)
        })?;
        drop(quarantine);
        Some((RouteGuard { routes: self.clone(), port, peer }, rx))
    }

    pub fn claim_udp(self: &Arc<Self>) -> Option<(UdpClaim, PacketRx)> {
        let (port, rx) = claim(&self.udp, UDP_PROBE_PORTS, PROBE_QUEUE, PROBE_QUEUE_BYTES, |_| true)?;
        Some((UdpClaim { routes: self.clone(), port }, rx))
    }

    /// Hand a TCP packet to the owner of its port; false if nobody owns it.
    pub fn dispatch_tcp(&self, port: u16, pkt: Vec<u8>) -> bool {
        self.dispatch(&self.tcp, port, pkt)
    }

    /// Hand a UDP packet to the probe owning its port (a copy: probes are rare and small).
    pub fn dispatch_udp(&self, port: u16, pkt: &[u8]) -> bool {
        UDP_PROBE_PORTS.contains(&port) && self.dispatch(&self.udp, port, pkt.to_vec())
    }

    /// Bytes in all queues now.
    pub fn queued_bytes(&self) -> usize {
        self.queued.held()
    }

    /// Packets dropped so far because a queue or the budget was full.
    pub fn dropped_packets(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A full queue (in packets or bytes) or a full budget drops the packet (TCP retransmits,
    /// probes retry); it is still the port's. A port's queue counts packet bytes (what the
    /// sender's window allows); the budget of all queues counts the buffer's capacity, the
    /// memory: a handed-over read buffer holds more than its packet.
    fn dispatch(&self, routes: &Routes, port: u16, pkt: Vec<u8>) -> bool {
        let map = routes.lock().unwrap();
        let Some(route) = map.get(&port) else { return false };
        let Some(counted_for_port) = route.queued.try_reserve(pkt.len()) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        let Some(counted) = self.queued.try_reserve(pkt.capacity()) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        // From here the packet is counted until it is taken or dropped, sent or not.
        // (Closed: the owner is just going away; not a drop of a server that is behind.)
        let queued = Queued { pkt, _counted: counted, _counted_for_port: counted_for_port };
        if let Err(mpsc::error::TrySendError::Full(_)) = route.tx.try_send(queued) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cam() -> Peer {
        Peer { site: "site-a".into(), camera: "192.168.1.10:554".parse().unwrap() }
    }

    #[test]
    fn a_released_port_is_not_claimed_again_towards_the_same_camera() {
        // A narrow range would be needed to see it by chance; instead claim and release many
        // ports towards one camera and check none of them comes back for it, while another
        // camera may get them.
        let routes = Arc::new(PortRoutes::default());
        let mut used = std::collections::HashSet::new();
        for _ in 0..2_000 {
            let (guard, _rx) = routes.claim_tcp(cam()).unwrap();
            assert!(used.insert(guard.port), "port {} claimed twice towards the same camera", guard.port);
        }
        assert_eq!(routes.quarantine.lock().unwrap().len(), 2_000);
        let other = Peer { site: "site-b".into(), camera: cam().camera };
        let again = (0..2_000).filter(|_| used.contains(&routes.claim_tcp(other.clone()).unwrap().0.port)).count();
        assert!(again > 0, "another site's camera is not held back from those ports");
        // A live port is never handed out twice, quarantine or not.
        let (held, _rx) = routes.claim_tcp(cam()).unwrap();
        for _ in 0..2_000 {
            assert_ne!(routes.claim_tcp(other.clone()).unwrap().0.port, held.port);
        }
    }

    #[test]
    fn a_crowded_range_falls_back_to_any_free_port() {
        let routes = Routes::default();
        // Nothing usable: after 64 draws any free port of the range will do.
        let (p, _rx_p) = claim(&routes, 100..=103, 4, 1024, |_| false).unwrap();
        assert!((100..=103).contains(&p));
        // One usable port: it is the one taken (64 draws from 4 ports all miss it with
        // probability (3/4)^64, about 1e-8).
        let want = if p == 102 { 103 } else { 102 };
        let (q, _rx_q) = claim(&routes, 100..=103, 4, 1024, |port| port == want).unwrap();
        assert_eq!(q, want);
        // A full range: none, usable or not.
        let mut held = Vec::new();
        while let Some(c) = claim(&routes, 100..=103, 4, 1024, |_| true) {
            held.push(c);
            assert!(held.len() <= 2);
        }
        assert!(claim(&routes, 100..=103, 4, 1024, |_| false).is_none());
    }

    #[tokio::test]
    async fn queued_bytes_are_bounded_and_released_by_take_or_drop() {
        let routes = Arc::new(PortRoutes::default());
        let (a, mut rx_a) = routes.claim_tcp(cam()).unwrap();
        let (b, rx_b) = routes.claim_tcp(cam()).unwrap();
        let big = vec![7u8; 64 * 1024];
        assert!(routes.dispatch_tcp(a.port, big.clone()));
        assert!(routes.dispatch_tcp(b.port, big.clone()));
        assert_eq!(routes.queued_bytes(), 2 * big.len());
        // Taken: no longer counted.
        assert_eq!(rx_a.recv().await.unwrap(), big);
        assert_eq!(routes.queued_bytes(), big.len());
        // A queue dropped with packets in it gives them back too.
        drop(rx_b);
        assert_eq!(routes.queued_bytes(), 0);
        // Unknown port: not ours.
        let free = TCP_PORTS.clone().find(|p| *p != a.port && *p != b.port).unwrap();
        assert!(!routes.dispatch_tcp(free, big.clone()));
        // Over the budget: dropped, not counted, still the port's.
        routes.queued.set_held(QUEUED_BYTES_MAX - 10);
        assert!(routes.dispatch_tcp(a.port, big.clone()));
        assert_eq!(routes.queued_bytes(), QUEUED_BYTES_MAX - 10);
        assert!(rx_a.try_recv().is_none());
        assert_eq!(routes.dropped_packets(), 1);
        routes.queued.set_held(0);
        assert!(routes.dispatch_tcp(a.port, b"small".to_vec()));
        assert_eq!(rx_a.try_recv().unwrap(), b"small");
        assert_eq!(routes.queued_bytes(), 0);
        // The budget counts what a packet's buffer holds, not just the packet (a read buffer
        // handed over with a smaller packet in it).
        let mut read_buffer = Vec::with_capacity(64 * 1024);
        read_buffer.extend_from_slice(b"packet");
        assert!(routes.dispatch_tcp(a.port, read_buffer));
        assert_eq!(routes.queued_bytes(), 64 * 1024);
        assert_eq!(rx_a.try_recv().unwrap(), b"packet");
        assert_eq!(routes.queued_bytes(), 0);
        // A full queue drops too, and what it holds stays counted until taken.
        for _ in 0..SHARD_QUEUE + 3 {
            routes.dispatch_tcp(a.port, b"x".to_vec());
        }
        assert_eq!(routes.dropped_packets(), 4);
        assert_eq!(routes.queued_bytes(), SHARD_QUEUE);
        drop(rx_a);
        assert_eq!(routes.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn a_shards_queue_holds_a_whole_window_and_no_more() {
        let routes = Arc::new(PortRoutes::default());
        let (a, mut rx_a) = routes.claim_tcp(cam()).unwrap();
        let (b, mut rx_b) = routes.claim_tcp(cam()).unwrap();
        // A 2 MiB window's burst of MSS-sized segments (no GRO on the path): all queued.
        let segment = vec![1u8; 1448];
        let burst = 2 * 1024 * 1024 / segment.len();
        for _ in 0..burst {
            routes.dispatch_tcp(a.port, segment.clone());
        }
        assert_eq!(routes.dropped_packets(), 0);
        for _ in 0..burst {
            assert_eq!(rx_a.try_recv().unwrap().len(), segment.len());
        }
        // Super-packets in read buffers twice their size: a port's queue counts their length.
        let packet = vec![3u8; 40 * 1024];
        for _ in 0..crate::server::tcp_expose::DIRECT_BUFFER_MAX / packet.len() {
            let mut read_buffer = Vec::with_capacity(64 * 1024);
            read_buffer.extend_from_slice(&packet);
            routes.dispatch_tcp(a.port, read_buffer);
        }
        assert_eq!(routes.dropped_packets(), 0);
        while rx_a.try_recv().is_some() {}
        // Super-packets: the largest window's worth, then the port's byte bound drops.
        let big = vec![2u8; 64 * 1024];
        let fit = SHARD_QUEUE_BYTES / big.len();
        for _ in 0..fit + 2 {
            routes.dispatch_tcp(a.port, big.clone());
        }
        assert!(fit * big.len() >= crate::server::tcp_expose::DIRECT_BUFFER_MAX);
        assert_eq!(routes.dropped_packets(), 2);
        // Another port's queue is not touched by it.
        routes.dispatch_tcp(b.port, big.clone());
        assert_eq!(routes.dropped_packets(), 2);
        assert_eq!(rx_b.try_recv().unwrap().len(), big.len());
        // Taking packets makes room again.
        assert!(rx_a.try_recv().is_some());
        routes.dispatch_tcp(a.port, big.clone());
        assert_eq!(routes.dropped_packets(), 2);
        drop(rx_a);
        assert_eq!(routes.queued_bytes(), 0);
    }
}
