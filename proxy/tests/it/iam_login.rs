//! Server logins with RDS IAM tokens (`server_auth = "rds_iam"`), against a real PostgreSQL that
//! plays RDS's part: pg_hba `password` over TLS only (RDS asks for the token in clear text, as
//! PAM does), the role's password set to the very token botocore's `generate_db_auth_token`
//! makes for the same credentials and instant. A login therefore succeeds only when Sluice
//! presents that token byte for byte, over `verify-full`.
//!
//! Sluice runs in-process with a token source of the test's (fixed credentials, a clock the
//! test moves), given through `sluice::StartOptions`: the credential chain itself is tested in
//! `iam.rs` against credential endpoints the test serves.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice::auth::iam::{self, AwsCredentials, Clock, IamTokens};
use sluice::config::Config;

use crate::certs::{IssueOpts, TestCa};
use crate::drivers::require_python;
use crate::iam::{botocore_tokens, session_token, KEY, SECRET};
use crate::passthrough::{logins, plain_as};
use crate::pg::PgServer;
use crate::proxy::{overrides, TlsSettings};
use crate::support::within_for;
use crate::tls::{
    code_and_message, hostssl_only, plain, scalar, start_pg, DB, GUARD, PASSWORD, USER,
};
use crate::tls_server_auth::set_hba;

const REGION: &str = "eu-west-2";

/// A wall clock the test sets.
struct TestClock(Mutex<SystemTime>);

impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

/// botocore's token for the test user on `cfg`'s server at `at`, with a session token.
async fn botocore_token(python: &std::path::Path, cfg: &Config, at: SystemTime) -> String {
    botocore_token_for(python, &cfg.server_host, cfg.server_port, USER, at).await
}

/// botocore's token for `user` on `host:port` at `at`, with a session token.
async fn botocore_token_for(
    python: &std::path::Path,
    host: &str,
    port: u16,
    user: &str,
    at: SystemTime,
) -> String {
    let time = at.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let input = serde_json::json!({
        "region": REGION, "host": host, "port": port, "user": user,
        "key": KEY, "secret": SECRET, "token": session_token(), "time": time,
    })
    .to_string()
        + "\n";
    let mut tokens = botocore_tokens(python, &input).await;
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    tokens.remove(0)
}

/// Makes the role's password `token` (what RDS would accept for it).
fn accept_token(pg: &PgServer, token: &str) {
    accept_token_for(pg, USER, token);
}

fn accept_token_for(pg: &PgServer, role: &str, token: &str) {
    assert!(!token.contains('\''), "a token has no quote: {token}");
    pg.psql(&format!("ALTER ROLE {role} PASSWORD '{token}'"));
}

/// Closes every session of the test user on the server, so the next query needs a new login.
fn end_server_sessions(pg: &PgServer) {
    pg.psql(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = '{USER}'"
    ));
}

