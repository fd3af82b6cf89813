//! Control-link frames: a 4-byte big-endian length, then one JSON object with a protocol
//! version `v` and a `type` (see `docs/protocol.md`).
//!
//! Decoding is sans-IO: [`FrameDecoder`] takes bytes as they arrive and yields frames or a
//! [`FrameError`]; it never allocates more than [`MAX_FRAME`] for one frame.

use crate::catalog::{Proto, Service};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Protocol version spoken by this build.
pub const VERSION: u32 = 1;
/// Largest frame body accepted or sent. An indication with a full-MTU payload is ~2.2 KiB of JSON;
/// a report of 256 cameras ~40 KiB.
pub const MAX_FRAME: usize = 64 * 1024;
/// Most cameras one trigger may report (bounds the registry per site).
pub const MAX_CAMERAS: usize = 256;
/// Largest PD1 (transport header + payload) in an indication: fits a 1500-byte MTU with IPv4.
pub const MAX_PD1: usize = 1480;
/// Longest camera name and device type in a report, and most services per camera.
pub const MAX_NAME: usize = 64;
pub const MAX_SERVICES: usize = 64;
/// Longest `message` of an `error` frame built by [`Message::error`]: such a message can quote
/// what the peer sent (a decoder's complaint, a name), and must not make the frame oversized.
pub const MAX_ERROR_MESSAGE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Trigger → server, first frame (patent S1).
    Register {
        site: String,
        token: String,
        agent: String,
    },
    /// Server → trigger (S2): accepted; tells the trigger how the server sees it.
    Registered {
        site: String,
        trigger_public: String,
        /// The server's camera-facing address (`public_ip`): the trigger injects only packets
        /// whose server end is this address.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        public_ip: Option<Ipv4Addr>,
    },
    /// Trigger → server (S3): the cameras on this LAN.
    Report {
        cameras: Vec<CameraReport>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        probe: Option<Probe>,
    },
    /// Server → trigger (S4).
    ReportAck {
        cameras: usize,
    },
    /// Server → trigger (S6): inject a trigger packet.
    Indication(Indication),
    /// Trigger → server: the trigger packet left through the TUN.
    IndicationResult {
        id: u64,
        injected_bytes: usize,
    },
    /// Either way: something was refused. `id` names the indication, if any.
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Trigger → server, first frame of the *assist link* (a second TLS connection that carries
    /// yamux streams for the trigger-assisted TCP path).
    AssistAttach {
        site: String,
        token: String,
    },
    /// Server → trigger, first frame on a new assist stream: connect to this camera service.
    Open {
        camera_ip: Ipv4Addr,
        port: u16,
    },
    /// Trigger → server: the camera connection is up (then raw bytes follow) or refused.
    OpenResult {
        ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Register with an unknown site or a wrong token.
    Unauthorized,
    /// The frame could not be decoded or is not allowed in this state.
    BadFrame,
    /// Frame longer than [`MAX_FRAME`].
    TooLarge,
    /// Peer speaks another protocol version.
    Version,
    /// The indication targets a camera or port outside the trigger's allowlist.
    NotAllowed,
    /// The trigger could not build or inject the packet.
    InjectFailed,
    /// The peer sends frames faster than allowed.
    RateLimited,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CameraReport {
    pub name: String,
    pub ip: Ipv4Addr,
    pub device_type: String,
    pub services: Vec<Service>,
}

/// The trigger's own TCP listener on its LAN address, against which the server measures the
/// site's NAT (the site profile) without touching any camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub ip: Ipv4Addr,
    pub tcp_port: u16,
    /// The probe's UDP responder (answers every datagram to its sender), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_port: Option<u16>,
}

/// Bytes the probe listener sends first on every accepted connection.
pub const PROBE_BANNER: &[u8] = b"beckon-probe\n";

/// The patent's indication P2: five fields plus PD1 (the transport header and payload of the
/// packet the server would have sent the camera without a NAT in between).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Indication {
    pub id: u64,
    pub camera_ip: Ipv4Addr,
    pub camera_port: u16,
    pub server_ip: Ipv4Addr,
    pub server_port: u16,
    pub proto: Proto,
    pub command: Command,
    /// PD1, base64.
    pub pd1: String,
    /// `to_camera` (the patent's form, default) or `to_server`: the reverse packet whose source
    /// is the camera, used by the reverse-SYN TCP strategy.
    #[serde(default, skip_serializing_if = "Direction::is_to_camera")]
    pub direction: Direction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[default]
    ToCamera,
    ToServer,
}

impl Direction {
    pub fn is_to_camera(&self) -> bool {
        *self == Direction::ToCamera
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Send one trigger packet P3 = IPv4(server → camera) + PD1.
    Inject,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    msg: Message,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("protocol version {0} is not supported (this build speaks {VERSION})")]
    Version(u32),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge(_) => ErrorCode::TooLarge,
            FrameError::Version(_) => ErrorCode::Version,
            _ => ErrorCode::BadFrame,
        }
    }
}

