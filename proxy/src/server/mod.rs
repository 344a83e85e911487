//! Server connections: connecting and authenticating to PostgreSQL, and the little Sluice says
//! on them itself (reset statements, cancel requests, Terminate).
//!
//! A connection starts with an SSLRequest unless `server_tls = disable`, and is encrypted as
//! [`crate::tls::Connector`] says. Authentication answers whatever the server asks for:
//! SCRAM-SHA-256 (with postgres-protocol's client; SCRAM-SHA-256-PLUS, bound to the server's
//! certificate, over TLS), md5, trust, or a cleartext password, which is sent only over a
//! connection verified with `server_tls = verify-full`. A login refused with `28P01` or `28000`
//! is tried once more when the password's file has changed since ([`password`]). See
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>.

mod backends;
mod error;
pub mod password;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use postgres_protocol::authentication::sasl::{SCRAM_SHA_256, SCRAM_SHA_256_PLUS};
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::{Binding, ScramClient, ScramKeys};
use crate::config::ServerTls;
use crate::error::PgError;
use crate::prepared::ServerStatements;
use crate::protocol::backend::{self, ErrorFields, Out, TxStatus};
use crate::protocol::next_frame;
use crate::stream::Stream;
use crate::tls::Connector;
pub use backends::GONE_WAIT;
use backends::{Backend, Backends};

pub use error::{client_error, ServerError};
pub use password::{rds_iam_tokens, ServerPassword};

/// The SCRAM keys of `password` for the server's `salt` and `iterations`: those `t`'s password
/// keeps from an earlier login with the same salt, else derived (PBKDF2, on the blocking pool)
/// and kept for the next login.
async fn scram_keys(
    t: &Target,
    password: &str,
    salt: Vec<u8>,
    iterations: u32,
) -> Result<Arc<ScramKeys>, ServerError> {
    if let Some(keys) = t
        .password
        .as_ref()
        .and_then(|p| p.scram_keys(password, &salt, iterations))
    {
        return Ok(keys);
    }
    if t.password.as_ref().is_some_and(|p| p.is_keys_only()) {
        return Err(ServerError::Auth(format!(
            "the server's SCRAM salt for \"{}\" is not the one Sluice keeps keys for: the role's password was set again, and its next login gives Sluice the new one",
            t.user
        )));
    }
    let owned = password.to_string();
    let keys = tokio::task::spawn_blocking(move || ScramKeys::derive(&owned, &salt, iterations))
        .await
        .map_err(|e| ServerError::Auth(e.to_string()))?;
    let keys = Arc::new(keys);
    if let Some(p) = &t.password {
        p.keep_scram_keys(password, keys.clone());
    }
    Ok(keys)
}

/// Largest message accepted from a server during Sluice's own exchanges (startup, resets).
const MAX_CONTROL_MESSAGE: usize = 1 << 20;
/// Initial read buffer of a server connection; it grows for large messages and is reused.
pub const READ_BUFFER: usize = 16 * 1024;

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The password to log in with; `None` when none is configured.
    pub password: Option<Arc<ServerPassword>>,
    pub database: String,
    pub connect_timeout: Duration,
    /// Keepalive and `TCP_USER_TIMEOUT` of its sockets.
    pub keepalive: crate::stream::Keepalive,
    /// Whether a read-only server is refused.
    pub read_write: bool,
    pub max_prepared_statements: usize,
    /// How the connection is encrypted.
    pub tls: Arc<Connector>,
}

impl Target {
    /// Where the pool for (`database`, `user`) connects, as configured, logging in with
    /// `password` (the one in force, which RELOAD and refused logins may have renewed since
    /// `cfg` was loaded).
    pub fn new(
        cfg: &crate::config::Config,
        tls: &Arc<Connector>,
        password: Option<Arc<ServerPassword>>,
        database: &str,
        user: &str,
    ) -> Target {
        Target {
            host: cfg.server_host.clone(),
            port: cfg.server_port,
            user: user.to_string(),
            password,
            database: cfg.server_dbname(database).to_string(),
            connect_timeout: cfg.server_connect_timeout,
            keepalive: cfg.server_keepalive(),
            read_write: cfg.target_session_attrs == crate::config::TargetSessionAttrs::ReadWrite,
            max_prepared_statements: cfg.max_prepared_statements as usize,
            tls: tls.clone(),
        }
    }
}

