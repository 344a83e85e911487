//! Helpers shared by the integration tests: bounded waits, error descriptions, direct
//! connections to PostgreSQL, test servers with a user owning a database, and (in [`raw`]) a raw
//! protocol client. Starting Sluice in-process is in `proxy.rs`, the PostgreSQL harness in
//! `pg.rs`.
#![allow(dead_code)]

pub mod blackhole;
pub mod hosts;
pub mod process;
pub mod raw;

use std::future::Future;
use std::process::Output;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::pg::{PgOptions, PgServer};

/// Upper bound for anything that should "happen": generous, never a latency assertion.
pub const WAIT: Duration = Duration::from_secs(60);

/// Awaits `f`, failing the test if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    within_for(WAIT, what, f).await
}

/// Awaits `f`, failing the test if it takes longer than `limit`.
pub async fn within_for<F: Future>(limit: Duration, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Awaits `f`, failing the test if it takes longer than `secs` seconds.
pub async fn within_secs<F: Future>(secs: u64, what: &str, f: F) -> F::Output {
    within_for(Duration::from_secs(secs), what, f).await
}

/// The error with its SQLSTATE, message, detail and hint, for assertion and failure messages.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!(
            "{} {}: {} (detail: {:?}, hint: {:?})",
            d.severity(),
            d.code().code(),
            d.message(),
            d.detail(),
            d.hint()
        ),
        None => format!("{e} ({e:?})"),
    }
}

/// Takes the only server connection of a Sluice that lets nobody queue (`max_waiting = 0`)
/// listening on `port`, and holds it: a client inside a transaction. Sluice's once-a-second
/// readiness login may have that connection for a moment, and with no queue a login or a
/// request then is refused (`53300`); so refusals are retried for up to 10 s.
pub async fn hold_the_only_connection(port: u16, user: &str, password: &str, db: &str) -> Client {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let e = match crate::proxy::connect_port(port, user, password, db).await {
            Ok(c) => {
                match within_secs(10, "BEGIN; SELECT 1", c.batch_execute("BEGIN; SELECT 1")).await {
                    Ok(()) => return c,
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        let refused = e.code() == Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS);
        assert!(
            refused && std::time::Instant::now() < deadline,
            "the holder takes the only server connection: {}",
            describe(&e)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A tokio-postgres client straight to PostgreSQL (not through Sluice); its connection task
/// runs in the background.
pub async fn direct(url: &str) -> Client {
    let (client, conn) = within("connect to PostgreSQL", tokio_postgres::connect(url, NoTls))
        .await
        .unwrap_or_else(|e| panic!("direct connection to {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// A test PostgreSQL started with `opts`, with `user` (password `password`) owning `db`.
/// The address of `pg` itself, for raw clients that go straight to it.
pub fn direct_addr(pg: &PgServer) -> std::net::SocketAddr {
    format!("{}:{}", pg.host(), pg.port())
        .parse()
        .expect("addr")
}

pub fn pg_with_user(opts: PgOptions, user: &str, password: &str, db: &str) -> PgServer {
    let pg = PgServer::start(opts);
    pg.create_user(user, password);
    pg.create_database(db, user);
    pg
}

/// Like [`pg_with_user`], off the runtime's threads.
pub async fn start_pg_with_user(opts: PgOptions, user: &str, password: &str, db: &str) -> PgServer {
    let (user, password, db) = (user.to_owned(), password.to_owned(), db.to_owned());
    tokio::task::spawn_blocking(move || pg_with_user(opts, &user, &password, &db))
        .await
        .expect("PostgreSQL starts")
}

/// Exit status, stdout and stderr of a finished program, for failure messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The "number of transactions actually processed" of a pgbench report.
pub fn pgbench_processed(stdout: &str) -> Option<u64> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
}
