//! `server.toml` and `trigger.toml` (contract: `shared/design/interfaces.md`).
//!
//! Every error is one line naming the file, the key and what to fix, because installers read it
//! on a console of a box they just dropped on a camera LAN.

use crate::catalog::{self, Proto, Service};
use crate::wire::control::{body_len, Probe, MAX_CAMERAS, MAX_FRAME, MAX_NAME, MAX_SERVICES};
use serde::Deserialize;
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// A configuration problem, already phrased for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

fn err(file: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError { file: file.display().to_string(), message: message.into() }
}

fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, format!("cannot read the config file: {e}")))?;
    parse(path, &text)
}

/// Parse TOML text; `path` only names the file in errors.
pub fn parse<T: for<'de> Deserialize<'de>>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let msg = e.message().replace('\n', " ");
        match line {
            Some(l) => err(path, format!("line {l}: {msg}")),
            None => err(path, msg),
        }
    })
}

fn default_admin() -> SocketAddr {
    "127.0.0.1:7480".parse().unwrap()
}
fn default_keepalive() -> u64 {
    20
}
/// `keepalive_secs`: the largest accepted (no NAT keeps an idle mapping for an hour).
pub const MAX_KEEPALIVE_SECS: u64 = 3600;
/// `max_tcp_clients`: the default and the largest accepted.
pub const DEFAULT_MAX_TCP_CLIENTS: usize = 4096;
pub const MAX_TCP_CLIENTS: usize = 100_000;
fn default_max_tcp_clients() -> usize {
    DEFAULT_MAX_TCP_CLIENTS
}
fn default_tun() -> String {
    "beckon0".into()
}
fn default_server_name() -> String {
    "beckon-server".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub control_listen: SocketAddr,
    pub public_ip: Ipv4Addr,
    #[serde(default)]
    pub wan_interface: Option<String>,
    pub state_dir: PathBuf,
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
    #[serde(default = "default_admin")]
    pub admin_listen: SocketAddr,
    /// Name of the server's TUN device that carries `public_ip`.
    #[serde(default = "default_tun")]
    pub tun_name: String,
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// TCP clients of all exposures together (direct and assisted) the server serves at once;
    /// one more is reset at once. Past what the host can carry, every stream would stall
    /// together; this refuses the newcomer instead (size it with `scripts/bench.sh`).
    #[serde(default = "default_max_tcp_clients")]
    pub max_tcp_clients: usize,
    /// Refuse new TCP clients (reset) for a few seconds whenever the server drops camera packets
    /// because it cannot read them fast enough (`server::overload`).
    #[serde(default = "default_true")]
    pub overload_guard: bool,
    #[serde(default, rename = "site")]
    pub sites: Vec<SiteConfig>,
    #[serde(default, rename = "expose")]
    pub exposes: Vec<ExposeConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub name: String,
    pub token: String,
    /// Try direct TCP through this site's NAT (site profile, then direct strategies). `false`
    /// sends every TCP connection of the site over the trigger-assisted path.
    #[serde(default = "default_true")]
    pub direct_tcp: bool,
}

/// Most pre-opened direct connections per exposure.
pub const MAX_WARM: usize = 8;
/// `[[expose]] rate_mbit`: the default and the largest accepted.
pub const DEFAULT_RATE_MBIT: u32 = 128;
pub const MAX_RATE_MBIT: u32 = 10_000;

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposeConfig {
    /// `<site>/<camera name>`
    pub camera: String,
    pub port: u16,
    pub proto: Proto,
    pub listen: SocketAddr,
    /// TCP only: direct camera connections kept pre-opened (0-8), so a client's first byte
    /// needs no traversal round trips. Each costs the camera an idle connection, renewed
    /// every 12-15 s.
    #[serde(default)]
    pub warm: usize,
    /// TCP only: the throughput (Mbit/s) one direct client connection should reach on the
    /// site's WAN path from its first round trip. It sizes the camera connection's receive
    /// window as it opens ((round trip + 2 ms of host service latency) × rate, 2 MiB to 16 MiB);
    /// the window then doubles, up to 16 MiB, whenever the connection moves more than half of
    /// it in one round trip. A window is memory the connection may take while its client falls
    /// behind.
    #[serde(default)]
    pub rate_mbit: Option<u32>,
}