/// What a server connection is doing, for SHOW SERVERS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    Idle = 0,
    Active = 1,
}

/// A server connection's entry in the [`ServerRegistry`].
pub struct ServerInfo {
    pub id: u64,
    pub database: String,
    pub user: String,
    pub addr: SocketAddr,
    pub process_id: i32,
    pub connected_at: std::time::SystemTime,
    /// Whether the connection is encrypted, and whether its login was bound to the server's
    /// certificate (SCRAM-SHA-256-PLUS).
    pub tls: bool,
    pub channel_binding: bool,
    state: std::sync::atomic::AtomicU8,
}

impl ServerInfo {
    pub fn set_state(&self, s: ServerState) {
        self.state
            .store(s as u8, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn state(&self) -> ServerState {
        match self.state.load(std::sync::atomic::Ordering::Relaxed) {
            1 => ServerState::Active,
            _ => ServerState::Idle,
        }
    }
}

/// The last id given out, and the entries by id.
type Registered = (u64, HashMap<u64, Arc<ServerInfo>>);

/// Every open server connection, for the admin console. Touched when connections open and close.
#[derive(Default, Clone)]
pub struct ServerRegistry {
    inner: Arc<Mutex<Registered>>,
    backends: Arc<Backends>,
}

impl ServerRegistry {
    /// The count of server connections that exist (see [`crate::pool::Pools::count_backends`]),
    /// and `on_gone`, called each time one has gone.
    pub fn count_backends(&self, on_gone: Box<dyn Fn() + Send + Sync>) -> Arc<AtomicU32> {
        let _ = self.backends.on_gone.set(on_gone);
        self.backends.count.clone()
    }

    /// Server connections that exist now, closing ones included.
    pub fn backends(&self) -> u32 {
        self.backends.count.load(Ordering::Acquire)
    }

    fn add(&self, info: ServerInfo) -> Arc<ServerInfo> {
        let mut g = self.inner.lock();
        g.0 += 1;
        let info = Arc::new(ServerInfo { id: g.0, ..info });
        g.1.insert(info.id, info.clone());
        info
    }

    /// Open connections: (with TLS, without), counted in place (no snapshot).
    pub fn tls_counts(&self) -> (usize, usize) {
        let g = self.inner.lock();
        let tls = g.1.values().filter(|i| i.tls).count();
        (tls, g.1.len() - tls)
    }

    pub fn snapshot(&self) -> Vec<Arc<ServerInfo>> {
        let mut v: Vec<_> = self.inner.lock().1.values().cloned().collect();
        v.sort_by_key(|i| i.id);
        v
    }
}

/// One authenticated server connection.
pub struct ServerConn {
    /// Statements Sluice prepared on this connection for clients in transaction pooling.
    pub prepared: ServerStatements,
    /// Settings Sluice applied with SET for the client it last served (name → value).
    pub settings: crate::settings::Settings,
    pub info: Arc<ServerInfo>,
    registry: ServerRegistry,
    pub stream: Stream,
    /// Bytes read from the server and not yet relayed; kept across checkouts so its capacity is
    /// reused.
    pub buf: BytesMut,
    pub params: Vec<(String, String)>,
    pub process_id: i32,
    pub secret_key: i32,
    pub addr: SocketAddr,
    /// The last ErrorResponse Sluice read itself (startup, resets).
    last_error: Option<PgError>,
    /// Its place among the server connections that exist, held until the server closed it.
    backend: Option<Backend>,
}

impl ServerConn {
    /// Connects and authenticates. `t.database` is the server-side name; the connection is
    /// registered under `pool_database` (the name clients use). When the server refuses the
    /// login and the password's file holds a different password by now, logs in once more
    /// with that one ([`ServerPassword::after_refused_login`]).
    pub async fn connect(
        t: &Target,
        pool_database: &str,
        registry: &ServerRegistry,
    ) -> Result<ServerConn, ServerError> {
        let Some(source) = &t.password else {
            return Self::connect_as(t, None, pool_database, registry).await;
        };
        let method = if source.is_rds_iam() {
            "rds_iam"
        } else {
            "password"
        };
        let result = Self::connect_with(t, source, pool_database, registry).await;
        match &result {
            Ok(_) => crate::metrics::server_login(method, "ok"),
            Err(ServerError::LoginRefused { .. }) => {
                crate::metrics::server_login(method, "refused")
            }
            Err(ServerError::Auth(_)) => crate::metrics::server_login(method, "error"),
            // Not a login's outcome: the connection failed first (sluice_server_connects_total).
            Err(_) => {}
        }
        result
    }

    /// [`ServerConn::connect`] with the credential `source`.
    async fn connect_with(
        t: &Target,
        source: &ServerPassword,
        pool_database: &str,
        registry: &ServerRegistry,
    ) -> Result<ServerConn, ServerError> {
        let addr = || format!("{}:{}", t.host, t.port);
        let password = tokio::time::timeout(
            t.connect_timeout,
            source.for_login(&t.host, t.port, &t.user),
        )
        .await
        .map_err(|_| ServerError::ConnectTimeout(addr()))??;
        match Self::connect_as(t, Some(&password), pool_database, registry).await {
            Err(e) if e.is_login_refused() => match source.after_refused_login(&password).await {
                Some(newer) => Self::connect_as(t, Some(&newer), pool_database, registry).await,
                None => Err(e),
            },
            other => other,
        }
    }

    /// One connection attempt, logging in with `password`, within `t.connect_timeout`.
    async fn connect_as(
        t: &Target,
        password: Option<&str>,
        pool_database: &str,
        registry: &ServerRegistry,
    ) -> Result<ServerConn, ServerError> {
        let addr = format!("{}:{}", t.host, t.port);
        let fut = async {
            let stream = open(t, &addr).await?;
            let backend = Backend::new(&registry.backends);
            let peer = stream.peer_addr()?;
            let info = ServerInfo {
                id: 0,
                database: pool_database.to_string(),
                user: t.user.clone(),
                addr: peer,
                process_id: 0,
                connected_at: std::time::SystemTime::now(),
                tls: stream.is_tls(),
                channel_binding: false,
                state: std::sync::atomic::AtomicU8::new(ServerState::Idle as u8),
            };
            let mut conn = ServerConn {
                info: Arc::new(info),
                registry: registry.clone(),
                prepared: ServerStatements::with_capacity(t.max_prepared_statements),
                settings: Default::default(),
                stream,
                buf: BytesMut::with_capacity(READ_BUFFER),
                params: Vec::new(),
                process_id: 0,
                secret_key: 0,
                addr: peer,
                last_error: None,
                backend: Some(backend),
            };
            let channel_binding = conn.startup(t, password).await?;
            conn.info = registry.add(ServerInfo {
                id: 0,
                database: conn.info.database.clone(),
                user: conn.info.user.clone(),
                addr: peer,
                process_id: conn.process_id,
                connected_at: conn.info.connected_at,
                tls: conn.info.tls,
                channel_binding,
                state: std::sync::atomic::AtomicU8::new(ServerState::Idle as u8),
            });
            Ok(conn)
        };
        tokio::time::timeout(t.connect_timeout, fut)
            .await
            .map_err(|_| ServerError::ConnectTimeout(addr.clone()))?
    }

    /// Logs in; returns whether the login was bound to the TLS channel.
    async fn startup(&mut self, t: &Target, password: Option<&str>) -> Result<bool, ServerError> {
        let mut out = BytesMut::new();
        let params = [
            ("user", t.user.as_str()),
            ("database", t.database.as_str()),
            ("application_name", "sluice"),
        ];
        frontend::startup_message(params.iter().copied(), &mut out)?;
        self.stream.send(&out).await?;
        let mut scram: Option<ScramClient> = None;
        let mut bound = false;
        let keys_only = t.password.as_ref().is_some_and(|p| p.is_keys_only());
        let password = || {
            password.filter(|_| !keys_only).ok_or_else(|| {
                ServerError::Auth(match keys_only {
                    true => format!("the server asked for a password for \"{}\", and Sluice keeps only the SCRAM keys of passthrough users (the role's password must be stored as scram-sha-256)", t.user),
                    false => "server asked for a password and none is configured (set server_password or server_password_file)".into(),
                })
            })
        };
        loop {
            out.clear();
            match self.read_message().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    if !(self.stream.is_tls() && t.tls.verifies_host()) {
                        tracing::warn!(
                            server = %format!("{}:{}", t.host, t.port),
                            user = %t.user,
                            "the server asked for a cleartext password; not sent: Sluice sends one only over TLS with server_tls = verify-full"
                        );
                        return Err(ServerError::Auth(
                            "the server asked for a cleartext password, which Sluice sends only over a verified connection (server_tls = verify-full)".into(),
                        ));
                    }
                    frontend::password_message(password()?.as_bytes(), &mut out)?;
                }
                Message::AuthenticationMd5Password(body) => {
                    if let Some(h) = t.password.as_ref().and_then(|p| p.md5_hash()) {
                        frontend::password_message(&h.response(body.salt()), &mut out)?;
                        self.stream.send(&out).await?;
                        continue;
                    }
                    let hash = postgres_protocol::authentication::md5_hash(
                        t.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut out)?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let (mut plain, mut plus) = (false, false);
                    while let Some(m) = fallible_next(&mut mechanisms)? {
                        plain |= m == SCRAM_SHA_256;
                        plus |= m == SCRAM_SHA_256_PLUS;
                    }
                    // Bind to the server's certificate when both sides can; a client that could
                    // but was not offered -PLUS says so ('y'), so a downgrade is detected.
                    let end_point = crate::tls::peer_end_point(&self.stream);
                    let (mechanism, binding) = match end_point {
                        Some(data) if plus => {
                            (SCRAM_SHA_256_PLUS, Binding::ServerEndPoint(data.to_vec()))
                        }
                        Some(_) if plain => (SCRAM_SHA_256, Binding::Unrequested),
                        None if plain => (SCRAM_SHA_256, Binding::Unsupported),
                        _ => {
                            return Err(ServerError::Auth(
                                "server offers no supported SASL mechanism".into(),
                            ))
                        }
                    };
                    if !keys_only {
                        password()?;
                    }
                    bound = mechanism == SCRAM_SHA_256_PLUS;
                    let (client, first) = ScramClient::start(binding);
                    frontend::sasl_initial_response(mechanism, &first, &mut out)?;
                    scram = Some(client);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let mut client = scram
                        .take()
                        .ok_or_else(|| ServerError::Protocol("unexpected SASLContinue".into()))?;
                    let (salt, iterations) = client
                        .server_first(body.data())
                        .map_err(|e| ServerError::Auth(e.to_string()))?;
                    let keys = match keys_only {
                        true => scram_keys(t, "", salt, iterations).await?,
                        false => scram_keys(t, password()?, salt, iterations).await?,
                    };
                    frontend::sasl_response(&client.client_final(&keys), &mut out)?;
                    scram = Some(client);
                }
                Message::AuthenticationSaslFinal(body) => {
                    let client = scram
                        .take()
                        .ok_or_else(|| ServerError::Protocol("unexpected SASLFinal".into()))?;
                    client
                        .finish(body.data())
                        .map_err(|e| ServerError::Auth(e.to_string()))?;
                }
                Message::ParameterStatus(body) => {
                    let name = body.name()?.to_string();
                    let value = body.value()?.to_string();
                    self.set_param(name, value);
                }
                Message::BackendKeyData(body) => {
                    self.process_id = body.process_id();
                    self.secret_key = body.secret_key();
                }
                Message::ReadyForQuery(_) => {
                    if t.read_write {
                        self.check_writable()?;
                    }
                    return Ok(bound);
                }
                Message::ErrorResponse(_) => {
                    return Err(match self.last_error() {
                        ServerError::Rejected(error) if error.code().class() == "28" => {
                            ServerError::LoginRefused {
                                addr: format!("{}:{}", t.host, t.port),
                                user: t.user.clone(),
                                error: Box::new(error),
                                rds_iam: t.password.as_ref().is_some_and(|p| p.is_rds_iam()),
                            }
                        }
                        other => other,
                    })
                }
                Message::NoticeResponse(_) => {}
                _ => {
                    return Err(ServerError::Protocol(
                        "unexpected message during startup".into(),
                    ))
                }
            }
            if !out.is_empty() {
                self.stream.send(&out).await?;
            }
        }
    }

