//! Starting Sluice in-process in front of a harness PostgreSQL, and connecting to it.
#![allow(dead_code)]

use sluice::config::{Config, Overrides};
use tokio_postgres::{Client, NoTls};

use crate::pg::PgServer;

/// Starts Sluice for `user`/`password` on `db` with the given budget and pool size, on free
/// loopback ports (clients and admin), after `tweak` adjusts the configuration.
pub async fn start_sluice(
    pg: &PgServer,
    user: &str,
    password: &str,
    db: &str,
    budget: u32,
    pool_size: u32,
    tweak: impl FnOnce(&mut Config),
) -> sluice::Handle {
    let overrides = Overrides {
        upstream: Some(pg.url(user, password, db)),
        listen: Some("127.0.0.1:0".parse().expect("address")),
        admin_listen: Some("127.0.0.1:0".parse().expect("address")),
        max_server_connections: Some(budget),
        pool_size: Some(pool_size),
    };
    let mut cfg = Config::load(None, &overrides).expect("config");
    tweak(&mut cfg);
    sluice::start(cfg).await.expect("sluice starts")
}

/// A tokio-postgres client connected through Sluice; its connection task runs in the background.
pub async fn connect(
    handle: &sluice::Handle,
    user: &str,
    password: &str,
    db: &str,
) -> Result<Client, tokio_postgres::Error> {
    let port = handle.local_addr.port();
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user={user} password={password} dbname={db}"),
        NoTls,
    )
    .await?;
    tokio::spawn(conn);
    Ok(client)
}

/// The task running a client's connection: it ends with the error that ended the connection.
pub type ConnTask = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// Like [`connect`], also returning the connection task: aborting it drops the socket without a
/// Terminate message, the way a crashed or frozen client vanishes; awaiting it tells how the
/// connection ended.
pub async fn connect_with_task(
    handle: &sluice::Handle,
    user: &str,
    password: &str,
    db: &str,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let (client, conn) =
        tokio_postgres::connect(&conn_string(handle, user, password, db), NoTls).await?;
    Ok((client, tokio::spawn(conn)))
}

/// A libpq-style connection string for Sluice.
pub fn conn_string(handle: &sluice::Handle, user: &str, password: &str, db: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname={db}",
        handle.local_addr.port()
    )
}

/// A `postgres://` URL for Sluice, as psql and pgbench take it (password left out: give it in
/// `PGPASSWORD`).
pub fn url(handle: &sluice::Handle, user: &str, db: &str) -> String {
    format!(
        "postgres://{user}@127.0.0.1:{}/{db}",
        handle.local_addr.port()
    )
}
