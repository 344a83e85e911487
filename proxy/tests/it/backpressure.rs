//! Backpressure end to end: the global budget under fan-out, the bounded queue, non-fatal
//! rejections a client can retry on the same connection (simple and extended protocol),
//! fairness between groups, per-group caps, the client connection cap, the connect limiter and
//! the warm pool. Every test runs its own PostgreSQL and Sluice; every network wait has a
//! timeout so a hang fails instead of blocking the run.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::config::{ClientAuth, Config, GroupConfig, Overrides, UserConfig};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls};

use crate::pg::{PgOptions, PgServer};
use crate::proxy::{connect, start_sluice};

const USER: &str = "bp";
const PASSWORD: &str = "bp-pw";
const DB: &str = "bpdb";
/// A second user (group), for fairness.
const OTHER: &str = "bpother";
const OTHER_PASSWORD: &str = "bpother-pw";

/// A fresh server with the test user owning the test database.
fn server() -> PgServer {
    let pg = PgServer::start(PgOptions {
        max_connections: 30,
        ..Default::default()
    });
    pg.create_user(USER, PASSWORD);
    pg.create_database(DB, USER);
    pg
}

/// Awaits `fut`, failing the test if it takes longer than `secs`.
async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs} s: {what}"),
    }
}

/// A direct connection to PostgreSQL (not through Sluice).
async fn direct(url: &str) -> Client {
    let (client, conn) = within(20, "direct connect", tokio_postgres::connect(url, NoTls))
        .await
        .unwrap_or_else(|e| panic!("direct connection to {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// A client through Sluice as the test user.
async fn through(h: &sluice::Handle) -> Client {
    through_as(h, USER, PASSWORD).await
}

async fn through_as(h: &sluice::Handle, user: &str, password: &str) -> Client {
    within(30, "connect through Sluice", connect(h, user, password, DB))
        .await
        .unwrap_or_else(|e| panic!("connect through Sluice as {user}: {}", describe(&e)))
}

/// The error with its SQLSTATE, message, detail and hint, for assertion messages.
fn describe(e: &tokio_postgres::Error) -> String {
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

/// A client through Sluice listening on `port`, with its connection task spawned.
async fn connect_port(port: u16, user: &str) -> Result<Client, tokio_postgres::Error> {
    let password = if user == USER {
        PASSWORD
    } else {
        OTHER_PASSWORD
    };
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user={user} password={password} dbname={DB}"),
        NoTls,
    )
    .await?;
    tokio::spawn(conn);
    Ok(client)
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
                    let rows = within(
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
        within(30, "first pg_stat_activity sample", started)
            .await
            .expect("sampler started");
        Sampler { stop, done }
    }

    async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        within(30, "sampler to stop", self.done)
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
        let overrides = Overrides {
            upstream: Some(pg.url(USER, PASSWORD, DB)),
            listen: Some("127.0.0.1:0".parse().expect("address")),
            admin_listen: Some("127.0.0.1:0".parse().expect("address")),
            max_server_connections: Some(budget),
            pool_size: Some(pool_size),
        };
        let mut cfg = Config::load(None, &overrides).expect("config");
        tweak(&mut cfg);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sluice-under-test")
            .enable_all()
            .build()
            .expect("runtime");
        let handle = within(30, "Sluice to start", rt.spawn(sluice::start(cfg)))
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
            within(60, "Sluice to stop", rt.spawn(h.stop()))
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
    let row = within(
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

// ---------------------------------------------------------------------------------------------

/// 7. `max_client_connections`: the client over the cap is refused at connect with FATAL 53300;
/// once a client leaves, a new one gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connection_cap() {
    let pg = server();
    let h = start_sluice(&pg, USER, PASSWORD, DB, 4, 4, |c| {
        c.max_client_connections = 5;
    })
    .await;
    let t = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(through(&h).await);
    }
    eprintln!("5 logins took {:?}", t.elapsed());
    let err = match within(30, "6th connect", connect(&h, USER, PASSWORD, DB)).await {
        Ok(_) => panic!("a 6th client connection was accepted over max_client_connections = 5"),
        Err(e) => e,
    };
    let d = err
        .as_db_error()
        .unwrap_or_else(|| panic!("6th connect: expected FATAL 53300, got {}", describe(&err)));
    assert_eq!(
        *d.code(),
        SqlState::TOO_MANY_CONNECTIONS,
        "{}",
        describe(&err)
    );
    assert_eq!(d.severity(), "FATAL", "{}", describe(&err));
    assert!(
        d.message().contains("max_client_connections"),
        "{}",
        describe(&err)
    );
    // The five are unaffected.
    for c in &clients {
        within(
            10,
            "query on an admitted client",
            c.simple_query("SELECT 1"),
        )
        .await
        .expect("admitted clients keep working");
    }
    // One leaves: its slot frees (asynchronously, when Sluice sees it go).
    drop(clients.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let replacement = loop {
        match within(30, "reconnect", connect(&h, USER, PASSWORD, DB)).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                assert!(
                    e.as_db_error()
                        .is_some_and(|d| d.message().contains("max_client_connections")),
                    "{}",
                    describe(&e)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!(
                "no client slot freed within 5 s of a client leaving: {}",
                describe(&e)
            ),
        }
    };
    within(
        10,
        "query on the replacement",
        replacement.simple_query("SELECT 1"),
    )
    .await
    .expect("replacement client works");
    clients.push(replacement);
    // And the cap still holds.
    let again = within(
        30,
        "connect over the cap again",
        connect(&h, USER, PASSWORD, DB),
    )
    .await;
    assert!(again.is_err(), "a 6th client got in after the replacement");
    drop(clients);
    h.stop().await;
}

/// How one fan-out client ended. Times are since the start of the fan-out.
enum Outcome {
    /// Its transaction committed; BEGIN was sent and answered at these times.
    Committed { sent: Duration, answered: Duration },
    /// Refused by Sluice (53300, nothing executed) at `phase`: its BEGIN (if it got that far)
    /// was sent at `sent`, the refusal came back at `at`.
    Rejected {
        phase: &'static str,
        sent: Option<Duration>,
        reason: String,
        detail: String,
        at: Duration,
    },
    /// Anything else: the test fails.
    Failed(String),
}

impl Outcome {
    fn rejected(
        phase: &'static str,
        sent: Option<Duration>,
        e: &tokio_postgres::Error,
        epoch: Instant,
    ) -> Outcome {
        Outcome::Rejected {
            phase,
            sent,
            reason: rejection_reason(e),
            detail: detail(e),
            at: epoch.elapsed(),
        }
    }
}

/// Connects one fan-out client.
async fn fan_out_connect(port: u16, epoch: Instant) -> Result<Client, Outcome> {
    match tokio::time::timeout(Duration::from_secs(120), connect_port(port, USER)).await {
        Err(_) => Err(Outcome::Failed("connect timed out".into())),
        Ok(Err(e)) if is_rejection(&e) => Err(Outcome::rejected("connect", None, &e, epoch)),
        Ok(Err(e)) => Err(Outcome::Failed(format!("connect: {}", describe(&e)))),
        Ok(Ok(c)) => Ok(c),
    }
}

/// One short "function invocation" on `client`: BEGIN; INSERT id; (hold); COMMIT.
async fn fan_out_transaction(client: &Client, id: i32, hold: Duration, epoch: Instant) -> Outcome {
    let step = |sql: String| async move {
        tokio::time::timeout(Duration::from_secs(60), client.batch_execute(&sql))
            .await
            .map_err(|_| format!("{sql}: timed out"))
    };
    let sent = epoch.elapsed();
    match step("BEGIN".into()).await {
        Err(e) => return Outcome::Failed(e),
        Ok(Err(e)) if is_rejection(&e) => return Outcome::rejected("begin", Some(sent), &e, epoch),
        Ok(Err(e)) => return Outcome::Failed(format!("BEGIN: {}", describe(&e))),
        Ok(Ok(())) => {}
    }
    let answered = epoch.elapsed();
    // Inside the transaction the client holds its server: nothing can be refused any more.
    let mut rest = vec![format!("INSERT INTO t VALUES ({id})")];
    if !hold.is_zero() {
        rest.push(format!("SELECT pg_sleep({})", hold.as_secs_f64()));
    }
    rest.push("COMMIT".into());
    for sql in rest {
        match step(sql.clone()).await {
            Err(e) => return Outcome::Failed(e),
            Ok(Err(e)) => return Outcome::Failed(format!("{sql}: {}", describe(&e))),
            Ok(Ok(())) => {}
        }
    }
    Outcome::Committed { sent, answered }
}

/// How a fan-out is run.
#[derive(Debug, Clone, Copy)]
struct FanOut {
    clients: i32,
    /// How long each transaction holds its server (pg_sleep inside it).
    hold: Duration,
    wait_timeout: Duration,
    /// Log every client in first, then start all the transactions at once; else each client
    /// connects and runs its transaction straight away (cold function containers).
    connect_first: bool,
    /// Open the whole budget of server connections (and let the queue empty) before the burst.
    warm: bool,
    /// Sluice's `max_connecting`, when not the default.
    max_connecting: Option<u32>,
}

impl FanOut {
    fn new(hold: Duration, wait_timeout: Duration) -> FanOut {
        FanOut {
            clients: 1000,
            hold,
            wait_timeout,
            connect_first: false,
            warm: false,
            max_connecting: None,
        }
    }
}

/// What a fan-out did.
#[derive(Debug, Default)]
struct FanOutReport {
    committed: u32,
    /// By "phase: reason".
    rejected: BTreeMap<String, u32>,
    /// One DETAIL per reason.
    details: BTreeMap<String, String>,
    /// (BEGIN sent, BEGIN answered) of the committed clients, since the start.
    served: Vec<(Duration, Duration)>,
    /// (BEGIN sent, refusal received) of the requests refused for `predicted_timeout`.
    predicted_timeout_at: Vec<(Duration, Duration)>,
    elapsed: Duration,
}

impl FanOutReport {
    fn rejected(&self) -> u32 {
        self.rejected.values().sum()
    }

    /// `predicted_timeout` refusals proved wrong by what happened next, as (refused request
    /// sent, refused, later request sent, later request served): a request sent after the
    /// refusal came back (by a margin, so it reached Sluice later) was served less than
    /// `wait_timeout` after the refused one had been sent. One group's waiters are served in
    /// arrival order, and nothing behind a waiter changes when it is served, so the refused
    /// request, had it queued, would have been served no later than that one: within
    /// `wait_timeout`, not past it as predicted.
    fn disproved_predictions(
        &self,
        wait_timeout: Duration,
    ) -> Vec<(Duration, Duration, Duration, Duration)> {
        let margin = Duration::from_millis(100);
        self.predicted_timeout_at
            .iter()
            .filter_map(|&(refused_sent, at)| {
                self.served
                    .iter()
                    .filter(|&&(sent, answered)| {
                        sent > at + margin && answered < refused_sent + wait_timeout
                    })
                    .max_by_key(|&&(_, answered)| answered)
                    .map(|&(sent, answered)| (refused_sent, at, sent, answered))
            })
            .collect()
    }
}

/// Fans `o.clients` concurrent invocations into a Sluice with a budget of 20 on a server that
/// allows 30, and checks: every client either committed or was refused with Sluice's retryable
/// 53300 (never the server's "too many clients", nor anything else); the table holds exactly
/// the committed rows, each once; the server never saw more than 20 of the user's backends.
async fn fan_out(o: FanOut) -> FanOutReport {
    const BUDGET: i64 = 20;
    let pg = server();
    // The table is made and read as the superuser: a backend of the test user's own would
    // count against the budget in the samples.
    pg.psql_db(
        DB,
        &format!("CREATE TABLE t (id int); GRANT ALL ON t TO {USER}"),
    );
    let sluice = Isolated::start(&pg, BUDGET as u32, BUDGET as u32, |c| {
        c.wait_timeout = o.wait_timeout;
        // md5 for the clients: a thousand SCRAM logins would be a thousand PBKDF2 runs in this
        // (debug-built) test process, and measure the test's CPU rather than Sluice.
        c.client_auth = ClientAuth::Md5;
        if let Some(n) = o.max_connecting {
            c.max_connecting = n;
        }
    })
    .await;
    let port = sluice.handle().local_addr.port();
    if o.warm {
        let mut holders = Vec::new();
        for _ in 0..BUDGET {
            holders.push(holder(sluice.handle()).await);
        }
        for c in &holders {
            within(10, "COMMIT", c.batch_execute("COMMIT"))
                .await
                .expect("warm-up commit");
        }
    }
    let sampler = Sampler::start(&pg, &[USER]).await;
    let mut ready = Vec::new();
    if o.connect_first {
        let epoch = Instant::now();
        let tasks: Vec<_> = (0..o.clients)
            .map(|_| tokio::spawn(fan_out_connect(port, epoch)))
            .collect();
        for t in tasks {
            match within(300, "fan-out connect", t).await.expect("task") {
                Ok(c) => ready.push(Some(c)),
                Err(Outcome::Failed(why)) => panic!("fan-out connect: {why}"),
                Err(_) => panic!("a login was refused before any query ran"),
            }
        }
    }
    let epoch = Instant::now();
    let tasks: Vec<_> = (0..o.clients)
        .map(|id| {
            let client = ready.get_mut(id as usize).and_then(Option::take);
            tokio::spawn(async move {
                let client = match client {
                    Some(c) => c,
                    None => match fan_out_connect(port, epoch).await {
                        Ok(c) => c,
                        Err(outcome) => return outcome,
                    },
                };
                fan_out_transaction(&client, id, o.hold, epoch).await
            })
        })
        .collect();
    let mut committed = Vec::new();
    let mut failed: BTreeMap<String, u32> = BTreeMap::new();
    let mut report = FanOutReport::default();
    for (id, t) in tasks.into_iter().enumerate() {
        match within(300, "fan-out client", t).await.expect("client task") {
            Outcome::Committed { sent, answered } => {
                committed.push(id as i32);
                report.served.push((sent, answered));
            }
            Outcome::Rejected {
                phase,
                sent,
                reason,
                detail,
                at,
            } => {
                *report
                    .rejected
                    .entry(format!("{phase}: {reason}"))
                    .or_default() += 1;
                if let (Some(sent), "predicted_timeout") = (sent, reason.as_str()) {
                    report.predicted_timeout_at.push((sent, at));
                }
                report.details.entry(reason).or_insert(detail);
            }
            Outcome::Failed(why) => *failed.entry(why).or_default() += 1,
        }
    }
    report.elapsed = epoch.elapsed();
    report.committed = committed.len() as u32;
    let seen = sampler.finish().await;
    let longest = report.served.iter().map(|(s, a)| *a - *s).max();
    let refused = report.predicted_timeout_at.iter().map(|(_, at)| at);
    eprintln!(
        "fan-out {o:?}: {} committed, {} rejected {:?}, failed {failed:?} in {:?}; \
         pg_stat_activity: {} samples, max {} backends; longest wait for BEGIN of a committed \
         client {longest:?}; predicted_timeout refusals from {:?} to {:?}; a DETAIL per reason: \
         {:?}",
        report.committed,
        report.rejected(),
        report.rejected,
        report.elapsed,
        seen.samples,
        seen.max_total,
        refused.clone().min(),
        refused.max(),
        report.details
    );
    assert!(
        failed.is_empty(),
        "clients failed other than by Sluice's 53300 rejection: {failed:?}"
    );
    assert_eq!(report.committed + report.rejected(), o.clients as u32);
    assert!(report.committed > 0, "nothing committed at all");
    assert!(seen.samples >= 10, "too few samples: {seen:?}");
    assert!(
        seen.max_total <= BUDGET,
        "the server saw {} backends of {USER}, over Sluice's budget of {BUDGET}",
        seen.max_total
    );
    // Exactly the committed rows, each once.
    let (su, su_pw) = pg.superuser();
    let admin = direct(&pg.url(su, su_pw, DB)).await;
    let rows = within(
        20,
        "read rows",
        admin.query("SELECT id FROM t ORDER BY id", &[]),
    )
    .await
    .expect("read rows");
    let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    committed.sort_unstable();
    assert_eq!(
        ids.len(),
        committed.len(),
        "rows in t differ in number from the committed transactions"
    );
    assert_eq!(
        ids, committed,
        "rows in t are not exactly the committed ids"
    );
    drop(ready);
    sluice.stop().await;
    report
}

/// 1. Fan-out: 1,000 cold clients at once, each running one short transaction (see [`fan_out`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_stays_within_budget_and_loses_nothing() {
    fan_out(FanOut::new(Duration::ZERO, Duration::from_secs(3))).await;
}

/// 1b. The same fan-out overloaded: each transaction holds its server for 100 ms, so the
/// 1,000 need about 5 s of the budget, against a wait_timeout of 1 s. Many must be refused,
/// and the same guarantees hold for those that are and those that are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_fan_out_rejects_cleanly() {
    let r = fan_out(FanOut::new(
        Duration::from_millis(100),
        Duration::from_secs(1),
    ))
    .await;
    assert!(
        r.rejected() > 0,
        "5 s of work for a 1 s wait_timeout, yet nothing was refused ({} committed)",
        r.committed
    );
}

/// 1c. `predicted_timeout` must only refuse requests that would have waited past
/// `wait_timeout`: in a cold fan-out no refused request may be followed by a later one that was
/// served within `wait_timeout` of the refused one's arrival (see
/// [`FanOutReport::disproved_predictions`]). Rates measured while the pool is still opening its
/// connections must not be trusted; the fan-out is tried three times under the load of the
/// module's other tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_fan_out_is_not_refused_for_timeouts_that_would_not_happen() {
    let wait_timeout = Duration::from_secs(3);
    for attempt in 1..=3 {
        let r = fan_out(FanOut::new(Duration::ZERO, wait_timeout)).await;
        let wrong = r.disproved_predictions(wait_timeout);
        if let Some((refused_sent, refused_at, sent, served)) = wrong.first() {
            panic!(
                "attempt {attempt}: {} of {} predicted_timeout refusals were wrong. E.g. a BEGIN \
                 sent at {refused_sent:?} was refused at {refused_at:?} (\"{}\"), while a BEGIN \
                 sent later, at {sent:?}, was served at {served:?}, less than wait_timeout \
                 ({wait_timeout:?}) after the refused one was sent. {} of 1000 committed; the \
                 longest wait of any of them was {:?}; the whole fan-out took {:?}",
                wrong.len(),
                r.predicted_timeout_at.len(),
                r.details
                    .get("predicted_timeout")
                    .map_or("", String::as_str),
                r.committed,
                r.served
                    .iter()
                    .map(|(s, a)| *a - *s)
                    .max()
                    .unwrap_or_default(),
                r.elapsed
            );
        }
    }
}

/// Holds a server connection: a client inside an open transaction.
async fn holder(h: &sluice::Handle) -> Client {
    let c = through(h).await;
    within(10, "BEGIN; SELECT 1", c.batch_execute("BEGIN; SELECT 1"))
        .await
        .expect("holder begins");
    c
}

/// Polls until the pool's queue holds `n` waiters (all groups), failing after `secs`.
async fn wait_for_waiters(h: &sluice::Handle, n: u32, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let waiting: u32 = h
            .context
            .pools
            .group_stats()
            .iter()
            .map(|g| g.waiting)
            .sum();
        if waiting >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {waiting} of {n} clients queued after {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// 2. The queue is bounded: with both connections held and `max_waiting` (50) clients queued, the
/// next request is refused at once (`queue_full`), long before `wait_timeout`; the queued ones
/// are served once the holders commit, and the refused client may retry on its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_is_bounded_by_max_waiting() {
    const WAITING: usize = 50;
    let pg = server();
    let h = start_sluice(&pg, USER, PASSWORD, DB, 2, 2, |c| {
        c.max_waiting = WAITING as u32;
        c.wait_timeout = Duration::from_secs(10);
    })
    .await;
    let holders = [holder(&h).await, holder(&h).await];
    let mut queued = Vec::new();
    for _ in 0..WAITING {
        queued.push(through(&h).await);
    }
    let queued_since = Instant::now();
    let tasks: Vec<_> = queued
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                let r =
                    tokio::time::timeout(Duration::from_secs(30), c.simple_query("SELECT 1")).await;
                (c, r)
            })
        })
        .collect();
    wait_for_waiters(&h, WAITING as u32, 10).await;

    let extra = through(&h).await;
    let t = Instant::now();
    let err = within(30, "the 51st request", extra.simple_query("SELECT 1"))
        .await
        .expect_err("the request over max_waiting was executed");
    let took = t.elapsed();
    assert_rejection(&err, "queue_full");
    assert!(
        took < Duration::from_secs(5),
        "queue_full took {took:?}, as long as a wait"
    );
    assert!(
        tasks.iter().all(|t| !t.is_finished()),
        "queued clients finished before the holders let go"
    );
    eprintln!(
        "queue_full after {took:?} ({:?} after the queue filled): {}",
        queued_since.elapsed(),
        describe(&err)
    );

    for c in &holders {
        within(10, "COMMIT", c.batch_execute("COMMIT"))
            .await
            .expect("holder commits");
    }
    for t in tasks {
        let (_c, r) = within(60, "queued client", t).await.expect("task");
        let r = r.expect("a queued client got no answer within 30 s");
        r.unwrap_or_else(|e| panic!("a queued client failed: {}", describe(&e)));
    }
    // The refused client's connection is intact.
    within(10, "retry", extra.simple_query("SELECT 1"))
        .await
        .unwrap_or_else(|e| panic!("retry after queue_full: {}", describe(&e)));
    drop(holders);
    h.stop().await;
}

