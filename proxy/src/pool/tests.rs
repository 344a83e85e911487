//! Pool tests over plain values, with tokio's paused clock.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep, Instant};

use super::*;

fn limits(budget: u32) -> Limits {
    Limits {
        budget,
        max_connecting: 100,
        max_waiting: 10_000,
        wait_timeout: Duration::from_secs(5),
        shed_target: Duration::from_secs(60),
        shed_interval: Duration::from_secs(60),
        server_unavailable_timeout: Duration::from_secs(5),
    }
}

/// Fills a lease that needs a connection with a fresh value.
fn ready(mut lease: Lease<u32>, next: &AtomicU32) -> Lease<u32> {
    if lease.needs_connect() {
        lease.fill(next.fetch_add(1, Ordering::Relaxed));
    }
    lease
}

fn check(pools: &Pools<u32>) {
    pools.shared.state.lock().check_invariants();
}

#[tokio::test(start_paused = true)]
async fn budget_holds_under_contention() {
    let pools = Pools::new(limits(10));
    let p1 = pools.pool("db", "a", 8, 0);
    let p2 = pools.pool("db", "b", 8, 0);
    let g = pools.group("g", GroupLimits::default());
    let next = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for i in 0..300u64 {
        let (pools, next, done) = (pools.clone(), next.clone(), done.clone());
        let pool = if i % 3 == 0 { p2 } else { p1 };
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                let lease = ready(pools.acquire(pool, g).await.expect("admitted"), &next);
                check(&pools);
                sleep(Duration::from_millis(1 + i % 7)).await;
                lease.release();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), 1500);
    check(&pools);
    let (total, budget) = pools.totals();
    assert!(total <= budget);
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_order_and_reuse_connections() {
    let pools = Pools::new(limits(1));
    let p = pools.pool("db", "u", 5, 0);
    let g = pools.group("g", GroupLimits::default());
    let next = AtomicU32::new(7);
    let first = ready(pools.acquire(p, g).await.unwrap(), &next);
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..3 {
        let (pools, order) = (pools.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let mut lease = pools.acquire(p, g).await.unwrap();
            order.lock().push((i, *lease.conn().unwrap()));
            lease.release();
        }));
        sleep(Duration::from_millis(1)).await;
    }
    first.release();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock(), vec![(0, 7), (1, 7), (2, 7)]);
}

#[tokio::test(start_paused = true)]
async fn full_queue_rejects_at_once_and_timeout_rejects_later() {
    let mut l = limits(1);
    l.max_waiting = 2;
    let pools = Pools::new(l);
    let p = pools.pool("db", "u", 1, 0);
    let g = pools.group("g", GroupLimits::default());
    let next = AtomicU32::new(0);
    let _held = ready(pools.acquire(p, g).await.unwrap(), &next);
    let w1 = tokio::spawn({
        let pools = pools.clone();
        async move { pools.acquire(p, g).await.map(|_| ()) }
    });
    let w2 = tokio::spawn({
        let pools = pools.clone();
        async move { pools.acquire(p, g).await.map(|_| ()) }
    });
    sleep(Duration::from_millis(10)).await;
    let t0 = Instant::now();
    let err = pools.acquire(p, g).await.unwrap_err();
    assert_eq!(err.reason, Reason::QueueFull);
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert!(err.detail.contains("max_waiting (2)"));
    for w in [w1, w2] {
        assert_eq!(w.await.unwrap().unwrap_err().reason, Reason::WaitTimeout);
    }
    check(&pools);
}

#[tokio::test(start_paused = true)]
async fn an_outage_holds_waiters_up_to_server_unavailable_timeout_with_its_own_reason() {
    let mut l = limits(1);
    l.server_unavailable_timeout = Duration::from_secs(20);
    let pools = Pools::new(l);
    let p = pools.pool("db", "u", 1, 0);
    let g = pools.group("g", GroupLimits::default());
    // The one slot is a session trying to connect through the outage.
    let connecting = pools.acquire(p, g).await.unwrap();
    assert!(pools.set_outage(true));
    assert!(!pools.set_outage(true), "already in an outage");
    let waiter = |pools: Pools<u32>| async move {
        let t0 = Instant::now();
        (pools.acquire(p, g).await.map(|_| ()), t0.elapsed())
    };
    let (err, waited) = waiter(pools.clone()).await;
    assert_eq!(err.unwrap_err().reason, Reason::ServerUnavailable);
    assert_eq!(waited, Duration::from_secs(20), "past wait_timeout (5 s)");
    // The server comes back while one waits: it gets the connection.
    let w = tokio::spawn(waiter(pools.clone()));
    sleep(Duration::from_secs(8)).await;
    assert!(pools.set_outage(false));
    let next = AtomicU32::new(0);
    ready(connecting, &next).release();
    let (got, waited) = w.await.unwrap();
    assert!(got.is_ok());
    assert_eq!(waited, Duration::from_secs(8));
    // No outage: wait_timeout as before.
    let _held = pools.acquire(p, g).await.unwrap();
    let (err, waited) = waiter(pools.clone()).await;
    assert_eq!(err.unwrap_err().reason, Reason::WaitTimeout);
    assert_eq!(waited, Duration::from_secs(5));
    check(&pools);
}

