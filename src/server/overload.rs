//! Overload guard: while the server drops camera packets because it cannot read them fast enough
//! (the kernel's queue in front of beckon's TUN is full, or a connection's queue inside beckon
//! is), new TCP clients are refused. Why: past what the host carries, every direct stream
//! stalls together (the cameras retransmit what was dropped, which adds work, which drops more:
//! in the bench, 1,600–2,000 streams held and 2,000–2,400 all fell to nothing); refusing the
//! clients that would push it further keeps the ones being served. It is a guard, not a cure:
//! streams already admitted are not shed. Sans-IO: the stack's tick feeds it the drop counters.

use std::time::{Duration, Instant};

/// Packets dropped within one observation (the stack's 250 ms tick) that mean overload. A host
/// at its limit drops a few now and then and holds (625 drops in a whole 30 s bench level that
/// held); one falling over drops hundreds per second (15,000–17,000 in such a level).
pub const DROPS_PER_TICK: u64 = 50;
/// How long clients are refused after the last observation with that many drops.
pub const HOLD: Duration = Duration::from_secs(5);

/// The interval the threshold is for (the stack's tick); a later observation scales it.
const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
pub struct OverloadGuard {
    /// The drop counters' total, and when, at the last observation.
    last: Option<(u64, Instant)>,
    /// Refuse new clients until then.
    until: Option<Instant>,
}

impl OverloadGuard {
    /// Feed the total of the drop counters at `now`; true if this starts a period of overload
    /// (for the log), false if none or one already running.
    pub fn observe(&mut self, now: Instant, total_drops: u64) -> bool {
        let (new, elapsed) = match self.last {
            Some((total, at)) => (total_drops.saturating_sub(total), now.saturating_duration_since(at)),
            None => (0, TICK),
        };
        self.last = Some((total_drops, now));
        // More than DROPS_PER_TICK per TICK; a late observation (a busy thread) spans more time,
        // and its drops count at that rate, not as one burst.
        let span_ms = elapsed.max(TICK).as_millis() as u64;
        if new.saturating_mul(TICK.as_millis() as u64) <= DROPS_PER_TICK.saturating_mul(span_ms) {
            return false;
        }
        let starts = !self.overloaded(now);
        self.until = Some(now + HOLD);
        starts
    }

    /// Are new clients refused at `now`?
    pub fn overloaded(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_drops_refuses_clients_for_a_while_a_trickle_does_not() {
        let t0 = Instant::now();
        let tick = Duration::from_millis(250);
        let mut g = OverloadGuard::default();
        // The first observation only learns the counters' start (drops from before count nothing).
        assert!(!g.observe(t0, 1_000_000));
        assert!(!g.overloaded(t0));
        // A trickle at the threshold, tick after tick: never overloaded.
        let mut total = 1_000_000;
        for i in 1..=40 {
            total += DROPS_PER_TICK;
            assert!(!g.observe(t0 + tick * i, total));
            assert!(!g.overloaded(t0 + tick * i));
        }
        // After a late observation (2 s), the same number of drops is a slow rate, not a burst.
        let late = t0 + tick * 40 + Duration::from_secs(2);
        total += 4 * DROPS_PER_TICK;
        assert!(!g.observe(late, total), "4 ticks' worth of drops over 8 ticks' time");
        // A burst: overloaded from now for HOLD, and only the first observation says it starts.
        let t1 = late + tick;
        total += DROPS_PER_TICK + 1;
        assert!(g.observe(t1, total));
        assert!(g.overloaded(t1));
        total += 500;
        assert!(!g.observe(t1 + tick, total), "already overloaded: not a new period");
        // The hold runs from the last burst.
        let last = t1 + tick;
        assert!(g.overloaded(last + HOLD - Duration::from_millis(1)));
        assert!(!g.observe(last + tick, total), "no new drops");
        assert!(!g.overloaded(last + HOLD));
        // A counter that went backwards (a recreated device) is not a burst.
        assert!(!g.observe(last + HOLD + tick, 3));
        assert!(!g.overloaded(last + HOLD + tick));
    }
}
