//! Configuration: a TOML file, `SLUICE_*` environment overrides for every key, and flags.
//!
//! Precedence, lowest first: built-in defaults, the file, the environment, flags. Nested keys
//! are reached in the environment with `__` (`SLUICE_USERS__APP__PASSWORD`). Any string may hold
//! `${NAME}` references to other environment variables, so no secret needs to live in the file.
//! Every password may also come from a file (`password_file`, `server_password_file`,
//! `upstream_password_file`; see [`secret`]), read again on every load, so a RELOAD picks up a
//! rotated secret. [`Config::load`] validates everything and names the offending key on error;
//! no error quotes a secret.

mod duration;
mod expand;
mod secret;

pub use secret::read_secret_file;
pub use upstream::literal_password;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use thiserror::Error;

mod server_auth;
mod upstream;
mod validate;

pub use self::server_auth::{AuthMode, ServerAuth};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: `{key}`: {why}")]
    Invalid { key: String, why: String },
}

fn invalid(key: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        why: why.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// A server connection is held for one transaction.
    Transaction,
    /// A server connection is held for the whole client session.
    Session,
}

/// What transaction pooling does with statements whose state outlives the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSessionState {
    /// Keep the client on its server for the rest of its session.
    Pin,
    /// Refuse the statement with an error.
    Reject,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One line of text per event; coloured only when stderr is a terminal.
    Text,
    /// One JSON object per line (CloudWatch Logs Insights, Loki, jq).
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    User,
    Database,
    ApplicationName,
}

/// Which password exchange Sluice asks clients for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    /// SCRAM-SHA-256 for every user (users configured with only an md5 hash get md5).
    #[serde(rename = "scram-sha-256", alias = "scram-sha256")]
    ScramSha256,
    /// md5 for users that have an md5-capable secret, SCRAM for the others.
    Md5,
}

/// TLS toward the server, with libpq's `sslmode` meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTls {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, else plain TCP; the certificate is not checked.
    /// (libpq's `allow`, which tries plain TCP first, is taken as `prefer`.)
    #[serde(alias = "allow")]
    Prefer,
    /// TLS or nothing; the certificate is checked only when `server_tls_ca_file` is set
    /// (then as `verify-ca`), as libpq does when a root certificate file exists.
    Require,
    /// TLS with a certificate chain that leads to `server_tls_ca_file`.
    VerifyCa,
    /// `verify-ca`, and the certificate must be for the host Sluice connects to.
    VerifyFull,
}

impl ServerTls {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerTls::Disable => "disable",
            ServerTls::Prefer => "prefer",
            ServerTls::Require => "require",
            ServerTls::VerifyCa => "verify-ca",
            ServerTls::VerifyFull => "verify-full",
        }
    }

    fn parse(s: &str) -> Option<ServerTls> {
        Some(match s {
            "disable" => ServerTls::Disable,
            "prefer" | "allow" => ServerTls::Prefer,
            "require" => ServerTls::Require,
            "verify-ca" => ServerTls::VerifyCa,
            "verify-full" => ServerTls::VerifyFull,
            _ => return None,
        })
    }
}

/// Which servers Sluice uses, with libpq's `target_session_attrs` meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetSessionAttrs {
    /// Only a server that accepts writes: one that reports `in_hot_standby = on` or
    /// `default_transaction_read_only = on` at login (a standby reached through a stale DNS
    /// answer after a failover) is closed and tried again, as in an outage.
    ReadWrite,
    /// Any server (a read replica's endpoint).
    Any,
}

impl TargetSessionAttrs {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::Any => "any",
        }
    }

    fn parse(s: &str) -> Option<TargetSessionAttrs> {
        Some(match s {
            "read-write" => TargetSessionAttrs::ReadWrite,
            "any" => TargetSessionAttrs::Any,
            _ => return None,
        })
    }
}

/// TLS toward clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTls {
    /// SSLRequests are answered `N`.
    Disable,
    /// TLS for clients that ask for it; plain text for the others.
    Allow,
    /// Clients that do not use TLS are refused (FATAL 28000).
    Require,
}