/// Runs `SELECT 1` through Sluice with a new client until it succeeds (`Ok`) or fails with
/// `code` (`Err` with the error's hint); other failures (a pooled connection the server ended
/// just now) are retried.
async fn query_until(h: &sluice::Handle, code: &str) -> Result<(), String> {
    within_for(GUARD, "a query through Sluice", async {
        loop {
            let result = match plain(h).await {
                Ok(c) => c.simple_query("SELECT 1").await.map(|_| ()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if code_and_message(&e).0 == code => {
                    let db = e.as_db_error().expect("a server error");
                    return Err(format!("{} HINT {}", db.message(), db.hint().unwrap_or("")));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_logins_present_rds_iam_tokens_and_renew_them() {
    let python = require_python("botocore");
    let ca = TestCa::new("IAM CA");
    let cert = ca.issue(&IssueOpts::default());
    let pg = start_pg(Some(hostssl_only(&cert))).await;
    set_hba(&pg, "password");
    let dir = tempfile::tempdir().expect("dir");
    let settings = TlsSettings {
        server_tls: Some("verify-full"),
        server_tls_ca_file: Some(ca.write_cert(dir.path(), "ca.crt")),
        extra: vec![
            ("server_auth", toml::Value::String("rds_iam".into())),
            ("aws_region", toml::Value::String(REGION.into())),
        ],
        ..Default::default()
    };
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, settings.to_toml()).expect("write the configuration");
    // The upstream URL names the user; its password is what clients present to Sluice, and
    // never reaches the server.
    let flags = overrides(&pg, USER, PASSWORD, DB, 4, 4);
    let cfg = Config::load(Some(&path), &flags).expect("an rds_iam configuration loads");

    let start = UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        );
    let clock = Arc::new(TestClock(Mutex::new(start)));
    let credentials = AwsCredentials::new(KEY, SECRET, Some(session_token()), None, "test");
    let tokens = Arc::new(IamTokens::with_provider(REGION, credentials, clock.clone()));
    let first = botocore_token(&python, &cfg, start).await;
    assert!(
        first.len() > 1400,
        "with a session token: {} bytes",
        first.len()
    );
    accept_token(&pg, &first);

    // Start-up logs in to check the budget against the server, with the token.
    let options = sluice::StartOptions {
        config_path: Some(path.clone()),
        flags: flags.clone(),
        iam_tokens: Some(tokens),
    };
    let h = sluice::start_with(cfg.clone(), options)
        .await
        .expect("Sluice starts with rds_iam");
    let c = plain(&h)
        .await
        .expect("a client logs in with its own password");
    assert_eq!(scalar(&c, "SELECT current_user").await, USER);
    let tls = scalar(
        &c,
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await;
    assert_eq!(tls, "t", "the token went over TLS");
    drop(c);

    // The token of five minutes later: until the clock gets there, Sluice keeps presenting
    // the one it has, which the server now refuses, and the client is told what to fix.
    let later = start + iam::TOKEN_REUSE + Duration::from_secs(1);
    let renewed = botocore_token(&python, &cfg, later).await;
    assert_ne!(renewed, first);
    accept_token(&pg, &renewed);
    end_server_sessions(&pg);
    let refused = query_until(&h, "08004")
        .await
        .expect_err("the cached token is refused now");
    assert!(
        refused.contains("refused Sluice's login") && refused.contains("rds_iam"),
        "{refused}"
    );
    assert!(!refused.contains(&first), "no token in an error: {refused}");

    // Past the reuse period the next login signs a new token: botocore's for that instant.
    *clock.0.lock().unwrap() = later;
    query_until(&h, "-")
        .await
        .expect("a login with the renewed token");
    // Only this test logs in with rds_iam in this process: its logins, counted.
    let (_, body) = crate::admin::http_get(h.admin_addr, "/metrics");
    let logins = |result: &str| {
        crate::admin::metric(
            &body,
            &format!(r#"sluice_server_logins_total{{method="rds_iam",result="{result}"}}"#),
        )
    };
    assert!(logins("ok") >= 2.0, "{body}");
    assert!(logins("refused") >= 1.0, "{body}");
    h.stop().await;
}

/// Passthrough with RDS IAM tokens from clients: the server (playing RDS: the role's password
/// is the token, pg_hba `password` over TLS) verifies a function's token once; the same token
/// logs in again without a server login, and pooled connections log in with it; a token
/// signed for Sluice's address, for another user, or expired is refused with a clear error
/// and no server login; a token the server refuses gets its answer and a hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rds_iam_tokens_are_verified_by_the_server_and_remembered_until_they_expire() {
    let python = require_python("botocore");
    let ca = TestCa::new("IAM passthrough CA");
    let cert = ca.issue(&IssueOpts::default());
    let pg = start_pg(Some(hostssl_only(&cert))).await;
    // Like RDS for an IAM role: the password in clear text (over TLS), which is the token.
    pg.create_user("fn_iam", "unused");
    crate::tls_server_auth::prepend_hba(&pg, "hostssl all fn_iam 127.0.0.1/32 password");
    let dir = tempfile::tempdir().expect("dir");
    let settings = TlsSettings {
        server_tls: Some("verify-full"),
        server_tls_ca_file: Some(ca.write_cert(dir.path(), "ca.crt")),
        extra: vec![("auth", toml::Value::String("passthrough".into()))],
        ..Default::default()
    };
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, settings.to_toml()).expect("write the configuration");
    let flags = overrides(&pg, USER, PASSWORD, DB, 4, 4);
    let mut cfg = Config::load(Some(&path), &flags).expect("a passthrough configuration loads");
    cfg.server_check_delay = Duration::ZERO;
    let (host, port) = (cfg.server_host.clone(), cfg.server_port);
    let h = sluice::start_from(cfg, Some(path.clone()), flags)
        .await
        .expect("Sluice starts");

    let now = SystemTime::now();
    let token = botocore_token_for(&python, &host, port, "fn_iam", now).await;
    assert!(
        token.len() > 1400,
        "with a session token: {} bytes",
        token.len()
    );
    accept_token_for(&pg, "fn_iam", &token);
    for _ in 0..3 {
        let c = plain_as(&h, "fn_iam", &token, DB)
            .await
            .unwrap_or_else(|e| panic!("{:?}", code_and_message(&e)));
        assert_eq!(scalar(&c, "SELECT current_user").await, "fn_iam");
    }
    assert_eq!(
        logins(&pg, "fn_iam"),
        1,
        "one verifying login, its connection pooled"
    );
    // The pooled connection ends: the next one logs in with the token, which still works.
    pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'fn_iam'");
    let c = plain_as(&h, "fn_iam", &token, DB).await.unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, "fn_iam");
    assert_eq!(logins(&pg, "fn_iam"), 2);

    // Refused before any server login, each with what to fix.
    let cases = [
        (
            botocore_token_for(&python, "127.0.0.1", h.local_addr.port(), "fn_iam", now).await,
            "28000",
            "signed for 127.0.0.1",
        ),
        (
            botocore_token_for(&python, &host, port, USER, now).await,
            "28000",
            "is for user",
        ),
        (
            botocore_token_for(
                &python,
                &host,
                port,
                "fn_iam",
                now - Duration::from_secs(1800),
            )
            .await,
            "28P01",
            "expired",
        ),
    ];
    for (bad, want, says) in &cases {
        let e = plain_as(&h, "fn_iam", bad, DB).await.expect_err(says);
        let (code, message) = code_and_message(&e);
        assert_eq!(&code, want, "{message}");
        assert!(message.contains(says), "{message}");
        assert!(
            !message.contains(bad.as_str()),
            "no token in an error: {message}"
        );
    }
    assert_eq!(logins(&pg, "fn_iam"), 2);
    // A well-formed token the server refuses (signed a second later: another signature).
    let other =
        botocore_token_for(&python, &host, port, "fn_iam", now + Duration::from_secs(1)).await;
    let e = plain_as(&h, "fn_iam", &other, DB)
        .await
        .expect_err("refused by the server");
    let db = e.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "28P01", "{}", db.message());
    assert!(
        db.hint().unwrap_or("").contains("rds_iam"),
        "{:?}",
        db.hint()
    );

    // A token about to expire: verified once, remembered until its expiry, refused after it.
    let signed = SystemTime::now() - Duration::from_secs(895);
    let short = botocore_token_for(&python, &host, port, "fn_iam", signed).await;
    accept_token_for(&pg, "fn_iam", &short);
    let before = logins(&pg, "fn_iam");
    for _ in 0..2 {
        let c = plain_as(&h, "fn_iam", &short, DB).await.unwrap();
        assert_eq!(scalar(&c, "SELECT 1").await, "1");
    }
    assert_eq!(logins(&pg, "fn_iam"), before + 1, "one verifying login");
    let expires = iam::token_expiry(&short).expect("a token");
    if let Ok(left) = expires.duration_since(SystemTime::now()) {
        tokio::time::sleep(left + Duration::from_millis(500)).await;
    }
    let e = plain_as(&h, "fn_iam", &short, DB)
        .await
        .expect_err("expired");
    let (code, message) = code_and_message(&e);
    assert_eq!(code, "28P01", "{message}");
    assert!(message.contains("expired"), "{message}");
    h.stop().await;
}
