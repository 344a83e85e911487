//! Sluice's own control connections: a small `deadpool-postgres` pool, logged in as a role of
//! Sluice's (`auth_user`, else `control_user`) on `control_database` (else the first database),
//! that runs `auth_query` ([`crate::auth_query`]).
//!
//! Its connections are opened the way every server connection is ([`server::open_stream`]:
//! `server_tls`, keepalive, `server_connect_timeout`) and log in with the role's credential in
//! force (a password, or an RDS IAM token signed for the login), and they are not part of any
//! pool clients borrow from. They count in the budget: [`POOL_SIZE`] is taken off
//! `max_server_connections` while a database uses `auth_query` ([`reserved`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::NoTls;

use crate::config::{AuthMode, Config};
use crate::server::{self, ServerPassword, Target};

/// Control connections at most.
pub const POOL_SIZE: u32 = 1;

/// Server connections the budget leaves to the control pool under `cfg`.
pub fn reserved(cfg: &Config) -> u32 {
    if cfg.any_auth(AuthMode::AuthQuery) {
        POOL_SIZE
    } else {
        0
    }
}

/// Why a control query failed. The texts name the server and the role, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no control connection to {server} as \"{user}\": {detail}")]
    Connect {
        server: String,
        user: String,
        detail: String,
    },
    #[error("the control query failed: {0}")]
    Query(String),
}

/// The pool, with what it was built for (a RELOAD that changes it builds another).
pub struct ControlPool {
    pool: Pool,
    server: String,
    user: String,
    /// The configuration values it was built from.
    built_for: (String, u16, String, String),
    /// The credential it logs in with (RELOAD replaces it).
    password: Option<Arc<ServerPassword>>,
}

impl ControlPool {
    /// A pool for `cfg`'s control role, logging in with `password`; connects on first use.
    pub fn new(
        cfg: &Config,
        tls: &Arc<crate::tls::Connector>,
        password: Option<Arc<ServerPassword>>,
    ) -> Option<ControlPool> {
        let user = cfg.resolved_auth_user()?.to_string();
        let database = cfg
            .control_database
            .clone()
            .or_else(|| cfg.databases.keys().next().cloned())?;
        let target = Target::new(cfg, tls, password.clone(), &database, &user);
        let mut pg = tokio_postgres::Config::new();
        pg.user(&user)
            .dbname(&target.database)
            .application_name("sluice")
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .channel_binding(tokio_postgres::config::ChannelBinding::Disable);
        let server = format!("{}:{}", target.host, target.port);
        let timeout = target.connect_timeout;
        let manager = Manager::from_connect(
            pg,
            Connect { target },
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE as usize)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .ok()?;
        Some(ControlPool {
            pool,
            server,
            user,
            built_for: Self::key(cfg, &database),
            password,
        })
    }

    fn key(cfg: &Config, database: &str) -> (String, u16, String, String) {
        (
            cfg.server_host.clone(),
            cfg.server_port,
            cfg.resolved_auth_user().unwrap_or_default().to_string(),
            database.to_string(),
        )
    }

    /// Whether this pool serves `cfg` with `password` as they are (else a new one is built).
    pub fn fits(&self, cfg: &Config, password: &Option<Arc<ServerPassword>>) -> bool {
        let same_password = match (&self.password, password) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        let database = cfg
            .control_database
            .clone()
            .or_else(|| cfg.databases.keys().next().cloned())
            .unwrap_or_default();
        same_password && self.built_for == Self::key(cfg, &database)
    }

    /// The first row of `sql` with `$1` = `arg`, its columns as text (`None` for NULL); `None`
    /// for no row.
    pub async fn query_row(
        &self,
        sql: &str,
        arg: &str,
    ) -> Result<Option<Vec<Option<String>>>, ControlError> {
        let client = self.pool.get().await.map_err(|e| ControlError::Connect {
            server: self.server.clone(),
            user: self.user.clone(),
            detail: e.to_string(),
        })?;
        let row = client
            .query_opt(sql, &[&arg])
            .await
            .map_err(|e| ControlError::Query(describe(&e)))?;
        let Some(row) = row else {
            return Ok(None);
        };
        (0..row.len())
            .map(|i| row.try_get::<_, Option<String>>(i))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
            .map_err(|e| ControlError::Query(describe(&e)))
    }
}

/// A connection of its own, opened like the control pool's but never pooled or recycled:
/// the fleet's coordination session, whose advisory locks live exactly as long as it does.
/// Also returns the connection's local address (where this host reaches the server from).
pub async fn connect_dedicated(
    target: Target,
    pg: &tokio_postgres::Config,
) -> Result<LoggedIn, tokio_postgres::Error> {
    login(&target, pg.clone()).await
}

/// A logged-in control connection: its client, the task that drives it, its local address.
pub type LoggedIn = (
    tokio_postgres::Client,
    tokio::task::JoinHandle<()>,
    SocketAddr,
);

/// Opens a connection to `t`'s server as server connections are opened and lets
/// tokio-postgres log in over it.
async fn login(
    t: &Target,
    mut pg: tokio_postgres::Config,
) -> Result<LoggedIn, tokio_postgres::Error> {
    if let Some(source) = &t.password {
        match source.for_login(&t.host, t.port, &t.user).await {
            Ok(password) => {
                pg.password(password);
            }
            Err(e) => return Err(io_error(io::Error::other(e.to_string())).await),
        }
    }
    let stream = match server::open_stream(t).await {
        Ok(stream) => stream,
        Err(e) => return Err(io_error(io::Error::other(e.to_string())).await),
    };
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(e) => return Err(io_error(e).await),
    };
    let (client, connection) = pg.connect_raw(stream, NoTls).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "control connection ended");
        }
    });
    Ok((client, task, local))
}

/// A tokio-postgres error with the server's message, when it sent one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Opens control connections as server connections are opened, then lets tokio-postgres log
/// in over them.
struct Connect {
    target: Target,
}

impl deadpool_postgres::Connect for Connect {
    fn connect(
        &self,
        pg: &tokio_postgres::Config,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let pg = pg.clone();
        Box::pin(async move {
            let (client, task, _) = login(&self.target, pg).await?;
            Ok((client, task))
        })
    }
}

/// `e` as a tokio-postgres error (it has no public constructor): the error of a login over a
/// stream that fails every read and write with `e`.
async fn io_error(e: io::Error) -> tokio_postgres::Error {
    let (kind, text) = (e.kind(), e.to_string());
    loop {
        let failing = Failing(kind, text.clone());
        // Never Ok: the first write fails.
        if let Err(e) = tokio_postgres::Config::new()
            .user("sluice")
            .connect_raw(failing, NoTls)
            .await
        {
            return e;
        }
    }
}

struct Failing(io::ErrorKind, String);

impl AsyncRead for Failing {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::Error::new(self.0, self.1.clone())))
    }
}

impl AsyncWrite for Failing {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        _: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::new(self.0, self.1.clone())))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::Error::new(self.0, self.1.clone())))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