/// 3. A request refused for capacity is a non-fatal error: the client keeps its connection and
/// its next query on that same connection succeeds once capacity is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_client_retries_on_the_same_connection() {
    let pg = server();
    let h = start_sluice(&pg, USER, PASSWORD, DB, 1, 1, |c| {
        c.wait_timeout = Duration::from_millis(300);
    })
    .await;
    let hold = holder(&h).await;
    let client = through(&h).await;
    let t = Instant::now();
    let err = within(
        30,
        "request while the budget is held",
        client.simple_query("SELECT 1"),
    )
    .await
    .expect_err("executed although the only connection was held");
    let took = t.elapsed();
    assert_rejection(&err, "wait_timeout");
    assert!(
        took >= Duration::from_millis(250),
        "refused after {took:?}, before wait_timeout (300 ms)"
    );
    let d = err.as_db_error().expect("db error");
    eprintln!("rejection after {took:?}: {}", describe(&err));
    assert!(
        d.detail().is_some_and(|s| s.contains("wait_timeout")),
        "DETAIL should name the limit: {:?}",
        d.detail()
    );
    assert!(
        !client.is_closed(),
        "the rejected client's connection was closed"
    );

    // Still refused while held; the connection survives repeated refusals.
    let err = within(30, "second request", client.simple_query("SELECT 2"))
        .await
        .expect_err("executed although the only connection was held");
    assert_rejection(&err, "wait_timeout");

    within(10, "COMMIT", hold.batch_execute("COMMIT"))
        .await
        .expect("holder commits");
    let rows = within(10, "retry", client.simple_query("SELECT 41 + 1"))
        .await
        .unwrap_or_else(|e| panic!("retry on the same connection: {}", describe(&e)));
    let value = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("42"));
    // A transaction works too.
    within(
        10,
        "transaction",
        client.batch_execute("BEGIN; SELECT 1; COMMIT"),
    )
    .await
    .expect("transaction after the retry");
    drop(hold);
    h.stop().await;
}

