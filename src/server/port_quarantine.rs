//! Server ports recently used towards a camera, not to be used towards it again for a while.
//!
//! Why: a direct TCP connection's four-tuple is (camera private address:port, server public
//! address:port), the same at the camera and in its NAT's conntrack. When a connection closes,
//! the camera keeps that tuple in TIME_WAIT (Linux 60 s; stacks with a longer MSL up to 240 s)
//! and conntrack keeps its entry (120 s on Linux). A new connection on the same tuple in that
//! time has its SYN (the trigger packet, seq = smoltcp's random ISN) taken as a new connection
//! only if its sequence number lies above the old connection's, which is a coin toss: otherwise
//! the camera answers with an ACK for the old connection, no SYN-ACK comes, and the client waits
//! for the attempt's timeout (3 s) and a retry on another port. Measured in the bench lab, 8
//! parallel 20 MB transfers at a time, 400 in 15 s from one camera: 2 of 400 setups took 3 s,
//! both on a port the same camera had been reached on 0.2 and 12 s before.
//!
//! Sans-IO: the caller passes `now`. Bounded: at most [`MAX_ENTRIES`] ports are remembered, all
//! cameras together; beyond it the oldest is forgotten early. That happens past ≈ 270 closed
//! direct connections per second on the whole server (65,536 in 240 s), and then every hold is
//! shorter than [`HOLD`]; the attempt still works half the time, and retries on another port.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

/// How long a port is not used again towards the same camera: the longest TIME_WAIT of a
/// camera's stack (2 × MSL of 120 s; conntrack's own TIME_WAIT is 120 s).
pub const HOLD: Duration = Duration::from_secs(240);
/// Remembered ports, all cameras together (each entry holds its peer twice, with the site's
/// name: ≈ 150–200 bytes, so ≈ 10–13 MB at the bound).
pub const MAX_ENTRIES: usize = 65_536;

/// Who a port was used towards: the site (cameras on different sites may share a private
/// address; their NATs are different, and so are their tuples) and the camera's address and
/// port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    pub site: String,
    pub camera: SocketAddrV4,
}

#[derive(Debug, Default)]
pub struct PortQuarantine {
    /// (released at, peer, port), oldest first; an entry whose time is not the one in `held`
    /// is stale (the port was released again later) and only waits to be popped.
    order: VecDeque<(Instant, Peer, u16)>,
    /// The latest release of each held (peer, port).
    held: HashMap<(Peer, u16), Instant>,
}

impl PortQuarantine {
    /// `port` was used towards `peer` until `now`: held from now on, also if it was held already
    /// (a port handed out again by the fallback of a crowded range has a TIME_WAIT of its own).
    pub fn release(&mut self, now: Instant, peer: Peer, port: u16) {
        self.expire(now);
        while self.order.len() >= MAX_ENTRIES {
            self.pop_oldest();
        }
        self.held.insert((peer.clone(), port), now);
        self.order.push_back((now, peer, port));
    }

    /// Is `port` still held back from `peer` at `now`?
    pub fn holds(&mut self, now: Instant, peer: &Peer, port: u16) -> bool {
        self.expire(now);
        self.held.contains_key(&(peer.clone(), port))
    }

    /// Ports held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while self.order.front().is_some_and(|(at, _, _)| now.saturating_duration_since(*at) >= HOLD) {
            self.pop_oldest();
        }
    }

    /// Forget the oldest entry; its port stays held if it was released again since.
    fn pop_oldest(&mut self) {
        if let Some((at, peer, port)) = self.order.pop_front() {
            let key = (peer, port);
            if self.held.get(&key) == Some(&at) {
                self.held.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(site: &str, camera: &str) -> Peer {
        Peer { site: site.into(), camera: camera.parse().unwrap() }
    }

    #[test]
    fn a_released_port_is_held_from_its_camera_only_and_only_for_the_hold() {
        let t0 = Instant::now();
        let mut q = PortQuarantine::default();
        let cam = peer("site-a", "192.168.1.10:554");
        q.release(t0, cam.clone(), 40_000);
        assert!(q.holds(t0, &cam, 40_000));
        // Another port, another camera, the same camera address on another site: free.
        assert!(!q.holds(t0, &cam, 40_001));
        assert!(!q.holds(t0, &peer("site-a", "192.168.1.11:554"), 40_000));
        assert!(!q.holds(t0, &peer("site-a", "192.168.1.10:80"), 40_000));
        assert!(!q.holds(t0, &peer("site-b", "192.168.1.10:554"), 40_000));
        // Held until HOLD has passed since the release.
        assert!(q.holds(t0 + HOLD - Duration::from_millis(1), &cam, 40_000));
        assert!(!q.holds(t0 + HOLD, &cam, 40_000));
        assert!(q.is_empty());
    }

    #[test]
    fn a_second_release_while_held_holds_from_the_second() {
        let t0 = Instant::now();
        let mut q = PortQuarantine::default();
        let cam = peer("s", "10.0.0.1:80");
        let later = t0 + Duration::from_secs(10);
        q.release(t0, cam.clone(), 1);
        q.release(later, cam.clone(), 1);
        assert_eq!(q.len(), 1);
        // The first release's entry expires; the port stays held until HOLD after the second.
        assert!(q.holds(t0 + HOLD, &cam, 1));
        assert!(q.holds(later + HOLD - Duration::from_millis(1), &cam, 1));
        assert!(!q.holds(later + HOLD, &cam, 1));
        assert!(q.is_empty() && q.order.is_empty());
    }

    #[test]
    fn the_number_of_entries_is_bounded_oldest_forgotten_first() {
        let t0 = Instant::now();
        let mut q = PortQuarantine::default();
        let cam = peer("s", "10.0.0.1:80");
        for i in 0..MAX_ENTRIES + 10 {
            let port = (i % 60_000) as u16;
            let other = if i < 60_000 { cam.clone() } else { peer("s", "10.0.0.2:80") };
            q.release(t0, other, port);
        }
        assert_eq!(q.len(), MAX_ENTRIES);
        // The first ten released are forgotten; the eleventh is still held.
        assert!(!q.holds(t0, &cam, 0));
        assert!(!q.holds(t0, &cam, 9));
        assert!(q.holds(t0, &cam, 10));
        assert!(q.holds(t0, &peer("s", "10.0.0.2:80"), 5_009));
    }
}