    /// Refuses a server that does not accept writes, from what it reported at login (as libpq's
    /// `target_session_attrs = read-write` does with PostgreSQL 14 and later, which report
    /// both settings; older servers report neither and are taken as they are).
    fn check_writable(&self) -> Result<(), ServerError> {
        for setting in ["in_hot_standby", "default_transaction_read_only"] {
            if self.param(setting) == Some("on") {
                return Err(ServerError::ReadOnly {
                    addr: self.addr.to_string(),
                    setting,
                });
            }
        }
        Ok(())
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn set_param(&mut self, name: String, value: String) {
        match self.params.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.params.push((name, value)),
        }
    }

    /// The ErrorResponse just parsed by `read_message` (its bytes are still at the buffer's head).
    fn last_error(&mut self) -> ServerError {
        match self.last_error.take() {
            Some(e) => ServerError::Rejected(e),
            None => ServerError::Protocol("malformed ErrorResponse".into()),
        }
    }

    async fn read_message(&mut self) -> Result<Message, ServerError> {
        loop {
            if let Some((frame, _)) = next_frame(&self.buf, MAX_CONTROL_MESSAGE)
                .map_err(|e| ServerError::Protocol(e.to_string()))?
            {
                if frame.tag == backend::tag::ERROR_RESPONSE {
                    self.last_error = ErrorFields::parse(frame.body)
                        .ok()
                        .map(PgError::from_server);
                }
            }
            if let Some(msg) = Message::parse(&mut self.buf)? {
                return Ok(msg);
            }
            self.buf.reserve(READ_BUFFER);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ServerError::Closed);
            }
        }
    }

    /// Runs one statement of Sluice's own (ROLLBACK, DISCARD ALL) and waits for ReadyForQuery.
    /// Returns the transaction status after it; an ErrorResponse is returned as an error.
    pub async fn simple_query(&mut self, sql: &str) -> Result<TxStatus, ServerError> {
        let mut out = BytesMut::new();
        Out::query(&mut out, sql);
        self.stream.send(&out).await?;
        let mut error = None;
        loop {
            match self.read_message().await? {
                Message::ReadyForQuery(body) => {
                    let status = TxStatus::from_byte(body.status())
                        .map_err(|e| ServerError::Protocol(e.to_string()))?;
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(status),
                    };
                }
                Message::ErrorResponse(_) => error = Some(self.last_error()),
                Message::ParameterStatus(body) => {
                    let (name, value) = (body.name()?.to_string(), body.value()?.to_string());
                    self.set_param(name, value);
                }
                _ => {}
            }
        }
    }

    /// Runs a one-row query of Sluice's own and returns its columns as text (NULL as empty).
    pub async fn read_row(&mut self, sql: &str) -> Result<Vec<String>, ServerError> {
        let mut out = BytesMut::new();
        Out::query(&mut out, sql);
        self.stream.send(&out).await?;
        let mut row = None;
        let mut error = None;
        loop {
            match self.read_message().await? {
                Message::DataRow(body) => {
                    let mut values = Vec::new();
                    let buf = body.buffer();
                    let mut ranges = body.ranges();
                    while let Some(r) = fallible_next(&mut ranges)? {
                        values.push(
                            r.and_then(|r| buf.get(r))
                                .map(|b| String::from_utf8_lossy(b).into_owned())
                                .unwrap_or_default(),
                        );
                    }
                    row = Some(values);
                }
                Message::ErrorResponse(_) => error = Some(self.last_error()),
                Message::ReadyForQuery(_) => {
                    return match (error, row) {
                        (Some(e), _) => Err(e),
                        (None, Some(r)) => Ok(r),
                        (None, None) => Err(ServerError::Protocol("no row".into())),
                    }
                }
                _ => {}
            }
        }
    }

    /// Whether an idle connection can be used: nothing buffered, nothing arrived and not closed.
    /// A connection the server closed (restart, idle timeout, admin kill) is caught here, before
    /// any byte of a client's request is sent to it.
    pub fn is_reusable(&mut self) -> bool {
        self.buf.is_empty() && !self.stream.has_unexpected_input()
    }

    /// The server's cancel key.
    pub fn cancel_key(&self) -> CancelKey {
        CancelKey {
            addr: self.addr,
            process_id: self.process_id,
            secret_key: self.secret_key,
        }
    }
}