/// 4. Extended-protocol requests with parameters are refused whole (everything up to Sync is
/// dropped, the client gets 53300 and ReadyForQuery), and the connection stays in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_rejection_keeps_the_connection_usable() {
    let pg = server();
    let h = start_sluice(&pg, USER, PASSWORD, DB, 1, 1, |c| {
        // Nobody may queue: every request that finds no free connection is refused at once.
        c.max_waiting = 0;
    })
    .await;
    let hold = holder(&h).await;
    let client = through(&h).await;

    // Parse/Bind/Describe/Execute/Sync with an unnamed statement, in one request.
    let typed = || client.query_typed("SELECT $1::int4 + 1", &[(&41i32, Type::INT4)]);
    let err = within(30, "typed query while held", typed())
        .await
        .expect_err("executed although the only connection was held");
    assert_rejection(&err, "queue_full");
    assert!(!client.is_closed());

    // A prepared statement: its Parse/Describe/Sync is refused.
    let err = within(
        30,
        "prepared query while held",
        client.query("SELECT $1::int4 * 2", &[&21i32]),
    )
    .await
    .expect_err("executed although the only connection was held");
    assert_rejection(&err, "queue_full");

    // Two pipelined extended requests: each is refused on its own.
    let (a, b) = within(30, "pipelined while held", async {
        tokio::join!(
            client.query_typed("SELECT $1::int4", &[(&1i32, Type::INT4)]),
            client.query_typed("SELECT $1::text", &[(&"two", Type::TEXT)])
        )
    })
    .await;
    assert_rejection(
        &a.expect_err("first pipelined request executed"),
        "queue_full",
    );
    assert_rejection(
        &b.expect_err("second pipelined request executed"),
        "queue_full",
    );
    assert!(!client.is_closed());

    within(10, "COMMIT", hold.batch_execute("COMMIT"))
        .await
        .expect("holder commits");
    let rows = within(10, "typed query after", typed())
        .await
        .unwrap_or_else(|e| panic!("typed query after the rejection: {}", describe(&e)));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), 42);
    // (Budget 1: the prepared statement runs on the server it was prepared on.)
    let rows = within(
        10,
        "prepared query after",
        client.query("SELECT $1::int4 * 2", &[&21i32]),
    )
    .await
    .unwrap_or_else(|e| panic!("prepared query after the rejection: {}", describe(&e)));
    assert_eq!(rows[0].get::<_, i32>(0), 42);
    let (a, b) = within(30, "pipelined after", async {
        tokio::join!(
            client.query_typed("SELECT $1::int4", &[(&1i32, Type::INT4)]),
            client.query_typed("SELECT $1::text", &[(&"two", Type::TEXT)])
        )
    })
    .await;
    assert_eq!(a.expect("first pipelined")[0].get::<_, i32>(0), 1);
    assert_eq!(b.expect("second pipelined")[0].get::<_, &str>(0), "two");
    drop(hold);
    h.stop().await;
}

