//! Receive windows that grow with demand (direct TCP), as a plain state machine.
//!
//! A direct connection's smoltcp receive buffer is its window: the camera may have at most that
//! many bytes in flight, so the connection carries at most one window per round trip. It opens
//! at the size the exposure's `rate_mbit` asks for over the site's round trip (at least
//! `DIRECT_BUFFER_FLOOR`). When a connection moves more than half its window in one round trip,
//! the window is about to be its limit, and it doubles (up to `DIRECT_BUFFER_MAX`, while the
//! shared budget allows). This is the rule of Linux's receive-buffer autotuning
//! (`tcp_rcv_space_adjust`: the buffer grows to about twice what the application read in a
//! round trip), so a bulk transfer over a long path is not held to what `rate_mbit` declared,
//! and a video stream keeps its small window. The shard installs a grown buffer only while its
//! ring is empty (the vendored smoltcp's `grow_rx_buffer`); memory is still touched only as far
//! as the client falls behind.

use std::time::{Duration, Instant};

/// The round trip assumed where none was measured. Too long a guess only makes windows grow
/// more readily (memory the budget bounds); too short a one would keep a long path's window
/// from ever growing.
pub const UNKNOWN_ROUND_TRIP: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct RxWindowTuner {
    window: usize,
    max: usize,
    /// One round trip, including the host's service allowance.
    period: Duration,
    /// Start of the current measurement and the byte count then.
    since: Instant,
    received_then: u64,
}