/// What is needed to cancel the query running on a server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelKey {
    pub addr: SocketAddr,
    pub process_id: i32,
    pub secret_key: i32,
}

impl CancelKey {
    /// Sends a CancelRequest on a new connection, as the protocol requires.
    pub async fn send(self, timeout: Duration) -> Result<(), ServerError> {
        let fut = async {
            let mut s = TcpStream::connect(self.addr).await?;
            let mut out = BytesMut::new();
            frontend::cancel_request(self.process_id, self.secret_key, &mut out);
            s.write_all(&out).await?;
            // The server closes the connection once it has the request.
            let mut sink = [0u8; 16];
            let _ = s.read(&mut sink).await;
            Ok::<_, ServerError>(())
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ServerError::ConnectTimeout(self.addr.to_string()))?
    }
}

impl Drop for ServerConn {
    /// Says Terminate so the server ends the backend at once instead of logging an unexpected
    /// EOF; best effort, never blocks.
    ///
    /// The connection keeps its place among those that exist until the server has closed its
    /// end (read on a task of its own, at most [`GONE_WAIT`]): until then its backend may still
    /// be running, and the budget counts it.
    fn drop(&mut self) {
        const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];
        self.stream.try_goodbye(&TERMINATE);
        if self.info.id != 0 {
            self.registry.inner.lock().1.remove(&self.info.id);
        }
        let backend = self.backend.take();
        let stream = std::mem::replace(&mut self.stream, Stream::Upgrading);
        if let (Some(tcp), Ok(rt)) = (stream.into_tcp(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let mut tcp = tcp;
                let mut sink = [0u8; 512];
                let _ = tokio::time::timeout(GONE_WAIT, async {
                    while let Ok(n) = tcp.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
                drop(tcp);
                drop(backend);
            });
        }
    }
}

