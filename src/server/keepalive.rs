//! Keepalive module (patent S10, claims 4 and 7): what the server sends to a learned UDP mapping
//! so the site's NAT keeps it, and how it recognises the camera's answer.
//!
//! RFC 4787 NATs may refresh a mapping only on outbound packets, so a keepalive the camera
//! *answers* is preferred; an answer also proves the mapping is still alive end to end.

use std::net::{Ipv4Addr, SocketAddrV4};

/// How one camera service is kept alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeepaliveKind {
    /// Generic UDP service: a zero-length datagram. It carries nothing a service could act on;
    /// many services ignore it (then Linux NATs still refresh on the inbound packet), echo-like
    /// services answer it. A datagram from the camera while a keepalive is outstanding and no
    /// client request is in flight counts as the answer and is not relayed to the client.
    EmptyDatagram,
    /// GB28181 (SIP over UDP): an `OPTIONS` request, which every SIP user agent answers
    /// (200 OK or an error response: either proves the path). Answers are recognised by the
    /// Call-ID and never relayed to the platform client.
    SipOptions,
}

impl KeepaliveKind {
    pub fn for_device_type(device_type: &str) -> Self {
        match device_type {
            "gb28181" => KeepaliveKind::SipOptions,
            _ => KeepaliveKind::EmptyDatagram,
        }
    }

    /// The keepalive payload; `seq` makes each SIP request distinct.
    pub fn payload(self, seq: u64, server: SocketAddrV4, camera: SocketAddrV4) -> Vec<u8> {
        match self {
            KeepaliveKind::EmptyDatagram => Vec::new(),
            KeepaliveKind::SipOptions => sip_options(seq, server, camera).into_bytes(),
        }
    }

    /// `Some(true)` if `payload` is certainly the answer to our keepalive, `Some(false)` if it
    /// certainly is not, `None` if the protocol cannot tell (the caller then decides by timing).
    pub fn is_answer(self, payload: &[u8]) -> Option<bool> {
        match self {
            KeepaliveKind::EmptyDatagram => None,
            KeepaliveKind::SipOptions => Some(is_sip_keepalive_answer(payload)),
        }
    }
}

const CALL_ID_PREFIX: &str = "beckon-ka-";

fn sip_options(seq: u64, server: SocketAddrV4, camera: SocketAddrV4) -> String {
    let ip: Ipv4Addr = *camera.ip();
    format!(
        "OPTIONS sip:{ip}:{cport} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {server};rport;branch=z9hG4bK-beckon-{seq}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:beckon@{sip}>;tag=beckon\r\n\
         To: <sip:{ip}:{cport}>\r\n\
         Call-ID: {CALL_ID_PREFIX}{seq}@{sip}\r\n\
         CSeq: {seq} OPTIONS\r\n\
         User-Agent: beckon/{ver}\r\n\
         Content-Length: 0\r\n\r\n",
        cport = camera.port(),
        sip = server.ip(),
        ver = env!("CARGO_PKG_VERSION"),
    )
}

fn is_sip_keepalive_answer(payload: &[u8]) -> bool {
    // A SIP response (status line) carrying our Call-ID. Bounded scan: headers only.
    // Works on bytes: header names are ASCII, and slicing UTF-8 text at fixed offsets would
    // panic on a multi-byte character (found by fuzzing).
    let head = &payload[..payload.len().min(2048)];
    let value_is_ours = |v: &[u8]| v.trim_ascii_start().starts_with(CALL_ID_PREFIX.as_bytes());
    let header = |l: &[u8], name: &[u8]| l.len() > name.len() && l[..name.len()].eq_ignore_ascii_case(name);
    head.starts_with(b"SIP/2.0 ")
        && head.split(|b| *b == b'\n').any(|l| {
            let l = l.trim_ascii_start();
            (header(l, b"call-id:") && value_is_ours(&l[8..])) || (header(l, b"i:") && value_is_ours(&l[2..]))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_options_and_its_answer() {
        let k = KeepaliveKind::SipOptions;
        let srv: SocketAddrV4 = "203.0.113.100:40000".parse().unwrap();
        let cam: SocketAddrV4 = "198.18.1.10:5060".parse().unwrap();
        let req = String::from_utf8(k.payload(3, srv, cam)).unwrap();
        assert!(req.starts_with("OPTIONS sip:198.18.1.10:5060 SIP/2.0\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
        let call_id = req.lines().find(|l| l.starts_with("Call-ID:")).unwrap();
        let answer = format!("SIP/2.0 200 OK\r\n{call_id}\r\nCSeq: 3 OPTIONS\r\n\r\n");
        assert_eq!(k.is_answer(answer.as_bytes()), Some(true));
        // A real message from the camera is not swallowed.
        assert_eq!(k.is_answer(b"SIP/2.0 200 OK\r\nCall-ID: abc@x\r\n\r\n"), Some(false));
        assert_eq!(k.is_answer(b"MESSAGE sip:x SIP/2.0\r\nCall-ID: beckon-ka-1\r\n\r\n"), Some(false));
        assert_eq!(k.is_answer(&[0xff, 0xfe]), Some(false));
        // Multi-byte characters where a header name would end: no panic, no match.
        assert_eq!(k.is_answer("SIP/2.0 200 OK\r\nCall-I\u{e9}: beckon-ka-1\r\n\u{1f600}\r\n".as_bytes()), Some(false));
    }

    #[test]
    fn generic_keepalive_is_empty_and_undecidable() {
        let k = KeepaliveKind::for_device_type("generic-rtsp");
        assert_eq!(k, KeepaliveKind::EmptyDatagram);
        assert!(k.payload(1, "1.2.3.4:1".parse().unwrap(), "5.6.7.8:2".parse().unwrap()).is_empty());
        assert_eq!(k.is_answer(b"anything"), None);
    }
}
