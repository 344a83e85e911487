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
//!    moves the bytes), [`maintenance`] (once-a-second housekeeping) and [`check`] (the
//!    server's connection limit, the budget against it; `sluice check`) and [`status`] (the
//!    live status page's data).
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
pub mod auth_query;
pub mod check;
pub mod client_conn;
pub mod clients;
pub mod config;
pub mod console;
pub mod context;
pub mod control;
pub mod coordinator;
pub mod error;
pub mod fleet;
pub mod maintenance;
pub mod metrics;
pub mod net;
pub mod passthrough;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod relay;
pub mod server;
pub mod session;
pub mod settings;
pub mod shared;
pub mod sql;
pub mod status;
pub mod stream;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
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

/// How long running sessions get to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The budget while it cannot be derived yet (`max_server_connections = 0` and the server has
/// not answered): one connection, which no server's limit is below.
const PROVISIONAL_BUDGET: u32 = 1;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid configuration: `max_server_connections`: {0}")]
    Budget(String),
    #[error("invalid configuration: `users.{user}.password`: {why}")]
    Secret { user: String, why: String },
    #[error("invalid configuration: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("invalid configuration: `server_auth`: {0}")]
    Iam(#[from] auth::iam::IamError),
}

/// What [`start_with`] may be given besides the configuration.
#[derive(Default)]
pub struct StartOptions {
    /// The file the configuration came from (for RELOAD and SIGHUP).
    pub config_path: Option<std::path::PathBuf>,
    /// The command-line flags over the file, applied again at RELOAD.
    pub flags: config::Overrides,
    /// With `server_auth = "rds_iam"`: the token source, in place of one on the AWS SDK's
    /// default credential chain (for a fixed clock or credentials).
    pub iam_tokens: Option<Arc<auth::iam::IamTokens>>,
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
    start_with(
        config,
        StartOptions {
            config_path,
            flags,
            iam_tokens: None,
        },
    )
    .await
}

