//! Real drivers through Sluice in transaction pooling: named (protocol-level) prepared
//! statements must keep working while a client's transactions land on different server
//! connections. Each test starts PostgreSQL and Sluice (pool 3, budget 3) and runs one driver
//! from more concurrent connections than the pool has server connections:
//!
//! - node-postgres (`proxy/tests/drivers/node/test.js`, named queries),
//! - psycopg 3 (`proxy/tests/drivers/python/test_psycopg.py`, `prepare_threshold=0`),
//! - asyncpg (`proxy/tests/drivers/python/test_asyncpg.py`, prepares every query),
//! - pgjdbc (`proxy/tests/drivers/java/DriverTest.java`, `prepareThreshold=1`),
//! - tokio-postgres (here, `Client::prepare` then `query(&statement, ..)`),
//! - `pgbench -M prepared`.
//!
//! The scripts check every result themselves and print `OK <driver> <n> operations`. Their
//! runtimes and packages are installed by `bash .ci/run`; when one is missing the test fails
//! and says how to install it (these tests are never skipped). Overrides:
//! `DRIVER_TEST_PYTHON` (a Python with psycopg and asyncpg; default
//! `<workspace>/target/driver-venv/bin/python`) and `DRIVER_TEST_JDBC_JAR` (default
//! `/usr/share/java/postgresql.jar`). (Not `SLUICE_*`: Sluice reads every `SLUICE_*` variable as
//! configuration and rejects unknown keys.)
//!
//! The scripts also run over TLS (`tls_clients.rs`): given `DRIVER_TLS_CA`, the path of a PEM CA
//! bundle, each connects with TLS and verifies the server's certificate and host name against
//! it; without it they connect in plaintext as here.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use sluice::config::PoolMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::pg::{PgOptions, PgServer};
use crate::proxy::{connect, start_sluice};
use crate::support::{describe, pgbench_processed, within_for};

const USER: &str = "drv";
const PASSWORD: &str = "drv-pw";
const DB: &str = "drvdb";
/// Server connections Sluice may hold (pool size and global budget).
const POOL: u32 = 3;
/// Longest run of one driver script.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
const INSTALL_HINT: &str = "`bash .ci/run` installs every driver test dependency";

/// PostgreSQL with the test user owning the test database, and Sluice in front of it in
/// transaction pooling with a pool (and budget) of [`POOL`] server connections.
struct Env {
    sluice: sluice::Handle,
    pg: PgServer,
}

async fn env() -> Env {
    let pg = tokio::task::spawn_blocking(|| {
        let pg = PgServer::start(PgOptions {
            max_connections: 30,
            ..Default::default()
        });
        pg.create_user(USER, PASSWORD);
        pg.create_database(DB, USER);
        pg
    })
    .await
    .expect("PostgreSQL starts");
    let sluice = start_sluice(&pg, USER, PASSWORD, DB, POOL, POOL, |c| {
        c.pool_mode = PoolMode::Transaction;
        // The drivers' workers outnumber the pool: they queue, which is not what is tested
        // here, so neither a slow machine's waits nor shedding may fail them.
        c.wait_timeout = Duration::from_secs(30);
        c.shed_target = Duration::from_secs(30);
    })
    .await;
    Env { sluice, pg }
}

impl Env {
    /// The last lines of the PostgreSQL log, for failure messages.
    fn pg_log_tail(&self) -> String {
        log_tail(&self.pg)
    }
}

/// The last lines of a PostgreSQL log, for failure messages.
fn log_tail(pg: &PgServer) -> String {
    let log = pg.log_contents();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the proxy crate is in the workspace")
        .to_path_buf()
}

pub(crate) fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// `name` looked up on PATH, or a failure saying how to install `package`.
pub(crate) fn require_program(name: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "driver test needs `{name}`, which is not on PATH: install it with \
             `apt-get install -y {package}` ({INSTALL_HINT})"
        )
    })
}

