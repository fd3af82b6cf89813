//! TCP reach for unchanged clients through real Linux NATs. Site a: strict NAT (masquerade +
//! `ct state invalid drop`, default conntrack sysctls). Site b: the same plus
//! `nf_conntrack_tcp_be_liberal=1` (a lenient NAT). Both cameras are 198.18.1.10.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::Duration;

/// server.toml: exposures of both cameras' RTSP (127.0.0.1:18080 → a, :18081 → b) and HTTP
/// (:18090 → a, :18091 → b), keepalive 5 s; `direct_a = false` sends site a's TCP over the
/// assisted path.
fn tcp_server_toml(direct_a: bool) -> ServerToml {
    ServerToml::new(5)
        .site("site-a", "token-a-0123456789", Some(direct_a))
        .site("site-b", "token-b-0123456789", None)
        .expose("site-a/cam1", 554, "tcp", "127.0.0.1:18080")
        .expose("site-b/cam1", 554, "tcp", "127.0.0.1:18081")
        .expose("site-a/cam1", 80, "tcp", "127.0.0.1:18090")
        .expose("site-b/cam1", 80, "tcp", "127.0.0.1:18091")
}

fn start(lab: &mut Lab, direct_a: bool) {
    start_with(lab, tcp_server_toml(direct_a))
}

/// Server with config `server`, both sites' triggers, and both sites profiled.
fn start_with(lab: &mut Lab, server: ServerToml) {
    let cfg = server.write(lab, "server-tcp.toml");
    lab.spawn("server", "srv", &["server", "--config", &cfg]);
    wait_for(Duration::from_secs(10), "server admin endpoint", || lab.try_status().is_some());
    for site in ["a", "b"] {
        let ca = format!("{}/ca.pem", lab.state_dir());
        let cfg = lab.write(
            &format!("trigger-{site}.toml"),
            &format!(
                "server = \"203.0.113.1:7443\"\nca = \"{ca}\"\nsite = \"site-{site}\"\ntoken = \"token-{site}-0123456789\"\n[[camera]]\nname = \"cam1\"\nip = \"{CAMERA_IP}\"\ndevice_type = \"hikvision\"\n"
            ),
        );
        lab.spawn(&format!("trigger-{site}"), &format!("trg-{site}"), &["trigger", "--config", &cfg]);
    }
    // Both sites registered and profiled (a profile retries failed strategies once: ≤ ~15 s).
    wait_for(Duration::from_secs(40), "site profiles", || {
        lab.try_status().is_some_and(|s| s["sites"].as_array().unwrap().iter().all(|x| !x["profile"].is_null()))
    });
}

fn site<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["sites"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()
}

/// Connect to an exposure (from inside the server namespace) without sending anything and read
/// until the end: what arrived, or how the connection failed (a refused client is reset).
fn read_to_end(lab: &Lab, port: u16) -> Result<Vec<u8>, std::io::ErrorKind> {
    lab.in_ns("srv", move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).map(|_| out).map_err(|e| e.kind())
    })
}

/// HTTP/1.0 GET through an exposure (from inside the server namespace), half-closing after the
/// request: raw response bytes.
fn get_raw(lab: &Lab, port: u16, path: &str) -> Vec<u8> {
    let path = path.to_string();
    lab.in_ns("srv", move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        // Half-close: the request is complete. The answer must still arrive (beckon carries
        // the FIN towards the camera and keeps the other direction open).
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        out
    })
}

/// The body of a `/bulk` response (after the header), checked byte by byte against the lab
/// camera's pattern (byte p is (p % 65536) % 251, scripts/lab/cam_http.py): bytes lost,
/// duplicated or moved on the way fail here, not only a wrong length (unless by a multiple of
/// 251 bytes, or of 64 KiB at a chunk boundary: segments carry 1448 bytes or up to 64 KiB less
/// headers, neither of which is one). Returns its length.
fn bulk_body_len(response: &[u8], what: &str) -> usize {
    let start = response.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4).unwrap_or(response.len());
    let body = &response[start..];
    if let Some(p) = body.iter().enumerate().position(|(p, &b)| b != ((p % 65536) % 251) as u8) {
        panic!("{what}: body byte {p} of {} is {}, the camera sent {}", body.len(), body[p], (p % 65536) % 251);
    }
    body.len()
}

