//! Session state in transaction pooling: startup parameters follow each client onto a shared
//! server, statements whose state outlives a transaction pin (or are refused), and the next
//! client on that server never sees what the last one left.

use std::time::Duration;

use sluice::config::OnSessionState;
use tokio_postgres::{Client, NoTls};

use crate::admin::http_get;
use crate::pg::{PgOptions, PgServer};
use crate::proxy::start_sluice;
use crate::support::pg_with_user;

const T: Duration = Duration::from_secs(20);

fn server(user: &str) -> PgServer {
    pg_with_user(PgOptions::default(), user, "pw", "st")
}

async fn connect_with(h: &sluice::Handle, user: &str, app: &str, options: &str) -> Client {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(h.local_addr.port())
        .user(user)
        .password("pw")
        .dbname("st")
        .application_name(app);
    if !options.is_empty() {
        cfg.options(options);
    }
    let (client, conn) = tokio::time::timeout(T, cfg.connect(NoTls))
        .await
        .expect("connect in time")
        .expect("connect");
    tokio::spawn(conn);
    client
}

async fn one(c: &Client, sql: &str) -> String {
    let rows = tokio::time::timeout(T, c.simple_query(sql))
        .await
        .expect("in time")
        .expect(sql);
    rows.into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_follow_each_client_on_a_shared_server() {
    let pg = server("params_u");
    pg.psql_db("st", "CREATE SCHEMA a_schema AUTHORIZATION params_u; CREATE SCHEMA b_schema AUTHORIZATION params_u;");
    let h = start_sluice(&pg, "params_u", "pw", "st", 1, 1, |_| {}).await;
    let a = connect_with(
        &h,
        "params_u",
        "app_a",
        "-c TimeZone=Asia/Tokyo -c search_path=a_schema,public -c extra_float_digits=2",
    )
    .await;
    let b = connect_with(
        &h,
        "params_u",
        "app_b",
        "-c TimeZone=UTC -c search_path=b_schema,public",
    )
    .await;
    let mut pids = std::collections::HashSet::new();
    for _ in 0..15 {
        for (c, tz, path, app, digits) in [
            (&a, "Asia/Tokyo", "a_schema,public", "app_a", "2"),
            (&b, "UTC", "b_schema,public", "app_b", "1"),
        ] {
            assert_eq!(one(c, "SHOW TimeZone").await, tz);
            assert_eq!(one(c, "SELECT current_setting('search_path')").await, path);
            assert_eq!(
                one(
                    c,
                    "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
                )
                .await,
                app
            );
            assert_eq!(one(c, "SHOW extra_float_digits").await, digits);
            pids.insert(one(c, "SELECT pg_backend_pid()").await);
        }
    }
    assert_eq!(
        pids.len(),
        1,
        "both clients must have shared the one server connection"
    );
    // A client that asked for nothing sees the server's defaults, not the last client's values.
    let plain = connect_with(&h, "params_u", "", "").await;
    assert_eq!(
        one(&plain, "SELECT current_setting('search_path')").await,
        "\"$user\", public"
    );
    assert_ne!(one(&plain, "SHOW TimeZone").await, "Asia/Tokyo");
    // A value the server refuses is refused at startup, with the server's error.
    let mut bad = tokio_postgres::Config::new();
    bad.host("127.0.0.1")
        .port(h.local_addr.port())
        .user("params_u")
        .password("pw")
        .dbname("st")
        .options("-c statement_timeout=soon");
    let err = bad.connect(NoTls).await.err().expect("refused");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("22023"),
        "{err}"
    );
    h.stop().await;
}

/// Each statement, the pin reason it counts under, and a query that shows its state is gone
/// (returns "t") on the next client's session.
const TRIGGERS: &[(&[&str], &str, &str)] = &[
    (
        &["SET work_mem = '7MB'"],
        "set",
        "SELECT current_setting('work_mem') <> '7MB'",
    ),
    (
        &["LISTEN sluice_chan"],
        "listen",
        "SELECT count(*) = 0 FROM pg_listening_channels()",
    ),
    (
        &["SELECT pg_advisory_lock(4242)"],
        "advisory_lock",
        "SELECT pg_try_advisory_xact_lock(4242)",
    ),
    (
        &["CREATE TEMP TABLE tt (a int)"],
        "temp_table",
        "SELECT to_regclass('pg_temp.tt') IS NULL",
    ),
    (
        &[
            "BEGIN",
            "DECLARE held CURSOR WITH HOLD FOR SELECT 1",
            "COMMIT",
        ],
        "with_hold_cursor",
        "SELECT count(*) = 0 FROM pg_cursors",
    ),
    (
        &["PREPARE sqlprep AS SELECT 1"],
        "sql_prepare",
        "SELECT count(*) = 0 FROM pg_prepared_statements WHERE name = 'sqlprep'",
    ),
];

