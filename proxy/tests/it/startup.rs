//! Start-up as an operator meets it: `sluice check`, a budget checked against the server's
//! limit, a database that is down when Sluice starts, and counters that exist before trouble.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::admin::{http_get, metric};
use crate::pg::{PgOptions, PgServer};
use crate::support::process::{command, SluiceProcess};
use crate::support::{output_text, pg_with_user};

/// The binary with a clean environment and `env`, run to its end.
fn sluice(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = command();
    cmd.env("NO_COLOR", "1").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("sluice runs")
}

/// `sluice check` with `env`: its exit status and its report.
fn check(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = sluice(env, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(1),
        "{}",
        output_text(&out)
    );
    (out.status.code(), text)
}

fn server() -> PgServer {
    let pg = pg_with_user(PgOptions::default(), "chk_app", "pw", "chk");
    pg.create_user("chk_other", "other-pw");
    pg
}

/// `sluice check` logs in as each user, reads the server's limit, says whether the budget fits
/// and what to fix, and exits 0 only when nothing is wrong.
#[test]
fn sluice_check_says_what_works_and_what_to_fix() {
    let pg = server();
    let upstream = pg.url("chk_app", "pw", "chk");
    // The harness's server: max_connections 30, superuser_reserved_connections 3.
    let usable = 27;

    let (status, text) = check(&[("SLUICE_UPSTREAM", &upstream)]);
    assert_eq!(status, Some(0), "{text}");
    assert!(text.contains("ok    chk_app@chk: logged in"), "{text}");
    assert!(
        text.contains("max_connections 30, 3 reserved") && text.contains("for ordinary roles"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "ok    max_server_connections {} (derived",
            usable - 3
        )),
        "{text}"
    );
    assert!(text.ends_with("verdict: ok\n"), "{text}");

    // A second user whose server password is wrong, and a budget over the limit: two
    // problems, each with its fix.
    let (status, text) = check(&[
        ("SLUICE_UPSTREAM", &upstream),
        ("SLUICE_USERS__CHK_OTHER__PASSWORD", "not-the-password"),
        ("SLUICE_MAX_SERVER_CONNECTIONS", "40"),
    ]);
    assert_eq!(status, Some(1), "{text}");
    assert!(text.contains("ok    chk_app@chk"), "{text}");
    assert!(
        text.contains("FAIL  chk_other@chk: server ")
            && text.contains("refused the login as \"chk_other\": 28P01"),
        "{text}"
    );
    assert!(
        text.contains("fix: the server refused the password Sluice has for \"chk_other\""),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "FAIL  max_server_connections 40 exceeds the {usable} connections"
        )) && text.contains("lower it to 24 or less"),
        "{text}"
    );
    assert!(text.ends_with("verdict: 2 problems\n"), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");

    // Nothing listening: the server is named, and so is the fix.
    let (status, text) = check(&[("SLUICE_UPSTREAM", "postgres://chk_app:pw@127.0.0.1:9/chk")]);
    assert_eq!(status, Some(1), "{text}");
    assert!(
        text.contains("FAIL  chk_app@chk: could not connect to server 127.0.0.1:9")
            && text.contains("fix: nothing accepts connections at 127.0.0.1:9"),
        "{text}"
    );
    assert!(
        text.contains("no login worked, so the server's max_connections is unknown"),
        "{text}"
    );
}

