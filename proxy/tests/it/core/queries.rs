//! Simple and extended queries and transactions, errors in transactions and pipelines,
//! large results and requests, and session pooling, through Sluice.

use super::*;

// ---------------------------------------------------------------------------------------------
// 1. Queries and transactions.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_extended_and_multi_round_trip_transactions() {
    let env = env(4, 2, |_| {}).await;
    env.setup("CREATE TABLE items (id int8 PRIMARY KEY, name text, data bytea, note text)")
        .await;
    let a = env.client().await;

    // Simple query protocol, several statements in one message.
    let msgs = within(
        "simple",
        a.simple_query("SELECT 1 AS one; SELECT 'two', NULL"),
    )
    .await
    .expect("simple query");
    let rows: Vec<Vec<Option<String>>> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            vec![Some("1".to_owned())],
            vec![Some("two".to_owned()), None]
        ]
    );

    // Extended protocol with parameters of several types, binary results.
    let bytes: Vec<u8> = (0..=255).collect();
    let none: Option<String> = None;
    let row = within(
        "params",
        a.query_one(
            "SELECT $1::text, $2::int8, $3::bytea, $4::text IS NULL, $2::int8 * 2",
            &[&"héllo, 'world'", &(i64::MAX / 4), &bytes, &none],
        ),
    )
    .await
    .expect("query with parameters");
    assert_eq!(row.get::<_, String>(0), "héllo, 'world'");
    assert_eq!(row.get::<_, i64>(1), i64::MAX / 4);
    assert_eq!(row.get::<_, Vec<u8>>(2), bytes);
    assert!(row.get::<_, bool>(3));
    assert_eq!(row.get::<_, i64>(4), (i64::MAX / 4) * 2);

    // Parameters in writes, read back.
    for i in 0..5i64 {
        let name = format!("item-{i}");
        let data = vec![i as u8; 10];
        let note: Option<&str> = (i % 2 == 0).then_some("even");
        let n = within(
            "insert",
            a.execute(
                "INSERT INTO items VALUES ($1, $2, $3, $4)",
                &[&i, &name, &data, &note],
            ),
        )
        .await
        .expect("insert");
        assert_eq!(n, 1);
    }
    let rows = within(
        "select",
        a.query(
            "SELECT id, name, data, note FROM items WHERE id >= $1 ORDER BY id",
            &[&1i64],
        ),
    )
    .await
    .expect("select");
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[1].get::<_, String>(1), "item-2");
    assert_eq!(rows[1].get::<_, Vec<u8>>(2), vec![2u8; 10]);
    assert_eq!(rows[1].get::<_, Option<String>>(3).as_deref(), Some("even"));
    assert_eq!(rows[2].get::<_, Option<String>>(3), None);

    // Unnamed statements (one round trip: Parse/Bind/Execute/Sync).
    let row = within(
        "query_typed",
        a.query_typed(
            "SELECT $1 || '!', $2 + 1",
            &[(&"hey", Type::TEXT), (&41i64, Type::INT8)],
        ),
    )
    .await
    .expect("query_typed");
    assert_eq!(row[0].get::<_, String>(0), "hey!");
    assert_eq!(row[0].get::<_, i64>(1), 42);

    // A transaction over several round trips; pool_size 2 so another client can still read.
    let b = env.client().await;
    within("BEGIN", a.batch_execute("BEGIN"))
        .await
        .expect("BEGIN");
    within(
        "insert in tx",
        a.execute(
            "INSERT INTO items (id, name) VALUES ($1, $2)",
            &[&100i64, &"in-tx"],
        ),
    )
    .await
    .expect("insert in transaction");
    let seen: i64 = within(
        "read own write",
        a.query_one("SELECT count(*) FROM items WHERE id = $1", &[&100i64]),
    )
    .await
    .expect("select in transaction")
    .get(0);
    assert_eq!(seen, 1, "the transaction sees its own insert");
    assert_eq!(
        scalar(&b, "SELECT count(*) FROM items WHERE id = 100").await,
        "0",
        "uncommitted insert invisible to another client"
    );
    within("COMMIT", a.batch_execute("COMMIT"))
        .await
        .expect("COMMIT");
    assert_eq!(
        scalar(&b, "SELECT count(*) FROM items WHERE id = 100").await,
        "1"
    );
    let d = env.direct().await;
    assert_eq!(
        scalar(&d, "SELECT name FROM items WHERE id = 100").await,
        "in-tx",
        "committed through Sluice, visible directly"
    );
}