impl ExposeConfig {
    pub fn site(&self) -> &str {
        self.camera.split_once('/').map(|(s, _)| s).unwrap_or("")
    }
    pub fn camera_name(&self) -> &str {
        self.camera.split_once('/').map(|(_, c)| c).unwrap_or("")
    }
    pub fn service(&self) -> Service {
        Service { proto: self.proto, port: self.port }
    }
    /// Bytes per second one direct connection should be able to carry (`rate_mbit`).
    pub fn rate_bytes(&self) -> f64 {
        self.rate_mbit.unwrap_or(DEFAULT_RATE_MBIT) as f64 * 1e6 / 8.0
    }
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: ServerConfig = load(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if self.public_ip.is_unspecified() || self.public_ip.is_loopback() {
            return Err(err(path, "key `public_ip`: must be the camera-facing public address, not 0.0.0.0 or loopback"));
        }
        if self.control_listen.ip() == std::net::IpAddr::V4(self.public_ip) {
            return Err(err(path, "key `control_listen`: must differ from `public_ip` (public_ip belongs to beckon's userspace stack, the control link to the host)"));
        }
        if self.tun_name.is_empty() || self.tun_name.len() > 15 {
            return Err(err(path, "key `tun_name`: must be 1-15 characters (a Linux interface name)"));
        }
        if self.keepalive_secs > MAX_KEEPALIVE_SECS {
            return Err(err(
                path,
                format!("key `keepalive_secs`: must be 0-{MAX_KEEPALIVE_SECS} (0 = no keepalives); keep it below the NATs' UDP timeout"),
            ));
        }
        if !(1..=MAX_TCP_CLIENTS).contains(&self.max_tcp_clients) {
            return Err(err(path, format!("key `max_tcp_clients`: must be 1-{MAX_TCP_CLIENTS} (TCP clients served at once)")));
        }
        let mut names = HashSet::new();
        for (i, s) in self.sites.iter().enumerate() {
            if s.name.is_empty() || s.name.contains('/') {
                return Err(err(path, format!("key `site[{i}].name`: must be non-empty and contain no '/'")));
            }
            if !names.insert(s.name.as_str()) {
                return Err(err(path, format!("key `site[{i}].name`: site {:?} is defined twice", s.name)));
            }
            if s.token.len() < 8 {
                return Err(err(
                    path,
                    format!("key `site[{i}].token`: token of site {:?} is shorter than 8 characters; use a long random secret", s.name),
                ));
            }
        }
        let mut listens = HashSet::new();
        for (i, e) in self.exposes.iter().enumerate() {
            if e.site().is_empty() || e.camera_name().is_empty() {
                return Err(err(path, format!("key `expose[{i}].camera`: {:?} must be \"<site>/<camera>\"", e.camera)));
            }
            if !names.contains(e.site()) {
                return Err(err(path, format!("key `expose[{i}].camera`: site {:?} has no [[site]] entry", e.site())));
            }
            if e.port == 0 {
                return Err(err(path, format!("key `expose[{i}].port`: must be the camera's port, 1-65535")));
            }
            if e.warm > MAX_WARM || (e.warm > 0 && e.proto != Proto::Tcp) {
                return Err(err(path, format!("key `expose[{i}].warm`: pre-opened connections are for tcp exposures, 0-{MAX_WARM}")));
            }
            if e.rate_mbit.is_some_and(|r| !(1..=MAX_RATE_MBIT).contains(&r) || e.proto != Proto::Tcp) {
                return Err(err(path, format!("key `expose[{i}].rate_mbit`: for tcp exposures, 1-{MAX_RATE_MBIT} (Mbit/s)")));
            }
            if e.warm > 0 && self.sites.iter().any(|s| s.name == e.site() && !s.direct_tcp) {
                return Err(err(
                    path,
                    format!(
                        "key `expose[{i}].warm`: site {:?} has direct_tcp = false, and pre-opened connections are direct ones",
                        e.site()
                    ),
                ));
            }
            if !listens.insert((e.proto, e.listen)) {
                return Err(err(path, format!("key `expose[{i}].listen`: {} {} is used by another exposure", e.proto, e.listen)));
            }
        }
        Ok(())
    }

