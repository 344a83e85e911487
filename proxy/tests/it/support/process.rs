//! Sluice as its own process (the `sluice` binary), for what an in-process instance cannot show:
//! its memory alone (the test binary's threads run other tests), signals, the exit status.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A running `sluice` binary, configured by environment only; killed when dropped.
pub struct SluiceProcess {
    pub child: Child,
    /// The client port and the admin endpoint, from its start-up log line.
    pub local: SocketAddr,
    pub admin: SocketAddr,
    /// Its log lines after the start-up one, colour codes dropped.
    pub log: Receiver<String>,
}

/// The `sluice` binary with a clean environment (PATH only), both ports on loopback (any free
/// port) and no stdin.
pub fn command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("SLUICE_LISTEN", "127.0.0.1:0")
        .env("SLUICE_ADMIN_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null());
    cmd
}

impl SluiceProcess {
    /// Starts the binary with a clean environment, `SLUICE_*` settings from `env`, both ports on
    /// loopback (any free port), and waits for it to listen.
    pub fn spawn(env: &[(&str, &str)]) -> SluiceProcess {
        use std::io::BufRead;
        let mut cmd = command();
        cmd.env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sluice runs");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(strip_colour(&line));
            }
        });
        let field = |l: &str, key: &str| -> Option<SocketAddr> {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match log.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => panic!("sluice did not log that it listens"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("sluice exited at start-up: {:?}", child.wait())
                }
            };
            if line.contains("sluice listening") {
                let local = field(&line, "local_addr=").expect("local_addr");
                let admin = field(&line, "admin_addr=").expect("admin_addr");
                return SluiceProcess {
                    child,
                    local,
                    admin,
                    log,
                };
            }
        }
    }

    /// Its resident set size, in KiB.
    pub fn rss_kib(&self) -> i64 {
        rss_kib_of(&self.child.id().to_string()).expect("VmRSS of sluice")
    }

    /// Its open file descriptors (sockets included).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// `postgres://` URL of Sluice for `user` on `db`.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{user}:{password}@{}:{}/{db}",
            self.local.ip(),
            self.local.port()
        )
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `line` without ANSI colour codes.
fn strip_colour(line: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in line.chars() {
        match c {
            '\u{1b}' => esc = true,
            'm' if esc => esc = false,
            c if !esc => out.push(c),
            _ => {}
        }
    }
    out
}

/// Sends `signal` (`TERM`, `HUP`, ...) to process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill -{signal} {pid}: {sent}");
}

/// The resident set size of process `pid` (`self` for this one) in KiB, from `/proc/PID/status`.
pub fn rss_kib_of(pid: &str) -> Option<i64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