/// Transaction pooling with fewer servers than clients: a client holds a server for a whole
/// transaction (others wait), and idle clients hold none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_share_servers_per_transaction() {
    let env = env(1, 1, |c| c.wait_timeout = Duration::from_secs(30)).await;
    env.setup("CREATE TABLE t (a int)").await;
    let a = env.client().await;
    let b = env.client().await;
    let c = env.client().await;
    // Three clients, one server: idle clients hold nothing, so all of them can take turns.
    for i in 0..5 {
        for cl in [&a, &b, &c] {
            assert_eq!(scalar(cl, &format!("SELECT {i}")).await, i.to_string());
        }
    }
    let pid_a = scalar(&a, "SELECT pg_backend_pid()").await;
    let pid_b = scalar(&b, "SELECT pg_backend_pid()").await;
    assert_eq!(pid_a, pid_b, "one server connection, shared");

    // A open transaction holds the server: B's query waits for COMMIT and then sees the row.
    within("BEGIN", a.batch_execute("BEGIN; INSERT INTO t VALUES (1)"))
        .await
        .expect("BEGIN");
    let waiting = tokio::spawn(async move { scalar(&b, "SELECT count(*) FROM t").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "B waits while A's transaction holds the only server"
    );
    within(
        "COMMIT",
        a.batch_execute("INSERT INTO t VALUES (2); COMMIT"),
    )
    .await
    .expect("COMMIT");
    let count = within("B's query", waiting).await.expect("task");
    assert_eq!(count, "2", "B ran after A committed");

    // Unnamed extended-protocol statements from many clients interleave fine.
    let clients: Vec<Client> = future::join_all((0..6).map(|_| env.client())).await;
    let work = clients.iter().enumerate().map(|(k, cl)| async move {
        for i in 0..10i64 {
            let r = cl
                .query_typed(
                    "SELECT $1 * 1000 + $2",
                    &[(&(k as i64), Type::INT8), (&i, Type::INT8)],
                )
                .await
                .map_err(|e| code(&e))?;
            assert_eq!(r[0].get::<_, i64>(0), k as i64 * 1000 + i);
        }
        Ok::<_, String>(())
    });
    for r in within("interleaved queries", future::join_all(work)).await {
        r.expect("query through a shared server");
    }
}

