//! Control-link boundaries in the lab: wrong tokens, malformed/oversized/out-of-order frames
//! against the real server, and a deliberately hostile server against the real trigger.

mod common;
use beckon::wire::control::{decode_body, encode, Command, ErrorCode, Indication, Message};
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

type Tls<S> = rustls::StreamOwned<S, TcpStream>;

fn read_msg<C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>, D: rustls::SideData>(
    s: &mut rustls::StreamOwned<C, TcpStream>,
) -> Option<Message> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let n = u32::from_be_bytes(len) as usize;
    assert!(n <= beckon::wire::control::MAX_FRAME, "peer sent an oversized frame");
    let mut body = vec![0u8; n];
    s.read_exact(&mut body).ok()?;
    Some(decode_body(&body).expect("peer sent a frame we cannot decode"))
}

fn client(ca: &str) -> Tls<rustls::ClientConnection> {
    beckon::tls::install_crypto_provider();
    let cfg = beckon::tls::client_config(std::path::Path::new(ca)).unwrap();
    let conn = rustls::ClientConnection::new(cfg, beckon::tls::server_name("beckon-server").unwrap()).unwrap();
    let tcp = TcpStream::connect("203.0.113.1:7443").unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// A control link registered as site a's trigger.
fn registered_client(ca: &str, agent: &str) -> Tls<rustls::ClientConnection> {
    let mut s = client(ca);
    s.write_all(&encode(&Message::Register { site: "site-a".into(), token: "token-a-0123456789".into(), agent: agent.into() })).unwrap();
    assert!(matches!(read_msg(&mut s), Some(Message::Registered { .. })));
    s
}

/// Whatever an unauthenticated peer sends, it gets a closed link and nothing else; an
/// authenticated one that floods gets an error frame; the server keeps serving.
#[test]
fn server_refuses_bad_tokens_and_bad_frames_without_crashing() {
    let mut lab = Lab::up("bk-c1", &[]);
    lab.start_server(20);
    let ca = format!("{}/ca.pem", lab.state_dir());

    // A trigger with a wrong token is refused (and keeps retrying with backoff, not crashing).
    let bad = lab.trigger_config("a", "wrong-token-0123456789", &ca);
    lab.spawn("trigger-bad", "trg-a", &["trigger", "--config", &bad]);
    wait_for(Duration::from_secs(10), "auth failure", || counter(&lab.status(), "auth_failures") >= 1);
    std::thread::sleep(Duration::from_secs(2));
    let st = lab.status();
    assert_eq!(st["sites"][0]["connected"], false);
    assert!(st["sites"][0]["cameras"].as_array().unwrap().is_empty(), "a refused trigger must not report");
    assert!(lab.log("trigger-bad").contains("server refused this trigger"), "{}", lab.log("trigger-bad"));
    lab.kill("trigger-bad");

    let results = lab.in_ns("srv", move || {
        let mut out = Vec::new();
        // 1. malformed JSON
        let mut s = client(&ca);
        s.write_all(&[0, 0, 0, 9]).unwrap();
        s.write_all(b"{not json").unwrap();
        s.flush().unwrap();
        out.push(("malformed", read_msg(&mut s), read_msg(&mut s).is_none()));
        // 2. length prefix far over the limit (nothing else sent)
        let mut s = client(&ca);
        s.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
        s.flush().unwrap();
        out.push(("oversized", read_msg(&mut s), read_msg(&mut s).is_none()));
        // 3. a valid frame, but not a register
        let mut s = client(&ca);
        s.write_all(&encode(&Message::Report { cameras: vec![], probe: None })).unwrap();
        s.flush().unwrap();
        out.push(("out of order", read_msg(&mut s), read_msg(&mut s).is_none()));
        // 4. another protocol version
        let mut s = client(&ca);
        let body = br#"{"v":7,"type":"ping","nonce":1}"#;
        s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
        s.write_all(body).unwrap();
        s.flush().unwrap();
        out.push(("version", read_msg(&mut s), read_msg(&mut s).is_none()));
        // 5. not TLS at all: the link closes without a frame
        let mut t = TcpStream::connect("203.0.113.1:7443").unwrap();
        t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        t.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut buf = [0u8; 64];
        let n = t.read(&mut buf).unwrap_or(0);
        out.push(("plaintext", None, n == 0 || buf[0] == 0x15 /* TLS alert */));
        out
    });
    // A peer that never authenticated gets nothing: no error frame, just a closed link.
    let expect = [("malformed", None), ("oversized", None), ("out of order", None), ("version", None), ("plaintext", None)];
    for ((name, got, closed), (ename, ecode)) in results.into_iter().zip(expect) {
        assert_eq!(name, ename);
        let code = got.map(|m| match m {
            Message::Error { code, .. } => code,
            other => panic!("{name}: expected an error frame, got {other:?}"),
        });
        assert_eq!(code, ecode, "{name}");
        assert!(closed, "{name}: link must be closed afterwards");
    }
    // An authenticated trigger that floods frames is cut off with a rate-limit error.
    let ca = format!("{}/ca.pem", lab.state_dir());
    let flood = lab.in_ns("srv", move || {
        let mut s = registered_client(&ca, "flood");
        // Pongs need no answer: the flood does not fill the server's queue towards us.
        let pong = encode(&Message::Pong { nonce: 1 });
        let mut burst = Vec::new();
        for _ in 0..20_000 {
            burst.extend_from_slice(&pong);
        }
        let _ = s.write_all(&burst);
        let _ = s.flush();
        let mut pongs = 0;
        loop {
            match read_msg(&mut s) {
                Some(Message::Pong { .. }) | Some(Message::Ping { .. }) => pongs += 1,
                Some(Message::Error { code, .. }) => return (pongs, Some(code), read_msg(&mut s).is_none()),
                Some(other) => panic!("unexpected {other:?}"),
                None => return (pongs, None, true),
            }
        }
    });
    assert_eq!(flood.1, Some(ErrorCode::RateLimited), "{flood:?}");
    assert!(flood.2, "link closed after the rate-limit error: {flood:?}");
    // A trigger reports once per link: a second report right after the first (each one is
    // written to disk) is refused and the link closed; the first one counts.
    let ca = format!("{}/ca.pem", lab.state_dir());
    let reports = lab.in_ns("srv", move || {
        let mut s = registered_client(&ca, "reports");
        let report = Message::Report {
            cameras: vec![beckon::wire::control::CameraReport {
                name: "cam1".into(),
                ip: "198.18.1.10".parse().unwrap(),
                device_type: "gb28181".into(),
                services: vec!["udp/5060".parse().unwrap()],
            }],
            probe: None,
        };
        s.write_all(&encode(&report)).unwrap();
        let mut got = Vec::new();
        // (Pings may come in between.)
        while let Some(m) = read_msg(&mut s) {
            if matches!(m, Message::ReportAck { .. }) {
                got.push(m);
                break;
            }
        }
        s.write_all(&encode(&report)).unwrap();
        while let Some(m) = read_msg(&mut s) {
            if !matches!(m, Message::Ping { .. }) {
                got.push(m);
            }
        }
        got
    });
    assert!(
        matches!(&reports[..], [Message::ReportAck { cameras: 1 }, Message::Error { code: ErrorCode::RateLimited, .. }]),
        "{reports:?}"
    );
    assert_eq!(lab.site_status("site-a")["cameras"][0]["name"], "cam1");
    // The server is alive and serves a good trigger.
    lab.start_trigger("b");
    lab.wait_registered("b");
    let c = lab.in_ns("srv", || Client::new(15061));
    assert_eq!(c.request(b"still here", 3).as_deref(), Some(&b"cam-b: still here"[..]));
    assert!(counter(&lab.status(), "bad_frames") >= 4);
}

/// A hostile server asks the trigger to inject outside its allowlist: every such indication is
/// refused with an error frame and nothing is injected; an allowed one is injected once.
#[test]
fn trigger_refuses_indications_outside_its_allowlist() {
    let mut lab = Lab::up("bk-c2", &[]);
    let state = std::path::PathBuf::from(lab.state_dir());
    std::fs::create_dir_all(&state).unwrap();
    beckon::tls::install_crypto_provider();
    let (cert, key) = beckon::tls::ensure_dev_material(&state).unwrap();
    let tls = beckon::tls::server_config(&cert, &key).unwrap();
    let listener = lab.in_ns("srv", || TcpListener::bind("203.0.113.1:7443").unwrap());
    let ca = state.join("ca.pem").display().to_string();
    let cfg = lab.trigger_config("a", "token-a-0123456789", &ca);
    lab.spawn("trigger-a", "trg-a", &["trigger", "--config", &cfg]);

    let accept = |listener: &TcpListener, tls: &Arc<rustls::ServerConfig>| {
        listener.set_nonblocking(false).unwrap();
        // The trigger also opens its assist link here; this hostile server ignores it.
        let mut s = loop {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut s = rustls::StreamOwned::new(rustls::ServerConnection::new(tls.clone()).unwrap(), tcp);
            match read_msg(&mut s) {
                Some(Message::Register { .. }) => break s,
                Some(Message::AssistAttach { .. }) => continue,
                other => panic!("unexpected first frame {other:?}"),
            }
        };
        s.write_all(&encode(&Message::Registered {
            site: "site-a".into(),
            trigger_public: "x".into(),
            public_ip: Some("203.0.113.100".parse().unwrap()),
        }))
        .unwrap();
        assert!(matches!(read_msg(&mut s), Some(Message::Report { .. })));
        s
    };
    let mut s = accept(&listener, &tls);

    let pd1 = |dport: u16| {
        use base64::Engine as _;
        let a = beckon::wire::trigger_packet::Addressing {
            proto: beckon::catalog::Proto::Udp,
            src: "203.0.113.100".parse().unwrap(),
            src_port: 40000,
            dst: CAMERA_IP.parse().unwrap(),
            dst_port: dport,
        };
        base64::engine::general_purpose::STANDARD.encode(beckon::wire::trigger_packet::udp_pd1(&a, b"hostile"))
    };
    let ind = |id: u64, ip: &str, port: u16, proto: &str, pd1: String| {
        Message::Indication(Indication {
            id,
            camera_ip: ip.parse().unwrap(),
            camera_port: port,
            server_ip: "203.0.113.100".parse().unwrap(),
            server_port: 40000,
            proto: proto.parse().unwrap(),
            command: Command::Inject,
            pd1,
            direction: beckon::wire::control::Direction::ToCamera,
        })
    };
    let hostile = [
        (1, ind(1, "198.18.1.11", 5060, "udp", pd1(5060)), ErrorCode::NotAllowed),
        (2, ind(2, CAMERA_IP, 22, "udp", pd1(22)), ErrorCode::NotAllowed),
        (3, ind(3, CAMERA_IP, 5060, "tcp", pd1(5060)), ErrorCode::NotAllowed),
        (4, ind(4, "198.18.1.1", 5060, "udp", pd1(5060)), ErrorCode::NotAllowed),
        // A packet "from the server" at an address that is not the server's public_ip.
        (
            9,
            {
                let mut m = ind(9, CAMERA_IP, 5060, "udp", pd1(5060));
                if let Message::Indication(i) = &mut m {
                    i.server_ip = "198.51.100.7".parse().unwrap();
                }
                m
            },
            ErrorCode::NotAllowed,
        ),
        // The reverse direction (a packet *from* the camera) is held to the same allowlist.
        (
            8,
            {
                let mut m = ind(8, CAMERA_IP, 22, "udp", pd1(22));
                if let Message::Indication(i) = &mut m {
                    i.direction = beckon::wire::control::Direction::ToServer;
                }
                m
            },
            ErrorCode::NotAllowed,
        ),
        // Fields say 5060, the packet inside says 22.
        (5, ind(5, CAMERA_IP, 5060, "udp", pd1(22)), ErrorCode::InjectFailed),
        (6, ind(6, CAMERA_IP, 5060, "udp", "!!not base64!!".into()), ErrorCode::InjectFailed),
    ];
    for (id, m, code) in hostile {
        s.write_all(&encode(&m)).unwrap();
        match read_msg(&mut s) {
            Some(Message::Error { code: c, id: Some(i), .. }) => assert_eq!((i, c), (id, code)),
            other => panic!("indication {id}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(lab.tun_injected_packets("a"), 0, "nothing may be injected for refused indications");
    s.write_all(&encode(&ind(7, CAMERA_IP, 5060, "udp", pd1(5060)))).unwrap();
    match read_msg(&mut s) {
        Some(Message::IndicationResult { id: 7, injected_bytes }) => assert_eq!(injected_bytes, 20 + 8 + 7),
        other => panic!("expected the allowed indication to be injected, got {other:?}"),
    }
    assert_eq!(lab.tun_injected_packets("a"), 1);

    // An oversized frame from the server: the trigger drops the link and comes back.
    s.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
    s.flush().unwrap();
    assert!(matches!(read_msg(&mut s), Some(Message::Error { code: ErrorCode::TooLarge, .. })));
    let _again = accept(&listener, &tls);
    assert!(lab.log("trigger-a").contains("bad frame from server"));
}