fn pins(body: &str, reason: &str) -> f64 {
    let series = format!("sluice_session_pins_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_pins_and_never_leaks() {
    let pg = server("pin_u");
    let h = start_sluice(&pg, "pin_u", "pw", "st", 1, 1, |c| {
        c.wait_timeout = Duration::from_millis(400)
    })
    .await;
    for (statements, reason, clean) in TRIGGERS {
        let before = pins(&http_get(h.admin_addr, "/metrics").1, reason);
        let x = connect_with(&h, "pin_u", "x", "").await;
        let y = connect_with(&h, "pin_u", "y", "").await;
        for s in *statements {
            one(&x, s).await;
        }
        // Pinned: the one server stays with x, so another client is refused while x is here.
        let err = tokio::time::timeout(T, y.simple_query("SELECT 1"))
            .await
            .expect("in time")
            .expect_err("server must be pinned to x");
        assert_eq!(
            err.as_db_error().map(|e| e.code().code()),
            Some("53300"),
            "{reason}: {err}"
        );
        // x keeps its state across transactions.
        one(&x, "SELECT 1").await;
        let after = pins(&http_get(h.admin_addr, "/metrics").1, reason);
        assert!(
            after >= before + 1.0,
            "{reason}: pin not counted ({before} -> {after})"
        );
        drop(x);
        // Once x leaves, y gets that server, reset.
        let mut clean_seen = String::new();
        for _ in 0..50 {
            match tokio::time::timeout(T, y.simple_query(clean))
                .await
                .expect("in time")
            {
                Ok(_) => {
                    clean_seen = one(&y, clean).await;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert_eq!(
            clean_seen, "t",
            "{reason}: the next client saw the state left behind"
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_scoped_state_does_not_pin() {
    let pg = server("local_u");
    let h = start_sluice(&pg, "local_u", "pw", "st", 1, 1, |c| {
        c.wait_timeout = Duration::from_secs(5)
    })
    .await;
    let x = connect_with(&h, "local_u", "x", "").await;
    let y = connect_with(&h, "local_u", "y", "").await;
    one(&x, "BEGIN").await;
    one(&x, "SET LOCAL work_mem = '9MB'").await;
    // A session SET inside a transaction block outlives it (PostgreSQL keeps it after COMMIT):
    // it does not pin, but it stays this client's setting and reaches nobody else.
    one(&x, "SET statement_timeout = '4321ms'").await;
    one(&x, "SELECT pg_advisory_xact_lock(7)").await;
    assert_eq!(one(&x, "SHOW work_mem").await, "9MB");
    one(&x, "COMMIT").await;
    // Not pinned: another client gets the (only) server at once and sees none of it.
    let before = pins(&http_get(h.admin_addr, "/metrics").1, "set");
    assert_ne!(one(&y, "SHOW work_mem").await, "9MB");
    assert_eq!(one(&y, "SHOW statement_timeout").await, "0");
    assert_eq!(one(&y, "SELECT pg_try_advisory_xact_lock(7)").await, "t");
    assert_eq!(one(&x, "SHOW statement_timeout").await, "4321ms");
    assert_ne!(one(&x, "SHOW work_mem").await, "9MB");
    assert_eq!(one(&y, "SHOW statement_timeout").await, "0");
    assert_eq!(
        pins(&http_get(h.admin_addr, "/metrics").1, "set"),
        before,
        "nothing pinned"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_mode_refuses_session_state() {
    let pg = server("reject_u");
    let h = start_sluice(&pg, "reject_u", "pw", "st", 1, 1, |c| {
        c.on_session_state = OnSessionState::Reject;
        c.wait_timeout = Duration::from_secs(5);
    })
    .await;
    let x = connect_with(&h, "reject_u", "x", "").await;
    for (statements, reason, _) in TRIGGERS {
        let last = statements.len() - 1;
        for (i, s) in statements.iter().enumerate() {
            let res = tokio::time::timeout(T, x.simple_query(s))
                .await
                .unwrap_or_else(|_| panic!("{s}: no answer in time"));
            let refused = statements.len() == 1 || (i > 0 && i < last);
            if refused {
                let err = res.expect_err("must be refused");
                let db = err.as_db_error().expect("a server-style error");
                assert_eq!(db.code().code(), "0A000", "{reason}: {err}");
                assert!(
                    db.message()
                        .contains("not supported in transaction pooling"),
                    "{}",
                    db.message()
                );
                assert!(
                    db.hint().is_some_and(|h| h.starts_with("Instead,")),
                    "{reason}: no advice"
                );
            } else {
                res.expect(s);
            }
        }
        // The connection stays usable, and nothing pinned: another client gets the server.
        one(&x, "SELECT 1").await;
        let y = connect_with(&h, "reject_u", "y", "").await;
        one(&y, "SELECT 1").await;
    }
    // The refused statement also counts as refused in the extended protocol (a Parse).
    let err = tokio::time::timeout(T, x.query("LISTEN ext_chan", &[]))
        .await
        .expect("in time")
        .expect_err("refused");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("0A000"));
    one(&x, "SELECT 1").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_and_discard_act_on_the_clients_statements() {
    let pg = server("dealloc_u");
    let h = start_sluice(&pg, "dealloc_u", "pw", "st", 2, 2, |_| {}).await;
    let c = connect_with(&h, "dealloc_u", "c", "").await;
    let stmt = c.prepare("SELECT $1::int + 1").await.expect("prepare");
    let row = c.query_one(&stmt, &[&1i32]).await.expect("execute");
    assert_eq!(row.get::<_, i32>(0), 2);
    c.simple_query("DEALLOCATE ALL")
        .await
        .expect("deallocate all");
    let err = c
        .query_one(&stmt, &[&1i32])
        .await
        .expect_err("gone after DEALLOCATE ALL");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("26000"),
        "{err}"
    );
    let again = c
        .prepare("SELECT $1::int + 2")
        .await
        .expect("prepare again");
    assert_eq!(
        c.query_one(&again, &[&1i32])
            .await
            .expect("execute")
            .get::<_, i32>(0),
        3
    );
    c.simple_query("DISCARD ALL").await.expect("discard all");
    assert!(
        c.query_one(&again, &[&1i32]).await.is_err(),
        "gone after DISCARD ALL"
    );
    // Other clients' statements are unaffected.
    let d = connect_with(&h, "dealloc_u", "d", "").await;
    let s2 = d.prepare("SELECT $1::int * 10").await.expect("prepare");
    assert_eq!(
        d.query_one(&s2, &[&4i32])
            .await
            .expect("execute")
            .get::<_, i32>(0),
        40
    );
    h.stop().await;
}
