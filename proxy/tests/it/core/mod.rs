//! Core behaviour through Sluice in front of a real PostgreSQL: simple and extended queries,
//! errors and pipelines, COPY, large results and requests, cancel, authentication failures,
//! raw protocol corner cases, psql and pgbench, concurrency within the budget, dirty
//! disconnects, session pooling and server death; one submodule a topic.
//!
//! Each test starts its own PostgreSQL and Sluice, so tests run in parallel. Every network wait
//! is bounded ([`within`]) so a hang fails the test instead of blocking CI.

mod budget;
mod copy;
mod faults;
mod protocol;
mod queries;
mod tools;

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{future, SinkExt, TryStreamExt};
use postgres_protocol::message::frontend;
use sluice::config::{Config, PoolMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::pg::{PgOptions, PgServer};
use crate::proxy::{connect, connect_with_task, start_sluice, url, ConnTask};
use crate::support::raw::{copy_data, error_code, fields, row_text, rows, tags, Raw};
use crate::support::{describe, direct, start_pg_with_user, within, within_for};

const USER: &str = "core_app";
const PASSWORD: &str = "core-app-pw";
const DB: &str = "core_db";

/// A PostgreSQL with a test user owning a test database, and Sluice in front of it.
struct Env {
    sluice: sluice::Handle,
    pg: PgServer,
}

async fn env(budget: u32, pool_size: u32, tweak: impl FnOnce(&mut Config)) -> Env {
    let opts = PgOptions {
        max_connections: 30,
        ..Default::default()
    };
    let pg = start_pg_with_user(opts, USER, PASSWORD, DB).await;
    let sluice = start_sluice(&pg, USER, PASSWORD, DB, budget, pool_size, tweak).await;
    Env { sluice, pg }
}

impl Env {
    fn addr(&self) -> SocketAddr {
        self.sluice.local_addr
    }

    /// A tokio-postgres client through Sluice.
    async fn client(&self) -> Client {
        within(
            "connect through Sluice",
            connect(&self.sluice, USER, PASSWORD, DB),
        )
        .await
        .expect("connect through Sluice")
    }

    /// A tokio-postgres client straight to PostgreSQL, as the test user.
    async fn direct(&self) -> Client {
        direct(&self.pg.url(USER, PASSWORD, DB)).await
    }

    /// A superuser client straight to PostgreSQL (not counted as the test user).
    async fn superuser(&self) -> Client {
        direct(&self.pg.superuser_url()).await
    }

    /// Runs `sql` straight on PostgreSQL as the test user (so it owns what it creates).
    async fn setup(&self, sql: &str) {
        let c = self.direct().await;
        within(sql, c.batch_execute(sql))
            .await
            .unwrap_or_else(|e| panic!("setup {sql:?}: {e}"));
    }

    /// Number of server backends of the test user, seen by PostgreSQL.
    async fn backends(&self, su: &Client) -> i64 {
        let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{USER}'");
        scalar(su, &sql).await.parse().expect("count")
    }
}

/// The SQLSTATE of an error, or a description of why it has none.
fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| format!("(no SQLSTATE: {e})"))
}

/// First column of the first row of a simple query, as text ("NULL" for NULL).
async fn scalar(c: &Client, sql: &str) -> String {
    let msgs = within(sql, c.simple_query(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_owned()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

fn copy_rows(range: std::ops::Range<i64>) -> String {
    let mut s = String::new();
    for i in range {
        s.push_str(&format!("{i}\trow number {i}\n"));
    }
    s
}