/// The Python that has psycopg and asyncpg, or a failure saying how to make it.
pub(crate) fn require_python(module: &str) -> PathBuf {
    let python = match std::env::var_os("DRIVER_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => workspace().join("target/driver-venv/bin/python"),
    };
    let how = format!(
        "create it with `bash .ci/run`, or by hand: `python3 -m venv target/driver-venv && \
         target/driver-venv/bin/pip install -r proxy/tests/drivers/python/requirements.txt` in \
         {} (or point DRIVER_TEST_PYTHON at a Python that has them)",
        workspace().display()
    );
    assert!(
        python.is_file(),
        "driver test needs the Python venv with psycopg and asyncpg, and {} does not exist: {how}",
        python.display()
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {how}", python.display()));
    assert!(
        out.status.success(),
        "driver test needs the Python package `{module}` in {}, which cannot import it ({}): {how}",
        python.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    python
}

/// Runs a driver script against Sluice and checks it exited 0 and printed `OK <driver> ...`.
async fn run_driver(
    env: &Env,
    driver: &str,
    program: &Path,
    args: &[&OsStr],
    dir: &Path,
) -> String {
    let target = DriverTarget {
        port: env.sluice.local_addr.port(),
        user: USER,
        password: PASSWORD,
        db: DB,
        tls_ca: None,
    };
    run_driver_at(&target, &env.pg, driver, program, args, dir).await
}

/// Where [`run_driver_at`] points a driver script.
pub(crate) struct DriverTarget<'a> {
    pub port: u16,
    pub user: &'a str,
    pub password: &'a str,
    pub db: &'a str,
    /// A PEM CA bundle: the script connects with TLS and verifies the server against it
    /// (`DRIVER_TLS_CA`). `None`: plaintext (`PGSSLMODE=disable`).
    pub tls_ca: Option<&'a Path>,
}

/// Runs a driver script against 127.0.0.1:`target.port` and checks it exited 0 and printed
/// `OK <driver> ...`; `pg`'s log tail goes into failure messages.
pub(crate) async fn run_driver_at(
    target: &DriverTarget<'_>,
    pg: &PgServer,
    driver: &str,
    program: &Path,
    args: &[&OsStr],
    dir: &Path,
) -> String {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(dir)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", target.port.to_string())
        .env("PGUSER", target.user)
        .env("PGPASSWORD", target.password)
        .env("PGDATABASE", target.db);
    match target.tls_ca {
        Some(ca) => cmd
            .env("DRIVER_TLS_CA", ca)
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", ca),
        None => cmd
            .env_remove("DRIVER_TLS_CA")
            .env_remove("PGSSLROOTCERT")
            .env("PGSSLMODE", "disable"),
    };
    cmd.env("PGCONNECT_TIMEOUT", "30")
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("PGSERVICE")
        .env_remove("PGOPTIONS")
        .env_remove("PGSERVICEFILE")
        .env_remove("PGPASSFILE")
        .env_remove("DRIVER_WORKERS")
        .env_remove("DRIVER_ITERATIONS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let what = format!("{driver}: {cmd:?} in {}", dir.display());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e} ({INSTALL_HINT})"));
    let out: Output = match tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
        // Dropping the future kills the child (kill_on_drop).
        Err(_) => panic!(
            "{what}: no result after {SCRIPT_TIMEOUT:?} (killed)\nPostgreSQL log tail:\n{}",
            log_tail(pg)
        ),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let ok_line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("OK {driver} ")) && l.ends_with(" operations"));
    match ok_line {
        Some(line) if out.status.success() => line.to_string(),
        _ => panic!(
            "{what} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n\
             --- PostgreSQL log tail ---\n{}",
            out.status,
            log_tail(pg)
        ),
    }
}

/// `node` and the directory of the node-postgres script (with its node_modules), or a failure
/// saying how to install them.
pub(crate) fn require_node_postgres() -> (PathBuf, PathBuf) {
    let node = require_program("node", "nodejs");
    let dir = drivers_dir().join("node");
    assert!(
        dir.join("node_modules/pg/package.json").is_file(),
        "driver test needs node-postgres in {}/node_modules: run `npm ci --prefix \
         proxy/tests/drivers/node` (needs npm: `apt-get install -y npm`; {INSTALL_HINT})",
        dir.display()
    );
    (node, dir)
}

