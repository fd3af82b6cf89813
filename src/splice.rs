//! Byte splicing between a TCP connection and a stream (an assist-link yamux stream), both
//! ways, with backpressure (a bounded buffer per direction), half-close and reset propagation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Copy one direction, counting; half-close the writer at EOF. Err on reset. One read can fill
/// one full assist-link frame (`FRAME_BATCH`; 2 × 64 KiB per spliced connection).
async fn copy_counted<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(r: &mut R, w: &mut W, count: &AtomicU64) -> std::io::Result<()> {
    let mut buf = vec![0u8; crate::server::assist::FRAME_BATCH];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
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
    let camera_reset = {
        let a = copy_counted(&mut cr, &mut sw, up);
        let b = copy_counted(&mut sr, &mut cw, down);
        tokio::pin!(a, b);
        let (mut a_done, mut b_done) = (false, false);
        let mut camera_reset = false;
        while !(a_done && b_done) {
            tokio::select! {
                r = &mut a, if !a_done => { a_done = true; if r.is_err() { break; } }
                r = &mut b, if !b_done => { b_done = true; if r.is_err() { camera_reset = true; break; } }
            }
        }
        camera_reset
    };
    if camera_reset {
        reset_on_drop(cw.as_ref());
    }
}

/// Make dropping `s` send RST instead of FIN (linger 0 never blocks: the kernel just resets).
#[allow(deprecated)]
pub fn reset_on_drop(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}
