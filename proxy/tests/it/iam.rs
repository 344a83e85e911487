//! RDS IAM tokens (`sluice::auth::iam`), live:
//!
//! - Sluice's tokens compared byte for byte with botocore's `generate_db_auth_token` for the
//!   same fixed credentials and clock (regions, ports, user names with characters that need
//!   encoding, with and without a session token). botocore runs in the Python venv of the
//!   driver tests (`DRIVER_TEST_PYTHON`, default `<workspace>/target/driver-venv/bin/python`,
//!   installed by `bash .ci/run` from `proxy/tests/drivers/python/requirements.txt`); its
//!   clock is fixed by `proxy/tests/drivers/python/botocore_iam_tokens.py` (see there).
//! - The credential chain Sluice builds (`IamTokens::from_environment`) against credential
//!   sources this test serves itself on 127.0.0.1: environment variables, the ECS container
//!   credentials endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI`, with an authorization token
//!   from the environment or a file), EC2 instance metadata v2
//!   (`AWS_EC2_METADATA_SERVICE_ENDPOINT`), and an endpoint that fails.
//!
//! The AWS SDK's providers read the process environment and take no other, so each chain
//! test runs in a child process of this test binary ([`credential_chain_child`]) with its
//! variables set on that child alone: nothing leaks into the tests running beside it. Every
//! `AWS_*` variable of the machine is removed from the child, the shared config files point
//! at nothing, and instance metadata is disabled unless a test serves it locally, so no
//! request ever leaves the machine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice::auth::iam::{self, AwsCredentials, IamTokens};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::drivers::{drivers_dir, require_python};
use crate::support::within;

/// 2024-08-26T22:00:00Z, and a second instant that crosses a day.
const TIMES: [u64; 2] = [1_724_709_600, 1_735_689_599];

pub(crate) const KEY: &str = "AKIDEXAMPLE";
pub(crate) const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

/// A session token shaped like STS's (base64 with `+`, `/` and `=`), about 1 KB.
pub(crate) fn session_token() -> String {
    format!(
        "IQoJb3JpZ2luX2VjEHYaCXVzLWVhc3QtMSJHMEUCIQ+{}/Zm9v==",
        "AbCdEfGh+IjKl/MnOp".repeat(52)
    )
}

#[tokio::test]
async fn tokens_match_botocore() {
    let python = require_python("botocore");
    let token = session_token();
    let mut cases = Vec::new();
    for region in ["us-east-1", "eu-west-2"] {
        for (host, port) in [
            ("mydb.cluster-abc123.us-east-1.rds.amazonaws.com", 5432),
            ("Mixed-Case.proxy-xyz.eu-west-2.rds.amazonaws.com", 6543),
        ] {
            for user in ["app", "app user+1@x", "ü/;=&?%"] {
                for session in [None, Some(token.as_str())] {
                    for time in TIMES {
                        cases.push((region, host, port, user, session, time));
                    }
                }
            }
        }
    }
    cases.push(("us-east-1", "db.local", 443, "app", None, TIMES[0]));
    let input: String = cases
        .iter()
        .map(|(region, host, port, user, session, time)| {
            serde_json::json!({
                "region": region, "host": host, "port": port, "user": user,
                "key": KEY, "secret": SECRET, "token": session, "time": time,
            })
            .to_string()
                + "\n"
        })
        .collect();

    let lines = botocore_tokens(&python, &input).await;
    assert_eq!(lines.len(), cases.len(), "{lines:?}");

    for ((region, host, port, user, session, time), expected) in cases.iter().zip(&lines) {
        let creds = AwsCredentials::new(KEY, SECRET, session.map(str::to_string), None, "test");
        let now = UNIX_EPOCH + Duration::from_secs(*time);
        let ours = iam::generate(&creds, region, host, *port, user, now).unwrap();
        assert_eq!(
            &ours,
            expected,
            "region {region}, {host}:{port}, user {user:?}, session token {}, time {time}",
            session.is_some()
        );
        // What Sluice reads back from botocore's token.
        let read = iam::parse_client_token(expected).expect("botocore's token is recognised");
        assert_eq!(
            (
                read.host.as_str(),
                read.port,
                read.user.as_str(),
                read.region.as_str()
            ),
            (*host, *port, *user, *region)
        );
        assert_eq!(read.expires, now + iam::TOKEN_LIFETIME);
    }
    let with_session = lines.iter().map(|l| l.len()).max().unwrap();
    assert!(with_session > 1400, "longest token: {with_session} bytes");
}

