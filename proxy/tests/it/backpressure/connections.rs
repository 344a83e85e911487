//! The client connection cap, the connect limiter and the warm pool.

use super::*;

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
    let err = match within_secs(30, "6th connect", connect(&h, USER, PASSWORD, DB)).await {
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
        within_secs(
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
        match within_secs(30, "reconnect", connect(&h, USER, PASSWORD, DB)).await {
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
    within_secs(
        10,
        "query on the replacement",
        replacement.simple_query("SELECT 1"),
    )
    .await
    .expect("replacement client works");
    clients.push(replacement);
    // And the cap still holds.
    let again = within_secs(
        30,
        "connect over the cap again",
        connect(&h, USER, PASSWORD, DB),
    )
    .await;
    assert!(again.is_err(), "a 6th client got in after the replacement");
    drop(clients);
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
        match within_secs(60, "storm client", t).await.expect("task") {
            Ok(None) => served += 1,
            Ok(Some(refusal)) => refused.push(refusal),
            Err(e) => failed.push(e),
        }
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (connecting, total) = within_secs(10, "watcher", watch).await.expect("watcher");
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
    within_secs(10, "query", c.simple_query("SELECT 1"))
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
