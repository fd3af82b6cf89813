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
    /// This host's address towards the server (its LAN address): the probe listener binds it.
    pub lan_ip: std::net::Ipv4Addr,
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
            format!(
                "injection needs {key}=0: packets from the server's address arrive on the TUN, and reverse-path filtering would drop them"
            )
        })?;
    }
    // The site profile injects packets from and to this host's own address (its probe
    // listener); the kernel drops packets with a local source arriving on the TUN otherwise.
    sysctls
        .ensure(&format!("net.ipv4.conf.{}.accept_local", cfg.tun_name), "1")
        .context("the NAT profile needs accept_local=1 on the TUN")?;
    let route = hostnet::ip(&["-4", "route", "get", &server.ip().to_string()])?;
    let words: Vec<&str> = route.split_whitespace().collect();
    if words.windows(2).any(|w| w[0] == "dev" && w[1] == cfg.tun_name) {
        bail!(
            "the route to the server {} goes into {} ({}); remove that route: it would capture the control link",
            server.ip(),
            cfg.tun_name,
            route.trim()
        );
    }
    let lan_ip = words
        .windows(2)
        .find(|w| w[0] == "src")
        .and_then(|w| w[1].parse().ok())
        .with_context(|| format!("no source address towards the server {} (`ip route get` said: {})", server.ip(), route.trim()))?;
    Ok((server, Prepared { tun, lan_ip, sysctls }))
}
