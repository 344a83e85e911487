//! TLS through Sluice, the client side: Sluice serving TLS (`client_tls`, its certificate from
//! the test CA) to tokio-postgres-rustls, psql (verify-full, channel binding with RSA/SHA-256
//! and ECDSA P-384/SHA-384 certificates), pgbench, direct TLS, and the driver scripts of
//! `drivers.rs` (node-postgres, psycopg, asyncpg, pgjdbc) verifying Sluice's certificate.
//!
//! PostgreSQL is plaintext here (Sluice's default `server_tls = prefer` then talks plaintext to
//! it); the server side is in `tls.rs`, whose helpers these tests share. Every test needs Sluice

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;

use crate::certs::{IssueOpts, KeyKind, TestCa};
use crate::drivers::{
    drivers_dir, require_jdbc, require_node_postgres, require_python, run_driver_at, DriverTarget,
};
use crate::pg::PgServer;
use crate::proxy::{connect_tls, TlsOpts};
use crate::support::{output_text, within_for};
use crate::tls::{
    client_tls, code_and_message, pgbench_through, plain, scalar, sluice, start_pg, Files, DB,
    GUARD, PASSWORD, USER,
};

/// psql through Sluice with `conninfo` (plus port, user, database) running `sql`.
async fn psql(pg: &PgServer, h: &sluice::Handle, conninfo: &str, sql: &str) -> Output {
    let full = format!(
        "host=127.0.0.1 port={} user={USER} dbname={DB} {conninfo}",
        h.local_addr.port()
    );
    tokio::task::block_in_place(|| pg.psql_conninfo(&full, PASSWORD, sql))
}

fn verify_full(ca_file: &Path) -> String {
    format!("sslmode=verify-full sslrootcert={}", ca_file.display())
}

// ---------------------------------------------------------------------------------------------
// (d) client_tls = require.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tls_require_serves_tls_and_refuses_plaintext() {
    let ca = TestCa::new("client side CA");
    let files = Files::new();
    let ca_file = files.ca(&ca, "ca.pem");
    let pg = start_pg(None).await;
    let cert = ca.issue(&IssueOpts {
        key: KeyKind::EcdsaP256,
        ..IssueOpts::default()
    });
    let s = sluice(&pg, &client_tls(&files, &cert, "require"), |_| {}).await;
    let h = &s.handle;

    // tokio-postgres-rustls, verifying against the CA, by IP address and by name.
    for host in ["127.0.0.1", "localhost"] {
        let opts = TlsOpts {
            host,
            ..TlsOpts::default()
        };
        let c = within_for(
            GUARD,
            "TLS connect",
            connect_tls(h, USER, PASSWORD, DB, &ca.cert_pem(), opts),
        )
        .await
        .unwrap_or_else(|e| panic!("TLS client via {host}: {:?}", code_and_message(&e)));
        assert_eq!(scalar(&c, "SELECT 1").await, "1");
    }

    // A plaintext client is refused, and told why.
    let Err(err) = within_for(GUARD, "plaintext connect", plain(h)).await else {
        panic!("client_tls = require must refuse a plaintext client");
    };
    let (code, message) = code_and_message(&err);
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("TLS"), "{message}");
    // Counted by whether they use TLS (metrics are per process: at least these clients).
    let m = |name: &'static str, labels: &'static [(&'static str, &'static str)]| {
        crate::tls::metric(h.admin_addr, name, labels)
    };
    assert!(m("sluice_client_connections_tls_total", &[("tls", "true")]).await >= 2.0);
    assert!(m("sluice_client_connections_tls_total", &[("tls", "false")]).await >= 1.0);
    assert!(
        m(
            "sluice_client_connections_rejected_total",
            &[("reason", "tls_required")]
        )
        .await
            >= 1.0
    );

    // psql verify-full; \conninfo says it is on TLS.
    let out = psql(&pg, h, &verify_full(&ca_file), "\\conninfo").await;
    assert!(
        out.status.success(),
        "psql verify-full: {}",
        output_text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .to_ascii_lowercase()
            .contains("ssl connection"),
        "{}",
        output_text(&out)
    );
    let out = psql(&pg, h, "sslmode=disable", "SELECT 1").await;
    assert!(
        !out.status.success(),
        "plaintext psql: {}",
        output_text(&out)
    );

    // pgbench, verifying Sluice's certificate.
    let ca_path = ca_file.display().to_string();
    pgbench_through(
        &pg,
        h,
        &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", &ca_path)],
    )
    .await;
    s.handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_with_rsa_sha256_and_ecdsa_p384_sha384_certificates() {
    let ca = TestCa::new("channel binding CA");
    let files = Files::new();
    let ca_file = files.ca(&ca, "ca.pem");
    let pg = start_pg(None).await;
    // tls-server-end-point hashes Sluice's certificate with SHA-256 for RSA-SHA256 and with
    // SHA-384 for ECDSA-SHA384: Sluice must compute the same to verify SCRAM-SHA-256-PLUS.
    for kind in [KeyKind::Rsa2048, KeyKind::EcdsaP384] {
        let s = sluice(
            &pg,
            &client_tls(&files, &ca.issue_kind(kind), "require"),
            |_| {},
        )
        .await;
        let h = &s.handle;
        let conninfo = format!("{} channel_binding=require", verify_full(&ca_file));
        let out = psql(&pg, h, &conninfo, "SELECT 42").await;
        assert!(
            out.status.success(),
            "{kind:?}, psql channel_binding=require: {}",
            output_text(&out)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
        let opts = TlsOpts {
            channel_binding: true,
            ..TlsOpts::default()
        };
        let c = within_for(
            GUARD,
            "TLS connect",
            connect_tls(h, USER, PASSWORD, DB, &ca.cert_pem(), opts),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{kind:?}, tokio-postgres channel_binding=require: {:?}",
                code_and_message(&e)
            )
        });
        assert_eq!(scalar(&c, "SELECT 43").await, "43");
        drop(c);
        s.handle.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn() {
    let ca = TestCa::new("direct TLS CA");
    let files = Files::new();
    let pg = start_pg(None).await;
    let s = sluice(
        &pg,
        &client_tls(&files, &ca.issue(&IssueOpts::default()), "require"),
        |_| {},
    )
    .await;
    // sslnegotiation=direct: the TLS handshake first, ALPN "postgresql", no SSLRequest.
    for channel_binding in [false, true] {
        let opts = TlsOpts {
            direct: true,
            channel_binding,
            ..TlsOpts::default()
        };
        let c = within_for(
            GUARD,
            "direct TLS connect",
            connect_tls(&s.handle, USER, PASSWORD, DB, &ca.cert_pem(), opts),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "direct TLS (channel binding {channel_binding}): {:?}",
                code_and_message(&e)
            )
        });
        assert_eq!(scalar(&c, "SELECT 7").await, "7");
    }
    s.handle.stop().await;
}

