//! A token bucket, sans-IO: bounds how many control frames a peer may send per second (a trigger
//! flooding the server, or a compromised server flooding a trigger with indications that would
//! become packets on the camera LAN).

use std::time::Instant;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