    pub fn keepalive(&self) -> Option<std::time::Duration> {
        (self.keepalive_secs > 0).then(|| std::time::Duration::from_secs(self.keepalive_secs))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    /// The server's control_listen as reachable from this LAN ("host:port").
    pub server: String,
    #[serde(default = "default_server_name")]
    pub server_name: String,
    pub ca: PathBuf,
    pub site: String,
    pub token: String,
    /// Name of the trigger's TUN device used for injection.
    #[serde(default = "default_tun")]
    pub tun_name: String,
    /// Optional pin of the server's `public_ip`: the trigger refuses a server that announces
    /// another one (without it, the address the server announces at registration is used).
    #[serde(default)]
    pub server_public_ip: Option<Ipv4Addr>,
    #[serde(default, rename = "camera")]
    pub cameras: Vec<CameraConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    pub name: String,
    pub ip: Ipv4Addr,
    pub device_type: String,
    #[serde(default)]
    pub ports: Vec<Service>,
}

impl CameraConfig {
    /// Catalog ports of the device type plus the explicit ones, deduplicated and sorted.
    pub fn services(&self) -> Vec<Service> {
        let mut v = catalog::ports_of(&self.device_type).unwrap_or_default();
        v.extend(self.ports.iter().copied());
        v.sort();
        v.dedup();
        v
    }
}

impl TriggerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: TriggerConfig = load(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if !self.server.contains(':') {
            return Err(err(path, format!("key `server`: {:?} must be \"host:port\" of the server's control_listen", self.server)));
        }
        if self.site.is_empty() {
            return Err(err(path, "key `site`: must name this trigger's site as in the server's [[site]]"));
        }
        if self.tun_name.is_empty() || self.tun_name.len() > 15 {
            return Err(err(path, "key `tun_name`: must be 1-15 characters (a Linux interface name)"));
        }
        // The server's limits on a report (which it refuses whole, closing the link): checked
        // here, so that a trigger over them says so at start instead of reconnecting forever.
        if self.cameras.len() > MAX_CAMERAS {
            return Err(err(path, format!("[[camera]]: {} cameras listed; one trigger reports at most {MAX_CAMERAS}", self.cameras.len())));
        }
        let mut names = HashSet::new();
        for (i, c) in self.cameras.iter().enumerate() {
            if c.name.is_empty() || c.name.len() > MAX_NAME || c.name.contains('/') {
                return Err(err(path, format!("key `camera[{i}].name`: must be 1-{MAX_NAME} bytes and contain no '/'")));
            }
            if c.device_type.len() > MAX_NAME {
                return Err(err(path, format!("key `camera[{i}].device_type`: longer than {MAX_NAME} bytes")));
            }
            if c.services().len() > MAX_SERVICES {
                return Err(err(path, format!("key `camera[{i}].ports`: more than {MAX_SERVICES} services")));
            }
            if !names.insert(c.name.as_str()) {
                return Err(err(path, format!("key `camera[{i}].name`: camera {:?} is listed twice", c.name)));
            }
            if catalog::ports_of(&c.device_type).is_none() {
                return Err(err(
                    path,
                    format!("key `camera[{i}].device_type`: unknown type {:?}; known: {}", c.device_type, catalog::known_types()),
                ));
            }
            if c.services().is_empty() {
                return Err(err(
                    path,
                    format!(
                        "key `camera[{i}].ports`: device type {:?} implies no ports; list them, e.g. ports = [\"udp/5060\"]",
                        c.device_type
                    ),
                ));
            }
            if c.ip.is_unspecified() || c.ip.is_loopback() || c.ip.is_broadcast() || c.ip.is_multicast() {
                return Err(err(path, format!("key `camera[{i}].ip`: {} is not a camera's unicast LAN address", c.ip)));
            }
        }
        // The whole report (with the largest probe) must fit one frame.
        let probe = Probe { ip: Ipv4Addr::BROADCAST, tcp_port: u16::MAX, udp_port: Some(u16::MAX) };
        let len = body_len(&crate::trigger::report::report(self, Some(probe)));
        if len > MAX_FRAME {
            return Err(err(
                path,
                format!("[[camera]]: the camera report would be {len} bytes, over the {MAX_FRAME}-byte frame limit; list fewer cameras or services"),
            ));
        }
        Ok(())
    }