/// tokio-postgres' `query(&str, ..)` prepares a *named* statement (Parse "s0", Describe, Sync) in
/// one request and binds it in the next. In transaction pooling the two requests may land on
/// different server connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_prepared_statements_survive_server_switches() {
    let env = env(2, 2, |c| c.wait_timeout = Duration::from_secs(30)).await;
    let a = env.client().await;
    let b = env.client().await;
    // A prepares on server X, which goes back to the pool (LIFO: X is next out).
    let st = within("prepare", a.prepare("SELECT $1::int8 * 2"))
        .await
        .expect("prepare");
    // B's transaction takes X.
    within("B BEGIN", b.batch_execute("BEGIN"))
        .await
        .expect("B BEGIN");
    // A's Bind goes to another server, where "s0" was never parsed.
    let r = within("A executes its statement", a.query_one(&st, &[&21i64])).await;
    within("B COMMIT", b.batch_execute("COMMIT"))
        .await
        .expect("B COMMIT");
    match r {
        Ok(row) => assert_eq!(row.get::<_, i64>(0), 42),
        Err(e) => panic!(
            "prepared statement unusable after the server switched: {} {e}",
            code(&e)
        ),
    }
    // The same with two clients whose statements share a name: both call theirs "s0".
    let c = env.client().await;
    let st_c = within("prepare c", c.prepare("SELECT $1::text"))
        .await
        .expect("C prepares its s0 where A's s0 may already exist");
    let r = within("C executes", c.query_one(&st_c, &[&"c"]))
        .await
        .expect("C executes");
    assert_eq!(r.get::<_, String>(0), "c");

    // Many clients, two servers: statements prepared once and reused, and per-call ones.
    let clients: Vec<Client> = future::join_all((0..8).map(|_| env.client())).await;
    let work = clients.iter().enumerate().map(|(k, cl)| async move {
        let k = k as i64;
        let add = cl
            .prepare("SELECT $1::int8 + $2::int8")
            .await
            .map_err(|e| describe(&e))?;
        let text = cl
            .prepare("SELECT $1::text || '-' || $2::int8")
            .await
            .map_err(|e| describe(&e))?;
        for i in 0..20i64 {
            let a: i64 = cl
                .query_one(&add, &[&k, &i])
                .await
                .map_err(|e| describe(&e))?
                .get(0);
            let t: String = cl
                .query_one(&text, &[&"c", &k])
                .await
                .map_err(|e| describe(&e))?
                .get(0);
            let once: i64 = cl
                .query_one("SELECT $1::int8 * 2", &[&i])
                .await
                .map_err(|e| describe(&e))?
                .get(0);
            if (a, t.as_str(), once) != (k + i, format!("c-{k}").as_str(), i * 2) {
                return Err(format!("client {k}: wrong answers {a} {t} {once}"));
            }
        }
        Ok::<_, String>(())
    });
    for r in within("named statements under contention", future::join_all(work)).await {
        r.expect("named statements under contention");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Errors.

/// Runs four pipelined queries (the second divides by zero) with named statements and with
/// unnamed ones, outside and inside a transaction block; returns what each one gave.
async fn pipeline_outcomes(c: &Client) -> Vec<Result<i64, String>> {
    let qs: [(&str, i64); 4] = [
        ("SELECT $1::int8 + 0", 1),
        ("SELECT 10 / $1::int8", 0),
        ("SELECT $1::int8 * 3", 3),
        ("SELECT $1::int8 - 1", 5),
    ];
    let mut out = Vec::new();
    for in_tx in [false, true] {
        if in_tx {
            c.batch_execute("BEGIN").await.expect("BEGIN");
        }
        // Prepared first, one at a time: the executions then go out in order, on their first
        // poll, whatever the timing of the prepares' answers.
        let mut prepared = Vec::new();
        for (sql, v) in &qs {
            prepared.push((within("prepare", c.prepare(sql)).await.expect("prepare"), v));
        }
        let named = prepared.iter().map(|(stmt, v)| async move {
            c.query_one(stmt, &[*v])
                .await
                .map(|r| r.get::<_, i64>(0))
                .map_err(|e| code(&e))
        });
        out.extend(within("pipelined named", future::join_all(named)).await);
        if in_tx {
            c.batch_execute("ROLLBACK").await.expect("ROLLBACK");
            c.batch_execute("BEGIN").await.expect("BEGIN");
        }
        let unnamed = qs.iter().map(|(sql, v)| async move {
            c.query_typed(sql, &[(v, Type::INT8)])
                .await
                .map(|r| r[0].get::<_, i64>(0))
                .map_err(|e| code(&e))
        });
        out.extend(within("pipelined unnamed", future::join_all(unnamed)).await);
        if in_tx {
            c.batch_execute("ROLLBACK").await.expect("ROLLBACK");
        }
        // The connection is usable after the batch.
        assert_eq!(scalar(c, "SELECT 7").await, "7");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_in_transactions_and_pipelines() {
    let env = env(4, 2, |_| {}).await;
    env.setup("CREATE TABLE t (a int PRIMARY KEY)").await;
    let c = env.client().await;

    // An error inside a transaction: the transaction is aborted until ROLLBACK.
    within("BEGIN", c.batch_execute("BEGIN; INSERT INTO t VALUES (1)"))
        .await
        .expect("BEGIN");
    let e = within("dup", c.batch_execute("INSERT INTO t VALUES (1)"))
        .await
        .expect_err("duplicate key");
    assert_eq!(code(&e), "23505");
    let e = within("aborted", c.simple_query("SELECT 1"))
        .await
        .expect_err("transaction is aborted");
    assert_eq!(code(&e), "25P02");
    within("ROLLBACK", c.batch_execute("ROLLBACK"))
        .await
        .expect("ROLLBACK");
    assert_eq!(scalar(&c, "SELECT count(*) FROM t").await, "0");
    // Errors outside a transaction (parse error, runtime error) leave the connection usable.
    let e = within("syntax", c.simple_query("SELEC 1"))
        .await
        .expect_err("syntax error");
    assert_eq!(code(&e), "42601");
    let e = within("div", c.query("SELECT 1 / $1::int", &[&0i32]))
        .await
        .expect_err("division by zero");
    assert_eq!(code(&e), "22012");
    assert_eq!(scalar(&c, "SELECT 2").await, "2");

    // An error mid pipelined batch: the same outcome as against PostgreSQL directly.
    let through = pipeline_outcomes(&c).await;
    let direct = pipeline_outcomes(&env.direct().await).await;
    assert_eq!(
        through, direct,
        "pipelined batch through Sluice vs directly"
    );
    // Sanity: the batch did fail somewhere, and succeed elsewhere.
    assert!(through.iter().any(|r| r.is_err()) && through.iter().any(|r| r.is_ok()));
}

// ---------------------------------------------------------------------------------------------
// 4. Large results and requests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_and_requests() {
    let env = env(4, 2, |_| {}).await;
    let c = env.client().await;

    // ≥ 50 MB of result, streamed row by row.
    let stream = within(
        "large result",
        c.query_raw(
            "SELECT repeat('x', 1000) FROM generate_series(1, 60000)",
            std::iter::empty::<i32>(),
        ),
    )
    .await
    .expect("query_raw");
    futures_util::pin_mut!(stream);
    let (mut n, mut bytes) = (0u64, 0u64);
    within("read the large result", async {
        while let Some(row) = stream.try_next().await.expect("row") {
            let s: &str = row.get(0);
            assert!(s.len() == 1000 && s.bytes().all(|b| b == b'x'));
            n += 1;
            bytes += s.len() as u64;
        }
    })
    .await;
    assert_eq!((n, bytes), (60_000, 60_000_000));

    // The same through the simple protocol.
    let msgs = within(
        "large simple result",
        c.simple_query("SELECT repeat('y', 1000) FROM generate_series(1, 55000)"),
    )
    .await
    .expect("simple query");
    let total: usize = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).expect("value").len()),
            _ => None,
        })
        .sum();
    assert_eq!(total, 55_000_000);

    // Requests larger than Sluice's request buffer: a 3 MB Query and a 5 MB Bind parameter.
    let big = "z".repeat(3 << 20);
    assert_eq!(
        scalar(&c, &format!("SELECT length('{big}')")).await,
        (3 << 20).to_string()
    );
    let param = "w".repeat(5 << 20);
    let r = within(
        "large bind",
        c.query_typed("SELECT length($1), md5($1)", &[(&param, Type::TEXT)]),
    )
    .await
    .expect("large parameter");
    assert_eq!(r[0].get::<_, i32>(0), 5 << 20);
    let d = env.direct().await;
    let md5: String = d
        .query_typed("SELECT md5($1)", &[(&param, Type::TEXT)])
        .await
        .expect("direct md5")[0]
        .get(0);
    assert_eq!(r[0].get::<_, String>(1), md5);
    assert_eq!(scalar(&c, "SELECT 'still fine'").await, "still fine");
}

