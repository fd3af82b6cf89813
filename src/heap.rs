//! glibc heap settings for the long-running commands (server and trigger).
//!
//! Why: beckon's data paths allocate and free buffers of a few to a few hundred KiB at high
//! rates on several tokio threads (yamux frames, TLS records, packets from the TUN). glibc
//! returns a thread arena's free top to the kernel (`madvise(MADV_DONTNEED)`) as soon as it
//! exceeds the trim threshold (128 KiB by default), and the next burst faults the same pages in
//! again, zeroed. Profiled during assisted bulk transfers, page faults were 12-13 % of both the
//! server's and the trigger's CPU (about 100 trims per second). A trim threshold of
//! [`TRIM_THRESHOLD`] keeps that memory in the arena. The cost: an idle process may keep up to
//! that much free memory per arena (glibc makes one per thread that allocates concurrently:
//! 3-4 with the 2-core runtime, at most 8 per core), so up to ≈ 128 MiB after a load peak on
//! the lab machine; more than that at the top of an arena still goes back. Allocations from
//! [`MMAP_THRESHOLD`] up (the direct path's receive rings, 256 KiB and more) keep their own
//! mappings and go back to the kernel when freed; no buffer of the hot paths is that large.
//! Setting both also turns off glibc's dynamic thresholds, which moved with the largest buffer
//! freed so far.

/// Free memory at the top of a thread arena that glibc keeps instead of giving back.
pub const TRIM_THRESHOLD: usize = 32 * 1024 * 1024;
/// Allocations at least this large are separate mappings (glibc's initial default).
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// How often free memory inside the arenas goes back to the kernel ([`trim`]).
pub const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Give the free memory inside glibc's arenas back to the kernel (`malloc_trim(0)`). Why: the
/// thresholds above return only memory at an arena's top; what a load peak freed in the middle
/// stays resident. Measured: after the bench's direct streams (up to 3,200 connections, whose
/// queued packets and buffers of 64 KiB come from the arenas) the idle server kept about 1 GB.
/// Once every [`TRIM_INTERVAL`] costs at most one round of page faults per interval, not the
/// constant churn of a low trim threshold. Returns whether memory was released.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases free memory; glibc takes each arena's lock.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Run [`trim`] every [`TRIM_INTERVAL`] (on a blocking thread: it walks every arena) for as
/// long as the runtime lives. Call from inside the runtime.
pub fn spawn_trimmer() {
    tokio::spawn(async {
        let mut every = tokio::time::interval(TRIM_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await; // the first tick is immediate
        loop {
            every.tick().await;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    });
}

/// Apply the settings; false if the C library refused them (or is not glibc). Call before any
/// thread is started.
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before other threads run.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
