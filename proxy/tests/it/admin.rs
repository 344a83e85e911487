//! Observability: /metrics, /healthz, /readyz, the admin console, and a real Prometheus.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::pg::{PgOptions, PgServer};
use crate::proxy::{connect, start_sluice};
use crate::support::pg_with_user;
use crate::support::process::SluiceProcess;

/// A plain HTTP/1.0 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the exposition line `name{labels}` (labels as rendered), or 0 when absent.
pub fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn server(user: &str) -> PgServer {
    let pg = pg_with_user(PgOptions::default(), user, "pw", "obs");
    pg.create_user("ops", "ops-pw");
    pg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_the_test_drives() {
    let pg = server("metrics_u");
    let h = start_sluice(&pg, "metrics_u", "pw", "obs", 1, 1, |c| {
        c.wait_timeout = Duration::from_millis(300)
    })
    .await;
    let (status, _) = http_get(h.admin_addr, "/healthz");
    assert_eq!(status, 200);
    // The readiness login (within a second of the start) puts the pool's only connection in
    // the pool, and with it the server's parameters; wait for it, so the first client's login
    // does not fetch them itself (one checkout more, or not, by timing).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, status) = http_get(h.admin_addr, "/status");
        let status: serde_json::Value = serde_json::from_str(&status).expect("/status JSON");
        if status["budget"]["idle"].as_u64() == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "no readiness login: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let a = connect(&h, "metrics_u", "pw", "obs")
        .await
        .expect("connect a");
    for _ in 0..7 {
        a.simple_query("SELECT 1").await.expect("query");
    }
    // Hold the only server connection, then have a second client time out waiting.
    a.simple_query("BEGIN").await.expect("begin");
    let b = connect(&h, "metrics_u", "pw", "obs")
        .await
        .expect("connect b");
    let err = b.simple_query("SELECT 1").await.expect_err("must be shed");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("53300"));
    a.simple_query("COMMIT").await.expect("commit");

    let group = r#"{group="metrics_u"}"#;
    // The COMMIT's checkout is counted as its server connection goes back to the pool, which
    // may be just after the client has read the answer: read until it is (or time runs out).
    let transactions = format!("sluice_transactions_total{group}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = http_get(h.admin_addr, "/metrics");
        assert_eq!(status, 200);
        if metric(&body, &transactions) >= 9.0 || Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // 7 single statements + the BEGIN..COMMIT transaction, plus the checkout at the first
    // login that validates the client's startup settings.
    assert_eq!(
        metric(&body, &format!("sluice_transactions_total{group}")),
        9.0,
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            r#"sluice_queries_rejected_total{reason="wait_timeout",group="metrics_u"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(&body, &format!("sluice_pool_wait_seconds_count{group}")),
        9.0
    );
    // Gauges are per process, shared by the other proxies this test binary runs: only present.
    assert!(
        body.contains("\nsluice_server_connections_budget "),
        "{body}"
    );
    assert!(
        body.contains("# TYPE sluice_pool_wait_seconds histogram"),
        "{body}"
    );
    assert!(metric(&body, r#"sluice_bytes_total{direction="server_to_client"}"#) > 0.0);

    {
        let promtool = which("promtool")
            .expect("promtool is not installed: apt-get install -y prometheus (bash .ci/run does)");
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("metrics.txt");
        std::fs::write(&path, &body).expect("write");
        let out = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&path).expect("open"))
            .output()
            .expect("promtool");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "promtool check metrics: {text}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_database() {
    let pg = server("ready_u");
    let h = start_sluice(&pg, "ready_u", "pw", "obs", 2, 2, |_| {}).await;
    let wait_for = |want: u16| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, _) = http_get(h.admin_addr, "/readyz");
            if status == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz stayed {status}, wanted {want}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for(200);
    pg.stop();
    wait_for(503);
    pg.start_again();
    wait_for(200);
    let c = connect(&h, "ready_u", "pw", "obs")
        .await
        .expect("connect after restart");
    c.simple_query("SELECT 1")
        .await
        .expect("query after restart");
    h.stop().await;
}

/// Readiness follows real logins, not only the server's port: with the port open and every
/// login refused (the server's password for Sluice's user changed), `/readyz` answers 503 until
/// logins succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_real_logins() {
    let pg = server("login_u");
    let h = start_sluice(&pg, "login_u", "pw", "obs", 2, 2, |_| {}).await;
    let status = |h: &sluice::Handle| http_get(h.admin_addr, "/readyz");
    let wait_for = |want: u16, why: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (got, body) = status(&h);
            if got == want {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz stayed {got} ({body:?}), wanted {want}: {why}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for(200, "at start");
    pg.psql("ALTER ROLE login_u PASSWORD 'rotated-elsewhere'");
    // Nothing else happens: Sluice's own login (at most every 10 s while logins succeed) finds
    // out.
    let body = wait_for(503, "the server refuses Sluice's logins");
    assert!(body.contains("logins"), "{body}");
    pg.psql("ALTER ROLE login_u PASSWORD 'pw'");
    wait_for(200, "logins succeed again");
    let c = connect(&h, "login_u", "pw", "obs")
        .await
        .expect("client login");
    c.simple_query("SELECT 1")
        .await
        .expect("query once logins succeed");
    h.stop().await;
}

pub(crate) fn psql(
    pg: &PgServer,
    port: u16,
    user: &str,
    password: &str,
    sql: &str,
) -> (bool, String) {
    let out = Command::new(pg.bin("psql"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            user,
            "-d",
            "sluice",
            "-X",
            "-A",
            "-F",
            "|",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", password)
        .output()
        .expect("psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_answers_psql_and_refuses_others() {
    let pg = server("console_u");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("sluice.toml");
    let write_config = |pool_size: u32| {
        let toml = format!(
            "upstream = \"{}\"\nmax_server_connections = 5\npool_size = {pool_size}\nadmin_users = [\"ops\"]\n[users.ops]\npassword = \"ops-pw\"\n",
            pg.url("console_u", "pw", "obs")
        );
        std::fs::write(&path, toml).expect("write config");
    };
    write_config(3);
    let h = crate::proxy::start_from_file(&path).await;
    let port = h.local_addr.port();
    let app = connect(&h, "console_u", "pw", "obs")
        .await
        .expect("app client");
    app.simple_query("SELECT 1").await.expect("query");
    let admin = |sql: &str| tokio::task::block_in_place(|| psql(&pg, port, "ops", "ops-pw", sql));

    for (cmd, header) in [
        ("SHOW POOLS", "database|user|cl_active|cl_waiting|cl_idle|sv_active|sv_idle|sv_login|pool_size|pool_mode"),
        ("SHOW CLIENTS", "type|user|database|state|addr|port|connect_time|pid|application_name|server_pid|tls"),
        ("SHOW SERVERS", "type|user|database|state|addr|port|connect_time|remote_pid|tls"),
        ("SHOW STATS", "database|total_xact_count|total_xact_time|total_wait_time|avg_xact_time|avg_wait_time"),
        ("SHOW GROUP_STATS", "group|total_xact_count|total_xact_time|total_wait_time|total_rejected|avg_xact_time|avg_wait_time"),
        ("SHOW DATABASES", "name|host|port|database|pool_size|min_pool_size|pool_mode|current_connections|paused|disabled"),
        ("SHOW USERS", "name|current_connections|current_client_connections|admin"),
        ("SHOW LISTS", "list|items"),
        ("SHOW VERSION", "version"),
        ("SHOW CONFIG", "key|value"),
        ("SHOW GROUPS", "group|active|waiting|max_connections|reserved_connections"),
    ] {
        let (ok, out) = admin(cmd);
        assert!(ok, "{cmd}: {out}");
        assert!(out.lines().next() == Some(header), "{cmd}: {out}");
    }
    let (_, pools) = admin("SHOW POOLS");
    // One idle server, or two when Sluice's own readiness login at start-up (which keeps its
    // connection in the pool) ran beside the client's.
    assert!(
        pools.contains("obs|console_u|0|0|1|0|1|0|3|transaction")
            || pools.contains("obs|console_u|0|0|1|0|2|0|3|transaction"),
        "{pools}"
    );
    // A client inside a transaction is cl_active and holds the one active server; the other
    // client is idle and holds none.
    let busy = connect(&h, "console_u", "pw", "obs")
        .await
        .expect("second client");
    busy.simple_query("BEGIN").await.expect("BEGIN");
    let (_, pools) = admin("SHOW POOLS");
    assert!(pools.contains("obs|console_u|1|0|1|1|"), "{pools}");
    busy.simple_query("COMMIT").await.expect("COMMIT");
    drop(busy);
    let (_, clients) = admin("show clients;");
    assert!(
        clients.contains("C|console_u|obs|idle|127.0.0.1|"),
        "{clients}"
    );
    let (_, servers) = admin("SHOW SERVERS");
    assert!(
        servers.contains("S|console_u|obs|idle|127.0.0.1|"),
        "{servers}"
    );
    let (_, config) = admin("SHOW CONFIG");
    assert!(
        config.contains("users.ops.password|********") && !config.contains("ops-pw"),
        "{config}"
    );

    // PAUSE holds new transactions until RESUME.
    assert!(admin("PAUSE").0);
    let held = tokio::spawn(async move { app.simple_query("SELECT 2").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a paused pool must not serve");
    assert!(admin("RESUME").0);
    tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("resumed")
        .expect("join")
        .expect("query after resume");

    // RELOAD applies the file's new pool size.
    write_config(4);
    let (ok, out) = admin("RELOAD");
    assert!(ok, "{out}");
    let (_, pools) = admin("SHOW POOLS");
    assert!(pools.contains("|4|transaction"), "{pools}");

    let (ok, out) = admin("SHOW NONSENSE");
    assert!(!ok && out.contains("unknown admin command"), "{out}");
    // Not an admin: refused with 42501.
    let (ok, out) =
        tokio::task::block_in_place(|| psql(&pg, port, "console_u", "pw", "SHOW POOLS"));
    assert!(!ok && out.contains("not an admin user"), "{out}");
    let err = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=console_u password=pw dbname=sluice"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("42501"));
    h.stop().await;
}

/// A real Prometheus scrapes Sluice and sees the rejection series after induced shedding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_scrapes_rejections() {
    let prometheus = which("prometheus")
        .expect("prometheus is not installed: apt-get install -y prometheus (bash .ci/run does)");
    let pg = server("prom_u");
    let h = start_sluice(&pg, "prom_u", "pw", "obs", 1, 1, |c| {
        c.wait_timeout = Duration::from_millis(200)
    })
    .await;
    let a = connect(&h, "prom_u", "pw", "obs").await.expect("connect a");
    a.simple_query("BEGIN").await.expect("begin");
    let b = connect(&h, "prom_u", "pw", "obs").await.expect("connect b");
    assert!(
        b.simple_query("SELECT 1").await.is_err(),
        "shed while the budget is held"
    );
    a.simple_query("COMMIT").await.expect("commit");

    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: ['{}']\n", h.admin_addr),
    )
    .expect("write config");
    let web = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr");
    let mut child = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start prometheus");
    let deadline = Instant::now() + Duration::from_secs(60);
    let query = "/api/v1/query?query=sluice_queries_rejected_total%7Bgroup%3D%22prom_u%22%7D";
    let found = loop {
        let body = TcpStream::connect(web)
            .ok()
            .map(|_| http_get(web, query).1)
            .unwrap_or_default();
        if body.contains("\"reason\":\"wait_timeout\"") {
            break Some(body);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    let body = found.expect("Prometheus never returned the sluice_queries_rejected_total series");
    assert!(body.contains("\"status\":\"success\""), "{body}");
    h.stop().await;
}

pub fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(cmd))
        .find(|p| p.is_file())
}

/// SIGTERM to the binary: for `shutdown_grace` `/readyz` answers 503 (out of a load balancer's
/// rotation) while clients are still served; then Sluice stops accepting, drains and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readyz_off_before_clients_are_refused() {
    let pg = server("grace_u");
    let upstream = format!("postgres://grace_u:pw@{}:{}/obs", pg.host(), pg.port());
    let mut sluice = SluiceProcess::spawn(&[
        ("SLUICE_UPSTREAM", &upstream),
        ("SLUICE_MAX_SERVER_CONNECTIONS", "4"),
        ("SLUICE_SHUTDOWN_GRACE", "3s"),
    ]);
    let admin = sluice.admin;
    let url = sluice.url("grace_u", "pw", "obs");
    let query = |url: String| async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.simple_query("SELECT 1").await.map(|_| ())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(admin, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "/readyz never answered 200");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    query(url.clone()).await.expect("served before SIGTERM");

    crate::support::process::signal(sluice.child.id(), "TERM");
    let signalled = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = http_get(admin, "/readyz");
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    query(url.clone())
        .await
        .expect("a new client is still served during shutdown_grace");
    // After the grace the port closes and the process ends.
    let exited = loop {
        if let Some(status) = sluice.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(20),
            "sluice did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exited.success(), "{exited}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(3),
        "the grace was kept: exited after {:?}",
        signalled.elapsed()
    );
    assert!(query(url).await.is_err(), "refused once stopped");
}

/// `sluice_pool_oldest_wait_seconds`: how long the group's longest-waiting client has waited so
/// far (RDS Proxy's largest queueing delay), read at the scrape; 0 once nobody waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_wait_is_exported_while_it_lasts() {
    let pg = server("oldw_u");
    let h = start_sluice(&pg, "oldw_u", "pw", "obs", 1, 1, |_| {}).await;
    let holder = connect(&h, "oldw_u", "pw", "obs").await.expect("holder");
    holder.simple_query("BEGIN").await.expect("BEGIN");
    let waiter = connect(&h, "oldw_u", "pw", "obs").await.expect("waiter");
    let waiting = tokio::spawn(async move { waiter.simple_query("SELECT 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(600)).await;
    let series = r#"sluice_pool_oldest_wait_seconds{group="oldw_u"}"#;
    let (_, body) = tokio::task::block_in_place(|| http_get(h.admin_addr, "/metrics"));
    let oldest = metric(&body, series);
    assert!(oldest >= 0.6, "{series} = {oldest}: {body}");
    holder.simple_query("COMMIT").await.expect("COMMIT");
    waiting.await.expect("join").expect("served");
    let (_, body) = tokio::task::block_in_place(|| http_get(h.admin_addr, "/metrics"));
    assert!(body.contains(&format!("{series} 0\n")), "{body}");
    h.stop().await;
}
