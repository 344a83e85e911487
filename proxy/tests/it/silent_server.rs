//! A server that goes silent — its link cut without a RST or FIN, as when a failed-over host
//! vanishes — is noticed within seconds (TCP keepalive and `TCP_USER_TIMEOUT` on server
//! sockets), both by a client whose query is in flight and by one handed a pooled connection,
//! instead of after the kernel's ~15 minutes. And client sockets have keepalive on.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice::config::Config;

use crate::proxy::{connect, overrides};
use crate::support::blackhole::BlackHole;
use crate::support::{describe, start_pg_with_user};

pub const USER: &str = "silent_app";
pub const PASSWORD: &str = "silent-pw";
pub const DB: &str = "silent_db";

/// PostgreSQL, a black hole in front of it, and Sluice (default settings: they are what is
/// tested) connecting through the hole.
async fn through_black_hole() -> (crate::pg::PgServer, BlackHole, sluice::Handle) {
    through_black_hole_with(|_| {}).await
}

/// [`through_black_hole`], with `tweak` applied to the configuration.
pub async fn through_black_hole_with(
    tweak: impl FnOnce(&mut Config),
) -> (crate::pg::PgServer, BlackHole, sluice::Handle) {
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let target: SocketAddr = format!("{}:{}", pg.host(), pg.port())
        .parse()
        .expect("addr");
    let hole = BlackHole::start(target).await;
    let mut o = overrides(&pg, USER, PASSWORD, DB, 4, 2);
    o.upstream = Some(format!(
        "postgres://{USER}:{PASSWORD}@{}:{}/{DB}",
        hole.addr.ip(),
        hole.addr.port()
    ));
    let mut cfg = Config::load(None, &o).expect("config");
    tweak(&mut cfg);
    let sluice = sluice::start(cfg).await.expect("sluice starts");
    (pg, hole, sluice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_noticed_mid_query_and_in_the_pool() {
    let (_pg, hole, sluice) = through_black_hole().await;

    // Two server connections, both back in the pool.
    let a = connect(&sluice, USER, PASSWORD, DB).await.expect("a");
    let b = connect(&sluice, USER, PASSWORD, DB).await.expect("b");
    a.batch_execute("BEGIN").await.expect("a begins");
    b.batch_execute("BEGIN").await.expect("b begins");
    a.batch_execute("COMMIT").await.expect("a commits");
    b.batch_execute("COMMIT").await.expect("b commits");

    // A's query is in flight when the link goes silent.
    let in_flight = tokio::spawn(async move {
        let r = a.simple_query("SELECT pg_sleep(120)").await;
        (r.map(|_| ()), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    hole.cut();
    let cut = Instant::now();
    // B is handed the other pooled connection, whose server no longer answers.
    let pooled = tokio::time::timeout(Duration::from_secs(30), b.simple_query("SELECT 1")).await;
    let pooled = pooled.expect(
        "a client handed a pooled connection to a silent server gets an answer, not a hang",
    );
    let err = pooled.expect_err("and it is an error");
    let b_after = cut.elapsed();
    let (mid, at) = tokio::time::timeout(Duration::from_secs(30), in_flight)
        .await
        .expect("a client mid-query on a silent server gets an answer, not a hang")
        .expect("task");
    let mid = mid.expect_err("an error");
    let a_after = at.duration_since(cut);
    eprintln!(
        "noticed after {a_after:?} (mid-query: {}) and {b_after:?} (pooled: {})",
        describe(&mid),
        describe(&err)
    );
    // The documented bound for the defaults (3 s + 3 probes 1 s apart, TCP_USER_TIMEOUT 8 s),
    // with room for a loaded machine: the kernel alone would take minutes.
    assert!(a_after < Duration::from_secs(20), "mid-query: {a_after:?}");
    assert!(b_after < Duration::from_secs(20), "pooled: {b_after:?}");
    // An autocommit statement was in flight: whether it committed is unknown.
    assert_eq!(
        mid.code().map(|c| c.code()),
        Some("08007"),
        "mid-query: {}",
        describe(&mid)
    );

    // Once the link is back, the broken connections are gone and new ones serve.
    hole.mend();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = match connect(&sluice, USER, PASSWORD, DB).await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        };
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Sluice serves again after the link is back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sockets_have_keepalive() {
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let sluice = crate::proxy::start_sluice(&pg, USER, PASSWORD, DB, 4, 1, |_| {}).await;
    let _c = connect(&sluice, USER, PASSWORD, DB).await.expect("client");
    let port = sluice.local_addr.port();
    // While bytes are unacknowledged the socket shows its retransmission timer instead.
    let mut text = String::new();
    for _ in 0..50 {
        let out = std::process::Command::new("ss")
            .args([
                "-tno",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ])
            .output()
            .expect("ss runs (iproute2)");
        text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("timer:(keepalive") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Sluice's side of a client connection keeps a keepalive timer: {text}");
}

/// A transaction block whose server goes silent: lost with a COMMIT in flight, the client is
/// told the outcome is unknown (08007); lost with any other statement in flight, that the
/// transaction was rolled back (08006).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_is_reported_as_unknown_and_a_lost_transaction_as_rolled_back() {
    let (_pg, hole, sluice) = through_black_hole().await;
    let commit = connect(&sluice, USER, PASSWORD, DB).await.expect("client");
    let other = connect(&sluice, USER, PASSWORD, DB).await.expect("client");
    commit
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    other.batch_execute("BEGIN").await.expect("begin");
    hole.cut();
    let (c, o) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(30), commit.batch_execute("COMMIT")),
        tokio::time::timeout(Duration::from_secs(30), other.batch_execute("SELECT 1")),
    );
    let c = c.expect("an answer").expect_err("an error");
    let o = o.expect("an answer").expect_err("an error");
    assert_eq!(
        c.code().map(|s| s.code()),
        Some("08007"),
        "{}",
        describe(&c)
    );
    assert_eq!(
        o.code().map(|s| s.code()),
        Some("08006"),
        "{}",
        describe(&o)
    );
    assert!(describe(&o).contains("rolled back"), "{}", describe(&o));
}

/// A server that ends the session itself (pg_terminate_backend, a fast shutdown) says why with
/// FATAL 57P01: the client gets that one FATAL and the end of the connection, nothing of
/// Sluice's after it (drivers such as psycopg 3 fail on a second error, without its SQLSTATE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backend_gives_the_client_one_fatal() {
    use crate::support::raw::Raw;
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let sluice = crate::proxy::start_sluice(&pg, USER, PASSWORD, DB, 4, 1, |_| {}).await;
    let (su, su_pw) = pg.superuser();
    let admin = crate::support::direct(&pg.url(su, su_pw, "postgres")).await;
    let (mut c, _, _) = Raw::login(sluice.local_addr, false, USER, PASSWORD, DB).await;
    let mut q = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query("SELECT pg_sleep(60)", &mut q).expect("encode");
    c.send(&q).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE usename = $1 AND query = 'SELECT pg_sleep(60)' AND state = 'active'",
                &[&USER],
            )
            .await
            .expect("terminate")
            .get::<_, i64>(0);
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the query started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ends_with_one_fatal(&mut c, "57P01").await;
}

/// Reads `c` to its end: exactly one error, a FATAL with `code`; returns its fields.
async fn ends_with_one_fatal(
    c: &mut crate::support::raw::Raw,
    code: &str,
) -> std::collections::HashMap<char, String> {
    let seen = tokio::time::timeout(Duration::from_secs(20), c.until_eof())
        .await
        .expect("the connection ends");
    let errors: Vec<_> = seen
        .iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| crate::support::raw::fields(b))
        .collect();
    assert_eq!(errors.len(), 1, "one error, then the end: {errors:?}");
    assert_eq!(
        errors[0].get(&'C').map(String::as_str),
        Some(code),
        "{errors:?}"
    );
    assert_eq!(errors[0].get(&'V').map(String::as_str), Some("FATAL"));
    errors.into_iter().next().unwrap_or_default()
}