/// A configured budget that does not fit below the server's limit stops start-up with an error
/// saying what fits, unless `allow_budget_over_server_limit`; one that fits is logged.
#[test]
fn a_budget_over_the_server_limit_stops_start_up_unless_allowed() {
    let pg = server();
    let upstream = pg.url("chk_app", "pw", "chk");
    let out = sluice(
        &[
            ("SLUICE_UPSTREAM", &upstream),
            ("SLUICE_MAX_SERVER_CONNECTIONS", "100"),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        err.contains("max_server_connections 100 exceeds the 27 connections")
            && err.contains("allow_budget_over_server_limit"),
        "{err}"
    );

    let p = SluiceProcess::spawn(&[
        ("SLUICE_UPSTREAM", &upstream),
        ("SLUICE_MAX_SERVER_CONNECTIONS", "100"),
        ("SLUICE_ALLOW_BUDGET_OVER_SERVER_LIMIT", "true"),
    ]);
    drop(p);

    // A budget that fits: the start-up log says what the server allows.
    let log = first_log(
        &[
            ("SLUICE_UPSTREAM", &upstream),
            ("SLUICE_MAX_SERVER_CONNECTIONS", "10"),
        ],
        2,
    );
    assert!(
        log.lines()
            .any(|l| l.contains("the budget fits below the server's limit")
                && l.contains("max_connections 30, 3 reserved")
                && l.contains("max_server_connections=10")),
        "{log}"
    );
}

/// With `max_server_connections = 0` and the database down, Sluice starts anyway: the log names
/// the server, the cause and the fix, `/readyz` answers 503 and the budget is 1; once the
/// server answers, the budget is derived, `/readyz` turns 200 and clients are served.
#[test]
fn a_database_down_at_start_up_delays_readiness_not_the_start() {
    let pg = server();
    let upstream = pg.url("chk_app", "pw", "chk");
    pg.stop();
    let p = SluiceProcess::spawn(&[("SLUICE_UPSTREAM", &upstream)]);
    let (status, body) = http_get(p.admin, "/readyz");
    assert_eq!(status, 503, "{body}");
    let (_, metrics) = http_get(p.admin, "/metrics");
    assert_eq!(
        metric(&metrics, "sluice_server_connections_budget"),
        1.0,
        "{metrics}"
    );

    pg.start_again();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = Vec::new();
    loop {
        while let Ok(line) = p.log.try_recv() {
            log.push(line);
        }
        let (status, body) = http_get(p.admin, "/readyz");
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready 30 s after the server came back: {body} {log:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, metrics) = http_get(p.admin, "/metrics");
    assert_eq!(
        metric(&metrics, "sluice_server_connections_budget"),
        24.0,
        "max_connections 30 - 3 reserved - 3 headroom: {metrics}"
    );
    while let Ok(line) = p.log.try_recv() {
        log.push(line);
    }
    assert!(
        log.iter()
            .any(|l| l.contains("derived the server connection budget")
                && l.contains("max_server_connections=24")),
        "{log:#?}"
    );
    let ok = pg.psql_conninfo(
        &format!(
            "host=127.0.0.1 port={} user=chk_app dbname=chk",
            p.local.port()
        ),
        "pw",
        "SELECT 41 + 1",
    );
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("42"),
        "{}",
        output_text(&ok)
    );
}

/// The binary's log for its first `secs` seconds (it is then killed).
fn first_log(env: &[(&str, &str)], secs: u64) -> String {
    let mut cmd = command();
    cmd.env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("sluice runs");
    std::thread::sleep(Duration::from_secs(secs));
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The start-up error for a database that is down names it, the cause and the fix, and
/// Sluice starts (not ready) all the same.
#[test]
fn the_start_up_error_names_the_server_the_cause_and_the_fix() {
    let log = first_log(
        &[("SLUICE_UPSTREAM", "postgres://u:secret-pw@127.0.0.1:9/db")],
        2,
    );
    let line = log
        .lines()
        .find(|l| l.contains("ERROR"))
        .unwrap_or_else(|| panic!("an error line: {log}"));
    assert!(
        line.contains("server=127.0.0.1:9")
            && line.contains("Connection refused")
            && line.contains("fix=nothing accepts connections at 127.0.0.1:9")
            && line.contains("starting not ready"),
        "{line}"
    );
    assert!(log.contains("sluice listening"), "it starts: {log}");
    assert!(!log.contains("secret-pw"), "{log}");
}

/// Every counter whose label values are known in advance is exported at 0 from the first
/// scrape, with the configured groups', and `promtool check metrics` accepts the lot.
#[test]
fn counters_exist_at_zero_before_trouble() {
    let p = SluiceProcess::spawn(&[
        ("SLUICE_UPSTREAM", "postgres://zero_app:pw@127.0.0.1:9/zero"),
        ("SLUICE_MAX_SERVER_CONNECTIONS", "4"),
        ("SLUICE_GROUPS__BATCH__MAX_CONNECTIONS", "2"),
    ]);
    let (_, body) = http_get(p.admin, "/metrics");
    let present = |name: &str, labels: &[(&str, &str)]| {
        body.lines().any(|l| {
            l.starts_with(&format!("{name}{{"))
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
                && l.ends_with(" 0")
        })
    };
    use sluice::metrics as m;
    let sets: &[(&str, &str, &[&str])] = &[
        (m::CLIENT_REJECTED, "reason", m::CLIENT_REJECT_REASONS),
        (m::CLIENT_TIMEOUTS, "reason", m::CLIENT_TIMEOUT_REASONS),
        (m::QUERIES_CANCELLED, "reason", m::CANCEL_REASONS),
        (m::SERVER_CLOSED, "reason", m::CLOSE_REASONS),
        (m::SESSION_PINS, "reason", m::PIN_REASONS),
    ];
    for (name, label, values) in sets {
        for value in values.iter() {
            assert!(
                present(name, &[(label, value)]),
                "{name}{{{label}={value}}}: {body}"
            );
        }
    }
    // Connect results: present, and 0 but for the readiness logins to the refusing server.
    for result in m::CONNECT_RESULTS {
        let series = format!("{}{{result=\"{result}\"}} ", m::SERVER_CONNECTS);
        let line = body.lines().find(|l| l.starts_with(&series));
        let ok = match *result {
            "refused" => line.is_some(),
            _ => line.is_some_and(|l| l.ends_with(" 0")),
        };
        assert!(ok, "{result}: {body}");
    }
    for side in ["client", "server"] {
        for reason in m::TLS_FAILURE_REASONS {
            assert!(
                present(
                    m::TLS_HANDSHAKE_FAILURES,
                    &[("side", side), ("reason", reason)]
                ),
                "{side} {reason}: {body}"
            );
        }
    }
    for group in ["zero_app", "batch"] {
        for reason in m::QUERY_REJECT_REASONS {
            assert!(
                present(m::QUERIES_REJECTED, &[("group", group), ("reason", reason)]),
                "{group} {reason}: {body}"
            );
        }
        assert!(
            present(m::TRANSACTIONS, &[("group", group)]),
            "{group}: {body}"
        );
    }
    assert!(
        body.contains("\nsluice_client_auth_failures_total 0"),
        "{body}"
    );
    for method in m::SERVER_LOGIN_METHODS {
        for result in m::LOGIN_RESULTS {
            assert!(
                present(m::SERVER_LOGINS, &[("method", method), ("result", result)]),
                "{method} {result}: {body}"
            );
        }
    }
    for auth in m::CLIENT_AUTH_MODES {
        for method in m::CLIENT_LOGIN_METHODS {
            for result in m::LOGIN_RESULTS {
                let labels = [("auth", *auth), ("method", method), ("result", result)];
                assert!(
                    present(m::CLIENT_LOGINS, &labels),
                    "{auth} {method} {result}: {body}"
                );
            }
        }
    }

    let promtool = crate::admin::which("promtool")
        .expect("promtool is not installed: apt-get install -y prometheus (bash .ci/run does)");
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    use std::io::Write as _;
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let out = check.wait_with_output().expect("promtool");
    assert!(out.status.success(), "{}", output_text(&out));
}

/// Logins are counted by method and result, on both sides: clients (a good password twice, a
/// wrong one, an unknown user, one that breaks off) and Sluice's own logins to the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_counted_by_method_and_result() {
    let pg = pg_with_user(PgOptions::default(), "cnt_app", "pw", "cnt");
    let upstream = pg.url("cnt_app", "pw", "cnt");
    let p = SluiceProcess::spawn(&[
        ("SLUICE_UPSTREAM", upstream.as_str()),
        ("SLUICE_MAX_SERVER_CONNECTIONS", "4"),
    ]);
    let login = |user: &'static str, password: &'static str| {
        let url = p.url(user, password, "cnt");
        async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            client.simple_query("SELECT 1").await.map(|_| ())
        }
    };
    login("cnt_app", "pw").await.expect("a good password");
    login("cnt_app", "pw").await.expect("a good password again");
    for (user, password) in [("cnt_app", "wrong"), ("nobody", "pw")] {
        let e = login(user, password).await.expect_err("refused");
        assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e}");
    }
    // A client that leaves in the middle of the exchange.
    {
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect(p.local).expect("connect");
        let mut startup = bytes::BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [("user", "cnt_app"), ("database", "cnt")].into_iter(),
            &mut startup,
        )
        .expect("startup");
        sock.write_all(&startup).expect("send");
        let mut first = [0u8; 1];
        sock.read_exact(&mut first).expect("the SASL request");
        assert_eq!(first[0], b'R');
    }
    let client = |method: &str, result: &str| {
        format!(
            r#"{}{{auth="users",method="{method}",result="{result}"}}"#,
            sluice::metrics::CLIENT_LOGINS
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (_, body) = http_get(p.admin, "/metrics");
        let done = metric(&body, &client("scram-sha-256", "error")) >= 1.0;
        if done || Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metric(&body, &client("scram-sha-256", "ok")), 2.0, "{body}");
    assert_eq!(
        metric(&body, &client("scram-sha-256", "refused")),
        2.0,
        "{body}"
    );
    assert_eq!(
        metric(&body, &client("scram-sha-256", "error")),
        1.0,
        "{body}"
    );
    assert_eq!(metric(&body, &client("md5", "ok")), 0.0, "{body}");
    let server = |result: &str| {
        format!(
            r#"{}{{method="password",result="{result}"}}"#,
            sluice::metrics::SERVER_LOGINS
        )
    };
    // The budget check at start-up, the pool's connection, readiness logins: at least two.
    assert!(metric(&body, &server("ok")) >= 2.0, "{body}");
    assert_eq!(metric(&body, &server("refused")), 0.0, "{body}");
    assert_eq!(metric(&body, &server("error")), 0.0, "{body}");
}

