//! Client start-up: the startup packet (TLS after an SSLRequest or directly, GSSENC refusals,
//! cancel requests) and password authentication (SCRAM-SHA-256, -PLUS over TLS, or md5)
//! against the users Sluice is configured with, or passthrough's (`super::passthrough`).
//!
//! See <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>.

use std::sync::Arc;

use bytes::BytesMut;

use super::{ClientConn, Context, Exit};
use crate::auth::{AuthError, Channel, Md5Hash, ScramKeys, ScramServer, ScramVerifier};
use crate::client_conn::{ClientError, Opening};
use crate::config::{AuthMode, ClientAuth, Config};
use crate::context::ADMIN_DATABASE;
use crate::error::{sqlstate, PgError, Side};
use crate::protocol::backend::Out;
use crate::protocol::frontend::{self, tag, Startup};
use crate::server::ServerPassword;
use crate::stream::Stream;
use crate::tls::Acceptor;

const SCRAM: &str = "SCRAM-SHA-256";
const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Largest password/SASL message a client may send.
const MAX_AUTH_MESSAGE: usize = 4096;

/// What a client asked for in its StartupMessage.
pub struct Login {
    pub user: String,
    pub database: String,
    pub params: Vec<(String, String)>,
    /// Whether the client connection is encrypted.
    pub tls: bool,
    /// `tls-server-end-point` data of the certificate the client was served, when
    /// SCRAM-SHA-256-PLUS can be offered.
    pub channel_binding: Option<std::sync::Arc<[u8]>>,
}

impl Login {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the startup packet, negotiating TLS (or refusing it and GSS encryption), until a
/// StartupMessage or a CancelRequest arrives. `Ok(None)` means the connection was a cancel
/// request (handled).
pub async fn read_startup(ctx: &Context, conn: &mut ClientConn) -> Result<Option<Login>, Exit> {
    let mut channel_binding = None;
    loop {
        let msg = match conn.read_startup(!conn.is_tls()).await? {
            Opening::Packet(msg) => msg,
            Opening::TlsHello => {
                // PostgreSQL 17's direct TLS: a ClientHello instead of a startup packet.
                let Some(acceptor) = ctx.tls().acceptor else {
                    return Err(Exit::Quiet);
                };
                upgrade(conn, &acceptor).await?;
                if conn.alpn_protocol() != Some(crate::tls::ALPN_POSTGRESQL) {
                    // As PostgreSQL: direct TLS without ALPN could be another protocol's client.
                    crate::metrics::tls_handshake_failed("client", "no_alpn");
                    return Err(Exit::Quiet);
                }
                channel_binding = acceptor.end_point.clone();
                continue;
            }
        };
        match msg {
            Startup::SslRequest | Startup::GssEncRequest => {
                // Bytes behind the request would be taken as sent over TLS (CVE-2021-23214).
                if conn.buffered() > 0 {
                    return Err(PgError::protocol_violation(
                        "received unencrypted data after encryption request",
                    )
                    .into());
                }
                if conn.is_tls() {
                    return Err(PgError::protocol_violation(
                        "encryption requested on an encrypted connection",
                    )
                    .into());
                }
                let acceptor = match msg {
                    Startup::SslRequest => ctx.tls().acceptor,
                    _ => None,
                };
                let Some(acceptor) = acceptor else {
                    // The client may go on in plain text or give up.
                    conn.send(b"N").await?;
                    continue;
                };
                conn.send(b"S").await?;
                upgrade(conn, &acceptor).await?;
                channel_binding = acceptor.end_point.clone();
            }
            Startup::Cancel {
                process_id,
                secret_key,
            } => {
                let timeout = ctx.config().server_connect_timeout;
                // Not one of this instance's clients: perhaps another fleet member's.
                if !ctx.clients.cancel(process_id, secret_key, timeout) {
                    ctx.fleet.forward_cancel(process_id, secret_key, timeout);
                }
                return Ok(None);
            }
            Startup::Startup { params } => {
                let mut login = login(params)?;
                login.tls = conn.is_tls();
                login.channel_binding = channel_binding;
                return Ok(Some(login));
            }
        }
    }
}

fn login(mut params: Vec<(String, String)>) -> Result<Login, Exit> {
    let take = |params: &mut Vec<(String, String)>, name: &str| {
        params
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| params.remove(i).1)
    };
    let user = take(&mut params, "user")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "no PostgreSQL user name specified in startup packet",
            )
            .with_side(Side::Client)
        })?;
    let database = take(&mut params, "database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if let Some(r) = params.iter().find(|(n, _)| n == "replication") {
        if r.1 != "false" && r.1 != "0" && r.1 != "off" && r.1 != "no" {
            return Err(PgError::fatal(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "replication connections are not supported through Sluice",
            )
            .with_side(Side::Client)
            .into());
        }
    }
    Ok(Login {
        user,
        database,
        params,
        tls: false,
        channel_binding: None,
    })
}

