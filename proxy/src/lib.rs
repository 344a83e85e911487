//! Sluice: a PostgreSQL connection-pooling proxy for serverless fan-out.
//!
//! # Layout
//! Data flows one way, down these layers (a module uses only its own layer and those below;
//! `.ci/layers.txt` lists them and `.ci/module-graph.py` checks every use and that there are no
//! cycles):
//!
//! 1. [`net`]: accept, the client connection cap, drain on shutdown.
//! 2. [`session`]: one client, from its startup packet and authentication through its
//!    requests: each buffered, a server borrowed from the pool, relayed, given back.
//! 3. [`console`] (the admin console over the wire protocol), [`relay`] (client ⇄ server
//!    bytes while a client holds a server: a sans-I/O core that decides, a short shell that
//!    moves the bytes) and [`maintenance`] (once-a-second housekeeping).
//! 4. [`context`]: what every session shares, and RELOAD.
//! 5. [`clients`] (the client registry, cancel keys), [`pool`] (budget, admission, fair queue,
//!    shedding) and [`server`] (authenticated server connections).
//! 6. Leaves, importing no module above: [`client_conn`] (the client's socket, buffer and
//!    framing, and how a connection ends), [`prepared`] (named statements: each client's,
//!    each server's, their names), [`sql`] (the SQL scanners, in the client's encoding:
//!    statement boundaries, session state, settings, resets), [`protocol`] (pure framing and message
//!    codecs), [`stream`] (a socket, plain or TLS),
//!    [`error`] (the errors clients are told, with their SQLSTATEs), [`auth`] (client
//!    authentication secrets and exchanges; RDS IAM tokens), [`config`], [`metrics`],
//!    [`settings`] (run-time settings by name), [`tls`] (rustls configurations, certificate
//!    checks, channel binding) and [`admin`] (the `/metrics` and health HTTP endpoint).
//!
//! The crate root ([`start`]) wires them together; `main.rs` is the binary's edge.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod auth;
pub mod client_conn;
pub mod clients;
pub mod config;
pub mod console;
pub mod context;
pub mod error;
pub mod maintenance;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod relay;
pub mod server;
pub mod session;
pub mod settings;
pub mod sql;
pub mod stream;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use auth::Credentials;
use config::Config;
use context::Context;
use pool::Pools;
use server::{ServerConn, Target};

/// How long running sessions get to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Server connections kept back from the derived budget for admins and migrations.
const BUDGET_HEADROOM_FRACTION: f64 = 0.1;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot derive max_server_connections from the server ({0}); set max_server_connections"
    )]
    Budget(String),
    #[error("invalid configuration: `users.{user}.password`: {why}")]
    Secret { user: String, why: String },
    #[error("invalid configuration: {0}")]
    Tls(#[from] tls::TlsError),
}

/// A running Sluice.
pub struct Handle {
    pub local_addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub admin_addr: SocketAddr,
    pub context: Arc<Context>,
    task: JoinHandle<()>,
}

