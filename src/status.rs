//! The status document: what a running server knows, served as JSON at `GET /status` on
//! `admin_listen` and rendered by `beckon status`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusDoc {
    pub version: String,
    pub public_ip: String,
    pub uptime_secs: u64,
    pub keepalive_secs: u64,
    /// New TCP clients are being refused: the server is dropping camera packets now
    /// (`overload_guard`).
    #[serde(default)]
    pub overloaded: bool,
    pub sites: Vec<SiteStatus>,
    pub mappings: Vec<MappingStatus>,
    #[serde(default)]
    pub connections: Vec<ConnectionStatus>,
    pub counters: Counters,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SiteStatus {
    pub name: String,
    pub connected: bool,
    /// The trigger's control link as the server sees it (its NAT's public endpoint).
    pub trigger_public: Option<String>,
    pub connected_secs: Option<u64>,
    /// The trigger's assist link (trigger-assisted TCP) is up.
    #[serde(default)]
    pub assist_link: bool,
    pub last_registered_unix: Option<u64>,
    pub cameras: Vec<CameraStatus>,
    /// How the site's NAT treats direct TCP, measured against the trigger's probe listener.
    #[serde(default)]
    pub profile: Option<ProfileStatus>,
    /// Which steered-resync steps on-demand direct connections time instead of waiting a round
    /// trip for (docs/architecture.md, *timed steps*); absent before any steered connection.
    #[serde(default)]
    pub timed_steps: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProfileStatus {
    pub measured_unix: u64,
    /// The trigger's probe listener the strategies were tried against.
    pub probe: String,
    /// The trigger's public address (its NAT's) when this was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_ip: Option<String>,
    pub tcp: Vec<StrategyResult>,
    /// The strategy camera connections use directly, if any works.
    pub direct_strategy: Option<String>,
    /// Every strategy that worked, in the order connections try them before the assisted path.
    #[serde(default)]
    pub direct_order: Vec<String>,
    pub summary: String,
    /// UDP behaviour of the NAT, measured against the probe's UDP responder.
    #[serde(default)]
    pub udp: Option<UdpProfile>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UdpProfile {
    /// The responder's mapping as the server saw it.
    pub public: Option<String>,
    /// Did the NAT keep the responder's source port?
    pub port_preserved: Option<bool>,
    /// `endpoint-independent` (same public port towards another server port) or `endpoint-dependent`.
    pub mapping: String,
    /// `address-and-port-dependent` (only the exact server port may answer) or `address-dependent or looser`.
    pub filtering: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StrategyResult {
    pub strategy: String,
    pub works: bool,
    pub detail: String,
    pub setup_ms: u64,
    pub trigger_packets: u64,
    /// steered-resync/ttl: the TTL its steered packets used.
    #[serde(default)]
    pub steer_ttl: Option<u8>,
    /// Sequential waits for packets through the NAT during setup (WAN round trips).
    #[serde(default)]
    pub round_trips: u32,
}

/// One platform-client TCP connection to a camera service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectionStatus {
    pub id: u64,
    pub camera: String,
    pub service: String,
    pub client: String,
    /// `connecting`, `direct`, `assisted` or `failed`
    pub path: String,
    pub strategy: Option<String>,
    /// steered-resync: `ttl`, `ttl-1`, `md5`, …
    #[serde(default)]
    pub steering: Option<String>,
    pub public_endpoint: Option<String>,
    pub setup_ms: Option<u64>,
    /// WAN round trips the setup waited for.
    #[serde(default)]
    pub round_trips: u32,
    /// steered-resync steps sent on a timer instead of after a round trip.
    #[serde(default)]
    pub timed_steps: u32,
    /// A pre-opened direct connection (`warm` exposure) served this client.
    #[serde(default)]
    pub warm: bool,
    /// Why the direct path was not used (when it was not).
    pub note: Option<String>,
    pub age_secs: u64,
    pub trigger_packets: u64,
    pub bytes_to_camera: u64,
    pub bytes_from_camera: u64,
    /// A direct connection's receive window now (it grows with demand), KiB.
    #[serde(default)]
    pub window_kib: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CameraStatus {
    pub name: String,
    pub ip: String,
    pub device_type: String,
    pub services: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MappingStatus {
    /// `site/camera`
    pub camera: String,
    /// e.g. `udp/5060`
    pub service: String,
    pub expose_listen: String,
    pub client: String,
    pub server_port: u16,
    /// The camera's NAT mapping (None while the trigger packet is outstanding).
    pub public_endpoint: Option<String>,
    /// `pending` or `mapped`
    pub state: String,
    /// How the camera was reached: `udp-signalling` (patent signalling form).
    pub reached_by: String,
    pub age_secs: u64,
    pub indications: u64,
    pub keepalive: String,
    pub keepalives_sent: u64,
    pub keepalives_answered: u64,
    pub last_keepalive_answer_secs_ago: Option<u64>,
    pub datagrams_to_camera: u64,
    pub datagrams_from_camera: u64,
    pub bytes_to_camera: u64,
    pub bytes_from_camera: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counters {
    pub indications_sent: u64,
    pub indication_errors: u64,
    /// Trigger packets the triggers confirmed injecting, and their bytes (IP header included).
    pub trigger_packets_injected: u64,
    pub bytes_injected_by_triggers: u64,
    /// Payload bytes exchanged directly between server and cameras over NAT mappings.
    pub bytes_direct_to_cameras: u64,
    pub bytes_direct_from_cameras: u64,
    pub flows_created: u64,
    pub mappings_learned: u64,
    pub mappings_dropped: u64,
    pub retriggers: u64,
    pub unsolicited_datagrams: u64,
    pub dropped_client_datagrams: u64,
    pub auth_failures: u64,
    pub bad_frames: u64,
    /// TCP connections by path, and their payload bytes (closed and open ones).
    #[serde(default)]
    pub tcp_connections_direct: u64,
    /// Of those, served by a pre-opened connection.
    #[serde(default)]
    pub tcp_connections_warm: u64,
    #[serde(default)]
    pub tcp_connections_assisted: u64,
    #[serde(default)]
    pub tcp_connections_failed: u64,
    #[serde(default)]
    pub tcp_direct_fallbacks: u64,
    /// Times a direct connection's receive window grew (it moved more than half of it in one
    /// round trip).
    #[serde(default)]
    pub tcp_windows_grown: u64,
    /// TCP clients reset at once because `max_tcp_clients` were being served.
    #[serde(default)]
    pub tcp_clients_refused: u64,
    /// TCP clients reset at once because the server was dropping camera packets (`overload_guard`).
    #[serde(default)]
    pub tcp_clients_refused_overloaded: u64,
    #[serde(default)]
    pub tcp_bytes_direct: u64,
    /// Bytes the triggers carried on the assisted path.
    #[serde(default)]
    pub tcp_bytes_assisted: u64,
    /// Packets from cameras to direct TCP connections (and profile probes) that the server's
    /// TUN reader dropped: the connection's queue or all queues together were full (the server
    /// is behind; TCP retransmits).
    #[serde(default)]
    pub camera_packets_dropped: u64,
}

impl StatusDoc {
    /// Human-readable tables.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "beckon {}  public_ip {}  up {}s  keepalive {}s",
            self.version, self.public_ip, self.uptime_secs, self.keepalive_secs
        );
        if self.overloaded {
            let _ = writeln!(s, "OVERLOADED: dropping camera packets; new TCP clients are refused");
        }
        let _ = writeln!(s, "\nSITES");
        let _ = writeln!(s, "{:<16} {:<10} {:<22} cameras", "site", "trigger", "public endpoint");
        for site in &self.sites {
            let cams: Vec<String> =
                site.cameras.iter().map(|c| format!("{} {} {} [{}]", c.name, c.ip, c.device_type, c.services.join(","))).collect();
            let _ = writeln!(
                s,
                "{:<16} {:<10} {:<22} {}",
                site.name,
                if site.connected { "connected" } else { "offline" },
                site.trigger_public.as_deref().unwrap_or("-"),
                if cams.is_empty() { "-".to_string() } else { cams.join("; ") }
            );
        }
        let _ = writeln!(s, "\nMAPPINGS");
        let _ = writeln!(
            s,
            "{:<14} {:<9} {:<21} {:<22} {:<8} {:<15} {:>6} {:>5} {:>9} {:>9} {:>10}",
            "camera", "service", "client", "public endpoint", "state", "reached by", "age", "ind", "ka s/a", "dgrams", "bytes"
        );
        for m in &self.mappings {
            let _ = writeln!(
                s,
                "{:<14} {:<9} {:<21} {:<22} {:<8} {:<15} {:>5}s {:>5} {:>9} {:>9} {:>10}",
                m.camera,
                m.service,
                m.client,
                m.public_endpoint.as_deref().unwrap_or("-"),
                m.state,
                m.reached_by,
                m.age_secs,
                m.indications,
                format!("{}/{}", m.keepalives_sent, m.keepalives_answered),
                format!("{}/{}", m.datagrams_to_camera, m.datagrams_from_camera),
                m.bytes_to_camera + m.bytes_from_camera
            );
        }
        let _ = writeln!(s, "\nTCP CONNECTIONS");
        let _ = writeln!(
            s,
            "{:<14} {:<9} {:<21} {:<9} {:<12} {:<22} {:>7} {:>4} {:>12} {:>12} {:>8}",
            "camera", "service", "client", "path", "strategy", "public endpoint", "setup", "trg", "to camera", "from camera", "window"
        );
        for c in &self.connections {
            let _ = writeln!(
                s,
                "{:<14} {:<9} {:<21} {:<9} {:<20} {:<22} {:>5}ms {:>4} {:>12} {:>12} {:>8}",
                c.camera,
                c.service,
                c.client,
                c.path,
                match (&c.strategy, &c.steering) {
                    (Some(st), Some(sg)) => format!("{st}/{sg}"),
                    (Some(st), None) => st.clone(),
                    _ => "-".into(),
                } + if c.warm { " (warm)" } else { "" },
                c.public_endpoint.as_deref().unwrap_or("-"),
                c.setup_ms.unwrap_or(0),
                c.trigger_packets,
                c.bytes_to_camera,
                c.bytes_from_camera,
                c.window_kib.map_or("-".into(), |k| format!("{k}K"))
            );
        }
        let _ = writeln!(s, "\nSITE NAT PROFILES");
        for site in &self.sites {
            if let Some(p) = &site.profile {
                let _ = writeln!(s, "{:<16} {}", site.name, p.summary);
                if let Some(t) = &site.timed_steps {
                    let _ = writeln!(s, "{:<16}   timed steps: {t}", "");
                }
                if let Some(u) = &p.udp {
                    let _ = writeln!(
                        s,
                        "{:<16}   udp: public {}, port preserved {}, mapping {}, filtering {}",
                        "",
                        u.public.as_deref().unwrap_or("-"),
                        u.port_preserved.map(|b| if b { "yes" } else { "no" }).unwrap_or("-"),
                        u.mapping,
                        u.filtering
                    );
                }
                for r in &p.tcp {
                    let _ = writeln!(
                        s,
                        "{:<16}   {:<12} {:<5} {:>5}ms  {}",
                        "",
                        r.strategy,
                        if r.works { "works" } else { "fails" },
                        r.setup_ms,
                        r.detail
                    );
                }
            }
        }
        let c = &self.counters;
        let _ = writeln!(s, "\nCOUNTERS");
        let _ = writeln!(
            s,
            "indications sent {} (errors {}), trigger packets {} ({} bytes)",
            c.indications_sent, c.indication_errors, c.trigger_packets_injected, c.bytes_injected_by_triggers
        );
        let _ = writeln!(s, "bytes direct: to cameras {}, from cameras {}", c.bytes_direct_to_cameras, c.bytes_direct_from_cameras);
        let _ = writeln!(
            s,
            "mappings learned {}, dropped {}, re-triggers {}; unsolicited {}, client drops {}",
            c.mappings_learned, c.mappings_dropped, c.retriggers, c.unsolicited_datagrams, c.dropped_client_datagrams
        );
        let _ = writeln!(
            s,
            "tcp: direct {} ({} pre-opened; {} bytes), assisted {} ({} bytes carried by triggers), failed {}, direct fallbacks {}, windows grown {}, clients refused {} (+{} while overloaded)",
            c.tcp_connections_direct,
            c.tcp_connections_warm,
            c.tcp_bytes_direct,
            c.tcp_connections_assisted,
            c.tcp_bytes_assisted,
            c.tcp_connections_failed,
            c.tcp_direct_fallbacks,
            c.tcp_windows_grown,
            c.tcp_clients_refused,
            c.tcp_clients_refused_overloaded
        );
        let _ = writeln!(s, "camera packets dropped (server behind): {}", c.camera_packets_dropped);
        let _ = writeln!(s, "control: auth failures {}, bad frames {}", c.auth_failures, c.bad_frames);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connections table shows each direct connection's window, and `-` where there is
    /// none (assisted); the counters line shows how often windows grew. A status document from
    /// an older server (no `window_kib`, no `tcp_windows_grown`) still parses.
    #[test]
    fn connections_show_their_window_and_old_documents_parse() {
        let conn = |path: &str, window_kib| ConnectionStatus {
            camera: "site-a/cam1".into(),
            service: "tcp/80".into(),
            client: "127.0.0.1:40000".into(),
            path: path.into(),
            window_kib,
            ..Default::default()
        };
        let doc = StatusDoc {
            connections: vec![conn("direct", Some(4096)), conn("assisted", None)],
            counters: Counters { tcp_windows_grown: 3, ..Default::default() },
            ..Default::default()
        };
        let text = doc.render();
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("camera ") && l.contains("from camera")).expect("connections header");
        assert!(lines[header].trim_end().ends_with("window"), "{}", lines[header]);
        assert!(lines[header + 1].contains("direct") && lines[header + 1].trim_end().ends_with("4096K"), "{}", lines[header + 1]);
        assert!(lines[header + 2].contains("assisted") && lines[header + 2].trim_end().ends_with('-'), "{}", lines[header + 2]);
        assert!(text.contains("windows grown 3"), "{text}");

        let mut json = serde_json::to_value(&doc).unwrap();
        json["connections"][0].as_object_mut().unwrap().remove("window_kib");
        json["counters"].as_object_mut().unwrap().remove("tcp_windows_grown");
        let old: StatusDoc = serde_json::from_value(json).unwrap();
        assert_eq!((old.connections[0].window_kib, old.counters.tcp_windows_grown), (None, 0));
    }
}
