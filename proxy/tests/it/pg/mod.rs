//! Test harness that runs a real, throw-away PostgreSQL server.
//!
//! Every [`PgServer`] gets its own data directory (a copy of a per-process
//! template made once with `initdb`), its own free TCP port on 127.0.0.1 and
//! its own Unix socket directory, so many servers can run in parallel threads
//! of one test binary. Authentication is SCRAM-SHA-256 for TCP and local
//! connections. Dropping a `PgServer` stops the server and deletes its files.
//!
//! PostgreSQL refuses to run as root: when the tests run as root the server
//! binaries are run as the `postgres` OS user (created by Debian's package) or,
//! if that does not exist, as a `sluice-test` system user created on demand.
//!
//! The server binaries are found with `pg_config --bindir`, else in the newest
//! `/usr/lib/postgresql/*/bin`; `PGTEST_BINDIR` overrides both.
//! Server directories go to `/dev/shm` when it has room (fast), else `/tmp`;
//! `PGTEST_TMPDIR` overrides that. Directories left by killed test
//! processes (and postmasters still running in them) are cleaned up by the
//! next test process.
#![allow(dead_code)]

mod host;

use host::*;
pub use host::{bin, pg_os_user, pick_port};

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const HOST: &str = "127.0.0.1";
const SUPERUSER: &str = "postgres";
const SUPERUSER_PASSWORD: &str = "sluice-super-secret";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const PORT_ATTEMPTS: usize = 10;

/// Options for [`PgServer::start`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `max_connections` of the server.
    pub max_connections: u32,
    /// Extra `postgresql.conf` settings, written last (so they override ours).
    /// Values are written verbatim: quote strings yourself, e.g. `"'on'"`.
    pub extra_conf: Vec<(String, String)>,
    /// Serve TLS with this certificate (see [`PgTls`]).
    pub tls: Option<PgTls>,
    /// `log_connections = on`: the log then has a `connection authorized: ...` line per login,
    /// which says whether it used TLS (`SSL enabled (protocol=...)`). See
    /// [`PgServer::log_contents`].
    pub log_connections: bool,
    /// Listen on this loopback address (`listen_addresses`, e.g. `127.0.0.2`) rather than
    /// 127.0.0.1, and on this port rather than a free one: two servers on one port at
    /// different addresses stand for one endpoint's hosts before and after a failover.
    pub listen: Option<(&'static str, u16)>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 30,
            extra_conf: Vec::new(),
            tls: None,
            log_connections: false,
            listen: None,
        }
    }
}

/// TLS for a test server: `server.crt` and `server.key` are written into the data directory
/// (owned by the server's OS user, the key mode 0600 as PostgreSQL demands) and `ssl = on`.
#[derive(Debug, Clone)]
pub struct PgTls {
    /// The server certificate (PEM; may be followed by intermediates).
    pub cert_pem: String,
    /// Its private key (PEM, PKCS#8 or traditional).
    pub key_pem: String,
    /// TCP logins only over TLS: `pg_hba.conf` has `hostssl` and no `host` line, which is what
    /// RDS's `rds.force_ssl = 1` amounts to. A plaintext TCP login then fails with `no
    /// pg_hba.conf entry for host "127.0.0.1", user "...", database "...", no encryption`.
    /// (The harness's own psql calls keep working: libpq's default `sslmode=prefer` uses TLS.)
    pub hostssl_only: bool,
}

/// A running (or stopped, see [`PgServer::stop`]) PostgreSQL server.
pub struct PgServer {
    host: &'static str,
    port: u16,
    /// Whether the server serves TLS.
    tls: bool,
    /// Instance root (removed on drop); holds `data/`, the socket and the log.
    dir: tempfile::TempDir,
    data: PathBuf,
    log: PathBuf,
    child: Mutex<Option<Child>>,
}

