use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// beckon — reach IP cameras behind NAT routers nobody can reconfigure.
///
/// A trigger on the camera LAN keeps a TLS control link to the server; to reach a camera the
/// server asks the trigger to inject one packet that looks like it came from the server, the
/// camera's answer opens its NAT, and the server talks to the camera directly from then on.
#[derive(Parser)]
#[command(name = "beckon", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (public side): control link, registry, userspace stack on public_ip.
    Server {
        /// Path to server.toml
        #[arg(short, long, default_value = "/etc/beckon/server.toml")]
        config: PathBuf,
    },
    /// Run a trigger (camera LAN side): reports cameras, injects trigger packets.
    Trigger {
        /// Path to trigger.toml
        #[arg(short, long, default_value = "/etc/beckon/trigger.toml")]
        config: PathBuf,
    },
    /// Show what a running server knows: sites, cameras, mappings, counters.
    Status {
        /// The server's admin_listen
        #[arg(long, default_value = "http://127.0.0.1:7480")]
        admin: String,
        /// Print the JSON document instead of tables
        #[arg(long)]
        json: bool,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).init();
}

/// Run a long-running command (server, trigger): logging, the heap settings (before the
/// runtime starts its threads, see `beckon::heap`), the runtime, and the periodic heap trim.
fn run_daemon<F: std::future::Future<Output = Result<()>>>(command: F) -> Result<()> {
    init_logging();
    if !beckon::heap::tune() {
        tracing::debug!("heap settings not applied (not glibc, or refused): more page faults under load");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async {
        beckon::heap::spawn_trimmer();
        command.await
    })
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Server { config } => {
            beckon::config::ServerConfig::load(&config).map_err(anyhow::Error::from).and_then(|cfg| run_daemon(beckon::server::run(cfg)))
        }
        Cmd::Trigger { config } => {
            beckon::config::TriggerConfig::load(&config).map_err(anyhow::Error::from).and_then(|cfg| run_daemon(beckon::trigger::run(cfg)))
        }
        Cmd::Status { admin, json } => status(&admin, json),
    };
    if let Err(e) = result {
        eprintln!("beckon: {e:#}");
        std::process::exit(1);
    }
}

/// Largest status document `beckon status` reads. ureq's default (10 MB) is about 25,000
/// connections of ≈ 400 bytes of JSON each; `max_tcp_clients` allows 100,000 (≈ 40 MB), and
/// there can be 10,000 UDP mappings besides.
const STATUS_MAX_BYTES: u64 = 256 * 1024 * 1024;

fn status(admin: &str, json: bool) -> Result<()> {
    let url = format!("{}/status", admin.trim_end_matches('/'));
    let body = ureq::get(&url)
        .call()
        .with_context(|| format!("cannot reach the server's admin endpoint at {url} (is `beckon server` running? see admin_listen)"))?
        .body_mut()
        .with_config()
        .limit(STATUS_MAX_BYTES)
        .read_to_string()
        .context("reading the status document")?;
    if json {
        println!("{body}");
    } else {
        let doc: beckon::status::StatusDoc = serde_json::from_str(&body).context("the server sent an unexpected status document")?;
        print!("{}", doc.render());
    }
    Ok(())
}
