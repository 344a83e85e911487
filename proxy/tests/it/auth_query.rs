//! `auth = "auth_query"`: roles Sluice has no list of log in with full SCRAM (SCRAM-SHA-256-PLUS
//! over TLS) or md5 against the secret the server's `pg_shadow` gives, fetched over Sluice's
//! control pool as the superuser; Sluice then logs in to the server as them with the ClientKey
//! their proof revealed, or with the md5 hash: no cleartext password anywhere.

use std::time::Duration;

use crate::certs::{IssueOpts, TestCa};
use crate::passthrough::{logins, plain_as};
use crate::pg::PgServer;
use crate::proxy::{connect_tls, start_sluice_tls, TlsOpts};
use crate::tls::{client_tls, code_and_message, scalar, start_pg, Files, DB, PASSWORD, USER};

/// Lets `role` log in with md5 (its password is stored as an md5 hash).
fn md5_role(pg: &PgServer, role: &str, password: &str) {
    pg.psql(&format!(
        "SET password_encryption = 'md5'; CREATE ROLE {role} LOGIN PASSWORD '{password}'"
    ));
    crate::tls_server_auth::prepend_hba(pg, &format!("host all {role} 127.0.0.1/32 md5"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_log_in_with_scram_and_md5_against_the_servers_own_secrets() {
    let ca = TestCa::new("auth_query CA");
    let files = Files::new();
    let ca_file = files.ca(&ca, "ca.pem");
    let pg = start_pg(None).await;
    pg.create_user("aq_scram", "scram-pw");
    md5_role(&pg, "aq_md5", "md5-pw");
    let (su, su_password) = pg.superuser();
    let (su, su_password) = (su.to_string(), su_password.to_string());
    let tls = client_tls(&files, &ca.issue(&IssueOpts::default()), "allow");
    let s = start_sluice_tls(&pg, USER, PASSWORD, DB, 6, 2, &tls, |c| {
        c.auth = sluice::config::AuthMode::AuthQuery;
        c.control_user = Some(su);
        c.control_password = Some(su_password);
        c.auth_query_ttl = Duration::from_secs(1);
        // Every checkout checks its connection: a terminated one is replaced, not used.
        c.server_check_delay = Duration::ZERO;
    })
    .await;
    let h = &s.handle;
    let ca_pem = ca.cert_pem();
    let bound = TlsOpts {
        channel_binding: true,
        ..TlsOpts::default()
    };

    // SCRAM-SHA-256-PLUS against the fetched verifier; the server login is Sluice's, with the
    // client's key.
    let c = connect_tls(h, "aq_scram", "scram-pw", DB, &ca_pem, bound)
        .await
        .unwrap_or_else(|e| panic!("{:?}", code_and_message(&e)));
    assert_eq!(scalar(&c, "SELECT current_user").await, "aq_scram");
    drop(c);
    assert_eq!(logins(&pg, "aq_scram"), 1);
    // psql, verifying Sluice's certificate and requiring channel binding.
    let conninfo = format!(
        "host=127.0.0.1 port={} user=aq_scram dbname={DB} sslmode=verify-full sslrootcert={} channel_binding=require",
        h.local_addr.port(),
        ca_file.display()
    );
    let out = tokio::task::block_in_place(|| {
        pg.psql_conninfo(&conninfo, "scram-pw", "SELECT current_user")
    });
    assert!(
        out.status.success(),
        "{}",
        crate::support::output_text(&out)
    );
    // The query ran as the superuser, over the control pool.
    assert!(logins(&pg, "postgres") >= 1);

    // md5 for a role whose secret is an md5 hash, and a server login that answers md5 with it.
    let c = plain_as(h, "aq_md5", "md5-pw", DB)
        .await
        .unwrap_or_else(|e| panic!("{:?}", code_and_message(&e)));
    assert_eq!(scalar(&c, "SELECT current_user").await, "aq_md5");
    drop(c);
    assert_eq!(logins(&pg, "aq_md5"), 1);

    // A wrong password and a role that does not exist: the same answer.
    let wrong = plain_as(h, "aq_scram", "nope", DB)
        .await
        .err()
        .map(|e| code_and_message(&e));
    let ghost = plain_as(h, "ghost", "nope", DB)
        .await
        .err()
        .map(|e| code_and_message(&e));
    let (code, wrong) = wrong.expect("a wrong password is refused");
    assert_eq!(code, "28P01");
    assert_eq!(ghost.map(|g| g.1), Some(wrong.replace("aq_scram", "ghost")));

    // A changed password: the old one works until auth_query_ttl, then the new one.
    pg.psql("SET password_encryption = 'scram-sha-256'; ALTER ROLE aq_scram PASSWORD 'new-pw'");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(plain_as(h, "aq_scram", "scram-pw", DB).await.is_err());
    // Its pooled connection ended, the next one logs in with the key of the new password.
    pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'aq_scram'");
    let before = logins(&pg, "aq_scram");
    let c = plain_as(h, "aq_scram", "new-pw", DB).await.unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, "aq_scram");
    assert_eq!(logins(&pg, "aq_scram"), before + 1);
    s.handle.stop().await;

    // The README's SECURITY DEFINER function, run by a role of no privilege of its own.
    pg.create_user("sluice_auth", "auth-pw");
    pg.psql_db(
        DB,
        "CREATE FUNCTION public.sluice_lookup(i_username text, OUT usename name, OUT passwd text) \
         RETURNS record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS \
         $$ SELECT usename, passwd FROM pg_shadow WHERE usename = i_username $$; \
         REVOKE ALL ON FUNCTION public.sluice_lookup(text) FROM public; \
         GRANT EXECUTE ON FUNCTION public.sluice_lookup(text) TO sluice_auth",
    );
    let s = start_sluice_tls(&pg, USER, PASSWORD, DB, 6, 2, &tls, |c| {
        c.auth = sluice::config::AuthMode::AuthQuery;
        c.auth_query = "SELECT usename, passwd FROM public.sluice_lookup($1)".into();
        c.control_user = Some("sluice_auth".into());
        c.control_password = Some("auth-pw".into());
        c.control_database = Some(DB.into());
    })
    .await;
    let c = plain_as(&s.handle, "aq_scram", "new-pw", DB).await.unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, "aq_scram");
    s.handle.stop().await;
}
