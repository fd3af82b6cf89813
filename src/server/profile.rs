//! Site NAT profile: how a site's NAT treats each direct TCP strategy, measured against the
//! trigger's own probe listener (never a camera) when the trigger registers. The result decides
//! whether camera connections try the direct path, and with which strategy.

use super::tcp_conn::{ConnRecord, DirectParams, Shard};
use super::tcp_strategy::{Steering, Strategy};
use super::Shared;
use crate::status::{ProfileStatus, StrategyResult, UdpProfile};
use crate::wire::control::{Probe, PROBE_BANNER};
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// A site's profile is measured again when its trigger reports, unless one that found a direct
/// strategy was measured less than this long ago against the same trigger (its LAN address;
/// the probe listener's port is new at every start), behind the same public address. Why: a
/// trigger whose link drops and reconnects (a flapping uplink, a restart loop) would otherwise
/// start a measurement on every report, each taking server ports and sending trigger packets
/// for seconds, for a NAT that has not changed. A profile that found nothing working is always measured again: it may have been
/// measured while the trigger was going away.
pub const PROFILE_REUSE: Duration = Duration::from_secs(600);

/// The age in seconds of `profile` if it can stand for the measurement of a report from the
/// trigger whose probe is `probe` and whose public address is `trigger_ip`; `None` if the site
/// must be measured again.
pub fn reusable(profile: &ProfileStatus, now_unix: u64, probe: SocketAddrV4, trigger_ip: std::net::IpAddr) -> Option<u64> {
    let age = now_unix.checked_sub(profile.measured_unix)?;
    let same_trigger = profile.probe.parse::<SocketAddrV4>().is_ok_and(|p| p.ip() == probe.ip());
    let same_place = same_trigger && profile.trigger_ip.as_deref() == Some(trigger_ip.to_string().as_str());
    (same_place && profile.direct_strategy.is_some() && age < PROFILE_REUSE.as_secs()).then_some(age)
}

/// A report's probe: measure the site's NAT, or keep its profile if that is [`reusable`].
pub fn on_report(shared: &Arc<Shared>, site: &str, probe: Probe, trigger_ip: std::net::IpAddr) {
    let target = SocketAddrV4::new(probe.ip, probe.tcp_port);
    let kept = shared.profiles.lock().unwrap().get(site).and_then(|p| reusable(p, super::record::unix_now(), target, trigger_ip));
    match kept {
        Some(age_secs) => {
            tracing::info!(site, probe = %target, age_secs, "site profile kept: measured recently from the same address (not measured again)")
        }
        None => {
            tokio::spawn(run(shared.clone(), site.to_string(), probe, trigger_ip));
        }
    }
}

async fn run(shared: Arc<Shared>, site: String, probe: Probe, trigger_ip: std::net::IpAddr) {
    let target = SocketAddrV4::new(probe.ip, probe.tcp_port);
    tracing::info!(site = %site, probe = %target, "measuring the site's NAT (direct TCP strategies against the trigger's probe listener)");
    // Each attempt has its own server port and conntrack entry: run them side by side.
    let tcp = futures::future::join_all(Strategy::BASIC.into_iter().map(|s| attempt(&shared, &site, target, s)));
    let udp = async {
        match probe.udp_port {
            Some(p) => Some(udp_profile(&shared, &site, SocketAddrV4::new(probe.ip, p)).await),
            None => None,
        }
    };
    let (mut results, udp) = futures::future::join(tcp, udp).await;
    // Calibrate the TTL steering if the exact arithmetic failed: one hop either way.
    let ttl0 = Strategy::SteeredResync(Steering::Ttl { adjust: 0 });
    if results.iter().any(|r| r.strategy == ttl0.label() && !r.works) {
        for adjust in [-1, 1] {
            let r = attempt(&shared, &site, target, Strategy::SteeredResync(Steering::Ttl { adjust })).await;
            let works = r.works;
            results.push(r);
            if works {
                break;
            }
        }
    }
    let direct = choose(&results);
    let summary = match direct.first() {
        Some(s) => format!("direct TCP works with {}", s.label()),
        None => "direct TCP does not work through this NAT; TCP uses the trigger-assisted path".into(),
    };
    tracing::info!(site = %site, "site profile: {summary}");
    shared.profiles.lock().unwrap().insert(
        site,
        ProfileStatus {
            measured_unix: super::record::unix_now(),
            probe: target.to_string(),
            trigger_ip: Some(trigger_ip.to_string()),
            tcp: results,
            direct_strategy: direct.first().map(|s| s.label()),
            direct_order: direct.iter().map(|s| s.label()).collect(),
            summary,
            udp,
        },
    );
}