// ---------------------------------------------------------------------------------------------
// 12. Session pooling.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_keeps_state_per_client() {
    let env = env(2, 2, |c| {
        c.databases.get_mut(DB).expect("database").pool_mode = Some(PoolMode::Session);
        c.wait_timeout = Duration::from_secs(30);
    })
    .await;
    let a = env.client().await;
    let b = env.client().await;
    within("SET", a.batch_execute("SET work_mem = '7MB'"))
        .await
        .expect("SET");
    let pid_a = scalar(&a, "SELECT pg_backend_pid()").await;
    for _ in 0..3 {
        within("tx", a.batch_execute("BEGIN; SELECT 1; COMMIT"))
            .await
            .expect("transaction");
        assert_eq!(scalar(&b, "SELECT 1").await, "1");
        assert_eq!(scalar(&a, "SHOW work_mem").await, "7MB", "SET persists");
        assert_eq!(scalar(&a, "SELECT pg_backend_pid()").await, pid_a);
    }
    within(
        "temp table",
        a.batch_execute("CREATE TEMP TABLE mine (a int)"),
    )
    .await
    .expect("temp table");
    let pid_b = scalar(&b, "SELECT pg_backend_pid()").await;
    assert_ne!(pid_a, pid_b, "two clients never share a server at once");
    assert_eq!(
        scalar(&b, "SHOW work_mem").await,
        "4MB",
        "B has its own session"
    );
    // Prepared statements live for the session.
    let st = within("prepare", a.prepare("SELECT $1::int8 + 1"))
        .await
        .expect("prepare");
    assert_eq!(b.simple_query("SELECT 2").await.map(|_| ()).ok(), Some(()));
    let v: i64 = within("execute", a.query_one(&st, &[&1i64]))
        .await
        .expect("execute")
        .get(0);
    assert_eq!(v, 2);

    // When A leaves, its server is reset before the next client gets it.
    drop(st);
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = env.client().await;
    assert_eq!(
        scalar(&c, "SELECT pg_backend_pid()").await,
        pid_a,
        "A's server reused"
    );
    assert_eq!(scalar(&c, "SHOW work_mem").await, "4MB", "settings reset");
    assert_eq!(
        scalar(&c, "SELECT to_regclass('pg_temp.mine') IS NULL").await,
        "t",
        "temporary table gone"
    );
}