/// 5. Fairness: group A (user `bp`) floods the budget with 200 clients running 200 ms queries
/// in a loop; group B (user `bpother`, 3 connections reserved) runs short transactions in the
/// meantime. B is never refused and waits far less than A; the server never sees more than the
/// budget of both users together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_group_is_served_during_a_flood() {
    const BUDGET: i64 = 6;
    const A_CLIENTS: usize = 200;
    const B_CLIENTS: usize = 3;
    const B_EACH: usize = 17;
    let pg = server();
    pg.create_user(OTHER, OTHER_PASSWORD);
    let sluice = Isolated::start(&pg, BUDGET as u32, BUDGET as u32, |c| {
        c.wait_timeout = Duration::from_secs(10);
        c.max_waiting = 100_000;
        c.client_auth = ClientAuth::Md5;
        c.users.insert(
            OTHER.into(),
            UserConfig {
                password: Some(OTHER_PASSWORD.into()),
                server_password: None,
            },
        );
        c.groups.insert(
            OTHER.into(),
            GroupConfig {
                reserved_connections: Some(3),
                ..Default::default()
            },
        );
    })
    .await;
    let port = sluice.handle().local_addr.port();
    let mut a_clients = Vec::new();
    for _ in 0..A_CLIENTS {
        let c = within(30, "connect A", connect_port(port, USER)).await;
        a_clients.push(c.unwrap_or_else(|e| panic!("connect A: {}", describe(&e))));
    }
    let mut b_clients = Vec::new();
    for _ in 0..B_CLIENTS {
        let c = within(30, "connect B", connect_port(port, OTHER)).await;
        b_clients.push(c.unwrap_or_else(|e| panic!("connect B: {}", describe(&e))));
    }
    let sampler = Sampler::start(&pg, &[USER, OTHER]).await;

    // A: the flood, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let flood_started = Instant::now();
    let a_tasks: Vec<_> = a_clients
        .into_iter()
        .map(|c| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut done = Vec::new();
                let mut rejected: HashMap<String, u32> = HashMap::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = tokio::time::timeout(
                        Duration::from_secs(30),
                        c.simple_query("SELECT pg_sleep(0.2)"),
                    )
                    .await;
                    match r {
                        Err(_) => return Err("A query got no answer within 30 s".to_string()),
                        Ok(Ok(_)) => done.push(t.elapsed()),
                        Ok(Err(e)) if is_rejection(&e) => {
                            *rejected.entry(rejection_reason(&e)).or_default() += 1;
                            // A retrying function backs off a little.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Ok(Err(e)) => return Err(format!("A query: {}", describe(&e))),
                    }
                }
                Ok((done, rejected))
            })
        })
        .collect();

    // B: steady short transactions once the flood is in full swing, from as many clients as
    // B has connections reserved.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b_tasks: Vec<_> = b_clients
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                let (mut waits, mut failures) = (Vec::new(), Vec::new());
                for _ in 0..B_EACH {
                    let t = Instant::now();
                    let r = tokio::time::timeout(
                        Duration::from_secs(30),
                        c.batch_execute("BEGIN; SELECT 1; COMMIT"),
                    )
                    .await;
                    match r {
                        Err(_) => failures.push("no answer within 30 s".to_string()),
                        Ok(Err(e)) => {
                            failures.push(format!("after {:?}: {}", t.elapsed(), describe(&e)))
                        }
                        Ok(Ok(())) => waits.push(t.elapsed()),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (waits, failures)
            })
        })
        .collect();
    let mut b = Vec::new();
    let mut b_failures = Vec::new();
    for t in b_tasks {
        let (waits, failures) = within(120, "B client", t).await.expect("B task");
        b.extend(waits);
        b_failures.extend(failures);
    }
    let b_done = flood_started.elapsed();
    let rest = Duration::from_secs(4).saturating_sub(b_done);
    tokio::time::sleep(rest).await;
    stop.store(true, Ordering::Relaxed);
    let mut a = Vec::new();
    let mut a_rejected: BTreeMap<String, u32> = BTreeMap::new();
    for t in a_tasks {
        let (done, rejected) = within(120, "A client", t)
            .await
            .expect("A task")
            .unwrap_or_else(|e| panic!("group A: {e}"));
        a.extend(done);
        for (k, v) in rejected {
            *a_rejected.entry(k).or_default() += v;
        }
    }
    let seen = sampler.finish().await;
    a.sort_unstable();
    b.sort_unstable();
    assert!(
        b_failures.is_empty(),
        "{} of group B's {} transactions failed (B is within its reservation): {b_failures:?}",
        b_failures.len(),
        B_CLIENTS * B_EACH
    );
    assert_eq!(b.len(), B_CLIENTS * B_EACH);
    assert!(!a.is_empty(), "group A completed nothing");
    let (a50, b50, bmax) = (percentile(&a, 0.5), percentile(&b, 0.5), b[b.len() - 1]);
    eprintln!(
        "fairness: A {} done (p50 {a50:?}, p90 {:?}), rejected {a_rejected:?}; \
         B {} done (p50 {b50:?}, p90 {:?}, max {bmax:?}); B finished {b_done:?} into the flood; \
         pg_stat_activity: {seen:?}",
        a.len(),
        percentile(&a, 0.9),
        b.len(),
        percentile(&b, 0.9),
    );
    assert!(
        b50 * 3 < a50,
        "B's median wait {b50:?} is not far below A's median {a50:?}"
    );
    assert!(
        bmax < a50,
        "B's longest wait {bmax:?} is not below A's median {a50:?}"
    );
    assert!(seen.samples >= 10, "too few samples: {seen:?}");
    assert!(
        seen.max_total <= BUDGET,
        "the server saw {} backends of both users, over the budget of {BUDGET}",
        seen.max_total
    );
    sluice.stop().await;
}

