//! A fleet of `sluice` processes sharing one budget through the database (`fleet`): what the
//! server's own `log_connections`/`log_disconnections` lines show open at once never exceeds
//! the budget (the coordination sessions included); demand moves the budget between
//! instances; a killed instance's share comes back to the others.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admin::{http_get, metric};
use crate::passthrough::concurrency_after;
use crate::pg::{PgOptions, PgServer};
use crate::support::process::SluiceProcess;
use crate::support::{describe, start_pg_with_user, within_secs};

const USER: &str = "fleet_app";
const PASSWORD: &str = "fleet-pw";
const DB: &str = "fleet_db";
const BUDGET: u32 = 12;

async fn server() -> PgServer {
    let opts = PgOptions {
        max_connections: 30,
        log_connections: true,
        extra_conf: vec![("log_disconnections".into(), "on".into())],
        ..Default::default()
    };
    let pg = start_pg_with_user(opts, USER, PASSWORD, DB).await;
    pg.psql_db(
        DB,
        &format!(
            "CREATE TABLE fleet_t (id int PRIMARY KEY, via int); GRANT ALL ON fleet_t TO {USER}"
        ),
    );
    pg
}

/// A fleet member: budget 12, pools as large, a look at the fleet every 200 ms.
fn member(pg: &PgServer) -> SluiceProcess {
    member_at(pg, &[])
}

/// A fleet member with more settings (`SLUICE_LISTEN` for a successor on the same port).
fn member_at(pg: &PgServer, more: &[(&str, &str)]) -> SluiceProcess {
    let upstream = pg.url(USER, PASSWORD, DB);
    let budget = BUDGET.to_string();
    let mut env: Vec<(&str, &str)> = more.to_vec();
    env.extend_from_slice(&[
        ("SLUICE_UPSTREAM", &upstream),
        ("SLUICE_FLEET", "test-fleet"),
        ("SLUICE_FLEET_INTERVAL", "200ms"),
        ("SLUICE_MAX_SERVER_CONNECTIONS", &budget),
        ("SLUICE_POOL_SIZE", &budget),
        ("SLUICE_MAX_WAITING", "2000"),
        ("SLUICE_WAIT_TIMEOUT", "30s"),
        ("SLUICE_SHED_TARGET", "30s"),
        ("SLUICE_MAX_CLIENT_CONNECTIONS", "2000"),
    ]);
    SluiceProcess::spawn(&env)
}

fn scrape(s: &SluiceProcess, series: &str) -> f64 {
    metric(&http_get(s.admin, "/metrics").1, series)
}

fn held(s: &SluiceProcess) -> f64 {
    scrape(s, "sluice_fleet_slots{held=\"instance\"}")
}

