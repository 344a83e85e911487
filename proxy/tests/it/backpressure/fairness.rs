//! Fairness between groups, and per-group caps.

use super::*;

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
                ..Default::default()
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
        let c = within_secs(30, "connect A", connect_port(port, USER)).await;
        a_clients.push(c.unwrap_or_else(|e| panic!("connect A: {}", describe(&e))));
    }
    let mut b_clients = Vec::new();
    for _ in 0..B_CLIENTS {
        let c = within_secs(30, "connect B", connect_port(port, OTHER)).await;
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
        let (waits, failures) = within_secs(120, "B client", t).await.expect("B task");
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
        let (done, rejected) = within_secs(120, "A client", t)
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
        within_secs(60, "capped client", task)
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