/// 6. A group's `max_connections` caps the server connections it holds: ten clients of a group
/// capped at 2, in a budget of 6, never get more than 2 backends, and take turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_max_connections_caps_its_backends() {
    let pg = server();
    let h = start_sluice(&pg, USER, PASSWORD, DB, 6, 6, |c| {
        c.wait_timeout = Duration::from_secs(10);
        c.groups.insert(
            USER.into(),
            GroupConfig {
                max_connections: Some(2),
                ..Default::default()
            },
        );
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(through(&h).await);
    }
    let sampler = Sampler::start(&pg, &[USER]).await;
    let t = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    c.simple_query("SELECT pg_sleep(0.3)"),
                )
                .await
            })
        })
        .collect();
    for task in tasks {
        within(60, "capped client", task)
            .await
            .expect("task")
            .expect("no answer within 30 s")
            .unwrap_or_else(|e| panic!("capped client: {}", describe(&e)));
    }
    let took = t.elapsed();
    let seen = sampler.finish().await;
    eprintln!("group cap: 10 x 300 ms took {took:?}; pg_stat_activity {seen:?}");
    let (all, active) = seen.max_by_user.get(USER).copied().unwrap_or_default();
    assert!(
        active <= 2,
        "{active} active backends of a group capped at 2"
    );
    assert!(all <= 2, "{all} backends of a group capped at 2");
    assert!(
        active >= 1,
        "the sampler never saw the queries run: {seen:?}"
    );
    // 3 s of sleeping on at most 2 connections takes at least 1.5 s.
    assert!(
        took >= Duration::from_millis(1450),
        "10 x 300 ms finished in {took:?}: more than 2 ran at once"
    );
    h.stop().await;
}