/// A frozen function inside a transaction: after `idle_transaction_timeout` it is disconnected
/// with FATAL 25P03, its transaction is rolled back and its locks and server connection freed;
/// a client idle outside a transaction, or one slower than that between statements but still
/// within it, is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_frozen_in_a_transaction_is_disconnected_and_rolled_back() {
    use crate::support::raw::Raw;
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let sluice = crate::proxy::start_sluice(&pg, USER, PASSWORD, DB, 4, 1, |c| {
        c.idle_transaction_timeout = Duration::from_secs(2);
    })
    .await;
    let other = connect(&sluice, USER, PASSWORD, DB).await.expect("client");
    other
        .batch_execute("CREATE TABLE IF NOT EXISTS frozen (id int PRIMARY KEY, v int); INSERT INTO frozen VALUES (1, 0) ON CONFLICT DO NOTHING")
        .await
        .expect("table");
    let (mut frozen, _, _) = Raw::login(sluice.local_addr, false, USER, PASSWORD, DB).await;
    // Working, with pauses shorter than the timeout: untouched.
    for sql in ["BEGIN", "UPDATE frozen SET v = 1 WHERE id = 1"] {
        frozen.query(sql).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    // Then it freezes, holding the row lock and the only server connection.
    ends_with_one_fatal(&mut frozen, "25P03").await;
    // The lock is gone and the update with it.
    let row = tokio::time::timeout(
        Duration::from_secs(10),
        other.query_one("UPDATE frozen SET v = v + 10 WHERE id = 1 RETURNING v", &[]),
    )
    .await
    .expect("the row is free")
    .expect("update");
    assert_eq!(
        row.get::<_, i32>(0),
        10,
        "the frozen transaction was rolled back"
    );
    // Idle outside a transaction for longer than that: still connected.
    tokio::time::sleep(Duration::from_secs(3)).await;
    other
        .simple_query("SELECT 1")
        .await
        .expect("an idle client outside a transaction stays connected");
}

