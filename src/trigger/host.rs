//! Puts the trigger host in the state TUN injection needs (measured in the NAT lab):
//! `ip_forward=1`; effective rp_filter 0 for the TUN (the kernel uses max(all, dev), and the
//! injected packets' source is the server, which routes out the LAN, not the TUN); and no route
//! that sends the server's address into the TUN (it would capture the trigger's own control link).
//! Changed sysctls are restored on clean exit.

use crate::config::TriggerConfig;
use crate::hostnet::{self, SysctlGuard};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;

pub struct Prepared {
    pub tun: tun_rs::AsyncDevice,
    pub sysctls: SysctlGuard,
}

pub async fn prepare(cfg: &TriggerConfig) -> Result<(SocketAddr, Prepared)> {
    let server: SocketAddr = tokio::net::lookup_host(&cfg.server)
        .await
        .with_context(|| format!("resolving server {:?}", cfg.server))?
        .find(|a| a.is_ipv4())
        .with_context(|| format!("server {:?} has no IPv4 address", cfg.server))?;

    let mut sysctls = SysctlGuard::default();
    sysctls
        .ensure("net.ipv4.ip_forward", "1")
        .context("injection needs net.ipv4.ip_forward=1 (the TUN's packets are forwarded onto the LAN)")?;
    let tun = hostnet::create_tun(&cfg.tun_name)?;
    for key in ["net.ipv4.conf.all.rp_filter".to_string(), format!("net.ipv4.conf.{}.rp_filter", cfg.tun_name)] {
        sysctls.ensure(&key, "0").with_context(|| {
            format!("injection needs {key}=0: packets from the server's address arrive on the TUN, and reverse-path filtering would drop them")
        })?;
    }
    let route = hostnet::ip(&["-4", "route", "get", &server.ip().to_string()])?;
    if route.split_whitespace().collect::<Vec<_>>().windows(2).any(|w| w[0] == "dev" && w[1] == cfg.tun_name) {
        bail!("the route to the server {} goes into {} ({}); remove that route: it would capture the control link", server.ip(), cfg.tun_name, route.trim());
    }
    Ok((server, Prepared { tun, sysctls }))
}