/// The tokens botocore's `generate_db_auth_token` makes for each JSON line of `input` (region,
/// host, port, user, key, secret, token, time), one per line, run by `python`.
pub(crate) async fn botocore_tokens(python: &std::path::Path, input: &str) -> Vec<String> {
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(drivers_dir().join("python/botocore_iam_tokens.py"))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    isolate_from_aws(&mut cmd, &tempfile::tempdir().unwrap().path().join("none"));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("python starts");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = within("botocore tokens", child.wait_with_output())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "botocore_iam_tokens.py failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.last().map(|l| l.starts_with("OK botocore ")),
        Some(true),
        "{stdout}"
    );
    lines[..lines.len() - 1]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// Removes every `AWS_*` variable from `cmd` and points the shared config and credentials
/// files at `nothing`, a path that does not exist.
fn isolate_from_aws(cmd: &mut tokio::process::Command, nothing: &std::path::Path) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("AWS_CONFIG_FILE", nothing)
        .env("AWS_SHARED_CREDENTIALS_FILE", nothing);
}

/// What a chain test's child is asked to make a token for.
const HOST: &str = "db.example.com";
const PORT: u16 = 5432;
const USER: &str = "app";
/// Set on the child process: run [`credential_chain_child`]. (Not `SLUICE_*`, which Sluice
/// reads as configuration.)
const CHILD: &str = "IAM_TEST_CHAIN_CHILD";

/// The child half of the chain tests: does nothing unless run by [`run_chain`], which sets
/// the environment. Builds the default chain, asks twice for a token (the second must come
/// from the cache) and prints it, or the error when `IAM_TEST_CHAIN_CHILD=error`.
#[tokio::test]
#[ignore = "run by the credential chain tests, in a process of its own"]
async fn credential_chain_child() {
    let Ok(mode) = std::env::var(CHILD) else {
        return;
    };
    let tokens = IamTokens::from_environment(None).await.unwrap();
    match tokens.token(HOST, PORT, USER).await {
        Ok(first) => {
            let again = tokens.token(HOST, PORT, USER).await.unwrap();
            assert_eq!(again, first, "the second token comes from the cache");
            println!("IAM_CHILD_TOKEN {}", first.as_str());
        }
        Err(e) if mode == "error" => println!("IAM_CHILD_ERROR {e}"),
        Err(e) => panic!("no token: {e}"),
    }
}

/// One request the test's credential server received.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

