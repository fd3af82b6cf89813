//! Which direct connections run on the TUN reader's own thread.
//!
//! A direct connection's task normally runs on the shared multi-threaded runtime, and every
//! packet the reader hands it wakes it across threads. On a host that is not saturated, that
//! hand-over is what a single fast connection pays most for. With the first connection's task
//! on the reader's thread, one bulk stream through the lab took 62 % of a core instead of
//! 70–73 % and got 0.85–0.95 of a kernel relay's throughput instead of 0.80–0.83 (A/B in one
//! lab, 10 alternating 1 GB transfers per run, 4 runs each way); with 8 streams, where the
//! machine is saturated, it made no difference (0.79–0.93 of the relay's either way). Every
//! connection there (tried) leaves one core for the reader and all connections: 8 bulk streams
//! got no faster, the machine stayed 10 % idle. And a busy reader thread is what once let the kernel's queue in front of the TUN
//! overflow (`mod.rs`, `stack_thread`). So only a few connections at a time
//! (`READER_THREAD_CONNECTIONS`) get a place there: first come, first placed; a place is free
//! again when its connection ends. Each of them processes at most a bounded batch of packets
//! per turn (`tcp_conn`), so the reader waits behind it no longer than that.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// Direct connections at most on the reader's thread at once.
pub const READER_THREAD_CONNECTIONS: usize = 1;

/// The reader thread's runtime and how many of its places are taken.
#[derive(Default)]
pub struct ReaderSlots {
    runtime: OnceLock<tokio::runtime::Handle>,
    taken: Arc<AtomicUsize>,
}

/// A taken place; given back when dropped (also when its task is cancelled at shutdown).
pub struct ReaderSlot {
    taken: Arc<AtomicUsize>,
}

impl Drop for ReaderSlot {
    fn drop(&mut self) {
        self.taken.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ReaderSlots {
    /// Set once, when the reader's runtime exists. Without it no place is ever given.
    pub fn set_runtime(&self, rt: tokio::runtime::Handle) {
        let _ = self.runtime.set(rt);
    }

    /// A place on the reader's thread, if one is free (and the runtime is set).
    pub fn take(&self) -> Option<(tokio::runtime::Handle, ReaderSlot)> {
        let rt = self.runtime.get()?.clone();
        self.taken.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < READER_THREAD_CONNECTIONS).then_some(n + 1)).ok()?;
        Some((rt, ReaderSlot { taken: self.taken.clone() }))
    }

    /// Places taken now.
    pub fn in_use(&self) -> usize {
        self.taken.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_and_given_back() {
        let slots = ReaderSlots::default();
        assert!(slots.take().is_none(), "no runtime set: no place");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        slots.set_runtime(rt.handle().clone());
        let mut held: Vec<_> = (0..READER_THREAD_CONNECTIONS).map(|_| slots.take().expect("a free place")).collect();
        assert_eq!(slots.in_use(), READER_THREAD_CONNECTIONS);
        assert!(slots.take().is_none(), "all places taken");
        held.pop();
        assert_eq!(slots.in_use(), READER_THREAD_CONNECTIONS - 1);
        let again = slots.take().expect("a place given back is free again");
        drop(again);
        drop(held);
        assert_eq!(slots.in_use(), 0);
    }
}
