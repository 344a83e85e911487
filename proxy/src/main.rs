//! The `sluice` binary: parses flags, loads the configuration, runs the proxy until a signal.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use sluice::config::{Config, Overrides};

/// Sluice: a PostgreSQL connection pooler for serverless fan-out.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Upstream server as postgres://user:password@host:port/dbname.
    #[arg(long, env = "SLUICE_UPSTREAM")]
    upstream: Option<String>,
    /// Address for clients [default: 0.0.0.0:6432].
    #[arg(long, env = "SLUICE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address for /metrics, /healthz, /readyz [default: 127.0.0.1:9930].
    #[arg(long, env = "SLUICE_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Server connections per (database, user) pool [default: 20].
    #[arg(long, env = "SLUICE_POOL_SIZE")]
    pool_size: Option<u32>,
    /// Total server connections Sluice may hold [default: derived from the server].
    #[arg(long, env = "SLUICE_MAX_SERVER_CONNECTIONS")]
    max_server_connections: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let in_argv = |u: &str| std::env::args().any(|a| a.contains(u));
    if let Some(u) = args.upstream.as_deref() {
        if sluice::config::literal_password(u) && in_argv(u) {
            tracing::warn!(
                "--upstream has a password in it, which other users of this host can read \
                 (ps): write it as ${{NAME}} (quoted, so the shell leaves it), or give the URL \
                 in SLUICE_UPSTREAM or the password in upstream_password_file"
            );
        }
    }
    let overrides = Overrides {
        listen: args.listen,
        admin_listen: args.admin_listen,
        upstream: args.upstream,
        pool_size: args.pool_size,
        max_server_connections: args.max_server_connections,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    let path = args.config.clone();
    let mut builder = match config.worker_threads {
        // One thread, like a single-process pooler: no cross-thread wakeups or work stealing.
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if config.worker_threads > 1 {
        builder.worker_threads(config.worker_threads as usize);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        // Handlers first, so a signal sent as soon as the port answers is not lost.
        let signals = Signals::install()?;
        let handle = sluice::start_from(config, path, overrides).await?;
        let shutdown = handle.shutdown.clone();
        let ctx = handle.context.clone();
        tokio::spawn(async move {
            let mut signals = signals;
            signals.wait().await;
            let grace = ctx.config().shutdown_grace;
            if !grace.is_zero() {
                // Out of the load balancer's rotation first, still serving; a second signal
                // cuts this short.
                tracing::info!(
                    grace_ms = grace.as_millis() as u64,
                    "shutting down: /readyz answers 503 for shutdown_grace, clients still served"
                );
                ctx.ready
                    .draining
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(grace) => {}
                    _ = signals.wait() => {}
                }
            }
            tracing::info!("shutting down: draining sessions");
            shutdown.cancel();
        });
        reload_on_hangup(handle.context.clone());
        handle.wait().await;
        anyhow::Ok(())
    })
}

/// SIGHUP reloads the configuration, like the admin console's RELOAD.
fn reload_on_hangup(ctx: std::sync::Arc<sluice::context::Context>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            if let Err(e) = ctx.reload().await {
                tracing::error!(error = %e, "reload failed; keeping the running configuration");
            }
        }
    });
}

/// SIGTERM or SIGINT (Ctrl-C) begins a graceful drain.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn wait(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