impl Handle {
    /// Stops accepting, lets sessions drain, and waits for the end.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Waits until the proxy ends (after its shutdown token is cancelled).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds the listener and starts serving in the background.
pub async fn start(config: Config) -> Result<Handle, StartError> {
    start_from(config, None, Default::default()).await
}

/// Like [`start`], remembering the file the configuration came from (for RELOAD and SIGHUP).
pub async fn start_from(
    config: Config,
    config_path: Option<std::path::PathBuf>,
    flags: config::Overrides,
) -> Result<Handle, StartError> {
    let mut config = config;
    let tls = tls::TlsState::load(&config)?;
    let server_passwords = server::ServerPassword::all(&config);
    if config.max_server_connections == 0 {
        config.max_server_connections =
            derive_budget(&config, &tls.connector, &server_passwords).await?;
        tracing::info!(
            max_server_connections = config.max_server_connections,
            "derived the server connection budget from the server's max_connections"
        );
    }
    let credentials = derive_credentials(&config).await?;
    let config = Arc::new(config);
    admin::recorder();
    metrics::set_group_label_cap(config.max_group_labels as usize);
    metrics::describe();
    metrics::global()
        .budget
        .set(f64::from(config.max_server_connections));

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.admin_listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.admin_listen,
            source,
        })?;
    let pools = Pools::new(context::limits(&config));
    // Pools that keep warm connections exist from the start, so the first burst finds them.
    for db in config
        .databases
        .keys()
        .filter(|db| config.min_pool_size_for(db) > 0)
    {
        for user in config.users.keys() {
            pools.pool(
                db,
                user,
                config.pool_size_for(db),
                config.min_pool_size_for(db),
            );
        }
    }
    let shutdown = CancellationToken::new();
    let context = Arc::new(Context {
        config: RwLock::new(config.clone()),
        config_path,
        flags,
        pools: pools.clone(),
        credentials: RwLock::new(Arc::new(credentials)),
        server_passwords: RwLock::new(server_passwords),
        servers: Default::default(),
        tls: RwLock::new(tls),
        mock_secret: rand::random(),
        clients: Default::default(),
        server_params: Default::default(),
        shutdown: shutdown.clone(),
        statement_hasher: Default::default(),
        validated_settings: Default::default(),
        ready: Default::default(),
    });
    tracing::info!(%local_addr, %admin_addr, budget = config.max_server_connections, "sluice listening");
    let ctx = context.clone();
    let task = tokio::spawn(async move {
        let ready = ctx.ready.clone();
        let maintenance = tokio::spawn(maintenance::run(ctx.clone()));
        let refresh: admin::Refresh = {
            let ctx = ctx.clone();
            Arc::new(move || maintenance::server_gauges(&ctx))
        };
        let admin = tokio::spawn(admin::serve(
            admin_listener,
            ready,
            ctx.shutdown.clone(),
            refresh,
        ));
        net::serve(ctx.clone(), listener, DRAIN_TIMEOUT).await;
        ctx.pools.close();
        maintenance.abort();
        let _ = admin.await;
        drop(ctx.pools.drain_idle());
    });
    Ok(Handle {
        local_addr,
        admin_addr,
        shutdown,
        context,
        task,
    })
}

/// Derives every user's client-auth secret; PBKDF2 runs on the blocking pool.
pub(crate) async fn derive_credentials(
    cfg: &Config,
) -> Result<HashMap<String, Credentials>, StartError> {
    let secrets = cfg.client_secrets();
    tokio::task::spawn_blocking(move || Credentials::derive_all(secrets))
        .await
        .map_err(|e| StartError::Secret {
            user: String::new(),
            why: e.to_string(),
        })?
        .map_err(|(user, e)| StartError::Secret {
            user,
            why: e.to_string(),
        })
}

/// `max_connections` minus the server's reserved slots, minus 10% (at least 2) headroom.
async fn derive_budget(
    cfg: &Config,
    tls: &Arc<tls::Connector>,
    passwords: &HashMap<String, Arc<server::ServerPassword>>,
) -> Result<u32, StartError> {
    let (db, user) = match (cfg.databases.keys().next(), cfg.users.keys().next()) {
        (Some(d), Some(u)) => (d.clone(), u.clone()),
        _ => return Err(StartError::Budget("no database or user configured".into())),
    };
    let t = Target::new(cfg, tls, passwords.get(&user).cloned(), &db, &user);
    let mut conn = ServerConn::connect(&t, &db, &server::ServerRegistry::default())
        .await
        .map_err(|e| StartError::Budget(e.to_string()))?;
    let row = conn
        .read_row(
            "SELECT current_setting('max_connections'), \
             current_setting('superuser_reserved_connections'), \
             coalesce(current_setting('reserved_connections', true), '0')",
        )
        .await
        .map_err(|e| StartError::Budget(e.to_string()))?;
    let num = |i: usize| -> i64 { row.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let (max, reserved) = (num(0), num(1) + num(2));
    let usable = max - reserved;
    let headroom = ((usable as f64 * BUDGET_HEADROOM_FRACTION).ceil() as i64).max(2);
    let budget = usable - headroom;
    if budget < 1 {
        return Err(StartError::Budget(format!(
            "max_connections {max} leaves no room"
        )));
    }
    Ok(budget as u32)
}
