//! Passthrough authentication (`auth = "passthrough"`): roles Sluice has no list of log in
//! through it, PostgreSQL itself judging their passwords; their SCRAM keys are kept for the
//! next logins (SCRAM-SHA-256-PLUS included) and for further server connections, after a
//! restart too; a changed password is noticed; wrong passwords and unknown roles get the same
//! answer, and repeated failures are limited without server logins.
//!
//! The server's `log_connections` lines count its logins per role: what each step cost it.

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::certs::{IssueOpts, TestCa};
use crate::drivers::{require_node_postgres, require_python, run_driver_at, DriverTarget};
use crate::pg::PgServer;
use crate::proxy::{connect_tls, start_sluice_tls, FileSluice, TlsOpts, TlsSettings};
use crate::support::within_for;
use crate::tls::{
    client_tls, code_and_message, scalar, start_pg, Files, DB, GUARD, PASSWORD, USER,
};

/// Server logins as `role`, from the server's log.
pub(crate) fn logins(pg: &PgServer, role: &str) -> usize {
    pg.log_contents()
        .matches(&format!("connection authorized: user={role} "))
        .count()
}

/// Logins the server refused for a wrong password as `role`.
fn refused(pg: &PgServer, role: &str) -> usize {
    pg.log_contents()
        .matches(&format!(
            "password authentication failed for user \"{role}\""
        ))
        .count()
}

/// Roles `{prefix}{i}` with password `pw-{i}`, for i in `0..n`, stored as SCRAM.
fn create_roles(pg: &PgServer, prefix: &str, n: usize) {
    pg.psql(&format!(
        "SET password_encryption = 'scram-sha-256'; DO $$ BEGIN FOR i IN 0..{} LOOP \
         EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L', '{prefix}' || i, 'pw-' || i); \
         END LOOP; END $$",
        n - 1
    ));
}

/// Sluice with passthrough for every database, `tls` in its file (budget 6, pools of 2).
async fn sluice(
    pg: &PgServer,
    tls: &TlsSettings,
    tweak: impl FnOnce(&mut sluice::config::Config),
) -> FileSluice {
    start_sluice_tls(pg, USER, PASSWORD, DB, 6, 2, tls, |c| {
        c.auth = sluice::config::AuthMode::Passthrough;
        c.wait_timeout = Duration::from_secs(30);
        c.shed_target = Duration::from_secs(30);
        tweak(c);
    })
    .await
}

