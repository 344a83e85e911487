//! The admin console's PgBouncer commands through psql: SHOW VERSION, DATABASES, USERS, LISTS,
//! STATS (per database) and GROUP_STATS; RECONNECT and WAIT_CLOSE; KILL and RESUME of one
//! database; SHUTDOWN.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::admin::psql;
use crate::pg::PgOptions;
use crate::proxy::{connect, start_from_file};
use crate::support::{pg_with_user, within};

async fn backend_pid(c: &Client) -> i32 {
    within(
        "pg_backend_pid()",
        c.query_one("SELECT pg_backend_pid()", &[]),
    )
    .await
    .expect("pid")
    .get(0)
}

/// A table's row for `key` (its first column), split on `|`.
fn row<'a>(table: &'a str, key: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.split('|').next() == Some(key))
        .unwrap_or_else(|| panic!("no row {key} in {table}"))
        .split('|')
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_commands_work_as_in_pgbouncer() {
    let pg = Arc::new(pg_with_user(PgOptions::default(), "ctl_u", "pw", "ctl"));
    pg.create_user("ops", "ops-pw");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            "upstream = \"{}\"\nmax_server_connections = 5\npool_size = 3\nshutdown_grace = \"0s\"\n\
             admin_users = [\"ops\"]\n[users.ops]\npassword = \"ops-pw\"\n",
            pg.url("ctl_u", "pw", "ctl")
        ),
    )
    .expect("write config");
    let h = start_from_file(&path).await;
    let port = h.local_addr.port();
    let admin = |sql: &str| tokio::task::block_in_place(|| psql(&pg, port, "ops", "ops-pw", sql));
    let must = |sql: &str| {
        let (ok, out) = admin(sql);
        assert!(ok, "{sql}: {out}");
        out
    };

    assert!(must("SHOW VERSION").contains("Sluice "));
    let a = connect(&h, "ctl_u", "pw", "ctl").await.expect("client a");
    for _ in 0..3 {
        within("SELECT 1", a.simple_query("SELECT 1"))
            .await
            .expect("query");
    }
    let stats = must("SHOW STATS");
    assert!(
        stats.starts_with("database|total_xact_count|total_xact_time|total_wait_time|avg_xact_time|avg_wait_time\n"),
        "{stats}"
    );
    let xacts: u64 = row(&stats, "ctl")[1].parse().expect("count");
    assert!(xacts >= 3, "{stats}");
    assert!(must("SHOW GROUP_STATS").starts_with("group|total_xact_count|"));
    let databases = must("SHOW DATABASES");
    assert_eq!(
        row(&databases, "ctl")[..7],
        [
            "ctl",
            "127.0.0.1",
            &pg.port().to_string(),
            "ctl",
            "3",
            "0",
            "transaction"
        ],
        "{databases}"
    );
    let users = must("SHOW USERS");
    assert_eq!(row(&users, "ops")[3], "yes", "{users}");
    assert_eq!(row(&users, "ctl_u")[2], "1", "one client of ctl_u: {users}");
    let lists = must("SHOW LISTS");
    assert_eq!(row(&lists, "databases")[1], "1", "{lists}");
    assert_eq!(row(&lists, "users")[1], "2", "{lists}");

    // RECONNECT: the idle server connection closes now; the one a transaction holds closes
    // when it comes back, which WAIT_CLOSE waits for.
    let b = connect(&h, "ctl_u", "pw", "ctl").await.expect("client b");
    within("BEGIN", b.simple_query("BEGIN"))
        .await
        .expect("BEGIN");
    let held_pid = backend_pid(&b).await;
    let idle_pid = backend_pid(&a).await;
    assert_ne!(idle_pid, held_pid);
    must("RECONNECT ctl");
    let servers = must("SHOW SERVERS");
    assert!(
        !servers.contains(&format!("|{idle_pid}|")) && servers.contains(&format!("|{held_pid}|")),
        "{servers}"
    );
    let waiting = tokio::task::spawn_blocking({
        let pg = pg.clone();
        move || psql(&pg, port, "ops", "ops-pw", "WAIT_CLOSE ctl")
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "WAIT_CLOSE waits for the held connection"
    );
    within("COMMIT", b.simple_query("COMMIT"))
        .await
        .expect("COMMIT");
    let (ok, out) = within("WAIT_CLOSE", waiting).await.expect("join");
    assert!(ok, "{out}");
    let pids = [backend_pid(&a).await, backend_pid(&b).await];
    assert!(
        !pids.contains(&idle_pid) && !pids.contains(&held_pid),
        "new connections after RECONNECT: {pids:?} vs {idle_pid}, {held_pid}"
    );

    // KILL: its clients are told 57P01, and new ones wait until RESUME.
    must("KILL ctl");
    let err = within("a query after KILL", a.simple_query("SELECT 1"))
        .await
        .expect_err("killed");
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.code().code() == "57P01")
            || err.is_closed(),
        "{err}"
    );
    let c = connect(&h, "ctl_u", "pw", "ctl").await.expect("client c");
    let held = tokio::spawn(async move { c.simple_query("SELECT 2").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "a killed database is paused");
    must("RESUME ctl");
    within("after RESUME", held)
        .await
        .expect("join")
        .expect("served after RESUME");
    let (ok, out) = admin("KILL nosuch");
    assert!(!ok && out.contains("no database \"nosuch\""), "{out}");
    let (ok, out) = admin("KILL");
    assert!(!ok && out.contains("KILL needs a database"), "{out}");

    // SHUTDOWN: as SIGTERM, Sluice drains and ends.
    must("SHUTDOWN");
    drop((a, b));
    tokio::time::timeout(Duration::from_secs(40), h.wait())
        .await
        .expect("Sluice ends after SHUTDOWN");
}
