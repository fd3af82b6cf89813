//! TCP reach for unchanged clients through real Linux NATs. Site a: strict NAT (masquerade +
//! `ct state invalid drop`, default conntrack sysctls). Site b: the same plus
//! `nf_conntrack_tcp_be_liberal=1` (a lenient NAT). Both cameras are 198.18.1.10.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

fn tcp_server_config(lab: &Lab, port: u16) -> String {
    lab.write(
        "server-tcp.toml",
        &format!(
            r#"control_listen = "203.0.113.1:7443"
public_ip = "203.0.113.100"
wan_interface = "eth0"
state_dir = "{}"
keepalive_secs = 5
[[site]]
name = "site-a"
token = "token-a-0123456789"
[[site]]
name = "site-b"
token = "token-b-0123456789"
[[expose]]
camera = "site-a/cam1"
port = {port}
proto = "tcp"
listen = "127.0.0.1:18080"
[[expose]]
camera = "site-b/cam1"
port = {port}
proto = "tcp"
listen = "127.0.0.1:18081"
"#,
            lab.state_dir()
        ),
    )
}

fn start(lab: &mut Lab, port: u16) {
    let cfg = tcp_server_config(lab, port);
    lab.spawn("server", "srv", &["server", "--config", &cfg]);
    wait_for(Duration::from_secs(10), "server admin endpoint", || {
        lab.try_status().is_some()
    });
    for site in ["a", "b"] {
        let ca = format!("{}/ca.pem", lab.state_dir());
        let cfg = lab.write(
            &format!("trigger-{site}.toml"),
            &format!(
                "server = \"203.0.113.1:7443\"\nca = \"{ca}\"\nsite = \"site-{site}\"\ntoken = \"token-{site}-0123456789\"\n[[camera]]\nname = \"cam1\"\nip = \"{CAMERA_IP}\"\ndevice_type = \"hikvision\"\n"
            ),
        );
        lab.spawn(
            &format!("trigger-{site}"),
            &format!("trg-{site}"),
            &["trigger", "--config", &cfg],
        );
    }
    // Both sites registered and profiled.
    wait_for(Duration::from_secs(30), "site profiles", || {
        lab.try_status().is_some_and(|s| {
            s["sites"]
                .as_array()
                .unwrap()
                .iter()
                .all(|x| !x["profile"].is_null())
        })
    });
}

fn site<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()
}

/// HTTP/1.0 GET through an exposure (from inside the server namespace): raw response bytes.
fn get_raw(lab: &Lab, port: u16, path: &str) -> Vec<u8> {
    let path = path.to_string();
    lab.in_ns("srv", move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        out
    })
}

fn get(lab: &Lab, port: u16, path: &str) -> String {
    String::from_utf8_lossy(&get_raw(lab, port, path)).into_owned()
}

#[test]
fn http_through_strict_and_lenient_nats_direct_where_possible() {
    let mut lab = Lab::up("bk-t1", &["--liberal-b"]);
    start(&mut lab, 80);
    let st = lab.status();
    let (pa, pb) = (
        &site(&st, "site-a")["profile"],
        &site(&st, "site-b")["profile"],
    );
    // Strict NAT: neither direct strategy carries data; the profile says why.
    assert!(pa["direct_strategy"].is_null(), "{pa:#}");
    assert!(pa["tcp"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["works"] == false && !r["detail"].as_str().unwrap().is_empty()));
    // Lenient NAT: reverse-syn works, the patent's SYN form still does not (its SYN-ACK is INVALID).
    assert_eq!(pb["direct_strategy"], "reverse-syn", "{pb:#}");
    let patent = pb["tcp"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["strategy"] == "patent-syn")
        .unwrap();
    assert_eq!(patent["works"], false);

    // Each exposure returns its own camera's page; the camera's view of its peer tells the path:
    // the trigger's LAN address (assisted) or the server's public IP (direct through the NAT).
    let a = get(&lab, 18080, "/");
    let b = get(&lab, 18081, "/");
    assert!(
        a.contains("<h1>camera cam-a</h1>") && a.contains("you are 198.18.1.20:"),
        "{a}"
    );
    assert!(
        b.contains("<h1>camera cam-b</h1>") && b.contains("you are 203.0.113.100:"),
        "{b}"
    );

    // Many clients at once on both exposures.
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let port = if i % 2 == 0 { 18080 } else { 18081 };
            let ns = lab.ns("srv");
            std::thread::spawn(move || {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &ns,
                        "curl",
                        "-s",
                        "-m",
                        "30",
                        &format!("http://127.0.0.1:{port}/"),
                    ])
                    .output()
                    .unwrap();
                (port, String::from_utf8_lossy(&out.stdout).into_owned())
            })
        })
        .collect();
    for h in handles {
        let (port, body) = h.join().unwrap();
        let want = if port == 18080 {
            "camera cam-a"
        } else {
            "camera cam-b"
        };
        assert!(body.contains(want), "{port}: {body}");
    }

    // Bulk transfers arrive complete on both paths.
    for port in [18080, 18081] {
        let body = get_raw(&lab, port, "/bulk?bytes=20000000");
        let payload = body
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| body.len() - i - 4)
            .unwrap_or(0);
        assert_eq!(payload, 20_000_000, "exposure {port}");
    }

    let st = lab.status();
    let c = &st["counters"];
    assert_eq!(c["tcp_connections_direct"], 22, "{c:#}");
    assert_eq!(c["tcp_connections_assisted"], 22, "{c:#}");
    assert_eq!(c["tcp_connections_failed"], 0);
    assert!(c["tcp_bytes_direct"].as_u64().unwrap() > 20_000_000);
    assert!(c["tcp_bytes_assisted"].as_u64().unwrap() > 20_000_000);
    // Direct connections cost one trigger packet each (the reverse SYN), whatever their size;
    // the profile's probes cost at most 3 per strategy per site.
    assert!(counter(&st, "trigger_packets_injected") <= 22 + 12, "{c:#}");
    assert!(
        st["connections"].as_array().unwrap().is_empty(),
        "closed connections are freed"
    );
    assert!(lab.tun_injected_packets("b") <= 22 + 6);
}

