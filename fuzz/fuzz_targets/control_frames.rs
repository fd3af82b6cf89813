//! Control-frame decoding (docs/protocol.md "Frames"): whatever a peer sends on the control or
//! assist link, `FrameDecoder` and `decode_body` return a message or an error, never panic, never
//! hold more than one frame's worth of bytes beyond what the caller pushed, and every message they
//! accept re-encodes to a frame that decodes to the same message.
//!
//! Input: byte 0 picks the read size (the TLS stream delivers arbitrary chunks); the rest is the
//! byte stream. The same bytes are also decoded as one frame body.
#![no_main]

use beckon::wire::control::{decode_body, encode, FrameDecoder, FrameError, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = chunk as usize % 64 + 1;

    // One body, as `next_frame` would hand it over.
    if let Ok(m) = decode_body(stream) {
        check_round_trip(&m);
    }

    // A stream, read in chunks; the link is closed at the first error.
    let mut d = FrameDecoder::default();
    'read: for piece in stream.chunks(chunk) {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(Some(m)) => check_round_trip(&m),
                Ok(None) => {
                    // Waiting for the rest of one frame: at most its length prefix and body.
                    assert!(d.buffered() < 4 + MAX_FRAME, "decoder holds {} bytes", d.buffered());
                    break;
                }
                Err(e) => {
                    if let FrameError::TooLarge(n) = e {
                        assert!(n > MAX_FRAME);
                    }
                    // Every error maps to a protocol error code.
                    let _ = e.code();
                    break 'read;
                }
            }
        }
    }
});

fn check_round_trip(m: &beckon::wire::control::Message) {
    let frame = encode(m);
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, frame.len());
    let mut d = FrameDecoder::default();
    d.push(&frame);
    let back = d.next_frame().expect("re-encoded frame decodes").expect("one whole frame");
    assert_eq!(&back, m, "decode(encode(m)) != m");
    assert_eq!(d.buffered(), 0);
}
