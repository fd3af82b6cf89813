//! Lab harness for integration tests: builds a real-NAT topology with `scripts/lab/lab.sh`,
//! runs beckon processes inside its namespaces, and tears everything down on drop (also when a
//! test fails). Needs root (CAP_NET_ADMIN), nftables, conntrack, python3.
#![allow(dead_code)]

use std::io::Write;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BECKON: &str = env!("CARGO_BIN_EXE_beckon");
pub const CAMERA_IP: &str = "198.18.1.10";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require_root() {
    assert!(unsafe { libc::geteuid() } == 0, "lab tests need root (network namespaces, TUN, nftables): run `sudo ./scripts/test.sh`");
}

/// A lab from `scripts/lab/lab.sh`; `down` on drop.
pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    procs: Vec<(String, Child)>,
}

impl Lab {
    pub fn up(prefix: &str, args: &[&str]) -> Lab {
        require_root();
        let dir = std::env::temp_dir().join(format!("beckon-test-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let lab = Lab { prefix: prefix.into(), dir, procs: Vec::new() };
        let out = Command::new(repo().join("scripts/lab/lab.sh")).arg("up").arg(prefix).args(args).output().unwrap();
        assert!(out.status.success(), "lab up failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        lab
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{}", self.prefix, name)
    }

    /// Run `beckon ARGS` in namespace `ns`, logging to `dir/<name>.log`.
    pub fn spawn(&mut self, name: &str, ns: &str, args: &[&str]) {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns), BECKON])
            .args(args)
            .env("RUST_LOG", "info,beckon=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs.push((name.into(), child));
    }

    /// SIGTERM a process started with `spawn`; returns its exit code.
    pub fn stop(&mut self, name: &str) -> Option<i32> {
        let i = self.procs.iter().position(|(n, _)| n == name)?;
        let (_, mut child) = self.procs.remove(i);
        terminate(&mut child)
    }

    pub fn kill(&mut self, name: &str) {
        if let Some(i) = self.procs.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.procs.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The PID of a process started with `spawn` (`ip netns exec` execs it: the PID is beckon's).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.iter().find(|(n, _)| n == name).map(|(_, c)| c.id())
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    pub fn write(&self, file: &str, text: &str) -> String {
        let p = self.dir.join(file);
        std::fs::File::create(&p).unwrap().write_all(text.as_bytes()).unwrap();
        p.display().to_string()
    }

    pub fn state_dir(&self) -> String {
        self.dir.join("state").display().to_string()
    }

    /// The lab's two sites with one UDP exposure per site's camera port 5060 (127.0.0.1:15060 →
    /// site-a, :15061 → site-b), keepalive as given: the server of the UDP and control tests, and
    /// the base the fault tests add their exposures to.
    pub fn udp_server_toml(keepalive_secs: u64) -> ServerToml {
        ServerToml::new(keepalive_secs)
            .site("site-a", "token-a-0123456789", None)
            .site("site-b", "token-b-0123456789", None)
            .expose("site-a/cam1", 5060, "udp", "127.0.0.1:15060")
            .expose("site-b/cam1", 5060, "udp", "127.0.0.1:15061")
    }

    /// `udp_server_toml` written to server.toml; returns its path.
    pub fn server_config(&self, keepalive_secs: u64) -> String {
        Lab::udp_server_toml(keepalive_secs).write(self, "server.toml")
    }

    pub fn trigger_config(&self, site: &str, token: &str, ca: &str) -> String {
        self.write(
            &format!("trigger-{site}-{}.toml", token.len()),
            &format!(
                r#"server = "203.0.113.1:7443"
ca = "{ca}"
site = "site-{site}"
token = "{token}"
[[camera]]
name = "cam1"
ip = "{CAMERA_IP}"
device_type = "generic"
ports = ["udp/5060"]
"#
            ),
        )
    }

    pub fn start_server(&mut self, keepalive_secs: u64) {
        let cfg = self.server_config(keepalive_secs);
        self.spawn("server", "srv", &["server", "--config", &cfg]);
        let ca = PathBuf::from(self.state_dir()).join("ca.pem");
        wait_for(Duration::from_secs(10), "server admin endpoint", || self.try_status().is_some());
        assert!(ca.exists());
    }

    pub fn start_trigger(&mut self, site: &str) {
        let ca = PathBuf::from(self.state_dir()).join("ca.pem").display().to_string();
        let cfg = self.trigger_config(site, &format!("token-{site}-0123456789"), &ca);
        self.spawn(&format!("trigger-{site}"), &format!("trg-{site}"), &["trigger", "--config", &cfg]);
    }

    /// Wait until the status shows the site connected with a camera reported and its NAT
    /// profiled (the profile's probes are trigger packets too: tests count from after it).
    pub fn wait_registered(&self, site: &str) {
        wait_for(Duration::from_secs(40), &format!("site-{site} registered and profiled"), || {
            self.try_status().is_some_and(|s| {
                s["sites"].as_array().unwrap().iter().any(|x| {
                    x["name"] == format!("site-{site}")
                        && x["connected"] == true
                        && !x["cameras"].as_array().unwrap().is_empty()
                        && !x["profile"].is_null()
                })
            })
        });
    }

    pub fn try_status(&self) -> Option<serde_json::Value> {
        let out = Command::new("ip").args(["netns", "exec", &self.ns("srv"), BECKON, "status", "--json"]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn status(&self) -> serde_json::Value {
        self.try_status().expect("beckon status --json failed")
    }

    /// Run `f` on a thread inside namespace `ns` (sockets it creates live there) and wait for it.
    pub fn in_ns<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in_ns(ns, f).join().unwrap()
    }

    /// Run `f` on a background thread inside namespace `ns`; the caller joins it. (A thread of
    /// its own because setns switches the calling thread's namespace for good.)
    pub fn spawn_in_ns<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns(ns));
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Packets the trigger host's kernel received from its TUN = trigger packets injected.
    pub fn tun_injected_packets(&self, site: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(&format!("trg-{site}")), "cat", "/sys/class/net/beckon0/statistics/rx_packets"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(u64::MAX)
    }

    pub fn lab(&self, args: &[&str]) -> String {
        let out = Command::new(repo().join("scripts/lab/lab.sh")).args(args).output().unwrap();
        assert!(out.status.success(), "lab.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A server.toml for the lab's server namespace: the lab's fixed addresses (control link on
/// 203.0.113.1:7443, public IP 203.0.113.100 on eth0, state in the lab's dir) plus the sites
/// and exposures a test lists. The one place the file's layout is written out, so the tests'
/// configurations differ only where they say so.
pub struct ServerToml {
    keepalive_secs: u64,
    /// None leaves the key out (the server's default).
    max_tcp_clients: Option<usize>,
    sites: Vec<SiteToml>,
    exposes: Vec<ExposeToml>,
}

struct SiteToml {
    name: String,
    token: String,
    /// None leaves the key out (the server's default).
    direct_tcp: Option<bool>,
}

struct ExposeToml {
    camera: String,
    port: u16,
    proto: String,
    listen: String,
    /// None leaves the key out (no pre-opened connections).
    warm: Option<usize>,
    /// None leaves the key out (the default rate).
    rate_mbit: Option<u32>,
}

impl ServerToml {
    pub fn new(keepalive_secs: u64) -> ServerToml {
        ServerToml { keepalive_secs, max_tcp_clients: None, sites: Vec::new(), exposes: Vec::new() }
    }

    /// A `[[site]]`; `direct_tcp` None omits the key.
    pub fn site(mut self, name: &str, token: &str, direct_tcp: Option<bool>) -> ServerToml {
        self.sites.push(SiteToml { name: name.into(), token: token.into(), direct_tcp });
        self
    }

    /// An `[[expose]]` of `camera` ("site/cam") `proto`/`port` on `listen`.
    pub fn expose(mut self, camera: &str, port: u16, proto: &str, listen: &str) -> ServerToml {
        self.exposes.push(ExposeToml {
            camera: camera.into(),
            port,
            proto: proto.into(),
            listen: listen.into(),
            warm: None,
            rate_mbit: None,
        });
        self
    }

    /// `max_tcp_clients = n`.
    pub fn max_tcp_clients(mut self, n: usize) -> ServerToml {
        self.max_tcp_clients = Some(n);
        self
    }

    /// `warm = n` on the exposure added last.
    pub fn warm(mut self, n: usize) -> ServerToml {
        self.exposes.last_mut().expect("warm() follows an expose()").warm = Some(n);
        self
    }

    /// `rate_mbit = r` on the exposure added last.
    pub fn rate_mbit(mut self, r: u32) -> ServerToml {
        self.exposes.last_mut().expect("rate_mbit() follows an expose()").rate_mbit = Some(r);
        self
    }

    /// The file's text, with `state_dir` as the server's state directory.
    pub fn render(&self, state_dir: &str) -> String {
        let mut t = format!(
            r#"control_listen = "203.0.113.1:7443"
public_ip = "203.0.113.100"
wan_interface = "eth0"
state_dir = "{state_dir}"
keepalive_secs = {}
"#,
            self.keepalive_secs
        );
        if let Some(n) = self.max_tcp_clients {
            t += &format!("max_tcp_clients = {n}\n");
        }
        for s in &self.sites {
            t += &format!(
                r#"[[site]]
name = "{}"
token = "{}"
"#,
                s.name, s.token
            );
            if let Some(direct) = s.direct_tcp {
                t += &format!("direct_tcp = {direct}\n");
            }
        }
        for e in &self.exposes {
            t += &format!(
                r#"[[expose]]
camera = "{}"
port = {}
proto = "{}"
listen = "{}"
"#,
                e.camera, e.port, e.proto, e.listen
            );
            if let Some(n) = e.warm {
                t += &format!("warm = {n}\n");
            }
            if let Some(r) = e.rate_mbit {
                t += &format!("rate_mbit = {r}\n");
            }
        }
        t
    }

    /// Write it to `file` in the lab's dir (state in the lab's state dir); returns the path.
    pub fn write(&self, lab: &Lab, file: &str) -> String {
        lab.write(file, &self.render(&lab.state_dir()))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (name, mut child) in self.procs.drain(..) {
            let code = terminate(&mut child);
            if std::thread::panicking() {
                eprintln!(
                    "---- {name} (exit {code:?}) ----\n{}",
                    std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
                );
            }
        }
        let _ = Command::new(repo().join("scripts/lab/lab.sh")).arg("down").arg(&self.prefix).output();
    }
}

fn terminate(child: &mut Child) -> Option<i32> {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().ok().and_then(|s| s.code())
}

pub fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// A platform client: one UDP socket (so one flow) talking to an exposure.
pub struct Client {
    pub sock: UdpSocket,
    pub port: u16,
}

impl Client {
    pub fn new(port: u16) -> Client {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
        Client { sock, port }
    }

    /// Send `msg`, wait for an answer; retry like a signalling client would (up to `tries`).
    pub fn request(&self, msg: &[u8], tries: usize) -> Option<Vec<u8>> {
        let mut buf = [0u8; 2048];
        for _ in 0..tries {
            self.sock.send_to(msg, ("127.0.0.1", self.port)).unwrap();
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                return Some(buf[..n].to_vec());
            }
        }
        None
    }
}

pub fn mappings_for<'a>(st: &'a serde_json::Value, camera: &str) -> Vec<&'a serde_json::Value> {
    st["mappings"].as_array().unwrap().iter().filter(|m| m["camera"] == camera).collect()
}

pub fn counter(st: &serde_json::Value, name: &str) -> u64 {
    st["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name}"))
}

pub fn path_exists(p: &str) -> bool {
    Path::new(p).exists()
}

// ---- helpers for the fault-recovery tests (tests/lab_faults.rs)

impl Lab {
    /// Is the process started as `name` still running? (false once it exited or was stopped)
    pub fn running(&mut self, name: &str) -> bool {
        self.procs.iter_mut().find(|(n, _)| n == name).is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None)))
    }

    /// `ip -n PREFIX-NS ARGS`; panics on failure.
    pub fn ip(&self, ns: &str, args: &[&str]) -> String {
        let out = Command::new("ip").args(["-n", &self.ns(ns)]).args(args).output().unwrap();
        assert!(out.status.success(), "ip -n {} {args:?}: {}", self.ns(ns), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Lines of `name`'s log that contain every one of `needles`.
    pub fn log_lines(&self, name: &str, needles: &[&str]) -> Vec<String> {
        self.log(name).lines().filter(|l| needles.iter().all(|n| l.contains(n))).map(str::to_string).collect()
    }

    /// The status entry of site `name` (panics if the server does not list it).
    pub fn site_status(&self, name: &str) -> serde_json::Value {
        let st = self.status();
        st["sites"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("site {name} not in status: {st:#}"))
            .clone()
    }

    /// Is site `name` shown connected with at least one camera reported?
    pub fn site_connected(&self, name: &str) -> bool {
        self.try_status().is_some_and(|s| {
            s["sites"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["name"] == name && x["connected"] == true && !x["cameras"].as_array().unwrap().is_empty())
        })
    }
}

/// Seconds since the epoch, now.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The time of a beckon log line (tracing's RFC 3339 UTC timestamp at its start, e.g.
/// `2025-03-01T12:34:56.123456Z`), as seconds since the epoch.
pub fn log_line_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let ss = t.next()?.parse::<f64>().ok()?;
    // days from civil (Howard Hinnant's algorithm)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some((days * 86400 + hh * 3600 + mm * 60) as f64 + ss)
}

impl Lab {
    /// SIGTERM several processes started with `spawn` at once, then reap them (bounded like
    /// `stop`); returns their exit codes in order.
    pub fn stop_many(&mut self, names: &[String]) -> Vec<Option<i32>> {
        let mut children = Vec::new();
        for name in names {
            if let Some(i) = self.procs.iter().position(|(n, _)| n == name) {
                let (_, child) = self.procs.remove(i);
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                children.push(Some(child));
            } else {
                children.push(None);
            }
        }
        children.into_iter().map(|c| c.and_then(|mut c| terminate(&mut c))).collect()
    }
}
