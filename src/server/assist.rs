//! Trigger-assisted TCP path (server side): when the site's NAT cannot carry direct TCP, the
//! trigger opens an ordinary TCP connection to the camera and the bytes travel over the *assist
//! link*: a second TLS connection from the trigger, multiplexed and flow-controlled by yamux
//! (one yamux stream per platform-client connection). The honest fallback: the trigger carries
//! these bytes, and `beckon status` says so.

use crate::link::{write_frame, FrameReader};
use crate::wire::control::Message;
use futures::future::poll_fn;
use std::net::SocketAddrV4;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

pub type AssistStream = Compat<yamux::Stream>;
type OpenReq = oneshot::Sender<Result<yamux::Stream, String>>;

/// Streams open at once on one site's assist link.
pub const MAX_STREAMS: usize = 4096;
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// What the streams of one link may receive beyond yamux's 256 KiB each. yamux grows a stream's
/// window (doubling) when its sender exhausts it in under two round trips, but only out of the
/// connection's allowance above `MAX_STREAMS` × 256 KiB; with none (yamux's default 1 GiB is
/// exactly 4096 × 256 KiB) a stream stays at 256 KiB per round trip: 6.5 MB/s at 40 ms.
pub const WINDOW_GROWTH: usize = 256 * 1024 * 1024;

#[derive(Clone)]
pub struct AssistHandle {
    pub id: u64,
    open: mpsc::Sender<OpenReq>,
}

/// yamux frame header size.
const YAMUX_HEADER: usize = 12;
/// Largest TLS record payload.
const TLS_RECORD: usize = 16 * 1024;
/// The most one flush of the link writes: yamux flushes after every frame, so a frame is the
/// unit of a `write` (and, with TSO, of a TCP super-packet through the NAT). Frames of one TLS
/// record (16 KiB) cost a write, a flush and a packet each; 64 KiB frames (4 records, one
/// write) carried 31 % more on the assisted path (8 bulk streams, A/B of the trigger binary in
/// one lab: 396 → 519 MB/s).
pub const FRAME_BATCH: usize = 4 * TLS_RECORD;

pub fn yamux_config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_connection_receive_window(Some(MAX_STREAMS * yamux::DEFAULT_CREDIT as usize + WINDOW_GROWTH));
    c.set_max_num_streams(MAX_STREAMS);
    // A full data frame (header + body) fills the frame writer exactly: one write.
    c.set_split_send_size(FRAME_BATCH - YAMUX_HEADER);
    c
}

/// The assist link's TLS writer as yamux should see it: yamux writes a frame's header and body
/// separately and flushes after each frame; buffered, they become one `write` (of up to 4 TLS
/// records) instead of two.
pub fn frame_writer<W: tokio::io::AsyncWrite>(w: W) -> tokio::io::BufWriter<W> {
    tokio::io::BufWriter::with_capacity(FRAME_BATCH, w)
}

/// Drive the yamux connection over an authenticated TLS stream; returns when the link ends.
pub fn serve<S>(tls: S, id: u64) -> (AssistHandle, impl std::future::Future<Output = ()>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<OpenReq>(256);
    let mut conn = yamux::Connection::new(tls.compat(), yamux_config(), yamux::Mode::Client);
    let driver = async move {
        let mut waiting: std::collections::VecDeque<OpenReq> = Default::default();
        poll_fn(|cx| {
            while let Poll::Ready(Some(req)) = rx.poll_recv(cx) {
                waiting.push_back(req);
            }
            while !waiting.is_empty() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(r) => {
                        let req = waiting.pop_front().unwrap();
                        let _ = req.send(r.map_err(|e| e.to_string()));
                    }
                    Poll::Pending => break,
                }
            }
            // Polling inbound drives the connection's I/O; the trigger never opens streams.
            loop {
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(_stream))) => continue,
                    Poll::Ready(Some(Err(e))) => {
                        tracing::info!("assist link ended: {e}");
                        return Poll::Ready(());
                    }
                    Poll::Ready(None) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    };
    (AssistHandle { id, open: tx }, driver)
}

impl AssistHandle {
    /// Ask the trigger for a TCP connection to `camera`. Returns the stream (raw bytes from now
    /// on) and any camera bytes that arrived together with the trigger's answer.
    pub async fn open(&self, camera: SocketAddrV4) -> Result<(AssistStream, Vec<u8>), String> {
        // The whole open is bounded, getting the yamux stream included: yamux holds back new
        // streams while 256 of its own are unacknowledged, and a client must not wait on that
        // without end.
        let fut = async {
            let (tx, rx) = oneshot::channel();
            self.open.send(tx).await.map_err(|_| "assist link is down".to_string())?;
            let stream = rx.await.map_err(|_| "assist link is down".to_string())??;
            let mut s = stream.compat();
            write_frame(&mut s, &Message::Open { camera_ip: *camera.ip(), port: camera.port() }).await.map_err(|e| e.to_string())?;
            let mut reader = FrameReader::new(s);
            match reader.next().await {
                Ok(Message::OpenResult { ok: true, .. }) => Ok(reader.into_parts()),
                Ok(Message::OpenResult { ok: false, error }) => Err(format!("trigger could not connect: {}", error.unwrap_or_default())),
                Ok(other) => Err(format!("unexpected answer on assist stream: {other:?}")),
                Err(e) => Err(format!("assist stream: {e}")),
            }
        };
        tokio::time::timeout(OPEN_TIMEOUT, fut).await.map_err(|_| "trigger did not answer the open request".to_string())?
    }
}