/// Clients that stop sending half-way through a request too large to buffer (streamed to its
/// server as it arrives) or through a COPY FROM STDIN hold a server that waits for the rest:
/// after `client_stall_timeout` they are disconnected with FATAL 57014 and their servers closed
/// (the COPY rolled back), so the other clients are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stall_mid_request_are_cut_off_and_free_their_servers() {
    use crate::support::raw::Raw;
    use bytes::{BufMut, BytesMut};
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let sluice = crate::proxy::start_sluice(&pg, USER, PASSWORD, DB, 4, 2, |c| {
        c.client_stall_timeout = Duration::from_secs(1);
        // The other client queues for about client_stall_timeout, which a standing queue's
        // shedding (1.5 × shed_target) would refuse on a slow machine; not what is tested.
        c.shed_target = Duration::from_secs(30);
    })
    .await;
    let other = connect(&sluice, USER, PASSWORD, DB).await.expect("client");
    other
        .batch_execute("CREATE TABLE IF NOT EXISTS stalled_copy (v text)")
        .await
        .expect("table");

    // A: a 10 MB Query of which 2 MB arrive (past the 1 MiB request buffer: it has a server).
    let (mut big, _, _) = Raw::login(sluice.local_addr, false, USER, PASSWORD, DB).await;
    let total = 10 << 20;
    let mut b = BytesMut::new();
    b.put_u8(b'Q');
    b.put_i32(total + 4);
    b.put_slice(b"SELECT '");
    b.put_bytes(b'x', 2 << 20);
    big.send(&b).await;
    // B: a COPY FROM STDIN with one row sent.
    let (mut copy, _, _) = Raw::login(sluice.local_addr, false, USER, PASSWORD, DB).await;
    b.clear();
    postgres_protocol::message::frontend::query("COPY stalled_copy FROM STDIN", &mut b)
        .expect("encode");
    copy.send(&b).await;
    assert_eq!(copy.recv().await.0, b'G', "CopyInResponse");
    b.clear();
    b.put_u8(b'd');
    b.put_i32(4 + 4);
    b.put_slice(b"row\n");
    copy.send(&b).await;

    // Both servers are taken; once the stalled clients are cut off the others are served.
    let served = tokio::time::timeout(Duration::from_secs(20), other.simple_query("SELECT 1"))
        .await
        .expect("served after the stalled clients are cut off");
    served.expect("served");
    ends_with_one_fatal(&mut big, "57014").await;
    ends_with_one_fatal(&mut copy, "57014").await;
    let rows = other
        .query_one("SELECT count(*) FROM stalled_copy", &[])
        .await
        .expect("count");
    assert_eq!(rows.get::<_, i64>(0), 0, "the stalled COPY was rolled back");
    let body = crate::admin::http_get(sluice.admin_addr, "/metrics").1;
    let stalls = crate::admin::metric(
        &body,
        r#"sluice_client_timeouts_total{reason="client_stall_timeout"}"#,
    );
    assert!(stalls >= 2.0, "{body}");
}

/// `query_timeout`: a request the server has not answered in time is cancelled — the client
/// gets the server's own 57014 and keeps its connection, and the server connection is reused —
/// and a server that answers neither the request nor the cancel (silent) is closed, the client
/// told with one FATAL (08007: an autocommit statement was in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_and_gives_up_on_a_silent_server() {
    let (_pg, hole, sluice) = through_black_hole_with(|c| {
        c.query_timeout = Duration::from_millis(500);
        // Only query_timeout may notice the silent server here.
        c.server_tcp_keepalive = Duration::ZERO;
        c.server_tcp_user_timeout = Duration::ZERO;
    })
    .await;
    let c = connect(&sluice, USER, PASSWORD, DB).await.expect("client");
    let e = c
        .simple_query("SELECT pg_sleep(30)")
        .await
        .expect_err("cancelled");
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("{}", describe(&e)));
    assert_eq!(db.code().code(), "57014", "{}", describe(&e));
    assert_eq!(db.severity(), "ERROR");
    c.simple_query("SELECT 1")
        .await
        .expect("the connection goes on");
    let body = crate::admin::http_get(sluice.admin_addr, "/metrics").1;
    let cancelled = crate::admin::metric(
        &body,
        r#"sluice_queries_cancelled_total{reason="query_timeout"}"#,
    );
    assert!(cancelled >= 1.0, "{body}");

    // Silent: neither the query nor the cancel is answered.
    let (mut raw, _, _) =
        crate::support::raw::Raw::login(sluice.local_addr, false, USER, PASSWORD, DB).await;
    raw.query("SELECT 1").await;
    let mut b = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query("SELECT 2", &mut b).expect("encode");
    hole.cut();
    raw.send(&b).await;
    let error = ends_with_one_fatal(&mut raw, "08007").await;
    assert!(error[&'M'].contains("query_timeout"), "{error:?}");
}