/// Replays the server log (log_connections) and returns the most backends of `user` that were
/// between "connection received" and "connection authorized" at once.
fn max_concurrent_logins(log: &str, user: &str) -> (usize, usize) {
    // "2024-01-01 00:00:00.000 UTC [pid] LOG:  connection received: ..."
    let pid_of = |line: &str| -> Option<String> {
        let start = line.find('[')?;
        let end = line[start..].find(']')? + start;
        Some(line[start + 1..end].to_string())
    };
    let mut of_user = std::collections::HashSet::new();
    for line in log.lines() {
        if line.contains("connection authorized: user=") && line.contains(&format!("user={user} "))
        {
            if let Some(pid) = pid_of(line) {
                of_user.insert(pid);
            }
        }
    }
    let mut open = std::collections::HashSet::new();
    let mut max = 0;
    for line in log.lines() {
        let Some(pid) = pid_of(line) else { continue };
        if !of_user.contains(&pid) {
            continue;
        }
        if line.contains("connection received:") {
            open.insert(pid);
            max = max.max(open.len());
        } else if line.contains("connection authorized:") {
            open.remove(&pid);
        }
    }
    (max, of_user.len())
}

/// 8. Thundering herd: 50 clients at once with `max_connecting` 2 and a budget of 20. All are
/// served; the server never sees more than 20 backends nor (by its connection log) more than 2
/// of Sluice's logins in progress at once, and Sluice never counts more than 2 connects in
/// flight. (Before bb9fea7, under CPU load, some of the 50 were refused with "predicted wait
/// 10 s ... servers freeing at 2/s" although the storm took ~3 s: see test 8d.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_storm_is_limited_by_max_connecting() {
    const BUDGET: i64 = 20;
    let pg = PgServer::start(PgOptions {
        max_connections: 30,
        extra_conf: vec![
            ("log_connections".into(), "on".into()),
            ("log_line_prefix".into(), "'%m [%p] '".into()),
        ],
        ..Default::default()
    });
    pg.create_user(USER, PASSWORD);
    pg.create_database(DB, USER);
    let h = start_sluice(&pg, USER, PASSWORD, DB, BUDGET as u32, BUDGET as u32, |c| {
        c.max_connecting = 2;
        c.wait_timeout = Duration::from_secs(10);
        c.client_auth = ClientAuth::Md5;
    })
    .await;
    let sampler = Sampler::start(&pg, &[USER]).await;
    // Sluice's own view, sampled as fast as the runtime allows.
    let stop = Arc::new(AtomicBool::new(false));
    let pools = h.context.pools.clone();
    let watch = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut connecting, mut total) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let c: u32 = pools.pool_stats().iter().map(|p| p.connecting).sum();
                connecting = connecting.max(c);
                total = total.max(pools.totals().0);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (connecting, total)
        })
    };
    let port = h.local_addr.port();
    let started = Instant::now();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            tokio::spawn(async move {
                let c = match connect_port(port, USER).await {
                    Ok(c) => c,
                    Err(e) if is_rejection(&e) => return Ok(Some(describe(&e))),
                    Err(e) => return Err(format!("connect: {}", describe(&e))),
                };
                match c.simple_query("SELECT pg_sleep(0.05)").await {
                    Ok(_) => Ok(None),
                    Err(e) if is_rejection(&e) => Ok(Some(describe(&e))),
                    Err(e) => Err(format!("query: {}", describe(&e))),
                }
            })
        })
        .collect();
    let (mut served, mut refused, mut failed) = (0, Vec::new(), Vec::new());
    for t in tasks {
        match within(60, "storm client", t).await.expect("task") {
            Ok(None) => served += 1,
            Ok(Some(refusal)) => refused.push(refusal),
            Err(e) => failed.push(e),
        }
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (connecting, total) = within(10, "watcher", watch).await.expect("watcher");
    let seen = sampler.finish().await;
    let (logins, backends) = max_concurrent_logins(&pg.log_contents(), USER);
    eprintln!(
        "storm: {served} served, {} refused {:?}, {} failed in {took:?}; Sluice max connecting \
         {connecting}, max total {total}; server: {backends} backends of {USER}, at most {logins} \
         logging in at once; pg_stat_activity {seen:?}",
        refused.len(),
        refused.first(),
        failed.len()
    );
    assert!(failed.is_empty(), "clients failed: {failed:?}");
    assert!(refused.is_empty(), "clients were refused: {refused:?}");
    assert_eq!(served, 50);
    assert!(
        connecting <= 2,
        "Sluice had {connecting} connects in flight"
    );
    assert!(total <= BUDGET as u32, "Sluice held {total} connections");
    assert!(backends >= 1, "no logins of {USER} in the server log");
    assert!(
        logins <= 2,
        "the server saw {logins} logins of {USER} in progress at once (max_connecting 2)"
    );
    assert!(
        seen.max_total <= BUDGET,
        "the server saw {} backends",
        seen.max_total
    );
    h.stop().await;
}

