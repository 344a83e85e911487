//! One client session: start-up and authentication, then requests relayed to pooled servers.
//!
//! In transaction pooling a request is buffered whole (a simple Query, or extended-protocol
//! messages up to Sync or Flush) before a server connection is borrowed, so no server waits on a
//! slow client; the server goes back to the pool at the ReadyForQuery that ends the transaction.
//! A request refused for capacity is answered with a non-fatal ErrorResponse (SQLSTATE 53300)
//! and ReadyForQuery, so the client keeps its connection and may retry on it.

mod checkout;
mod ending;
mod passthrough;
mod settings;
mod startup;
mod wait;

pub use crate::settings::Settings;
pub use startup::refuse;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;

use ending::cleanup;
use startup::Login;
use wait::{discard_until_sync, next_request, wait_idle, Request};

use crate::client_conn::{ClientConn, Exit};
use crate::clients::{self, ClientState};
use crate::config::{Config, GroupBy, PoolMode};
use crate::console;
use crate::context::{group_limits, Context, ServerParams, ADMIN_DATABASE};
use crate::error::{sqlstate, PgError, Severity, Side};
use crate::pool::{Lease, PoolId};
use crate::protocol::backend::{Out, TxStatus};
use crate::protocol::frontend::tag;
use crate::relay::{self, End, Flow};
use crate::server::{self, ServerConn, ServerState};
use crate::sql as state;
use crate::stream::Stream;

/// A request buffered past this many bytes without its end gets a server anyway and streams.
const REQUEST_BUFFER_LIMIT: usize = 1 << 20;
/// Time allowed to roll back the transaction of a client that disconnected mid-transaction.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How a client is told that its server connection was lost while relaying.
fn lost_server(flow: &Flow) -> Exit {
    if flow.server_fatal {
        // The server said why it ended the session (57P01 on a shutdown or
        // pg_terminate_backend, say), and the client has that: one FATAL is what it expects.
        return Exit::Quiet;
    }
    if flow.commit_in_flight {
        return PgError::fatal(
            sqlstate::TRANSACTION_RESOLUTION_UNKNOWN,
            "server connection lost while a statement that may commit was in flight: whether its transaction committed is unknown",
        )
        .with_side(Side::Server)
        .with_hint("Check whether the transaction's effects are there before retrying it.")
        .into();
    }
    let what = if flow.status() == TxStatus::Idle {
        "server connection lost"
    } else {
        "server connection lost; the current transaction was rolled back"
    };
    PgError::fatal(sqlstate::CONNECTION_FAILURE, what)
        .with_side(Side::Server)
        .into()
}

/// How a client is told that its server answered neither within `query_timeout` nor after
/// Sluice's cancel, and was closed.
fn timed_out_server(flow: &Flow) -> Exit {
    if flow.commit_in_flight {
        return PgError::fatal(
            sqlstate::TRANSACTION_RESOLUTION_UNKNOWN,
            "the server did not answer within query_timeout, nor after a cancel, while a statement that may commit was in flight: whether its transaction committed is unknown",
        )
        .with_side(Side::Server)
        .with_hint("Check whether the transaction's effects are there before retrying it.")
        .into();
    }
    PgError::fatal(
        sqlstate::QUERY_CANCELED,
        "terminating connection: the server did not answer within query_timeout, nor after a cancel; the current transaction was rolled back",
    )
    .with_side(Side::Server)
    .into()
}

/// Serves one client connection to the end. Never panics on client or server input.
///
/// Every connected client keeps this future for as long as it is connected, so it holds only
/// the connection and what waiting for the next request needs: start-up, each request and the
/// goodbye run in boxed futures of their own.
///
/// `guard` is dropped when the session has ended, however it ends.
pub fn serve<G: Send + 'static>(
    ctx: Arc<Context>,
    stream: TcpStream,
    guard: G,
) -> impl std::future::Future<Output = ()> {
    let _ = stream.set_nodelay(true);
    if let Err(e) = ctx.config().client_keepalive().apply(&stream) {
        tracing::debug!(error = %e, "cannot set TCP keepalive on a client socket");
    }
    let mut conn = ClientConn::new(Stream::Plain(stream));
    async move {
        let _counted = &guard;
        // Start-up, in a boxed future: it runs once. Each part tells the client the error
        // that ends its session itself, so that no error is kept here.
        let (mut session, registration) = match Box::pin(start_session(&ctx, &mut conn)).await {
            Started::Session(session, registration) => (session, registration),
            Started::Done(_) => return,
        };
        // Serving the greeted client until it leaves: wait for a request, borrow a server,
        // relay, give it back. Only the wait is in the future every connected client keeps
        // (a few words); the rest is boxed, its state kept only while a request is served.
        session.begin(&mut conn);
        let exit = loop {
            if conn.buffered() == 0 {
                if let Err(exit) = wait_idle(&mut conn, &registration.slot).await {
                    break exit;
                }
            }
            if let Some(exit) = Box::pin(session.request(&mut conn, &registration.slot)).await {
                break exit;
            }
        };
        Box::pin(session.end(&mut conn, exit)).await;
    }
}

