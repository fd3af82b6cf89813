//! Site NAT profile: how a site's NAT treats each direct TCP strategy, measured against the
//! trigger's own probe listener (never a camera) when the trigger registers. The result decides
//! whether camera connections try the direct path, and with which strategy.

use super::tcp_conn::{ConnRecord, DirectParams, Shard};
use super::tcp_strategy::Strategy;
use super::Shared;
use crate::status::{ProfileStatus, StrategyResult};
use crate::wire::control::{Probe, PROBE_BANNER};
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn run(shared: Arc<Shared>, site: String, probe: Probe) {
    let target = SocketAddrV4::new(probe.ip, probe.tcp_port);
    tracing::info!(site = %site, probe = %target, "measuring the site's NAT (direct TCP strategies against the trigger's probe listener)");
    let mut results = Vec::new();
    for strategy in Strategy::ALL {
        let record = Arc::new(ConnRecord::new(
            shared.next_id(),
            format!("{site}/(probe)"),
            format!("tcp/{}", probe.tcp_port),
            "profile".into(),
        ));
        let t0 = Instant::now();
        let params = DirectParams {
            strategy,
            site: site.clone(),
            camera: target,
            virt: shared.virt_addr(&site, "(probe)"),
            timeout: ATTEMPT_TIMEOUT,
            buffer: 4096,
            keepalive: None,
        };
        let outcome = match Shard::connect(shared.clone(), params, record.clone()).await {
            Ok(shard) => shard.read_banner(PROBE_BANNER, ATTEMPT_TIMEOUT).await,
            Err(why) => Err(why),
        };
        let r = StrategyResult {
            strategy: strategy.name().into(),
            works: outcome.is_ok(),
            detail: outcome
                .err()
                .unwrap_or_else(|| "handshake and data through the NAT".into()),
            setup_ms: t0.elapsed().as_millis() as u64,
            trigger_packets: record
                .trigger_packets
                .load(std::sync::atomic::Ordering::Relaxed),
        };
        tracing::info!(site = %site, strategy = strategy.name(), works = r.works, "profile: {}", r.detail);
        results.push(r);
    }
    let direct = choose_by_name(&results);
    let summary = match direct {
        Some(s) => format!("direct TCP works with {}", s.name()),
        None => {
            "direct TCP does not work through this NAT; TCP uses the trigger-assisted path".into()
        }
    };
    tracing::info!(site = %site, "site profile: {summary}");
    shared.profiles.lock().unwrap().insert(
        site,
        ProfileStatus {
            measured_unix: super::record::unix_now(),
            probe: target.to_string(),
            tcp: results,
            direct_strategy: direct.map(|s| s.name().to_string()),
            summary,
        },
    );
}

/// Which strategy to prefer among those that worked: the patent's own form first (it needs one
/// trigger packet and no swallowed SYN), then reverse-syn.
pub fn choose_by_name(results: &[StrategyResult]) -> Option<Strategy> {
    [Strategy::PatentSyn, Strategy::ReverseSyn]
        .into_iter()
        .find(|s| results.iter().any(|r| r.strategy == s.name() && r.works))
}

pub fn strategy_from_name(name: &str) -> Option<Strategy> {
    Strategy::ALL.into_iter().find(|s| s.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: Strategy, works: bool) -> StrategyResult {
        StrategyResult {
            strategy: s.name().into(),
            works,
            detail: String::new(),
            setup_ms: 0,
            trigger_packets: 1,
        }
    }

    #[test]
    fn prefers_the_patent_form_then_reverse() {
        assert_eq!(
            choose_by_name(&[r(Strategy::ReverseSyn, true), r(Strategy::PatentSyn, true)]),
            Some(Strategy::PatentSyn)
        );
        assert_eq!(
            choose_by_name(&[r(Strategy::ReverseSyn, true), r(Strategy::PatentSyn, false)]),
            Some(Strategy::ReverseSyn)
        );
        assert_eq!(
            choose_by_name(&[
                r(Strategy::ReverseSyn, false),
                r(Strategy::PatentSyn, false)
            ]),
            None
        );
        assert_eq!(
            strategy_from_name("reverse-syn"),
            Some(Strategy::ReverseSyn)
        );
    }
}
