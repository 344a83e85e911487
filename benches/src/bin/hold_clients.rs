//! `hold_clients`: opens many authenticated PostgreSQL connections (through a pooler or
//! directly) and keeps them open and idle, so that the memory a pooler spends per idle client
//! can be measured from outside (`benches/compare.sh` reads the pooler's VmRSS).
//!
//! Connections are opened a bounded number at a time. Each may run one query first, so the
//! pooler has been through a whole transaction for it. When all of them are up the program
//! prints `all N clients connected` on stdout, then waits for SIGTERM / SIGINT or for `--hold`
//! seconds, and reports how many connections the other end closed in the meantime.
//!
//! With `--tls-ca FILE` every connection uses TLS (rustls with the aws-lc-rs provider, through
//! `tokio-postgres-rustls`; `sslmode=require` semantics: a server that declines TLS fails the
//! connection) and the server's certificate must lead to a root in FILE (PEM) and be valid for
//! the host of `--url`. Without it the connections are plain TCP.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Open N connections, then hold them idle.
#[derive(Debug, Parser)]
#[command(name = "hold_clients", version)]
struct Args {
    /// Connection URL, `postgres://user:password@host:port/dbname`.
    #[arg(long, env = "HOLD_CLIENTS_URL", hide_env_values = true)]
    url: String,
    /// Connections to open and hold.
    #[arg(short = 'n', long, default_value_t = 1000)]
    clients: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Query each connection runs once after logging in (an empty string runs none).
    #[arg(long, default_value = "SELECT 1")]
    query: String,
    /// Seconds to hold the connections; 0 holds them until SIGTERM or SIGINT.
    #[arg(long, default_value_t = 0)]
    hold: u64,
    /// Seconds allowed for each connection attempt.
    #[arg(long, default_value_t = 30)]
    connect_timeout: u64,
    /// Connect with TLS, verifying the server's certificate against the CA certificates in
    /// this PEM file (and the host name or IP address of `--url`).
    #[arg(long, env = "HOLD_CLIENTS_TLS_CA", value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    if args.clients == 0 || args.concurrency == 0 {
        bail!("--clients and --concurrency must be at least 1");
    }
    let mut config: Config = args.url.parse().context("invalid --url")?;
    config.connect_timeout(Duration::from_secs(args.connect_timeout));
    let tls = match &args.tls_ca {
        Some(path) => {
            config.ssl_mode(SslMode::Require);
            Some(MakeRustlsConnect::new(rustls_config(path)?))
        }
        None => None,
    };
    let config = Arc::new(config);
    let query = Arc::new(args.query);
    // Connections whose task ended (closed by the other end, or failed) after login.
    let closed = Arc::new(AtomicUsize::new(0));

    let mut sigterm = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;

    let started = Instant::now();
    let opening = stream::iter(0..args.clients)
        .map(|i| {
            let config = Arc::clone(&config);
            let query = Arc::clone(&query);
            let closed = Arc::clone(&closed);
            let tls = tls.clone();
            async move {
                let r = match tls {
                    Some(tls) => open(&config, tls, &query, closed).await,
                    None => open(&config, NoTls, &query, closed).await,
                };
                r.with_context(|| format!("client {i}"))
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<Client>>();
    let clients = tokio::select! {
        r = opening => r?,
        _ = sigterm.recv() => bail!("stopped (SIGTERM) while connecting"),
        _ = sigint.recv() => bail!("stopped (SIGINT) while connecting"),
    };
    println!(
        "all {} clients connected in {:.2} s",
        clients.len(),
        started.elapsed().as_secs_f64()
    );

    let hold = async {
        if args.hold == 0 {
            std::future::pending::<()>().await;
        } else {
            tokio::time::sleep(Duration::from_secs(args.hold)).await;
        }
    };
    let why = tokio::select! {
        () = hold => "hold time over",
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    let lost = closed.load(Ordering::Relaxed);
    println!(
        "releasing {} clients ({why}); {lost} closed by the other end while held",
        clients.len()
    );
    drop(clients);
    if lost > 0 {
        bail!("{lost} of the held connections were closed by the other end");
    }
    Ok(())
}

/// A rustls client configuration (aws-lc-rs provider) trusting the CA certificates in `path`.
fn rustls_config(path: &std::path::Path) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("bad PEM in {}", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("unusable CA certificate in {}", path.display()))?;
    }
    if roots.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// Logs in, runs `query` once unless it is empty, and returns the idle client. The connection
/// runs on its own task; `closed` is incremented when that task ends.
async fn open<T>(config: &Config, tls: T, query: &str, closed: Arc<AtomicUsize>) -> Result<Client>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config.connect(tls).await.context("connect")?;
    tokio::spawn(async move {
        // An error here is the connection ending badly; either way it is no longer held.
        let _ = connection.await;
        closed.fetch_add(1, Ordering::Relaxed);
    });
    if !query.is_empty() {
        client.simple_query(query).await.context("first query")?;
    }
    Ok(client)
}