/// Start-up; an error that ends it is told to the client.
async fn start_session<'a>(ctx: &'a Arc<Context>, conn: &mut ClientConn) -> Started<'a> {
    let started = start(ctx, conn).await;
    if let Started::Done(Exit::Fatal(e)) = started {
        say_goodbye(conn, e).await;
        return Started::Done(Exit::Quiet);
    }
    started
}

/// Tells the client the error that ends its session.
async fn say_goodbye(conn: &mut ClientConn, e: PgError) {
    tracing::debug!(
        kind = e.kind(),
        side = e.side().as_str(),
        code = %e.code(),
        error = %e,
        "session ends with an error"
    );
    let mut out = BytesMut::new();
    e.encode(&mut out);
    let _ = conn.send(&out).await;
}

/// How start-up ended.
enum Started<'a> {
    /// A client session, greeted and registered.
    Session(Session<'a>, clients::Registration<'a>),
    /// Refused, gone, or an admin console session that has ended.
    Done(Exit),
}

/// Start-up: the startup packet, authentication, then the admin console or a greeted session.
async fn start<'a>(ctx: &'a Arc<Context>, conn: &mut ClientConn) -> Started<'a> {
    let config = ctx.config();
    let login_timeout = config.client_login_timeout;
    let (login, authenticated, kept) = match tokio::time::timeout(login_timeout, async {
        if config.proxy_protocol {
            // Behind a load balancer: the client's own address, for logs, limits and SHOW CLIENTS.
            let client = conn.read_proxy_header().await?;
            tracing::trace!(client = ?client, "PROXY protocol header");
        }
        let Some(login) = startup::read_startup(ctx, conn).await? else {
            return Ok(None);
        };
        let g = crate::metrics::global();
        if login.tls { &g.clients_tls } else { &g.clients_plain }.increment(1);
        if config.client_tls_mode() == crate::config::ClientTls::Require && !login.tls {
            crate::metrics::client_rejected("tls_required");
            return Err(PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "Sluice requires TLS (client_tls = require): connect with sslmode=require or stronger",
            )
            .with_side(Side::Client)
            .into());
        }
        let verdict = startup::authenticate(ctx, conn, &login).await?;
        let known = login.database == ADMIN_DATABASE || config.databases.contains_key(&login.database);
        let (authenticated, kept) = match verdict {
            startup::Verdict::Ok(out, kept) => (out, kept),
            // Only a configured database's server can judge the password.
            startup::Verdict::Unverified(_) if !known => return Err(startup::password_failed(&login)),
            startup::Verdict::Unverified(password) => {
                let addr = conn.peer_addr().ok().map(|a| a.ip());
                let verifying = passthrough::verify(ctx, &config, &login, addr, password);
                let kept = Box::pin(verifying).await?;
                let mut out = BytesMut::new();
                Out::auth_ok(&mut out);
                (out, Some(kept))
            }
        };
        // After authentication, as PostgreSQL does, so that only a client that may log in
        // learns which databases exist.
        if !known {
            let _ = conn.send(&authenticated).await;
            return Err(PgError::fatal(
                sqlstate::INVALID_CATALOG_NAME,
                format!("database \"{}\" does not exist", login.database),
            )
            .with_side(Side::Client)
            .into());
        }
        Ok(Some((login, authenticated, kept)))
    })
    .await
    {
        Ok(Ok(Some(done))) => done,
        Ok(Ok(None)) => return Started::Done(Exit::Quiet),
        Ok(Err(exit)) => return Started::Done(exit),
        Err(_) => {
            return Started::Done(
                PgError::protocol_violation("timeout expired before authentication completed")
                    .into(),
            )
        }
    };
    tracing::debug!(user = %login.user, database = %login.database, "client connected");
    if login.database == ADMIN_DATABASE {
        let exit = if config.admin_users.contains(&login.user) {
            console::serve(ctx, conn, &login.user, authenticated).await
        } else {
            let _ = conn.send(&authenticated).await;
            PgError::fatal(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!(
                    "permission denied: \"{}\" is not an admin user (admin_users)",
                    login.user
                ),
            )
            .with_side(Side::Client)
            .into()
        };
        return Started::Done(exit);
    }
    let peer = conn.peer_addr().ok();
    let mut session = Session::new(ctx, config, &login);
    session.kept = kept;
    let registration = ctx.clients.register(clients::ClientIdentity {
        user: session.user.clone(),
        database: session.database.clone(),
        application_name: (ctx.interned.strings)
            .intern(login.param("application_name").unwrap_or("").to_string()),
        addr: peer,
        tls: login.tls,
        idle_timeout: session.config.client_idle_timeout,
    });
    match session
        .greet(conn, &login, &registration, authenticated)
        .await
    {
        Ok(()) => Started::Session(session, registration),
        Err(exit) => Started::Done(exit),
    }
}