/// 8d. `predicted_timeout` must not refuse requests that are then served well within
/// `wait_timeout`.
///
/// A warm pool of 20 (wait_timeout 5 s). Wave 1: 40 clients start a 500 ms query at once; 20
/// run, 20 queue. At ~0.5 s the 20 finish together and the 20 queued run until ~1.0 s. Wave 2:
/// 20 more clients arrive one every 10 ms from 0.65 s; they wait until ~1.0 s, about 0.35 s at
/// most. A rate window that closed at the first release 250 ms after the queue formed measured
/// one release in 0.5 s (2/s), and refused wave 2's 11th request on ("predicted wait 5.5 s ...
/// servers freeing at 2/s"): the case before windows needed several releases (bb9fea7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predicted_timeout_does_not_refuse_requests_served_in_time() {
    let pg = server();
    let h = start_sluice(&pg, USER, PASSWORD, DB, 20, 20, |c| {
        c.wait_timeout = Duration::from_secs(5);
        c.client_auth = ClientAuth::Md5;
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..60 {
        clients.push(through(&h).await);
    }
    // Warm: open all 20 server connections, then let them go idle.
    for c in &clients[..20] {
        within(10, "BEGIN", c.batch_execute("BEGIN"))
            .await
            .expect("BEGIN");
    }
    for c in &clients[..20] {
        within(10, "COMMIT", c.batch_execute("COMMIT"))
            .await
            .expect("COMMIT");
    }
    let epoch = Instant::now();
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        if i == 40 {
            tokio::time::sleep_until((epoch + Duration::from_millis(650)).into()).await;
        } else if i > 40 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tasks.push(tokio::spawn(async move {
            let sent = epoch.elapsed();
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                c.simple_query("SELECT pg_sleep(0.5)"),
            )
            .await;
            (sent, epoch.elapsed(), r)
        }));
    }
    let mut served = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        let (sent, done, r) = within(60, "client", t).await.expect("task");
        match r.expect("no answer within 30 s") {
            Ok(_) => served.push((sent, done)),
            Err(e) if is_rejection(&e) => refused.push((sent, done, describe(&e))),
            Err(e) => panic!("client: {}", describe(&e)),
        }
    }
    // Queueing delay of wave 2's served requests: answer time minus the 500 ms query.
    let wave2_wait = served
        .iter()
        .filter(|&&(sent, _)| sent >= Duration::from_millis(600))
        .map(|&(sent, done)| (done - sent).saturating_sub(Duration::from_millis(500)))
        .max();
    let last = served.iter().map(|&(_, d)| d).max().unwrap_or_default();
    eprintln!(
        "{} served (all done by {last:?}; wave 2 waited at most {wave2_wait:?}), {} refused",
        served.len(),
        refused.len()
    );
    if let Some((sent, at, why)) = refused.first() {
        panic!(
            "{} of 60 requests refused for a predicted wait over wait_timeout (5 s), e.g. one \
             sent at {sent:?}, refused at {at:?}: {why}. Yet the {} served were all done by \
             {last:?}, and the served requests of wave 2 waited at most {wave2_wait:?} for a \
             connection (the 20 connections all came free at ~1.0 s, for wave 2's 20 requests)",
            refused.len(),
            served.len(),
        );
    }
    h.stop().await;
}

