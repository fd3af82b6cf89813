//! The trigger (camera LAN side): connection module (`connect`: TLS control link with
//! reconnects), resource-report module (`report`), trigger module (`inject`: builds P3 and writes
//! it into the TUN), and the host preparation injection needs (`host`).

pub mod assist;
pub mod connect;
pub mod host;
pub mod inject;
pub mod probe;
pub mod report;

use crate::config::TriggerConfig;
use anyhow::Result;
use std::sync::Arc;

/// Run the trigger until SIGINT/SIGTERM.
pub async fn run(cfg: TriggerConfig) -> Result<()> {
    crate::tls::install_crypto_provider();
    let tls = crate::tls::client_config(&cfg.ca)?;
    let server_name = crate::tls::server_name(&cfg.server_name)?;
    let (server_addr, prepared) = host::prepare(&cfg).await?;
    let probe = match probe::start(prepared.lan_ip).await {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(
                "no probe listener on {} ({e}); the server cannot profile this site's NAT, TCP will use the assisted path",
                prepared.lan_ip
            );
            None
        }
    };
    let injector = inject::Injector::new(&cfg, probe, prepared.tun)?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let connector = tokio_rustls::TlsConnector::from(tls);
    let (reg_tx, reg_rx) = tokio::sync::watch::channel(0u64);
    let assist = tokio::spawn(assist::run(
        Arc::new(cfg.clone()),
        probe,
        server_addr,
        connector.clone(),
        server_name.clone(),
        reg_rx,
        shutdown_rx.clone(),
    ));
    let link = tokio::spawn(connect::run(cfg.clone(), probe, server_addr, connector, server_name, injector, reg_tx, shutdown_rx));
    tracing::info!(site = %cfg.site, server = %cfg.server, cameras = cfg.cameras.len(), "trigger running");
    crate::signals::wait().await;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), async {
        let _ = link.await;
        let _ = assist.await;
    })
    .await;
    drop(prepared.sysctls);
    Ok(())
}
