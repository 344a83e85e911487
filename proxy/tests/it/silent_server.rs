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

const USER: &str = "silent_app";
const PASSWORD: &str = "silent-pw";
const DB: &str = "silent_db";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_noticed_mid_query_and_in_the_pool() {
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
    // The defaults are what is tested.
    let cfg = Config::load(None, &o).expect("config");
    let sluice = sluice::start(cfg).await.expect("sluice starts");

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
    assert_eq!(
        mid.code().map(|c| c.code()),
        Some("08006"),
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