// ---------------------------------------------------------------------------------------------
// (g) Drivers verifying Sluice's certificate.

/// PostgreSQL, Sluice with `client_tls = require` (an ECDSA P-256 certificate of a test CA),
/// and the driver script run with `DRIVER_TLS_CA` pointing at the CA bundle.
async fn driver_over_tls(driver: &str, program: &Path, args: &[&OsStr], dir: &Path) {
    let ca = TestCa::new("driver CA");
    let files = Files::new();
    let ca_file = files.ca(&ca, "ca.pem");
    let pg = start_pg(None).await;
    let s = sluice(
        &pg,
        &client_tls(&files, &ca.issue(&IssueOpts::default()), "require"),
        |c| {
            // Queueing is not what is tested (see drivers.rs): no shedding on a slow machine.
            c.wait_timeout = std::time::Duration::from_secs(30);
            c.shed_target = std::time::Duration::from_secs(30);
        },
    )
    .await;
    let target = DriverTarget {
        port: s.handle.local_addr.port(),
        user: USER,
        password: PASSWORD,
        db: DB,
        tls_ca: Some(&ca_file),
    };
    let line = run_driver_at(&target, &pg, driver, program, args, dir).await;
    eprintln!("{line} (TLS)");
    s.handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_over_tls() {
    let (node, dir) = require_node_postgres();
    driver_over_tls("node-postgres", &node, &["test.js".as_ref()], &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_over_tls() {
    let python = require_python("psycopg");
    let dir = drivers_dir().join("python");
    driver_over_tls("psycopg", &python, &["test_psycopg.py".as_ref()], &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_over_tls() {
    let python = require_python("asyncpg");
    let dir = drivers_dir().join("python");
    driver_over_tls("asyncpg", &python, &["test_asyncpg.py".as_ref()], &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_over_tls() {
    let (java, jar) = require_jdbc();
    let dir = drivers_dir().join("java");
    let args = [
        OsStr::new("-cp"),
        jar.as_os_str(),
        OsStr::new("DriverTest.java"),
    ];
    driver_over_tls("jdbc", &java, &args, &dir).await;
}
