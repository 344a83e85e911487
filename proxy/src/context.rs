//! What every session shares: the configuration in force, the pools, the client and server
//! registries, TLS and credentials, and RELOAD, which swaps them.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, Credentials};
use crate::clients::ClientRegistry;
use crate::config::{Config, ConfigError};
use crate::pool::{GroupLimits, Limits, PoolId, Pools};
use crate::server::{ServerConn, ServerError, ServerPassword, ServerRegistry};

/// ParameterStatus (name, value) pairs a server reported.
pub type ServerParams = Arc<Vec<(String, String)>>;

/// What many sessions hold alike, one copy of each distinct value.
#[derive(Default)]
pub struct Interned {
    pub settings: crate::shared::Interner<Vec<(String, String)>>,
    pub reported: crate::shared::Interner<Vec<crate::protocol::backend::Parameter>>,
    /// Clients' user, database and application names.
    pub strings: crate::shared::Interner<String>,
}

/// Everything sessions share.
pub struct Context {
    /// The configuration in force; RELOAD swaps it. Sessions keep the one they started with.
    pub config: RwLock<Arc<Config>>,
    /// The file and flags the configuration came from, for RELOAD.
    pub config_path: Option<std::path::PathBuf>,
    pub flags: crate::config::Overrides,
    pub pools: Pools<Box<ServerConn>>,
    pub credentials: RwLock<Arc<HashMap<String, Credentials>>>,
    /// The password Sluice presents to the server, by user; RELOAD replaces them, a refused
    /// login may renew one from its file. Sessions use the one in force, not the one of the
    /// configuration they started with.
    pub server_passwords: RwLock<HashMap<String, Arc<ServerPassword>>>,
    /// With `server_auth = "rds_iam"`: the tokens server logins present; kept across RELOAD
    /// while the region stays.
    pub iam_tokens: RwLock<Option<Arc<crate::auth::iam::IamTokens>>>,
    pub servers: ServerRegistry,
    /// TLS toward clients and servers; RELOAD swaps it (certificate rotation).
    pub tls: RwLock<crate::tls::TlsState>,
    /// Seeds the SCRAM exchange of unknown users, so it fails like a wrong password.
    pub mock_secret: [u8; 32],
    /// Passthrough authentication's kept keys and failure counts.
    pub passthrough: crate::passthrough::Passthrough,
    /// `auth_query`'s fetched secrets and its control pool.
    pub auth_query: crate::auth_query::AuthQuery,
    pub clients: ClientRegistry,
    /// ParameterStatus values of each pool's servers, reported to clients at start-up.
    pub server_params: Mutex<HashMap<PoolId, ServerParams>>,
    pub shutdown: CancellationToken,
    /// Keys the hash that names prepared statements on servers.
    pub statement_hasher: std::collections::hash_map::RandomState,
    /// Startup settings (name, value) a server has accepted, with the value it reported.
    pub validated_settings: Mutex<HashMap<(String, String), Option<String>>>,
    /// The one copy of what many sessions hold alike.
    pub interned: Interned,
    /// What `/readyz` answers from: the server's port, and the outcomes of real logins.
    pub ready: Arc<crate::admin::Readiness>,
    /// A fleet member's view of its fleet and share ([`crate::fleet`]).
    pub fleet: crate::fleet::Fleet,
}

impl Context {
    pub fn config(&self) -> Arc<Config> {
        self.config.read().clone()
    }

    pub fn tls(&self) -> crate::tls::TlsState {
        self.tls.read().clone()
    }

    /// Records how a login to the server as `user` to `database`, for `pool`, went: the
    /// connect metric, readiness, whether the server is in an outage, and the parameters a new
    /// connection reported (what the pool's clients are told at start-up). The first failure
    /// of an outage closes the idle server connections, which it has most likely broken too,
    /// so none is handed to a client.
    pub fn record_login(
        &self,
        pool: PoolId,
        database: &str,
        user: &str,
        outcome: Result<&ServerConn, &ServerError>,
    ) {
        let g = crate::metrics::global();
        match outcome {
            Ok(conn) => {
                self.server_params
                    .lock()
                    .insert(pool, Arc::new(conn.params.clone()));
                crate::metrics::server_connect("ok");
                self.ready.login(database, user, true);
                if self.pools.set_outage(false) {
                    g.server_unavailable.set(0.0);
                    tracing::info!("the database server can be reached again");
                }
            }
            Err(e) => {
                crate::metrics::server_connect(e.kind());
                if e.says_unable_to_serve() {
                    self.ready.login(database, user, false);
                }
                if e.is_outage() && self.pools.set_outage(true) {
                    g.server_unavailable.set(1.0);
                    let idle = self.pools.drain_idle();
                    for _ in &idle {
                        crate::metrics::server_closed("outage");
                    }
                    tracing::warn!(
                        error = %e,
                        closed_idle = idle.len(),
                        "the database server cannot be reached: requests wait while Sluice reconnects (server_unavailable_timeout)"
                    );
                }
            }
        }
    }

    /// The credential to log in to the server as `user` with: the configured one, else the
    /// SCRAM keys passthrough keeps for the user.
    pub fn server_password(&self, user: &str) -> Option<Arc<ServerPassword>> {
        let configured = self.server_passwords.read().get(user).cloned();
        configured.or_else(|| self.passthrough.server_password(user))
    }
}

/// The user of each database's pool of passthrough's verifying logins (no client can log in
/// as an empty user name). Its connections move to their role's pool once verified.
pub const VERIFY_USER: &str = "";

