//! Trigger module (patent S7): checks an indication against this trigger's allowlist (its
//! configured cameras and their services), builds the trigger packet P3 and writes it into the TUN.
//! Whatever the server sends, nothing leaves towards an address or port not in the config.

use crate::catalog::{Proto, Service};
use crate::config::TriggerConfig;
use crate::wire::control::{Direction, ErrorCode, Indication, Probe, MAX_PD1};
use crate::wire::trigger_packet::{self, Addressing};
use base64::Engine as _;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Injector {
    cfg: TriggerConfig,
    probe: Option<Probe>,
    /// The server's public_ip as announced at registration (or pinned in the config).
    server_ip: std::sync::Mutex<Option<std::net::Ipv4Addr>>,
    tun: tun_rs::AsyncDevice,
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
}

impl Injector {
    pub fn new(cfg: &TriggerConfig, probe: Option<Probe>, tun: tun_rs::AsyncDevice) -> anyhow::Result<Self> {
        Ok(Injector {
            cfg: cfg.clone(),
            probe,
            server_ip: std::sync::Mutex::new(None),
            tun,
            packets: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        })
    }

    pub fn set_server_ip(&self, ip: Option<std::net::Ipv4Addr>) {
        *self.server_ip.lock().unwrap() = ip;
    }

    /// Inject the indication's trigger packet; returns the bytes written.
    pub async fn inject(&self, ind: &Indication) -> Result<usize, (ErrorCode, String)> {
        check_server_ip(*self.server_ip.lock().unwrap(), ind)?;
        let p3 = build_p3(&self.cfg, self.probe, ind)?;
        self.tun.send(&p3).await.map_err(|e| (ErrorCode::InjectFailed, format!("writing to TUN {}: {e}", self.cfg.tun_name)))?;
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(p3.len() as u64, Ordering::Relaxed);
        Ok(p3.len())
    }
}

/// The server end of every trigger packet must be the server's own public_ip: otherwise a
/// compromised server could make the trigger send packets "from" a camera to anyone.
pub fn check_server_ip(expected: Option<std::net::Ipv4Addr>, ind: &Indication) -> Result<(), (ErrorCode, String)> {
    match expected {
        Some(ip) if ip == ind.server_ip => Ok(()),
        Some(ip) => Err((ErrorCode::NotAllowed, format!("server address {} is not the server's public_ip {ip}", ind.server_ip))),
        None => Err((ErrorCode::NotAllowed, "the server did not announce its public_ip at registration".into())),
    }
}

