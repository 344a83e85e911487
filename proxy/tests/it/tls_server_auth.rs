//! What Sluice presents to a TLS server: a cleartext password only over a connection verified
//! with `server_tls = verify-full`, a client certificate when the server demands one, and
//! channel binding (SCRAM-SHA-256-PLUS) to the server's certificate.

use std::path::Path;

use crate::certs::{IssueOpts, TestCa};
use crate::pg::{pg_os_user, PgServer};
use crate::proxy::TlsSettings;
use crate::support::within_for;
use crate::tls::{code_and_message, hostssl_only, plain, scalar, sluice, start_pg, GUARD, USER};

/// Rewrites the server's pg_hba.conf (TCP only over TLS, `rule` for the test user first) and
/// reloads it.
pub(crate) fn set_hba(pg: &PgServer, rule: &str) {
    let hba = pg.data_dir().join("pg_hba.conf");
    std::fs::write(
        &hba,
        format!(
            "local all all scram-sha-256\n\
             hostssl all {USER} 127.0.0.1/32 {rule}\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n"
        ),
    )
    .expect("write pg_hba.conf");
    if let Some((uid, gid)) = pg_os_user() {
        std::os::unix::fs::chown(&hba, Some(uid), Some(gid)).expect("chown pg_hba.conf");
    }
    assert_eq!(pg.psql("SELECT pg_reload_conf()"), "t");
}

/// Puts `rule` (a pg_hba.conf line) before the test server's rules and reloads it.
pub(crate) fn prepend_hba(pg: &PgServer, rule: &str) {
    let hba = pg.data_dir().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    std::fs::write(&hba, format!("{rule}\n{rules}")).expect("write pg_hba.conf");
    assert_eq!(pg.psql("SELECT pg_reload_conf()"), "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_password_only_over_verify_full() {
    let ca = TestCa::new("cleartext CA");
    let cert = ca.issue(&IssueOpts::default());
    let pg = start_pg(Some(hostssl_only(&cert))).await;
    // `password`: the server asks for the password in clear text.
    set_hba(&pg, "password");
    let dir = tempfile::tempdir().expect("dir");
    let ca_file = ca.write_cert(dir.path(), "ca.crt");

    // Encrypted but unverified: whoever answered could be anyone, so the password stays home.
    let unverified = sluice(
        &pg,
        &TlsSettings {
            server_tls: Some("require"),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let err = within_for(GUARD, "a login through Sluice", async {
        match plain(&unverified.handle).await {
            Err(e) => e,
            Ok(c) => c.simple_query("SELECT 1").await.expect_err("refused"),
        }
    })
    .await;
    let (code, message) = code_and_message(&err);
    assert_eq!(code, "08006", "{message}");
    // PostgreSQL logs an authorized session only once it accepted a password.
    let authorized = format!("connection authorized: user={USER}");
    assert!(
        !pg.log_contents().contains(&authorized),
        "the server must not have received the password"
    );
    unverified.handle.stop().await;

    // verify-full: the certificate is checked for this host; the password may go.
    let verified = sluice(
        &pg,
        &TlsSettings {
            server_tls: Some("verify-full"),
            server_tls_ca_file: Some(ca_file),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let c = plain(&verified.handle)
        .await
        .expect("login over verify-full");
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    assert!(pg.log_contents().contains(&authorized));
    verified.handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_and_channel_binding_toward_the_server() {
    let ca = TestCa::new("client cert CA");
    let cert = ca.issue(&IssueOpts::default());
    let pg = start_pg(Some(hostssl_only(&cert))).await;
    let pg_files = pg.data_dir().to_path_buf();
    let ca_for_pg =
        crate::certs::write_pem(&pg_files, "root.crt", &ca.cert_pem(), pg_os_user(), 0o644);
    pg.psql(&format!(
        "ALTER SYSTEM SET ssl_ca_file = '{}'",
        ca_for_pg.display()
    ));
    // SCRAM and, on top, a certificate signed by the CA.
    set_hba(&pg, "scram-sha-256 clientcert=verify-ca");
    let dir = tempfile::tempdir().expect("dir");
    let ca_file = ca.write_cert(dir.path(), "ca.crt");
    let settings = |client: Option<(&Path, &Path)>| TlsSettings {
        server_tls: Some("verify-full"),
        server_tls_ca_file: Some(ca_file.clone()),
        server_tls_cert_file: client.map(|c| c.0.to_path_buf()),
        server_tls_key_file: client.map(|c| c.1.to_path_buf()),
        ..Default::default()
    };

    let without = sluice(&pg, &settings(None), |_| {}).await;
    let err = within_for(GUARD, "a login without a client certificate", async {
        match plain(&without.handle).await {
            Err(e) => e,
            Ok(c) => c.simple_query("SELECT 1").await.expect_err("refused"),
        }
    })
    .await;
    assert!(!code_and_message(&err).0.is_empty(), "{err:?}");
    without.handle.stop().await;

    let mine = ca.issue(&IssueOpts {
        hosts: &["sluice.test"],
        ..IssueOpts::default()
    });
    let (cert_file, key_file) = mine.write(dir.path(), "sluice-client");
    let with = sluice(&pg, &settings(Some((&cert_file, &key_file))), |_| {}).await;
    let c = plain(&with.handle)
        .await
        .expect("login with a client certificate");
    assert_eq!(
        scalar(
            &c,
            "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        .await,
        "/CN=sluice.test"
    );
    // The server offered SCRAM-SHA-256-PLUS over TLS: Sluice's login was bound to its
    // certificate (the admin console's SHOW SERVERS says so; PostgreSQL does not).
    let servers = with.handle.context.servers.snapshot();
    assert!(!servers.is_empty());
    assert!(servers.iter().all(|s| s.tls && s.channel_binding));
    with.handle.stop().await;
}
