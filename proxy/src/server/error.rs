//! How connecting to the server or talking to it failed, and what a client is told about it.

use std::io;

use thiserror::Error;

use crate::error::{sqlstate, PgError, Side};
use crate::tls::HandshakeError;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("could not connect to server {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("timed out connecting to server {0}")]
    ConnectTimeout(String),
    #[error("server connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("server closed the connection unexpectedly")]
    Closed,
    #[error("server protocol error: {0}")]
    Protocol(String),
    #[error("server authentication: {0}")]
    Auth(String),
    /// The TLS handshake failed (a certificate problem, or TLS spoken badly).
    #[error("TLS with server {addr}: {}", .error.describe(.host))]
    Tls {
        addr: String,
        host: String,
        error: HandshakeError,
    },
    /// `server_tls` asks for TLS and the server answered the SSLRequest with `N`.
    #[error("server {addr} does not support TLS, and server_tls = {mode} requires it")]
    TlsUnsupported { addr: String, mode: &'static str },
    /// The server refused the connection or a statement with an ErrorResponse.
    #[error("server error {}: {}", .0.code(), .0.message())]
    Rejected(PgError),
    /// The server refused Sluice's login itself (SQLSTATE class 28: a wrong server password,
    /// no `pg_hba.conf` entry): Sluice's credentials or the server's rules must change.
    #[error("server {addr} refused the login as \"{user}\": {} {}", .error.code(), .error.message())]
    LoginRefused {
        addr: String,
        user: String,
        error: Box<PgError>,
        /// Whether Sluice presented an RDS IAM token (`server_auth = "rds_iam"`).
        rds_iam: bool,
    },
    /// A login that succeeded on a server that does not accept writes, with
    /// `target_session_attrs = read-write`: the setting that says so (`in_hot_standby`).
    #[error("server {addr} is read-only ({setting} = on), and target_session_attrs = read-write")]
    ReadOnly { addr: String, setting: &'static str },
}

impl ServerError {
    /// Metric label for connect failures.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerError::Connect { .. } => "refused",
            ServerError::ConnectTimeout(_) => "timeout",
            ServerError::Tls { .. } | ServerError::TlsUnsupported { .. } => "tls",
            ServerError::Rejected(_) => "rejected",
            ServerError::Auth(_) | ServerError::LoginRefused { .. } => "auth_failed",
            ServerError::ReadOnly { .. } => "read_only",
            _ => "error",
        }
    }

    /// Whether the failure is one an outage causes, which Sluice rides out by connecting again
    /// with backoff (up to `server_unavailable_timeout`): the server unreachable, refusing,
    /// silent, going away during the login, shutting down or starting up (`57P01`-`57P03`),
    /// or read-only (a standby, a stale DNS answer after a failover). Not: what only a
    /// configuration change cures (authentication, TLS, an unknown database) or the server's
    /// own connection limit.
    pub fn is_outage(&self) -> bool {
        match self {
            ServerError::Connect { .. }
            | ServerError::ConnectTimeout(_)
            | ServerError::Io(_)
            | ServerError::Closed
            | ServerError::ReadOnly { .. } => true,
            ServerError::Rejected(e) => {
                e.code().class() == "08"
                    || [
                        sqlstate::ADMIN_SHUTDOWN,
                        sqlstate::CRASH_SHUTDOWN,
                        sqlstate::CANNOT_CONNECT_NOW,
                    ]
                    .contains(&e.code())
            }
            ServerError::Protocol(_)
            | ServerError::Auth(_)
            | ServerError::LoginRefused { .. }
            | ServerError::Tls { .. }
            | ServerError::TlsUnsupported { .. } => false,
        }
    }

    /// Whether the failure says the server cannot serve Sluice (for readiness): every failure
    /// but the server's own `too many connections` (53300), which says only that it has no
    /// room for one more while the connections Sluice holds still serve.
    pub fn says_unable_to_serve(&self) -> bool {
        !matches!(self, ServerError::Rejected(e) if e.code() == sqlstate::TOO_MANY_CONNECTIONS)
    }

    /// Whether the server refused the login itself (`28P01`, `28000`), which a newer password
    /// may cure.
    pub fn is_login_refused(&self) -> bool {
        matches!(self, ServerError::LoginRefused { error, .. }
            if error.code() == sqlstate::INVALID_PASSWORD
                || error.code() == sqlstate::INVALID_AUTHORIZATION_SPECIFICATION)
    }
}

/// The error a client sees when Sluice cannot give it a server connection because connecting
/// failed. Errors the server sent (a missing database, a refused login) pass through as they are.
pub fn client_error(e: &ServerError) -> PgError {
    let failed = |message: String| {
        PgError::error(sqlstate::CONNECTION_FAILURE, message).with_side(Side::Server)
    };
    match e {
        ServerError::Rejected(e) => e.clone(),
        // Not the client's password: the client has authenticated to Sluice. Passing the
        // server's 28P01 on would tell it that its own password is wrong.
        ServerError::LoginRefused {
            addr,
            user,
            error,
            rds_iam,
        } => PgError::error(
            sqlstate::SERVER_REJECTED_CONNECTION,
            format!(
                "the database server {addr} refused Sluice's login as \"{user}\": {}",
                error.message()
            ),
        )
        .with_side(Side::Server)
        .with_detail(
            "Your own password was accepted by Sluice; the server refused the credentials Sluice logs in with.",
        )
        .with_hint(if *rds_iam {
            format!("Sluice logs in with an RDS IAM token (server_auth = rds_iam), signed for {addr}: the role needs GRANT rds_iam TO \"{user}\", Sluice's AWS identity an IAM policy allowing rds-db:connect on dbuser:<resource id>/{user}, and server_host must be the database's endpoint name (the host the token is signed for), not an alias.")
        } else if error.code() == sqlstate::INVALID_PASSWORD {
            format!("Sluice's operator must fix the server password of \"{user}\" (users.{user}.server_password, server_password_file or upstream); a password file is read again after a refused login.")
        } else {
            "Sluice's operator must fix the server's pg_hba.conf for Sluice's address, or the server_tls setting it requires.".to_string()
        }),
        ServerError::Tls { host, error, .. } => failed(error.describe(host)).with_detail(
            "Sluice could not open an encrypted connection to the database server (server_tls).",
        ),
        // A login Sluice would not complete (a cleartext password over an unverified hop, no
        // password configured): retrying does not help, the configuration must change.
        ServerError::Auth(why) => failed(format!(
            "Sluice could not log in to the database server: {why}"
        )),
        ServerError::ReadOnly { addr, setting } => failed(format!(
            "the database server {addr} is read-only ({setting} = on)"
        ))
        .with_detail(
            "Sluice uses only a server that accepts writes (target_session_attrs = read-write); after a failover the endpoint's name may still lead to the old primary for a while. For a read replica set target_session_attrs = any.",
        )
        .with_hint("The query was not executed; it is safe to retry."),
        ServerError::TlsUnsupported { .. } => {
            failed("the database server does not support TLS, which server_tls requires".into())
        }
        other => failed(format!(
            "Sluice could not connect to the database server: {}",
            other.kind().replace('_', " ")
        ))
        .with_hint("The query was not executed; it is safe to retry."),
    }
}