struct Session<'a> {
    ctx: &'a Context,
    statements: crate::prepared::ClientStatements,
    /// The client's settings: those it asked for at startup, as changed since (by a SET
    /// inside a transaction block, or a reset), applied on every server it gets.
    settings: state::Settings,
    /// The client's `client_encoding`, as last reported to it.
    encoding: state::Encoding,
    /// The client's reported parameters as it was last told them (see `Flow::reported`).
    reported: crate::relay::Reported,
    /// The settings the client asked for at startup: what `RESET ALL` and the like bring back.
    startup: state::Settings,
    pinned: Option<state::Pin>,
    config: Arc<Config>,
    /// Shared with the client registry's slot and the other sessions of the database.
    database: Arc<String>,
    pool: PoolId,
    group: crate::pool::GroupId,
    mode: PoolMode,
    /// The user the client logged in as (server connections log in as it too).
    user: Arc<String>,
    /// A passthrough user's SCRAM keys as of its login: server logins use them when Sluice
    /// no longer keeps any for the user (expired, or refused since).
    kept: Option<Arc<server::ServerPassword>>,
}

/// What the session loop does after a request.
enum Step {
    Next,
    /// A Flush-ended batch was refused: drop the client's messages up to its Sync.
    DiscardUntilSync,
    Exit(Exit),
}

impl<'a> Session<'a> {
    fn new(ctx: &'a Context, config: Arc<Config>, login: &Login) -> Self {
        let cfg = &config;
        let db = login.database.as_str();
        let pool = ctx.pools.pool(
            db,
            &login.user,
            cfg.pool_size_for(db),
            cfg.min_pool_size_for(db),
        );
        let group_name = match cfg.group_by {
            GroupBy::User => login.user.as_str(),
            GroupBy::Database => db,
            GroupBy::ApplicationName => login.param("application_name").unwrap_or(""),
        };
        let limits = group_limits(cfg, group_name);
        let group = ctx.pools.group(group_name, limits);
        let mode = cfg.pool_mode_for(db);
        Session {
            ctx,
            statements: Default::default(),
            settings: Default::default(),
            encoding: Default::default(),
            reported: Default::default(),
            startup: Default::default(),
            pinned: None,
            database: ctx.interned.strings.intern(login.database.clone()),
            config,
            pool,
            group,
            mode,
            user: ctx.interned.strings.intern(login.user.clone()),
            kept: None,
        }
    }