/// A plaintext client through Sluice (from loopback, where passthrough takes a password).
pub(crate) async fn plain_as(
    h: &sluice::Handle,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let s = format!(
        "host=127.0.0.1 port={} user={user} password='{password}' dbname={db} sslmode=disable",
        h.local_addr.port()
    );
    let (client, conn) = within_for(GUARD, "connect", tokio_postgres::connect(&s, NoTls)).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// The error of a login that must fail.
fn failed<T>(r: Result<T, tokio_postgres::Error>, what: &str) -> (String, String) {
    match r {
        Ok(_) => panic!("{what}: logged in"),
        Err(e) => code_and_message(&e),
    }
}

/// `sluice_client_logins_total` with `labels` (the ones given, any `auth`).
async fn metric(h: &sluice::Handle, labels: &[(&str, &str)]) -> f64 {
    crate::tls::metric(h.admin_addr, "sluice_client_logins_total", labels).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_unlisted_roles_log_in_over_tls_verified_by_the_server_once() {
    let ca = TestCa::new("passthrough CA");
    let files = Files::new();
    let ca_file = files.ca(&ca, "ca.pem");
    let pg = start_pg(None).await;
    create_roles(&pg, "pt_", 50);
    let s = sluice(
        &pg,
        &client_tls(&files, &ca.issue(&IssueOpts::default()), "require"),
        |_| {},
    )
    .await;
    let h = &s.handle;
    let ca_pem = ca.cert_pem();
    let as_role = |i: usize, opts: TlsOpts| {
        let (user, password) = (format!("pt_{i}"), format!("pw-{i}"));
        let ca_pem = ca_pem.clone();
        async move {
            let c = connect_tls(h, &user, &password, DB, &ca_pem, opts)
                .await
                .unwrap_or_else(|e| panic!("{user}: {:?}", code_and_message(&e)));
            assert_eq!(scalar(&c, "SELECT current_user").await, user);
        }
    };

    // First logins: a cleartext password over TLS, which the server verifies by a login.
    let plus_before = metric(h, &[("method", "scram-sha-256-plus"), ("result", "ok")]).await;
    for i in 0..50 {
        as_role(i, TlsOpts::default()).await;
    }
    for i in 0..50 {
        assert_eq!(
            logins(&pg, &format!("pt_{i}")),
            1,
            "pt_{i}: one verifying login"
        );
    }
    // Next logins: SCRAM-SHA-256-PLUS against the kept keys (a client requiring channel
    // binding never sends a cleartext password), and server connections log in with them.
    for i in 0..50 {
        as_role(
            i,
            TlsOpts {
                channel_binding: true,
                ..TlsOpts::default()
            },
        )
        .await;
    }
    let plus = metric(h, &[("method", "scram-sha-256-plus"), ("result", "ok")]).await;
    assert!(plus - plus_before >= 50.0, "{plus_before} -> {plus}");
    assert!(metric(h, &[("method", "password"), ("result", "ok")]).await >= 50.0);
    // Pools of 2 in a budget of 6: most roles' connections were evicted for others, and
    // their second sessions logged in again with the kept keys.
    let again: usize = (0..50).map(|i| logins(&pg, &format!("pt_{i}"))).sum();
    assert!((50..=100).contains(&again), "{again} server logins");

    // Each role again with psql (verify-full, channel binding required: against the kept
    // keys), psycopg and node-postgres, all verifying Sluice's certificate.
    for i in 0..50 {
        let conninfo = format!(
            "host=127.0.0.1 port={} user=pt_{i} dbname={DB} sslmode=verify-full sslrootcert={} channel_binding=require",
            h.local_addr.port(),
            ca_file.display()
        );
        let out = tokio::task::block_in_place(|| {
            pg.psql_conninfo(&conninfo, &format!("pw-{i}"), "SELECT current_user")
        });
        assert!(
            out.status.success(),
            "pt_{i}: {}",
            crate::support::output_text(&out)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("pt_{i}")
        );
    }
    let each = DriverTarget {
        port: h.local_addr.port(),
        user: "unused",
        password: "unused",
        db: DB,
        tls_ca: Some(&ca_file),
    };
    let args: [&std::ffi::OsStr; 4] = ["".as_ref(), "pt_".as_ref(), "pw-".as_ref(), "50".as_ref()];
    let python = require_python("psycopg");
    let dir = crate::drivers::drivers_dir().join("python");
    let mut py_args = args;
    py_args[0] = "logins.py".as_ref();
    run_driver_at(&each, &pg, "psycopg-logins", &python, &py_args, &dir).await;
    let (node, node_dir) = require_node_postgres();
    let mut node_args = args;
    node_args[0] = "logins.js".as_ref();
    run_driver_at(&each, &pg, "node-logins", &node, &node_args, &node_dir).await;

    // psql, verifying Sluice's certificate, and requiring channel binding.
    let conninfo = format!(
        "host=127.0.0.1 port={} user=pt_7 dbname={DB} sslmode=verify-full sslrootcert={} channel_binding=require",
        h.local_addr.port(),
        ca_file.display()
    );
    let out =
        tokio::task::block_in_place(|| pg.psql_conninfo(&conninfo, "pw-7", "SELECT current_user"));
    assert!(
        out.status.success(),
        "{}",
        crate::support::output_text(&out)
    );
    // A role that never logged in cannot with channel_binding=require: its first login needs
    // the cleartext password, which libpq then refuses to send.
    pg.create_user("pt_new", "pw-new");
    let conninfo = conninfo.replace("user=pt_7", "user=pt_new");
    let out = tokio::task::block_in_place(|| pg.psql_conninfo(&conninfo, "pw-new", "SELECT 1"));
    assert!(
        !out.status.success(),
        "{}",
        crate::support::output_text(&out)
    );
    assert_eq!(logins(&pg, "pt_new"), 0);

    // Drivers over TLS as a role of their own (their first logins come at once).
    pg.create_user("pt_driver", "pw-driver");
    pg.psql_db(DB, "GRANT CREATE ON SCHEMA public TO pt_driver");
    let target = DriverTarget {
        port: h.local_addr.port(),
        user: "pt_driver",
        password: "pw-driver",
        db: DB,
        tls_ca: Some(&ca_file),
    };
    let python = require_python("psycopg");
    let dir = crate::drivers::drivers_dir().join("python");
    let line = run_driver_at(
        &target,
        &pg,
        "psycopg",
        &python,
        &["test_psycopg.py".as_ref()],
        &dir,
    )
    .await;
    eprintln!("{line} (passthrough, TLS)");
    let (node, dir) = require_node_postgres();
    let line = run_driver_at(
        &target,
        &pg,
        "node-postgres",
        &node,
        &["test.js".as_ref()],
        &dir,
    )
    .await;
    eprintln!("{line} (passthrough, TLS)");
    s.handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_and_unknown_roles_look_alike_and_failures_are_limited() {
    let pg = start_pg(None).await;
    create_roles(&pg, "lim_", 2);
    let s = sluice(&pg, &TlsSettings::default(), |_| {}).await;
    let h = &s.handle;

    // The same answer, PostgreSQL's, for a wrong password and for a role that does not exist.
    let (code, wrong) = failed(plain_as(h, "lim_0", "nope", DB).await, "wrong password");
    assert_eq!(code, "28P01", "{wrong}");
    let (code, unknown) = failed(plain_as(h, "ghost", "nope", DB).await, "unknown role");
    assert_eq!(code, "28P01", "{unknown}");
    assert_eq!(wrong.replace("lim_0", "ghost"), unknown);
    // A database Sluice does not serve: no server can judge, so the same answer.
    let (code, m) = failed(
        plain_as(h, "lim_0", "pw-0", "elsewhere").await,
        "unknown database",
    );
    assert_eq!(code, "28P01", "{m}");
    // An empty password costs no server login either.
    let (code, _) = failed(plain_as(h, "lim_0", "", DB).await, "empty password");
    assert_eq!(code, "28P01");
    assert_eq!(refused(&pg, "lim_0"), 1);

    // Three more wrong passwords make five failures for lim_0: then even the right password
    // is refused, after a delay, with no server login.
    for _ in 0..3 {
        failed(plain_as(h, "lim_0", "nope", DB).await, "wrong password");
    }
    assert_eq!(
        refused(&pg, "lim_0"),
        4,
        "the empty password counted, without a login"
    );
    let limited_before = metric(h, &[("method", "password"), ("result", "limited")]).await;
    let started = Instant::now();
    let (code, m) = failed(plain_as(h, "lim_0", "pw-0", DB).await, "limited login");
    assert_eq!((code.as_str(), m), ("28P01", wrong.clone()));
    assert!(started.elapsed() >= sluice::passthrough::LIMITED_DELAY);
    assert_eq!(refused(&pg, "lim_0"), 4);
    assert_eq!(logins(&pg, "lim_0"), 0);
    assert!(metric(h, &[("method", "password"), ("result", "limited")]).await > limited_before);
    // Another role from the same address is not limited (an address gets more failures).
    let c = plain_as(h, "lim_1", "pw-1", DB).await.unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, "lim_1");
    // The configured user logs in as ever, against its configured secret.
    let c = plain_as(h, USER, PASSWORD, DB).await.unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, USER);
    s.handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_keys_outlive_a_restart_and_a_changed_password_is_noticed() {
    let ca = TestCa::new("passthrough restart CA");
    let files = Files::new();
    let pg = start_pg(None).await;
    pg.create_user("rot", "old-pw");
    let tls = client_tls(&files, &ca.issue(&IssueOpts::default()), "require");
    // Every checkout checks its connection first, so the dead ones are replaced.
    let s = sluice(&pg, &tls, |c| {
        c.server_check_delay = Duration::ZERO;
        if let Some(db) = c.databases.get_mut(DB) {
            db.min_pool_size = Some(1);
        }
    })
    .await;
    let h = &s.handle;
    let ca_pem = ca.cert_pem();
    let bound = TlsOpts {
        channel_binding: true,
        ..TlsOpts::default()
    };
    let login = |password: &'static str, opts: TlsOpts| {
        let ca_pem = ca_pem.clone();
        async move { connect_tls(h, "rot", password, DB, &ca_pem, opts).await }
    };
    let c = login("old-pw", TlsOpts::default()).await.unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, "rot");
    drop(c);

    // The server restarts: the pooled connection is gone, and the pool (min_pool_size 1)
    // refills with the kept keys before any client logs in again.
    tokio::task::block_in_place(|| {
        pg.stop();
        pg.start_again();
    });
    within_for(Duration::from_secs(20), "the pool refills", async {
        while logins(&pg, "rot") < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // The next login (bound, so never cleartext) uses that connection.
    let c = login("old-pw", bound).await.unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, "rot");
    drop(c);
    assert_eq!(
        logins(&pg, "rot"),
        2,
        "the log of both runs: no cleartext needed after"
    );

    // The password is set again and the role's connections are ended: the next server login
    // with the kept keys meets another salt, and Sluice forgets them.
    pg.psql("SET password_encryption = 'scram-sha-256'; ALTER ROLE rot PASSWORD 'new-pw'");
    pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'rot'");
    let c = login("old-pw", bound).await.unwrap();
    let e = within_for(GUARD, "query", c.simple_query("SELECT 1"))
        .await
        .unwrap_err();
    let (code, m) = code_and_message(&e);
    assert!(m.contains("salt"), "{code} {m}");
    drop(c);
    let (code, _) = failed(login("old-pw", bound).await, "bound, keys forgotten");
    assert_eq!(code, "", "the client refuses to send a cleartext password");
    let (code, _) = failed(login("old-pw", TlsOpts::default()).await, "old password");
    assert_eq!(code, "28P01");
    let c = login("new-pw", TlsOpts::default()).await.unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, "rot");
    let c = login("new-pw", bound).await.unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, "rot");
    s.handle.stop().await;

    // passthrough_ttl: keys no server login has used for that long are dropped.
    let s = sluice(&pg, &tls, |c| c.passthrough_ttl = Duration::from_secs(1)).await;
    let h = &s.handle;
    let login = |password: &'static str, opts: TlsOpts| {
        let ca_pem = ca_pem.clone();
        async move { connect_tls(h, "rot", password, DB, &ca_pem, opts).await }
    };
    let c = login("new-pw", TlsOpts::default()).await.unwrap();
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    drop(c);
    login("new-pw", bound)
        .await
        .expect("bound login within the TTL");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    failed(login("new-pw", bound).await, "bound login after the TTL");
    login("new-pw", TlsOpts::default())
        .await
        .expect("cleartext login after the TTL");
    s.handle.stop().await;
}