fn fallible_next<I: fallible_iterator::FallibleIterator<Error = io::Error>>(
    it: &mut I,
) -> Result<Option<I::Item>, ServerError> {
    it.next().map_err(ServerError::Io)
}

/// Opens the socket to the server and negotiates TLS as `t.tls` says.
/// A connection to `t`'s server, TCP and TLS as configured, not logged in (Sluice's control
/// connections log in over it with tokio-postgres), within `t.connect_timeout`.
pub async fn open_stream(t: &Target) -> Result<Stream, ServerError> {
    let addr = format!("{}:{}", t.host, t.port);
    tokio::time::timeout(t.connect_timeout, open(t, &addr))
        .await
        .map_err(|_| ServerError::ConnectTimeout(addr.clone()))?
}

async fn open(t: &Target, addr: &str) -> Result<Stream, ServerError> {
    let tcp = tcp_connect(t, addr).await?;
    let mode = t.tls.mode;
    if mode == ServerTls::Disable {
        return Ok(Stream::Plain(tcp));
    }
    match request_tls(tcp).await? {
        (tcp, true) => match t.tls.connect(&t.host, tcp).await {
            Ok(stream) => Ok(stream),
            Err(error) => {
                crate::metrics::tls_handshake_failed("server", error.reason());
                if mode == ServerTls::Prefer {
                    // libpq's `prefer`: when TLS fails, try once more without it.
                    tracing::warn!(server = %addr, error = %error.describe(&t.host), "TLS to the server failed; connecting without TLS (server_tls = prefer)");
                    return Ok(Stream::Plain(tcp_connect(t, addr).await?));
                }
                tracing::warn!(server = %addr, error = %error.describe(&t.host), "TLS to the server failed");
                Err(ServerError::Tls {
                    addr: addr.to_string(),
                    host: t.host.clone(),
                    error,
                })
            }
        },
        (tcp, false) if mode == ServerTls::Prefer => Ok(Stream::Plain(tcp)),
        (_, false) => {
            crate::metrics::tls_handshake_failed("server", "unsupported");
            tracing::warn!(server = %addr, server_tls = mode.as_str(), "the server does not support TLS");
            Err(ServerError::TlsUnsupported {
                addr: addr.to_string(),
                mode: mode.as_str(),
            })
        }
    }
}

