//! Starting Sluice in-process in front of a harness PostgreSQL, and connecting to it.
#![allow(dead_code)]

use std::path::PathBuf;

use sluice::config::{Config, Overrides};
use tokio_postgres::{Client, NoTls};

use crate::pg::PgServer;

/// Command-line overrides for Sluice in front of `pg` as `user`/`password` on `db`, with the
/// given budget and pool size, on free loopback ports (clients and admin).
pub fn overrides(
    pg: &PgServer,
    user: &str,
    password: &str,
    db: &str,
    budget: u32,
    pool_size: u32,
) -> Overrides {
    Overrides {
        upstream: Some(pg.url(user, password, db)),
        listen: Some("127.0.0.1:0".parse().expect("address")),
        admin_listen: Some("127.0.0.1:0".parse().expect("address")),
        max_server_connections: Some(budget),
        pool_size: Some(pool_size),
    }
}

/// Starts Sluice for `user`/`password` on `db` with the given budget and pool size, on free
/// loopback ports (clients and admin), after `tweak` adjusts the configuration.
pub async fn start_sluice(
    pg: &PgServer,
    user: &str,
    password: &str,
    db: &str,
    budget: u32,
    pool_size: u32,
    tweak: impl FnOnce(&mut Config),
) -> sluice::Handle {
    let overrides = overrides(pg, user, password, db, budget, pool_size);
    let mut cfg = Config::load(None, &overrides).expect("config");
    tweak(&mut cfg);
    sluice::start(cfg).await.expect("sluice starts")
}

/// Sluice started from the configuration file `path` (as `--config` would), both ports on
/// loopback; RELOAD and SIGHUP re-read the file.
pub async fn start_from_file(path: &std::path::Path) -> sluice::Handle {
    let flags = sluice::config::Overrides {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        admin_listen: Some("127.0.0.1:0".parse().expect("addr")),
        ..Default::default()
    };
    let cfg = Config::load(Some(path), &flags).expect("config");
    sluice::start_from(cfg, Some(path.to_path_buf()), flags)
        .await
        .expect("sluice starts")
}

/// A tokio-postgres client connected through Sluice; its connection task runs in the background.
pub async fn connect(
    handle: &sluice::Handle,
    user: &str,
    password: &str,
    db: &str,
) -> Result<Client, tokio_postgres::Error> {
    connect_port(handle.local_addr.port(), user, password, db).await
}

/// Like [`connect`], to whatever listens on `port` on the loopback address.
pub async fn connect_port(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user={user} password={password} dbname={db}"),
        NoTls,
    )
    .await?;
    tokio::spawn(conn);
    Ok(client)
}

/// The task running a client's connection: it ends with the error that ended the connection.
pub type ConnTask = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// Like [`connect`], also returning the connection task: aborting it drops the socket without a
/// Terminate message, the way a crashed or frozen client vanishes; awaiting it tells how the
/// connection ended.
pub async fn connect_with_task(
    handle: &sluice::Handle,
    user: &str,
    password: &str,
    db: &str,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let (client, conn) =
        tokio_postgres::connect(&conn_string(handle, user, password, db), NoTls).await?;
    Ok((client, tokio::spawn(conn)))
}

/// A libpq-style connection string for Sluice.
pub fn conn_string(handle: &sluice::Handle, user: &str, password: &str, db: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname={db}",
        handle.local_addr.port()
    )
}

/// A `postgres://` URL for Sluice, as psql and pgbench take it (password left out: give it in
/// `PGPASSWORD`).
pub fn url(handle: &sluice::Handle, user: &str, db: &str) -> String {
    format!(
        "postgres://{user}@127.0.0.1:{}/{db}",
        handle.local_addr.port()
    )
}

// ---------------------------------------------------------------------------------------------
// TLS clients (tokio-postgres with tokio-postgres-rustls) and TLS configuration of Sluice.

/// How [`connect_tls`] connects.
#[derive(Debug, Clone, Copy)]
pub struct TlsOpts {
    /// `channel_binding=require`: SCRAM-SHA-256-PLUS with `tls-server-end-point`, so the login
    /// fails unless the server binds it to the TLS session's certificate.
    pub channel_binding: bool,
    /// `sslnegotiation=direct`: the TLS handshake right away (ALPN `postgresql`), no SSLRequest.
    pub direct: bool,
    /// The host to connect to and verify the certificate against (`127.0.0.1` or `localhost`).
    pub host: &'static str,
}

impl Default for TlsOpts {
    fn default() -> Self {
        TlsOpts {
            channel_binding: false,
            direct: false,
            host: "127.0.0.1",
        }
    }
}

