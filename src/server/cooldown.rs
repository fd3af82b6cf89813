//! Cooldowns: what the server leaves out for a while after it failed (timed steered-resync
//! steps per site, a direct strategy per (site, strategy)). Sans-IO: every call takes `now`.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Cooldown<K> {
    period: Duration,
    failed: Mutex<HashMap<K, Instant>>,
}

impl<K: Eq + Hash> Cooldown<K> {
    pub fn new(period: Duration) -> Self {
        Cooldown { period, failed: Mutex::new(HashMap::new()) }
    }

    /// `key` failed at `now`: leave it out until `now + period`.
    pub fn failed(&self, key: K, now: Instant) {
        self.failed.lock().unwrap().insert(key, now);
    }

    /// If `key` is left out at `now`: since when it failed and how long it stays out.
    pub fn left_out<Q: Eq + Hash + ?Sized>(&self, key: &Q, now: Instant) -> Option<(Duration, Duration)>
    where
        K: Borrow<Q>,
    {
        let mut failed = self.failed.lock().unwrap();
        let since = now.saturating_duration_since(*failed.get(key)?);
        if since >= self.period {
            failed.remove(key); // over: forget it (keeps the map to what is left out)
            return None;
        }
        Some((since, self.period - since))
    }

    pub fn is_left_out<Q: Eq + Hash + ?Sized>(&self, key: &Q, now: Instant) -> bool
    where
        K: Borrow<Q>,
    {
        self.left_out(key, now).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_left_out_for_the_period_then_forgotten() {
        let b = Cooldown::new(Duration::from_secs(600));
        let t0 = Instant::now();
        assert!(!b.is_left_out(&"site-a", t0));
        b.failed("site-a", t0);
        assert!(!b.is_left_out(&"site-b", t0));
        assert_eq!(b.left_out(&"site-a", t0 + Duration::from_secs(100)), Some((Duration::from_secs(100), Duration::from_secs(500))));
        assert!(b.is_left_out(&"site-a", t0 + Duration::from_secs(599)));
        assert!(!b.is_left_out(&"site-a", t0 + Duration::from_secs(600)));
        assert!(b.failed.lock().unwrap().is_empty());
        // A new failure starts a new period.
        b.failed("site-a", t0 + Duration::from_secs(700));
        assert!(b.is_left_out(&"site-a", t0 + Duration::from_secs(1200)));
    }
}