    /// Start-up after authentication: the client's settings checked, its ParameterStatus
    /// messages, BackendKeyData and the first ReadyForQuery sent.
    ///
    /// `out` holds the end of authentication, not yet sent: it goes out in the same write, or
    /// before the error that ends start-up.
    async fn greet(
        &mut self,
        conn: &mut ClientConn,
        login: &Login,
        registration: &clients::Registration<'_>,
        mut out: BytesMut,
    ) -> Result<(), Exit> {
        let ready = self.prepare_greeting(login).await;
        let (params, reported) = match ready {
            Ok(r) => r,
            Err(exit) => {
                let _ = conn.send(&out).await;
                return Err(exit);
            }
        };
        for (name, value) in params.iter() {
            // The client sees its own settings, as the server would report them to it.
            let own = reported
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str());
            let value = own.unwrap_or(value);
            if name.eq_ignore_ascii_case("client_encoding") {
                self.encoding = state::Encoding::from_name(value);
            }
            Out::parameter_status(&mut out, name, value);
            self.reported.tell(name.as_bytes(), value.as_bytes());
        }
        // A function's clients are told the same and log in with the same settings: one copy.
        self.reported.intern(&self.ctx.interned.reported);
        self.settings.intern(&self.ctx.interned.settings);
        self.startup.intern(&self.ctx.interned.settings);
        Out::backend_key_data(&mut out, registration.process_id, registration.secret_key);
        Out::ready_for_query(&mut out, TxStatus::Idle);
        Ok(conn.send(&out).await?)
    }

    /// The client's settings checked; the server's parameters and the client's settings as the
    /// server reports them.
    async fn prepare_greeting(
        &mut self,
        login: &Login,
    ) -> Result<(ServerParams, Vec<(String, String)>), Exit> {
        self.settings = state::startup_settings(&login.params)
            .map_err(|e| PgError::protocol_violation(e.to_string()))?;
        if let Some(bad) = self.settings.keys().find(|n| !state::valid_name(n)) {
            return Err(PgError::fatal(
                sqlstate::INVALID_NAME,
                format!("invalid startup parameter name \"{bad}\""),
            )
            .with_side(Side::Client)
            .into());
        }
        self.startup.clone_from(&self.settings);
        // Errors here end start-up: they are FATAL whatever the server called them.
        let fatal_error = |e: PgError| Exit::Fatal(e.with_severity(Severity::Fatal));
        let params = self.server_params().await.map_err(fatal_error)?;
        let reported = self.validate_settings().await.map_err(fatal_error)?;
        Ok((params, reported))
    }

    /// Applies the client's startup settings on a server once per distinct (name, value), so a
    /// value the server refuses is refused at startup with the server's error. Returns the
    /// client's settings as the server reports them (its canonical spelling).
    async fn validate_settings(&self) -> Result<Vec<(String, String)>, PgError> {
        let unknown: state::Settings = {
            let known = self.ctx.validated_settings.lock();
            self.settings
                .iter()
                .filter(|(n, v)| !known.contains_key(&((*n).clone(), (*v).clone())))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect()
        };
        if !unknown.is_empty() {
            let mut lease = self.checkout().await?;
            let Some(server) = lease.conn() else {
                return Err(PgError::fatal(
                    sqlstate::INTERNAL_ERROR,
                    "lease without connection",
                ));
            };
            for (name, value) in unknown.iter() {
                let sql = state::settings_sql(
                    &[(name.clone(), value.clone())].into(),
                    &Default::default(),
                );
                let applied =
                    tokio::time::timeout(ROLLBACK_TIMEOUT, server.simple_query(&sql)).await;
                let applied = applied.unwrap_or_else(|_| {
                    Err(server::ServerError::ConnectTimeout(
                        "applying startup parameters".into(),
                    ))
                });
                match applied {
                    Ok(TxStatus::Idle) => {
                        let shown = server
                            .params
                            .iter()
                            .find(|(n, _)| n.eq_ignore_ascii_case(name))
                            .map(|(_, v)| v.clone());
                        self.ctx
                            .validated_settings
                            .lock()
                            .insert((name.clone(), value.clone()), shown);
                    }
                    Ok(_) => {
                        return Err(PgError::fatal(
                            sqlstate::INTERNAL_ERROR,
                            "unexpected transaction state",
                        ))
                    }
                    Err(server::ServerError::Rejected(e)) => {
                        // Leave the server as it was before handing it back.
                        let _ = server.simple_query(&format!("RESET {name}")).await;
                        return Err(e);
                    }
                    Err(e) => return Err(server::client_error(&e)),
                }
            }
            // The server now holds these values: record them so the next checkout resets or
            // keeps them as needed.
            for (name, value) in unknown.iter() {
                server.settings.insert(name.clone(), value.clone());
            }
            lease.release();
        }
        let known = self.ctx.validated_settings.lock();
        Ok(self
            .settings
            .iter()
            .filter_map(|(n, v)| {
                known
                    .get(&(n.clone(), v.clone()))
                    .cloned()
                    .flatten()
                    .map(|shown| (n.clone(), shown))
            })
            .collect())
    }

    /// The greeted client starts being served (see [`serve`]'s loop).
    fn begin(&self, conn: &mut ClientConn) {
        conn.set_stall_timeout(self.config.client_stall_timeout);
        crate::metrics::global().clients_idle.increment(1.0);
    }

    /// The session ends: the error that ends it, if any, is told to the client.
    async fn end(&mut self, conn: &mut ClientConn, exit: Exit) {
        tracing::debug!("client disconnected");
        crate::metrics::global().clients_idle.decrement(1.0);
        if let Some(p) = self.pinned {
            crate::metrics::session_unpinned(p.as_str());
        }
        if let Exit::Fatal(e) = exit {
            say_goodbye(conn, e).await;
        }
    }

    /// Reads a request the client has started and serves it; `Some` when the session ends.
    async fn request(&mut self, conn: &mut ClientConn, slot: &clients::ClientSlot) -> Option<Exit> {
        let max_message = self.config.max_message_bytes as usize;
        let request = match next_request(conn, max_message, REQUEST_BUFFER_LIMIT).await {
            Ok(Request::Terminate) => return Some(Exit::Quiet),
            Ok(Request::Streamed) => None,
            Ok(Request::Complete { end, last }) => Some((end, last)),
            Err(exit) => return Some(exit),
        };
        // 2 and 3.
        match self.transaction(conn, slot, request).await {
            Step::Next => None,
            Step::DiscardUntilSync => {
                // After a refused Flush the client's batch runs on to a Sync; drop it, answer
                // that Sync.
                if let Err(exit) = discard_until_sync(conn, max_message).await {
                    return Some(exit);
                }
                let mut out = BytesMut::new();
                Out::ready_for_query(&mut out, TxStatus::Idle);
                conn.send(&out).await.err().map(|_| Exit::Quiet)
            }
            Step::Exit(exit) => Some(exit),
        }
    }

    /// Serves one request: borrows a server connection, relays until the transaction (or
    /// session) ends, gives the connection back.
    async fn transaction(
        &mut self,
        conn: &mut ClientConn,
        slot: &clients::ClientSlot,
        request: Option<(usize, u8)>,
    ) -> Step {
        let max_message = self.config.max_message_bytes as usize;
        let g = crate::metrics::global();
        // 2. A server connection.
        g.clients_idle.decrement(1.0);
        g.clients_waiting.increment(1.0);
        slot.set_state(ClientState::Waiting);
        let acquired = self.checkout().await;
        g.clients_waiting.decrement(1.0);
        slot.set_state(ClientState::Idle);
        let mut lease = match acquired {
            Ok(lease) => lease,
            Err(err) => {
                g.clients_idle.increment(1.0);
                let Some((end, last)) = request else {
                    // A huge request half-received cannot be answered mid-stream.
                    return Step::Exit(err.with_severity(Severity::Fatal).into());
                };
                conn.consume(end);
                let mut out = BytesMut::new();
                err.encode(&mut out);
                let discard = last == tag::FLUSH;
                if !discard {
                    Out::ready_for_query(&mut out, TxStatus::Idle);
                }
                if conn.send(&out).await.is_err() {
                    return Step::Exit(Exit::Quiet);
                }
                return if discard {
                    Step::DiscardUntilSync
                } else {
                    Step::Next
                };
            }
        };

        if self.mode == PoolMode::Session {
            // Session pooling relays once, for the whole session: the client's settings are
            // applied on its server first, as they would be by its startup packet.
            if let Err(err) = self.apply_settings(&mut lease).await {
                g.clients_idle.increment(1.0);
                crate::metrics::server_closed("error");
                lease.discard();
                return Step::Exit(err.with_severity(Severity::Fatal).into());
            }
        }

        // 3. Relay until the transaction (or session) ends.
        g.clients_active.increment(1.0);
        slot.set_state(ClientState::Active);
        let Some(server) = lease.conn() else {
            return Step::Exit(
                PgError::fatal(
                    sqlstate::INTERNAL_ERROR,
                    "internal error: lease without connection",
                )
                .into(),
            );
        };
        slot.set_server(Some(server.cancel_key()));
        server.info.set_state(ServerState::Active);
        let mut flow = Flow::new();
        flow.encoding = self.encoding;
        flow.reported = std::mem::take(&mut self.reported);
        flow.idle_transaction_timeout = self.config.idle_transaction_timeout;
        flow.client_stall_timeout = self.config.client_stall_timeout;
        flow.query_timeout = self.config.query_timeout;
        let pooling = self.mode == PoolMode::Transaction;
        flow.release = pooling && self.pinned.is_none();
        // Bring the server's settings to the client's, in the same write as its request.
        let prefix = pooling
            .then(|| state::settings_sql(&self.settings, &server.settings))
            .filter(|sql| !sql.is_empty())
            .map(|sql| {
                server.settings.clone_from(&self.settings);
                let mut q = BytesMut::new();
                Out::query(&mut q, &sql);
                q.freeze()
            });
        let statements = pooling.then_some(relay::Statements {
            client: &mut self.statements,
            hasher: &self.ctx.statement_hasher,
            reject_session_state: self.config.on_session_state
                == crate::config::OnSessionState::Reject,
        });
        let span = tracing::trace_span!(
            "relay",
            client = slot.addr.map(|a| a.port()).unwrap_or(0),
            server = server.process_id
        );
        let end = tracing::Instrument::instrument(
            relay::relay(
                conn,
                server,
                &mut flow,
                max_message,
                statements,
                prefix,
                &self.startup,
            ),
            span,
        )
        .await;
        tracing::trace!(released = matches!(end, End::Released), "relay ended");
        self.encoding = flow.encoding;
        self.reported = std::mem::take(&mut flow.reported);
        let mut changed = std::mem::take(&mut flow.settings_changed);
        self.after_resets(server, &mut flow, &mut changed);
        if !changed.is_empty() && matches!(end, End::Released) {
            // What a SET inside the transaction left behind is now this client's own setting:
            // read it back once, and carry it to whichever server the client gets next.
            self.adopt_settings(server, &changed).await;
        }
        if self.pinned.is_none() {
            self.pinned = flow.pinned();
        }
        slot.set_server(None);
        server.info.set_state(ServerState::Idle);
        slot.set_state(ClientState::Idle);
        g.clients_active.decrement(1.0);
        g.bytes_to_server.increment(flow.to_server);
        g.bytes_to_client.increment(flow.to_client);
        match end {
            End::Released => {
                lease.release();
                g.clients_idle.increment(1.0);
            }
            End::ClientGone => {
                g.clients_idle.increment(1.0);
                let reset = self.mode == PoolMode::Session || self.pinned.is_some();
                cleanup(lease, &flow, self.mode, reset).await;
                return Step::Exit(Exit::Quiet);
            }
            End::ClientProtocol(error) => {
                g.clients_idle.increment(1.0);
                lease.discard();
                return Step::Exit(error.into());
            }
            End::IdleInTransaction => {
                // Closing the server connection rolls the transaction back and frees its locks
                // at once, whatever state the server is in.
                let error = PgError::fatal(
                    sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                    "terminating connection due to idle-in-transaction timeout (idle_transaction_timeout)",
                )
                .with_side(Side::Client);
                return self.timed_out(lease, "idle_transaction_timeout", error.into());
            }
            End::ClientStalled => {
                // The server is mid-message or mid-COPY: only closing it ends the request, and
                // rolls back its transaction.
                let error = PgError::client_stalled(true);
                return self.timed_out(lease, "client_stall_timeout", error.into());
            }
            End::QueryTimeout => {
                return self.timed_out(lease, "query_timeout", timed_out_server(&flow));
            }
            End::ServerGone(fault) => {
                g.clients_idle.increment(1.0);
                tracing::warn!(error = %fault, "server connection lost while relaying");
                crate::metrics::server_closed("error");
                lease.discard();
                return Step::Exit(lost_server(&flow));
            }
        }
        Step::Next
    }

    /// Ends a session whose client or server kept the other waiting past `timeout` (a key of
    /// the configuration, also the metric's reason): the server connection is closed and the
    /// client told `error`.
    fn timed_out(&self, lease: Lease<Box<ServerConn>>, timeout: &'static str, error: Exit) -> Step {
        crate::metrics::global().clients_idle.increment(1.0);
        tracing::info!(
            timeout,
            "timed out: server connection closed, client disconnected"
        );
        crate::metrics::client_timed_out(timeout);
        crate::metrics::server_closed(timeout);
        lease.discard();
        Step::Exit(error)
    }
}