/// Polls until `user` has at least `n` idle backends, for up to `secs`; returns the last count.
async fn wait_for_idle(pg: &PgServer, user: &str, n: i64, secs: u64) -> (i64, i64) {
    let admin = direct(&pg.superuser_url()).await;
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (all, idle) = backends(&admin, user).await;
        if idle >= n || Instant::now() >= deadline {
            return (all, idle);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 8b. `min_pool_size` warms the pool at start-up, before any client connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_warms_the_pool_before_any_client() {
    let pg = server();
    let h = start_sluice(&pg, USER, PASSWORD, DB, 20, 5, |c| {
        c.min_pool_size = 3;
    })
    .await;
    let (all, idle) = wait_for_idle(&pg, USER, 3, 5).await;
    assert!(
        idle >= 3 && all <= 5,
        "5 s after start, before any client: {all} backends of {USER}, {idle} idle; \
         min_pool_size = 3 wants 3 warm ones"
    );
    h.stop().await;
}

/// 8c. Once its pool exists, `min_pool_size` warm connections are kept, within `pool_size`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_keeps_warm_connections() {
    let pg = server();
    let h = start_sluice(&pg, USER, PASSWORD, DB, 20, 5, |c| {
        c.min_pool_size = 3;
    })
    .await;
    let c = through(&h).await;
    within(10, "query", c.simple_query("SELECT 1"))
        .await
        .expect("query");
    drop(c);
    let (all, idle) = wait_for_idle(&pg, USER, 3, 5).await;
    assert!(
        idle >= 3 && all <= 5,
        "5 s after the first client: {all} backends of {USER}, {idle} idle; min_pool_size = 3"
    );
    h.stop().await;
}
