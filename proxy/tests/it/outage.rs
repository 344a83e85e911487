//! Riding out an outage: while the server is stopped, refusing, or reachable only as a
//! read-only host (a failover whose DNS change has not settled), requests wait in the queue
//! while Sluice reconnects with backoff, up to `server_unavailable_timeout`; clients keep their
//! connections throughout, and every acknowledged write is there exactly once afterwards.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::admin::{http_get, metric};
use crate::pg::{pick_port, PgOptions, PgServer};
use crate::proxy::{connect, start_sluice};
use crate::support::hosts::HostsEntry;
use crate::support::{describe, direct, pg_with_user, start_pg_with_user};

const PASSWORD: &str = "outage-pw";
const DB: &str = "outage_db";

async fn clients(sluice: &sluice::Handle, user: &str, n: usize) -> Vec<Client> {
    let mut out = Vec::new();
    for _ in 0..n {
        let c = connect(sluice, user, PASSWORD, DB).await.expect("connect");
        c.simple_query("SELECT 1").await.expect("served");
        out.push(c);
    }
    out
}

async fn off_runtime(f: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(f).await.expect("blocking task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_through_an_outage_and_keep_their_connections() {
    const USER: &str = "outage_hold";
    let pg = std::sync::Arc::new(start_pg_with_user(Default::default(), USER, PASSWORD, DB).await);
    pg.psql_db(
        DB,
        &format!("CREATE TABLE t (id int PRIMARY KEY); ALTER TABLE t OWNER TO {USER}"),
    );
    // Shedding as tight as the queue allows, to show that an outage is not taken for overload;
    // requests queued behind the pool wait past wait_timeout.
    let sluice = start_sluice(&pg, USER, PASSWORD, DB, 6, 3, |c| {
        c.wait_timeout = Duration::from_secs(2);
        c.server_unavailable_timeout = Some(Duration::from_secs(30));
        c.shed_target = Duration::from_millis(50);
        c.shed_interval = Duration::from_millis(100);
    })
    .await;
    let clients = clients(&sluice, USER, 12).await;

    let stopped = pg.clone();
    off_runtime(move || stopped.stop()).await;
    let down = Instant::now();
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let r = c.simple_query(&format!("INSERT INTO t VALUES ({i})")).await;
            (c, r.map(|_| ()), Instant::now())
        }));
    }
    // Past wait_timeout: every request is still waiting (none was refused or failed).
    tokio::time::sleep(Duration::from_secs(5)).await;
    for t in &tasks {
        assert!(!t.is_finished(), "a request ended during the outage");
    }
    let started = pg.clone();
    off_runtime(move || started.start_again()).await;
    let up = Instant::now();
    let mut last = up;
    for t in tasks {
        let (c, r, at) = t.await.expect("task");
        r.unwrap_or_else(|e| panic!("held through the outage: {}", describe(&e)));
        last = last.max(at);
        // The same connection serves on.
        c.simple_query("SELECT 1").await.expect("connection kept");
    }
    eprintln!(
        "outage of {:?}; every held request served {:?} after the server was back",
        up - down,
        last - up
    );
    let direct = direct(&pg.url(USER, PASSWORD, DB)).await;
    let row = direct
        .query_one("SELECT count(*), count(DISTINCT id) FROM t", &[])
        .await
        .expect("count");
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (12, 12));
    let body = http_get(sluice.admin_addr, "/metrics").1;
    for reason in [
        "overload",
        "predicted_timeout",
        "wait_timeout",
        "server_unavailable",
    ] {
        let series =
            format!(r#"sluice_queries_rejected_total{{reason="{reason}",group="{USER}"}}"#);
        assert_eq!(metric(&body, &series), 0.0, "{series}");
    }
    assert!(body.contains("\nsluice_server_unavailable "), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_past_server_unavailable_timeout_ends_with_a_retryable_error() {
    const USER: &str = "outage_short";
    let pg = std::sync::Arc::new(start_pg_with_user(Default::default(), USER, PASSWORD, DB).await);
    let sluice = start_sluice(&pg, USER, PASSWORD, DB, 2, 1, |c| {
        c.server_unavailable_timeout = Some(Duration::from_secs(1));
    })
    .await;
    let clients = clients(&sluice, USER, 3).await;
    let stopped = pg.clone();
    off_runtime(move || stopped.stop()).await;
    let mut tasks = Vec::new();
    for c in clients {
        tasks.push(tokio::spawn(async move {
            let r = c.simple_query("SELECT 1").await;
            (c, r)
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        let (c, r) = t.await.expect("task");
        let e = r.expect_err("the server is down");
        let db = e
            .as_db_error()
            .unwrap_or_else(|| panic!("{}", describe(&e)));
        // A non-fatal 08006 (the documented retryable "server connection could not be made"):
        // the client's own connection stays.
        assert_eq!(db.code().code(), "08006", "{}", describe(&e));
        assert_eq!(db.severity(), "ERROR", "{}", describe(&e));
        assert!(
            db.message()
                .contains("could not connect to the database server")
                || db
                    .message()
                    .contains("cannot be reached (server_unavailable)"),
            "{}",
            describe(&e)
        );
        clients.push(c);
    }
    let started = pg.clone();
    off_runtime(move || started.start_again()).await;
    for c in clients {
        c.simple_query("SELECT 1")
            .await
            .expect("served again on the same connection");
    }
}

/// One address of a failover pair: `127.0.0.N` on `port`, with the test's user and database.
fn host_of_pair(addr: &'static str, port: u16, user: &str) -> PgServer {
    let pg = pg_with_user(
        PgOptions {
            listen: Some((addr, port)),
            ..Default::default()
        },
        user,
        PASSWORD,
        DB,
    );
    pg.psql_db(
        DB,
        &format!("CREATE TABLE t (id int PRIMARY KEY); ALTER TABLE t OWNER TO {user}"),
    );
    pg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_name_is_resolved_again_and_a_read_only_host_is_not_used() {
    const USER: &str = "outage_failover";
    let port = pick_port();
    let (old, new) = tokio::task::spawn_blocking(move || {
        (
            host_of_pair("127.0.0.2", port, USER),
            host_of_pair("127.0.0.3", port, USER),
        )
    })
    .await
    .expect("servers start");
    // The new host is not writable yet (as a standby before its promotion).
    new.psql(&format!(
        "ALTER DATABASE {DB} SET default_transaction_read_only = on"
    ));
    let name = HostsEntry::add("sluice-failover", "127.0.0.2");
    let sluice = start_sluice(&old, USER, PASSWORD, DB, 4, 2, |c| {
        c.server_host = name.name.clone();
        c.server_unavailable_timeout = Some(Duration::from_secs(60));
    })
    .await;
    let client = connect(&sluice, USER, PASSWORD, DB).await.expect("connect");
    client
        .simple_query("INSERT INTO t VALUES (1)")
        .await
        .expect("written on the old host");

    // The old host goes; the name moves to the new one, still read-only.
    let old = std::sync::Arc::new(old);
    let gone = old.clone();
    let refused = read_only_refusals(&sluice);
    off_runtime(move || gone.stop()).await;
    name.point_at("127.0.0.3");
    let write = tokio::spawn(async move {
        let r = client.simple_query("INSERT INTO t VALUES (2)").await;
        (client, r.map(|_| ()))
    });
    refuses_a_read_only_server(&sluice, refused, "the new host").await;
    assert!(
        !write.is_finished(),
        "the write was not held while the new host is read-only"
    );
    // Promoted: the held write lands there.
    new.psql(&format!(
        "ALTER DATABASE {DB} RESET default_transaction_read_only"
    ));
    let (client, r) = write.await.expect("task");
    r.unwrap_or_else(|e| panic!("held through the failover: {}", describe(&e)));
    client
        .simple_query("SELECT 1")
        .await
        .expect("connection kept");
    assert_eq!(
        new.psql_db(DB, "SELECT string_agg(id::text, ',') FROM t"),
        "2"
    );
    drop(name);
}

/// A real standby: a base backup of the primary, streaming from it, commits synchronous. The
/// primary stops and the name moves to the standby while it is still in recovery
/// (`in_hot_standby`): Sluice does not use it, and keeps trying until it is promoted; then the
/// held write lands there, on the same client connection, with every write acknowledged before
/// the failover (replicated synchronously, so none is lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_standby_is_not_used_until_promoted_and_no_acknowledged_write_is_lost() {
    const USER: &str = "outage_standby";
    const WRITES: i32 = 100;
    let port = pick_port();
    let (primary, standby) = tokio::task::spawn_blocking(move || {
        let opts = PgOptions {
            listen: Some(("127.0.0.2", port)),
            extra_conf: vec![("synchronous_commit".into(), "on".into())],
            ..Default::default()
        };
        let primary = pg_with_user(opts, USER, PASSWORD, DB);
        primary.psql_db(
            DB,
            &format!("CREATE TABLE t (id int PRIMARY KEY); ALTER TABLE t OWNER TO {USER}"),
        );
        let standby = PgServer::standby_of(&primary, ("127.0.0.3", port));
        primary.psql("ALTER SYSTEM SET synchronous_standby_names = 'standby'");
        primary.psql("SELECT pg_reload_conf()");
        let deadline = Instant::now() + Duration::from_secs(30);
        while primary.psql("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'")
            != "1"
        {
            assert!(
                Instant::now() < deadline,
                "the standby never became synchronous"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        (primary, standby)
    })
    .await
    .expect("servers start");
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    let name = HostsEntry::add("sluice-standby", "127.0.0.2");
    let sluice = start_sluice(&primary, USER, PASSWORD, DB, 4, 2, |c| {
        c.server_host = name.name.clone();
        c.server_unavailable_timeout = Some(Duration::from_secs(60));
    })
    .await;
    let client = connect(&sluice, USER, PASSWORD, DB).await.expect("connect");
    for id in 1..=WRITES {
        client
            .simple_query(&format!("INSERT INTO t VALUES ({id})"))
            .await
            .unwrap_or_else(|e| panic!("written on the primary: {}", describe(&e)));
    }

    // The primary goes; the name moves to the standby, still in recovery.
    let primary = std::sync::Arc::new(primary);
    let gone = primary.clone();
    let refused = read_only_refusals(&sluice);
    off_runtime(move || gone.stop()).await;
    name.point_at("127.0.0.3");
    let write = tokio::spawn(async move {
        let r = client
            .simple_query(&format!("INSERT INTO t VALUES ({})", WRITES + 1))
            .await;
        (client, r.map(|_| ()))
    });
    refuses_a_read_only_server(&sluice, refused, "the standby").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !write.is_finished(),
        "the write was not held while the standby is in recovery"
    );

    // Promoted: the held write lands there, and nothing acknowledged before is missing.
    let standby = std::sync::Arc::new(standby);
    let promoted = standby.clone();
    off_runtime(move || promoted.promote()).await;
    let (client, r) = tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("the held write ends once the standby is promoted")
        .expect("task");
    r.unwrap_or_else(|e| panic!("held through the failover: {}", describe(&e)));
    client
        .simple_query("SELECT 1")
        .await
        .expect("connection kept");
    assert_eq!(
        standby.psql_db(
            DB,
            "SELECT count(*), count(DISTINCT id), min(id), max(id) FROM t"
        ),
        format!("{0}|{0}|1|{0}", WRITES + 1),
        "every acknowledged write, once"
    );
    drop(name);
}

/// How a client's write ended.
enum Outcome {
    /// Refused as not executed (08006, 53300): the row must not be there.
    NotExecuted,
    /// The outcome is unknown (08007, the server's FATAL, a lost connection): look.
    Unknown,
}

fn outcome(e: &tokio_postgres::Error) -> Outcome {
    match e.code().map(|c| c.code()) {
        Some("08006" | "53300") => Outcome::NotExecuted,
        Some("08007" | "57P01" | "57P02" | "57P03") | None => Outcome::Unknown,
        Some(other) => panic!("not a documented retryable error: {other}: {}", describe(e)),
    }
}

/// 20 clients writing rows of their own, one autocommit INSERT at a time, retrying on the
/// documented retryable errors (and, when the outcome is unknown, looking before retrying),
/// through a restart, a 10 s outage, a 3 s stall of the link, `kill -9` of a backend (which
/// makes PostgreSQL end all the others and recover) and a backend stopped (SIGSTOP) for 3 s:
/// every acknowledged write is there exactly once, every row there was acknowledged, no write waits past a bound, and
/// writes resume within seconds of each fault without anyone's help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_restarts_outages_stalls_and_dead_backends_exactly_once() {
    use crate::silent_server::{through_black_hole_with, DB, PASSWORD, USER};
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    let (pg, hole, sluice) = through_black_hole_with(|c| {
        c.server_unavailable_timeout = Some(Duration::from_secs(15));
        c.pool_size = 5;
    })
    .await;
    let pg = Arc::new(pg);
    pg.psql_db(
        DB,
        &format!("CREATE TABLE w (id bigint PRIMARY KEY); ALTER TABLE w OWNER TO {USER}"),
    );
    // The harness's servers commit asynchronously (fast); a crash (kill -9) then loses commits
    // already acknowledged, by PostgreSQL's own design. Not here.
    pg.psql("ALTER SYSTEM SET synchronous_commit = on");
    pg.psql("SELECT pg_reload_conf()");
    let sluice = Arc::new(sluice);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(HashSet::new()));
    // Milliseconds since `t0` of the latest acknowledged write.
    let t0 = Instant::now();
    let last_ack = Arc::new(AtomicU64::new(0));
    // Errors seen: refused as not executed, and of unknown outcome.
    let errors = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let mut writers = Vec::new();
    for w in 0..20u64 {
        let (sluice, stop, acked, last_ack, errors) = (
            sluice.clone(),
            stop.clone(),
            acked.clone(),
            last_ack.clone(),
            errors.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut client: Option<Client> = None;
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = w * 1_000_000 + seq;
                // The connection, again after a FATAL.
                let c = match client.as_ref().filter(|c| !c.is_closed()) {
                    Some(c) => c,
                    None => match connect(&sluice, USER, PASSWORD, DB).await {
                        Ok(c) => client.insert(c),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    },
                };
                let sql = format!("INSERT INTO w VALUES ({id})");
                let write = c.simple_query(&sql);
                // The documented bounds: server_unavailable_timeout (15 s) plus keepalive
                // detection; far less than a hang.
                let r = tokio::time::timeout(Duration::from_secs(40), write)
                    .await
                    .unwrap_or_else(|_| panic!("writer {w}: a write hung"));
                let done = match r {
                    Ok(_) => true,
                    Err(e) => match outcome(&e) {
                        Outcome::NotExecuted => {
                            errors[0].fetch_add(1, Ordering::Relaxed);
                            false
                        }
                        Outcome::Unknown => {
                            errors[1].fetch_add(1, Ordering::Relaxed);
                            // Look on a connection that works, then go on.
                            client = None;
                            let mut found = None;
                            while found.is_none() {
                                if let Ok(c) = connect(&sluice, USER, PASSWORD, DB).await {
                                    let q = format!("SELECT count(*) FROM w WHERE id = {id}");
                                    if let Ok(row) = c.query_one(q.as_str(), &[]).await {
                                        found = Some(row.get::<_, i64>(0) == 1);
                                    }
                                    client = Some(c);
                                }
                                if found.is_none() {
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                }
                            }
                            found == Some(true)
                        }
                    },
                };
                if done {
                    acked.lock().unwrap().insert(id);
                    last_ack.fetch_max(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
                    seq += 1;
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }
    // After each fault, how long until a write is acknowledged again.
    let resumed = |since: Instant| {
        let last_ack = last_ack.clone();
        async move {
            let from = since.duration_since(t0).as_millis() as u64;
            let deadline = Instant::now() + Duration::from_secs(30);
            while last_ack.load(Ordering::Relaxed) <= from {
                assert!(Instant::now() < deadline, "writes did not resume");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            since.elapsed()
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (a, b) = (pg.clone(), pg.clone());
    off_runtime(move || a.stop()).await;
    off_runtime(move || b.start_again()).await;
    let restart = resumed(Instant::now()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = pg.clone();
    off_runtime(move || a.stop()).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let b = pg.clone();
    off_runtime(move || b.start_again()).await;
    let outage = resumed(Instant::now()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    hole.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    hole.mend();
    let stall = resumed(Instant::now()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // kill -9 of one of Sluice's backends: PostgreSQL ends every other backend too (57P02)
    // and runs crash recovery before it takes logins again.
    let backend = |pg: &PgServer| -> libc::pid_t {
        pg.psql(&format!(
            "SELECT pid FROM pg_stat_activity WHERE usename = '{USER}' \
             AND backend_type = 'client backend' ORDER BY backend_start LIMIT 1"
        ))
        .trim()
        .parse()
        .expect("a backend of Sluice's")
    };
    let a = pg.clone();
    let victim = tokio::task::spawn_blocking(move || backend(&a))
        .await
        .expect("pid");
    let seen = errors[1].load(Ordering::Relaxed);
    // SAFETY: kill(2) on a PostgreSQL backend of the test's own server.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0, "kill -9");
    // From the first write the crash ended (outcome unknown) to the next acknowledged one.
    let deadline = Instant::now() + Duration::from_secs(10);
    while errors[1].load(Ordering::Relaxed) == seen {
        assert!(Instant::now() < deadline, "no client saw the crash");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let crash = resumed(Instant::now()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // SIGSTOP of a backend for 3 s: its client waits, the others go on; then it goes on too.
    let a = pg.clone();
    let frozen = tokio::task::spawn_blocking(move || backend(&a))
        .await
        .expect("pid");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(frozen, libc::SIGSTOP) }, 0, "SIGSTOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(frozen, libc::SIGCONT) }, 0, "SIGCONT");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let acked = acked.lock().unwrap().clone();
    let direct = direct(&pg.url(USER, PASSWORD, DB)).await;
    let present: HashSet<u64> = direct
        .query("SELECT id FROM w", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get::<_, i64>(0) as u64)
        .collect();
    eprintln!(
        "{} writes acknowledged ({} refused as not executed, {} of unknown outcome, all retried); writes resumed {restart:?} after the restart, {outage:?} after the 10 s outage, {stall:?} after the 3 s stall, {crash:?} after kill -9 of a backend",
        acked.len(),
        errors[0].load(Ordering::Relaxed),
        errors[1].load(Ordering::Relaxed),
    );
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let unacked: Vec<_> = present.difference(&acked).collect();
    assert!(
        unacked.is_empty(),
        "rows written although the client was told they were not: {unacked:?}"
    );
}

/// Read-only servers Sluice has refused so far (`sluice_server_connects_total{result="read_only"}`).
/// The recorder is shared by every test in the process: compare with an earlier reading.
fn read_only_refusals(sluice: &sluice::Handle) -> f64 {
    metric(
        &http_get(sluice.admin_addr, "/metrics").1,
        r#"sluice_server_connects_total{result="read_only"}"#,
    )
}

/// Waits (up to 30 s) until Sluice has refused a read-only server since there were `before`
/// refusals: it reached `what`, and did not use it.
async fn refuses_a_read_only_server(sluice: &sluice::Handle, before: f64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while read_only_refusals(sluice) <= before {
        assert!(Instant::now() < deadline, "Sluice never reached {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
