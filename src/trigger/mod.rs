//! The trigger (camera LAN side): connection module (`connect`: TLS control link with
//! reconnects), resource-report module (`report`), trigger module (`inject`: builds P3 and writes
//! it into the TUN), and the host preparation injection needs (`host`).

pub mod connect;
pub mod host;
pub mod inject;
pub mod report;

use crate::config::TriggerConfig;
use anyhow::Result;

/// Run the trigger until SIGINT/SIGTERM.
pub async fn run(cfg: TriggerConfig) -> Result<()> {
    crate::tls::install_crypto_provider();
    let tls = crate::tls::client_config(&cfg.ca)?;
    let server_name = crate::tls::server_name(&cfg.server_name)?;
    let (server_addr, prepared) = host::prepare(&cfg).await?;
    let injector = inject::Injector::new(&cfg, prepared.tun)?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let link = tokio::spawn(connect::run(cfg.clone(), server_addr, tls, server_name, injector, shutdown_rx));
    tracing::info!(site = %cfg.site, server = %cfg.server, cameras = cfg.cameras.len(), "trigger running");
    crate::signals::wait().await;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), link).await;
    drop(prepared.sysctls);
    Ok(())
}
