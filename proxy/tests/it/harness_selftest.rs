//! Tests of the PostgreSQL test harness itself (`pg.rs`).

use crate::pg::{PgOptions, PgServer};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Asserts that a connection attempt failed with `invalid_password` (28P01).
fn assert_bad_password(res: Result<Client, tokio_postgres::Error>) {
    match res {
        Ok(_) => panic!("connecting with a wrong password must fail"),
        Err(err) => assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}"),
    }
}

async fn query_one_string(client: &Client, sql: &str) -> String {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn superuser_connects_with_scram_and_options_apply() {
    let pg = PgServer::start(PgOptions {
        max_connections: 17,
        extra_conf: vec![("work_mem".into(), "'7MB'".into())],
        ..Default::default()
    });
    assert_eq!(pg.host(), "127.0.0.1");
    let (user, pw) = pg.superuser();
    let client = connect(&pg.url(user, pw, "postgres")).await.unwrap();
    assert_eq!(
        query_one_string(&client, "SHOW max_connections").await,
        "17"
    );
    assert_eq!(query_one_string(&client, "SHOW work_mem").await, "7MB");
    assert_eq!(
        query_one_string(&client, "SHOW listen_addresses").await,
        "127.0.0.1"
    );
    assert_eq!(query_one_string(&client, "SHOW fsync").await, "off");
    let scram: bool = client
        .query_one(
            "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert!(scram, "superuser password is not stored as SCRAM");
    let methods = pg.psql("SELECT DISTINCT auth_method FROM pg_hba_file_rules ORDER BY 1");
    assert_eq!(methods, "scram-sha-256");
    let port: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, i32::from(pg.port()));
}

#[tokio::test]
async fn create_user_and_database_then_connect() {
    let pg = PgServer::start(PgOptions::default());
    pg.create_user("app user", "p@ss:w/rd'1");
    pg.create_database("app db", "app user");
    let client = connect(&pg.url("app user", "p@ss:w/rd'1", "app db"))
        .await
        .unwrap();
    let row = client
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "app user");
    assert_eq!(row.get::<_, String>(1), "app db");
    client
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    assert_eq!(
        pg.psql(
            "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'app user'"
        ),
        "t"
    );
    assert_eq!(pg.psql_db("app db", "SELECT count(*) FROM t"), "1");

    // Wrong password: SCRAM authentication fails.
    assert_bad_password(connect(&pg.url("app user", "wrong", "app db")).await);
    let (su, _) = pg.superuser();
    assert_bad_password(connect(&pg.url(su, "wrong", "postgres")).await);
}

#[tokio::test]
async fn unix_socket_uses_scram() {
    let pg = PgServer::start(PgOptions::default());
    let (user, pw) = pg.superuser();
    let mut cfg = tokio_postgres::Config::new();
    cfg.host_path(pg.socket_dir())
        .port(pg.port())
        .user(user)
        .dbname("postgres");
    cfg.password("wrong");
    assert_bad_password(cfg.connect(NoTls).await.map(|(client, _conn)| client));
    cfg.password(pw);
    let (client, conn) = cfg.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    assert_eq!(query_one_string(&client, "SELECT 'ok'::text").await, "ok");
}

#[tokio::test]
async fn stop_and_start_again_on_same_port() {
    let pg = PgServer::start(PgOptions::default());
    let (user, pw) = pg.superuser();
    let url = pg.url(user, pw, "postgres");
    let port = pg.port();
    pg.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)");
    let client = connect(&url).await.unwrap();
    assert!(pg.is_running());

    pg.stop();
    assert!(!pg.is_running());
    assert!(client.simple_query("SELECT 1").await.is_err());
    assert!(
        connect(&url).await.is_err(),
        "server still accepts after stop"
    );
    pg.stop(); // idempotent

    pg.start_again();
    assert!(pg.is_running());
    assert_eq!(pg.port(), port);
    let client = connect(&url).await.unwrap();
    let x: i32 = client
        .query_one("SELECT x FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(x, 42);
}

#[test]
fn parallel_servers_get_distinct_ports() {
    let servers: Vec<PgServer> = (0..4)
        .map(|_| std::thread::spawn(|| PgServer::start(PgOptions::default())))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let mut ports: Vec<u16> = servers.iter().map(|s| s.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), servers.len());
    for s in &servers {
        assert_eq!(s.psql("SELECT inet_server_port()"), s.port().to_string());
    }
}

#[test]
fn drop_stops_server_and_removes_files() {
    let pg = PgServer::start(PgOptions::default());
    let data = pg.data_dir().to_path_buf();
    let port = pg.port();
    assert!(data.join("postmaster.pid").exists());
    drop(pg);
    assert!(!data.exists(), "{} still exists", data.display());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
#[should_panic(expected = "psql failed")]
fn psql_panics_on_error() {
    let pg = PgServer::start(PgOptions::default());
    pg.psql("SELECT no_such_column FROM no_such_table");
}

#[test]
fn binaries_are_found() {
    let pg = PgServer::start(PgOptions::default());
    for name in ["psql", "pgbench", "pg_ctl", "pg_isready"] {
        assert!(pg.bin(name).is_file(), "{}", pg.bin(name).display());
    }
    assert_eq!(pg.psql("SELECT 1 + 1"), "2");
}
