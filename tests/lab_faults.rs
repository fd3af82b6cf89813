//! Fault recovery (issue 5) in the real-NAT lab: a trigger killed and restarted, the server
//! killed and restarted, a NAT router that loses its conntrack state, a WAN link cut for 10 s,
//! and 50 sites registering and reconnecting together. Runs as root; each test builds its own
//! lab (prefixes bk-f1 … bk-f6). Each prints what it measured (`--nocapture` to see it).

mod common;
use common::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// keepalive_secs of the servers in these tests.
const K: u64 = 2;
/// How soon after a NAT fault new flows must be served again. The trigger pings its control
/// link every 5 s and so learns within one interval that the NAT forgot (and the server reset)
/// the link; until it reconnects no new mapping can be opened.
const RECOVERY: Duration = Duration::from_secs(12);

/// server.toml: sites a and b; UDP exposures of both cameras' port 5060 (127.0.0.1:15060 → a,
/// :15061 → b) and TCP exposures of their web servers (:18090 → a, :18091 → b).
fn server_toml(keepalive: u64) -> ServerToml {
    Lab::udp_server_toml(keepalive).expose("site-a/cam1", 80, "tcp", "127.0.0.1:18090").expose("site-b/cam1", 80, "tcp", "127.0.0.1:18091")
}

/// trigger.toml for `site` (its camera cam1 = 198.18.1.10 with udp/5060 and tcp/80).
fn trigger_toml(lab: &Lab, site: &str, token: &str, tun: &str) -> String {
    lab.write(
        &format!("trigger-{site}.toml"),
        &format!(
            r#"server = "203.0.113.1:7443"
ca = "{}/ca.pem"
site = "{site}"
token = "{token}"
tun_name = "{tun}"
[[camera]]
name = "cam1"
ip = "{CAMERA_IP}"
device_type = "generic"
ports = ["udp/5060", "tcp/80"]
"#,
            lab.state_dir()
        ),
    )
}

fn start_server(lab: &mut Lab, name: &str, cfg: &str) {
    lab.spawn(name, "srv", &["server", "--config", cfg]);
    wait_for(Duration::from_secs(10), "server admin endpoint", || lab.try_status().is_some());
}

/// Trigger of lab site `s` ("a" or "b") as process `name`.
fn start_trigger(lab: &mut Lab, name: &str, s: &str) {
    let cfg = trigger_toml(lab, &format!("site-{s}"), &format!("token-{s}-0123456789"), "beckon0");
    lab.spawn(name, &format!("trg-{s}"), &["trigger", "--config", &cfg]);
}

/// The site is connected, reported its camera, and has a NAT profile measured after `since`.
fn wait_profiled(lab: &Lab, site: &str, since: u64) {
    wait_for(Duration::from_secs(40), &format!("{site} registered and profiled"), || {
        lab.try_status().is_some_and(|s| {
            s["sites"].as_array().unwrap().iter().any(|x| {
                x["name"] == site
                    && x["connected"] == true
                    && !x["cameras"].as_array().unwrap().is_empty()
                    && x["profile"]["measured_unix"].as_u64().is_some_and(|t| t >= since)
            })
        })
    });
}

fn unix_secs() -> u64 {
    now_unix() as u64
}

/// One datagram from a fresh client (a new flow) to an exposure, waiting `wait` for the answer.
fn udp_once(lab: &Lab, port: u16, msg: &str, wait: Duration) -> Option<String> {
    let msg = msg.to_string();
    lab.in_ns("srv", move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(wait)).unwrap();
        s.send_to(msg.as_bytes(), ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 2048];
        s.recv_from(&mut buf).ok().map(|(n, _)| String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// A UDP client (socket created in the server namespace) that keeps its flow across calls.
fn udp_client(lab: &Lab, port: u16) -> Client {
    lab.in_ns("srv", move || Client::new(port))
}

/// HTTP/1.0 GET through a TCP exposure: the body, or why it failed.
fn http_get(lab: &Lab, port: u16, path: &str) -> Result<String, String> {
    let path = path.to_string();
    lab.in_ns("srv", move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out).into_owned();
        if text.starts_with("HTTP/1.") && text.contains("\r\n\r\n") {
            Ok(text)
        } else {
            Err(format!("no HTTP answer: {text:?}"))
        }
    })
}

/// Repeat `f` until it succeeds, at most `limit`: the time it took, or None.
fn time_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

// ---------------------------------------------------------------- live streams

/// A long HTTP download (`/bulk`) through a TCP exposure, read at `rate` bytes/s by the client
/// (TCP flow control paces the camera): a live stream that must never stall.
struct Download {
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<DownloadEnd>,
}

#[derive(Debug)]
struct DownloadEnd {
    bytes: u64,
    /// Longest time between two successful reads (pacing sleeps included).
    max_gap: Duration,
    /// Why the stream ended before it was stopped (EOF, reset, timeout).
    error: Option<String>,
}

