//! The `sluice` binary: parses flags, loads the configuration, runs the proxy until a signal.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use sluice::config::{Config, LogFormat, Overrides};

/// jemalloc rather than the C library's allocator: it keeps no header per allocation and packs
/// the runtime's cache-line-aligned task and I/O records in size classes of their own, where
/// glibc pads each one; that is about 200 bytes of every idle client (benches/RESULTS.md,
/// "Memory per idle client").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Checks the configuration against the server and exits: logs in to every database as
    /// every user, reads the server's max_connections, says whether the budget fits and what
    /// to fix. Exit status 0 when all is well, 1 on any problem.
    Check,
}

/// `worker_threads = 0`: one thread on a host with one or two CPUs (counting a container's CPU
/// quota), where a second thread costs more CPU per transaction than it adds (its wake-ups
/// and work stealing; benches/RESULTS.md, "Runtime"), and one per CPU on larger hosts.
fn default_worker_threads() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus <= 2 {
        1
    } else {
        u32::try_from(cpus).unwrap_or(u32::MAX)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let overrides = Overrides {
        listen: args.listen,
        admin_listen: args.admin_listen,
        upstream: args.upstream.clone(),
        pool_size: args.pool_size,
        max_server_connections: args.max_server_connections,
    };
    // A configuration error is printed by `main`'s return: the log format is in it.
    let config = Config::load(args.config.as_deref(), &overrides)?;
    init_logging(config.log_format);
    sluice::config::log_ignored_variables();
    sluice::config::log_overridden_keys(args.config.as_deref(), &overrides);
    if let Some(Cmd::Check) = args.command {
        return check(&config);
    }
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
    let path = args.config.clone();
    let threads = match config.worker_threads {
        0 => default_worker_threads(),
        n => n,
    };
    let mut builder = match threads {
        // One thread, like a single-process pooler: no cross-thread wakeups or work stealing.
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads as usize);
    }
    tracing::info!(
        worker_threads = threads,
        configured = config.worker_threads,
        "runtime"
    );
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        // Handlers first, so a signal sent as soon as the port answers is not lost.
        let mut signals = Signals::install()?;
        #[cfg(unix)]
        let hup = signals.hup.take();
        let handle = sluice::start_from(config, path, overrides).await?;
        let ctx = handle.context.clone();
        tokio::spawn(async move {
            let mut signals = signals;
            signals.wait().await;
            // Out of the load balancer's rotation first, still serving; a second signal cuts
            // this short.
            ctx.shut_down(signals.wait()).await;
        });
        #[cfg(unix)]
        if let Some(hup) = hup {
            reload_on_hangup(handle.context.clone(), hup);
        }
        handle.wait().await;
        anyhow::Ok(())
    })
}

/// `sluice check`: the report on stdout, exit status 1 on any problem.
fn check(config: &Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = runtime.block_on(sluice::check::run(config))?;
    print!("{}", report.text);
    if report.problems > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Logs go to stderr, coloured only on a terminal (not under systemd, Docker or CloudWatch)
/// unless `NO_COLOR` is set. A failed write (the reader of stderr has gone) loses the line and
/// nothing else: tracing-subscriber would otherwise report it with `eprintln!`, which panics
/// when stderr is gone.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.with_ansi(colour).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// SIGHUP reloads the configuration, like the admin console's RELOAD.
#[cfg(unix)]
fn reload_on_hangup(
    ctx: std::sync::Arc<sluice::context::Context>,
    mut hup: tokio::signal::unix::Signal,
) {
    tokio::spawn(async move {
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
    /// Taken by [`reload_on_hangup`]; installed with the others, before the ports open, so a
    /// SIGHUP sent as soon as they answer reloads rather than ends the process.
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
                hup: Some(signal(SignalKind::hangup()).context("installing a SIGHUP handler")?),
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
