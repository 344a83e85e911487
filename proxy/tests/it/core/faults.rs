//! Dirty disconnects, terminated backends, idle timeout and shutdown.

use super::*;

// ---------------------------------------------------------------------------------------------
// 11. Dirty disconnects.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_disconnects_leave_no_state_behind() {
    let env = env(1, 1, |c| c.wait_timeout = Duration::from_secs(30)).await;
    env.setup("CREATE TABLE t (a int); CREATE TABLE c (id int8, s text)")
        .await;
    let su = env.superuser().await;

    // A opens a transaction, writes, and vanishes (no Terminate, no COMMIT).
    let (a, a_conn) = within(
        "connect A",
        connect_with_task(&env.sluice, USER, PASSWORD, DB),
    )
    .await
    .expect("connect A");
    let pid_a = scalar(&a, "SELECT pg_backend_pid()").await;
    within(
        "A writes",
        a.batch_execute("BEGIN; INSERT INTO t VALUES (42)"),
    )
    .await
    .expect("A writes");
    a_conn.abort();
    drop(a);

    // B gets the same (only) server connection: rolled back, no transaction open.
    let (mut b, _, _) = Raw::login(env.addr(), false, USER, PASSWORD, DB).await;
    let m = b.query("SELECT pg_backend_pid()").await;
    assert_eq!(
        rows(&m)[0][0].as_deref(),
        Some(pid_a.as_str()),
        "the same server"
    );
    let m = b.query("BEGIN").await;
    assert_eq!(
        tags(&m),
        "CZ",
        "no 'there is already a transaction in progress' notice: {m:?}"
    );
    let m = b
        .query("SELECT count(*), txid_current_if_assigned() IS NULL FROM t WHERE a = 42")
        .await;
    assert_eq!(
        rows(&m),
        vec![vec![Some("0".to_owned()), Some("t".to_owned())]]
    );
    assert_eq!(tags(&b.query("COMMIT").await), "CZ");
    drop(b);

    // A leaves politely (Terminate) in the middle of a transaction: rolled back too.
    let a = env.client().await;
    within(
        "A writes",
        a.batch_execute("BEGIN; INSERT INTO t VALUES (44)"),
    )
    .await
    .expect("A writes");
    drop(a);
    let (mut b, _, _) = Raw::login(env.addr(), false, USER, PASSWORD, DB).await;
    let m = b
        .query("SELECT count(*), txid_current_if_assigned() IS NULL FROM t")
        .await;
    assert_eq!(
        rows(&m),
        vec![vec![Some("0".to_owned()), Some("t".to_owned())]]
    );
    drop(b);

    // A vanishes with a query running inside its transaction: cancelled, closed, rolled back.
    let (a, a_conn) = within(
        "connect A",
        connect_with_task(&env.sluice, USER, PASSWORD, DB),
    )
    .await
    .expect("connect A");
    let a = Arc::new(a);
    let sleeper = {
        let a = a.clone();
        tokio::spawn(async move {
            let _ = a
                .batch_execute("BEGIN; INSERT INTO t VALUES (43); SELECT pg_sleep(30)")
                .await;
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    a_conn.abort();
    let c = env.client().await;
    assert_eq!(scalar(&c, "SELECT count(*) FROM t").await, "0");
    assert_eq!(
        scalar(&c, "SELECT txid_current_if_assigned() IS NULL").await,
        "t"
    );
    sleeper.abort();
    // PostgreSQL ends the old backend (cancelled, then its connection closed).
    within("old backend gone", async {
        loop {
            if env.backends(&su).await <= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // A client killed mid-COPY FROM STDIN: nothing committed, the next client is fine.
    let (a, a_conn) = within(
        "connect A",
        connect_with_task(&env.sluice, USER, PASSWORD, DB),
    )
    .await
    .expect("connect A");
    let sink = within("copy_in", a.copy_in("COPY c FROM STDIN"))
        .await
        .expect("copy_in");
    futures_util::pin_mut!(sink);
    within("copy rows", sink.send(Bytes::from(copy_rows(0..20_000))))
        .await
        .expect("send");
    within("flush", sink.flush()).await.expect("flush");
    tokio::time::sleep(Duration::from_millis(200)).await;
    a_conn.abort();
    let c2 = env.client().await;
    assert_eq!(scalar(&c2, "SELECT count(*) FROM c").await, "0");
    within(
        "write after",
        c2.batch_execute("INSERT INTO c VALUES (1, 'x')"),
    )
    .await
    .expect("next client writes");
    assert_eq!(scalar(&c, "SELECT count(*) FROM c").await, "1");
    drop(a);
}

// ---------------------------------------------------------------------------------------------
// 13. Server death.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backends_are_replaced_or_reported() {
    let env = env(2, 2, |c| c.wait_timeout = Duration::from_secs(30)).await;
    let su = env.superuser().await;
    let c = env.client().await;
    let pid = scalar(&c, "SELECT pg_backend_pid()").await;

    // Killed while idle in the pool: the next query gets a fresh server transparently.
    let killed = scalar(&su, &format!("SELECT pg_terminate_backend({pid}, 10000)")).await;
    assert_eq!(killed, "t");
    let pid2 = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(pid2, pid);
    assert_eq!(scalar(&c, "SELECT 'replaced'").await, "replaced");

    // Killed while running a query: the client gets an error, not a hang.
    let c = Arc::new(c);
    let running = {
        let c = c.clone();
        tokio::spawn(async move { c.simple_query("SELECT pg_sleep(5)").await.map(|_| ()) })
    };
    within("query running", async {
        loop {
            let n = scalar(
                &su,
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = '{USER}' \
                     AND query LIKE 'SELECT pg_sleep(5)%' AND state = 'active'"
                ),
            )
            .await;
            if n == "1" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    scalar(
        &su,
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE usename = '{USER}' AND state = 'active'"
        ),
    )
    .await;
    let r = within_for(Duration::from_secs(4), "killed query ends", running)
        .await
        .expect("task");
    let e = r.expect_err("query on a killed backend fails");
    assert!(
        ["57P01", "08006"].contains(&code(&e).as_str()) || e.is_closed(),
        "unexpected error: {e}"
    );
    // A new connection works.
    let fresh = env.client().await;
    assert_eq!(scalar(&fresh, "SELECT 'fresh'").await, "fresh");
}

/// The SQLSTATE of the error that ends `conn` within `limit` (the server's FATAL message).
async fn ending_code(conn: ConnTask, limit: Duration, what: &str) -> String {
    let ended = within_for(limit, what, conn).await.expect("task");
    let e = ended.expect_err("the connection ends with an error");
    code(&e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_and_shutdown_end_idle_sessions() {
    let env = env(4, 4, |c| c.client_idle_timeout = Duration::from_secs(2)).await;
    // An idle client is disconnected with 57P05 once idle past client_idle_timeout.
    let (idle, idle_conn) = within(
        "connect",
        connect_with_task(&env.sluice, USER, PASSWORD, DB),
    )
    .await
    .expect("connect");
    assert_eq!(scalar(&idle, "SELECT 1").await, "1");
    // A client that keeps working is not, though it has been connected longer than that.
    let busy = env.client().await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        assert_eq!(scalar(&busy, "SELECT 2").await, "2");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let sqlstate = ending_code(
        idle_conn,
        Duration::from_secs(10),
        "idle client disconnected",
    )
    .await;
    assert_eq!(sqlstate, "57P05");
    assert!(idle.is_closed());
    assert_eq!(scalar(&busy, "SELECT 3").await, "3");

    // Shutdown ends an idle session at once (57P01), without waiting for the drain timeout.
    let (_waiting, waiting_conn) = within(
        "connect",
        connect_with_task(&env.sluice, USER, PASSWORD, DB),
    )
    .await
    .expect("connect");
    env.sluice.shutdown.cancel();
    let sqlstate = ending_code(
        waiting_conn,
        Duration::from_secs(5),
        "idle told of shutdown",
    )
    .await;
    assert_eq!(sqlstate, "57P01");
}