/// Waits until every member sees `n` members.
async fn members_see(fleet: &[&SluiceProcess], n: usize) {
    within_secs(30, "the members see each other", async {
        loop {
            let seen = tokio::task::block_in_place(|| {
                fleet
                    .iter()
                    .all(|s| scrape(s, "sluice_fleet_instances") as usize == n)
            });
            if seen {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// Whether `e` is one of the errors Sluice documents as safe to retry.
fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        let c = c.code();
        c == "53300" || c == "57P01" || c == "57P03" || c.starts_with("08")
    })
}

/// One short transaction through `url`, retried on the documented retryable errors; returns
/// how many retries it took.
async fn transaction(url: String, id: i32, via: i32, sleep_ms: u32) -> u64 {
    let sql = format!(
        "BEGIN; INSERT INTO fleet_t VALUES ({id}, {via}) ON CONFLICT DO NOTHING; \
         SELECT pg_sleep({}); COMMIT",
        f64::from(sleep_ms) / 1000.0
    );
    retried(&url, &sql, id).await
}

/// Runs `sql` through a new connection to `url`, again on the documented retryable errors;
/// returns how many retries it took.
async fn retried(url: &str, sql: &str, id: i32) -> u64 {
    let mut retries = 0;
    loop {
        let attempt = async {
            let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            c.batch_execute(sql).await
        };
        match attempt.await {
            Ok(()) => return retries,
            Err(e) if retryable(&e) || e.code().is_none() => {
                assert!(retries < 200, "transaction {id}: {}", describe(&e));
                retries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("transaction {id}: {}", describe(&e)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_keep_the_servers_own_count_within_one_budget_under_600_transactions() {
    let pg = server().await;
    let fleet: Vec<SluiceProcess> = (0..3).map(|_| member(&pg)).collect();
    members_see(&fleet.iter().collect::<Vec<_>>(), 3).await;
    let before = pg.log_contents().len();
    let retries = Arc::new(AtomicU64::new(0));
    let txs = (0..600).map(|i| {
        let url = fleet[i % 3].url(USER, PASSWORD, DB);
        let retries = retries.clone();
        async move {
            let r = transaction(url, i as i32, (i % 3) as i32, 5).await;
            retries.fetch_add(r, Ordering::Relaxed);
        }
    });
    within_secs(180, "600 transactions", futures_util::future::join_all(txs)).await;
    let log = pg.log_contents();
    // The coordination sessions, opened before, count too.
    let (open, _) = concurrency_after(&log, before);
    let rows = pg.psql_db(DB, "SELECT count(*) FROM fleet_t");
    assert_eq!(rows.trim(), "600", "every transaction committed once");
    println!(
        "fleet of 3, budget {BUDGET}: at most {open} server connections at once (server log), {} retries",
        retries.load(Ordering::Relaxed)
    );
    assert!(open <= BUDGET as usize, "{open} server connections at once");
    let held: Vec<f64> = tokio::task::block_in_place(|| fleet.iter().map(held).collect());
    assert!(held.iter().sum::<f64>() <= f64::from(BUDGET), "{held:?}");
}

/// Steady load of `clients` on `s` (transactions of 20 ms) until `stop`.
fn load(
    s: &SluiceProcess,
    clients: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    base: i32,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..clients)
        .map(|c| {
            let url = s.url(USER, PASSWORD, DB);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                let mut failed = 0;
                while !stop.load(Ordering::Relaxed) {
                    let id = base + (c as i32) * 100_000 + n as i32;
                    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                        Ok((cl, conn)) => {
                            tokio::spawn(conn);
                            while !stop.load(Ordering::Relaxed) {
                                let sql = format!(
                                    "BEGIN; INSERT INTO fleet_t VALUES ({}, 0) ON CONFLICT DO NOTHING; SELECT pg_sleep(0.02); COMMIT",
                                    id + n as i32
                                );
                                if cl.batch_execute(&sql).await.is_err() {
                                    failed += 1;
                                    break;
                                }
                                n += 1;
                            }
                        }
                        Err(_) => {
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                failed
            })
        })
        .collect()
}

/// Waits until `s` holds at least `want` slots; returns how long that took.
async fn reaches(s: &SluiceProcess, want: f64, what: &str) -> Duration {
    let started = Instant::now();
    within_secs(30, what, async {
        loop {
            if tokio::task::block_in_place(|| held(s)) >= want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_follows_demand_and_a_killed_instance_gives_its_share_back() {
    let pg = server().await;
    let mut a = member(&pg);
    let b = member(&pg);
    members_see(&[&a, &b], 2).await;
    let before = pg.log_contents().len();

    // All load on A: A takes most of the budget.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_a = load(&a, 30, stop.clone(), 10_000_000);
    let took = reaches(&a, f64::from(BUDGET - 2), "A takes most of the budget").await;
    println!("A reached {} slots in {took:?}", BUDGET - 2);
    stop.store(true, Ordering::Relaxed);
    for t in on_a {
        assert_eq!(t.await.expect("client"), 0, "A's clients failed");
    }

    // Then all load on B: A's idle share moves to B.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_b = load(&b, 30, stop.clone(), 20_000_000);
    let took = reaches(&b, f64::from(BUDGET - 2), "B takes most of the budget").await;
    println!(
        "B reached {} slots in {took:?} after the load moved",
        BUDGET - 2
    );

    // Load on A too, then kill A: its share comes back to B.
    let stop_a = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_a = load(&a, 30, stop_a.clone(), 30_000_000);
    within_secs(30, "A gets its fair share back", async {
        while tokio::task::block_in_place(|| held(&a)) < f64::from(BUDGET / 2 - 1) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let a_share = tokio::task::block_in_place(|| held(&a));
    a.child.kill().expect("kill -9");
    let _ = a.child.wait();
    let took = reaches(&b, f64::from(BUDGET - 2), "B takes A's share").await;
    println!("B reached {} slots {took:?} after A was killed", BUDGET - 2);
    stop.store(true, Ordering::Relaxed);
    stop_a.store(true, Ordering::Relaxed);
    for t in on_b {
        assert_eq!(t.await.expect("client"), 0, "B's clients failed");
    }
    // A's clients saw their connections end, nothing else (they reconnect and fail to connect).
    for t in on_a {
        assert!(t.await.expect("client") >= 1, "A's clients saw the kill");
    }
    let (open, _) = concurrency_after(&pg.log_contents(), before);
    println!("at most {open} server connections at once (server log)");
    // A killed instance's backends end as the server reads EOF; its locks may be freed a
    // moment before its busy backends have noticed (the bound README states: at most the
    // killed instance's share, for as long as their statements run).
    let bound = BUDGET as usize + a_share as usize;
    assert!(
        open <= bound,
        "{open} server connections at once (bound {bound})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_another_member_cancels_the_query() {
    use crate::support::raw::{error_code, Raw};
    let pg = server().await;
    let a = member(&pg);
    let b = member(&pg);
    members_see(&[&a, &b], 2).await;
    // The members announce where they take cancels once they have joined.
    within_secs(10, "B knows A's address", async {
        loop {
            let (_, status) = tokio::task::block_in_place(|| http_get(b.admin, "/status"));
            if status.contains(&a.local.to_string()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let (mut c, pid, secret) = Raw::login(a.local, false, USER, PASSWORD, DB).await;
    let mut b_query = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query("SELECT pg_sleep(60)", &mut b_query)
        .expect("encode");
    c.send(&b_query).await;
    // The query is running on A's server connection.
    within_secs(10, "the query runs", async {
        while !pg
            .psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'")
            .trim()
            .eq("1")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let started = Instant::now();
    let mut cancel = bytes::BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(pid, secret, &mut cancel);
    let mut to_b = Raw::connect(b.local).await;
    to_b.send(&cancel).await;
    let answer = within_secs(10, "the query is cancelled", c.until_ready()).await;
    assert_eq!(error_code(&answer).as_deref(), Some("57014"), "{answer:?}");
    println!(
        "cancelled through the other member in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_transaction_and_keeps_the_budget() {
    use crate::support::process::signal;
    let pg = server().await;
    let grace = [("SLUICE_SHUTDOWN_GRACE", "300ms")];
    let mut fleet: Vec<SluiceProcess> = (0..3).map(|_| member_at(&pg, &grace)).collect();
    members_see(&fleet.iter().collect::<Vec<_>>(), 3).await;
    let urls: Vec<String> = fleet.iter().map(|s| s.url(USER, PASSWORD, DB)).collect();
    let before = pg.log_contents().len();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (done, retries) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // Function-like clients: a connection per transaction, retried on the documented errors.
    let clients: Vec<_> = (0..24)
        .map(|c| {
            let (urls, stop) = (urls.clone(), stop.clone());
            let (done, retries) = (done.clone(), retries.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let id = 50_000_000 + c * 100_000 + n;
                    let url = urls[(c + n) as usize % urls.len()].clone();
                    retries.fetch_add(transaction(url, id, c, 10).await, Ordering::Relaxed);
                    done.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        // The successor binds the same ports while the old process still serves.
        let (listen, admin) = (fleet[i].local.to_string(), fleet[i].admin.to_string());
        let next = member_at(
            &pg,
            &[
                ("SLUICE_LISTEN", &listen),
                ("SLUICE_ADMIN_LISTEN", &admin),
                grace[0],
            ],
        );
        let mut old = std::mem::replace(&mut fleet[i], next);
        signal(old.child.id(), "TERM");
        within_secs(40, "the old process drains and exits", async {
            while old.child.try_wait().expect("wait").is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        members_see(&fleet.iter().collect::<Vec<_>>(), 3).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    let done = done.load(Ordering::Relaxed);
    let rows = pg.psql_db(DB, "SELECT count(*) FROM fleet_t WHERE id >= 50000000");
    assert_eq!(
        rows.trim(),
        done.to_string(),
        "every transaction committed once"
    );
    let (open, _) = concurrency_after(&pg.log_contents(), before);
    println!(
        "rolling restart of 3: {done} transactions, 0 failed, {} retries; at most {open} server connections at once (server log)",
        retries.load(Ordering::Relaxed)
    );
    assert!(open <= BUDGET as usize, "{open} server connections at once");
}

/// The table `timed_transaction` writes, and a file configuring `groups` (`group_by`
/// application_name); returns the file's directory and path.
fn groups_setup(pg: &PgServer, groups: &str) -> (tempfile::TempDir, String) {
    pg.psql_db(
        DB,
        &format!(
            "CREATE TABLE cap_t (id int PRIMARY KEY, t0 timestamptz, t1 timestamptz); \
             GRANT ALL ON cap_t TO {USER}"
        ),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("sluice.toml");
    std::fs::write(&file, format!("group_by = \"application_name\"\n{groups}")).expect("config");
    let path = file.to_string_lossy().to_string();
    (dir, path)
}

/// A transaction of `sleep_s` seconds that records when it ran by the server's clock,
/// retried on the documented retryable errors.
async fn timed_transaction(url: String, id: usize, sleep_s: f64) {
    let sql = format!(
        "BEGIN; INSERT INTO cap_t VALUES ({id}, clock_timestamp()) \
         ON CONFLICT (id) DO UPDATE SET t0 = excluded.t0; SELECT pg_sleep({sleep_s}); \
         UPDATE cap_t SET t1 = clock_timestamp() WHERE id = {id}; COMMIT"
    );
    retried(&url, &sql, id as i32).await;
}

/// The most `timed_transaction`s that ran at once, and how many committed.
fn most_at_once(pg: &PgServer) -> (u32, u32) {
    let most = pg.psql_db(
        DB,
        "SELECT max((SELECT count(*) FROM cap_t b WHERE b.t0 <= a.t0 AND b.t1 > a.t0)) \
         FROM cap_t a",
    );
    let done = pg.psql_db(DB, "SELECT count(*) FROM cap_t WHERE t1 IS NOT NULL");
    (
        most.trim().parse().expect("a count"),
        done.trim().parse().expect("a count"),
    )
}

/// A group's `max_connections` is the fleet's, not each member's: a group capped at 4 whose
/// clients come through three members at once never has more than 4 transactions in the
/// server at a time (timed by the server's own clock inside each transaction), and the capped
/// group's transactions all commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_cap_holds_across_the_fleet() {
    const CAP: u32 = 4;
    let pg = server().await;
    let (_dir, path) = groups_setup(&pg, &format!("[groups.capped]\nmax_connections = {CAP}\n"));
    let fleet: Vec<SluiceProcess> = (0..3)
        .map(|_| member_at(&pg, &[("SLUICE_CONFIG", &path)]))
        .collect();
    members_see(&fleet.iter().collect::<Vec<_>>(), 3).await;
    let txs = (0..90).map(|i| {
        let url = format!(
            "{}?application_name=capped",
            fleet[i % 3].url(USER, PASSWORD, DB)
        );
        timed_transaction(url, i, 0.1)
    });
    within_secs(
        120,
        "90 capped transactions",
        futures_util::future::join_all(txs),
    )
    .await;
    let (most, done) = most_at_once(&pg);
    assert_eq!(done, 90, "every capped transaction committed");
    println!("group capped at {CAP} through 3 members: at most {most} of its transactions at once");
    assert!(
        most <= CAP,
        "{most} transactions of a group capped at {CAP}"
    );
    assert!(most >= 2, "the cap was shared, not starved: {most}");
}

/// A group's `reserved_connections` is the fleet's: while two members' clients of another
/// group would take the whole budget, the reserved group's clients on the third member get
/// their reservation (6 of a budget of 12, more than that member's even share of 4), because
/// the reservation's slots count first in its fair share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_reservation_is_served_on_any_member_of_a_busy_fleet() {
    const RESERVED: u32 = 6;
    let pg = server().await;
    let (_dir, path) = groups_setup(
        &pg,
        &format!("[groups.vip]\nreserved_connections = {RESERVED}\n"),
    );
    let fleet: Vec<SluiceProcess> = (0..3)
        .map(|_| member_at(&pg, &[("SLUICE_CONFIG", &path)]))
        .collect();
    members_see(&fleet.iter().collect::<Vec<_>>(), 3).await;
    let before = pg.log_contents().len();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut hogs = load(&fleet[0], 30, stop.clone(), 1_000_000);
    hogs.extend(load(&fleet[1], 30, stop.clone(), 50_000_000));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let url = format!("{}?application_name=vip", fleet[2].url(USER, PASSWORD, DB));
    let rounds = (0..5).map(|round| {
        let url = url.clone();
        async move {
            let txs = (0..RESERVED as usize)
                .map(|i| timed_transaction(url.clone(), round * 100 + i, 0.3));
            futures_util::future::join_all(txs).await;
        }
    });
    within_secs(120, "the reserved group's transactions", async {
        for r in rounds {
            r.await;
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        let _ = h.await;
    }
    let (most, done) = most_at_once(&pg);
    assert_eq!(done, 5 * RESERVED, "every reserved transaction committed");
    println!("group reserving {RESERVED} on one of 3 busy members: at most {most} of its transactions at once");
    assert!(
        most >= RESERVED - 1,
        "{most} transactions at once of a group reserving {RESERVED}"
    );
    let (open, _) = concurrency_after(&pg.log_contents(), before);
    assert!(open <= BUDGET as usize, "{open} server connections at once");
}
