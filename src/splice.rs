//! Byte splicing between a TCP connection and a stream (an assist-link yamux stream), both
//! ways, with backpressure (a bounded buffer per direction), half-close and reset propagation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
// tokio's clock, so that tests can run the idle timeout in paused time.
use tokio::time::Instant;

/// Once one direction has ended (EOF, passed on as a half-close), the other is given up, and
/// both peers reset, when it moves no bytes for this long. Why: yamux (0.13) does not reset a
/// stream that is dropped after its own FIN was sent, so the far end, blocked writing for lack
/// of window credit, would wait for ever. That happened whenever a client closed an assisted
/// connection while the camera's side was out of credit (a client that had stopped reading):
/// the trigger kept the camera connection, the camera kept sending into it, and under load the
/// kernel buffers of such connections (1.8 GB at 2,000 of them) put the whole host into TCP
/// memory pressure. A half-closed client that still wants the camera's answer gets it as long
/// as bytes keep moving.
pub const HALF_CLOSED_IDLE: Duration = Duration::from_secs(10);

/// Copy one direction, counting; half-close the writer at EOF. Err on reset. One read can fill
/// one full assist-link frame (`FRAME_BATCH`; 2 × 64 KiB per spliced connection). `moved`:
/// when bytes last went through, in ms since `start`.
async fn copy_counted<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    count: &AtomicU64,
    moved: &AtomicU64,
    start: Instant,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; crate::server::assist::FRAME_BATCH];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        // Piece by piece, so that a slow but moving writer counts as moving.
        let mut done = 0;
        while done < n {
            let k = w.write(&buf[done..n]).await?;
            if k == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            done += k;
            count.fetch_add(k as u64, Ordering::Relaxed);
            moved.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }
}

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpliceEnd {
    /// Both directions ended (EOF both ways).
    Done,
    /// The TCP peer reset (or its socket failed): the stream is dropped.
    TcpReset,
    /// The stream failed (the far end reset): the TCP peer is reset too.
    StreamReset,
    /// Half-closed and idle for `HALF_CLOSED_IDLE`: both are reset.
    HalfClosedIdle,
}

/// Splice client ↔ assist stream. A reset on either side ends both at once.
/// `leftover`: bytes already read from `stream` that belong to `client`.
pub async fn relay<S: AsyncRead + AsyncWrite + Unpin>(client: TcpStream, stream: S, leftover: Vec<u8>, up: &AtomicU64, down: &AtomicU64) {
    let (mut cr, mut cw) = client.into_split();
    if !leftover.is_empty() {
        if cw.write_all(&leftover).await.is_err() {
            return;
        }
        down.fetch_add(leftover.len() as u64, Ordering::Relaxed);
    }
    let (mut sr, mut sw) = tokio::io::split(stream);
    let start = Instant::now();
    let (up_moved, down_moved) = (AtomicU64::new(0), AtomicU64::new(0));
    let end = {
        let a = copy_counted(&mut cr, &mut sw, up, &up_moved, start);
        let b = copy_counted(&mut sr, &mut cw, down, &down_moved, start);
        tokio::pin!(a, b);
        let (mut a_done, mut b_done) = (false, false);
        // When the first direction ended: the other's idle time counts from then at the earliest.
        let mut half_closed_at = 0u64;
        loop {
            if a_done && b_done {
                break SpliceEnd::Done;
            }
            // The direction still open must keep moving.
            let still_open = if a_done { &down_moved } else { &up_moved };
            let idle_deadline = || start + Duration::from_millis(still_open.load(Ordering::Relaxed).max(half_closed_at)) + HALF_CLOSED_IDLE;
            let half_closed = a_done || b_done;
            tokio::select! {
                r = &mut a, if !a_done => {
                    if r.is_err() { break SpliceEnd::TcpReset; }
                    a_done = true;
                    half_closed_at = start.elapsed().as_millis() as u64;
                }
                r = &mut b, if !b_done => {
                    if r.is_err() { break SpliceEnd::StreamReset; }
                    b_done = true;
                    half_closed_at = start.elapsed().as_millis() as u64;
                }
                _ = tokio::time::sleep_until(idle_deadline()), if half_closed => {
                    // Bytes may have moved while this slept: only give up if they did not.
                    if Instant::now() >= idle_deadline() {
                        break SpliceEnd::HalfClosedIdle;
                    }
                }
            }
        }
    };
    if end == SpliceEnd::HalfClosedIdle {
        tracing::debug!(idle_secs = HALF_CLOSED_IDLE.as_secs(), "spliced connection half-closed and idle; resetting both ends");
    }
    if matches!(end, SpliceEnd::StreamReset | SpliceEnd::HalfClosedIdle) {
        reset_on_drop(cw.as_ref());
    }
}

/// Make dropping `s` send RST instead of FIN (linger 0 never blocks: the kernel just resets).
#[allow(deprecated)]
pub fn reset_on_drop(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A TCP pair on loopback: (the relay's side, the peer's side).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (ours, _) = l.accept().await.unwrap();
        (ours, peer)
    }

    /// The TCP peer sends for ever; the stream's far end half-closes and reads `per_tick` bytes
    /// every 2 s (0: never). Returns whether the relay ended within `within`.
    async fn relay_ends(per_tick: usize, within: Duration) -> bool {
        let (ours, mut peer) = tcp_pair().await;
        let (near, far) = tokio::io::duplex(4096);
        let (mut far_r, mut far_w) = tokio::io::split(far);
        far_w.shutdown().await.unwrap(); // the far end is done sending (a FIN)
        tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            while peer.write_all(&chunk).await.is_ok() {}
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; per_tick.max(1)];
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if per_tick > 0 && far_r.read_exact(&mut buf).await.is_err() {
                    return;
                }
            }
        });
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        tokio::time::timeout(within, relay(ours, near, Vec::new(), &up, &down)).await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_splice_that_stops_moving_is_given_up() {
        assert!(relay_ends(0, HALF_CLOSED_IDLE + Duration::from_secs(5)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_splice_that_keeps_moving_is_kept() {
        assert!(!relay_ends(1024, HALF_CLOSED_IDLE * 3).await);
    }
}