/// The relay between Sluice and PostgreSQL delays every read by 300 ms (a slow or congested
/// link): everything works, only slower. Then it resets every connection through it (RST both
/// ways): a client inside a transaction gets one FATAL `08006` (rolled back), a client between
/// transactions whose pooled server connection was reset is served on a new one, without an
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_works_and_reset_connections_are_reported_or_replaced() {
    use crate::support::raw::Raw;
    let (_pg, hole, sluice) = through_black_hole().await;
    let between = connect(&sluice, USER, PASSWORD, DB).await.expect("client");
    between
        .batch_execute("CREATE TABLE IF NOT EXISTS reset_t (v int)")
        .await
        .expect("table");

    hole.delay(Duration::from_millis(300));
    let started = Instant::now();
    between
        .batch_execute("BEGIN; INSERT INTO reset_t VALUES (1); COMMIT")
        .await
        .unwrap_or_else(|e| panic!("through a slow link: {}", describe(&e)));
    let rows = between
        .query_one("SELECT count(*) FROM reset_t", &[])
        .await
        .expect("count");
    assert_eq!(rows.get::<_, i64>(0), 1);
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "the delay was applied"
    );
    hole.delay(Duration::ZERO);

    // A client inside a transaction, and the other one's server back in the pool.
    let (mut inside, _, _) = Raw::login(sluice.local_addr, false, USER, PASSWORD, DB).await;
    let m = inside.query("BEGIN; INSERT INTO reset_t VALUES (2)").await;
    assert_eq!(crate::support::raw::error_code(&m), None, "{m:?}");
    hole.reset().await;
    let fatal = ends_with_one_fatal(&mut inside, "08006").await;
    assert!(
        fatal.get(&'M').is_some_and(|m| m.contains("rolled back")),
        "{fatal:?}"
    );
    let rows = tokio::time::timeout(
        Duration::from_secs(20),
        between.query_one("SELECT count(*) FROM reset_t", &[]),
    )
    .await
    .expect("an answer")
    .unwrap_or_else(|e| panic!("served on a new server connection: {}", describe(&e)));
    assert_eq!(
        rows.get::<_, i64>(0),
        1,
        "the reset transaction was rolled back"
    );
}

/// A load balancer between Sluice and the server forgets idle flows (as an NLB does after its
/// idle timeout): the next bytes on a forgotten flow are answered with a RST. Pooled server
/// connections idle past `server_check_delay` are checked (an empty query) before they are
/// handed out, so the ones it forgot are found dead and replaced: no client sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_a_load_balancer_forgot_are_checked_and_replaced_before_use() {
    let (_pg, hole, sluice) = through_black_hole_with(|c| {
        c.server_check_delay = Duration::from_millis(500);
    })
    .await;
    let a = connect(&sluice, USER, PASSWORD, DB).await.expect("a");
    let b = connect(&sluice, USER, PASSWORD, DB).await.expect("b");
    // Two server connections at once, both back in the pool.
    a.batch_execute("BEGIN").await.expect("a begins");
    b.batch_execute("BEGIN").await.expect("b begins");
    a.batch_execute("COMMIT").await.expect("a commits");
    b.batch_execute("COMMIT").await.expect("b commits");
    let failed = || {
        crate::tls::metric(
            sluice.admin_addr,
            "sluice_server_connections_closed_total",
            &[("reason", "failed_check")],
        )
    };
    let before = failed().await;

    hole.forget_idle(Duration::from_secs(1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // One after the other, then both at once: each is served.
    for (name, c) in [("a", &a), ("b", &b)] {
        c.batch_execute("SELECT 1")
            .await
            .unwrap_or_else(|e| panic!("{name} after the flows were forgotten: {}", describe(&e)));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ra, rb) = tokio::join!(
        a.batch_execute("BEGIN; SELECT pg_sleep(0.2); COMMIT"),
        b.batch_execute("BEGIN; SELECT pg_sleep(0.2); COMMIT"),
    );
    for (name, r) in [("a", ra), ("b", rb)] {
        r.unwrap_or_else(|e| panic!("{name} together: {}", describe(&e)));
    }
    assert!(
        failed().await - before >= 2.0,
        "the forgotten connections were found by the check"
    );
}
