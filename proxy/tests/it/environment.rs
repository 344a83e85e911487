//! The binary's environment: unknown `SLUICE_*` variables stop start-up, except the ones
//! Kubernetes injects for a Service named `sluice`; logs that suit whatever reads stderr.

use std::io::{BufRead, BufReader, Lines, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::process::signal;

fn sluice() -> Command {
    let mut c = crate::support::process::command();
    c.env("SLUICE_UPSTREAM", "postgres://app:pw@127.0.0.1:9/appdb")
        .env("SLUICE_MAX_SERVER_CONNECTIONS", "4")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn a_misspelt_key_stops_start_up_and_service_links_do_not() {
    let out = sluice()
        .env("SLUICE_SERVER_TSL", "verify-full")
        .output()
        .expect("sluice runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "a misspelt key is refused: {text}");
    assert!(text.contains("server_tsl"), "the error names it: {text}");

    // Service links only: Sluice starts (and keeps running until killed).
    let mut child = sluice()
        .env("SLUICE_PORT", "tcp://10.0.0.7:6432")
        .env("SLUICE_PORT_6432_TCP_ADDR", "10.0.0.7")
        .env("SLUICE_SERVICE_HOST", "10.0.0.7")
        .env("SLUICE_SERVICE_PORT", "6432")
        .spawn()
        .expect("sluice runs");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            panic!(
                "sluice exited ({status}) with only service-link variables: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("service-link"),
        "the ignored variables are logged: {log}"
    );
}

/// Starts `cmd` and reads its stderr up to the start-up line; returns the child, the lines read
/// and the reader (still open), and the client port.
fn start(
    mut cmd: Command,
) -> (
    Child,
    Vec<String>,
    Lines<BufReader<ChildStderr>>,
    SocketAddr,
) {
    let mut child = cmd.spawn().expect("sluice runs");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    loop {
        let line = match lines.next() {
            Some(Ok(line)) => line,
            _ => panic!("sluice exited at start-up: {seen:?} {:?}", child.wait()),
        };
        seen.push(line.clone());
        if line.contains("sluice listening") {
            let local = match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) => v["local_addr"].as_str().map(str::to_string),
                Err(_) => line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("local_addr="))
                    .map(str::to_string),
            };
            let local = local
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("local_addr in {line}"));
            return (child, seen, lines, local);
        }
    }
}

/// Off a terminal (systemd, Docker, CloudWatch) log lines carry no colour codes; with
/// `log_format = "json"` every line is one JSON object.
#[test]
fn logs_are_plain_off_a_terminal_and_json_on_request() {
    let (mut child, text, _, _) = start(sluice());
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.iter().all(|l| !l.contains('\u{1b}')),
        "no ANSI codes: {text:?}"
    );

    let mut json = sluice();
    json.env("SLUICE_LOG_FORMAT", "json");
    let (mut child, lines, _, _) = start(json);
    let _ = child.kill();
    let _ = child.wait();
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    let started: serde_json::Value =
        serde_json::from_str(lines.last().expect("a line")).expect("JSON");
    assert_eq!(started["message"], "sluice listening", "{started}");
}

/// When whatever reads stderr goes away (a log shipper restarts, a terminal closes), Sluice
/// goes on serving and still shuts down on SIGTERM: a failed log write loses the line only.
#[test]
fn a_vanished_log_reader_takes_nothing_down() {
    let mut cmd = sluice();
    cmd.env("SLUICE_SHUTDOWN_GRACE", "0");
    let (mut child, _, lines, local) = start(cmd);
    drop(lines);
    // Log-worthy events: a reload, and clients that send garbage.
    signal(child.id(), "HUP");
    for _ in 0..3 {
        let mut s = TcpStream::connect(local).expect("still accepting");
        let _ = s.write_all(b"\0\0\0\x08garbage!");
        let _ = s.read(&mut [0u8; 256]);
    }
    // Still serving: an SSLRequest is answered.
    let mut s = TcpStream::connect(local).expect("still accepting");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f]).unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).expect("an answer to SSLRequest");
    assert!(matches!(&answer, b"N" | b"S"), "{answer:?}");
    drop(s);

    signal(child.id(), "TERM");
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("sluice ignored SIGTERM once its log reader was gone");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

/// A key the file sets and the environment or a flag overrides is named in a warning, never
/// with its value: the container image's `SLUICE_ADMIN_LISTEN` used to replace a file's
/// `admin_listen` without a word.
#[test]
fn an_override_of_the_file_is_logged_without_its_value() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        "admin_listen = \"127.0.0.1:1\"\npool_size = 3\nclient_login_timeout = \"5s\"\n\
         [users.app]\npassword = \"file-secret\"\n",
    )
    .expect("write config");
    let mut cmd = sluice();
    cmd.env("SLUICE_CONFIG", &path)
        .env("SLUICE_POOL_SIZE", "5")
        .env("SLUICE_USERS__APP__PASSWORD", "env-secret")
        .arg("--max-server-connections")
        .arg("4");
    let (mut child, lines, _, _) = start(cmd);
    let _ = child.kill();
    let _ = child.wait();
    let warned = |key: &str, by: &str| {
        lines.iter().any(|l| {
            l.contains("WARN")
                && l.contains("overridden")
                && l.contains(&format!("key={key} "))
                && l.contains(&format!("by={by}"))
        })
    };
    assert!(warned("admin_listen", "SLUICE_ADMIN_LISTEN"), "{lines:#?}");
    assert!(warned("pool_size", "SLUICE_POOL_SIZE"), "{lines:#?}");
    assert!(
        warned("users.app.password", "SLUICE_USERS__APP__PASSWORD"),
        "{lines:#?}"
    );
    // Set in one place only: no warning.
    for key in ["listen", "client_login_timeout", "max_server_connections"] {
        assert!(
            !lines.iter().any(|l| l.contains(&format!("key={key} "))),
            "{key}: {lines:#?}"
        );
    }
    let text = lines.join("\n");
    assert!(
        !text.contains("file-secret") && !text.contains("env-secret"),
        "{text}"
    );
}

/// `deploy/check.sh` says which tool is missing and how to install it, instead of failing
/// half-way with `promtool: command not found`.
#[test]
fn the_deploy_checks_name_a_missing_tool() {
    let bin = tempfile::tempdir().expect("tmp");
    // Only what the script needs before its first check (dirname); no promtool.
    let dirname = ["/usr/bin/dirname", "/bin/dirname"]
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("dirname");
    std::os::unix::fs::symlink(dirname, bin.path().join("dirname")).expect("link");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new("/bin/bash")
        .arg(format!("{root}/deploy/check.sh"))
        .env_clear()
        .env("PATH", bin.path())
        .output()
        .expect("bash runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("needs promtool") && err.contains("apt-get install -y prometheus"),
        "{err}"
    );
    assert!(!err.contains("command not found"), "{err}");
}
