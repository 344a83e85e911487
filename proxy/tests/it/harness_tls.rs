//! Self-tests of the TLS test harness, without Sluice: the test PKI (`certs.rs`), PostgreSQL
//! serving TLS with `hostssl`-only logins (`pg.rs`), and the TLS clients (`proxy.rs`), checked
//! against psql (libpq) and tokio-postgres-rustls. The TLS tests through Sluice (`tls.rs`,
//! `tls_clients.rs`) rely on exactly these behaviours.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use tokio_postgres::NoTls;

use crate::certs::{IssueOpts, Issued, KeyKind, TestCa};
use crate::pg::{pg_os_user, PgOptions, PgServer, PgTls};
use crate::proxy::{connect_tls_port, TlsOpts};
use crate::support::{output_text, start_pg_with_user};

const USER: &str = "tls_app";
const PASSWORD: &str = "tls-app-pw";
const DB: &str = "tls_db";
const SSL_SQL: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// PostgreSQL serving `cert`, TCP logins only over TLS, with the test user and database.
async fn tls_server(cert: &Issued) -> PgServer {
    let tls = PgTls {
        cert_pem: cert.cert_pem.clone(),
        key_pem: cert.key_pem.clone(),
        hostssl_only: true,
    };
    let opts = PgOptions {
        max_connections: 20,
        tls: Some(tls),
        log_connections: true,
        ..Default::default()
    };
    start_pg_with_user(opts, USER, PASSWORD, DB).await
}

