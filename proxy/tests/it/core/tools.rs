//! psql and pgbench through Sluice.

use super::*;
use crate::support::pgbench_processed;

// ---------------------------------------------------------------------------------------------
// psql, pgbench.

/// Runs a PostgreSQL client program (psql, pgbench) without blocking the runtime.
async fn run(mut cmd: Command) -> Output {
    cmd.env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSERVICE")
        .env_remove("PGOPTIONS")
        .stdin(Stdio::null());
    let what = format!("{cmd:?}");
    within_for(
        Duration::from_secs(120),
        &what.clone(),
        tokio::task::spawn_blocking(move || cmd.output().expect("run client program")),
    )
    .await
    .expect("task")
}

fn psql(env: &Env) -> Command {
    let mut cmd = Command::new(env.pg.bin("psql"));
    cmd.arg(url(&env.sluice, USER, DB))
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]);
    cmd
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_scripts_and_large_objects() {
    let env = env(4, 2, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");

    // Several -c commands, then a file with a transaction and a \copy.
    let csv = dir.path().join("rows.csv");
    std::fs::write(&csv, (10..20).map(|i| format!("{i}\n")).collect::<String>()).expect("csv");
    let script = dir.path().join("script.sql");
    std::fs::write(
        &script,
        format!(
            "BEGIN;\n\
             INSERT INTO p VALUES (3), (4);\n\
             UPDATE p SET a = a * 10 WHERE a = 4;\n\
             COMMIT;\n\
             \\copy p FROM '{}'\n\
             SELECT count(*), sum(a) FROM p;\n",
            csv.display()
        ),
    )
    .expect("script");
    let mut cmd = psql(&env);
    cmd.args(["-c", "CREATE TABLE p (a int)"])
        .args(["-c", "INSERT INTO p VALUES (1), (2)"])
        .args(["-c", "SELECT sum(a) FROM p"])
        .arg("-f")
        .arg(&script);
    let out = run(cmd).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "psql failed: {stderr}");
    let sum: i32 = 1 + 2 + 3 + 40 + (10..20).sum::<i32>();
    assert_eq!(stdout, format!("3\n14|{sum}\n"), "stderr: {stderr}");

    // (e) Large objects: \lo_import and \lo_export use the function-call protocol.
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let src = dir.path().join("lo.bin");
    let dst = dir.path().join("lo.out");
    std::fs::write(&src, &data).expect("write");
    let mut cmd = psql(&env);
    cmd.args(["-c", &format!("\\lo_import '{}'", src.display())])
        .args(["-c", "\\echo :LASTOID"]);
    let out = run(cmd).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "lo_import failed: {stderr}");
    let oid: u32 = stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("lo_import: no OID in {stdout:?} {stderr}"));
    let mut cmd = psql(&env);
    cmd.args(["-c", &format!("\\lo_export {oid} '{}'", dst.display())])
        .args(["-c", &format!("\\lo_unlink {oid}")]);
    let out = run(cmd).await;
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "lo_export failed: {stderr}");
    assert!(
        std::fs::read(&dst).expect("exported") == data,
        "large object round trip"
    );
    let d = env.direct().await;
    assert_eq!(
        scalar(&d, "SELECT count(*) FROM pg_largeobject_metadata").await,
        "0",
        "unlinked"
    );
}

fn pgbench(env: &Env, args: &[&str], through_sluice: bool) -> Command {
    let mut cmd = Command::new(env.pg.bin("pgbench"));
    let port = if through_sluice {
        env.addr().port()
    } else {
        env.pg.port()
    };
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER])
        .args(args)
        .arg(DB);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_sluice() {
    let env = env(10, 10, |c| c.wait_timeout = Duration::from_secs(30)).await;
    let out = run(pgbench(&env, &["-i", "-s", "1", "-q"], false)).await;
    assert!(out.status.success(), "pgbench -i: {}", text(&out).1);

    for args in [
        &["-S", "-M", "simple", "-c", "20", "-j", "2", "-T", "3"][..],
        &["-S", "-M", "extended", "-c", "20", "-j", "2", "-T", "3"][..],
        &["-S", "-C", "-c", "10", "-j", "2", "-T", "3"][..],
    ] {
        let out = run(pgbench(&env, args, true)).await;
        let (stdout, stderr) = text(&out);
        assert!(
            out.status.success(),
            "pgbench {args:?} exited with {}:\n{stdout}\n{stderr}",
            out.status
        );
        assert!(
            stdout.contains("number of failed transactions: 0 "),
            "pgbench {args:?}:\n{stdout}\n{stderr}"
        );
        assert!(
            !stdout.contains("aborted") && !stderr.contains("aborted"),
            "pgbench {args:?}:\n{stdout}\n{stderr}"
        );
        let processed: u64 =
            pgbench_processed(&stdout).unwrap_or_else(|| panic!("no transaction count:\n{stdout}"));
        assert!(processed > 0, "pgbench {args:?} did no work:\n{stdout}");
    }
}
