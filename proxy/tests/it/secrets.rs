//! Rotated secrets: the password Sluice presents to the server comes from a file that is read
//! again on RELOAD and after a refused login, while connected clients keep working.

use std::path::{Path, PathBuf};

use tokio_postgres::Client;

use crate::pg::{quote_ident, quote_literal, PgOptions, PgServer};
use crate::proxy::connect;
use crate::support::{describe, start_pg_with_user, within};

const DB: &str = "rotdb";
const CLIENT_PASSWORD: &str = "client-pw";

/// A Sluice started from a configuration file whose user `user` logs in to the server with
/// the password in `password_file`.
struct Rotation {
    pg: PgServer,
    sluice: sluice::Handle,
    user: &'static str,
    password_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Rotation {
    async fn start(user: &'static str) -> Rotation {
        let pg = start_pg_with_user(PgOptions::default(), user, "old-pw", DB).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let password_file = dir.path().join("server-password");
        replace_file(&password_file, "old-pw\n");
        let path = dir.path().join("sluice.toml");
        let text = format!(
            "server_host = \"127.0.0.1\"\nserver_port = {}\nserver_tls = \"disable\"\n\
             max_server_connections = 4\npool_size = 4\nadmin_users = [\"ops\"]\n\
             [databases.{DB}]\n\
             [users.{user}]\npassword = \"{CLIENT_PASSWORD}\"\nserver_password_file = {}\n\
             [users.ops]\npassword = \"ops-pw\"\n",
            pg.port(),
            toml::Value::String(password_file.display().to_string()),
        );
        std::fs::write(&path, text).expect("write the configuration");
        let flags = sluice::config::Overrides {
            listen: Some("127.0.0.1:0".parse().expect("address")),
            admin_listen: Some("127.0.0.1:0".parse().expect("address")),
            ..Default::default()
        };
        let cfg = sluice::config::Config::load(Some(&path), &flags).expect("config");
        let sluice = sluice::start_from(cfg, Some(path), flags)
            .await
            .expect("sluice starts");
        Rotation {
            pg,
            sluice,
            user,
            password_file,
            _dir: dir,
        }
    }

    /// A client through Sluice that has run a query.
    async fn client(&self) -> Client {
        let c = within(
            "connect through Sluice",
            connect(&self.sluice, self.user, CLIENT_PASSWORD, DB),
        )
        .await
        .unwrap_or_else(|e| panic!("connect: {}", describe(&e)));
        self.query(&c).await.expect("first query");
        c
    }

    async fn query(&self, c: &Client) -> Result<(), tokio_postgres::Error> {
        within("query through Sluice", c.simple_query("SELECT 1"))
            .await
            .map(drop)
    }

    /// The server's password for the user changes to `password`.
    fn alter_password(&self, password: &str) {
        self.pg.psql(&format!(
            "SET password_encryption = 'scram-sha-256'; ALTER ROLE {} PASSWORD {}",
            quote_ident(self.user),
            quote_literal(password)
        ));
    }

    /// Server backends of the user.
    fn backends(&self) -> usize {
        self.pg
            .psql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = {}",
                quote_literal(self.user)
            ))
            .parse()
            .expect("count")
    }

    /// Logins of the user the server refused so far.
    fn refused_logins(&self) -> usize {
        self.pg
            .log_contents()
            .matches(&format!(
                "password authentication failed for user \"{}\"",
                self.user
            ))
            .count()
    }

    /// The password Sluice logs in with now.
    fn password_in_force(&self) -> String {
        self.sluice
            .context
            .server_password(self.user)
            .expect("a server password")
            .current()
    }
}