#[tokio::test(start_paused = true)]
async fn waits_through_an_outage_are_not_taken_for_overload() {
    // Shedding as tight as it goes: 10 ms of queueing for 50 ms is overload.
    let mut l = limits(1);
    (l.shed_target, l.shed_interval) = (Duration::from_millis(10), Duration::from_millis(50));
    l.server_unavailable_timeout = Duration::from_secs(20);
    let pools = Pools::new(l);
    let p = pools.pool("db", "u", 1, 0);
    let g = pools.group("g", GroupLimits::default());
    let next = AtomicU32::new(0);
    let connecting = pools.acquire(p, g).await.unwrap();
    pools.set_outage(true);
    let mut queued = Vec::new();
    for _ in 0..20 {
        let pools = pools.clone();
        queued.push(tokio::spawn(async move {
            let lease = pools.acquire(p, g).await?;
            sleep(Duration::from_millis(10)).await;
            lease.release();
            Ok::<_, Rejected>(())
        }));
        sleep(Duration::from_millis(100)).await;
    }
    // Back after 2 s: the requests queued through the outage are served one by one, 10 ms
    // each. Halfway through, their long waits and the outage's silence have said nothing about
    // load: a request arriving then queues behind them (else 2 s of queueing for over 50 ms is
    // overload, and one release in 2 s predicts a wait past wait_timeout).
    pools.set_outage(false);
    ready(connecting, &next).release();
    sleep(Duration::from_millis(100)).await;
    let late = pools.acquire(p, g).await;
    assert!(late.is_ok(), "shed after an outage: {:?}", late.err());
    for q in queued {
        q.await.unwrap().unwrap();
    }
    check(&pools);
}

/// Open-loop overload: arrivals at twice the capacity, for 3 s. Once the queue has stood for
/// `shed_interval`, every request served waited at most 1.5 × `shed_target` (the others are
/// refused as `overload`, at arrival or when their turn comes), and the connection is kept
/// busy: overload costs no throughput.
#[tokio::test(start_paused = true)]
async fn sustained_overload_keeps_admitted_waits_within_one_and_a_half_targets() {
    let mut l = limits(1);
    (l.shed_target, l.shed_interval) = (Duration::from_millis(50), Duration::from_millis(200));
    let pools = Pools::new(l);
    let p = pools.pool("db", "u", 1, 0);
    let g = pools.group("g", GroupLimits::default());
    let next = Arc::new(AtomicU32::new(0));
    let t0 = Instant::now();
    let mut requests = Vec::new();
    // 200 arrivals/s, each holding the one connection for 10 ms (a capacity of 100/s).
    while t0.elapsed() < Duration::from_secs(3) {
        let (pools, next) = (pools.clone(), next.clone());
        requests.push(tokio::spawn(async move {
            let arrived = Instant::now();
            let lease = ready(pools.acquire(p, g).await?, &next);
            let served = (arrived.duration_since(t0), arrived.elapsed());
            sleep(Duration::from_millis(10)).await;
            lease.release();
            Ok::<_, Rejected>(served)
        }));
        sleep(Duration::from_millis(5)).await;
    }
    let (mut served, mut refused) = (Vec::new(), 0);
    for r in requests {
        match r.await.unwrap() {
            Ok(s) => served.push(s),
            Err(r) => {
                assert_eq!(r.reason, Reason::Overload, "{}", r.detail);
                refused += 1;
            }
        }
    }
    let late: Vec<_> = served
        .iter()
        .filter(|(arrived, waited)| {
            *arrived + *waited > Duration::from_millis(250) && *waited > Duration::from_millis(75)
        })
        .collect();
    assert!(late.is_empty(), "served after waiting too long: {late:?}");
    assert!(refused > 0);
    // 3 s at 100/s, less the last requests' drain.
    assert!(served.len() >= 280, "{} served", served.len());
    check(&pools);
}