/// GET `path` and read until the end: Ok(bytes) at a clean end (FIN), the error kind otherwise.
fn get_until_end(lab: &Lab, port: u16, path: &str) -> Result<Vec<u8>, std::io::ErrorKind> {
    let path = path.to_string();
    lab.in_ns("srv", move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).map(|_| out).map_err(|e| e.kind())
    })
}

fn get(lab: &Lab, port: u16, path: &str) -> String {
    String::from_utf8_lossy(&get_raw(lab, port, path)).into_owned()
}

fn profile_result<'a>(p: &'a serde_json::Value, strategy: &str) -> &'a serde_json::Value {
    p["tcp"].as_array().unwrap().iter().find(|r| r["strategy"] == strategy).unwrap_or_else(|| panic!("{strategy} not measured: {p:#}"))
}

/// Site a: a strict NAT (OpenWrt-like: masquerade + invalid drop, default sysctls). Site b: a
/// lenient NAT (`tcp_be_liberal=1`). Both reach their camera's web page directly.
#[test]
fn http_direct_through_strict_and_lenient_nats() {
    let mut lab = Lab::up("bk-t1", &["--liberal-b"]);
    start(&mut lab, true);
    let st = lab.status();
    let (pa, pb) = (&site(&st, "site-a")["profile"], &site(&st, "site-b")["profile"]);
    // Strict NAT: the patent's SYN form and reverse-syn fail, with the reason; the steered
    // resync works, by TTL and by TCP-MD5.
    assert_eq!(profile_result(pa, "patent-syn")["works"], false, "{pa:#}");
    assert_eq!(profile_result(pa, "reverse-syn")["works"], false, "{pa:#}");
    assert!(!profile_result(pa, "reverse-syn")["detail"].as_str().unwrap().is_empty());
    assert_eq!(profile_result(pa, "steered-resync/ttl")["works"], true, "{pa:#}");
    assert_eq!(profile_result(pa, "steered-resync/md5")["works"], true, "{pa:#}");
    assert_eq!(pa["direct_strategy"], "steered-resync/ttl");
    // UDP behaviour of a plain Linux masquerade: keeps ports, filters by address and port.
    let ua = &pa["udp"];
    assert_eq!(ua["port_preserved"], true, "{ua:#}");
    assert_eq!(ua["mapping"], "endpoint-independent", "{ua:#}");
    assert_eq!(ua["filtering"], "address-and-port-dependent", "{ua:#}");
    // Lenient NAT: reverse-syn works (and is cheaper); the patent's SYN-ACK is still INVALID.
    assert_eq!(profile_result(pb, "patent-syn")["works"], false, "{pb:#}");
    assert_eq!(pb["direct_strategy"], "reverse-syn", "{pb:#}");

    // Each exposure returns its own camera's page, and the camera saw the server's public IP:
    // the connection crossed the NAT directly.
    let a = get(&lab, 18090, "/");
    let b = get(&lab, 18091, "/");
    assert!(a.contains("<h1>camera cam-a</h1>") && a.contains("you are 203.0.113.100:"), "{a}");
    assert!(b.contains("<h1>camera cam-b</h1>") && b.contains("you are 203.0.113.100:"), "{b}");

    // A camera that aborts its connection: the client sees a reset, not a clean end (which
    // would pass a truncated answer off as complete).
    for port in [18090, 18091] {
        assert_eq!(get_until_end(&lab, port, "/reset"), Err(std::io::ErrorKind::ConnectionReset), "port {port}");
    }

    // Many clients at once on both exposures.
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let port = if i % 2 == 0 { 18090 } else { 18091 };
            let ns = lab.ns("srv");
            std::thread::spawn(move || {
                let out = Command::new("ip")
                    .args(["netns", "exec", &ns, "curl", "-s", "-m", "30", &format!("http://127.0.0.1:{port}/")])
                    .output()
                    .unwrap();
                (port, String::from_utf8_lossy(&out.stdout).into_owned())
            })
        })
        .collect();
    for h in handles {
        let (port, body) = h.join().unwrap();
        let want = if port == 18090 { "camera cam-a" } else { "camera cam-b" };
        assert!(body.contains(want), "{port}: {body}");
    }

    // Bulk transfers arrive complete, also fast ones through the strict NAT (conntrack must
    // track the window scaling of a steered connection, or it resets it mid-transfer).
    for i in 0..5 {
        let what = format!("steered transfer {i}");
        assert_eq!(bulk_body_len(&get_raw(&lab, 18090, "/bulk?bytes=50000000"), &what), 50_000_000, "{what}");
    }
    for port in [18090, 18091] {
        let what = format!("exposure {port}");
        assert_eq!(bulk_body_len(&get_raw(&lab, port, "/bulk?bytes=20000000"), &what), 20_000_000, "{what}");
    }

    let st = lab.status();
    let c = &st["counters"];
    assert_eq!(c["tcp_connections_direct"], 51, "{c:#}");
    assert_eq!(c["tcp_connections_assisted"], 0, "{c:#}");
    assert_eq!(c["tcp_connections_failed"], 0);
    assert!(c["tcp_bytes_direct"].as_u64().unwrap() > 40_000_000);
    assert!(st["connections"].as_array().unwrap().is_empty(), "closed connections are freed");
    // Trigger packets: 3 per steered connection (site a), 1 per reverse-syn one (site b), plus
    // the profile's probes (at most 3 per strategy and try).
    let (ta, tb) = (lab.tun_injected_packets("a"), lab.tun_injected_packets("b"));
    eprintln!("trigger packets injected: site a {ta} (28 connections), site b {tb} (23 connections)");
    assert!(ta <= 28 * 3 + 40, "site a injected {ta}");
    assert!(tb <= 23 + 40, "site b injected {tb}");
}