impl RxWindowTuner {
    /// A connection with a `window`-byte receive buffer now, growing to at most `max`, over a
    /// path whose round trip (plus service allowance) is `period`; `received` bytes so far.
    pub fn new(window: usize, max: usize, period: Duration, received: u64, now: Instant) -> Self {
        RxWindowTuner { window, max, period: period.max(Duration::from_micros(100)), since: now, received_then: received }
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// Look at the connection's progress (`received`: its running total of bytes from the
    /// camera). At most once per round trip it may answer the size the window should grow to
    /// now; the caller installs it and reports it with [`RxWindowTuner::grown`], or tries
    /// again at the next answer.
    pub fn poll(&mut self, received: u64, now: Instant) -> Option<usize> {
        if self.window >= self.max {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed < self.period {
            return None;
        }
        let moved = received.saturating_sub(self.received_then);
        self.since = now;
        self.received_then = received;
        // Per round trip: a measurement that ran long (the loop sleeps while nothing arrives)
        // is scaled down, so an idle stretch does not count as one busy round trip.
        let per_round_trip = moved as f64 * self.period.as_secs_f64() / elapsed.as_secs_f64();
        (per_round_trip * 2.0 > self.window as f64).then(|| self.window.saturating_mul(2).min(self.max))
    }

    /// The window is now `size` bytes.
    pub fn grown(&mut self, size: usize) {
        self.window = size;
    }

    /// The window cannot grow any more (the connection's window scale cannot announce more):
    /// no more proposals.
    pub fn stop(&mut self) {
        self.max = self.window;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;
    const RTT: Duration = Duration::from_millis(40);

    /// Feed `tuner` a steady `bytes_per_rtt` for `rtts` round trips, installing every growth;
    /// returns the sizes it grew to.
    fn run(tuner: &mut RxWindowTuner, start: Instant, bytes_per_rtt: u64, rtts: u32) -> Vec<usize> {
        let mut grew = Vec::new();
        for i in 1..=rtts {
            // Several polls per round trip, as the splice loop does.
            for part in 1..=4u32 {
                let t = start + RTT * (i - 1) + RTT * part / 4;
                let received = bytes_per_rtt * (i as u64 - 1) + bytes_per_rtt * part as u64 / 4;
                if let Some(size) = tuner.poll(received, t) {
                    tuner.grown(size);
                    grew.push(size);
                }
            }
        }
        grew
    }

    #[test]
    fn a_window_limited_transfer_doubles_its_window_up_to_the_max() {
        let now = Instant::now();
        let mut t = RxWindowTuner::new(2 * MIB, 16 * MIB, RTT, 0, now);
        // A sender that always fills the window it is given.
        let mut grew = Vec::new();
        let mut received = 0u64;
        for i in 1..=10u32 {
            received += t.window() as u64;
            if let Some(size) = t.poll(received, now + RTT * i) {
                t.grown(size);
                grew.push(size);
            }
        }
        assert_eq!(grew, vec![4 * MIB, 8 * MIB, 16 * MIB]);
        assert_eq!(t.poll(received * 2, now + RTT * 20), None, "at the max it stays");
    }

    #[test]
    fn a_stream_well_below_its_window_keeps_it() {
        let now = Instant::now();
        let mut t = RxWindowTuner::new(2 * MIB, 16 * MIB, RTT, 0, now);
        // 4 Mbit/s: 20 kB per 40 ms round trip.
        assert!(run(&mut t, now, 20_000, 100).is_empty());
        // Just under half the window per round trip: still no growth.
        let mut t = RxWindowTuner::new(2 * MIB, 16 * MIB, RTT, 0, now);
        assert!(run(&mut t, now, (MIB - 4096) as u64, 100).is_empty());
        // Just over half: growth.
        let mut t = RxWindowTuner::new(2 * MIB, 16 * MIB, RTT, 0, now);
        assert_eq!(run(&mut t, now, (MIB + 4096) as u64, 3), vec![4 * MIB]);
    }

    #[test]
    fn an_idle_stretch_is_not_one_busy_round_trip() {
        let now = Instant::now();
        let mut t = RxWindowTuner::new(2 * MIB, 16 * MIB, RTT, 0, now);
        // 1.5 MB arrive, but over 10 s (the loop slept): 6 kB per round trip.
        assert_eq!(t.poll(1_500_000, now + Duration::from_secs(10)), None);
        // Before a round trip has passed nothing is decided, however much arrived.
        assert_eq!(t.poll(100_000_000, now + Duration::from_secs(10) + RTT / 2), None);
        assert_eq!(t.poll(100_000_000, now + Duration::from_secs(10) + RTT), Some(4 * MIB));
    }

    #[test]
    fn a_growth_not_installed_is_asked_for_again() {
        let now = Instant::now();
        let mut t = RxWindowTuner::new(2 * MIB, 16 * MIB, RTT, 0, now);
        assert_eq!(t.poll(2 * MIB as u64, now + RTT), Some(4 * MIB));
        // The caller could not install it (ring not empty, budget used): still 2 MiB.
        assert_eq!(t.poll(4 * MIB as u64, now + RTT * 2), Some(4 * MIB));
        t.grown(4 * MIB);
        assert_eq!(t.poll(6 * MIB as u64, now + RTT * 3), None, "2 MiB per round trip is half of 4 MiB");
    }

    proptest::proptest! {
        /// Whatever the traffic and however often it is polled: a proposal is twice the window
        /// (or the max), never beyond the max; at most one per round trip; none for a
        /// connection that moved at most half its window per round trip since the last look.
        #[test]
        fn proposals_double_within_the_max_at_most_once_per_round_trip(
            window_kib in 64usize..16384,
            max_factor in 1usize..8,
            period_ms in 1u64..200,
            steps in proptest::collection::vec((0u64..400, 0u64..20_000_000, proptest::bool::ANY), 1..200),
        ) {
            let (window, period) = (window_kib * 1024, Duration::from_millis(period_ms));
            let max = window * max_factor;
            let start = Instant::now();
            let mut t = RxWindowTuner::new(window, max, period, 0, start);
            let (mut now, mut received) = (start, 0u64);
            let (mut looked_at, mut received_then) = (start, 0u64);
            for (advance_ms, bytes, install) in steps {
                now += Duration::from_millis(advance_ms);
                received += bytes;
                let before = t.window();
                let proposal = t.poll(received, now);
                let elapsed = now - looked_at;
                if elapsed >= period {
                    let per_round_trip = (received - received_then) as f64 * period.as_secs_f64() / elapsed.as_secs_f64();
                    if before < max {
                        proptest::prop_assert_eq!(proposal.is_some(), per_round_trip * 2.0 > before as f64);
                        looked_at = now;
                        received_then = received;
                    }
                } else {
                    proptest::prop_assert_eq!(proposal, None, "within a round trip of the last look");
                }
                if let Some(size) = proposal {
                    proptest::prop_assert_eq!(size, (before * 2).min(max));
                    proptest::prop_assert!(size > before && size <= max);
                    if install {
                        t.grown(size);
                    }
                }
                proptest::prop_assert!(t.window() <= max);
            }
        }
    }

    #[test]
    fn a_stopped_tuner_proposes_nothing() {
        let now = Instant::now();
        let mut t = RxWindowTuner::new(2 * MIB, 16 * MIB, RTT, 0, now);
        assert_eq!(t.poll(2 * MIB as u64, now + RTT), Some(4 * MIB));
        t.stop();
        assert_eq!(t.poll(100 * MIB as u64, now + RTT * 2), None);
        assert_eq!(t.window(), 2 * MIB);
    }

    #[test]
    fn the_max_caps_an_uneven_doubling() {
        let now = Instant::now();
        let mut t = RxWindowTuner::new(3 * MIB, 5 * MIB, RTT, 0, now);
        assert_eq!(t.poll(3 * MIB as u64, now + RTT), Some(5 * MIB));
    }
}
