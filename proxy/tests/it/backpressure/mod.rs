//! Backpressure end to end: the global budget under fan-out, the bounded queue, non-fatal
//! rejections a client can retry on the same connection (simple and extended protocol),
//! fairness between groups, per-group caps, the client connection cap, the connect limiter and
//! the warm pool. Every test runs its own PostgreSQL and Sluice; every network wait has a
//! timeout so a hang fails instead of blocking the run. One submodule a topic.

mod connections;
mod fairness;
mod fan_out;
mod queue;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::config::{ClientAuth, Config, GroupConfig, UserConfig};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::pg::{PgOptions, PgServer};
use crate::proxy::{connect, overrides, start_sluice};
use crate::support::{describe, direct, pg_with_user, within_secs};

const USER: &str = "bp";
const PASSWORD: &str = "bp-pw";
const DB: &str = "bpdb";
/// A second user (group), for fairness.
const OTHER: &str = "bpother";
const OTHER_PASSWORD: &str = "bpother-pw";

/// A fresh server with the test user owning the test database.
fn server() -> PgServer {
    let opts = PgOptions {
        max_connections: 30,
        ..Default::default()
    };
    pg_with_user(opts, USER, PASSWORD, DB)
}

/// A client through Sluice as the test user.
async fn through(h: &sluice::Handle) -> Client {
    through_as(h, USER, PASSWORD).await
}

async fn through_as(h: &sluice::Handle, user: &str, password: &str) -> Client {
    within_secs(30, "connect through Sluice", connect(h, user, password, DB))
        .await
        .unwrap_or_else(|e| panic!("connect through Sluice as {user}: {}", describe(&e)))
}

/// A client through Sluice listening on `port`, with its connection task spawned.
async fn connect_port(port: u16, user: &str) -> Result<Client, tokio_postgres::Error> {
    let password = if user == USER {
        PASSWORD
    } else {
        OTHER_PASSWORD
    };
    crate::proxy::connect_port(port, user, password, DB).await
}

/// Sluice's documented rejection of a request: ERROR 53300, "... not executed ...".
fn is_rejection(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        *d.code() == SqlState::TOO_MANY_CONNECTIONS && d.message().contains("not executed")
    })
}

/// The REASON in "Sluice is at capacity (REASON): ...".
fn rejection_reason(e: &tokio_postgres::Error) -> String {
    let msg = e.as_db_error().map(|d| d.message()).unwrap_or_default();
    msg.split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(r, _)| r.to_string())
        .unwrap_or_else(|| msg.to_string())
}

fn detail(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .and_then(|d| d.detail())
        .unwrap_or_default()
        .to_string()
}

/// Asserts `e` is a non-fatal Sluice rejection for `reason`, with DETAIL and a retry HINT.
fn assert_rejection(e: &tokio_postgres::Error, reason: &str) {
    let d = e
        .as_db_error()
        .unwrap_or_else(|| panic!("expected a 53300 rejection, got {}", describe(e)));
    assert_eq!(
        *d.code(),
        SqlState::TOO_MANY_CONNECTIONS,
        "code: {}",
        describe(e)
    );
    assert_eq!(d.severity(), "ERROR", "non-fatal: {}", describe(e));
    assert!(
        d.message().contains("not executed") && d.message().contains(reason),
        "message should name {reason} and say it was not executed: {}",
        describe(e)
    );
    let detail = d
        .detail()
        .unwrap_or_else(|| panic!("no DETAIL: {}", describe(e)));
    assert!(!detail.is_empty(), "empty DETAIL: {}", describe(e));
    let hint = d
        .hint()
        .unwrap_or_else(|| panic!("no HINT: {}", describe(e)));
    let ms: Option<u64> = hint
        .split_whitespace()
        .zip(hint.split_whitespace().skip(1))
        .find(|(_, unit)| unit.trim_end_matches(',').trim_end_matches('.') == "ms")
        .and_then(|(n, _)| n.parse().ok());
    assert!(
        ms.is_some_and(|ms| ms > 0),
        "HINT should give a retry delay in ms: {hint:?}"
    );
}

/// What a [`Sampler`] saw in `pg_stat_activity` for some users.
#[derive(Debug, Default, Clone)]
struct Seen {
    samples: u32,
    /// Largest number of backends of all the users together.
    max_total: i64,
    /// Per user: largest number of backends, and of active ones.
    max_by_user: BTreeMap<String, (i64, i64)>,
}