impl Message {
    /// An `error` frame whose message is cut to [`MAX_ERROR_MESSAGE`] bytes (at a character
    /// boundary, marked with "…").
    pub fn error(code: ErrorCode, message: impl Into<String>, id: Option<u64>) -> Message {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut end = MAX_ERROR_MESSAGE - '…'.len_utf8();
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        Message::Error { code, message, id }
    }
}

/// A message's frame body: the JSON of its envelope.
fn body(msg: &Message) -> Vec<u8> {
    serde_json::to_vec(&Envelope { v: VERSION, msg: msg.clone() }).expect("control messages always serialize")
}

/// Bytes of a message's frame body (what [`MAX_FRAME`] bounds).
pub fn body_len(msg: &Message) -> usize {
    body(msg).len()
}

/// Encode one message as a length-prefixed frame.
pub fn encode(msg: &Message) -> Vec<u8> {
    let body = body(msg);
    debug_assert!(body.len() <= MAX_FRAME, "sender built an oversized frame");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decode one frame body (without its length prefix).
pub fn decode_body(body: &[u8]) -> Result<Message, FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    // Read the version first so a newer peer gets "version", not "malformed".
    #[derive(Deserialize)]
    struct V {
        v: u32,
    }
    let v: V = serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if v.v != VERSION {
        return Err(FrameError::Version(v.v));
    }
    let env: Envelope = serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    Ok(env.msg)
}

/// Incremental decoder: push bytes as they arrive, pop frames.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error the link
    /// must be closed: the stream position is lost.
    pub fn next_frame(&mut self) -> Result<Option<Message>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = decode_body(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }

    /// Bytes received past the last complete frame.
    pub fn into_buffered(self) -> Vec<u8> {
        self.buf
    }

    /// Bytes buffered; bounded by 4 + MAX_FRAME + one read.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ind() -> Message {
        Message::Indication(Indication {
            id: 7,
            camera_ip: "198.18.1.10".parse().unwrap(),
            camera_port: 5060,
            server_ip: "203.0.113.100".parse().unwrap(),
            server_port: 40000,
            proto: Proto::Udp,
            command: Command::Inject,
            pd1: "AAAA".into(),
            direction: Direction::ToCamera,
        })
    }

    #[test]
    fn error_messages_quoting_a_peer_stay_within_the_frame() {
        let long = "é".repeat(40_000); // 80 KB of two-byte characters
        let Message::Error { message, .. } = Message::error(ErrorCode::BadFrame, long, None) else { panic!() };
        assert!(message.len() <= MAX_ERROR_MESSAGE && message.ends_with('…'), "{}", message.len());
        let frame = encode(&Message::error(ErrorCode::BadFrame, "x".repeat(MAX_FRAME), Some(1)));
        assert!(frame.len() < 2 * MAX_ERROR_MESSAGE);
        let Message::Error { message, .. } = Message::error(ErrorCode::RateLimited, "short", None) else { panic!() };
        assert_eq!(message, "short");
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let msgs = vec![
            Message::Register { site: "a".into(), token: "t".into(), agent: "beckon/0.1".into() },
            ind(),
            Message::Error { code: ErrorCode::NotAllowed, message: "no".into(), id: Some(7) },
            Message::Ping { nonce: 1 },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend(encode(m));
        }
        let mut d = FrameDecoder::default();
        let mut out = Vec::new();
        for b in wire {
            d.push(&[b]);
            while let Some(m) = d.next_frame().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn json_shape_is_versioned_and_tagged() {
        let f = encode(&Message::Ping { nonce: 5 });
        assert_eq!(&f[4..], br#"{"v":1,"type":"ping","nonce":5}"#);
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut d = FrameDecoder::default();
        d.push(&((MAX_FRAME as u32 + 1).to_be_bytes()));
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge(MAX_FRAME + 1)));
    }

    #[test]
    fn malformed_and_wrong_version_are_errors() {
        assert!(matches!(decode_body(b"{not json"), Err(FrameError::Malformed(_))));
        assert!(matches!(decode_body(br#"{"v":1,"type":"launch"}"#), Err(FrameError::Malformed(_))));
        assert_eq!(decode_body(br#"{"v":9,"type":"ping","nonce":1}"#), Err(FrameError::Version(9)));
        let mut d = FrameDecoder::default();
        d.push(&[0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::Empty));
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut d = FrameDecoder::default();
            d.push(&data);
            for _ in 0..8 {
                match d.next_frame() { Ok(Some(_)) => continue, _ => break }
            }
        }
    }
}