/// With direct TCP disabled for site a, its connections are trigger-assisted: page, bulk and an
/// RTSP stream work; site b's stream is direct and survives its trigger's death.
#[test]
fn assisted_and_direct_rtsp_while_the_direct_sites_trigger_dies() {
    let mut lab = Lab::up("bk-t2", &["--liberal-b", "--rtsp"]);
    start(&mut lab, false);
    let st = lab.status();
    assert!(site(&st, "site-a")["profile"]["summary"].as_str().unwrap().contains("direct_tcp = false"));
    let a = get(&lab, 18090, "/");
    assert!(a.contains("<h1>camera cam-a</h1>") && a.contains("you are 198.18.1.20:"), "assisted: the camera sees the trigger: {a}");
    assert_eq!(bulk_body_len(&get_raw(&lab, 18090, "/bulk?bytes=20000000"), "assisted transfer"), 20_000_000);

    let streams = start_both_streams(&lab, Duration::from_secs(10));
    let st = lab.status();
    let conns = st["connections"].as_array().unwrap();
    let ca = conns.iter().find(|c| c["camera"] == "site-a/cam1").unwrap();
    let cb = conns.iter().find(|c| c["camera"] == "site-b/cam1").unwrap();
    assert_eq!(ca["path"], "assisted", "{ca:#}");
    assert!(ca["note"].as_str().unwrap().contains("direct_tcp = false"), "{ca:#}");
    assert_eq!(cb["path"], "direct", "{cb:#}");
    assert_eq!(cb["strategy"], "reverse-syn");
    assert!(cb["public_endpoint"].as_str().unwrap().starts_with("203.0.113.3:"));

    lab.kill("trigger-b");
    both_streams_completed(&lab, streams);
    let st = lab.status();
    assert!(!site(&st, "site-b")["connected"].as_bool().unwrap());
    assert!(cb["trigger_packets"].as_u64().unwrap() <= 3);
    assert!(st["counters"]["tcp_bytes_assisted"].as_u64().unwrap() > 20_000_000);
}

/// Starts a 14 s RTSP stream from each camera at once (ffmpeg through :18080 → a and
/// :18081 → b) and returns once both are flowing (over 10 kB from each camera) within `limit`.
fn start_both_streams(lab: &Lab, limit: Duration) -> (Child, Child) {
    let streams = (ffmpeg(lab, 18080, 14), ffmpeg(lab, 18081, 14));
    wait_for(limit, "both streams flowing", || {
        lab.status()["connections"].as_array().unwrap().iter().filter(|c| c["bytes_from_camera"].as_u64().unwrap_or(0) > 10_000).count()
            == 2
    });
    streams
}