/// `java` and the pgjdbc jar, or a failure saying how to install them.
pub(crate) fn require_jdbc() -> (PathBuf, PathBuf) {
    let java = require_program("java", "default-jre-headless");
    let jar = std::env::var_os("DRIVER_TEST_JDBC_JAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/java/postgresql.jar"));
    assert!(
        jar.is_file(),
        "driver test needs the PostgreSQL JDBC driver at {}: install it with `apt-get install -y \
         libpostgresql-jdbc-java` ({INSTALL_HINT}), or set DRIVER_TEST_JDBC_JAR",
        jar.display()
    );
    (java, jar)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_named_queries() {
    let (node, dir) = require_node_postgres();
    let env = env().await;
    let line = run_driver(&env, "node-postgres", &node, &["test.js".as_ref()], &dir).await;
    eprintln!("{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_prepared_statements() {
    let python = require_python("psycopg");
    let dir = drivers_dir().join("python");
    let env = env().await;
    let line = run_driver(
        &env,
        "psycopg",
        &python,
        &["test_psycopg.py".as_ref()],
        &dir,
    )
    .await;
    eprintln!("{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_prepared_statements() {
    let python = require_python("asyncpg");
    let dir = drivers_dir().join("python");
    let env = env().await;
    let line = run_driver(
        &env,
        "asyncpg",
        &python,
        &["test_asyncpg.py".as_ref()],
        &dir,
    )
    .await;
    eprintln!("{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_prepared_statements() {
    let (java, jar) = require_jdbc();
    let dir = drivers_dir().join("java");
    let env = env().await;
    let args = [
        OsStr::new("-cp"),
        jar.as_os_str(),
        OsStr::new("DriverTest.java"),
    ];
    let line = run_driver(&env, "jdbc", &java, &args, &dir).await;
    eprintln!("{line}");
}

// ---------------------------------------------------------------------------------------------
// tokio-postgres.

const TOKIO_CLIENTS: i32 = 10;
const TOKIO_ITERATIONS: i32 = 100;

async fn through(env: &Env) -> Client {
    within_for(
        Duration::from_secs(30),
        "connect through Sluice",
        connect(&env.sluice, USER, PASSWORD, DB),
    )
    .await
    .unwrap_or_else(|e| panic!("connect through Sluice: {}", describe(&e)))
}

/// One tokio-postgres client: three statements prepared once, executed [`TOKIO_ITERATIONS`]
/// times each, in and out of transactions. Returns (committed rows, operations).
async fn tokio_worker(mut client: Client, w: i32) -> Result<(i64, u64), String> {
    let err =
        |what: &str, e: tokio_postgres::Error| format!("worker {w}: {what}: {}", describe(&e));
    let echo = client
        .prepare("SELECT $1::int4, $2::text, $3::bytea, $4::text, $5::int8, $6::float8")
        .await
        .map_err(|e| err("prepare echo", e))?;
    let insert = client
        .prepare("INSERT INTO drv_tokio (worker, i, payload) VALUES ($1, $2, $3) RETURNING id")
        .await
        .map_err(|e| err("prepare insert", e))?;
    let count = client
        .prepare("SELECT count(*) FROM drv_tokio WHERE worker = $1")
        .await
        .map_err(|e| err("prepare count", e))?;
    let (mut committed, mut ops) = (0i64, 3u64);
    let check = |cond: bool, what: String| {
        if cond {
            Ok(())
        } else {
            Err(format!("worker {w}: {what}"))
        }
    };

    for i in 0..TOKIO_ITERATIONS {
        // Outside a transaction: every type, the same statement again and again.
        let text = format!("w{w}-i{i}-ünïcødé");
        let bytes: Vec<u8> = vec![0, 1, 0xfe, 0xff, w as u8, i as u8, b'\\', b'\''];
        let big = (1i64 << 40) + i64::from(w * 1000 + i);
        let float = f64::from(i) + 0.25;
        let none: Option<&str> = None;
        let params: [&(dyn ToSql + Sync); 6] =
            [&(w * 1000 + i), &text, &bytes, &none, &big, &float];
        let rows = client
            .query(&echo, &params)
            .await
            .map_err(|e| err("echo", e))?;
        ops += 1;
        check(rows.len() == 1, format!("echo gave {} rows", rows.len()))?;
        let r = &rows[0];
        check(r.get::<_, i32>(0) == w * 1000 + i, "echo int4".into())?;
        check(r.get::<_, String>(1) == text, "echo text".into())?;
        check(r.get::<_, Vec<u8>>(2) == bytes, "echo bytea".into())?;
        check(r.get::<_, Option<String>>(3).is_none(), "echo NULL".into())?;
        check(r.get::<_, i64>(4) == big, "echo int8".into())?;
        check(r.get::<_, f64>(5) == float, "echo float8".into())?;

        // In a transaction: insert, count; commit three times out of four, else roll back.
        let tx = client.transaction().await.map_err(|e| err("BEGIN", e))?;
        let id: i64 = tx
            .query_one(&insert, &[&w, &i, &bytes])
            .await
            .map_err(|e| err("insert", e))?
            .get(0);
        check(id > 0, format!("id {id}"))?;
        let n: i64 = tx
            .query_one(&count, &[&w])
            .await
            .map_err(|e| err("count in transaction", e))?
            .get(0);
        check(
            n == committed + 1,
            format!("count in transaction {n}, expected {}", committed + 1),
        )?;
        let echoed = tx
            .query_one(&echo, &params)
            .await
            .map_err(|e| err("echo in transaction", e))?;
        check(
            echoed.get::<_, String>(1) == text,
            "echo text in transaction".into(),
        )?;
        if i % 4 == 3 {
            tx.rollback().await.map_err(|e| err("ROLLBACK", e))?;
        } else {
            tx.commit().await.map_err(|e| err("COMMIT", e))?;
            committed += 1;
        }
        ops += 5;

        // Outside again: the count shows exactly the committed rows.
        let n: i64 = client
            .query_one(&count, &[&w])
            .await
            .map_err(|e| err("count", e))?
            .get(0);
        ops += 1;
        check(n == committed, format!("count {n}, expected {committed}"))?;
    }
    Ok((committed, ops))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_named_statements() {
    let env = env().await;
    let setup = through(&env).await;
    setup
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS drv_tokio (id bigserial PRIMARY KEY, worker int NOT NULL, \
             i int NOT NULL, payload bytea)",
        )
        .await
        .unwrap_or_else(|e| panic!("create table: {}", describe(&e)));

    let mut clients = Vec::new();
    for _ in 0..TOKIO_CLIENTS {
        clients.push(through(&env).await);
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .zip(0..)
        .map(|(c, w)| tokio::spawn(tokio_worker(c, w)))
        .collect();
    let (mut committed, mut ops, mut failures) = (0i64, 0u64, Vec::new());
    for t in tasks {
        match within_for(Duration::from_secs(120), "tokio-postgres workers", t)
            .await
            .expect("worker task")
        {
            Ok((c, o)) => {
                committed += c;
                ops += o;
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "tokio-postgres through Sluice:\n{}\nPostgreSQL log tail:\n{}",
        failures.join("\n"),
        env.pg_log_tail()
    );
    let per_client = i64::from(TOKIO_ITERATIONS - TOKIO_ITERATIONS / 4);
    assert_eq!(committed, i64::from(TOKIO_CLIENTS) * per_client);
    let total: i64 = setup
        .query_one("SELECT count(*) FROM drv_tokio", &[])
        .await
        .unwrap_or_else(|e| panic!("total: {}", describe(&e)))
        .get(0);
    assert_eq!(total, committed, "rows in drv_tokio");
    eprintln!("OK tokio-postgres {ops} operations");
}

// ---------------------------------------------------------------------------------------------
// pgbench -M prepared.

async fn pgbench(env: &Env, args: &[&str], port: u16) -> (Output, String, String) {
    let mut cmd = std::process::Command::new(env.pg.bin("pgbench"));
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER])
        .args(args)
        .arg(DB)
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSERVICE")
        .env_remove("PGOPTIONS")
        .stdin(Stdio::null());
    let what = format!("{cmd:?}");
    let out = within_for(
        SCRIPT_TIMEOUT,
        &what,
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .expect("pgbench task")
    .unwrap_or_else(|e| panic!("cannot run pgbench (part of the PostgreSQL packages): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_mode() {
    let env = env().await;
    // Initialise straight against PostgreSQL.
    let (out, stdout, stderr) = pgbench(&env, &["-i", "-s", "1", "-q"], env.pg.port()).await;
    assert!(
        out.status.success(),
        "pgbench -i ({}):\n{stdout}\n{stderr}",
        out.status
    );

    // One thread per client (-j 8, not fewer): pgbench prepares each statement with a blocking
    // PQprepare on a client's first use, which stalls every other client of the same thread. With
    // several clients per thread, those holding the pool's 3 server connections in open
    // transactions then wait for the stalled thread, while the preparing client waits for a
    // server connection: a deadlock until wait_timeout (it would be the same with any
    // transaction pooler), seen as "at capacity" then "prepared statement P_0 does not exist".
    let args = ["-M", "prepared", "-c", "8", "-j", "8", "-T", "3"];
    let (out, stdout, stderr) = pgbench(&env, &args, env.sluice.local_addr.port()).await;
    let report = format!(
        "pgbench {args:?} through Sluice ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n\
         --- PostgreSQL log tail ---\n{}",
        out.status,
        env.pg_log_tail()
    );
    assert!(out.status.success(), "{report}");
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "{report}"
    );
    assert!(
        !stdout.contains("aborted") && !stderr.contains("aborted"),
        "{report}"
    );
    let processed: u64 =
        pgbench_processed(&stdout).unwrap_or_else(|| panic!("no transaction count in {report}"));
    assert!(processed > 0, "no transactions: {report}");
    eprintln!("OK pgbench {processed} transactions");
}