impl PgServer {
    /// Starts a fresh server. Panics with a clear message on failure.
    pub fn start(opts: PgOptions) -> PgServer {
        let tpl = template();
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let dir = new_owned_tempdir("");
            let data = dir.path().join("data");
            run_checked(
                Command::new("cp").arg("-a").arg(&tpl.data).arg(&data),
                "copy template data directory",
            );
            let (host, port) = opts.listen.unwrap_or_else(|| (HOST, pick_port()));
            let mut conf = format!(
                "\n# --- per-server settings (sluice test harness) ---\n\
                 port = {port}\n\
                 max_connections = {}\n\
                 unix_socket_directories = '{}'\n",
                opts.max_connections,
                dir.path().display()
            );
            if opts.log_connections {
                conf.push_str("log_connections = on\n");
            }
            if host != HOST {
                conf.push_str(&format!("listen_addresses = '{host}'\n"));
            }
            if let Some(tls) = &opts.tls {
                crate::certs::write_pem(&data, "server.crt", &tls.cert_pem, pg_user(), 0o644);
                crate::certs::write_pem(&data, "server.key", &tls.key_pem, pg_user(), 0o600);
                conf.push_str(
                    "ssl = on\n\
                     ssl_cert_file = 'server.crt'\n\
                     ssl_key_file = 'server.key'\n",
                );
                if tls.hostssl_only {
                    let hba = data.join("pg_hba.conf");
                    fs::write(
                        &hba,
                        "# sluice test harness: TCP only over TLS\n\
                         local all all scram-sha-256\n\
                         hostssl all all 127.0.0.1/32 scram-sha-256\n",
                    )
                    .expect("write pg_hba.conf");
                    chown_to_pg_user(&hba);
                }
            }
            for (k, v) in &opts.extra_conf {
                conf.push_str(&format!("{k} = {v}\n"));
            }
            append(&data.join("postgresql.conf"), &conf);

            let server = PgServer {
                host,
                port,
                tls: opts.tls.is_some(),
                log: dir.path().join("postgres.log"),
                data,
                dir,
                child: Mutex::new(None),
            };
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(StartError::AddrInUse(log)) => {
                    // Someone grabbed the port between our probe and the
                    // server's bind(): try again with another one.
                    last_log = log;
                    continue;
                }
                Err(StartError::Other(msg)) => panic!("{msg}"),
            }
        }
        panic!(
            "PostgreSQL test server: port still in use after {PORT_ATTEMPTS} attempts; last log:\n{last_log}"
        );
    }

    /// A hot standby of `primary`, on `listen` (a loopback address and port): a base backup of
    /// it (`pg_basebackup`) streaming its WAL from it, read-only (`in_hot_standby`) until
    /// [`PgServer::promote`]. Its `application_name` toward the primary is `standby`.
    pub fn standby_of(primary: &PgServer, listen: (&'static str, u16)) -> PgServer {
        let dir = new_owned_tempdir("standby-");
        let data = dir.path().join("data");
        let mut cmd = Command::new(bin("pg_basebackup"));
        cmd.args(["-h", primary.host, "-p", &primary.port.to_string()])
            .args(["-U", SUPERUSER, "-D"])
            .arg(&data)
            .args(["-X", "stream", "-c", "fast", "--no-sync"])
            .env("PGPASSWORD", SUPERUSER_PASSWORD)
            .env("PGSSLMODE", "prefer")
            .stdin(Stdio::null());
        as_pg_user(&mut cmd, dir.path());
        run_checked(&mut cmd, "pg_basebackup");
        let (host, port) = listen;
        append(
            &data.join("postgresql.conf"),
            &format!(
                "\n# --- standby (sluice test harness) ---\n\
                 port = {port}\n\
                 listen_addresses = '{host}'\n\
                 unix_socket_directories = '{}'\n\
                 primary_conninfo = 'host={} port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} application_name=standby'\n",
                dir.path().display(),
                primary.host,
                primary.port
            ),
        );
        let signal = data.join("standby.signal");
        fs::write(&signal, "").expect("write standby.signal");
        chown_to_pg_user(&signal);
        let server = PgServer {
            host,
            port,
            tls: primary.tls,
            log: dir.path().join("postgres.log"),
            data,
            dir,
            child: Mutex::new(None),
        };
        match server.spawn_and_wait() {
            Ok(()) => server,
            Err(StartError::AddrInUse(log) | StartError::Other(log)) => {
                panic!("the standby did not start: {log}")
            }
        }
    }

    /// Promotes a standby to primary, waiting until it is writable.
    pub fn promote(&self) {
        let out = self.psql("SELECT pg_promote(true, 60)");
        assert_eq!(out, "t", "pg_promote");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &str {
        self.host
    }

    /// Whether the server was started with [`PgOptions::tls`].
    pub fn has_tls(&self) -> bool {
        self.tls
    }

    /// Superuser name and password (SCRAM-SHA-256).
    pub fn superuser(&self) -> (&str, &str) {
        (SUPERUSER, SUPERUSER_PASSWORD)
    }

    /// `postgres://user:password@127.0.0.1:port/db` (user and password percent-encoded).
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{}",
            pct(user),
            pct(password),
            self.host,
            self.port,
            pct(db)
        )
    }

    /// URL of the superuser for the `postgres` database.
    pub fn superuser_url(&self) -> String {
        self.url(SUPERUSER, SUPERUSER_PASSWORD, "postgres")
    }

    /// `CREATE ROLE name LOGIN PASSWORD 'password'` (stored as SCRAM-SHA-256).
    pub fn create_user(&self, name: &str, password: &str) {
        self.psql(&format!(
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE {} LOGIN PASSWORD {}",
            quote_ident(name),
            quote_literal(password)
        ));
    }

    /// `CREATE DATABASE name OWNER owner`.
    pub fn create_database(&self, name: &str, owner: &str) {
        self.psql(&format!(
            "CREATE DATABASE {} OWNER {}",
            quote_ident(name),
            quote_ident(owner)
        ));
    }

    /// Runs `sql` with psql as superuser on database `postgres` over TCP and
    /// returns stdout (`-At`: unaligned, tuples only). Panics on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    /// Like [`PgServer::psql`] on another database.
    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        let out = output(
            Command::new(self.bin("psql"))
                .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
                .args(["-h", self.host, "-p", &self.port.to_string()])
                .args(["-U", SUPERUSER, "-d", db, "-c", sql])
                .env("PGPASSWORD", SUPERUSER_PASSWORD)
                .env("PGCONNECT_TIMEOUT", "10")
                // libpq's default, sslmode=prefer, also reaches a `hostssl`-only server.
                .env("PGSSLMODE", "prefer")
                .env_remove("PGSSLROOTCERT")
                .env_remove("PGSERVICE")
                .env_remove("PGOPTIONS")
                .stdin(Stdio::null()),
            "psql",
        );
        if !out.status.success() {
            panic!(
                "psql failed ({}) running {sql:?} on port {}:\n{}",
                out.status,
                self.port,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    /// Runs this server's psql with a libpq connection string `conninfo` (which may point
    /// anywhere, e.g. at Sluice) and `password`, `-X -A -t -q -v ON_ERROR_STOP=1 -c sql`, and
    /// returns its output without judging it. `PGSSL*` variables are cleared, so only `conninfo`
    /// decides about TLS. Blocks: call it from `spawn_blocking` or `block_in_place`.
    pub fn psql_conninfo(&self, conninfo: &str, password: &str, sql: &str) -> Output {
        output(
            Command::new(self.bin("psql"))
                .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
                .arg("-d")
                .arg(conninfo)
                .args(["-c", sql])
                .env("PGPASSWORD", password)
                .env("PGCONNECT_TIMEOUT", "10")
                .env_remove("PGSSLMODE")
                .env_remove("PGSSLROOTCERT")
                .env_remove("PGSSLNEGOTIATION")
                .env_remove("PGCHANNELBINDING")
                .env_remove("PGSERVICE")
                .env_remove("PGOPTIONS")
                .stdin(Stdio::null()),
            "psql",
        )
    }

    /// Stops the server (fast shutdown: clients are disconnected, data is
    /// kept). Does nothing if it is not running. Use [`PgServer::start_again`]
    /// to bring it back on the same port and data directory.
    pub fn stop(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(child) = guard.take() {
            shutdown(child, libc::SIGINT, STOP_TIMEOUT);
        }
    }

    /// Starts a server stopped by [`PgServer::stop`] again, on the same port
    /// and data directory. Panics if it cannot (e.g. the port was taken).
    pub fn start_again(&self) {
        if self.is_running() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                // The old listen socket can linger very briefly; retry a bit.
                Err(StartError::AddrInUse(log)) => {
                    if Instant::now() > deadline {
                        panic!(
                            "PostgreSQL test server: port {} is taken, cannot start again; log:\n{log}",
                            self.port
                        );
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(StartError::Other(msg)) => panic!("{msg}"),
            }
        }
    }

    /// Alias of [`PgServer::start_again`].
    pub fn restart_after_stop(&self) {
        self.start_again()
    }

    /// Whether the postmaster process we started is still alive.
    pub fn is_running(&self) -> bool {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Path of a PostgreSQL binary, e.g. `bin("pgbench")`.
    pub fn bin(&self, name: &str) -> PathBuf {
        bin(name)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Directory of the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Contents of the server log so far.
    pub fn log_contents(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Spawns the postmaster and waits until it accepts connections.
    fn spawn_and_wait(&self) -> Result<(), StartError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log.display()));
        let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log.try_clone().expect("dup log fd");
        let mut cmd = Command::new(bin("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        as_pg_user(&mut cmd, self.dir.path());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin("postgres").display()));
        let pid = child.id();
        let read_log = || {
            let all = fs::read(&self.log).unwrap_or_default();
            String::from_utf8_lossy(&all[(log_offset as usize).min(all.len())..]).into_owned()
        };

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = read_log();
                if log.contains("Address already in use") {
                    return Err(StartError::AddrInUse(log));
                }
                return Err(StartError::Other(format!(
                    "PostgreSQL test server exited during startup ({status}), port {}, data dir {}; log:\n{log}",
                    self.port,
                    self.data.display()
                )));
            }
            if postmaster_ready(&self.data, pid, self.port) {
                *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                shutdown(child, libc::SIGQUIT, Duration::from_secs(5));
                return Err(StartError::Other(format!(
                    "PostgreSQL test server did not become ready within {START_TIMEOUT:?} on port {}; log:\n{}",
                    self.port,
                    read_log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(child) = guard.take() {
            // Immediate shutdown: nothing needs to survive.
            shutdown(child, libc::SIGQUIT, Duration::from_secs(10));
        }
        release_port(self.port);
        // The TempDir field removes the directory after this.
    }
}

enum StartError {
    AddrInUse(String),
    Other(String),
}

/// Sends `sig` to the postmaster and waits for it; SIGKILL after `timeout`.
fn shutdown(mut child: Child, sig: libc::c_int, timeout: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: plain kill(2) on the pid of our own, not yet reaped, child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// True when `postmaster.pid` says our postmaster accepts connections
/// (the same check `pg_ctl -w` does).
fn postmaster_ready(data: &Path, pid: u32, port: u16) -> bool {
    let Ok(text) = fs::read_to_string(data.join("postmaster.pid")) else {
        return false;
    };
    let lines: Vec<&str> = text.lines().collect();
    lines.len() >= 8
        && lines[0].trim() == pid.to_string()
        && lines[3].trim() == port.to_string()
        && lines[7].trim() == "ready"
}

// ---------------------------------------------------------------------------
// Template data directory (initdb once per test process).

struct Template {
    root: PathBuf,
    data: PathBuf,
}

fn template() -> &'static Template {
    static TEMPLATE: OnceLock<Template> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        // Kept for the whole process; removed by an atexit hook.
        let root = new_owned_tempdir("template-").keep();
        register_cleanup(root.clone());
        let data = root.join("data");
        let pwfile = root.join("pwfile");
        fs::write(&pwfile, format!("{SUPERUSER_PASSWORD}\n")).expect("write pwfile");
        chown_to_pg_user(&pwfile);

        let mut cmd = Command::new(bin("initdb"));
        cmd.arg("-D")
            .arg(&data)
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["-U", SUPERUSER])
            .args(["--auth-local=scram-sha-256", "--auth-host=scram-sha-256"])
            .args(["-E", "UTF8", "--locale=C", "--no-sync", "--wal-segsize=1"])
            .stdin(Stdio::null());
        as_pg_user(&mut cmd, &root);
        let out = output(&mut cmd, "initdb");
        let _ = fs::remove_file(&pwfile);
        if !out.status.success() {
            panic!(
                "initdb failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        fs::write(
            data.join("pg_hba.conf"),
            "# sluice test harness\n\
             local all all scram-sha-256\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host replication all 127.0.0.1/32 scram-sha-256\n",
        )
        .expect("write pg_hba.conf");
        append(
            &data.join("postgresql.conf"),
            "\n# --- sluice test harness ---\n\
             listen_addresses = '127.0.0.1'\n\
             password_encryption = 'scram-sha-256'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 32MB\n\
             max_parallel_workers_per_gather = 0\n",
        );
        Template { root, data }
    })
}

fn register_cleanup(path: PathBuf) {
    static CLEANUP: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    extern "C" fn cleanup() {
        if let Ok(paths) = CLEANUP.lock() {
            for p in paths.iter() {
                let _ = fs::remove_dir_all(p);
            }
        }
    }
    let mut paths = CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
    if paths.is_empty() {
        // SAFETY: registering a plain extern "C" function with atexit(3).
        unsafe {
            libc::atexit(cleanup);
        }
    }
    paths.push(path);
}

// ---------------------------------------------------------------------------
// Small helpers.

fn output(cmd: &mut Command, what: &str) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({:?}): {e}", cmd.get_program()))
}

fn run_checked(cmd: &mut Command, what: &str) {
    let out = output(cmd, what);
    if !out.status.success() {
        panic!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn append(path: &Path, text: &str) {
    let mut f: File = OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Percent-encodes everything but unreserved URL characters.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