/// The most server connections open at once, and the most of them logging in at once, in a
/// server log with `log_connections` and `log_disconnections` (`[pid]` in each line's prefix):
/// a connection is open from `connection received` to `disconnection` (or its FATAL, which
/// ends a refused login), and logging in until `connection authorized`. A connection with no
/// line after `connection received` never sent a startup packet: Sluice's readiness probe of
/// the server's port (a TCP connect, once a second), not a server connection.
pub(crate) fn concurrency(log: &str) -> (usize, usize) {
    concurrency_after(log, 0)
}

/// [`concurrency`] from byte `from` of `log` on, counting connections opened before it too.
pub(crate) fn concurrency_after(log: &str, from: usize) -> (usize, usize) {
    use std::collections::{HashMap, HashSet};
    let pid = |line: &str| {
        line.split_once(" [")
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(pid, _)| pid.to_string())
    };
    let mut lines_of: HashMap<String, usize> = HashMap::new();
    for p in log.lines().filter_map(pid) {
        *lines_of.entry(p).or_default() += 1;
    }
    let (mut open, mut logging_in) = (HashSet::new(), HashSet::new());
    let (mut max_open, mut max_logging_in) = (0, 0);
    let mut at = 0;
    for line in log.lines() {
        let counts = at >= from;
        at += line.len() + 1;
        let Some(pid) = pid(line).filter(|p| lines_of[p] > 1) else {
            continue;
        };
        if line.contains("LOG:  connection received:") {
            open.insert(pid.clone());
            logging_in.insert(pid);
        } else if line.contains("LOG:  connection authorized:") {
            logging_in.remove(&pid);
        } else if line.contains("LOG:  disconnection:") || line.contains("FATAL:") {
            open.remove(&pid);
            logging_in.remove(&pid);
        }
        if counts {
            max_open = max_open.max(open.len());
            max_logging_in = max_logging_in.max(logging_in.len());
        }
    }
    (max_open, max_logging_in)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_500_first_logins_of_20_roles_stays_within_max_connecting_and_the_budget() {
    let opts = crate::pg::PgOptions {
        max_connections: 20,
        log_connections: true,
        extra_conf: vec![("log_disconnections".into(), "on".into())],
        ..Default::default()
    };
    let pg = crate::support::start_pg_with_user(opts, USER, PASSWORD, DB).await;
    create_roles(&pg, "burst_", 20);
    let s = sluice(&pg, &TlsSettings::default(), |c| c.max_connecting = 2).await;
    let h = &s.handle;
    let before = pg.log_contents().len();
    let clients = (0..500).map(|i| async move {
        let (user, password) = (format!("burst_{}", i % 20), format!("pw-{}", i % 20));
        let c = plain_as(h, &user, &password, DB)
            .await
            .unwrap_or_else(|e| panic!("{user}: {:?}", code_and_message(&e)));
        assert_eq!(scalar(&c, "SELECT current_user").await, user);
    });
    futures_util::future::join_all(clients).await;
    let log = pg.log_contents();
    let (open, logging_in) = concurrency(&log[before..]);
    // Budget 6, max_connecting 2: what the server saw, not what Sluice counted. Twenty roles
    // in a budget of 6 evict one another's idle connections all the time; an evicted
    // connection holds its place until the server has closed it, so the one that takes its
    // place never meets the old backend still exiting.
    assert!(logging_in <= 2, "{logging_in} logins at once");
    assert!(open <= 6, "{open} server connections at once");
    s.handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_first_logins_of_one_role_costs_about_max_connecting_server_logins() {
    let pg = start_pg(None).await;
    pg.create_user("burst", "burst-pw");
    let s = sluice(&pg, &TlsSettings::default(), |c| c.max_connecting = 2).await;
    let h = &s.handle;
    let clients = (0..30).map(|_| async {
        let c = plain_as(h, "burst", "burst-pw", DB)
            .await
            .unwrap_or_else(|e| panic!("{:?}", code_and_message(&e)));
        assert_eq!(scalar(&c, "SELECT current_user").await, "burst");
    });
    futures_util::future::join_all(clients).await;
    // At most two verifying logins at once (max_connecting); the logins behind them check the
    // password against the keys the first kept. Then the pool of 2 serves the queries.
    let n = logins(&pg, "burst");
    assert!(
        (1..=4).contains(&n),
        "{n} server logins for 30 first logins"
    );
    s.handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_with_no_users_serves_roles_through_passthrough() {
    let pg = start_pg(None).await;
    create_roles(&pg, "solo_", 1);
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("sluice.toml");
    // No [users]: Sluice's own logins (the budget read, readiness) as a control user. The
    // budget is derived from the server and pools keep a warm connection, which the pool of
    // verifying logins must not (it has no user to log in as).
    std::fs::write(
        &path,
        format!(
            "server_host = \"{}\"\nserver_port = {}\nauth = \"passthrough\"\n\
             control_user = \"{USER}\"\ncontrol_password = \"{PASSWORD}\"\n\
             [databases.{DB}]\nmin_pool_size = 1\n",
            pg.host(),
            pg.port()
        ),
    )
    .expect("write the configuration");
    let h = crate::proxy::start_from_file(&path).await;
    let c = plain_as(&h, "solo_0", "pw-0", DB).await.unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, "solo_0");
    // The control user is no client's: it is not in users, so it logs in like any role.
    let c = plain_as(&h, USER, PASSWORD, DB).await.unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, USER);
    let (code, _) = failed(plain_as(&h, "solo_0", "wrong", DB).await, "wrong password");
    assert_eq!(code, "28P01");
    // A RELOAD gives every pool its configured sizes again, the verifying logins' pool its own.
    h.context.reload().await.expect("RELOAD");
    // Maintenance ticks every second: three of them, and the warm connection of solo_0's pool
    // (its kept keys) is there, while nothing logged in without a user name.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = pg.log_contents();
    assert!(!log.contains("no PostgreSQL user name"), "{log}");
    assert!(logins(&pg, "solo_0") >= 1);
    h.stop().await;
}