/// Runs the TLS handshake on the client's socket and goes on over TLS. A failed handshake
/// ends the connection without a word: there is no channel to say it on.
async fn upgrade(conn: &mut ClientConn, acceptor: &Acceptor) -> Result<(), Exit> {
    conn.start_tls(acceptor).await.map_err(|e| {
        if let ClientError::Tls(e) = &e {
            crate::metrics::tls_handshake_failed("client", e.reason());
            tracing::debug!(error = ?e, "client TLS handshake failed");
        }
        Exit::Quiet
    })
}

/// How a client's authentication ended, when it did not end the connection.
pub enum Verdict {
    /// Authenticated: the last authentication messages (SCRAM's final message,
    /// AuthenticationOk), not yet sent, for the caller to send in one write with what follows;
    /// for a passthrough user, the SCRAM keys its server logins use.
    Ok(BytesMut, Option<Arc<ServerPassword>>),
    /// A passthrough user's cleartext password, which only the server can verify.
    Unverified(String),
}

/// Authenticates `login.user`. Unknown users go through the same exchange as known ones and
/// fail the same way, so the answer does not reveal which users exist. A user that is not
/// configured, logging in to a database with `auth = "passthrough"`, runs SCRAM against the
/// keys kept from an earlier login, or else is asked for its password in cleartext.
pub async fn authenticate(
    ctx: &Context,
    conn: &mut ClientConn,
    login: &Login,
) -> Result<Verdict, Exit> {
    let config = ctx.config();
    let credentials = ctx.credentials.read().clone();
    let creds = credentials.get(&login.user);
    let passthrough = creds.is_none()
        && login.database != ADMIN_DATABASE
        && config.auth_for(&login.database) == AuthMode::Passthrough;
    let kept = match passthrough {
        true => ctx.passthrough.kept(&login.user),
        false => None,
    };
    if passthrough && kept.is_none() {
        return cleartext(&config, conn, login).await;
    }
    // auth_query: the secret the server gives for a user not configured (or none: a mock).
    let fetched = match creds.is_none()
        && login.database != ADMIN_DATABASE
        && config.auth_for(&login.database) == AuthMode::AuthQuery
    {
        true => fetch(ctx, &config, login).await?,
        false => None,
    };
    let from_query = fetched.is_some();
    let auth = match (
        &kept,
        creds.is_none() && config.auth_for(&login.database) == AuthMode::AuthQuery,
    ) {
        (Some(_), _) => "passthrough",
        (None, true) => "auth_query",
        (None, false) => "users",
    };
    let creds = creds.or(fetched.as_ref());
    let md5 = creds.and_then(|c| c.md5());
    let scram = creds.and_then(|c| c.scram());
    let use_md5 = match config.client_auth {
        ClientAuth::Md5 => (md5.is_some() || creds.is_none()) && kept.is_none(),
        ClientAuth::ScramSha256 => scram.is_none() && md5.is_some(),
    };
    let mut out = BytesMut::with_capacity(1024);
    let mut method = if use_md5 { "md5" } else { "scram-sha-256" };
    let mut client_key = None;
    let exchange = if use_md5 {
        md5_exchange(conn, md5).await
    } else {
        let mock;
        let verifier = match (scram, &kept) {
            (Some(v), _) => v,
            (None, Some(kept)) => &kept.verifier,
            (None, None) => {
                mock = ScramVerifier::mock(&login.user, &ctx.mock_secret);
                &mock
            }
        };
        scram_exchange(
            conn,
            verifier,
            login.channel_binding.as_deref(),
            &mut out,
            &mut method,
        )
        .await
        .map(|key| {
            client_key = key.map(|k| ScramKeys::recovered(verifier, k));
            client_key.is_some()
        })
    };
    let ok = match exchange {
        Ok(ok) => ok,
        Err(e) => {
            crate::metrics::client_login(auth, method, "error");
            return Err(e);
        }
    };
    crate::metrics::client_login(auth, method, if ok { "ok" } else { "refused" });
    if !ok {
        return Err(password_failed(login));
    }
    Out::auth_ok(&mut out);
    if from_query {
        // Server logins as the user: the keys its proof revealed (kept like passthrough's, so
        // warm and later connections have them too), or its md5 hash.
        let password = match (client_key, md5) {
            (Some(keys), _) => ctx
                .passthrough
                .keep(&login.user, Arc::new(keys), config.passthrough_ttl)
                .password
                .clone(),
            (None, Some(hash)) => Arc::new(ServerPassword::md5_hash_only(hash.clone())),
            (None, None) => return Err(password_failed(login)),
        };
        return Ok(Verdict::Ok(out, Some(password)));
    }
    Ok(Verdict::Ok(out, kept.map(|k| k.password.clone())))
}

