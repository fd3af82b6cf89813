//! A shared byte budget: what buffers of one kind hold together (direct connections' receive
//! windows, packets queued from the TUN reader to the shards), counted while each is alive.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct ByteBudget {
    held: Arc<AtomicUsize>,
    max: usize,
}

/// `bytes` counted in a [`ByteBudget`] until dropped.
pub struct Reservation {
    held: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Reservation {
    /// Bytes this reservation counts.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Count `more` (reserved from the same budget) as part of this reservation from now on.
    pub fn absorb(&mut self, mut more: Reservation) {
        debug_assert!(Arc::ptr_eq(&self.held, &more.held), "reservations of different budgets");
        // Its bytes stay held, now released with `self`; dropping it releases nothing.
        self.bytes += std::mem::take(&mut more.bytes);
    }
}

impl ByteBudget {
    pub fn new(max: usize) -> Self {
        ByteBudget { held: Arc::new(AtomicUsize::new(0)), max }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Whether `bytes` more would stay within the budget now.
    pub fn fits(&self, bytes: usize) -> bool {
        self.held() + bytes <= self.max
    }

    /// `bytes`, if they fit (atomically: concurrent reservations never overshoot together).
    pub fn try_reserve(&self, bytes: usize) -> Option<Reservation> {
        if self.held.fetch_add(bytes, Ordering::Relaxed) + bytes > self.max {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            return None;
        }
        Some(Reservation { held: self.held.clone(), bytes })
    }

    /// `bytes` whether they fit or not (a floor every user gets; counted all the same).
    pub fn reserve(&self, bytes: usize) -> Reservation {
        self.held.fetch_add(bytes, Ordering::Relaxed);
        Reservation { held: self.held.clone(), bytes }
    }

    #[cfg(test)]
    pub fn set_held(&self, bytes: usize) {
        self.held.store(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_count_until_dropped_and_stay_within_the_budget() {
        let b = ByteBudget::new(100);
        let r1 = b.try_reserve(60).unwrap();
        assert!(b.fits(40) && !b.fits(41));
        assert!(b.try_reserve(41).is_none());
        assert_eq!(b.held(), 60);
        let floor = b.reserve(50); // over the budget, counted anyway
        assert_eq!(b.held(), 110);
        assert!(b.try_reserve(1).is_none());
        drop(r1);
        drop(floor);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn an_absorbed_reservation_is_released_with_the_one_that_took_it() {
        let b = ByteBudget::new(100);
        let mut r = b.try_reserve(30).unwrap();
        r.absorb(b.try_reserve(50).unwrap());
        assert_eq!((r.bytes(), b.held()), (80, 80));
        assert!(b.try_reserve(21).is_none());
        drop(r);
        assert_eq!(b.held(), 0);
    }
}