/// With `control_user`, Sluice's own logins (the server's limit at start-up, readiness,
/// `sluice check`) are made as that role, with its password from its file, and never as the
/// users clients log in as, whose server password may be wrong meanwhile.
#[test]
fn the_control_user_is_sluices_own_login() {
    let pg = pg_with_user(
        PgOptions {
            log_connections: true,
            ..Default::default()
        },
        "own_app",
        "pw",
        "own",
    );
    pg.create_user("own_monitor", "monitor-pw");
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("control-password");
    std::fs::write(&file, "monitor-pw\n").expect("write");
    let upstream = pg.url("own_app", "wrong-pw", "own");
    let env = [
        ("SLUICE_UPSTREAM", upstream.as_str()),
        ("SLUICE_CONTROL_USER", "own_monitor"),
        ("SLUICE_CONTROL_PASSWORD_FILE", file.to_str().expect("path")),
    ];

    let (status, text) = check(&env);
    assert_eq!(
        status,
        Some(1),
        "own_app's server password is wrong: {text}"
    );
    let own = text.find("ok    own_monitor@own: logged in").expect(&text);
    let app = text.find("FAIL  own_app@own").expect(&text);
    assert!(own < app, "Sluice's own login comes first: {text}");
    assert!(text.contains("max_connections 30"), "{text}");

    // The budget is derived (max_server_connections 0) and /readyz turns 200 with the
    // control user's logins alone.
    let p = SluiceProcess::spawn(&env);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http_get(p.admin, "/readyz");
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "not ready: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, metrics) = http_get(p.admin, "/metrics");
    assert!(
        metric(&metrics, "sluice_server_connections_budget") > 1.0,
        "derived: {metrics}"
    );
    drop(p);
    let log = pg.log_contents();
    assert!(
        log.contains("connection authorized: user=own_monitor"),
        "{log}"
    );
    let app_failures = log
        .matches("password authentication failed for user \"own_app\"")
        .count();
    assert_eq!(app_failures, 1, "one refused login, sluice check's: {log}");
}