/// The whole configuration, as read from the file and the environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address clients connect to.
    pub listen: SocketAddr,
    /// Address of the HTTP endpoint for /metrics, /healthz and /readyz.
    pub admin_listen: SocketAddr,
    /// `postgres://user:password@host:port/dbname`: the upstream server. Its user and database
    /// are added to `users` and `databases` when not listed there (the zero-config start).
    pub upstream: Option<String>,
    /// File holding the password of `upstream`'s user, instead of a password in the URL.
    pub upstream_password_file: Option<PathBuf>,
    /// Upstream host and port, when not given by `upstream`.
    pub server_host: String,
    pub server_port: u16,
    /// TLS toward the server (libpq's `sslmode`); `--upstream`'s `sslmode` sets it too.
    pub server_tls: ServerTls,
    /// PEM file of the certificate authorities a server certificate must lead to.
    pub server_tls_ca_file: Option<PathBuf>,
    /// Client certificate and key Sluice presents to the server, if it asks for one.
    pub server_tls_cert_file: Option<PathBuf>,
    pub server_tls_key_file: Option<PathBuf>,
    /// What Sluice presents to the server: passwords, or RDS IAM tokens.
    pub server_auth: ServerAuth,
    /// The role Sluice logs in as for itself (readiness, the server's limit, `sluice check`),
    /// in place of the first configured user; it need not be a user clients log in as.
    pub control_user: Option<String>,
    /// `control_user`'s password on the server (not needed with `server_auth = "rds_iam"`).
    pub control_password: Option<String>,
    /// File holding `control_password`; re-read on RELOAD and after a refused login.
    pub control_password_file: Option<PathBuf>,
    /// The database (its name on the server) `control_user` logs in to; unset, the first
    /// configured database.
    pub control_database: Option<String>,
    /// The region RDS IAM tokens are signed for (else `AWS_REGION`, `AWS_DEFAULT_REGION`).
    pub aws_region: Option<String>,
    /// TLS toward clients; unset means `allow` when a certificate is configured, else `disable`.
    pub client_tls: Option<ClientTls>,
    /// Certificate chain (PEM) and private key Sluice presents to clients; re-read on RELOAD.
    pub client_tls_cert_file: Option<PathBuf>,
    pub client_tls_key_file: Option<PathBuf>,
    pub pool_mode: PoolMode,
    pub on_session_state: OnSessionState,
    /// Server connections per (database, user) pool.
    pub pool_size: u32,
    /// Warm server connections kept per pool.
    pub min_pool_size: u32,
    /// Total server connections Sluice may hold; 0 derives it from the server's
    /// `max_connections` minus reserved and headroom at start-up.
    pub max_server_connections: u32,
    /// Start even when `max_server_connections` does not fit below the server's limit.
    pub allow_budget_over_server_limit: bool,
    /// Concurrent client connections accepted.
    pub max_client_connections: u32,
    /// Server connection attempts in flight at once (protects the server from connect storms).
    pub max_connecting: u32,
    /// Clients waiting for a server connection, all groups together.
    pub max_waiting: u32,
    #[serde(with = "duration")]
    pub wait_timeout: Duration,
    /// Overload: once requests have queued for `shed_interval` without the queue emptying,
    /// arrivals predicted to wait longer than `shed_target` are shed, and so are requests that
    /// have waited 1.5 × `shed_target` when their turn comes (see `pool::shed`).
    #[serde(with = "duration")]
    pub shed_target: Duration,
    #[serde(with = "duration")]
    pub shed_interval: Duration,
    #[serde(with = "duration")]
    pub server_connect_timeout: Duration,
    /// While the server cannot be reached (refused, timed out, shutting down or starting,
    /// read-only against `target_session_attrs`), a request waits up to this long from its
    /// arrival while Sluice reconnects with backoff; unset, `wait_timeout`.
    #[serde(with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub server_unavailable_timeout: Option<Duration>,
    pub target_session_attrs: TargetSessionAttrs,
    /// TCP keepalive on server sockets: idle time before the first probe (0 disables), the
    /// time between probes, and how many go unanswered before the connection is dropped.
    #[serde(with = "duration")]
    pub server_tcp_keepalive: Duration,
    #[serde(with = "duration")]
    pub server_tcp_keepalive_interval: Duration,
    pub server_tcp_keepalive_count: u32,
    /// `TCP_USER_TIMEOUT` on server sockets: a server that acknowledges nothing for this long
    /// (data sent, or keepalive probes) is dropped; 0 leaves the system default (minutes).
    #[serde(with = "duration")]
    pub server_tcp_user_timeout: Duration,
    /// TCP keepalive on client sockets (0 disables): shorter than a load balancer's idle
    /// timeout (an AWS NLB's is 350 s), and how a vanished client is noticed.
    #[serde(with = "duration")]
    pub client_tcp_keepalive: Duration,
    #[serde(with = "duration")]
    pub client_tcp_keepalive_interval: Duration,
    pub client_tcp_keepalive_count: u32,
    /// A pooled server connection idle this long is checked (an empty query) before it is handed
    /// to a client; 0 checks every one.
    #[serde(with = "duration")]
    pub server_check_delay: Duration,
    #[serde(with = "duration")]
    pub server_idle_timeout: Duration,
    #[serde(with = "duration")]
    pub server_lifetime: Duration,
    /// Idle clients (no transaction open) are disconnected after this; 0 disables.
    #[serde(with = "duration")]
    pub client_idle_timeout: Duration,
    /// A client that sends nothing for this long inside a transaction block is disconnected
    /// (FATAL 25P03) and its transaction rolled back; 0 disables.
    #[serde(with = "duration")]
    pub idle_transaction_timeout: Duration,
    /// A client that sends nothing for this long in the middle of a message or of a COPY FROM
    /// STDIN is disconnected, and its server connection, if the request holds one already (a
    /// message too large to buffer whole, streamed to its server; a COPY), closed (rolling
    /// back); 0 disables.
    #[serde(with = "duration")]
    pub client_stall_timeout: Duration,
    /// A request the server has not answered within this long is cancelled (a CancelRequest;
    /// the client gets the server's `57014` error); a server that does not answer the cancel
    /// either is closed. 0 disables. Keep it above the server's `statement_timeout`.
    #[serde(with = "duration")]
    pub query_timeout: Duration,
    /// Time a client has to finish startup and authentication.
    #[serde(with = "duration")]
    pub client_login_timeout: Duration,
    /// On SIGTERM, how long `/readyz` answers 503 while Sluice still serves, before it stops
    /// accepting clients and drains; 0 skips it.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Largest single client message accepted, in bytes.
    pub max_message_bytes: u32,
    /// Named prepared statements kept per server connection (least recently used closed).
    pub max_prepared_statements: u32,
    pub client_auth: ClientAuth,
    /// Who judges a client's password: `users` (those configured) or `passthrough`.
    pub auth: AuthMode,
    /// How long passthrough keeps a user's SCRAM keys after its last server login with them.
    #[serde(with = "duration")]
    pub passthrough_ttl: Duration,
    /// Passthrough asks for a cleartext password off TLS from other hosts than loopback.
    pub allow_cleartext_without_tls: bool,
    /// What fetches a user's secret under `auth = "auth_query"` (`$1`: the user name).
    pub auth_query: String,
    /// The role `auth_query` runs as; defaults to `control_user`.
    pub auth_user: Option<String>,
    /// How long a secret `auth_query` fetched is used before it is fetched again.
    #[serde(with = "duration")]
    pub auth_query_ttl: Duration,
    /// Every client connection opens with a PROXY protocol v2 header (an AWS NLB with proxy
    /// protocol v2 on its target group), whose client address Sluice uses.
    pub proxy_protocol: bool,
    /// Instances with the same fleet name share one budget through the database (see
    /// `crate::fleet`); unset, this instance has the whole budget to itself.
    pub fleet: Option<String>,
    /// How often a fleet member looks at the others' shares and demand.
    #[serde(with = "duration")]
    pub fleet_interval: Duration,
    /// How long the server takes at most to notice that a fleet member's host has gone (no
    /// FIN: a crash, a cut link) and free its share; a killed process's share is free at once.
    #[serde(with = "duration")]
    pub fleet_dead_after: Duration,
    /// Budget slots the fleet leaves free, for an instance that starts to log in.
    pub fleet_spare: u32,
    /// `host:port` where the other fleet members reach this instance's client port (cancel
    /// requests); unset: the listen address, or the address this host reaches the server from.
    pub fleet_advertise: Option<String>,
    /// Users that may connect to the admin console (the virtual database `sluice`).
    pub admin_users: Vec<String>,
    pub group_by: GroupBy,
    /// Distinct group label values exported in metrics; the rest are reported as `other`.
    pub max_group_labels: u32,
    /// Threads that run sessions: 0 chooses (one on a host with one or two CPUs, else one
    /// per CPU); 1 runs everything on one thread. Read at start-up only.
    pub worker_threads: u32,
    /// Read at start-up only.
    pub log_format: LogFormat,
    pub databases: BTreeMap<String, DatabaseConfig>,
    pub users: BTreeMap<String, UserConfig>,
    pub groups: BTreeMap<String, GroupConfig>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Name of the database on the server (defaults to the key).
    pub dbname: Option<String>,
    pub pool_mode: Option<PoolMode>,
    pub pool_size: Option<u32>,
    pub min_pool_size: Option<u32>,
    /// `auth` for this database.
    pub auth: Option<AuthMode>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserConfig {
    /// What clients must present: a plaintext password, a `SCRAM-SHA-256$...` verifier or an
    /// `md5...` hash. After [`Config::load`], the content of `password_file` when that is set.
    pub password: Option<String>,
    /// File holding `password` (one or the other may be set).
    pub password_file: Option<PathBuf>,
    /// Password Sluice uses on the server; defaults to `password` when that is plaintext.
    /// After [`Config::load`], the content of `server_password_file` when that is set.
    pub server_password: Option<String>,
    /// File holding `server_password` (one or the other may be set).
    pub server_password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupConfig {
    pub max_connections: Option<u32>,
    pub reserved_connections: Option<u32>,
    pub max_waiting: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 6432)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9930)),
            upstream: None,
            upstream_password_file: None,
            server_host: "127.0.0.1".into(),
            server_port: 5432,
            server_tls: ServerTls::Prefer,
            server_tls_ca_file: None,
            server_tls_cert_file: None,
            server_tls_key_file: None,
            control_user: None,
            control_password: None,
            control_password_file: None,
            control_database: None,
            server_auth: ServerAuth::Password,
            aws_region: None,
            client_tls: None,
            client_tls_cert_file: None,
            client_tls_key_file: None,
            pool_mode: PoolMode::Transaction,
            on_session_state: OnSessionState::Pin,
            pool_size: 20,
            min_pool_size: 0,
            max_server_connections: 0,
            allow_budget_over_server_limit: false,
            max_client_connections: 10_000,
            max_connecting: 8,
            max_waiting: 5_000,
            wait_timeout: Duration::from_secs(5),
            shed_target: Duration::from_millis(500),
            shed_interval: Duration::from_secs(1),
            server_connect_timeout: Duration::from_secs(5),
            server_unavailable_timeout: None,
            target_session_attrs: TargetSessionAttrs::ReadWrite,
            server_tcp_keepalive: Duration::from_secs(3),
            server_tcp_keepalive_interval: Duration::from_secs(1),
            server_tcp_keepalive_count: 3,
            server_tcp_user_timeout: Duration::from_secs(8),
            client_tcp_keepalive: Duration::from_secs(60),
            client_tcp_keepalive_interval: Duration::from_secs(10),
            client_tcp_keepalive_count: 6,
            server_check_delay: Duration::from_secs(30),
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            client_idle_timeout: Duration::from_secs(900),
            client_login_timeout: Duration::from_secs(15),
            idle_transaction_timeout: Duration::from_secs(60),
            client_stall_timeout: Duration::from_secs(10),
            query_timeout: Duration::ZERO,
            shutdown_grace: Duration::from_secs(5),
            max_message_bytes: 64 << 20,
            max_prepared_statements: 200,
            client_auth: ClientAuth::ScramSha256,
            auth: AuthMode::Users,
            passthrough_ttl: Duration::from_secs(3600),
            allow_cleartext_without_tls: false,
            auth_query: "SELECT usename, passwd FROM pg_shadow WHERE usename = $1".into(),
            auth_user: None,
            auth_query_ttl: Duration::from_secs(60),
            proxy_protocol: false,
            fleet: None,
            fleet_interval: Duration::from_secs(1),
            fleet_dead_after: Duration::from_secs(15),
            fleet_spare: 1,
            fleet_advertise: None,
            admin_users: Vec::new(),
            group_by: GroupBy::User,
            max_group_labels: 100,
            worker_threads: 0,
            log_format: LogFormat::Text,
            databases: BTreeMap::new(),
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }
}

