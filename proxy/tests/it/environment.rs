//! The binary's environment: unknown `SLUICE_*` variables stop start-up, except the ones
//! Kubernetes injects for a Service named `sluice`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sluice() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("SLUICE_UPSTREAM", "postgres://app:pw@127.0.0.1:9/appdb")
        .env("SLUICE_LISTEN", "127.0.0.1:0")
        .env("SLUICE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("SLUICE_MAX_SERVER_CONNECTIONS", "4")
        .stdin(Stdio::null())
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
