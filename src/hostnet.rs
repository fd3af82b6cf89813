//! Host network settings beckon needs and restores: sysctls, the server's route and proxy-ARP
//! entry for `public_ip`. Thin wrappers over /proc/sys and the `ip` command, so every change is
//! one an operator can read in `docs/operations.md` and undo by hand.

use anyhow::{bail, Context, Result};
use std::process::Command;

pub fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

pub fn sysctl_get(key: &str) -> Result<String> {
    let p = sysctl_path(key);
    Ok(std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?.trim().to_string())
}

pub fn sysctl_set(key: &str, value: &str) -> Result<()> {
    let p = sysctl_path(key);
    std::fs::write(&p, value)
        .with_context(|| format!("cannot set {key}={value} (writing {p}); run as root with CAP_NET_ADMIN or set it in /etc/sysctl.d"))
}

/// Set a sysctl, returning the previous value if it changed (for restoring).
pub fn sysctl_ensure(key: &str, value: &str) -> Result<Option<String>> {
    let old = sysctl_get(key)?;
    if old == value {
        return Ok(None);
    }
    sysctl_set(key, value)?;
    tracing::info!(key, from = %old, to = value, "set sysctl");
    Ok(Some(old))
}

/// Run `ip ARGS`; the error carries ip's own message.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sysctls changed by this process, restored on drop (clean shutdown).
#[derive(Default)]
pub struct SysctlGuard {
    restore: Vec<(String, String)>,
}

impl SysctlGuard {
    pub fn ensure(&mut self, key: &str, value: &str) -> Result<()> {
        if let Some(old) = sysctl_ensure(key, value)? {
            self.restore.push((key.to_string(), old));
        }
        Ok(())
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        for (k, v) in self.restore.drain(..).rev() {
            if !std::path::Path::new(&sysctl_path(&k)).exists() {
                continue; // a per-device setting whose device is gone (our TUN)
            }
            match sysctl_set(&k, &v) {
                Ok(()) => tracing::info!(key = %k, value = %v, "restored sysctl"),
                Err(e) => tracing::warn!("could not restore {k}={v}: {e:#}"),
            }
        }
    }
}

/// A TUN builder with beckon's settings (no address: nothing on the host should use it as a
/// source).
pub fn tun_builder(name: &str) -> tun_rs::DeviceBuilder {
    tun_rs::DeviceBuilder::new().name(name).mtu(1500)
}

/// Build the TUN device.
pub fn create_tun(name: &str) -> Result<tun_rs::AsyncDevice> {
    let dev = tun_builder(name)
        .build_async()
        .with_context(|| format!("creating TUN device {name:?} (needs /dev/net/tun and CAP_NET_ADMIN; is the name in use?)"))?;
    tun_created(name);
    Ok(dev)
}

/// Settings for a freshly created TUN.
pub fn tun_created(name: &str) {
    // The kernel would give the TUN an IPv6 link-local address and send router solicitations.
    let _ = sysctl_set(&format!("net.ipv6.conf.{name}.disable_ipv6"), "1");
}