/// The group verifying logins wait in, whatever `group_by` says (a user's own group would be
/// made for names nobody has verified); also how SHOW POOLS names their pools' user.
pub const VERIFY_GROUP: &str = "(passthrough logins)";

/// How many verifying logins a database's verification pool runs at once: `max_connecting`.
pub fn verify_pool_size(cfg: &Config) -> u32 {
    cfg.max_connecting.max(1)
}

/// The virtual database of the admin console.
pub const ADMIN_DATABASE: &str = "sluice";

/// Pool limits from a configuration.
pub fn limits(cfg: &Config) -> Limits {
    Limits {
        // The control pool's connections are inside the budget too.
        budget: cfg
            .max_server_connections
            .saturating_sub(crate::control::reserved(cfg))
            .max(1),
        max_connecting: cfg.max_connecting,
        max_waiting: cfg.max_waiting,
        wait_timeout: cfg.wait_timeout,
        shed_target: cfg.shed_target,
        shed_interval: cfg.shed_interval,
        server_unavailable_timeout: cfg.server_unavailable_timeout(),
    }
}

/// A group's limits from a configuration.
pub fn group_limits(cfg: &Config, name: &str) -> GroupLimits {
    cfg.groups
        .get(name)
        .map(|g| GroupLimits {
            max_connections: g.max_connections,
            reserved: g.reserved_connections.unwrap_or(0),
            max_waiting: g.max_waiting,
        })
        .unwrap_or_default()
}

/// Why a RELOAD (or SIGHUP) kept the running configuration.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid configuration: `users.{user}.password`: {source}")]
    Secret { user: String, source: AuthError },
    /// Deriving the secrets on the blocking pool failed (it panicked or was cancelled).
    #[error("{0}")]
    Derive(tokio::task::JoinError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("invalid configuration: `server_auth`: {0}")]
    Iam(#[from] crate::auth::iam::IamError),
}

impl Context {
    /// Sets the global budget (derived from the server once it answered), as a RELOAD would.
    pub fn set_budget(&self, budget: u32) {
        let mut cfg = (*self.config()).clone();
        cfg.max_server_connections = budget;
        self.apply_limits(&cfg);
        *self.config.write() = Arc::new(cfg);
    }

    /// Gives the pools `cfg`'s budget, limits, pool sizes and group settings.
    fn apply_limits(&self, cfg: &Config) {
        let pool_size = |db: &str, user: &str| match user {
            VERIFY_USER => (verify_pool_size(cfg), 0),
            _ => (cfg.pool_size_for(db), cfg.min_pool_size_for(db)),
        };
        let group = |name: &str| group_limits(cfg, name);
        let mut limits = limits(cfg);
        // A fleet member's pools have its share, which its coordination sets.
        let share = cfg
            .fleet
            .as_ref()
            .map(|_| self.fleet.pool_budget().unwrap_or(0));
        if let Some(share) = share {
            limits.budget = share;
        }
        self.pools.reconfigure(limits, &pool_size, &group);
        crate::metrics::global()
            .budget
            .set(f64::from(share.unwrap_or(cfg.max_server_connections)));
    }

    /// Shuts down as SIGTERM asks: `/readyz` answers 503 for `shutdown_grace` while clients are
    /// still served (cut short when `cut_short` completes), then Sluice stops accepting and
    /// drains.
    pub async fn shut_down(&self, cut_short: impl std::future::Future<Output = ()>) {
        let grace = self.config().shutdown_grace;
        if !grace.is_zero() {
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutting down: /readyz answers 503 for shutdown_grace, clients still served"
            );
            self.ready
                .draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                _ = cut_short => {}
            }
        }
        tracing::info!("shutting down: draining sessions");
        self.shutdown.cancel();
    }

    /// Re-reads the configuration file (and environment) and the password files, and applies
    /// them: users and passwords, pool sizes, limits and group settings take effect at once;
    /// addresses need a restart. Sessions and server connections already open stay open.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let old = self.config();
        let mut cfg = Config::load(self.config_path.as_deref(), &self.flags)?;
        if cfg.max_server_connections == 0 {
            cfg.max_server_connections = old.max_server_connections;
        }
        if cfg.listen != old.listen || cfg.admin_listen != old.admin_listen {
            tracing::warn!("listen addresses changed: they take effect after a restart");
        }
        let secrets = cfg.client_secrets();
        let credentials = tokio::task::spawn_blocking(move || Credentials::derive_all(secrets))
            .await
            .map_err(ReloadError::Derive)?
            .map_err(|(user, source)| ReloadError::Secret { user, source })?;
        // Certificates are read again: the next client gets the new one, sessions keep theirs.
        let tls = crate::tls::TlsState::load(&cfg)?;
        let current = self.iam_tokens.read().clone();
        let iam_tokens = crate::server::rds_iam_tokens(&cfg, current.as_ref()).await?;
        let server_passwords = ServerPassword::all(&cfg, iam_tokens.as_ref());
        self.apply_limits(&cfg);
        let cfg = Arc::new(cfg);
        *self.credentials.write() = Arc::new(credentials);
        *self.server_passwords.write() = server_passwords;
        *self.iam_tokens.write() = iam_tokens;
        *self.tls.write() = tls;
        *self.config.write() = cfg;
        // Secrets auth_query fetched are fetched again (a RELOAD is how to say a role changed).
        self.auth_query.clear();
        tracing::info!("configuration reloaded");
        Ok(())
    }
}
