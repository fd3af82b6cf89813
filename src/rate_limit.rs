//! Rate limits, sans-IO. A token bucket bounds how many control frames a peer may send per
//! second (a trigger flooding the server, or a compromised server flooding a trigger with
//! indications that would become packets on the camera LAN). A log throttle bounds how often
//! an event that peers can repeat at will (a refused client, an unserved datagram) writes a
//! log line.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_sec: u32, burst: u32, now: Instant) -> Self {
        TokenBucket { capacity: burst as f64, per_sec: per_sec as f64, tokens: burst as f64, last: now }
    }

    /// Take one token if there is one.
    pub fn allow(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_sec).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// When a repeated event is worth a log line: the first one, then at most one per interval.
/// Counters count every event; the log says that it happens, and how often since the last line.
#[derive(Debug, Clone)]
pub struct LogThrottle {
    every: Duration,
    last_line: Option<Instant>,
    unlogged: u64,
}

impl LogThrottle {
    pub fn new(every: Duration) -> Self {
        LogThrottle { every, last_line: None, unlogged: 0 }
    }

    /// Count an event at `now`: `Some(n)` to log it now, with `n` events (this one included)
    /// since the last line.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self.last_line.is_some_and(|t| now.saturating_duration_since(t) < self.every) {
            return None;
        }
        self.last_line = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_logged_first_then_once_per_interval_with_the_count() {
        let every = Duration::from_secs(10);
        let mut log = LogThrottle::new(every);
        let t0 = Instant::now();
        assert_eq!(log.hit(t0), Some(1), "the first event is logged");
        assert_eq!(log.hit(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.hit(t0 + Duration::from_secs(9)), None);
        // The next line counts the two kept back and itself.
        assert_eq!(log.hit(t0 + every), Some(3));
        assert_eq!(log.hit(t0 + every + Duration::from_secs(2)), None);
        assert_eq!(log.hit(t0 + 5 * every), Some(2));
    }

    #[test]
    fn burst_then_steady_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!((0..20).filter(|_| b.allow(t0)).count(), 5);
        // One second later: ten more, not more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..20).filter(|_| b.allow(t1)).count(), 5, "refill is capped by the burst");
        let t2 = t1 + Duration::from_millis(300);
        assert_eq!((0..20).filter(|_| b.allow(t2)).count(), 3);
    }
}