/// psql with `conninfo` (plus port, user, database) running `sql`, off the runtime's threads.
async fn psql(pg: &PgServer, conninfo: &str, sql: &str) -> Output {
    let full = format!("{conninfo} port={} user={USER} dbname={DB}", pg.port());
    tokio::task::block_in_place(|| pg.psql_conninfo(&full, PASSWORD, sql))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The verification settings of a libpq connection string trusting `ca_file`.
fn verify_full(ca_file: &Path, host: &str) -> String {
    format!(
        "host={host} sslmode=verify-full sslrootcert={}",
        ca_file.display()
    )
}

/// A TLS tokio-postgres login to `pg` verifying against `ca_pem`; returns `pg_stat_ssl.ssl`.
async fn rustls_login(pg: &PgServer, ca_pem: &str, opts: TlsOpts) -> Result<bool, String> {
    let (client, _task) = tokio::time::timeout(
        Duration::from_secs(20),
        connect_tls_port(pg.port(), USER, PASSWORD, DB, ca_pem, opts),
    )
    .await
    .map_err(|_| "TLS login: no answer after 20 s".to_owned())?
    .map_err(|e| format!("{e} ({e:?})"))?;
    let row = client
        .query_one(SSL_SQL, &[])
        .await
        .map_err(|e| format!("{SSL_SQL}: {e}"))?;
    Ok(row.get(0))
}

/// `openssl x509 -noout -text` of a PEM certificate.
fn openssl_text(cert_pem: &str) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("c.pem");
    std::fs::write(&path, cert_pem).expect("write");
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&path)
        .output()
        .expect("openssl x509 (apt-get install -y openssl)");
    assert!(out.status.success(), "openssl x509: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostssl_server_takes_verified_tls_and_refuses_plaintext() {
    let ca = TestCa::new("harness CA");
    let cert = ca.issue(&IssueOpts::default());
    let text_of_cert = openssl_text(&cert.cert_pem);
    assert!(
        text_of_cert.contains("DNS:localhost") && text_of_cert.contains("IP Address:127.0.0.1"),
        "SANs: {text_of_cert}"
    );
    let pg = tls_server(&cert).await;
    let dir = tempfile::tempdir().expect("tmp");
    let ca_file = ca.write_cert(dir.path(), "ca.pem");

    // The key is the server user's, mode 0600 (else PostgreSQL would not have started).
    let key = std::fs::metadata(pg.data_dir().join("server.key")).expect("server.key");
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    if let Some((uid, _)) = pg_os_user() {
        assert_eq!(key.uid(), uid, "server.key owner");
    }

    // psql verify-full, by IP address and by name.
    for host in ["127.0.0.1", "localhost"] {
        let out = psql(&pg, &verify_full(&ca_file, host), SSL_SQL).await;
        assert!(
            out.status.success(),
            "psql verify-full {host}: {}",
            output_text(&out)
        );
        assert_eq!(stdout(&out), "t", "{}", output_text(&out));
    }
    // The harness's own psql (sslmode=prefer) still works.
    assert_eq!(pg.psql("SELECT 1"), "1");

    // tokio-postgres-rustls with SCRAM-SHA-256-PLUS (channel_binding=require).
    let opts = TlsOpts {
        channel_binding: true,
        ..Default::default()
    };
    assert_eq!(rustls_login(&pg, &ca.cert_pem(), opts).await, Ok(true));
    let by_name = TlsOpts {
        host: "localhost",
        ..opts
    };
    assert_eq!(rustls_login(&pg, &ca.cert_pem(), by_name).await, Ok(true));

    // Plaintext over TCP: no pg_hba.conf line matches.
    let err = tokio_postgres::connect(&pg.url(USER, PASSWORD, DB), NoTls)
        .await
        .err()
        .expect("a plaintext login must be refused");
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(db.code().code(), "28000", "{db:?}");
    assert!(
        db.message().starts_with("no pg_hba.conf entry") && db.message().contains("no encryption"),
        "{db:?}"
    );
    let out = psql(&pg, "host=127.0.0.1 sslmode=disable", "SELECT 1").await;
    assert!(
        !out.status.success(),
        "plaintext psql: {}",
        output_text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no pg_hba.conf entry"),
        "{}",
        output_text(&out)
    );

    // log_connections: the TLS logins are logged as such.
    let log = pg.log_contents();
    assert!(
        log.contains(&format!("connection authorized: user={USER}")) && log.contains("SSL enabled"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_and_p384_certificates_work_with_channel_binding() {
    let ca = TestCa::new("harness key kinds CA");
    let dir = tempfile::tempdir().expect("tmp");
    let ca_file = ca.write_cert(dir.path(), "ca.pem");
    for (kind, key_text, signature) in [
        (
            KeyKind::Rsa2048,
            "Public-Key: (2048 bit)",
            "sha256WithRSAEncryption",
        ),
        (KeyKind::EcdsaP384, "NIST CURVE: P-384", "ecdsa-with-SHA384"),
        (KeyKind::EcdsaP256, "NIST CURVE: P-256", "ecdsa-with-SHA256"),
    ] {
        let cert = ca.issue_kind(kind);
        let t = openssl_text(&cert.cert_pem);
        assert!(
            t.contains(key_text) && t.contains(&format!("Signature Algorithm: {signature}")),
            "{kind:?}: {t}"
        );
        let pg = tls_server(&cert).await;
        let conninfo = format!(
            "{} channel_binding=require",
            verify_full(&ca_file, "127.0.0.1")
        );
        let out = psql(&pg, &conninfo, SSL_SQL).await;
        assert!(out.status.success(), "{kind:?} psql: {}", output_text(&out));
        assert_eq!(stdout(&out), "t", "{kind:?}: {}", output_text(&out));
        let opts = TlsOpts {
            channel_binding: true,
            ..Default::default()
        };
        assert_eq!(
            rustls_login(&pg, &ca.cert_pem(), opts).await,
            Ok(true),
            "{kind:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_misnamed_and_foreign_certificates_are_rejected() {
    let ca = TestCa::new("harness rejection CA");
    let other_ca = TestCa::new("harness other CA");
    let dir = tempfile::tempdir().expect("tmp");
    let ca_file = ca.write_cert(dir.path(), "ca.pem");

    // Expired: openssl and libpq refuse it, and so does rustls.
    let expired = ca.issue(&IssueOpts {
        expired: true,
        ..IssueOpts::default()
    });
    let leaf = dir.path().join("expired.pem");
    std::fs::write(&leaf, &expired.cert_pem).expect("write");
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&ca_file)
        .arg(&leaf)
        .output()
        .expect("openssl verify");
    assert!(
        !out.status.success() && output_text(&out).contains("certificate has expired"),
        "openssl verify of the expired certificate: {}",
        output_text(&out)
    );
    let pg = tls_server(&expired).await;
    let out = psql(&pg, &verify_full(&ca_file, "127.0.0.1"), "SELECT 1").await;
    assert!(
        !out.status.success(),
        "expired, psql: {}",
        output_text(&out)
    );
    assert!(
        output_text(&out).contains("certificate verify failed"),
        "expired, psql: {}",
        output_text(&out)
    );
    // Without verification, the same server is fine.
    let out = psql(&pg, "host=127.0.0.1 sslmode=require", SSL_SQL).await;
    assert_eq!(
        stdout(&out),
        "t",
        "expired, sslmode=require: {}",
        output_text(&out)
    );
    let err = rustls_login(&pg, &ca.cert_pem(), TlsOpts::default())
        .await
        .expect_err("rustls must refuse an expired certificate");
    assert!(err.contains("Expired"), "{err}");
    drop(pg);

    // Valid, but for another host only; and valid, but checked against another CA.
    let misnamed = ca.issue(&IssueOpts {
        hosts: &["otherhost"],
        ..IssueOpts::default()
    });
    let pg = tls_server(&misnamed).await;
    let out = psql(&pg, &verify_full(&ca_file, "127.0.0.1"), "SELECT 1").await;
    assert!(
        !out.status.success() && output_text(&out).contains("does not match host name"),
        "misnamed, psql: {}",
        output_text(&out)
    );
    let err = rustls_login(&pg, &ca.cert_pem(), TlsOpts::default())
        .await
        .expect_err("rustls must refuse a certificate for another host");
    assert!(err.contains("NotValidForName"), "{err}");
    drop(pg);

    let pg = tls_server(&ca.issue(&IssueOpts::default())).await;
    let other_file = other_ca.write_cert(dir.path(), "other.pem");
    let out = psql(&pg, &verify_full(&other_file, "127.0.0.1"), "SELECT 1").await;
    assert!(
        !out.status.success() && output_text(&out).contains("certificate verify failed"),
        "foreign CA, psql: {}",
        output_text(&out)
    );
    let err = rustls_login(&pg, &other_ca.cert_pem(), TlsOpts::default())
        .await
        .expect_err("rustls must refuse a certificate of another CA");
    assert!(err.contains("UnknownIssuer"), "{err}");
}

/// The bad TLS clients of `tls.rs` (garbage after 'S', half a ClientHello then close, stalls
/// before and after the ClientHello), tried on PostgreSQL (OpenSSL, authentication_timeout 1 s):
/// each finds its socket closed within 5 s, and a good client works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_clients_are_closed_by_postgres() {
    let ca = TestCa::new("harness bad clients CA");
    let cert = ca.issue(&IssueOpts::default());
    let tls = PgTls {
        cert_pem: cert.cert_pem.clone(),
        key_pem: cert.key_pem.clone(),
        hostssl_only: true,
    };
    let pg = tokio::task::spawn_blocking(move || {
        let pg = PgServer::start(PgOptions {
            max_connections: 60,
            tls: Some(tls),
            extra_conf: vec![("authentication_timeout".into(), "'1s'".into())],
            ..Default::default()
        });
        pg.create_user(USER, PASSWORD);
        pg.create_database(DB, USER);
        pg
    })
    .await
    .expect("PostgreSQL starts");
    assert!(crate::tls::rss_kib() > 0);
    let hello = crate::tls::client_hello(&ca.cert_pem());
    assert_eq!(hello[0], 0x16, "a TLS handshake record");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], pg.port()));
    let errors = crate::tls::bad_round(addr, 40, &hello).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        rustls_login(&pg, &ca.cert_pem(), TlsOpts::default()).await,
        Ok(true)
    );
}