/// A response: status, extra headers, body.
type Response = (u16, Vec<(&'static str, String)>, String);
type Handler = fn(&Request) -> Response;

/// A tiny HTTP/1.1 server on 127.0.0.1 answering each request with `handler` (and closing
/// the connection); it records what it received. It lives as long as the test's runtime.
async fn serve(handler: Handler) -> (SocketAddr, Arc<Mutex<Vec<Request>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let head_end = loop {
                    let mut chunk = [0u8; 4096];
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i;
                    }
                    if buf.len() > 64 * 1024 {
                        return;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let mut lines = head.split("\r\n");
                let mut start = lines.next().unwrap_or_default().split(' ');
                let request = Request {
                    method: start.next().unwrap_or_default().to_string(),
                    path: start.next().unwrap_or_default().to_string(),
                    headers: lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect(),
                };
                let (status, headers, body) = handler(&request);
                log.lock().unwrap().push(request);
                let headers: String = headers
                    .iter()
                    .map(|(name, value)| format!("{name}: {value}\r\n"))
                    .collect();
                let response = format!(
                    "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\n{headers}\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    if status == 200 { "OK" } else { "Error" },
                    body.len()
                );
                let _ = sock.write_all(response.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (addr, seen)
}

/// Container or instance credentials JSON, expiring in 6 hours.
fn credentials_json(key: &str, secret: &str, token: &str) -> String {
    let expires =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(6 * 3600));
    serde_json::json!({
        "Code": "Success",
        "Type": "AWS-HMAC",
        "AccessKeyId": key,
        "SecretAccessKey": secret,
        "Token": token,
        "Expiration": expires.to_string(),
        "LastUpdated": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    })
    .to_string()
}

/// Runs [`credential_chain_child`] in a child process with `vars` set (and every other
/// `AWS_*` variable removed), in `mode`; returns the line it printed after `IAM_CHILD_`.
async fn run_chain(mode: &str, vars: &[(&str, String)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "iam::credential_chain_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    isolate_from_aws(&mut cmd, &dir.path().join("none"));
    cmd.env(CHILD, mode)
        .env("AWS_REGION", "eu-west-2")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for (name, value) in vars {
        cmd.env(name, value);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = within("the credential chain child", cmd.output())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("IAM_CHILD_"))
        .map(|(_, line)| line.to_string());
    match line {
        Some(line) if out.status.success() => line,
        _ => panic!(
            "chain child ({mode}) failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The token the child printed, checked to be for [`HOST`], [`PORT`], [`USER`] in the
/// child's region, and signed with `key` and `session`.
fn check_token(line: &str, key: &str, session: &str) {
    let token = line
        .strip_prefix("TOKEN ")
        .unwrap_or_else(|| panic!("no token: {line}"));
    let read = iam::parse_client_token(token).expect("a token");
    assert_eq!(
        (
            read.host.as_str(),
            read.port,
            read.user.as_str(),
            read.region.as_str()
        ),
        (HOST, PORT, USER, "eu-west-2")
    );
    assert!(
        token.contains(&format!("&X-Amz-Credential={key}%2F")),
        "{token}"
    );
    // (The test's session tokens need no percent-encoding.)
    assert!(
        token.contains(&format!("&X-Amz-Security-Token={session}&")),
        "{token}"
    );
}

#[tokio::test]
async fn chain_reads_environment_credentials() {
    let line = run_chain(
        "token",
        &[
            ("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENT".into()),
            ("AWS_SECRET_ACCESS_KEY", "env-secret".into()),
            ("AWS_SESSION_TOKEN", "env-session".into()),
        ],
    )
    .await;
    check_token(&line, "AKIAENVIRONMENT", "env-session");
}

fn ecs_handler(r: &Request) -> Response {
    let authorized = r.headers.get("authorization").map(String::as_str) == Some("ecs-auth-token");
    if r.method == "GET" && r.path == "/v2/credentials/task" && authorized {
        (
            200,
            vec![],
            credentials_json("ASIAECSTASK", "ecs-secret", "ecs-session"),
        )
    } else {
        (
            403,
            vec![],
            r#"{"code":"AccessDenied","message":"no"}"#.into(),
        )
    }
}

#[tokio::test]
async fn chain_reads_container_credentials() {
    let (addr, seen) = serve(ecs_handler).await;
    let uri = format!("http://{addr}/v2/credentials/task");
    let line = run_chain(
        "token",
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri.clone()),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "ecs-auth-token".into()),
        ],
    )
    .await;
    check_token(&line, "ASIAECSTASK", "ecs-session");
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "credentials fetched once for two tokens"
    );

    // The authorization token from a file (EKS Pod Identity's way).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "ecs-auth-token").unwrap();
    let line = run_chain(
        "token",
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                file.display().to_string(),
            ),
        ],
    )
    .await;
    check_token(&line, "ASIAECSTASK", "ecs-session");
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn chain_reports_a_failing_credentials_endpoint() {
    let (addr, seen) = serve(ecs_handler).await;
    let line = run_chain(
        "error",
        &[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                format!("http://{addr}/v2/credentials/task"),
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN",
                "wrong-auth-token".into(),
            ),
        ],
    )
    .await;
    let text = line
        .strip_prefix("ERROR ")
        .unwrap_or_else(|| panic!("expected an error: {line}"));
    assert!(text.contains("no AWS credentials"), "{text}");
    assert!(text.contains("403"), "{text}");
    assert!(!text.contains("wrong-auth-token"), "{text}");
    assert!(!seen.lock().unwrap().is_empty());
}

fn imds_handler(r: &Request) -> Response {
    let token = r
        .headers
        .get("x-aws-ec2-metadata-token")
        .map(String::as_str);
    match (r.method.as_str(), r.path.as_str(), token) {
        ("PUT", "/latest/api/token", _)
            if r.headers
                .contains_key("x-aws-ec2-metadata-token-ttl-seconds") =>
        {
            let ttl = ("x-aws-ec2-metadata-token-ttl-seconds", "21600".to_string());
            (200, vec![ttl], "imds-session-token".into())
        }
        ("GET", "/latest/meta-data/iam/security-credentials/", Some("imds-session-token")) => {
            (200, vec![], "sluice-role".into())
        }
        (
            "GET",
            "/latest/meta-data/iam/security-credentials/sluice-role",
            Some("imds-session-token"),
        ) => (
            200,
            vec![],
            credentials_json("ASIAINSTANCE", "imds-secret", "imds-session"),
        ),
        _ => (401, vec![], String::new()),
    }
}

#[tokio::test]
async fn chain_reads_instance_metadata_v2() {
    let (addr, seen) = serve(imds_handler).await;
    let line = run_chain(
        "token",
        &[
            ("AWS_EC2_METADATA_DISABLED", "false".into()),
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                format!("http://{addr}"),
            ),
        ],
    )
    .await;
    check_token(&line, "ASIAINSTANCE", "imds-session");
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter()
            .all(|r| r.method == "PUT" || r.headers.contains_key("x-aws-ec2-metadata-token")),
        "every metadata read carries the IMDSv2 session token: {seen:?}"
    );
}
