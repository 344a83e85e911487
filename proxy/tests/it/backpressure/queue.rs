//! The bounded queue, and non-fatal rejections a client can retry on the same connection
//! (simple and extended protocol).

use super::*;

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
    let err = within_secs(30, "the 51st request", extra.simple_query("SELECT 1"))
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
        within_secs(10, "COMMIT", c.batch_execute("COMMIT"))
            .await
            .expect("holder commits");
    }
    for t in tasks {
        let (_c, r) = within_secs(60, "queued client", t).await.expect("task");
        let r = r.expect("a queued client got no answer within 30 s");
        r.unwrap_or_else(|e| panic!("a queued client failed: {}", describe(&e)));
    }
    // The refused client's connection is intact.
    within_secs(10, "retry", extra.simple_query("SELECT 1"))
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
    let err = within_secs(
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
    let err = within_secs(30, "second request", client.simple_query("SELECT 2"))
        .await
        .expect_err("executed although the only connection was held");
    assert_rejection(&err, "wait_timeout");

    within_secs(10, "COMMIT", hold.batch_execute("COMMIT"))
        .await
        .expect("holder commits");
    let rows = within_secs(10, "retry", client.simple_query("SELECT 41 + 1"))
        .await
        .unwrap_or_else(|e| panic!("retry on the same connection: {}", describe(&e)));
    let value = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("42"));
    // A transaction works too.
    within_secs(
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
    let hold =
        crate::support::hold_the_only_connection(h.local_addr.port(), USER, PASSWORD, DB).await;
    let client = through(&h).await;

    // Parse/Bind/Describe/Execute/Sync with an unnamed statement, in one request.
    let typed = || client.query_typed("SELECT $1::int4 + 1", &[(&41i32, Type::INT4)]);
    let err = within_secs(30, "typed query while held", typed())
        .await
        .expect_err("executed although the only connection was held");
    assert_rejection(&err, "queue_full");
    assert!(!client.is_closed());

    // A prepared statement: its Parse/Describe/Sync is refused.
    let err = within_secs(
        30,
        "prepared query while held",
        client.query("SELECT $1::int4 * 2", &[&21i32]),
    )
    .await
    .expect_err("executed although the only connection was held");
    assert_rejection(&err, "queue_full");

    // Two pipelined extended requests: each is refused on its own.
    let (a, b) = within_secs(30, "pipelined while held", async {
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

    within_secs(10, "COMMIT", hold.batch_execute("COMMIT"))
        .await
        .expect("holder commits");
    // The holder's connection goes back to the pool just after its COMMIT is answered, so the
    // first request after it may still meet max_waiting 0: retried, as the error says.
    let rows = within_secs(10, "typed query after", async {
        loop {
            match typed().await {
                Err(e) if e.code().map(|c| c.code()) == Some("53300") => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => return other,
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("typed query after the rejection: {}", describe(&e)));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), 42);
    // (Budget 1: the prepared statement runs on the server it was prepared on.)
    let rows = within_secs(
        10,
        "prepared query after",
        client.query("SELECT $1::int4 * 2", &[&21i32]),
    )
    .await
    .unwrap_or_else(|e| panic!("prepared query after the rejection: {}", describe(&e)));
    assert_eq!(rows[0].get::<_, i32>(0), 42);
    let (a, b) = within_secs(30, "pipelined after", async {
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
        within_secs(10, "BEGIN", c.batch_execute("BEGIN"))
            .await
            .expect("BEGIN");
    }
    for c in &clients[..20] {
        within_secs(10, "COMMIT", c.batch_execute("COMMIT"))
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
        let (sent, done, r) = within_secs(60, "client", t).await.expect("task");
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