/// The secret `auth_query` gives for `login.user`; a failure to fetch it ends the login.
async fn fetch(
    ctx: &Context,
    config: &Config,
    login: &Login,
) -> Result<Option<crate::auth::Credentials>, Exit> {
    let user = config.resolved_auth_user().unwrap_or_default();
    let tls = ctx.tls();
    let fetching = ctx.auth_query.credentials(
        config,
        &tls.connector,
        ctx.server_password(user),
        &login.user,
    );
    Box::pin(fetching).await.map_err(|e| {
        crate::metrics::client_login("auth_query", "scram-sha-256", "error");
        tracing::warn!(error = %e, user = %login.user, "auth_query failed");
        PgError::fatal(
            sqlstate::CONNECTION_FAILURE,
            format!("Sluice could not look up the user's password with auth_query: {e}"),
        )
        .with_side(Side::Server)
        .into()
    })
}

/// Asks a passthrough user for its password in cleartext: only over TLS, from loopback, or
/// with `allow_cleartext_without_tls`.
async fn cleartext(config: &Config, conn: &mut ClientConn, login: &Login) -> Result<Verdict, Exit> {
    let loopback = conn.peer_addr().is_ok_and(|a| a.ip().is_loopback());
    if !(login.tls || loopback || config.allow_cleartext_without_tls) {
        crate::metrics::client_login("passthrough", "password", "error");
        return Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            format!("user \"{}\" logs in with passthrough authentication, which takes a password only over TLS: connect with sslmode=verify-full (or require)", login.user),
        )
        .with_side(Side::Client)
        .into());
    }
    let mut out = BytesMut::new();
    Out::auth_cleartext(&mut out);
    conn.send(&out).await?;
    let body = read_password_message(conn).await?;
    let password =
        frontend::password(&body).map_err(|e| PgError::protocol_violation(e.to_string()))?;
    // Not UTF-8: no PostgreSQL password either (SCRAM's SASLprep takes text); it fails below.
    Ok(Verdict::Unverified(
        String::from_utf8(password.to_vec()).unwrap_or_default(),
    ))
}

/// The answer to a failed password: PostgreSQL's, the same for unknown users.
pub fn password_failed(login: &Login) -> Exit {
    crate::metrics::global().auth_failures.increment(1);
    tracing::info!(user = %login.user, "client authentication failed");
    PgError::fatal(
        sqlstate::INVALID_PASSWORD,
        format!("password authentication failed for user \"{}\"", login.user),
    )
    .with_side(Side::Client)
    .into()
}

/// Reads one password-family message ('p') whole.
async fn read_password_message(conn: &mut ClientConn) -> Result<BytesMut, Exit> {
    let msg = conn.read_message(MAX_AUTH_MESSAGE).await?;
    if msg.tag != tag::PASSWORD {
        return Err(PgError::protocol_violation(format!(
            "expected password response, got message type '{}'",
            char::from(msg.tag)
        ))
        .into());
    }
    Ok(msg.body)
}