impl Download {
    fn start(lab: &Lab, port: u16, rate: u64) -> Download {
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s) = (bytes.clone(), stop.clone());
        let handle = lab.spawn_in_ns("srv", move || {
            let mut end = DownloadEnd { bytes: 0, max_gap: Duration::ZERO, error: None };
            let mut sock = match TcpStream::connect(("127.0.0.1", port)) {
                Ok(x) => x,
                Err(e) => {
                    end.error = Some(format!("connect: {e}"));
                    return end;
                }
            };
            sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            sock.write_all(b"GET /bulk?bytes=1000000000 HTTP/1.0\r\n\r\n").unwrap();
            let mut buf = vec![0u8; 16384];
            let start = Instant::now();
            let mut last = start;
            while !s.load(Ordering::Relaxed) {
                match sock.read(&mut buf) {
                    Ok(0) => {
                        end.error = Some("EOF".into());
                        break;
                    }
                    Ok(n) => {
                        end.max_gap = end.max_gap.max(last.elapsed());
                        last = Instant::now();
                        end.bytes += n as u64;
                        b.store(end.bytes, Ordering::Relaxed);
                    }
                    Err(e) => {
                        end.error = Some(format!("read: {e}"));
                        break;
                    }
                }
                let due = start + Duration::from_secs_f64(end.bytes as f64 / rate as f64);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            end
        });
        Download { bytes, stop, handle }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn finish(self) -> DownloadEnd {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// A UDP client sending a numbered datagram every `every` on one socket (one flow) and
/// recording which were answered: a live signalling stream.
struct UdpStream {
    answered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    local: String,
    handle: JoinHandle<Vec<(f64, Option<f64>)>>,
}

impl UdpStream {
    fn start(lab: &Lab, port: u16, every: Duration) -> UdpStream {
        let answered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (answered.clone(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = lab.spawn_in_ns("srv", move || {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            tx.send(sock.local_addr().unwrap().to_string()).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
            // (send time, answer time)
            let mut sent: Vec<(f64, Option<f64>)> = Vec::new();
            let mut buf = [0u8; 2048];
            let mut next = Instant::now();
            let mut stop_at: Option<Instant> = None;
            loop {
                if stop_at.is_none() && s.load(Ordering::Relaxed) {
                    stop_at = Some(Instant::now() + Duration::from_millis(500));
                }
                if stop_at.is_some_and(|t| Instant::now() >= t) {
                    break;
                }
                if stop_at.is_none() && Instant::now() >= next {
                    let msg = format!("s{}", sent.len());
                    sock.send_to(msg.as_bytes(), ("127.0.0.1", port)).unwrap();
                    sent.push((now_unix(), None));
                    next += every;
                }
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    if let Some(i) = text.split_once(": s").and_then(|(_, i)| i.parse::<usize>().ok()) {
                        if i < sent.len() && sent[i].1.is_none() {
                            sent[i].1 = Some(now_unix());
                            a.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            sent
        });
        let local = rx.recv().unwrap();
        UdpStream { answered, stop, local, handle }
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    fn finish(self) -> Vec<(f64, Option<f64>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// The longest stretch (seconds) without an answer to a stream, and when it started (unix time
/// of the answer before it).
fn longest_outage(sent: &[(f64, Option<f64>)]) -> (f64, f64) {
    let mut ok: Vec<f64> = sent.iter().filter_map(|x| x.1).collect();
    ok.sort_by(f64::total_cmp);
    ok.windows(2).map(|w| (w[1] - w[0], w[0])).fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a })
}

/// TCP resets sent by the stack of namespace `ns` itself (`Tcp: OutRsts`): a NAT router that
/// lost a connection's conntrack entry answers its next inbound segment with one.
fn out_rsts(lab: &Lab, ns: &str) -> u64 {
    let out = std::process::Command::new("ip").args(["netns", "exec", &lab.ns(ns), "cat", "/proc/net/snmp"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap_or(""), tcp.next().unwrap_or(""));
    names.split_whitespace().zip(values.split_whitespace()).find(|(n, _)| *n == "OutRsts").and_then(|(_, v)| v.parse().ok()).unwrap_or(0)
}

/// Seconds after `t` (unix) of the first line of `name`'s log with all `needles` at or after `t`.
fn first_log_after(lab: &Lab, name: &str, needles: &[&str], t: f64) -> Option<f64> {
    lab.log_lines(name, needles).iter().filter_map(|l| log_line_time(l)).find(|x| *x >= t).map(|x| x - t)
}

/// The status row of the UDP flow of client `client` (its local address).
fn mapping_of(st: &serde_json::Value, client: &str) -> Option<serde_json::Value> {
    st["mappings"].as_array().unwrap().iter().find(|m| m["client"] == client).cloned()
}

// ---------------------------------------------------------------- 1. trigger death

/// Trigger killed with SIGKILL mid-stream and restarted: a direct TCP download and a UDP
/// signalling stream go on without a stall while it is dead and after; a new client cannot be
/// served while it is dead; the restarted trigger registers and reports again, and new UDP and
/// TCP connections work within 5 s of its start.
#[test]
fn trigger_killed_and_restarted() {
    let mut lab = Lab::up("bk-f1", &[]);
    let cfg = server_toml(K).write(&lab, "server.toml");
    start_server(&mut lab, "server", &cfg);
    start_trigger(&mut lab, "trigger-a", "a");
    wait_profiled(&lab, "site-a", 0);
    let reg0 = lab.site_status("site-a")["last_registered_unix"].as_u64().unwrap();
    let profile0 = lab.site_status("site-a")["profile"].clone();

    const RATE: u64 = 2_000_000;
    let dl = Download::start(&lab, 18090, RATE);
    let us = UdpStream::start(&lab, 15060, Duration::from_millis(100));
    wait_for(Duration::from_secs(15), "both streams flowing", || dl.bytes() > 1_000_000 && us.answered() >= 5);
    let st = lab.status();
    let conns = st["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1, "{st:#}");
    assert_eq!(conns[0]["path"], "direct", "{:#}", conns[0]);
    let conn_id = conns[0]["id"].clone();
    let conn_trg = conns[0]["trigger_packets"].as_u64().unwrap();
    let flow0 = mapping_of(&st, &us.local).expect("stream's mapping");
    assert_eq!(flow0["indications"], 1, "{flow0:#}");

    // SIGKILL: no goodbye; the kernel closes its links and the server sees the site offline.
    let t_kill = Instant::now();
    lab.kill("trigger-a");
    wait_for(Duration::from_secs(5), "site-a offline", || !lab.site_status("site-a")["connected"].as_bool().unwrap());
    let offline_after = t_kill.elapsed();
    let (b_dead, a_dead) = (dl.bytes(), us.answered());
    // Nobody can open a new mapping now (that is what the trigger is for).
    assert_eq!(udp_once(&lab, 15060, "while dead", Duration::from_millis(1500)), None, "a new flow was served without a trigger");
    std::thread::sleep(Duration::from_millis(2500));
    let dead_for = t_kill.elapsed();
    let (b_dead2, a_dead2) = (dl.bytes(), us.answered());
    // ≥ half the paced rate while the trigger was dead (≥ 4 s): the streams did not notice.
    assert!(b_dead2 - b_dead >= RATE * 3 / 2, "download stalled while the trigger was dead: {} bytes in 4 s", b_dead2 - b_dead);
    assert!(a_dead2 - a_dead >= 30, "UDP stream stalled while the trigger was dead: {} answers", a_dead2 - a_dead);

    // Restart: registers and reports again; new connections work within 5 s of its start.
    let t_start = Instant::now();
    start_trigger(&mut lab, "trigger-a2", "a");
    let t_reg =
        time_until(Duration::from_secs(10), || lab.site_connected("site-a")).expect("restarted trigger registers and reports within 10 s");
    let t_udp = time_until(Duration::from_secs(10), || {
        udp_once(&lab, 15060, "after restart", Duration::from_millis(300)).as_deref() == Some("cam-a: after restart")
    })
    .map(|_| t_start.elapsed());
    let t_tcp = time_until(Duration::from_secs(10), || http_get(&lab, 18090, "/").is_ok_and(|b| b.contains("<h1>camera cam-a</h1>")))
        .map(|_| t_start.elapsed());
    eprintln!(
        "bk-f1: site offline {offline_after:?} after SIGKILL; trigger dead {dead_for:?}; restarted trigger: \
         registered+reported {t_reg:?}, new UDP flow answered {t_udp:?}, new TCP connection served {t_tcp:?} after its start"
    );
    let t_udp = t_udp.expect("a new UDP flow is served after the restart");
    let t_tcp = t_tcp.expect("a new TCP connection is served after the restart");
    assert!(t_udp < Duration::from_secs(5), "new UDP flow after {t_udp:?}");
    assert!(t_tcp < Duration::from_secs(5), "new TCP connection after {t_tcp:?}");

    // The streams keep flowing after the restart too.
    let (b1, a1) = (dl.bytes(), us.answered());
    std::thread::sleep(Duration::from_secs(2));
    assert!(dl.bytes() - b1 >= RATE / 2, "download stalled after the restart");
    assert!(us.answered() - a1 >= 10, "UDP stream stalled after the restart");
    let st = lab.status();
    let conn = st["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == conn_id)
        .cloned()
        .expect("the download's connection is still open");
    // The stream needed no trigger packet since it was set up.
    assert_eq!(conn["trigger_packets"].as_u64().unwrap(), conn_trg);
    let flow = mapping_of(&st, &us.local).expect("stream's mapping");
    assert_eq!(flow["indications"], 1, "the UDP stream never re-triggered: {flow:#}");
    assert_eq!(flow["public_endpoint"], flow0["public_endpoint"]);

    let end = dl.finish();
    let sent = us.finish();
    let lost = sent.iter().filter(|x| x.1.is_none()).count();
    let (outage, _) = longest_outage(&sent);
    eprintln!(
        "bk-f1: download {} bytes, longest read gap {:?}, ended {:?}; UDP stream {} sent, {lost} unanswered, longest gap {outage:.2}s",
        end.bytes,
        end.max_gap,
        end.error,
        sent.len()
    );
    assert_eq!(end.error, None, "the download broke");
    assert!(end.max_gap < Duration::from_secs(1), "download stalled {:?}", end.max_gap);
    assert!(lost <= 1, "{lost} of {} UDP datagrams unanswered", sent.len());
    assert!(outage < 1.0, "UDP stream gap {outage:.2}s");

    // Re-registered and re-reported: two registrations and two reports in the server's log,
    // the registry's time moved on, the camera is listed.
    let site = lab.site_status("site-a");
    assert_eq!(site["connected"], true);
    assert_eq!(site["cameras"][0]["name"], "cam1", "{site:#}");
    assert!(site["last_registered_unix"].as_u64().unwrap() >= reg0);
    let regs = lab.log_lines("server", &["trigger registered", "site=site-a"]);
    let reports = lab.log_lines("server", &["camera reported", "site=\"site-a\""]).len()
        + lab.log_lines("server", &["camera reported", "site=site-a"]).len();
    assert_eq!(regs.len(), 2, "{regs:#?}");
    assert_eq!(reports, 2, "{}", lab.log("server"));
    // The NAT was measured once: the restarted trigger reported from the same address within
    // PROFILE_REUSE, so the site's profile (which found a direct strategy) was kept.
    assert_eq!(lab.log_lines("server", &["measuring the site's NAT", "site-a"]).len(), 1, "{}", lab.log("server"));
    assert_eq!(lab.log_lines("server", &["site profile kept", "site-a"]).len(), 1, "{}", lab.log("server"));
    assert_eq!(site["profile"]["measured_unix"], profile0["measured_unix"], "{site:#}");
    assert_eq!(site["profile"]["trigger_ip"], "203.0.113.2", "{site:#}");
}

// ---------------------------------------------------------------- 2. server death

/// Status rows of both lab sites: (connected, camera names, trigger_public).
fn sites_summary(st: &serde_json::Value) -> Vec<(String, bool, Vec<String>, String)> {
    st["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["connected"].as_bool().unwrap(),
                s["cameras"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect(),
                s["trigger_public"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Server killed with SIGKILL and restarted on the same state_dir. With the triggers stopped
/// first, the restarted server lists both sites and their cameras from the registry alone.
/// Killed again with the triggers running: both reconnect within their backoff, the exposures
/// serve new UDP flows and TCP connections, and status lists only the new flows (one per
/// client, one indication each) — nothing stale from before the crash, no duplicates.
#[test]
fn server_killed_and_restarted() {
    let mut lab = Lab::up("bk-f2", &["--mode-b", "random-invdrop"]);
    let cfg = server_toml(K).write(&lab, "server.toml");
    start_server(&mut lab, "server", &cfg);
    start_trigger(&mut lab, "trigger-a", "a");
    start_trigger(&mut lab, "trigger-b", "b");
    wait_profiled(&lab, "site-a", 0);
    wait_profiled(&lab, "site-b", 0);
    let ca = udp_client(&lab, 15060);
    let cb = udp_client(&lab, 15061);
    assert_eq!(ca.request(b"one", 3).as_deref(), Some(&b"cam-a: one"[..]));
    assert_eq!(cb.request(b"one", 3).as_deref(), Some(&b"cam-b: one"[..]));
    assert!(http_get(&lab, 18090, "/").unwrap().contains("camera cam-a"));
    let before = lab.status();
    let sites_before = sites_summary(&before);
    let reg_before: Vec<_> = before["sites"].as_array().unwrap().iter().map(|s| s["last_registered_unix"].clone()).collect();

    // 1. Triggers gone, then the server crashes: the registry alone must restore the sites.
    lab.kill("trigger-a");
    lab.kill("trigger-b");
    wait_for(Duration::from_secs(5), "both sites offline", || {
        lab.try_status().is_some_and(|s| s["sites"].as_array().unwrap().iter().all(|x| x["connected"] == false))
    });
    lab.kill("server");
    let proxy = lab.ip("srv", &["neigh", "show", "proxy"]);
    assert!(proxy.contains("203.0.113.100"), "SIGKILL leaves the proxy-ARP entry (the restart must cope): {proxy}");
    start_server(&mut lab, "server2", &cfg);
    let st = lab.status();
    let restored = sites_summary(&st);
    assert_eq!(restored.len(), 2, "{st:#}");
    for ((name, conn, cams, public), (bname, _, bcams, bpublic)) in restored.iter().zip(&sites_before) {
        assert_eq!(name, bname);
        assert!(!conn, "{name} cannot be connected: its trigger is dead");
        assert_eq!(cams, &vec!["cam1".to_string()], "{name}: {st:#}");
        assert_eq!(cams, bcams);
        assert_eq!(public, bpublic, "{name}: last known trigger endpoint");
    }
    let reg_after: Vec<_> = st["sites"].as_array().unwrap().iter().map(|s| s["last_registered_unix"].clone()).collect();
    assert_eq!(reg_after, reg_before);
    assert!(st["mappings"].as_array().unwrap().is_empty(), "{st:#}");
    assert!(st["connections"].as_array().unwrap().is_empty(), "{st:#}");
    assert_eq!(counter(&st, "flows_created"), 0);

    // 2. Triggers back, then the server crashes under them and comes straight back.
    start_trigger(&mut lab, "trigger-a2", "a");
    start_trigger(&mut lab, "trigger-b2", "b");
    wait_for(Duration::from_secs(10), "both sites connected", || lab.site_connected("site-a") && lab.site_connected("site-b"));
    // The profiles run now; they need the triggers too. Let them finish first.
    let since = unix_secs().saturating_sub(5);
    wait_profiled(&lab, "site-a", since);
    wait_profiled(&lab, "site-b", since);
    assert_eq!(ca.request(b"two", 3).as_deref(), Some(&b"cam-a: two"[..]));

    let t_kill = Instant::now();
    lab.kill("server2");
    start_server(&mut lab, "server3", &cfg);
    let t_up = t_kill.elapsed();
    let mut t_conn = HashMap::new();
    let t0 = Instant::now();
    while t_conn.len() < 2 && t0.elapsed() < Duration::from_secs(30) {
        if let Some(st) = lab.try_status() {
            for s in st["sites"].as_array().unwrap() {
                if s["connected"] == true {
                    t_conn.entry(s["name"].as_str().unwrap().to_string()).or_insert(t_kill.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // What the triggers logged: the delays they chose.
    let delays: Vec<String> = ["trigger-a2", "trigger-b2"]
        .iter()
        .flat_map(|t| lab.log_lines(t, &["control link down"]))
        .map(|l| l.split("control link down: ").nth(1).unwrap_or("").split(" server=").next().unwrap().to_string())
        .collect();
    eprintln!("bk-f2: server back {t_up:?} after SIGKILL; sites connected at {t_conn:?} after the kill; trigger log: {delays:#?}");
    assert_eq!(t_conn.len(), 2, "both triggers reconnect within 30 s: {t_conn:?}");
    // Backoff 0.5 s doubling, jittered to [d/2, d]: a trigger that failed its last attempt at
    // time T after the kill waits at most ≈ 2T + 0.5 s, so it is back within 2·(downtime) +
    // 0.5 s + connection set-up after the server listens again.
    let bound = t_up * 3 + Duration::from_millis(1500);
    for (site, t) in &t_conn {
        assert!(*t <= bound, "{site} reconnected {t:?} after the kill; server was back after {t_up:?}");
    }

    // Exposures serve new flows again: the old client (its flow died with the server) and a new
    // one; new TCP connections (assisted until the new profile is measured, then direct).
    let t_serve = Instant::now();
    assert_eq!(ca.request(b"three", 3).as_deref(), Some(&b"cam-a: three"[..]));
    assert_eq!(cb.request(b"three", 3).as_deref(), Some(&b"cam-b: three"[..]));
    let cn = udp_client(&lab, 15060);
    assert_eq!(cn.request(b"new", 3).as_deref(), Some(&b"cam-a: new"[..]));
    // TCP: no profile yet after a restart, so connections go assisted; the trigger's assist
    // link reconnects on its own backoff, a little after the control link, and a connection in
    // between is reset. Clients retry; within 5 s they must be served.
    let mut tcp_failures = Vec::new();
    for (port, cam) in [(18090, "cam-a"), (18091, "cam-b")] {
        let t = time_until(Duration::from_secs(5), || match http_get(&lab, port, "/") {
            Ok(b) => b.contains(&format!("camera {cam}")),
            Err(e) => {
                tcp_failures.push(format!("{cam}: {e}"));
                false
            }
        });
        assert!(t.is_some(), "{cam}: no TCP connection served within 5 s: {tcp_failures:?}");
    }
    eprintln!("bk-f2: UDP and TCP served {:?} after the reconnect; TCP attempts refused meanwhile: {tcp_failures:?}", t_serve.elapsed());

    // No stale or duplicate state: exactly the three flows made since the restart, one
    // indication each, both sites once with one camera, no open TCP connection.
    let st = lab.status();
    let maps = st["mappings"].as_array().unwrap();
    assert_eq!(maps.len(), 3, "{st:#}");
    assert_eq!(counter(&st, "flows_created"), 3);
    let clients: Vec<String> = [&ca, &cb, &cn].iter().map(|c| c.sock.local_addr().unwrap().to_string()).collect();
    for c in &clients {
        let m = mapping_of(&st, c).unwrap_or_else(|| panic!("no mapping for {c}: {st:#}"));
        assert_eq!(m["state"], "mapped", "{m:#}");
        assert_eq!(m["indications"], 1, "{m:#}");
    }
    let ports: std::collections::HashSet<_> = maps.iter().map(|m| m["server_port"].clone()).collect();
    assert_eq!(ports.len(), 3, "distinct server ports: {st:#}");
    assert!(st["connections"].as_array().unwrap().is_empty(), "{st:#}");
    let sites = sites_summary(&st);
    assert_eq!(sites.len(), 2);
    for (name, conn, cams, _) in &sites {
        assert!(conn, "{name}");
        assert_eq!(cams, &vec!["cam1".to_string()], "{name}");
    }
    // The registry file itself: two sites, one camera each, the current trigger endpoints.
    let reg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}/registry.json", lab.state_dir())).unwrap()).unwrap();
    let reg_sites = reg["sites"].as_object().unwrap();
    assert_eq!(reg_sites.len(), 2, "{reg:#}");
    for s in st["sites"].as_array().unwrap() {
        let r = &reg_sites[s["name"].as_str().unwrap()];
        assert_eq!(r["cameras"].as_array().unwrap().len(), 1, "{reg:#}");
        assert_eq!(r["trigger_public"], s["trigger_public"], "{reg:#}");
    }
    // Exactly one proxy-ARP entry for public_ip.
    let proxy = lab.ip("srv", &["neigh", "show", "proxy"]);
    assert_eq!(proxy.matches("203.0.113.100").count(), 1, "{proxy}");
}

// ---------------------------------------------------------------- 3./4. NAT faults

/// Site a with a strict NAT, keepalive K: an idle UDP flow (only keepalives keep it), a UDP
/// signalling stream (a datagram every 100 ms) and a paced direct TCP download, all set up.
struct Running {
    idle: Client,
    idle_local: String,
    stream: UdpStream,
    download: Download,
}

fn setup_running(lab: &mut Lab) -> Running {
    let cfg = server_toml(K).write(lab, "server.toml");
    start_server(lab, "server", &cfg);
    start_trigger(lab, "trigger-a", "a");
    wait_profiled(lab, "site-a", 0);
    let idle = udp_client(lab, 15060);
    assert_eq!(idle.request(b"idle", 3).as_deref(), Some(&b"cam-a: idle"[..]));
    let idle_local = idle.sock.local_addr().unwrap().to_string();
    let stream = UdpStream::start(lab, 15060, Duration::from_millis(100));
    let download = Download::start(lab, 18090, 1_000_000);
    // The idle flow lives on keepalives alone; wait until one was answered.
    wait_for(Duration::from_secs(4 * K), "idle flow keepalive answered, streams flowing", || {
        let st = lab.status();
        mapping_of(&st, &idle_local).is_some_and(|m| m["keepalives_answered"].as_u64().unwrap() >= 1)
            && stream.answered() >= 10
            && download.bytes() > 500_000
    });
    let st = lab.status();
    let m = mapping_of(&st, &idle_local).unwrap();
    assert_eq!(m["indications"], 1, "{m:#}");
    assert_eq!(st["connections"][0]["path"], "direct", "{st:#}");
    Running { idle, idle_local, stream, download }
}

/// When (seconds after `t_fault`, unix) the server first showed in its log that it noticed the
/// flow on `server_port` lost its NAT mapping: any line of the mapping table about that port
/// except learning a mapping (`NAT mapping gone (ICMP unreachable)`, `stopped answering
/// keepalives; dropped`), or a new indication for it (a re-trigger).
fn noticed_in_log(lab: &Lab, server_port: &serde_json::Value, t_fault: f64) -> Option<f64> {
    let port = format!("server_port={server_port}");
    lab.log_lines("server", &[&port])
        .iter()
        .filter(|l| (l.contains("udp_mapping") && !l.contains("learned NAT mapping")) || l.contains("indication sent"))
        .filter_map(|l| log_line_time(l))
        .find(|t| *t >= t_fault)
        .map(|t| t - t_fault)
}

/// Whether the status shows the flow of `client` as noticed lost compared with `before`: gone
/// (dropped), pending again, or with more indications (re-triggered).
fn noticed_in_status(st: &serde_json::Value, client: &str, before: &serde_json::Value) -> bool {
    match mapping_of(st, client) {
        None => true,
        Some(m) => m["state"] != "mapped" || m["indications"] != before["indications"],
    }
}

/// Watch the idle flow and the stream's flow for `limit` after a fault at `t_fault`: when the
/// server noticed each (seconds after the fault; the earlier of its log and its status).
fn detections(lab: &Lab, r: &Running, t_fault: f64, limit: Duration) -> (Option<f64>, Option<f64>) {
    let st = lab.status();
    let flows = [mapping_of(&st, &r.idle_local).unwrap(), mapping_of(&st, &r.stream.local).unwrap()];
    let clients = [r.idle_local.clone(), r.stream.local.clone()];
    let mut seen = [None, None];
    let t0 = Instant::now();
    while t0.elapsed() < limit && seen.iter().any(Option::is_none) {
        std::thread::sleep(Duration::from_millis(100));
        let st = lab.status();
        for i in 0..2 {
            if seen[i].is_none() && noticed_in_status(&st, &clients[i], &flows[i]) {
                seen[i] = Some(now_unix() - t_fault);
            }
        }
    }
    let mut out = [None, None];
    for i in 0..2 {
        let log = noticed_in_log(lab, &flows[i]["server_port"], t_fault);
        out[i] = match (log, seen[i]) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    (out[0], out[1])
}

/// The NAT router of site a loses its state (`conntrack -F`) while a UDP stream, an idle UDP
/// flow and a direct TCP download run through it: the server notices within two keepalive
/// intervals for both UDP flows (ICMP unreachable from the NAT, a re-trigger); without anyone
/// touching the site the stream is answered again, the idle flow answers its next datagram, and
/// new UDP and TCP clients are served, within RECOVERY. Whether the existing TCP connection
/// survives is printed, not asserted (it does when a camera segment re-creates the NAT entry
/// before a server segment meets the NAT, which then answers RST).
#[test]
fn nat_router_loses_its_state() {
    let mut lab = Lab::up("bk-f3", &[]);
    let r = setup_running(&mut lab);
    let base = lab.status();
    let rst0 = out_rsts(&lab, "nat-a");

    let t_fault = now_unix();
    lab.lab(&["flush", "bk-f3", "a"]);
    let det = detections(&lab, &r, t_fault, Duration::from_secs(3 * K));
    // Recovery without touching the site: the stream is answered again.
    let a_flush = r.stream.answered();
    let t_stream = time_until(RECOVERY, || r.stream.answered() > a_flush + 3).map(|_| Duration::from_secs_f64(now_unix() - t_fault));
    let st = lab.status();
    let flow = mapping_of(&st, &r.stream.local).expect("the stream's flow");
    let b_rec = r.download.bytes();
    std::thread::sleep(Duration::from_secs(1));
    let tcp_alive = r.download.bytes() > b_rec;
    assert!(t_stream.is_some(), "the UDP stream is not answered again within {RECOVERY:?} of the flush");

    // The idle flow: its next datagram is answered (re-triggered, or a new flow if the server
    // dropped the mapping meanwhile).
    assert_eq!(r.idle.request(b"after flush", 2).as_deref(), Some(&b"cam-a: after flush"[..]));
    // New clients.
    assert_eq!(udp_once(&lab, 15060, "new", Duration::from_secs(2)).as_deref(), Some("cam-a: new"));
    let body = http_get(&lab, 18090, "/").expect("new TCP connection after the flush");
    assert!(body.contains("camera cam-a"), "{body}");

    let sent = r.stream.finish();
    let end = r.download.finish();
    let (outage, at) = longest_outage(&sent);
    let st2 = lab.status();
    let idle_m = mapping_of(&st2, &r.idle_local);
    eprintln!(
        "bk-f3: detection after conntrack -F: idle flow {:?} s, stream flow {:?} s (K = {K} s); stream's longest gap {outage:.2} s \
         starting {:.2} s after the flush, its flow now {} indications, public {}; counters retriggers {} -> {}, dropped {} -> {}; \
         idle flow now {:?}; existing TCP download {} ({} bytes, ended {:?})",
        det.0,
        det.1,
        at - t_fault,
        flow["indications"],
        flow["public_endpoint"],
        counter(&base, "retriggers"),
        counter(&st2, "retriggers"),
        counter(&base, "mappings_dropped"),
        counter(&st2, "mappings_dropped"),
        idle_m.map(|m| (m["indications"].clone(), m["public_endpoint"].clone())),
        if tcp_alive { "survived" } else { "did not survive" },
        end.bytes,
        end.error,
    );
    let link_closed = first_log_after(&lab, "server", &["trigger link closed"], t_fault);
    let reregistered = first_log_after(&lab, "server", &["trigger registered"], t_fault);
    eprintln!(
        "bk-f3: stream answered again {t_stream:?} after the flush; control link closed by the server at {link_closed:?} s, \
         trigger registered again at {reregistered:?} s; TCP RSTs sent by the NAT router itself: {}",
        out_rsts(&lab, "nat-a") - rst0
    );
    let two_k = 2.0 * K as f64 + 0.5;
    let idle_det = det.0.expect("the server noticed the idle flow's lost mapping");
    let stream_det = det.1.expect("the server re-triggered the stream's flow");
    assert!(idle_det <= two_k, "idle flow noticed after {idle_det:.2} s");
    assert!(stream_det <= two_k, "stream flow re-triggered after {stream_det:.2} s");
    assert!(counter(&st2, "retriggers") > counter(&base, "retriggers"));
    assert!(flow["indications"].as_u64().unwrap() >= 2, "{flow:#}");
}

/// A trigger that vanishes without a word (its host loses power: no FIN, no RST reaches the
/// server; modelled by dropping everything from the trigger host at its NAT while the trigger is
/// killed) leaves a control link and an assist link open at the server. The server closes both:
/// the control link by its idle timeout, the assist link (silent while idle: yamux sends
/// nothing) by TCP keepalive, so that `beckon status` stops showing an assist link for a site
/// whose trigger is gone. The trigger, back, gets both links again.
#[test]
fn a_vanished_triggers_links_are_closed_by_the_server() {
    let mut lab = Lab::up("bk-f7", &[]);
    let cfg = server_toml(K).write(&lab, "server.toml");
    start_server(&mut lab, "server", &cfg);
    start_trigger(&mut lab, "trigger-a", "a");
    let connected = |lab: &Lab| lab.site_status("site-a")["assist_link"] == true && links_from(lab, "203.0.113.2") == 2;
    wait_for(Duration::from_secs(20), "site a's control and assist links", || connected(&lab));
    let nat_ns = lab.ns("nat-a");
    let nft = |args: &[&str]| {
        let out = Command::new("ip").args(["netns", "exec", &nat_ns, "nft"]).args(args).output().unwrap();
        assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    nft(&["insert", "rule", "inet", "bk_filter", "forward", "ip", "saddr", "198.18.1.20", "counter", "drop", "comment", "\"vanished\""]);
    let t_gone = now_unix();
    lab.kill("trigger-a");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(links_from(&lab, "203.0.113.2"), 2, "the server did not see the trigger go");

    // (The drop rule stays while the host is "dead": its kernel's FIN retransmissions and its
    // answers to keepalive probes never arrive, as from a host without power.)
    wait_for(Duration::from_secs(60), "the vanished trigger's links closed at the server", || {
        links_from(&lab, "203.0.113.2") == 0 && lab.site_status("site-a")["assist_link"] == false
    });
    let closed = first_log_after(&lab, "server", &["assist link closed"], t_gone);
    eprintln!("bk-f7: the vanished trigger's assist link closed {closed:?} s after it was killed");
    assert!(closed.is_some(), "the assist link's end is logged");

    let rules = nft(&["-a", "list", "chain", "inet", "bk_filter", "forward"]);
    let handle = rules.lines().find(|l| l.contains("vanished")).and_then(|l| l.rsplit("# handle ").next()).expect("the drop rule");
    nft(&["delete", "rule", "inet", "bk_filter", "forward", "handle", handle.trim()]);
    start_trigger(&mut lab, "trigger-a2", "a");
    wait_for(Duration::from_secs(20), "the trigger's links again", || connected(&lab));
}

/// Established TCP connections at the server's control port (control and assist links) from
/// `peer_ip` (a site's NAT).
fn links_from(lab: &Lab, peer_ip: &str) -> usize {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.ns("srv"), "ss", "-Htn", "state", "established", "( sport = :7443 )"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.split_whitespace().any(|w| w.starts_with(&format!("{peer_ip}:")))).count()
}

/// The WAN link of site a's NAT router goes down for 10 s (which also drops its masquerade
/// conntrack entries) and comes back: within RECOVERY the control link carries indications
/// again, the UDP stream and the idle flow answer again (re-triggered), new UDP and TCP clients
/// are served. Detection times and the existing TCP connection's fate are printed; the
/// detection bound is asserted in `silent_nat_loss_noticed_within_two_keepalive_intervals`.
#[test]
fn wan_link_cut_for_ten_seconds() {
    let mut lab = Lab::up("bk-f4", &[]);
    let r = setup_running(&mut lab);
    let base = lab.status();
    let reg0 = lab.log_lines("server", &["trigger registered"]).len();
    let rst0 = out_rsts(&lab, "nat-a");

    let t_fault = now_unix();
    lab.ip("nat-a", &["link", "set", "wan0", "down"]);
    let det = detections(&lab, &r, t_fault, Duration::from_secs(9));
    if let Some(rest) = Duration::from_secs(10).checked_sub(Duration::from_secs_f64(now_unix() - t_fault)) {
        std::thread::sleep(rest);
    }
    let offline_seen = first_log_after(&lab, "server", &["trigger link closed"], t_fault);
    let (a_cut, b_cut) = (r.stream.answered(), r.download.bytes());
    lab.ip("nat-a", &["link", "set", "wan0", "up"]);
    let t_up = Instant::now();

    // Recovery: the stream is answered again, a new UDP client is served, the control link is
    // registered (again, or still), a new TCP connection is served.
    let t_stream = time_until(RECOVERY, || r.stream.answered() > a_cut + 3);
    let t_udp = time_until(RECOVERY, || udp_once(&lab, 15060, "new", Duration::from_millis(500)).as_deref() == Some("cam-a: new"))
        .map(|_| t_up.elapsed());
    let t_tcp = time_until(Duration::from_secs(20), || http_get(&lab, 18090, "/").is_ok_and(|b| b.contains("camera cam-a")))
        .map(|_| t_up.elapsed());
    let idle_ok = r.idle.request(b"after cut", 3).as_deref() == Some(&b"cam-a: after cut"[..]);
    let tcp_alive = r.download.bytes() > b_cut;
    let st = lab.status();
    let flow = mapping_of(&st, &r.stream.local);
    let sent = r.stream.finish();
    let end = r.download.finish();
    let regs = lab.log_lines("server", &["trigger registered"]).len() - reg0;
    eprintln!(
        "bk-f4: WAN down 10 s: detection idle flow {:?} s, stream flow {:?} s (K = {K} s); server showed site-a offline at {offline_seen:?}; \
         after the link came up: stream answered {t_stream:?}, new UDP flow {t_udp:?}, new TCP {t_tcp:?}, idle flow answered {idle_ok}, \
         re-registrations {regs}; stream flow {:?}; counters retriggers {} -> {}, dropped {} -> {}; existing TCP download {} ({} bytes, ended {:?}); \
         UDP stream {} sent, {} answered; TCP RSTs sent by the NAT router itself: {}",
        det.0,
        det.1,
        flow.map(|m| (m["indications"].clone(), m["public_endpoint"].clone())),
        counter(&base, "retriggers"),
        counter(&st, "retriggers"),
        counter(&base, "mappings_dropped"),
        counter(&st, "mappings_dropped"),
        if tcp_alive { "survived" } else { "did not survive" },
        end.bytes,
        end.error,
        sent.len(),
        sent.iter().filter(|x| x.1.is_some()).count(),
        out_rsts(&lab, "nat-a") - rst0,
    );
    assert!(t_stream.is_some(), "the UDP stream is not answered again within {RECOVERY:?}");
    assert!(t_udp.is_some(), "no new UDP flow served within {RECOVERY:?} after the cut");
    assert!(t_tcp.is_some(), "no new TCP connection served within 20 s after the cut");
    assert!(idle_ok, "the idle flow is not answered after the cut");
    assert!(lab.site_connected("site-a"));
}

/// Issue 5: after a silent loss of the NAT's state (the WAN link cut: no ICMP, no answer at
/// all) "the server notices within two keepalive intervals". Measured for an idle flow (held by
/// keepalives alone) and for a flow with a client sending every 100 ms: the server must have
/// dropped or re-triggered each within 2·keepalive_secs of the cut.
#[test]
fn silent_nat_loss_noticed_within_two_keepalive_intervals() {
    let mut lab = Lab::up("bk-f6", &[]);
    let r = setup_running(&mut lab);
    let t_fault = now_unix();
    lab.ip("nat-a", &["link", "set", "wan0", "down"]);
    let limit = Duration::from_secs_f64(2.0 * K as f64 + 1.5);
    let (idle_det, stream_det) = detections(&lab, &r, t_fault, limit);
    let st = lab.status();
    eprintln!(
        "bk-f6: WAN cut, keepalive_secs {K}: within {limit:?} the server noticed the idle flow at {idle_det:?} s, \
         the active flow at {stream_det:?} s; idle flow now (keepalives sent, answered, indications) {:?}",
        mapping_of(&st, &r.idle_local).map(|m| (m["keepalives_sent"].clone(), m["keepalives_answered"].clone(), m["indications"].clone()))
    );
    r.stream.finish();
    r.download.finish();
    let bound = 2.0 * K as f64 + 0.5;
    assert!(
        idle_det.is_some_and(|t| t <= bound) && stream_det.is_some_and(|t| t <= bound),
        "issue 5: the server must notice a lost NAT mapping within two keepalive intervals \
         ({bound:.1} s with slack); idle flow noticed at {idle_det:?} s, active flow at {stream_det:?} s \
         after the WAN cut (None = not within {limit:?})"
    );
}

// ---------------------------------------------------------------- 5. many sites

/// 50 triggers (one namespace, TUNs beckon0…beckon49, sites m00…m49 with direct_tcp = false)
/// register together; the server crashes and comes back: all 50 reconnect within the backoff
/// bound, spread out by the jitter (not all within one 100 ms), while status keeps answering;
/// indications still reach the right trigger among the 50.
#[test]
fn fifty_sites_register_and_reconnect_together() {
    const N: usize = 50;
    let mut lab = Lab::up("bk-f5", &[]);
    let mut toml = server_toml(20);
    for i in 0..N {
        toml = toml.site(&format!("m{i:02}"), &format!("token-m{i:02}-0123456789"), Some(false));
    }
    // UDP exposures of the first and the last site's camera (both are cam-a's 198.18.1.10).
    for i in [0, N - 1] {
        toml = toml.expose(&format!("m{i:02}/cam1"), 5060, "udp", &format!("127.0.0.1:{}", 16000 + i));
    }
    let cfg = toml.write(&lab, "server.toml");
    start_server(&mut lab, "server", &cfg);
    let names: Vec<String> = (0..N).map(|i| format!("m{i:02}")).collect();
    let t0 = Instant::now();
    for (i, name) in names.iter().enumerate() {
        let tcfg = trigger_toml(&lab, name, &format!("token-{name}-0123456789"), &format!("beckon{i}"));
        lab.spawn(name, "trg-a", &["trigger", "--config", &tcfg]);
    }
    let all_connected = |lab: &Lab| -> Option<usize> {
        lab.try_status().map(|s| {
            s["sites"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|x| {
                    x["name"].as_str().unwrap().starts_with('m') && x["connected"] == true && x["cameras"].as_array().unwrap().len() == 1
                })
                .count()
        })
    };
    let t_first = time_until(Duration::from_secs(30), || all_connected(&lab) == Some(N));
    eprintln!("bk-f5: {N} triggers registered and reported {t_first:?} after the first was started ({:?} to start them all)", t0.elapsed());
    assert!(t_first.is_some(), "only {:?} of {N} sites connected", all_connected(&lab));
    for (i, port) in [(0, 16000u16), (N - 1, 16000 + N as u16 - 1)] {
        let c = udp_client(&lab, port);
        assert_eq!(c.request(format!("to m{i:02}").as_bytes(), 3), Some(format!("cam-a: to m{i:02}").into_bytes()));
    }
    let injected = |lab: &Lab| -> Vec<usize> {
        [0, N - 1].iter().map(|i| lab.log_lines(&names[*i], &["trigger packet injected", "198.18.1.10:5060"]).len()).collect()
    };
    // A trigger logs the injection after its TUN write, so on a busy host the camera's answer
    // can reach the client before the line reaches the log (seen once in CI): wait for it.
    let _ = time_until(Duration::from_secs(3), || injected(&lab).iter().all(|n| *n >= 1));
    let inj = injected(&lab);
    // (More than one when the client's retry re-indicated a slow first answer.)
    assert!(inj.iter().all(|n| (1..=3).contains(n)), "each exposure's indication went to its own site's trigger: {inj:?}");

    // Crash and restart: every trigger loses its links at once.
    let t_kill = Instant::now();
    let kill_unix = now_unix();
    lab.kill("server");
    start_server(&mut lab, "server2", &cfg);
    let t_up = t_kill.elapsed();
    let mut worst_status = Duration::ZERO;
    let mut statuses = 0;
    let t_all = time_until(Duration::from_secs(30), || {
        let t = Instant::now();
        let n = all_connected(&lab);
        worst_status = worst_status.max(t.elapsed());
        statuses += 1;
        assert!(n.is_some(), "status did not answer during the reconnect storm");
        n == Some(N)
    })
    .map(|_| t_kill.elapsed());
    let mut regs: Vec<f64> = lab
        .log_lines("server2", &["trigger registered", "site=m"])
        .iter()
        .filter_map(|l| log_line_time(l))
        .map(|t| t - kill_unix)
        .collect();
    regs.sort_by(f64::total_cmp);
    let spread = regs.last().unwrap_or(&0.0) - regs.first().unwrap_or(&0.0);
    let most_in_100ms = (0..regs.len()).map(|i| regs[i..].iter().take_while(|t| **t < regs[i] + 0.1).count()).max().unwrap_or(0);
    eprintln!(
        "bk-f5: server back {t_up:?} after SIGKILL; all {N} reconnected {t_all:?} after the kill; registrations from {:.3} s to {:.3} s \
         (spread {spread:.3} s, at most {most_in_100ms} in any 100 ms); {statuses} status calls, slowest {worst_status:?}",
        regs.first().unwrap_or(&-1.0),
        regs.last().unwrap_or(&-1.0)
    );
    let t_all = t_all.expect("all 50 triggers reconnect within 30 s");
    assert_eq!(regs.len(), N, "one registration per site: {regs:?}");
    let bound = t_up * 3 + Duration::from_millis(2500);
    assert!(t_all <= bound, "reconnected after {t_all:?}, bound {bound:?}");
    assert!(spread >= 0.1, "all {N} reconnected within {spread:.3} s: no jitter");
    assert!(most_in_100ms < N * 4 / 5, "{most_in_100ms} of {N} reconnected within one 100 ms");
    // (How fast status answers during the storm is printed above, not asserted: a speed, not a
    // behaviour. That it answers at all is asserted in the loop.)
    let c = udp_client(&lab, 16000);
    assert_eq!(c.request(b"again", 3).as_deref(), Some(&b"cam-a: again"[..]));

    // Crash again in the middle of the reconnect storm (registry writes under way): the next
    // start finds an intact registry with every site and its camera, and all reconnect.
    lab.kill("server2");
    start_server(&mut lab, "server3", &cfg);
    std::thread::sleep(Duration::from_millis(300));
    let during = lab.log_lines("server3", &["trigger registered"]).len();
    lab.kill("server3");
    start_server(&mut lab, "server4", &cfg);
    let st = lab.status();
    let with_camera = st["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["name"].as_str().unwrap().starts_with('m') && x["cameras"].as_array().unwrap().len() == 1)
        .count();
    assert_eq!(with_camera, N, "registry after a crash during {during} registrations: {st:#}");
    let t_again = time_until(Duration::from_secs(30), || all_connected(&lab) == Some(N));
    eprintln!("bk-f5: killed during the storm after {during} registrations; restarted with {with_camera} sites known, all reconnected {t_again:?} later");
    assert!(t_again.is_some(), "only {:?} of {N} reconnected after the second crash", all_connected(&lab));

    // Stop the triggers together (Drop would stop them one by one).
    let codes = lab.stop_many(&names);
    assert!(codes.iter().all(|c| *c == Some(0)), "trigger exit codes {codes:?}");
}