fn ffmpeg(lab: &Lab, port: u16, secs: u32) -> std::process::Child {
    let log = std::fs::File::create(lab.dir.join(format!("ffmpeg-{port}.log"))).unwrap();
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("srv"),
            "timeout",
            "60",
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "info",
            "-rtsp_transport",
            "tcp",
        ])
        .args([
            "-i",
            &format!("rtsp://127.0.0.1:{port}/stream"),
            "-t",
            &secs.to_string(),
            "-f",
            "null",
            "-",
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn frames(lab: &Lab, port: u16) -> u64 {
    let log = std::fs::read_to_string(lab.dir.join(format!("ffmpeg-{port}.log"))).unwrap();
    log.rsplit("frame=")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn rtsp_from_both_sites_while_the_direct_sites_trigger_dies() {
    let mut lab = Lab::up("bk-t2", &["--liberal-b", "--rtsp"]);
    start(&mut lab, 554);
    let mut fa = ffmpeg(&lab, 18080, 14);
    let mut fb = ffmpeg(&lab, 18081, 14);
    wait_for(Duration::from_secs(10), "both streams flowing", || {
        lab.status()["connections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["bytes_from_camera"].as_u64().unwrap_or(0) > 10_000)
            .count()
            == 2
    });
    let st = lab.status();
    let conns = st["connections"].as_array().unwrap();
    let ca = conns.iter().find(|c| c["camera"] == "site-a/cam1").unwrap();
    let cb = conns.iter().find(|c| c["camera"] == "site-b/cam1").unwrap();
    assert_eq!(ca["path"], "assisted", "{ca:#}");
    assert!(
        ca["note"].as_str().unwrap().contains("does not work"),
        "{ca:#}"
    );
    assert_eq!(cb["path"], "direct", "{cb:#}");
    assert_eq!(cb["strategy"], "reverse-syn");
    assert!(cb["public_endpoint"]
        .as_str()
        .unwrap()
        .starts_with("203.0.113.3:"));
    let injected_before = lab.tun_injected_packets("b");

    // The lenient site's trigger dies mid-stream; its direct stream goes on.
    lab.kill("trigger-b");
    let (sa, sb) = (fa.wait().unwrap(), fb.wait().unwrap());
    assert!(sa.success() && sb.success(), "ffmpeg failed: {sa:?} {sb:?}");
    // 14 s at 25 fps = 350 frames; allow for start-up.
    let (na, nb) = (frames(&lab, 18080), frames(&lab, 18081));
    assert!(
        na >= 300 && nb >= 300,
        "decoded frames: site-a {na}, site-b {nb}"
    );
    let st = lab.status();
    assert!(!site(&st, "site-b")["connected"].as_bool().unwrap());
    // The direct connection cost one trigger packet; the stream's bytes never touched the trigger.
    assert!(cb["trigger_packets"].as_u64().unwrap() <= 3);
    assert!(
        injected_before <= 1 + 6,
        "trigger b injected {injected_before} packets (profile + 1 connection)"
    );
    assert!(st["counters"]["tcp_bytes_direct"].as_u64().unwrap() > 100_000);
}
