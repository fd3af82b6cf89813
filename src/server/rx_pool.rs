//! Recycled TUN read buffers. A TCP super-packet leaves the TUN reader inside the buffer it
//! was read into (no copy, see [`RxBuf::take_whole`](super::tun::RxBuf::take_whole)); the shard
//! gives the buffer back here once smoltcp has taken the payload, and the reader's next
//! replacement comes from here instead of a fresh zeroed allocation.

use std::sync::Mutex;

/// One read buffer: the largest IPv4 packet (a TCP super-packet is at most this long).
pub const BUF_LEN: usize = 65535;
/// Buffers kept for reuse (4 MiB); beyond this, returned buffers are freed.
const KEEP: usize = 64;

static POOL: Pool = Pool::new();

/// A buffer of [`BUF_LEN`] bytes to read into (its contents are whatever it held before).
pub fn take() -> Vec<u8> {
    POOL.take()
}

/// Give a packet's buffer back; only read buffers (at least [`BUF_LEN`] of capacity) are kept.
pub fn give(buf: Vec<u8>) {
    POOL.give(buf)
}

struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    const fn new() -> Self {
        Pool(Mutex::new(Vec::new()))
    }

    fn take(&self) -> Vec<u8> {
        let mut buf = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        // A recycled buffer keeps its length's bytes; only what lies beyond is written.
        buf.resize(BUF_LEN, 0);
        buf
    }

    fn give(&self, buf: Vec<u8>) {
        if buf.capacity() < BUF_LEN {
            return;
        }
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < KEEP {
            pool.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_buffers_come_back_small_ones_do_not() {
        let pool = Pool::new();
        let mut a = pool.take();
        assert_eq!(a.len(), BUF_LEN);
        a.truncate(100);
        let ptr = a.as_ptr();
        pool.give(a);
        pool.give(vec![0; 10]); // a copied small packet: not a read buffer
        assert_eq!(pool.0.lock().unwrap().len(), 1);
        let b = pool.take();
        assert_eq!((b.as_ptr(), b.len()), (ptr, BUF_LEN), "the returned buffer is reused, whole");
        // At most KEEP are kept.
        for _ in 0..KEEP + 5 {
            pool.give(vec![0; BUF_LEN]);
        }
        assert_eq!(pool.0.lock().unwrap().len(), KEEP);
    }
}