/// Samples `pg_stat_activity` every ~20 ms from a superuser connection until stopped. It runs
/// on a thread of its own, so a test's load cannot starve it of samples.
struct Sampler {
    stop: Arc<AtomicBool>,
    done: tokio::sync::oneshot::Receiver<Seen>,
}

impl Sampler {
    async fn start(pg: &PgServer, users: &[&str]) -> Sampler {
        let url = pg.superuser_url();
        let users: Vec<String> = users.iter().map(|u| u.to_string()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let (tx, done) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("sampler runtime");
            let seen = rt.block_on(async move {
                let client = direct(&url).await;
                let stmt = client
                    .prepare(
                        "SELECT usename::text, count(*), \
                         count(*) FILTER (WHERE state = 'active') \
                         FROM pg_stat_activity WHERE usename = ANY($1) GROUP BY usename",
                    )
                    .await
                    .expect("prepare sampler");
                let mut seen = Seen::default();
                let mut started_tx = Some(started_tx);
                loop {
                    let rows = within_secs(
                        20,
                        "pg_stat_activity sample",
                        client.query(&stmt, &[&users]),
                    )
                    .await
                    .expect("sample pg_stat_activity");
                    let mut total = 0;
                    for r in rows {
                        let (user, n, active): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
                        total += n;
                        let e = seen.max_by_user.entry(user).or_default();
                        e.0 = e.0.max(n);
                        e.1 = e.1.max(active);
                    }
                    seen.max_total = seen.max_total.max(total);
                    seen.samples += 1;
                    if let Some(tx) = started_tx.take() {
                        let _ = tx.send(());
                    }
                    if flag.load(Ordering::Relaxed) {
                        return seen;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            let _ = tx.send(seen);
        });
        within_secs(30, "first pg_stat_activity sample", started)
            .await
            .expect("sampler started");
        Sampler { stop, done }
    }

    async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        within_secs(30, "sampler to stop", self.done)
            .await
            .expect("sampler thread ended without a result")
    }
}

/// Sluice on a runtime (and threads) of its own: with hundreds of clients in the test's runtime,
/// an in-process Sluice sharing it would be starved by them, which a real deployment is not.
struct Isolated {
    handle: Option<sluice::Handle>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Isolated {
    /// Like [`start_sluice`], on a dedicated two-thread runtime.
    async fn start(
        pg: &PgServer,
        budget: u32,
        pool_size: u32,
        tweak: impl FnOnce(&mut Config),
    ) -> Isolated {
        let overrides = overrides(pg, USER, PASSWORD, DB, budget, pool_size);
        let mut cfg = Config::load(None, &overrides).expect("config");
        tweak(&mut cfg);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sluice-under-test")
            .enable_all()
            .build()
            .expect("runtime");
        let handle = within_secs(30, "Sluice to start", rt.spawn(sluice::start(cfg)))
            .await
            .expect("start task")
            .expect("sluice starts");
        Isolated {
            handle: Some(handle),
            rt: Some(rt),
        }
    }

    fn handle(&self) -> &sluice::Handle {
        self.handle.as_ref().expect("running")
    }

    async fn stop(mut self) {
        if let (Some(h), Some(rt)) = (self.handle.take(), self.rt.as_ref()) {
            within_secs(60, "Sluice to stop", rt.spawn(h.stop()))
                .await
                .expect("stop task");
        }
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Backends of `user` on the server right now: (all, idle).
async fn backends(admin: &Client, user: &str) -> (i64, i64) {
    let row = within_secs(
        20,
        "count backends",
        admin.query_one(
            "SELECT count(*), count(*) FILTER (WHERE state = 'idle') \
             FROM pg_stat_activity WHERE usename = $1",
            &[&user],
        ),
    )
    .await
    .expect("count backends");
    (row.get(0), row.get(1))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    assert!(!sorted.is_empty());
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Holds a server connection: a client inside an open transaction.
async fn holder(h: &sluice::Handle) -> Client {
    let c = through(h).await;
    within_secs(10, "BEGIN; SELECT 1", c.batch_execute("BEGIN; SELECT 1"))
        .await
        .expect("holder begins");
    c
}