/// Wait for a datagram from a public source on a claimed probe port.
async fn answer(rx: &mut super::port_routes::PacketRx, within: Duration) -> Option<SocketAddrV4> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let pkt = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
        if let Ok(src) = crate::wire::rewrite::endpoint(&pkt, crate::wire::rewrite::End::Src) {
            if !super::udp_mapping::is_private(*src.ip()) {
                return Some(src);
            }
        }
    }
}

/// The probe responder's public mapping as seen from `claim`'s port, by the signalling form.
async fn udp_mapping_from(
    shared: &Shared,
    site: &str,
    responder: SocketAddrV4,
    port: u16,
    rx: &mut super::port_routes::PacketRx,
) -> Option<SocketAddrV4> {
    for _ in 0..3 {
        let _ = super::indicate::udp(shared, site, *responder.ip(), responder.port(), port, b"beckon-probe");
        if let Some(e) = answer(rx, Duration::from_secs(1)).await {
            return Some(e);
        }
    }
    None
}

/// UDP behaviour of the site's NAT: port preservation, mapping and filtering (RFC 4787 terms).
async fn udp_profile(shared: &Arc<Shared>, site: &str, responder: SocketAddrV4) -> UdpProfile {
    let unknown = |why: &str| UdpProfile { mapping: why.into(), filtering: why.into(), ..Default::default() };
    let r = &shared.port_routes;
    let (Some((c1, mut rx1)), Some((c2, mut rx2)), Some((c3, mut rx3))) = (r.claim_udp(), r.claim_udp(), r.claim_udp()) else {
        return unknown("unknown (no free probe port)");
    };
    let Some(e1) = udp_mapping_from(shared, site, responder, c1.port, &mut rx1).await else {
        return unknown("unknown (the responder never answered)");
    };
    // Mapping: the responder's public port towards another server port.
    let mapping = match udp_mapping_from(shared, site, responder, c2.port, &mut rx2).await {
        Some(e2) if e2.port() == e1.port() => "endpoint-independent".to_string(),
        Some(_) => "endpoint-dependent".to_string(),
        None => "unknown (no answer to the second port)".to_string(),
    };
    // Filtering (last: the stray datagram leaves a conntrack entry on the NAT that would
    // perturb the mapping test): from a third server port straight to the first mapping.
    let a = crate::wire::trigger_packet::Addressing {
        proto: crate::catalog::Proto::Udp,
        src: shared.cfg.public_ip,
        src_port: c3.port,
        dst: *e1.ip(),
        dst_port: e1.port(),
    };
    let mut filtering = "address-and-port-dependent".to_string();
    if let Ok(pkt) = crate::wire::trigger_packet::build(&a, &crate::wire::trigger_packet::udp_pd1(&a, b"beckon-probe"), rand::random()) {
        for _ in 0..2 {
            let _ = shared.tun().send(&pkt).await;
            if answer(&mut rx3, Duration::from_millis(700)).await.is_some() {
                filtering = "address-dependent or looser".into();
                break;
            }
        }
    }
    tracing::info!(site, public = %e1, port_preserved = e1.port() == responder.port(), %mapping, %filtering, "profile: UDP");
    UdpProfile { public: Some(e1.to_string()), port_preserved: Some(e1.port() == responder.port()), mapping, filtering }
}

/// A profile that measured nothing: TCP of this site goes assisted, and status says why.
pub fn record_without_measuring(shared: &Shared, site: &str, why: &str) {
    tracing::info!(site, "site profile: {why}; TCP uses the trigger-assisted path");
    shared.profiles.lock().unwrap().insert(
        site.to_string(),
        ProfileStatus {
            measured_unix: super::record::unix_now(),
            summary: format!("{why}; TCP uses the trigger-assisted path"),
            ..Default::default()
        },
    );
}

/// One strategy against the probe; a failure is retried once (a lost packet must not mark a
/// working strategy as broken for the whole session).
async fn attempt(shared: &Arc<Shared>, site: &str, target: SocketAddrV4, strategy: Strategy) -> StrategyResult {
    let first = attempt_once(shared, site, target, strategy).await;
    if first.works {
        return first;
    }
    let mut second = attempt_once(shared, site, target, strategy).await;
    second.trigger_packets += first.trigger_packets;
    second
}

