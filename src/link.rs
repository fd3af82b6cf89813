//! Async framing over the TLS control link: a thin shell around the sans-IO [`FrameDecoder`].

use crate::wire::control::{encode, FrameDecoder, FrameError, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link closed by peer")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

pub struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
    buf: Box<[u8]>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner, decoder: FrameDecoder::default(), buf: vec![0u8; 16 * 1024].into_boxed_slice() }
    }

    /// Next message; `Err(Closed)` on a clean end of stream.
    pub async fn next(&mut self) -> Result<Message, LinkError> {
        loop {
            if let Some(m) = self.decoder.next_frame()? {
                return Ok(m);
            }
            let n = self.inner.read(&mut self.buf).await?;
            if n == 0 {
                return Err(LinkError::Closed);
            }
            self.decoder.push(&self.buf[..n]);
        }
    }
}

impl<R> FrameReader<R> {
    /// The stream and any bytes already read past the last frame (raw data that followed it).
    pub fn into_parts(self) -> (R, Vec<u8>) {
        let leftover = self.decoder.into_buffered();
        (self.inner, leftover)
    }
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> std::io::Result<()> {
    w.write_all(&encode(msg)).await?;
    w.flush().await
}