/// The keys that also have flags; `None` leaves the file/environment value.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_server_connections: Option<u32>,
}

/// Logs the `SLUICE_*` variables that [`Config::load`] ignores as Kubernetes service links.
pub fn log_ignored_variables() {
    for (name, _) in std::env::vars_os() {
        if let Some(key) = name.to_str().and_then(|n| n.strip_prefix("SLUICE_")) {
            if is_service_link(key) {
                tracing::info!(
                    variable = %name.to_string_lossy(),
                    "ignoring a Kubernetes service-link variable"
                );
            }
        }
    }
}

/// Logs every key the file sets that the environment or a flag overrides, so that an override
/// (a container image's `ENV`, a forgotten export) is never silent. Values are not logged: they
/// may be secrets. Call after logging is set up; a file that does not load is reported by
/// [`Config::load`] instead.
pub fn log_overridden_keys(file: Option<&Path>, flags: &Overrides) {
    let Some(table) = file
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| t.parse::<toml::Table>().ok())
    else {
        return;
    };
    let in_file = |key: &str| {
        let mut parts = key.split('.');
        let Some(mut value) = parts.next().and_then(|k| table.get(k)) else {
            return false;
        };
        for part in parts {
            match value.get(part) {
                Some(inner) => value = inner,
                None => return false,
            }
        }
        true
    };
    let mut by = Vec::new();
    for (name, _) in std::env::vars_os() {
        let Some(key) = name.to_str().and_then(|n| n.strip_prefix("SLUICE_")) else {
            continue;
        };
        let k = key.to_ascii_lowercase();
        if k == "config" || k.starts_with("loadtest_") || is_service_link(key) {
            continue;
        }
        by.push((k.replace("__", "."), format!("SLUICE_{key}")));
    }
    let flag_keys = [
        ("listen", flags.listen.is_some()),
        ("admin_listen", flags.admin_listen.is_some()),
        ("upstream", flags.upstream.is_some()),
        ("pool_size", flags.pool_size.is_some()),
        (
            "max_server_connections",
            flags.max_server_connections.is_some(),
        ),
    ];
    for (key, set) in flag_keys {
        if set && !by.iter().any(|(k, _)| k == key) {
            by.push((key.to_string(), format!("--{}", key.replace('_', "-"))));
        }
    }
    by.sort();
    for (key, source) in by {
        if in_file(&key) {
            tracing::warn!(
                key = %key,
                by = %source,
                "the configuration file's value is overridden"
            );
        }
    }
}