async fn attempt_once(shared: &Arc<Shared>, site: &str, target: SocketAddrV4, strategy: Strategy) -> StrategyResult {
    let record = Arc::new(ConnRecord::new(shared.next_id(), format!("{site}/(probe)"), format!("tcp/{}", target.port()), "profile".into()));
    let t0 = Instant::now();
    let params = DirectParams {
        strategy,
        site: site.to_string(),
        camera: target,
        virt: shared.virt_addr(site, "(probe)"),
        timeout: ATTEMPT_TIMEOUT,
        rx_buffer: 4096,
        rx_buffer_max: 4096,
        site_rtt: None,
        tx_buffer: 4096,
        keepalive: None,
        pipelining: None, // the profile measures the step-by-step sequence (and learns its hints)
    };
    let mut steer_ttl = None;
    let mut round_trips = 0;
    let outcome = match Shard::connect(shared.clone(), params, record.clone()).await {
        Ok(shard) => {
            steer_ttl = shard.attempt.steer_ttl();
            round_trips = shard.attempt.round_trips;
            shard.read_banner(PROBE_BANNER, ATTEMPT_TIMEOUT).await
        }
        Err(f) => Err(f.why),
    };
    let r = StrategyResult {
        strategy: strategy.label(),
        works: outcome.is_ok(),
        detail: outcome.err().unwrap_or_else(|| "handshake and data through the NAT".into()),
        setup_ms: t0.elapsed().as_millis() as u64,
        trigger_packets: record.trigger_packets.load(std::sync::atomic::Ordering::Relaxed),
        steer_ttl,
        round_trips,
    };
    tracing::info!(site, strategy = %r.strategy, works = r.works, "profile: {}", r.detail);
    r
}

/// The strategies that worked, in the order connections try them: cheapest first (fewest
/// trigger packets and round trips): patent-syn, reverse-syn, steered-resync by TTL, by MD5.
pub fn choose(results: &[StrategyResult]) -> Vec<Strategy> {
    let mut ok: Vec<Strategy> = results.iter().filter(|r| r.works).filter_map(|r| Strategy::from_label(&r.strategy)).collect();
    ok.sort_by_key(|s| match s {
        Strategy::PatentSyn => 0,
        Strategy::ReverseSyn => 1,
        Strategy::SteeredResync(Steering::Ttl { .. }) => 2,
        Strategy::SteeredResync(Steering::Md5) => 3,
    });
    ok.dedup();
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_working_profile_from_the_same_place_is_kept() {
        let probe: SocketAddrV4 = "198.18.1.2:7700".parse().unwrap();
        let nat: std::net::IpAddr = "203.0.113.2".parse().unwrap();
        let p = ProfileStatus {
            measured_unix: 1000,
            probe: probe.to_string(),
            trigger_ip: Some(nat.to_string()),
            direct_strategy: Some("patent-syn".into()),
            ..Default::default()
        };
        assert_eq!(reusable(&p, 1000 + 599, probe, nat), Some(599));
        assert_eq!(reusable(&p, 1000 + 600, probe, nat), None, "too old");
        assert_eq!(reusable(&p, 999, probe, nat), None, "measured in the future (clock stepped back)");
        assert_eq!(reusable(&p, 1001, "198.18.1.2:7701".parse().unwrap(), nat), Some(1), "the same trigger, restarted");
        assert_eq!(reusable(&p, 1001, "198.18.1.3:7700".parse().unwrap(), nat), None, "another trigger host");
        assert_eq!(reusable(&p, 1001, probe, "203.0.113.3".parse().unwrap()), None, "the trigger moved behind another address");
        let nothing_worked = ProfileStatus { direct_strategy: None, ..p.clone() };
        assert_eq!(reusable(&nothing_worked, 1001, probe, nat), None, "a profile without a direct strategy is measured again");
        let unmeasured = ProfileStatus { trigger_ip: None, ..p };
        assert_eq!(reusable(&unmeasured, 1001, probe, nat), None);
    }

    fn r(s: Strategy, works: bool) -> StrategyResult {
        StrategyResult { strategy: s.label(), works, ..Default::default() }
    }

    #[test]
    fn order_is_cheapest_first() {
        let ttl = Strategy::SteeredResync(Steering::Ttl { adjust: -1 });
        let md5 = Strategy::SteeredResync(Steering::Md5);
        assert_eq!(choose(&[r(md5, true), r(Strategy::ReverseSyn, true), r(ttl, true)]), vec![Strategy::ReverseSyn, ttl, md5]);
        assert_eq!(choose(&[r(Strategy::ReverseSyn, false), r(md5, true)]), vec![md5]);
        assert!(choose(&[r(Strategy::PatentSyn, false)]).is_empty());
        for s in [Strategy::PatentSyn, Strategy::ReverseSyn, ttl, md5, Strategy::SteeredResync(Steering::Ttl { adjust: 0 })] {
            assert_eq!(Strategy::from_label(&s.label()), Some(s), "{}", s.label());
        }
        assert_eq!(ttl.label(), "steered-resync/ttl-1");
    }
}