/// Waits for the streams of `start_both_streams` to end: both ffmpeg runs succeeded and each
/// decoded at least 300 frames (so neither stream stalled when the tests killed triggers).
fn both_streams_completed(lab: &Lab, (mut fa, mut fb): (Child, Child)) {
    let (sa, sb) = (fa.wait().unwrap(), fb.wait().unwrap());
    assert!(sa.success() && sb.success(), "ffmpeg failed: {sa:?} {sb:?}");
    let (na, nb) = (frames(lab, 18080), frames(lab, 18081));
    assert!(na >= 300 && nb >= 300, "decoded frames: site-a {na}, site-b {nb}");
}

fn ffmpeg(lab: &Lab, port: u16, secs: u32) -> Child {
    let log = std::fs::File::create(lab.dir.join(format!("ffmpeg-{port}.log"))).unwrap();
    Command::new("ip")
        .args(["netns", "exec", &lab.ns("srv"), "timeout", "60", "ffmpeg", "-nostdin", "-loglevel", "info", "-rtsp_transport", "tcp"])
        .args(["-i", &format!("rtsp://127.0.0.1:{port}/stream"), "-t", &secs.to_string(), "-f", "null", "-"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn frames(lab: &Lab, port: u16) -> u64 {
    let log = std::fs::read_to_string(lab.dir.join(format!("ffmpeg-{port}.log"))).unwrap();
    log.rsplit("frame=").next().and_then(|s| s.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Both sites behind strict NATs (site b with `masquerade random,fully-random`): RTSP from both
/// at once goes direct by the steered resync, and survives both triggers being killed.
#[test]
fn rtsp_direct_through_two_strict_nats_while_both_triggers_die() {
    let mut lab = Lab::up("bk-t3", &["--mode-b", "random-invdrop", "--rtsp"]);
    start(&mut lab, true);
    // `random,fully-random` masquerade: a random port per mapping.
    let ub = &site(&lab.status(), "site-b")["profile"]["udp"].clone();
    assert_eq!(ub["port_preserved"], false, "{ub:#}");
    assert_eq!(ub["mapping"], "endpoint-dependent", "{ub:#}");
    let streams = start_both_streams(&lab, Duration::from_secs(15));
    let st = lab.status();
    for c in st["connections"].as_array().unwrap() {
        assert_eq!(c["path"], "direct", "{c:#}");
        assert_eq!(c["strategy"], "steered-resync", "{c:#}");
        assert!(["ttl", "md5"].contains(&c["steering"].as_str().unwrap()), "{c:#}");
        assert!(c["trigger_packets"].as_u64().unwrap() <= 4, "{c:#}");
        assert_eq!(c["round_trips"], 3);
        // A LAN-like WAN (no delay): a timer could not save anything, so nothing is timed.
        assert_eq!(c["timed_steps"], 0, "{c:#}");
    }
    for name in ["site-a", "site-b"] {
        let summary = site(&st, name)["timed_steps"].as_str().unwrap_or_default().to_string();
        assert!(summary.starts_with("none (the WAN round trip"), "{name}: {summary}");
    }
    lab.kill("trigger-a");
    lab.kill("trigger-b");
    both_streams_completed(&lab, streams);
    let st = lab.status();
    assert!(st["sites"].as_array().unwrap().iter().all(|s| s["connected"] == false));
    assert_eq!(st["counters"]["tcp_bytes_assisted"], 0);
}

/// 5% loss on every WAN link: 20 connections in a row to each strict site all succeed (by
/// retransmitted steps, the other steering method, or the assisted path), counted by path.
#[test]
fn lossy_wan_twenty_connections_per_site_all_succeed() {
    let mut lab = Lab::up("bk-t4", &["--mode-b", "random-invdrop", "--loss", "5"]);
    start(&mut lab, true);
    for i in 0..20 {
        for (port, cam) in [(18090, "cam-a"), (18091, "cam-b")] {
            let out = Command::new("ip")
                .args(["netns", "exec", &lab.ns("srv"), "curl", "-s", "-m", "30", &format!("http://127.0.0.1:{port}/")])
                .output()
                .unwrap();
            let body = String::from_utf8_lossy(&out.stdout);
            assert!(body.contains(&format!("camera {cam}")), "connection {i} to {cam} failed: {body}");
        }
    }
    let st = lab.status();
    let c = &st["counters"];
    let (direct, assisted) = (c["tcp_connections_direct"].as_u64().unwrap(), c["tcp_connections_assisted"].as_u64().unwrap());
    eprintln!(
        "5% loss: {direct} direct, {assisted} assisted, {} direct attempts fell back; trigger packets a {} b {}; profiles: {} / {}",
        c["tcp_direct_fallbacks"],
        lab.tun_injected_packets("a"),
        lab.tun_injected_packets("b"),
        site(&st, "site-a")["profile"]["summary"],
        site(&st, "site-b")["profile"]["summary"]
    );
    assert_eq!(direct + assisted, 40, "{c:#}");
    assert_eq!(c["tcp_connections_failed"], 0);
}

/// A NAT with a short TCP timeout (established entries expire after 8 s idle): an idle direct
/// RTSP connection survives 25 s of silence because the server's TCP keepalives (every
/// keepalive_secs = 5 s, answered by the camera's own stack) refresh the NAT's entry.
/// The server serves one TCP client at a time (`max_tcp_clients = 1`): while the idle one is
/// open, a client of another exposure is reset at once (the limit is the server's), and one is
/// admitted again after the first has left.
#[test]
fn idle_direct_tcp_survives_a_short_nat_tcp_timeout() {
    let mut lab = Lab::up("bk-t5", &["--rtsp"]);
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns("nat-a"), "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_timeout_established=8"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    start_with(&mut lab, tcp_server_toml(true).max_tcp_clients(1));
    let idle = lab.spawn_in_ns("srv", || {
        let mut s = TcpStream::connect(("127.0.0.1", 18080)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut ask = |cseq: u32| {
            write!(s, "OPTIONS rtsp://127.0.0.1:18080/stream RTSP/1.0\r\nCSeq: {cseq}\r\n\r\n").unwrap();
            let mut buf = [0u8; 2048];
            let n = s.read(&mut buf).unwrap_or(0);
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        let first = ask(1);
        std::thread::sleep(Duration::from_secs(25));
        let second = ask(2);
        (first, second)
    });
    wait_for(Duration::from_secs(10), "the idle client's connection in status", || {
        lab.status()["connections"].as_array().unwrap().len() == 1
    });
    let refused = read_to_end(&lab, 18090);
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionReset), "a second client while max_tcp_clients = 1 is served");
    let st = lab.status();
    assert_eq!(counter(&st, "tcp_clients_refused"), 1, "{:#}", st["counters"]);
    assert_eq!(lab.log_lines("server", &["TCP client refused (reset): max_tcp_clients are being served"]).len(), 1);

    let answers = idle.join().unwrap();
    assert!(answers.0.starts_with("RTSP/1.0 200 OK") && answers.0.contains("CSeq: 1"), "{}", answers.0);
    assert!(answers.1.starts_with("RTSP/1.0 200 OK") && answers.1.contains("CSeq: 2"), "after 25 s idle: {:?}", answers.1);
    let st = lab.status();
    assert_eq!(st["counters"]["tcp_connections_direct"], 1, "one connection, direct, kept alive: {:#}", st["counters"]);

    // The idle client has left: the next one is served.
    wait_for(Duration::from_secs(20), "the idle client's connection closed", || lab.status()["connections"].as_array().unwrap().is_empty());
    let page = get(&lab, 18090, "/");
    assert!(page.contains("<h1>camera cam-a</h1>"), "{page}");
    let st = lab.status();
    assert_eq!((counter(&st, "tcp_clients_refused"), counter(&st, "tcp_connections_direct")), (1, 2), "{:#}", st["counters"]);
}

/// Server ports of the direct connections to site a's camera web server that site a's NAT holds
/// open (conntrack's original direction is the steered sequence's first packet, camera:80 →
/// public_ip:port; a connection stays SYN_RECV until the camera sends its first segment).
fn established_web_connections(lab: &Lab) -> std::collections::BTreeSet<u16> {
    let out = Command::new("ip").args(["netns", "exec", &lab.ns("nat-a"), "conntrack", "-L", "-p", "tcp"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            (l.contains(" ESTABLISHED ") || l.contains(" SYN_RECV "))
                && l.contains(&format!("src={CAMERA_IP} "))
                && l.contains(" sport=80 ")
        })
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("dport=")).and_then(|p| p.parse().ok()))
        .collect()
}

/// `warm = 2`: two direct connections to the camera are kept pre-opened; a client gets one at
/// once (no traversal round trips), the pool refills, and unused connections are renewed every
/// 15 s with the old ones closed (the camera does not pile up idle connections).
#[test]
fn warm_connections_serve_clients_at_once_and_are_renewed() {
    let mut lab = Lab::up("bk-t6", &[]);
    start_with(&mut lab, tcp_server_toml(true).expose("site-a/cam1", 80, "tcp", "127.0.0.1:18092").warm(2));
    wait_for(Duration::from_secs(20), "two pre-opened connections at site a's NAT", || established_web_connections(&lab).len() == 2);
    let pooled = established_web_connections(&lab);

    // A client connects and waits before asking: its connection is one of the pool's.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let client = lab.spawn_in_ns("srv", move || {
        let mut s = TcpStream::connect(("127.0.0.1", 18092)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
        write!(s, "GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    let mut conn = serde_json::Value::Null;
    wait_for(Duration::from_secs(10), "the client's connection in status", || {
        conn = lab.status()["connections"].as_array().unwrap().iter().find(|c| c["warm"] == true).cloned().unwrap_or_default();
        !conn.is_null()
    });
    assert_eq!((conn["path"].as_str(), conn["round_trips"].as_u64()), (Some("direct"), Some(0)), "{conn:#}");
    tx.send(()).unwrap();
    let page = client.join().unwrap();
    assert!(page.contains("<h1>camera cam-a</h1>") && page.contains("you are 203.0.113.100:"), "{page}");
    let st = lab.status();
    assert_eq!(counter(&st, "tcp_connections_warm"), 1, "{:#}", st["counters"]);

    // The pool refills to two, and after the renewal age none of the first pool is left open.
    std::thread::sleep(Duration::from_secs(16));
    wait_for(Duration::from_secs(20), "a renewed pool of two", || {
        let now = established_web_connections(&lab);
        now.len() == 2 && now.is_disjoint(&pooled)
    });
    assert_eq!(counter(&lab.status(), "tcp_connections_failed"), 0);
    assert_eq!(counter(&lab.status(), "tcp_direct_fallbacks"), 0);
}

/// A 20 ms one-way WAN (a 40 ms round trip): on-demand direct connections time their steered
/// packets instead of waiting for the trigger's packets to come back. Site a's NAT keeps ports
/// (plain masquerade): steps 2+3 go out on the predicted mapping and step 4 on a timer, so the
/// camera connection waits for a single round trip. Site b's NAT randomises ports: only step 4
/// is timed (two round trips). Every connection is direct, has a window sized from the path, and
/// carries a 4 MB answer complete through the strict NATs (conntrack's window tracking follows
/// the timed resync).
#[test]
fn timed_steps_open_direct_connections_in_fewer_round_trips() {
    let mut lab = Lab::up("bk-t7", &["--delay-ms", "20", "--mode-b", "random-invdrop"]);
    // The bulk exposures ask for 1 Gbit/s: their windows are sized from the path (above the
    // 2 MiB floor a LAN-like path gets).
    start_with(
        &mut lab,
        ServerToml::new(5)
            .site("site-a", "token-a-0123456789", Some(true))
            .site("site-b", "token-b-0123456789", None)
            .expose("site-a/cam1", 80, "tcp", "127.0.0.1:18090")
            .rate_mbit(1000)
            .expose("site-b/cam1", 80, "tcp", "127.0.0.1:18091")
            .rate_mbit(1000)
            .expose("site-b/cam1", 80, "tcp", "127.0.0.1:18092"),
    );
    const N: usize = 4_000_000;
    for i in 0..3 {
        for port in [18090, 18091] {
            let body =
                get_until_end(&lab, port, &format!("/bulk?bytes={N}")).unwrap_or_else(|e| panic!("connection {i} to :{port}: {e:?}"));
            let what = format!("connection {i} to :{port}");
            assert_eq!(bulk_body_len(&body, &what), N, "{what}: incomplete answer");
        }
    }
    let ups = |camera: &str| lab.log_lines("server", &["direct TCP connection up", camera]);
    for (camera, round_trips, timed) in [("site-a/cam1", 1, 2), ("site-b/cam1", 2, 1)] {
        let lines = ups(camera);
        assert_eq!(lines.len(), 3, "{lines:#?}");
        for l in &lines {
            assert!(
                l.contains(&format!("round_trips={round_trips}")) && l.contains(&format!("timed_steps={timed}")),
                "{camera}: want {round_trips} round trips and {timed} timed steps: {l}"
            );
            // The window is sized from the measured round trip (≈ 42 ms × 1 Gbit/s ≈ 5 MiB),
            // not the 2 MiB floor a LAN-like path gets.
            let kib: u64 = l.split("window_kib=").nth(1).and_then(|r| r.split(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0);
            assert!((4096..=8192).contains(&kib), "{camera}: window {kib} KiB: {l}");
        }
    }
    let st = lab.status();
    assert_eq!(counter(&st, "tcp_direct_fallbacks"), 0, "{:#}", st["counters"]);
    assert_eq!(counter(&st, "tcp_connections_direct"), 6, "{:#}", st["counters"]);
    assert!(lab.log_lines("server", &["timed steps failed"]).is_empty());
    let timing = |st: &serde_json::Value, name: &str| site(st, name)["timed_steps"].as_str().unwrap_or_default().to_string();
    assert!(timing(&st, "site-a").starts_with("steps 2+3 and 4"), "{}", timing(&st, "site-a"));
    assert!(timing(&st, "site-b").starts_with("step 4 "), "{}", timing(&st, "site-b"));

    // Site a's NAT starts picking random ports: the next connection's prediction is wrong. It
    // fails at once and the same connection goes direct step by step; the site's following
    // connections skip timed steps.
    lab.lab(&["router", &lab.prefix, "a", "random-invdrop"]);
    for i in 0..2 {
        let body =
            get_until_end(&lab, 18090, "/bulk?bytes=100000").unwrap_or_else(|e| panic!("after the NAT change, connection {i}: {e:?}"));
        assert!(body.len() > 100_000, "after the NAT change, connection {i}: {} bytes", body.len());
    }
    let failed = lab.log_lines("server", &["timed steps failed", "site-a/cam1"]);
    assert_eq!(failed.len(), 1, "{failed:#?}");
    let lines = ups("site-a/cam1");
    assert_eq!(lines.len(), 5, "{lines:#?}");
    for l in &lines[3..] {
        assert!(l.contains("round_trips=3") && l.contains("timed_steps=0"), "step by step after the failure: {l}");
    }
    let st = lab.status();
    assert_eq!(counter(&st, "tcp_connections_direct"), 8);
    assert!(timing(&st, "site-a").starts_with("none for"), "{}", timing(&st, "site-a"));

    // The default rate_mbit (128) opens a connection with the 2 MiB floor; a bulk transfer
    // through the 20 ms WAN moves more than half of that per round trip, so its window grows
    // (it would otherwise be held to ≈ 2 MiB per 42 ms).
    let grown_before = counter(&st, "tcp_windows_grown");
    const BULK: usize = 40_000_000;
    let body = get_until_end(&lab, 18092, &format!("/bulk?bytes={BULK}")).unwrap_or_else(|e| panic!("bulk at the default rate: {e:?}"));
    assert_eq!(bulk_body_len(&body, "bulk at the default rate"), BULK);
    let ups = lab.log_lines("server", &["direct TCP connection up", "site-b/cam1"]);
    assert_eq!(ups.len(), 4, "{ups:#?}");
    let up = &ups[3];
    assert!(up.contains("window_kib=2048 "), "the default rate opens with the floor: {up}");
    let st = lab.status();
    assert_eq!(counter(&st, "tcp_connections_direct"), 9);
    let grown = counter(&st, "tcp_windows_grown") - grown_before;
    assert!(grown >= 1, "the window never grew: {:#}", st["counters"]);
}

/// Site a's NAT passes the camera's handshake packets but none of its later segments (a NAT whose
/// state went wrong after the handshake, modelled by an nft rule). A direct connection whose
/// camera never answers must not hang its client: each such client is reset within seconds
/// (5 s of silence once its request was sent 3 times),
/// and the site moves on — timed steps off, then each failing steering skipped — until the
/// next client is served by the assisted path (the trigger connects on the LAN).
#[test]
fn a_camera_that_never_answers_through_the_nat_resets_the_client_and_the_site_moves_on() {
    let mut lab = Lab::up("bk-t8", &["--delay-ms", "20"]);
    start(&mut lab, true);
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns("nat-a"), "nft", "insert", "rule", "inet", "bk_filter", "forward"])
        .args("ip daddr 203.0.113.100 tcp sport 80 tcp flags & syn == 0 ct state established counter drop".split(' '))
        .output()
        .unwrap();
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));

    // Timed steps (ttl), then step by step with ttl, then with md5: each client reset.
    for (i, want) in ["(timed steps)", "strategy=steered-resync/ttl", "strategy=steered-resync/md5"].iter().enumerate() {
        let t0 = std::time::Instant::now();
        let got = get_until_end(&lab, 18090, "/");
        assert_eq!(got.err(), Some(std::io::ErrorKind::ConnectionReset), "client {i} must be reset, not served or hung");
        assert!(t0.elapsed() < Duration::from_secs(10), "client {i} reset after {:?}", t0.elapsed());
        let failed = lab.log_lines("server", &["direct connection failed", "nothing came back from the camera", "site-a/cam1"]);
        assert_eq!(failed.len(), i + 1, "{failed:#?}");
        assert!(failed[i].contains(want), "client {i}: want {want}: {}", failed[i]);
    }
    let st = lab.status();
    assert!(site(&st, "site-a")["timed_steps"].as_str().unwrap_or_default().starts_with("none for"), "{:#}", site(&st, "site-a"));
    // Both steerings skipped now: the assisted path serves the next client at once.
    let page = get(&lab, 18090, "/");
    assert!(page.contains("<h1>camera cam-a</h1>"), "{page}");
    let st = lab.status();
    assert_eq!(counter(&st, "tcp_connections_assisted"), 1, "{:#}", st["counters"]);
    assert_eq!(counter(&st, "tcp_connections_direct"), 3, "{:#}", st["counters"]);
    assert_eq!(counter(&st, "tcp_connections_failed"), 3, "{:#}", st["counters"]);
}

/// The overload guard. The server is stopped (SIGSTOP) for a moment while 2,000 datagrams more
/// than its TUN's queue holds arrive for `public_ip`: the kernel queues what fits in front of
/// the TUN and drops the rest, as it does in front of a server that cannot keep up. Once the
/// server runs again it sees the drops: new TCP clients are reset (counter, status, log) until
/// 5 s pass without drops, and then served again.
#[test]
fn a_server_that_drops_camera_packets_refuses_new_tcp_clients_for_a_while() {
    let mut lab = Lab::up("bk-t9", &[]);
    start(&mut lab, true);
    assert!(get(&lab, 18090, "/").contains("<h1>camera cam-a</h1>"));
    assert_eq!(lab.status()["overloaded"], false);
    let pid = lab.pid("server").unwrap().to_string();
    let signal = |sig: &str| assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    let link: serde_json::Value = serde_json::from_str(&lab.ip("srv", &["-j", "link", "show", "beckon0"])).unwrap();
    let qlen = link[0]["txqlen"].as_u64().unwrap_or_else(|| panic!("no txqlen in {link}")) as usize;
    signal("-STOP");
    lab.in_ns("srv", move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..qlen + 2000 {
            s.send_to(&[0u8; 64], "203.0.113.100:9").unwrap();
        }
    });
    signal("-CONT");
    let stats = lab.ip("srv", &["-s", "link", "show", "beckon0"]);
    wait_for(Duration::from_secs(3), "the server overloaded", || lab.status()["overloaded"] == true);
    let refused = read_to_end(&lab, 18090);
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionReset), "a new client while overloaded; TUN: {stats}");
    let st = lab.status();
    assert_eq!(counter(&st, "tcp_clients_refused_overloaded"), 1, "{:#}", st["counters"]);
    assert_eq!(counter(&st, "tcp_clients_refused"), 0, "{:#}", st["counters"]);
    assert_eq!(lab.log_lines("server", &["server overloaded: dropping camera packets"]).len(), 1, "{}", lab.log("server"));
    assert_eq!(lab.log_lines("server", &["TCP client refused (reset): the server is overloaded"]).len(), 1);
    // No more drops: after the guard's 5 s, clients are served again.
    wait_for(Duration::from_secs(10), "the overload over", || lab.status()["overloaded"] == false);
    assert!(get(&lab, 18090, "/").contains("<h1>camera cam-a</h1>"));
    assert_eq!(counter(&lab.status(), "tcp_clients_refused_overloaded"), 1);
}