async fn tcp_connect(t: &Target, addr: &str) -> Result<TcpStream, ServerError> {
    let tcp = TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|source| ServerError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    tcp.set_nodelay(true)?;
    // A server that goes silent (a cut link, a failover that drops packets) is noticed within
    // seconds rather than the kernel's minutes, idle in the pool or mid-query.
    t.keepalive.apply(&tcp)?;
    Ok(tcp)
}

/// Sends an SSLRequest; returns the socket and whether the server agreed. Reads exactly the
/// one answer byte, so nothing a machine in the middle appends before the handshake is taken
/// as the server's (CVE-2021-23222).
async fn request_tls(mut tcp: TcpStream) -> Result<(TcpStream, bool), ServerError> {
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    tcp.write_all(&out).await?;
    let mut answer = [0u8; 1];
    match tcp.read(&mut answer).await? {
        0 => Err(ServerError::Closed),
        _ => match answer[0] {
            b'S' => Ok((tcp, true)),
            b'N' => Ok((tcp, false)),
            other => Err(ServerError::Protocol(format!(
                "unexpected answer to SSLRequest: {:?}",
                char::from(other)
            ))),
        },
    }
}

/// Whether the server answers, and (when `server_tls` insists on TLS) completes a TLS
/// handshake whose certificate passes the configured checks. PostgreSQL answers the SSLRequest
/// before any authentication, so the probe uses no session or budget slot.
pub async fn probe(tls: &Connector, host: &str, port: u16, timeout: Duration) -> bool {
    let fut = async {
        let tcp = TcpStream::connect((host, port)).await.ok()?;
        let (tcp, accepted) = request_tls(tcp).await.ok()?;
        if matches!(tls.mode, ServerTls::Disable | ServerTls::Prefer) {
            return Some(());
        }
        if !accepted {
            return None;
        }
        let mut stream = tls.connect(host, tcp).await.ok()?;
        stream.try_goodbye(&[]);
        Some(())
    };
    matches!(tokio::time::timeout(timeout, fut).await, Ok(Some(())))
}