/// Like [`start`], with the extras in `options`.
pub async fn start_with(config: Config, options: StartOptions) -> Result<Handle, StartError> {
    let StartOptions {
        config_path,
        flags,
        iam_tokens,
    } = options;
    let mut config = config;
    // First, so the logins of start-up (the budget read) are counted too.
    admin::recorder();
    metrics::set_group_label_cap(config.max_group_labels as usize);
    metrics::describe();
    metrics::zero_initialise();
    let tls = tls::TlsState::load(&config)?;
    let iam_tokens = server::rds_iam_tokens(&config, iam_tokens.as_ref()).await?;
    let server_passwords = server::ServerPassword::all(&config, iam_tokens.as_ref());
    let limits_due = budget_from_server(&mut config, &tls.connector, &server_passwords).await?;
    let credentials = derive_credentials(&config).await?;
    let config = Arc::new(config);
    metrics::global()
        .budget
        .set(f64::from(config.max_server_connections));

    // A fleet member shares its ports with its successor (SO_REUSEPORT): the new process
    // starts while the old one drains, and their budget is shared like any members'. A lone
    // instance keeps its port to itself, so a second one cannot double its budget.
    let reuse_port = config.fleet.is_some();
    let listener = bind(config.listen, reuse_port).map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let admin_listener =
        bind(config.admin_listen, reuse_port).map_err(|source| StartError::Bind {
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
    // The groups known in advance exist from the start, so their series are exported at 0
    // before their first client.
    let known_groups: Vec<&String> = match config.group_by {
        config::GroupBy::User => config.users.keys().collect(),
        config::GroupBy::Database => config.databases.keys().collect(),
        config::GroupBy::ApplicationName => Vec::new(),
    };
    for name in known_groups.into_iter().chain(config.groups.keys()) {
        pools.group(name, context::group_limits(&config, name));
    }
    // A server connection let go of holds its place in the budget until its backend has gone.
    let servers = server::ServerRegistry::default();
    let wake = pools.clone();
    pools.count_backends(servers.count_backends(Box::new(move || wake.wake())));
    let shutdown = CancellationToken::new();
    let context = Arc::new(Context {
        config: RwLock::new(config.clone()),
        config_path,
        flags,
        pools: pools.clone(),
        credentials: RwLock::new(Arc::new(credentials)),
        server_passwords: RwLock::new(server_passwords),
        iam_tokens: RwLock::new(iam_tokens),
        servers,
        tls: RwLock::new(tls),
        mock_secret: rand::random(),
        passthrough: Default::default(),
        auth_query: Default::default(),
        clients: Default::default(),
        server_params: Default::default(),
        shutdown: shutdown.clone(),
        statement_hasher: Default::default(),
        validated_settings: Default::default(),
        interned: Default::default(),
        ready: Default::default(),
        fleet: Default::default(),
    });
    if let Some(name) = &config.fleet {
        // A fleet member opens no server connection before it holds a slot for it.
        context.pools.set_budget(0);
        // Its clients' cancel keys carry its tag, so any member can route their cancels.
        let tag = rand::random_range(1..=clients::TAG_MAX);
        context.clients.set_tag(tag);
        context.fleet.tag.store(tag, Ordering::Relaxed);
        let _ = context.fleet.listen.set(local_addr);
        let weak = Arc::downgrade(&context);
        context.pools.on_queue(Box::new(move || {
            if let Some(ctx) = weak.upgrade() {
                ctx.fleet.demand.notify_one();
            }
        }));
        tracing::info!(fleet = %name, budget = config.max_server_connections, "joining the fleet: the budget is shared with its other instances");
    }
    match limits_due {
        LimitsDue::None => {}
        LimitsDue::Derive => context.ready.budget_pending.store(true, Ordering::Relaxed),
        LimitsDue::Check => context
            .ready
            .budget_unchecked
            .store(true, Ordering::Relaxed),
    }
    tracing::info!(%local_addr, %admin_addr, budget = config.max_server_connections, "sluice listening");
    let ctx = context.clone();
    let task = tokio::spawn(async move {
        let ready = ctx.ready.clone();
        let status = Arc::new(status::Status::default());
        let maintenance = tokio::spawn(maintenance::run(ctx.clone(), status.clone()));
        let fleet = tokio::spawn(coordinator::run(ctx.clone()));
        let refresh: admin::Refresh = {
            let ctx = ctx.clone();
            Arc::new(move || maintenance::server_gauges(&ctx))
        };
        let report: admin::StatusReport = {
            let ctx = ctx.clone();
            Arc::new(move || serde_json::to_string(&status.report(&ctx)).unwrap_or_default())
        };
        let admin = tokio::spawn(admin::serve(
            admin_listener,
            ready,
            ctx.shutdown.clone(),
            refresh,
            report,
        ));
        net::serve(ctx.clone(), listener, DRAIN_TIMEOUT).await;
        ctx.pools.close();
        maintenance.abort();
        let _ = admin.await;
        drop(ctx.pools.drain_idle());
        // The fleet gets this instance's slots back once its connections have gone.
        ctx.fleet.leave.cancel();
        let _ = fleet.await;
    });
    Ok(Handle {
        local_addr,
        admin_addr,
        shutdown,
        context,
        task,
    })
}

/// A listening socket on `addr`, shared with other processes that bind it with `reuse_port`
/// too (SO_REUSEPORT: the kernel spreads new connections over them).
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(4096)
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

/// What is left to learn from the server once it answers.
enum LimitsDue {
    None,
    /// `max_server_connections = 0` and the server has not told its limit: Sluice serves with
    /// [`PROVISIONAL_BUDGET`] and is not ready until the housekeeping derives the budget.
    Derive,
    /// The configured budget has not been checked against the server's limit.
    Check,
}

/// Derives the budget from the server's limit (`max_server_connections = 0`) or checks the
/// configured one against it, and logs what it found. A budget that does not fit stops
/// start-up (unless `allow_budget_over_server_limit`); a server that cannot be reached or
/// refuses the login does not: Sluice starts, the log says why and what to fix, and the
/// housekeeping tries again.
async fn budget_from_server(
    cfg: &mut Config,
    tls: &Arc<tls::Connector>,
    passwords: &HashMap<String, Arc<server::ServerPassword>>,
) -> Result<LimitsDue, StartError> {
    let derive = cfg.max_server_connections == 0;
    let Some((db, user)) = cfg.first_login() else {
        if derive {
            return Err(StartError::Budget(
                "0 derives it from the server, which needs a database and a user to log in with"
                    .into(),
            ));
        }
        return Ok(LimitsDue::None);
    };
    let server = format!("{}:{}", cfg.server_host, cfg.server_port);
    let limits = match check::read_limits(cfg, tls, passwords.get(&user).cloned(), &db, &user).await
    {
        Ok((_, limits)) => limits,
        Err(e) => {
            let fix = check::advice(&e, cfg, &db, &user);
            if derive {
                cfg.max_server_connections = PROVISIONAL_BUDGET;
                tracing::error!(%server, error = %e, %fix, "cannot read the server's max_connections to derive max_server_connections: starting not ready, with a budget of {PROVISIONAL_BUDGET} until the server answers (or set max_server_connections)");
                return Ok(LimitsDue::Derive);
            }
            tracing::warn!(%server, error = %e, %fix, "cannot check max_server_connections against the server's max_connections: starting, and checking once the server answers");
            return Ok(LimitsDue::Check);
        }
    };
    if derive {
        cfg.max_server_connections = limits.derived_budget().ok_or_else(|| {
            StartError::Budget(format!(
                "the server leaves no room for a budget ({}): raise its max_connections",
                limits.describe()
            ))
        })?;
        tracing::info!(%server, limits = %limits.describe(), max_server_connections = cfg.max_server_connections, "derived the server connection budget from the server's max_connections");
        return Ok(LimitsDue::None);
    }
    match limits.budget_problem(cfg.max_server_connections) {
        None => {
            tracing::info!(%server, limits = %limits.describe(), max_server_connections = cfg.max_server_connections, "the budget fits below the server's limit");
        }
        Some(problem) if cfg.allow_budget_over_server_limit => {
            tracing::warn!(%server, %problem, "starting anyway (allow_budget_over_server_limit)");
        }
        Some(problem) => {
            return Err(StartError::Budget(format!(
                "{problem} (server {server}; to start anyway, as when the server's limit is about to be raised, set allow_budget_over_server_limit = true)"
            )))
        }
    }
    Ok(LimitsDue::None)
}