#[tokio::test(start_paused = true)]
async fn a_lease_knows_how_long_its_connection_lay_idle() {
    let pools = Pools::new(limits(1));
    let p = pools.pool("db", "u", 1, 0);
    let g = pools.group("g", GroupLimits::default());
    let next = AtomicU32::new(1);
    let lease = ready(pools.acquire(p, g).await.unwrap(), &next);
    assert_eq!(lease.idle_for(), Duration::ZERO, "a new connection");
    sleep(Duration::from_secs(3)).await;
    lease.release();
    sleep(Duration::from_secs(7)).await;
    let mut lease = pools.acquire(p, g).await.unwrap();
    assert_eq!(lease.idle_for(), Duration::from_secs(7));
    // Found dead: the slot connects anew, and the new connection has not idled.
    lease.reconnect("dead_on_checkout");
    let lease = ready(lease, &next);
    assert_eq!(lease.idle_for(), Duration::ZERO);
    lease.release();
    check(&pools);
}

#[tokio::test(start_paused = true)]
async fn dropped_lease_discards_and_frees_budget() {
    let pools = Pools::new(limits(1));
    let p = pools.pool("db", "u", 1, 0);
    let g = pools.group("g", GroupLimits::default());
    let next = AtomicU32::new(1);
    drop(ready(pools.acquire(p, g).await.unwrap(), &next));
    assert_eq!(pools.totals().0, 0);
    let lease = pools.acquire(p, g).await.unwrap();
    assert!(
        lease.needs_connect(),
        "a discarded connection is never handed on"
    );
    drop(lease);
    assert_eq!(pools.totals().0, 0, "an unfilled slot is freed too");
}

#[tokio::test(start_paused = true)]
async fn cancelled_waiter_leaves_the_queue() {
    let pools = Pools::new(limits(1));
    let p = pools.pool("db", "u", 1, 0);
    let g = pools.group("g", GroupLimits::default());
    let next = AtomicU32::new(1);
    let held = ready(pools.acquire(p, g).await.unwrap(), &next);
    let _ = tokio::time::timeout(Duration::from_millis(5), pools.acquire(p, g)).await;
    assert_eq!(pools.group_stats()[0].waiting, 0);
    held.release();
    check(&pools);
    assert_eq!(pools.pool_stats()[0].idle, 1);
}

#[tokio::test(start_paused = true)]
async fn idle_connections_of_other_pools_are_evicted_for_waiters() {
    let pools = Pools::new(limits(2));
    let a = pools.pool("db", "a", 2, 0);
    let b = pools.pool("db", "b", 2, 0);
    let g = pools.group("g", GroupLimits::default());
    let next = AtomicU32::new(1);
    let l1 = ready(pools.acquire(a, g).await.unwrap(), &next);
    let l2 = ready(pools.acquire(a, g).await.unwrap(), &next);
    l1.release();
    l2.release();
    // Budget full of idle connections of pool a; pool b still gets one.
    let lb = pools.acquire(b, g).await.unwrap();
    assert!(lb.needs_connect());
    check(&pools);
    assert_eq!(pools.totals().0, 2);
}

#[tokio::test(start_paused = true)]
async fn reserved_group_is_served_first_and_caps_hold() {
    let pools = Pools::new(limits(4));
    let p = pools.pool("db", "u", 4, 0);
    let hot = pools.group(
        "hot",
        GroupLimits {
            max_connections: Some(3),
            ..Default::default()
        },
    );
    let vip = pools.group(
        "vip",
        GroupLimits {
            reserved: 1,
            ..Default::default()
        },
    );
    let next = Arc::new(AtomicU32::new(1));
    // The hot group can never hold more than its cap.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(ready(pools.acquire(p, hot).await.unwrap(), &next));
    }
    let blocked = tokio::time::timeout(Duration::from_millis(10), pools.acquire(p, hot)).await;
    assert!(blocked.is_err(), "group cap of 3 holds");
    // The vip group still has room.
    let v = ready(pools.acquire(p, vip).await.unwrap(), &next);
    // Now everything is busy; queue hot waiters first, then a vip waiter.
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let pools = pools.clone();
        waiters.push(tokio::spawn(async move {
            pools.acquire(p, hot).await.map(|l| l.release())
        }));
    }
    sleep(Duration::from_millis(1)).await;
    let vip_wait = tokio::spawn({
        let pools = pools.clone();
        async move {
            let t0 = Instant::now();
            pools
                .acquire(p, vip)
                .await
                .map(|l| l.release())
                .map(|_| t0.elapsed())
        }
    });
    sleep(Duration::from_millis(1)).await;
    v.release();
    if let Some(l) = held.pop() {
        l.release();
    }
    // The vip waiter, below its reservation, got the first connection freed.
    let waited = vip_wait.await.unwrap().unwrap();
    assert_eq!(waited, Duration::from_millis(1));
    drop(held);
    for w in waiters {
        w.await.unwrap().unwrap();
    }
    check(&pools);
}

