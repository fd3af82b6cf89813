//! Control-frame decoding (docs/protocol.md "Frames"): whatever a peer sends on the control or
//! assist link, `FrameDecoder` and `decode_body` return a message or an error, never panic, never
//! hold more than one frame's worth of bytes beyond what the caller pushed, and every message they
//! accept re-encodes to a frame that decodes to the same message.
//!
//! Two kinds of input:
//! * raw: the first byte picks the read size (the TLS stream delivers arbitrary chunks), the rest
//!   is the byte stream; the same bytes are also decoded as one frame body;
//! * structured: messages of every type with arbitrary field values, encoded with
//!   `control::encode`, then optionally corrupted at a few positions. Uncorrupted, the stream must
//!   decode to exactly the messages sent, in order (random bytes almost never form valid JSON, so
//!   this is what gets the fuzzer into the message types' deserialisers).
#![no_main]

use arbitrary::Arbitrary;
use beckon::catalog::{Proto, Service};
use beckon::wire::control::{
    decode_body, encode, CameraReport, Command, Direction, ErrorCode, FrameDecoder, FrameError, Indication, Message, Probe, MAX_FRAME,
};
use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    Raw(&'a [u8]),
    Structured { msgs: Vec<Msg>, edits: Vec<(u16, u8)>, chunk: u8 },
}

#[derive(Arbitrary, Debug)]
struct Cam {
    name: String,
    ip: u32,
    device_type: String,
    services: Vec<(bool, u16)>,
}

#[derive(Arbitrary, Debug)]
enum Msg {
    Register { site: String, token: String, agent: String },
    Registered { site: String, trigger_public: String, public_ip: Option<u32> },
    Report { cameras: Vec<Cam>, probe: Option<(u32, u16, Option<u16>)> },
    ReportAck(u32),
    Indication { id: u64, camera_ip: u32, camera_port: u16, server_ip: u32, server_port: u16, tcp: bool, pd1: String, to_server: bool },
    IndicationResult { id: u64, injected_bytes: u32 },
    Error { code: u8, message: String, id: Option<u64> },
    Ping(u64),
    Pong(u64),
    AssistAttach { site: String, token: String },
    Open { camera_ip: u32, port: u16 },
    OpenResult { ok: bool, error: Option<String> },
}

fn proto(tcp: bool) -> Proto {
    if tcp {
        Proto::Tcp
    } else {
        Proto::Udp
    }
}

impl Msg {
    fn build(&self) -> Message {
        match self {
            Msg::Register { site, token, agent } => Message::Register { site: site.clone(), token: token.clone(), agent: agent.clone() },
            Msg::Registered { site, trigger_public, public_ip } => {
                Message::Registered { site: site.clone(), trigger_public: trigger_public.clone(), public_ip: public_ip.map(Ipv4Addr::from) }
            }
            Msg::Report { cameras, probe } => Message::Report {
                cameras: cameras
                    .iter()
                    .map(|c| CameraReport {
                        name: c.name.clone(),
                        ip: c.ip.into(),
                        device_type: c.device_type.clone(),
                        // Port 0 is not a service (refused by `Service::from_str`, never built).
                        services: c.services.iter().map(|&(tcp, port)| Service { proto: proto(tcp), port: port.max(1) }).collect(),
                    })
                    .collect(),
                probe: probe.map(|(ip, tcp_port, udp_port)| Probe { ip: ip.into(), tcp_port, udp_port }),
            },
            Msg::ReportAck(n) => Message::ReportAck { cameras: *n as usize },
            Msg::Indication { id, camera_ip, camera_port, server_ip, server_port, tcp, pd1, to_server } => {
                Message::Indication(Indication {
                    id: *id,
                    camera_ip: (*camera_ip).into(),
                    camera_port: *camera_port,
                    server_ip: (*server_ip).into(),
                    server_port: *server_port,
                    proto: proto(*tcp),
                    command: Command::Inject,
                    pd1: pd1.clone(),
                    direction: if *to_server { Direction::ToServer } else { Direction::ToCamera },
                })
            }
            Msg::IndicationResult { id, injected_bytes } => Message::IndicationResult { id: *id, injected_bytes: *injected_bytes as usize },
            Msg::Error { code, message, id } => Message::Error {
                code: [
                    ErrorCode::Unauthorized,
                    ErrorCode::BadFrame,
                    ErrorCode::TooLarge,
                    ErrorCode::Version,
                    ErrorCode::NotAllowed,
                    ErrorCode::InjectFailed,
                    ErrorCode::RateLimited,
                ][*code as usize % 7],
                message: message.clone(),
                id: *id,
            },
            Msg::Ping(n) => Message::Ping { nonce: *n },
            Msg::Pong(n) => Message::Pong { nonce: *n },
            Msg::AssistAttach { site, token } => Message::AssistAttach { site: site.clone(), token: token.clone() },
            Msg::Open { camera_ip, port } => Message::Open { camera_ip: (*camera_ip).into(), port: *port },
            Msg::OpenResult { ok, error } => Message::OpenResult { ok: *ok, error: error.clone() },
        }
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw(data) => {
            let Some((&chunk, stream)) = data.split_first() else {
                return;
            };
            // One body, as `next_frame` would hand it over.
            if let Ok(m) = decode_body(stream) {
                check_round_trip(&m);
            }
            let _ = read_stream(stream, chunk as usize % 64 + 1);
        }
        Input::Structured { msgs, edits, chunk } => {
            let sent: Vec<Message> = msgs.iter().map(Msg::build).collect();
            let mut stream = Vec::new();
            for m in &sent {
                stream.extend(encode(m));
            }
            let clean = edits.is_empty();
            for (pos, byte) in edits {
                if !stream.is_empty() {
                    let i = pos as usize % stream.len();
                    stream[i] = byte;
                }
            }
            let (got, err) = read_stream(&stream, chunk as usize % 64 + 1);
            if clean {
                assert_eq!(err, None, "a stream of encoded frames failed to decode");
                assert_eq!(got, sent, "decoded messages differ from the ones encoded");
            }
        }
    }
});

/// Feed `stream` in `chunk`-byte reads; stop at the first error (the link is closed then).
fn read_stream(stream: &[u8], chunk: usize) -> (Vec<Message>, Option<FrameError>) {
    let mut d = FrameDecoder::default();
    let mut got = Vec::new();
    for piece in stream.chunks(chunk) {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(Some(m)) => {
                    check_round_trip(&m);
                    got.push(m);
                }
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
                    return (got, Some(e));
                }
            }
        }
    }
    (got, None)
}

fn check_round_trip(m: &Message) {
    let frame = encode(m);
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, frame.len());
    let mut d = FrameDecoder::default();
    d.push(&frame);
    let back = d.next_frame().expect("re-encoded frame decodes").expect("one whole frame");
    assert_eq!(&back, m, "decode(encode(m)) != m");
    assert_eq!(d.buffered(), 0);
}