/// Replaces `path` the way a Kubernetes Secret volume or a rotation hook does: a new file
/// renamed over the old one.
fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).expect("write the new secret");
    std::fs::rename(&tmp, path).expect("rename the new secret into place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_switches_the_server_password_without_dropping_sessions() {
    let r = Rotation::start("rot_reload").await;
    let (a, holder) = (r.client().await, r.client().await);
    assert_eq!(
        r.backends(),
        1,
        "both clients were served by one server connection"
    );

    r.alter_password("new-pw");
    replace_file(&r.password_file, "new-pw\n");
    let admin = within(
        "connect to the admin console",
        connect(&r.sluice, "ops", "ops-pw", "sluice"),
    )
    .await
    .unwrap_or_else(|e| panic!("admin console: {}", describe(&e)));
    within("RELOAD", admin.simple_query("RELOAD"))
        .await
        .unwrap_or_else(|e| panic!("RELOAD: {}", describe(&e)));
    assert_eq!(r.password_in_force(), "new-pw");

    // The clients connected before the reload keep working, on the connection logged in
    // with the old password.
    r.query(&a).await.expect("query after RELOAD");
    // With that connection held, a client connected before the reload needs a new one,
    // which logs in with the new password (the old one no longer works on the server).
    within("BEGIN", holder.simple_query("BEGIN"))
        .await
        .expect("BEGIN");
    r.query(&a)
        .await
        .unwrap_or_else(|e| panic!("a new server login after RELOAD: {}", describe(&e)));
    assert_eq!(r.backends(), 2);
    // And so does a new client's.
    within("BEGIN", a.simple_query("BEGIN"))
        .await
        .expect("BEGIN");
    let b = r.client().await;
    assert_eq!(r.backends(), 3);
    // RELOAD switched the password: no login was refused on the way.
    assert_eq!(r.refused_logins(), 0, "{}", r.pg.log_contents());
    for c in [&a, &holder] {
        within("COMMIT", c.simple_query("COMMIT"))
            .await
            .expect("COMMIT");
    }
    r.query(&b).await.expect("query");
    r.sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_reads_the_password_file_again() {
    let r = Rotation::start("rot_refused").await;
    let (a, holder) = (r.client().await, r.client().await);
    within("BEGIN", holder.simple_query("BEGIN"))
        .await
        .expect("BEGIN");

    // Rotated on the server and in the file, no RELOAD: the next new server connection is
    // refused with the old password, and logs in with the file's new one.
    r.alter_password("new-pw");
    replace_file(&r.password_file, "new-pw\n");
    r.query(&a)
        .await
        .unwrap_or_else(|e| panic!("a login after the rotation: {}", describe(&e)));
    assert_eq!(r.backends(), 2);
    assert_eq!(r.refused_logins(), 1);
    assert_eq!(r.password_in_force(), "new-pw");

    // A wrong password in the file: one read and one more refused login per attempt, and
    // within a second of the last read, not even that. The client is told that the server
    // refused Sluice's login (08004, naming the server), not that its own password is wrong.
    within("BEGIN", a.simple_query("BEGIN"))
        .await
        .expect("BEGIN");
    let b = within(
        "connect through Sluice",
        connect(&r.sluice, r.user, CLIENT_PASSWORD, DB),
    )
    .await
    .expect("connect");
    r.alter_password("newer-pw");
    replace_file(&r.password_file, "wrong-pw\n");
    tokio::time::sleep(sluice::server::password::REREAD_INTERVAL).await;
    let server = format!("{}:{}", r.pg.host(), r.pg.port());
    let refused = |e: tokio_postgres::Error| {
        let db = e
            .as_db_error()
            .unwrap_or_else(|| panic!("an error from Sluice: {}", describe(&e)));
        assert_eq!(db.code().code(), "08004", "{}", describe(&e));
        assert!(
            db.message().contains(&format!(
                "the database server {server} refused Sluice's login as \"{}\"",
                r.user
            )) && db.message().contains("password authentication failed"),
            "{}",
            describe(&e)
        );
        assert!(
            db.hint().is_some_and(|h| h.contains("server_password")),
            "{}",
            describe(&e)
        );
    };
    refused(r.query(&b).await.expect_err("the file's password is wrong"));
    assert_eq!(
        r.refused_logins(),
        3,
        "the current password, then the file's"
    );
    assert_eq!(r.password_in_force(), "wrong-pw");
    refused(r.query(&b).await.expect_err("still wrong"));
    assert_eq!(
        r.refused_logins(),
        4,
        "within the interval the file is not read"
    );

    // Fixed in the file: the next attempt (a second later) reads it and logs in.
    replace_file(&r.password_file, "newer-pw\n");
    tokio::time::sleep(sluice::server::password::REREAD_INTERVAL).await;
    r.query(&b)
        .await
        .unwrap_or_else(|e| panic!("a login after fixing the file: {}", describe(&e)));
    assert_eq!(r.refused_logins(), 5);
    assert_eq!(r.backends(), 3);
    // The clients connected all along still work.
    for c in [&a, &holder] {
        within("COMMIT", c.simple_query("COMMIT"))
            .await
            .expect("COMMIT");
    }
    r.sluice.stop().await;
}