#[tokio::test(start_paused = true)]
async fn groups_are_served_round_robin() {
    let pools = Pools::new(limits(1));
    let p = pools.pool("db", "u", 1, 0);
    let a = pools.group("a", GroupLimits::default());
    let b = pools.group("b", GroupLimits::default());
    let next = AtomicU32::new(1);
    let held = ready(pools.acquire(p, a).await.unwrap(), &next);
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    // Ten of group a queue before two of group b.
    for (name, g) in std::iter::repeat_n(("a", a), 10).chain(std::iter::repeat_n(("b", b), 2)) {
        let (pools, order) = (pools.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let lease = pools.acquire(p, g).await.unwrap();
            order.lock().push(name);
            sleep(Duration::from_millis(1)).await;
            lease.release();
        }));
        sleep(Duration::from_micros(10)).await;
    }
    held.release();
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock();
    let b_positions: Vec<_> = order
        .iter()
        .enumerate()
        .filter(|(_, n)| **n == "b")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(b_positions, vec![1, 3], "{order:?}");
}

#[tokio::test(start_paused = true)]
async fn warm_slots_fill_to_min_and_reaper_keeps_it() {
    let pools = Pools::new(limits(5));
    let p = pools.pool("db", "u", 4, 2);
    let next = AtomicU32::new(1);
    let slots = pools.warm_slots();
    assert_eq!(slots.len(), 2);
    for s in slots {
        ready(s, &next).release();
    }
    assert_eq!(pools.pool_stats()[0].idle, 2);
    sleep(Duration::from_secs(100)).await;
    assert!(pools
        .reap(
            Instant::now(),
            Duration::from_secs(10),
            Duration::from_secs(1000)
        )
        .is_empty());
    let g = pools.group("g", GroupLimits::default());
    let extra: Vec<_> = [(); 3].iter().map(|_| ()).collect();
    let mut held = Vec::new();
    for _ in extra {
        held.push(ready(pools.acquire(p, g).await.unwrap(), &next));
    }
    held.into_iter().for_each(Lease::release);
    sleep(Duration::from_secs(100)).await;
    assert_eq!(
        pools
            .reap(
                Instant::now(),
                Duration::from_secs(10),
                Duration::from_secs(1000)
            )
            .len(),
        1
    );
    assert_eq!(
        pools
            .reap(Instant::now(), Duration::ZERO, Duration::from_secs(1))
            .len(),
        2,
        "lifetime ignores min"
    );
    check(&pools);
}

#[tokio::test(start_paused = true)]
async fn a_connect_slot_moves_to_another_pool_within_its_size() {
    let pools = Pools::new(limits(3));
    let verify = pools.pool("db", "", 3, 0);
    let user = pools.pool("db", "u", 1, 0);
    let g = pools.group("g", GroupLimits::default());
    let mut first = pools.acquire(verify, g).await.unwrap();
    assert!(first.move_to(user));
    check(&pools);
    first.fill(7);
    first.release();
    check(&pools);
    // The user's pool holds the connection now: its next lease brings it.
    let mut again = pools.acquire(user, g).await.unwrap();
    assert_eq!(again.conn().copied(), Some(7));
    // Its pool is full: a second verified slot stays where it was.
    let mut second = pools.acquire(verify, g).await.unwrap();
    assert!(!second.move_to(user));
    assert_eq!(second.pool(), verify);
    check(&pools);
    second.fill(8);
    assert!(!second.move_to(user), "a filled lease does not move");
    second.discard();
    again.release();
    check(&pools);
    let stats = pools.pool_stats();
    let held: u32 = stats.iter().map(|s| s.active + s.idle + s.connecting).sum();
    assert_eq!(held, 1, "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn idle_connections_found_gone_are_taken_and_free_their_budget() {
    let pools = Pools::new(limits(2));
    let p = pools.pool("db", "u", 2, 0);
    let g = pools.group("g", GroupLimits::default());
    let next = AtomicU32::new(1);
    let a = ready(pools.acquire(p, g).await.unwrap(), &next);
    let b = ready(pools.acquire(p, g).await.unwrap(), &next);
    a.release();
    b.release();
    let gone = pools.reap_gone(|c| *c == 2);
    assert_eq!(gone, vec![2]);
    check(&pools);
    // The budget it held is free: a second connection can be opened beside the one left.
    let mut kept = ready(pools.acquire(p, g).await.unwrap(), &next);
    let mut new = ready(pools.acquire(p, g).await.unwrap(), &next);
    assert_eq!(
        (kept.conn().copied(), new.conn().copied()),
        (Some(1), Some(3))
    );
}
