//! The load generator against a harness PostgreSQL, directly and through Sluice: counts add up,
//! nothing acknowledged is lost through Sluice, and planted losses are detected.

use std::time::Duration;

use sluice_loadtest::{
    plant_duplicate_writes, run, verify, LoadtestError, Model, Profile, RunOptions, Workload,
};

use crate::pg::{PgOptions, PgServer};
use crate::proxy::start_sluice;
use crate::support::pg_with_user;

/// A server with a user and database for the load, and its direct URL.
fn server() -> (PgServer, String) {
    let opts = PgOptions {
        max_connections: 30,
        ..Default::default()
    };
    let pg = pg_with_user(opts, "lt", "lt-pw", "ltdb");
    let url = pg.url("lt", "lt-pw", "ltdb");
    (pg, url)
}

fn proxy_url(h: &sluice::Handle) -> String {
    format!("postgres://lt:lt-pw@127.0.0.1:{}/ltdb", h.local_addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_run_then_planted_loss_is_detected() {
    let (pg, url) = server();
    let sluice = start_sluice(&pg, "lt", "lt-pw", "ltdb", 10, 10, |_| {}).await;
    let mut opts = RunOptions::new(proxy_url(&sluice))
        .with_profile(Profile::Constant {
            rate: 100.0,
            duration: Duration::from_secs(1),
        })
        .with_workload(Workload::Write);
    opts.setup = true;
    opts.verify = false; // verify by hand below, after tampering
    let mut report = run(&opts).await.expect("run");
    let c = &report.counts;
    assert_eq!(c.succeeded + c.failed, c.invocations);
    assert_eq!(c.invocations, 100);
    assert_eq!(report.acked_writes.len() as u64, c.succeeded);

    let clean = verify(&url, &report).await.expect("verify");
    assert_eq!((clean.lost, clean.duplicated), (0, 0), "{clean:?}");

    // Delete one acknowledged row behind the load generator's back, the
    // way a test through the proxy would plant a lost write.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let victim = report.acked_writes[0] as i64;
    let deleted = client
        .execute(
            "DELETE FROM sluice_lt_writes WHERE run_id = $1 AND seq = $2",
            &[&report.run_id, &victim],
        )
        .await
        .expect("delete");
    assert_eq!(deleted, 1);
    plant_duplicate_writes(&url, &report, 2).await.expect("dup");

    let v = verify(&url, &report).await.expect("verify");
    assert_eq!(v.lost, 1);
    assert_eq!(v.duplicated, 2);
    report.set_verification(v);
    assert!(report.data_loss());
    assert_eq!(report.counts.lost, 1);
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["counts"]["duplicated"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_burst_counts_add_up() {
    let (pg, url) = server();
    let sluice = start_sluice(&pg, "lt", "lt-pw", "ltdb", 10, 10, |_| {}).await;
    let mut opts = RunOptions::new(proxy_url(&sluice))
        .with_profile(Profile::Burst {
            size: 200,
            window: Duration::from_millis(200),
            bursts: 2,
            interval: Duration::from_millis(500),
        })
        .with_model(Model::Warm {
            prewarm: 5,
            max_uses: 0,
        })
        .with_workload(Workload::Mixed { write_ratio: 0.5 });
    opts.setup = true;
    opts.verify_url = Some(url);
    let report = run(&opts).await.expect("run");
    let c = &report.counts;
    assert_eq!(c.invocations, 400);
    assert_eq!(c.succeeded + c.failed, c.invocations);
    let v = report.verification.as_ref().expect("verified");
    assert_eq!((v.lost, v.duplicated), (0, 0), "{v:?}");
}

#[tokio::test]
async fn unreachable_target_is_a_clear_error() {
    // Port 1 on loopback: nothing listens there.
    let opts = RunOptions::new("postgres://postgres@127.0.0.1:1/postgres");
    match run(&opts).await {
        Err(LoadtestError::Connect { reason, .. }) => {
            assert!(reason.contains("refused"), "{reason}")
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

/// The same cold write burst directly and through Sluice (`--compare`): both reports add up,
/// and nothing acknowledged through Sluice is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_burst_direct_and_through_sluice() {
    let (pg, url) = server();
    let sluice = start_sluice(&pg, "lt", "lt-pw", "ltdb", 10, 10, |_| {}).await;
    let mut opts = RunOptions::new(url.clone())
        .with_profile(Profile::Burst {
            size: 60,
            window: Duration::from_millis(300),
            bursts: 1,
            interval: Duration::from_millis(100),
        })
        .with_model(Model::Cold)
        .with_workload(Workload::Write);
    opts.setup = true;
    let cmp =
        sluice_loadtest::compare(&opts, &url, &proxy_url(&sluice), Duration::from_millis(200))
            .await
            .expect("compare");
    for r in [&cmp.direct, &cmp.proxy] {
        let c = &r.counts;
        assert_eq!(c.invocations, 60);
        assert_eq!(c.succeeded + c.failed, c.invocations);
    }
    let v = cmp.proxy.verification.as_ref().expect("verified");
    assert_eq!((v.lost, v.duplicated), (0, 0), "{v:?}");
    assert_eq!(
        cmp.proxy.counts.succeeded, 60,
        "every invocation through Sluice succeeds"
    );
}

/// Shed requests carry a retry delay in their HINT; the load generator's retries wait at least
/// that long (counted as hinted), unless told to ignore it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_honour_the_hinted_delay() {
    let (pg, _) = server();
    // One connection and room for one waiter: a burst is mostly shed with queue_full.
    let sluice = start_sluice(&pg, "lt", "lt-pw", "ltdb", 1, 1, |c| c.max_waiting = 1).await;
    let burst = |honour_hint: bool| {
        let mut opts = RunOptions::new(proxy_url(&sluice))
            .with_profile(Profile::Burst {
                size: 40,
                window: Duration::from_millis(50),
                bursts: 1,
                interval: Duration::from_millis(100),
            })
            .with_model(Model::Warm {
                prewarm: 40,
                max_uses: 0,
            })
            .with_workload(Workload::Slow {
                sleep: Duration::from_millis(20),
            });
        opts.retry.max_attempts = 3;
        opts.retry.honour_hint = honour_hint;
        opts.progress = false;
        opts
    };
    let honoured = run(&burst(true)).await.expect("run");
    let c = &honoured.counts;
    assert!(
        c.retries > 0,
        "a burst of 40 on one connection is shed: {c:?}"
    );
    assert!(c.by_error.keys().all(|k| k == "53300"), "{c:?}");
    assert_eq!(
        c.retries_hinted, c.retries,
        "every shed request had a hint: {c:?}"
    );
    let ignored = run(&burst(false)).await.expect("run");
    let c = &ignored.counts;
    assert!(c.retries > 0, "{c:?}");
    assert_eq!(c.retries_hinted, 0, "{c:?}");
}
