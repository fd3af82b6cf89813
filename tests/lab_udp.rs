//! UDP reach through real Linux NATs (nftables masquerade + conntrack, `ct state invalid drop`)
//! by the patent's signalling form. Runs as root; each test builds its own lab.

mod common;
use common::*;
use std::time::Duration;

/// Two sites whose cameras share 198.18.1.10: each exposure reaches its own camera, the server
/// holds two distinct public mappings, two clients of one exposure never see each other's
/// answers, and the triggers inject one packet per mapping however many datagrams flow.
#[test]
fn udp_reach_two_sites_with_overlapping_camera_ip() {
    let mut lab = Lab::up("bk-u1", &["--mode-a", "invdrop", "--mode-b", "random-invdrop"]);
    lab.start_server(20);
    lab.start_trigger("a");
    lab.start_trigger("b");
    lab.wait_registered("a");
    lab.wait_registered("b");

    // Trigger packets so far are the site profiles' probes; count from here.
    let base = counter(&lab.status(), "trigger_packets_injected");
    let (base_a, base_b) = (lab.tun_injected_packets("a"), lab.tun_injected_packets("b"));
    let base_bytes = counter(&lab.status(), "bytes_injected_by_triggers");
    let (a1, a2, b1) = lab.in_ns("srv", || (Client::new(15060), Client::new(15060), Client::new(15061)));
    assert_eq!(a1.request(b"hello", 3).as_deref(), Some(&b"cam-a: hello"[..]));
    assert_eq!(b1.request(b"hello", 3).as_deref(), Some(&b"cam-b: hello"[..]));
    assert_eq!(a2.request(b"second client", 3).as_deref(), Some(&b"cam-a: second client"[..]));

    // Many datagrams afterwards: all direct, answered, each client gets only its own answers.
    for i in 0..200 {
        let (ma, mb) = (format!("a1-{i}"), format!("a2-{i}"));
        assert_eq!(a1.request(ma.as_bytes(), 2), Some(format!("cam-a: {ma}").into_bytes()));
        assert_eq!(a2.request(mb.as_bytes(), 2), Some(format!("cam-a: {mb}").into_bytes()));
        assert_eq!(b1.request(b"x", 2).as_deref(), Some(&b"cam-b: x"[..]));
    }

    let st = lab.status();
    let ma = mappings_for(&st, "site-a/cam1");
    let mb = mappings_for(&st, "site-b/cam1");
    assert_eq!((ma.len(), mb.len()), (2, 1), "{st:#}");
    let ep_a = ma[0]["public_endpoint"].as_str().unwrap();
    let ep_b = mb[0]["public_endpoint"].as_str().unwrap();
    assert!(ep_a.starts_with("203.0.113.2:") && ep_b.starts_with("203.0.113.3:"), "{ep_a} {ep_b}");
    assert_ne!(ma[0]["server_port"], ma[1]["server_port"]);
    for m in ma.iter().chain(mb.iter()) {
        assert_eq!(m["state"], "mapped");
        assert_eq!(m["indications"], 1, "one trigger packet per mapping: {m:#}");
        assert!(m["datagrams_from_camera"].as_u64().unwrap() >= 201);
    }
    // Both cameras report the same private IP; the server tells them apart by mapping.
    for s in st["sites"].as_array().unwrap() {
        assert_eq!(s["cameras"][0]["ip"], CAMERA_IP);
    }
    // Trigger share: exactly 3 trigger packets (one per mapping), counted by the server from
    // the triggers' reports and by the trigger hosts' kernels on their TUNs.
    assert_eq!(counter(&st, "trigger_packets_injected") - base, 3);
    assert!(counter(&st, "bytes_injected_by_triggers") - base_bytes < 3 * 100);
    assert!(counter(&st, "bytes_direct_from_cameras") > 600 * 7);
    assert_eq!(lab.tun_injected_packets("a") - base_a, 2);
    assert_eq!(lab.tun_injected_packets("b") - base_b, 1);

    // The human-readable status names both mappings too.
    let out = std::process::Command::new("ip").args(["netns", "exec", &lab.ns("srv"), BECKON, "status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(ep_a) && text.contains(ep_b), "{text}");

    // The trigger is out of the data path: kill it, the learned mappings keep working.
    lab.kill("trigger-a");
    for i in 0..20 {
        let m = format!("after trigger death {i}");
        assert_eq!(a1.request(m.as_bytes(), 2), Some(format!("cam-a: {m}").into_bytes()));
    }
    assert_eq!(counter(&lab.status(), "trigger_packets_injected") - base, 3);

    // Clean shutdown: exit 0, TUN route and proxy-ARP entry gone.
    assert_eq!(lab.stop("server"), Some(0));
    let ns = lab.ns("srv");
    let routes = std::process::Command::new("ip").args(["-n", &ns, "route"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&routes.stdout).contains("203.0.113.100"));
    let proxy = std::process::Command::new("ip").args(["-n", &ns, "neigh", "show", "proxy"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&proxy.stdout).contains("203.0.113.100"));
    assert_eq!(lab.stop("trigger-b"), Some(0));
}

/// With the routers' UDP conntrack timeouts at 3 s, keepalives hold an idle mapping: after 12 s
/// of silence the exposure answers at once, with no new indication. Then the registry survives a
/// server restart, and with keepalives off the mapping is lost and the next datagram re-triggers.
#[test]
fn keepalive_holds_mapping_and_registry_survives_restart() {
    let mut lab = Lab::up("bk-u2", &["--udp-timeout", "3"]);
    lab.start_server(1);
    lab.start_trigger("a");
    lab.wait_registered("a");

    let base = counter(&lab.status(), "trigger_packets_injected");
    let c = lab.in_ns("srv", || Client::new(15060));
    assert_eq!(c.request(b"before", 3).as_deref(), Some(&b"cam-a: before"[..]));
    std::thread::sleep(Duration::from_secs(12));
    // One try, no retry: the mapping must still be there.
    assert_eq!(c.request(b"after", 1).as_deref(), Some(&b"cam-a: after"[..]));
    let st = lab.status();
    let m = mappings_for(&st, "site-a/cam1")[0].clone();
    assert_eq!(m["indications"], 1, "{m:#}");
    assert!(m["keepalives_answered"].as_u64().unwrap() >= 6, "{m:#}");
    assert_eq!(counter(&st, "trigger_packets_injected") - base, 1);
    // Keepalive answers are not relayed: the client got exactly one answer per request.
    c.sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(c.sock.recv_from(&mut [0u8; 100]).is_err(), "a keepalive answer leaked to the client");

    // Restart: stop both, the registry on disk still knows site-a and its camera.
    assert_eq!(lab.stop("trigger-a"), Some(0));
    assert_eq!(lab.stop("server"), Some(0));
    lab.start_server(0);
    let st = lab.status();
    let site = st["sites"].as_array().unwrap().iter().find(|s| s["name"] == "site-a").unwrap().clone();
    assert_eq!(site["connected"], false);
    assert_eq!(site["cameras"][0]["name"], "cam1");
    assert_eq!(site["cameras"][0]["ip"], CAMERA_IP);
    assert!(site["trigger_public"].as_str().unwrap().starts_with("203.0.113.2:"));

    // Keepalive off: the NAT forgets the idle mapping; the next datagram re-triggers.
    lab.start_trigger("a");
    lab.wait_registered("a");
    let base = counter(&lab.status(), "trigger_packets_injected");
    let c = lab.in_ns("srv", || Client::new(15060));
    assert_eq!(c.request(b"one", 3).as_deref(), Some(&b"cam-a: one"[..]));
    std::thread::sleep(Duration::from_secs(8));
    let ct = lab.lab(&["counters", "bk-u2", "a"]);
    assert!(
        !ct.lines().any(|l| l.starts_with("udp") && l.contains("203.0.113.100")),
        "the NAT should have forgotten the idle mapping:\n{ct}"
    );
    assert_eq!(c.request(b"two", 3).as_deref(), Some(&b"cam-a: two"[..]));
    let st = lab.status();
    let m = mappings_for(&st, "site-a/cam1")[0].clone();
    assert_eq!(m["indications"], 2, "re-triggered once: {m:#}");
    assert_eq!(m["keepalives_sent"], 0);
    assert_eq!(counter(&st, "trigger_packets_injected") - base, 2);
}
