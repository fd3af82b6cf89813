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
//! Sans-IO: the caller passes `now`. Bounded: at most [`MAX_ENTRIES`] ports are remembered;
//! beyond it the oldest is forgotten early (a camera that closes that many connections within
//! [`HOLD`] is past what this can protect anyway).

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

/// How long a port is not used again towards the same camera: the longest TIME_WAIT of a
/// camera's stack (2 × MSL of 120 s; conntrack's own TIME_WAIT is 120 s).
pub const HOLD: Duration = Duration::from_secs(240);
/// Remembered ports, all cameras together (≈ 60 bytes each with the site's name).
pub const MAX_ENTRIES: usize = 65_536;

/// Who a port was used towards: the site (cameras on different sites may share a private
/// address; their NATs are different, and so are their tuples) and the camera's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    pub site: String,
    pub camera: SocketAddrV4,
}

#[derive(Debug, Default)]
pub struct PortQuarantine {
    /// (released at, peer, port), oldest first.
    order: VecDeque<(Instant, Peer, u16)>,
    held: HashSet<(Peer, u16)>,
}

impl PortQuarantine {
    /// `port` was used towards `peer` until `now`.
    pub fn release(&mut self, now: Instant, peer: Peer, port: u16) {
        self.expire(now);
        if self.held.contains(&(peer.clone(), port)) {
            // Used again despite the hold (the fallback of a crowded port range): the hold
            // runs from the first release; the later one is not tracked separately.
            return;
        }
        if self.order.len() >= MAX_ENTRIES {
            if let Some((_, p, port)) = self.order.pop_front() {
                self.held.remove(&(p, port));
            }
        }
        self.held.insert((peer.clone(), port));
        self.order.push_back((now, peer, port));
    }

    /// Is `port` still held back from `peer` at `now`?
    pub fn holds(&mut self, now: Instant, peer: &Peer, port: u16) -> bool {
        self.expire(now);
        self.held.contains(&(peer.clone(), port))
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < HOLD {
                break;
            }
            let (_, peer, port) = self.order.pop_front().unwrap();
            self.held.remove(&(peer, port));
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
    fn a_second_release_while_held_keeps_one_entry() {
        let t0 = Instant::now();
        let mut q = PortQuarantine::default();
        let cam = peer("s", "10.0.0.1:80");
        q.release(t0, cam.clone(), 1);
        q.release(t0 + Duration::from_secs(10), cam.clone(), 1);
        assert_eq!(q.len(), 1);
        assert!(!q.holds(t0 + HOLD, &cam, 1));
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