/// Whether `key` (a `SLUICE_` variable's name without the prefix, any case) has the shape of
/// the variables Kubernetes injects for a Service named `sluice`: `SLUICE_PORT`,
/// `SLUICE_PORT_5432_TCP[_PROTO|_PORT|_ADDR]`, `SLUICE_SERVICE_HOST`, `SLUICE_SERVICE_PORT[_*]`.
fn is_service_link(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k == "port" || k.starts_with("port_") || k.starts_with("service_")
}

impl Config {
    /// Keepalive and `TCP_USER_TIMEOUT` for server sockets.
    pub fn server_keepalive(&self) -> crate::stream::Keepalive {
        crate::stream::Keepalive {
            idle: self.server_tcp_keepalive,
            interval: self.server_tcp_keepalive_interval,
            count: self.server_tcp_keepalive_count,
            user_timeout: self.server_tcp_user_timeout,
        }
    }

    /// Keepalive for client sockets.
    pub fn client_keepalive(&self) -> crate::stream::Keepalive {
        crate::stream::Keepalive {
            idle: self.client_tcp_keepalive,
            interval: self.client_tcp_keepalive_interval,
            count: self.client_tcp_keepalive_count,
            user_timeout: Duration::ZERO,
        }
    }

    /// Reads defaults, then `file`, then `SLUICE_*` variables, then `flags`; expands `${VAR}`
    /// references and validates.
    pub fn load(file: Option<&Path>, flags: &Overrides) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(invalid(
                    "--config",
                    format!("{} does not exist", path.display()),
                ));
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid("--config", format!("{}: {e}", path.display())))?;
            // TOML's own message quotes the offending line, which may hold a password.
            if let Err(e) = text.parse::<toml::Table>() {
                let line = e.span().map(|r| text[..r.start].matches('\n').count() + 1);
                let at = line.map(|l| format!(" line {l}")).unwrap_or_default();
                return Err(ConfigError::Parse(format!(
                    "{}{at}: {}",
                    path.display(),
                    e.message()
                )));
            }
            fig = fig.merge(Toml::string(&text));
        }
        // `SLUICE_CONFIG` names the file, it is not a key; `SLUICE_LOADTEST_*` belong to the
        // load generator, which may share the environment; Kubernetes service links for a
        // Service named `sluice` are not Sluice's (any other unknown key still stops start-up;
        // [`log_ignored_variables`] names the ignored ones).
        let env = Env::prefixed("SLUICE_")
            .split("__")
            .ignore(&["config"])
            .filter(|k| {
                let k = k.as_str();
                !k.to_ascii_lowercase().starts_with("loadtest_") && !is_service_link(k)
            });
        for (key, value) in env.iter() {
            let value = expand::env_value(key.as_str(), value);
            fig = fig.merge(Serialized::defaults(figment::util::nest(
                key.as_str(),
                value,
            )));
        }
        fig = fig.merge(Serialized::defaults(flags));
        // `${NAME}` references, in every string value of every source, once.
        let mut secrets = expand::Secrets::default();
        let mut tree: figment::value::Value = fig.extract().map_err(parse_error)?;
        let expanded = expand::expand_tree(&mut tree, &mut Vec::new(), &mut secrets);
        let loaded = expanded.and_then(|()| {
            let mut cfg: Config = Figment::from(Serialized::defaults(tree))
                .extract()
                .map_err(parse_error)?;
            cfg.apply_upstream()?;
            cfg.read_secret_files()?;
            cfg.validate()?;
            Ok(cfg)
        });
        loaded.map_err(|e| secrets.scrub_error(e))
    }

    /// `server_unavailable_timeout` with its default filled in.
    pub fn server_unavailable_timeout(&self) -> Duration {
        self.server_unavailable_timeout.unwrap_or(self.wait_timeout)
    }

    /// `client_tls` with its default filled in.
    pub fn client_tls_mode(&self) -> ClientTls {
        self.client_tls
            .unwrap_or(if self.client_tls_cert_file.is_some() {
                ClientTls::Allow
            } else {
                ClientTls::Disable
            })
    }

    /// Each user's client-facing secret (password, verifier or md5 hash), by user name.
    pub fn client_secrets(&self) -> Vec<(String, String)> {
        self.users
            .iter()
            .filter_map(|(name, u)| u.password.clone().map(|p| (name.clone(), p)))
            .collect()
    }

    pub fn pool_mode_for(&self, db: &str) -> PoolMode {
        self.databases
            .get(db)
            .and_then(|d| d.pool_mode)
            .unwrap_or(self.pool_mode)
    }

    pub fn pool_size_for(&self, db: &str) -> u32 {
        self.databases
            .get(db)
            .and_then(|d| d.pool_size)
            .unwrap_or(self.pool_size)
    }

    pub fn min_pool_size_for(&self, db: &str) -> u32 {
        self.databases
            .get(db)
            .and_then(|d| d.min_pool_size)
            .unwrap_or(self.min_pool_size)
    }

    /// The database name on the server for a client-facing name.
    pub fn server_dbname<'a>(&'a self, db: &'a str) -> &'a str {
        self.databases
            .get(db)
            .and_then(|d| d.dbname.as_deref())
            .unwrap_or(db)
    }
}

/// A figment error as `key: what is wrong`, each error of a chain (the sources are Sluice's own
/// and say nothing to an operator).
fn parse_error(e: figment::Error) -> ConfigError {
    let text = e
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let secret = e.path.last().is_some_and(|k| expand::is_secret_key(k));
            match e.kind {
                _ if key.is_empty() => e.kind.to_string(),
                // Never the value a secret key was given, whatever its type.
                figment::error::Kind::InvalidType(_, expected) if secret => {
                    format!("`{key}`: invalid type, expected {expected}")
                }
                kind => format!("`{key}`: {kind}"),
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    ConfigError::Parse(text)
}

#[cfg(test)]
mod tests;