    /// Is `camera:service` in this trigger's configuration (its injection allowlist)?
    pub fn allows(&self, ip: Ipv4Addr, service: Service) -> bool {
        self.cameras.iter().any(|c| c.ip == ip && c.services().contains(&service))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = r#"
control_listen = "203.0.113.1:7443"
public_ip = "203.0.113.100"
state_dir = "/tmp/x"
[[site]]
name = "site-a"
token = "0123456789abcdef"
[[expose]]
camera = "site-a/cam1"
port = 5060
proto = "udp"
listen = "127.0.0.1:15060"
"#;

    #[test]
    fn server_example_parses_with_defaults() {
        let p = Path::new("server.toml");
        let c: ServerConfig = parse(p, SERVER).unwrap();
        c.validate(p).unwrap();
        assert_eq!(c.keepalive_secs, 20);
        assert_eq!(c.max_tcp_clients, DEFAULT_MAX_TCP_CLIENTS);
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:7480");
        assert_eq!(c.exposes[0].site(), "site-a");
        assert_eq!(c.exposes[0].camera_name(), "cam1");
    }

    /// The shipped examples are valid as they are, and so are their commented-out options
    /// (uncommented: `# key = value` lines inside the commented `[[expose]]` blocks).
    #[test]
    fn appliance_examples_are_valid() {
        let p = Path::new("appliance/server.toml");
        let text = include_str!("../appliance/server.toml");
        let c: ServerConfig = parse(p, text).unwrap();
        c.validate(p).unwrap();
        let mut in_block = false;
        let uncommented: String = text
            .lines()
            .map(|l| {
                let r = l.strip_prefix("# ").unwrap_or("");
                // Inside a commented block: `# key = value` lines and their `#   # …` comment
                // continuations (which stay comments once uncommented).
                let option = r.split_once('=').is_some_and(|(k, _)| !k.trim().contains(' '));
                in_block = r.starts_with("[[expose]]") || (in_block && (option || r.trim_start().starts_with('#')));
                if in_block {
                    r
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c: ServerConfig = parse(p, &uncommented).unwrap();
        c.validate(p).unwrap();
        assert!(c.exposes.iter().any(|e| e.proto == Proto::Tcp && e.warm == 1), "the warm example is uncommented");
        let t: TriggerConfig = parse(Path::new("appliance/trigger.toml"), include_str!("../appliance/trigger.toml")).unwrap();
        assert!(!t.cameras.is_empty());
    }

    #[test]
    fn warm_and_rate_need_tcp() {
        let p = Path::new("server.toml");
        let with = |extra: &str, direct: bool| {
            let text = SERVER.replace("token = \"0123456789abcdef\"", &format!("token = \"0123456789abcdef\"\ndirect_tcp = {direct}"))
                + &format!("[[expose]]\ncamera = \"site-a/cam1\"\nport = 80\nlisten = \"127.0.0.1:18080\"\n{extra}\n");
            parse::<ServerConfig>(p, &text).unwrap().validate(p).map_err(|e| e.to_string())
        };
        assert!(with("proto = \"tcp\"\nwarm = 2", true).is_ok());
        assert!(with("proto = \"tcp\"\nwarm = 9", true).unwrap_err().contains("expose[1].warm"));
        assert!(with("proto = \"udp\"\nwarm = 1", true).unwrap_err().contains("for tcp exposures"));
        assert!(with("proto = \"tcp\"\nwarm = 1", false).unwrap_err().contains("direct_tcp = false"));
        assert!(with("proto = \"tcp\"\nwarm = 0", false).is_ok());
        assert!(with("proto = \"tcp\"\nrate_mbit = 500", true).is_ok());
        assert!(with("proto = \"tcp\"\nrate_mbit = 0", true).unwrap_err().contains("expose[1].rate_mbit"));
        assert!(with("proto = \"udp\"\nrate_mbit = 8", true).unwrap_err().contains("for tcp exposures"));
    }

    /// The example server.toml with a top-level `key = value` added, parsed and validated.
    fn server_with(key: &str, value: &str) -> Result<(), String> {
        let p = Path::new("server.toml");
        let text = SERVER.replace("state_dir = \"/tmp/x\"", &format!("state_dir = \"/tmp/x\"\n{key} = {value}"));
        parse::<ServerConfig>(p, &text).map_err(|e| e.to_string())?.validate(p).map_err(|e| e.to_string())
    }

    #[test]
    fn keepalive_secs_is_bounded() {
        let with = |v: &str| server_with("keepalive_secs", v);
        assert!(with("0").is_ok());
        assert!(with("3600").is_ok());
        // (A huge interval would overflow the timers' arithmetic.)
        assert!(with("9223372036854775807").unwrap_err().contains("key `keepalive_secs`: must be 0-3600"));
    }

    #[test]
    fn max_tcp_clients_is_bounded() {
        let with = |v: &str| server_with("max_tcp_clients", v);
        assert!(with("1").is_ok());
        assert!(with("100000").is_ok());
        assert!(with("0").unwrap_err().contains("key `max_tcp_clients`: must be 1-100000"));
        assert!(with("100001").unwrap_err().contains("max_tcp_clients"));
        let negative = with("-1").unwrap_err();
        assert!(negative.contains("line 5") && negative.contains("invalid value"), "{negative}");
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let p = Path::new("server.toml");
        let bad = SERVER.replace("public_ip", "publik_ip");
        let e = parse::<ServerConfig>(p, &bad).unwrap_err().to_string();
        assert!(e.starts_with("server.toml: line 3:"), "{e}");
        assert!(e.contains("publik_ip"), "{e}");
        let bad = SERVER.replace("site-a/cam1", "site-b/cam1");
        let c: ServerConfig = parse(p, &bad).unwrap();
        let e = c.validate(p).unwrap_err().to_string();
        assert!(e.contains("expose[0].camera") && e.contains("site-b"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    /// A trigger whose report the server would refuse says so at start.
    #[test]
    fn trigger_config_keeps_to_the_servers_report_limits() {
        let p = Path::new("trigger.toml");
        let head = "server = \"203.0.113.1:7443\"\nca = \"/tmp/ca.pem\"\nsite = \"site-a\"\ntoken = \"0123456789abcdef\"\n";
        let camera = |name: &str, ip: u32, ports: usize| {
            let ports: Vec<String> = (1..=ports).map(|p| format!("\"tcp/{}\"", 10000 + p)).collect();
            format!(
                "[[camera]]\nname = \"{name}\"\nip = \"{}\"\ndevice_type = \"generic-rtsp\"\nports = [{}]\n",
                Ipv4Addr::from(0xc612_0000 + ip),
                ports.join(",")
            )
        };
        let check = |text: String| parse::<TriggerConfig>(p, &text).unwrap().validate(p).map_err(|e| e.to_string());
        assert!(check(format!("{head}{}", camera("cam1", 10, 3))).is_ok());
        let long = "c".repeat(MAX_NAME + 1);
        assert!(check(format!("{head}{}", camera(&long, 10, 1))).unwrap_err().contains("camera[0].name"));
        assert!(check(format!("{head}{}", camera("cam1", 10, MAX_SERVICES + 1))).unwrap_err().contains("more than 64 services"));
        let many: String = (0..=MAX_CAMERAS as u32).map(|i| camera(&format!("cam{i}"), 10 + i, 1)).collect();
        assert!(check(format!("{head}{many}")).unwrap_err().contains("at most 256"));
        // Within every per-camera limit, but too much for one frame together.
        let big: String = (0..200u32).map(|i| camera(&format!("camera-with-a-long-name-{i:040}"), 10 + i, 40)).collect();
        assert!(check(format!("{head}{big}")).unwrap_err().contains("frame limit"));
    }

    #[test]
    fn trigger_allowlist_is_catalog_plus_ports() {
        let p = Path::new("trigger.toml");
        let c: TriggerConfig = parse(
            p,
            r#"
server = "203.0.113.1:7443"
ca = "/tmp/ca.pem"
site = "site-a"
token = "0123456789abcdef"
[[camera]]
name = "cam1"
ip = "198.18.1.10"
device_type = "generic-rtsp"
ports = ["udp/5060"]
"#,
        )
        .unwrap();
        c.validate(p).unwrap();
        let ip: Ipv4Addr = "198.18.1.10".parse().unwrap();
        assert!(c.allows(ip, "tcp/554".parse().unwrap()));
        assert!(c.allows(ip, "udp/5060".parse().unwrap()));
        assert!(!c.allows(ip, "udp/5061".parse().unwrap()));
        assert!(!c.allows("198.18.1.11".parse().unwrap(), "tcp/554".parse().unwrap()));
    }

    #[test]
    fn unknown_device_type_is_rejected_with_the_known_list() {
        let p = Path::new("trigger.toml");
        let c: TriggerConfig = parse(p, "server = \"a:1\"\nca = \"c\"\nsite = \"s\"\ntoken = \"t\"\n[[camera]]\nname = \"c\"\nip = \"198.18.1.10\"\ndevice_type = \"toaster\"\n").unwrap();
        let e = c.validate(p).unwrap_err().to_string();
        assert!(e.contains("camera[0].device_type") && e.contains("gb28181"), "{e}");
    }
}