/// A rustls client configuration (Sluice's crypto provider) trusting only the certificates in `ca_pem`;
/// with `alpn`, it offers ALPN `postgresql` (which direct TLS requires).
pub fn rustls_client_config(ca_pem: &str, alpn: bool) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.expect("CA PEM parses"))
            .expect("CA certificate is usable as a root");
    }
    assert!(!roots.is_empty(), "no certificate in the CA PEM");
    let mut config = rustls::ClientConfig::builder_with_provider(sluice::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("the provider supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if alpn {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    config
}

/// A libpq-style connection string with TLS mandatory (`sslmode=require`: tokio-postgres
/// itself never verifies; the rustls configuration does, against the given CA and host).
pub fn tls_conn_string(port: u16, user: &str, password: &str, db: &str, opts: TlsOpts) -> String {
    let mut s = format!(
        "host={} port={port} user={user} password={password} dbname={db} sslmode=require \
         connect_timeout=20",
        opts.host
    );
    if opts.channel_binding {
        s.push_str(" channel_binding=require");
    }
    if opts.direct {
        s.push_str(" sslnegotiation=direct");
    }
    s
}

/// A TLS tokio-postgres client of whatever listens on `port` (Sluice or PostgreSQL), verifying
/// its certificate against `ca_pem` and `opts.host`; also returns the connection task.
pub async fn connect_tls_port(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
    ca_pem: &str,
    opts: TlsOpts,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let tls =
        tokio_postgres_rustls::MakeRustlsConnect::new(rustls_client_config(ca_pem, opts.direct));
    let (client, conn) =
        tokio_postgres::connect(&tls_conn_string(port, user, password, db, opts), tls).await?;
    Ok((client, tokio::spawn(conn)))
}

/// A TLS tokio-postgres client through Sluice (see [`connect_tls_port`]); its connection task
/// runs in the background.
pub async fn connect_tls(
    handle: &sluice::Handle,
    user: &str,
    password: &str,
    db: &str,
    ca_pem: &str,
    opts: TlsOpts,
) -> Result<Client, tokio_postgres::Error> {
    let (client, _task) =
        connect_tls_port(handle.local_addr.port(), user, password, db, ca_pem, opts).await?;
    Ok(client)
}

/// Sluice's TLS settings, as keys of its configuration file (`sluice::config::Config`):
/// `server_tls` (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`),
/// `server_tls_ca_file`, `server_tls_cert_file`, `server_tls_key_file`, `client_tls`
/// (`disable`, `allow`, `require`), `client_tls_cert_file`, `client_tls_key_file`. `None` leaves
/// a key out (its default).
///
/// They go through the TOML file rather than through fields of `Config`, so that these tests
/// build whether or not this `Config` has the fields yet; the file is also what RELOAD rereads.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    pub server_tls: Option<&'static str>,
    pub server_tls_ca_file: Option<PathBuf>,
    pub server_tls_cert_file: Option<PathBuf>,
    pub server_tls_key_file: Option<PathBuf>,
    pub client_tls: Option<&'static str>,
    pub client_tls_cert_file: Option<PathBuf>,
    pub client_tls_key_file: Option<PathBuf>,
    /// Other top-level keys that must survive RELOAD (e.g. `admin_users`), as TOML values.
    pub extra: Vec<(&'static str, toml::Value)>,
}

impl TlsSettings {
    /// The settings as a TOML document.
    pub fn to_toml(&self) -> String {
        let mut table = toml::Table::new();
        let mut put = |key: &str, value: toml::Value| {
            table.insert(key.to_owned(), value);
        };
        let path = |p: &PathBuf| toml::Value::String(p.display().to_string());
        if let Some(v) = self.server_tls {
            put("server_tls", toml::Value::String(v.into()));
        }
        if let Some(p) = &self.server_tls_ca_file {
            put("server_tls_ca_file", path(p));
        }
        if let Some(p) = &self.server_tls_cert_file {
            put("server_tls_cert_file", path(p));
        }
        if let Some(p) = &self.server_tls_key_file {
            put("server_tls_key_file", path(p));
        }
        if let Some(v) = self.client_tls {
            put("client_tls", toml::Value::String(v.into()));
        }
        if let Some(p) = &self.client_tls_cert_file {
            put("client_tls_cert_file", path(p));
        }
        if let Some(p) = &self.client_tls_key_file {
            put("client_tls_key_file", path(p));
        }
        for (k, v) in &self.extra {
            put(k, v.clone());
        }
        toml::to_string(&table).expect("TOML")
    }
}

/// A Sluice started from a configuration file (so that RELOAD rereads it).
pub struct FileSluice {
    pub handle: sluice::Handle,
    /// The configuration file; rewrite it and RELOAD to change settings.
    pub config_path: PathBuf,
    /// Holds the file.
    pub dir: tempfile::TempDir,
}

/// Like [`start_sluice`], with `tls` written into a configuration file Sluice is started from
/// (the flags give upstream, addresses, budget and pool size, as with [`start_sluice`]);
/// `tweak` then adjusts the loaded configuration (what it changes does not survive RELOAD).
#[allow(clippy::too_many_arguments)]
pub async fn start_sluice_tls(
    pg: &PgServer,
    user: &str,
    password: &str,
    db: &str,
    budget: u32,
    pool_size: u32,
    tls: &TlsSettings,
    tweak: impl FnOnce(&mut Config),
) -> FileSluice {
    let dir = tempfile::tempdir().expect("temp dir for the Sluice configuration");
    let config_path = dir.path().join("sluice.toml");
    std::fs::write(&config_path, tls.to_toml()).expect("write the Sluice configuration");
    let overrides = overrides(pg, user, password, db, budget, pool_size);
    let mut cfg = Config::load(Some(&config_path), &overrides).unwrap_or_else(|e| {
        panic!(
            "Sluice configuration {}:\n{}\n{e}",
            config_path.display(),
            tls.to_toml()
        )
    });
    tweak(&mut cfg);
    let handle = sluice::start_from(cfg, Some(config_path.clone()), overrides)
        .await
        .expect("sluice starts");
    FileSluice {
        handle,
        config_path,
        dir,
    }
}