/// Sans-IO half of injection: allowlist, decoding, packet building.
/// The trigger's own probe listener and responder are allowed too: the site profile targets them.
pub fn build_p3(cfg: &TriggerConfig, probe: Option<Probe>, ind: &Indication) -> Result<Vec<u8>, (ErrorCode, String)> {
    let service = Service { proto: ind.proto, port: ind.camera_port };
    let is_probe = probe.is_some_and(|p| {
        p.ip == ind.camera_ip
            && match ind.proto {
                Proto::Tcp => p.tcp_port == ind.camera_port,
                Proto::Udp => p.udp_port == Some(ind.camera_port),
            }
    });
    if !cfg.allows(ind.camera_ip, service) && !is_probe {
        return Err((
            ErrorCode::NotAllowed,
            format!("{}:{} ({service}) is not a configured camera service of this trigger", ind.camera_ip, ind.camera_port),
        ));
    }
    // Base64 of MAX_PD1 bytes is at most 4/3 as long; refuse more before decoding.
    if ind.pd1.len() > MAX_PD1.div_ceil(3) * 4 {
        return Err((ErrorCode::InjectFailed, format!("pd1 of {} base64 characters exceeds {MAX_PD1} bytes", ind.pd1.len())));
    }
    let pd1 = base64::engine::general_purpose::STANDARD
        .decode(&ind.pd1)
        .map_err(|e| (ErrorCode::InjectFailed, format!("pd1 is not base64: {e}")))?;
    let a = match ind.direction {
        Direction::ToCamera => {
            Addressing { proto: ind.proto, src: ind.server_ip, src_port: ind.server_port, dst: ind.camera_ip, dst_port: ind.camera_port }
        }
        Direction::ToServer => {
            Addressing { proto: ind.proto, src: ind.camera_ip, src_port: ind.camera_port, dst: ind.server_ip, dst_port: ind.server_port }
        }
    };
    trigger_packet::build(&a, &pd1, rand::random()).map_err(|e| (ErrorCode::InjectFailed, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::control::Command;

    fn cfg() -> TriggerConfig {
        crate::config::parse(
            std::path::Path::new("t.toml"),
            "server = \"203.0.113.1:7443\"\nca = \"ca.pem\"\nsite = \"a\"\ntoken = \"tttttttttt\"\n[[camera]]\nname = \"c\"\nip = \"198.18.1.10\"\ndevice_type = \"gb28181\"\n",
        )
        .unwrap()
    }

    fn ind(ip: &str, port: u16, proto: Proto, pd1: Vec<u8>) -> Indication {
        Indication {
            id: 1,
            camera_ip: ip.parse().unwrap(),
            camera_port: port,
            server_ip: "203.0.113.100".parse().unwrap(),
            server_port: 40000,
            proto,
            command: Command::Inject,
            pd1: base64::engine::general_purpose::STANDARD.encode(pd1),
            direction: Direction::ToCamera,
        }
    }

    fn pd1(port: u16) -> Vec<u8> {
        let a = Addressing {
            proto: Proto::Udp,
            src: "203.0.113.100".parse().unwrap(),
            src_port: 40000,
            dst: "198.18.1.10".parse().unwrap(),
            dst_port: port,
        };
        trigger_packet::udp_pd1(&a, b"x")
    }

    #[test]
    fn server_end_must_be_the_announced_public_ip() {
        let i = ind("198.18.1.10", 5060, Proto::Udp, pd1(5060));
        assert!(check_server_ip(Some("203.0.113.100".parse().unwrap()), &i).is_ok());
        assert_eq!(check_server_ip(Some("198.51.100.7".parse().unwrap()), &i).unwrap_err().0, ErrorCode::NotAllowed);
        assert_eq!(check_server_ip(None, &i).unwrap_err().0, ErrorCode::NotAllowed);
    }

    #[test]
    fn allowlist_is_enforced_whatever_the_server_sends() {
        let c = cfg();
        assert!(build_p3(&c, None, &ind("198.18.1.10", 5060, Proto::Udp, pd1(5060))).is_ok());
        // The probe listener (TCP) and responder (UDP) are allowed on their own ports only.
        let probe = Some(Probe { ip: "198.18.1.20".parse().unwrap(), tcp_port: 4000, udp_port: Some(4001) });
        let mut tcp = ind("198.18.1.20", 4000, Proto::Tcp, vec![]);
        tcp.pd1 = base64::engine::general_purpose::STANDARD.encode(crate::server::tcp_strategy::syn_segment(40000, 4000, 1));
        assert!(build_p3(&c, probe, &tcp).is_ok());
        assert_eq!(build_p3(&c, None, &tcp).unwrap_err().0, ErrorCode::NotAllowed);
        assert_eq!(build_p3(&c, probe, &ind("198.18.1.20", 4000, Proto::Udp, pd1(4000))).unwrap_err().0, ErrorCode::NotAllowed);
        assert!(build_p3(&c, probe, &ind("198.18.1.20", 4001, Proto::Udp, pd1(4001))).is_ok());
        for bad in [
            ind("198.18.1.11", 5060, Proto::Udp, pd1(5060)),
            ind("198.18.1.10", 5061, Proto::Udp, pd1(5061)),
            ind("198.18.1.10", 5060, Proto::Tcp, pd1(5060)),
        ] {
            assert_eq!(build_p3(&c, None, &bad).unwrap_err().0, ErrorCode::NotAllowed);
        }
        // The indication's fields say 5060 but PD1 targets 22: refused too.
        assert_eq!(build_p3(&c, None, &ind("198.18.1.10", 5060, Proto::Udp, pd1(22))).unwrap_err().0, ErrorCode::InjectFailed);
        let mut big = ind("198.18.1.10", 5060, Proto::Udp, vec![]);
        big.pd1 = "A".repeat(10_000);
        assert_eq!(build_p3(&c, None, &big).unwrap_err().0, ErrorCode::InjectFailed);
    }
}