/// The error a failed authentication step ends the connection with: the client's fault, but
/// for an unusable secret of Sluice's own (SQLSTATE XX000).
fn auth_error(e: AuthError) -> PgError {
    let code = e.sqlstate();
    let side = if code == sqlstate::INTERNAL_ERROR {
        Side::Sluice
    } else {
        Side::Client
    };
    PgError::fatal(code, e.to_string()).with_side(side)
}

/// SCRAM-SHA-256, and SCRAM-SHA-256-PLUS bound to `binding` (the certificate the client was
/// served) when given; on success the server's final message is left in `last` for the caller,
/// and the ClientKey the proof revealed is returned (`None`: a wrong password).
/// `method` becomes the mechanism's name in lower case once the client has chosen it.
async fn scram_exchange(
    conn: &mut ClientConn,
    verifier: &ScramVerifier,
    binding: Option<&[u8]>,
    last: &mut BytesMut,
    method: &mut &'static str,
) -> Result<Option<crate::auth::Key>, Exit> {
    let mut out = BytesMut::new();
    // PostgreSQL's order: -PLUS first when the connection can bind.
    let mechanisms: &[&str] = match binding {
        Some(_) => &[SCRAM_PLUS, SCRAM],
        None => &[SCRAM],
    };
    Out::auth_sasl(&mut out, mechanisms);
    conn.send(&out).await?;
    let body = read_password_message(conn).await?;
    let (mechanism, first) = frontend::sasl_initial_response(&body)
        .map_err(|e| PgError::protocol_violation(e.to_string()))?;
    if !mechanisms.contains(&mechanism) {
        return Err(PgError::protocol_violation(
            "client selected an invalid SASL authentication mechanism",
        )
        .into());
    }
    if mechanism == SCRAM_PLUS {
        *method = "scram-sha-256-plus";
    }
    let channel = match mechanism {
        SCRAM_PLUS => Channel::Bound(binding.unwrap_or_default()),
        _ if binding.is_some() => Channel::Offered,
        _ => Channel::Unavailable,
    };
    let (server, server_first) =
        ScramServer::start(verifier, first, &ScramServer::random_nonce(), channel)
            .map_err(auth_error)?;
    out.clear();
    Out::auth_sasl_continue(&mut out, &server_first);
    conn.send(&out).await?;
    let body = read_password_message(conn).await?;
    match server.finish_with_key(&body) {
        Ok((server_final, client_key)) => {
            Out::auth_sasl_final(last, &server_final);
            Ok(Some(client_key))
        }
        Err(AuthError::BadPassword) => Ok(None),
        Err(e) => Err(auth_error(e).into()),
    }
}

async fn md5_exchange(conn: &mut ClientConn, hash: Option<&Md5Hash>) -> Result<bool, Exit> {
    let salt: [u8; 4] = rand::random();
    let mut out = BytesMut::new();
    Out::auth_md5(&mut out, salt);
    conn.send(&out).await?;
    let body = read_password_message(conn).await?;
    let response =
        frontend::password(&body).map_err(|e| PgError::protocol_violation(e.to_string()))?;
    Ok(hash.is_some_and(|h| h.verify(salt, response)))
}

/// Refuses a connection before a session starts (client limit, shutdown): reads its startup
/// packet like PostgreSQL does, so the client is listening, then sends the FATAL error.
pub async fn refuse(stream: tokio::net::TcpStream, error: PgError) {
    let mut conn = ClientConn::new(Stream::Plain(stream));
    let read = async {
        loop {
            match conn.read_startup(false).await {
                Ok(Opening::Packet(Startup::SslRequest | Startup::GssEncRequest)) => {
                    conn.send(b"N").await?;
                }
                Ok(_) | Err(ClientError::Protocol(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    };
    if let Ok(Ok(())) = tokio::time::timeout(std::time::Duration::from_secs(2), read).await {
        let mut out = BytesMut::new();
        error.encode(&mut out);
        let _ = conn.send(&out).await;
    }
}
