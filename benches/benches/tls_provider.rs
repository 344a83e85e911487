//! Criterion benchmarks of the two rustls crypto providers, *ring* and aws-lc-rs, on what Sluice
//! does with TLS: full TLS 1.3 handshakes (whole, and the server's share alone), bulk transfer of
//! 1 MiB in 16 KiB writes, and a 100-byte request and 100-byte reply round (the per-query pattern
//! of a pooler). Client and server connections talk through in-memory buffers: no sockets, no
//! network, no files; the certificates are made at start-up with rcgen.
//!
//! Times are the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall time: the
//! machine's 2 CPUs are shared with other builds, and CPU time leaves out the time the thread
//! waits for a CPU. (Caches and frequency are still shared, so the numbers stay noisy.) Nothing
//! here blocks or sleeps, so CPU time is the whole cost.
//!
//! Every config is built with `builder_with_provider` and an explicit provider: the process-wide
//! default provider is never installed nor used.
//!
//! Key exchange: with the features the workspace enables (rustls without its default features,
//! so without `prefer-post-quantum`), both providers' `default_provider()` put X25519 first;
//! aws-lc-rs lists the hybrid X25519MLKEM768 last. rustls built with its default features makes
//! aws-lc-rs prefer X25519MLKEM768; `x25519mlkem768` measures that order. libpq clients (OpenSSL
//! 3.0 on Debian 12) offer X25519, which `x25519` (the only group on both sides) stands for.

// Benchmark set-up: a failure here is a broken benchmark, reported by its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::error::Error;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, RsaKeySize};
use rustls::client::Resumption;
use rustls::crypto::{aws_lc_rs, ring, CryptoProvider, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, NamedGroup, RootCertStore, ServerConfig,
    ServerConnection, SupportedCipherSuite,
};

/// The calling thread's CPU time so far.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Criterion measurement of the thread's CPU time, shown like wall time.
struct ThreadCpuTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_time()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu_time().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Values are nanoseconds, as WallTime's are.
        let wall: &'static WallTime = &WallTime;
        wall.formatter()
    }
}

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Bulk transfer: 1 MiB in writes of 16 KiB (one full TLS record each).
const BULK_BYTES: usize = 1 << 20;
const BULK_WRITE: usize = 16 << 10;
/// Small records: a query and its reply of this many bytes each.
const SMALL: usize = 100;

#[derive(Clone, Copy)]
enum Provider {
    Ring,
    AwsLcRs,
}

impl Provider {
    const ALL: [Provider; 2] = [Provider::Ring, Provider::AwsLcRs];

    fn name(self) -> &'static str {
        match self {
            Provider::Ring => "ring",
            Provider::AwsLcRs => "aws-lc-rs",
        }
    }

    fn default_provider(self) -> CryptoProvider {
        match self {
            Provider::Ring => ring::default_provider(),
            Provider::AwsLcRs => aws_lc_rs::default_provider(),
        }
    }

    fn x25519(self) -> &'static dyn SupportedKxGroup {
        match self {
            Provider::Ring => ring::kx_group::X25519,
            Provider::AwsLcRs => aws_lc_rs::kx_group::X25519,
        }
    }

    /// The TLS 1.3 suites, in the providers' default order; both have all three.
    fn suites(self) -> [(&'static str, SupportedCipherSuite); 3] {
        match self {
            Provider::Ring => [
                ("aes256gcm", ring::cipher_suite::TLS13_AES_256_GCM_SHA384),
                ("aes128gcm", ring::cipher_suite::TLS13_AES_128_GCM_SHA256),
                (
                    "chacha20",
                    ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                ),
            ],
            Provider::AwsLcRs => [
                (
                    "aes256gcm",
                    aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
                ),
                (
                    "aes128gcm",
                    aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
                ),
                (
                    "chacha20",
                    aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                ),
            ],
        }
    }
}

/// Which key-exchange groups both sides offer.
#[derive(Clone, Copy)]
enum Kx {
    /// X25519 alone.
    X25519,
    /// The provider's `default_provider()` list as built here (X25519 first for both).
    Default,
    /// aws-lc-rs only: X25519MLKEM768 first, then the rest of the default list: the order
    /// rustls's `prefer-post-quantum` feature (on by default) gives.
    X25519Mlkem768,
}

impl Kx {
    fn name(self) -> &'static str {
        match self {
            Kx::X25519 => "x25519",
            Kx::Default => "default",
            Kx::X25519Mlkem768 => "x25519mlkem768",
        }
    }

    /// The group the handshake must settle on.
    fn expected(self) -> NamedGroup {
        match self {
            Kx::X25519 | Kx::Default => NamedGroup::X25519,
            Kx::X25519Mlkem768 => NamedGroup::X25519MLKEM768,
        }
    }

    fn applies_to(self, p: Provider) -> bool {
        !matches!((self, p), (Kx::X25519Mlkem768, Provider::Ring))
    }

    fn provider(self, p: Provider) -> CryptoProvider {
        let mut provider = p.default_provider();
        match self {
            Kx::X25519 => provider.kx_groups = vec![p.x25519()],
            Kx::Default => {}
            Kx::X25519Mlkem768 => {
                provider
                    .kx_groups
                    .retain(|g| g.name() != NamedGroup::X25519MLKEM768);
                provider
                    .kx_groups
                    .insert(0, aws_lc_rs::kx_group::X25519MLKEM768);
            }
        }
        provider
    }
}

/// A server certificate chain (leaf, signed by a CA of the same key type) and the leaf's key;
/// the client trusts the CA.
struct Identity {
    name: &'static str,
    ca: CertificateDer<'static>,
    leaf: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Identity {
    /// ring cannot generate RSA keys, so rcgen is built with its aws_lc_rs feature (aws-lc-rs is
    /// compiled in for rustls anyway) and makes the RSA-2048 keys with it: no `openssl` binary,
    /// no files. The keys are only made here; rustls signs and verifies with the provider under
    /// test.
    fn new(name: &'static str, alg: &'static rcgen::SignatureAlgorithm) -> Identity {
        let key_pair = || {
            if alg == &rcgen::PKCS_RSA_SHA256 {
                KeyPair::generate_rsa_for(alg, RsaKeySize::_2048).expect("generate an RSA key")
            } else {
                KeyPair::generate_for(alg).expect("generate a key")
            }
        };
        let ca_key = key_pair();
        let mut ca_params = CertificateParams::new(Vec::new()).expect("CA parameters");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Sluice bench CA");
        let ca = ca_params.self_signed(&ca_key).expect("self-sign the CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = key_pair();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .expect("leaf parameters")
            .signed_by(&leaf_key, &issuer)
            .expect("sign the leaf");
        Identity {
            name,
            ca: ca.der().clone(),
            leaf: leaf.der().clone(),
            key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        }
    }
}

struct Configs {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

fn configs(provider: CryptoProvider, id: &Identity) -> Configs {
    let provider = Arc::new(provider);
    let mut roots = RootCertStore::empty();
    roots.add(id.ca.clone()).expect("trust the CA");
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("client protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every handshake full: no resumption (libpq does not resume sessions either).
    client.resumption = Resumption::disabled();

    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("server protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![id.leaf.clone()],
            PrivateKeyDer::Pkcs8(id.key.clone_key()),
        )
        .expect("server certificate");
    // No session tickets after the handshake: nobody would use them.
    server.send_tls13_tickets = 0;
    Configs {
        client: Arc::new(client),
        server: Arc::new(server),
    }
}

/// Hands `bytes` to `conn` and processes them.
fn feed<D>(conn: &mut ConnectionCommon<D>, mut bytes: &[u8]) -> Result<()> {
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes)?;
        conn.process_new_packets()?;
    }
    Ok(())
}

/// Replaces `wire`'s contents with all that `conn` has to send.
fn drain<D>(conn: &mut ConnectionCommon<D>, wire: &mut Vec<u8>) -> Result<()> {
    wire.clear();
    while conn.wants_write() {
        conn.write_tls(wire)?;
    }
    Ok(())
}

/// Reads all the plaintext `conn` has into `buf` (overwritten); returns how many bytes.
fn read_plaintext<D>(conn: &mut ConnectionCommon<D>, buf: &mut [u8]) -> Result<usize> {
    let mut total = 0;
    loop {
        match conn.reader().read(buf) {
            Ok(0) => return Err("peer closed the connection".into()),
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
            Err(e) => return Err(e.into()),
        }
    }
}

/// One full handshake between new connections; returns them and the CPU time spent on the server
/// side (creating its connection, reading, processing and writing).
fn handshake(
    cfg: &Configs,
    wire: &mut Vec<u8>,
) -> Result<(ClientConnection, ServerConnection, Duration)> {
    let mut client = ClientConnection::new(cfg.client.clone(), ServerName::try_from("localhost")?)?;
    let start = thread_cpu_time();
    let mut server = ServerConnection::new(cfg.server.clone())?;
    let mut server_time = thread_cpu_time().saturating_sub(start);
    // A TLS 1.3 full handshake is 1.5 round trips; a few more rounds mean something is wrong.
    for _ in 0..4 {
        drain(&mut client, wire)?;
        let start = thread_cpu_time();
        feed(&mut server, wire)?;
        drain(&mut server, wire)?;
        server_time += thread_cpu_time().saturating_sub(start);
        feed(&mut client, wire)?;
        if !client.is_handshaking()
            && !server.is_handshaking()
            && !client.wants_write()
            && !server.wants_write()
        {
            return Ok((client, server, server_time));
        }
    }
    Err("the handshake did not finish".into())
}

fn handshakes(c: &mut Criterion<ThreadCpuTime>) {
    let identities = [
        Identity::new("ecdsa_p256", &rcgen::PKCS_ECDSA_P256_SHA256),
        Identity::new("rsa2048", &rcgen::PKCS_RSA_SHA256),
    ];
    let mut wire = Vec::with_capacity(16 << 10);
    for (group, server_only) in [("handshake_full", false), ("handshake_server_side", true)] {
        let mut g = c.benchmark_group(group);
        g.sample_size(30).sampling_mode(SamplingMode::Flat);
        for id in &identities {
            for kx in [Kx::X25519, Kx::Default, Kx::X25519Mlkem768] {
                for p in Provider::ALL.into_iter().filter(|&p| kx.applies_to(p)) {
                    let cfg = configs(kx.provider(p), id);
                    let (_, server, _) = handshake(&cfg, &mut wire).expect("a first handshake");
                    let group = server
                        .negotiated_key_exchange_group()
                        .expect("a key exchange group")
                        .name();
                    assert_eq!(group, kx.expected(), "{}", p.name());
                    let bench = BenchmarkId::new(format!("{}-{}", id.name, kx.name()), p.name());
                    if server_only {
                        g.bench_function(bench, |b| {
                            b.iter_custom(|iters| {
                                (0..iters)
                                    .map(|_| handshake(&cfg, &mut wire).expect("handshake").2)
                                    .sum()
                            })
                        });
                    } else {
                        g.bench_function(bench, |b| {
                            b.iter(|| handshake(&cfg, &mut wire).expect("handshake"))
                        });
                    }
                }
            }
        }
        g.finish();
    }
}

/// A connected pair that negotiated `suite`, with the buffers to move data between them.
struct Pair {
    client: ClientConnection,
    server: ServerConnection,
    wire: Vec<u8>,
    plaintext: Vec<u8>,
}

impl Pair {
    fn new(p: Provider, suite: SupportedCipherSuite, id: &Identity) -> Pair {
        let provider = CryptoProvider {
            cipher_suites: vec![suite],
            ..Kx::X25519.provider(p)
        };
        let mut wire = Vec::with_capacity(2 * BULK_WRITE);
        let (client, server, _) = handshake(&configs(provider, id), &mut wire).expect("handshake");
        assert_eq!(
            server.negotiated_cipher_suite().map(|s| s.suite()),
            Some(suite.suite())
        );
        Pair {
            client,
            server,
            wire,
            plaintext: vec![0; BULK_WRITE],
        }
    }

    /// The server sends `data` in `write`-byte writes, the client reads it all.
    fn server_to_client(&mut self, data: &[u8], write: usize) -> Result<()> {
        let mut received = 0;
        for chunk in data.chunks(write) {
            self.server.writer().write_all(chunk)?;
            drain(&mut self.server, &mut self.wire)?;
            feed(&mut self.client, &self.wire)?;
            received += read_plaintext(&mut self.client, &mut self.plaintext)?;
        }
        if received != data.len() {
            return Err(format!("{received} bytes received of {}", data.len()).into());
        }
        Ok(())
    }

    /// The client sends `query`, the server reads it and answers `reply`, the client reads it.
    fn round(&mut self, query: &[u8], reply: &[u8]) -> Result<()> {
        self.client.writer().write_all(query)?;
        drain(&mut self.client, &mut self.wire)?;
        feed(&mut self.server, &self.wire)?;
        let got = read_plaintext(&mut self.server, &mut self.plaintext)?;
        self.server.writer().write_all(reply)?;
        drain(&mut self.server, &mut self.wire)?;
        feed(&mut self.client, &self.wire)?;
        let back = read_plaintext(&mut self.client, &mut self.plaintext)?;
        if got != query.len() || back != reply.len() {
            return Err(format!("round moved {got} and {back} bytes").into());
        }
        Ok(())
    }
}

fn records(c: &mut Criterion<ThreadCpuTime>) {
    let id = Identity::new("ecdsa_p256", &rcgen::PKCS_ECDSA_P256_SHA256);
    let data = vec![b'x'; BULK_BYTES];
    let mut g = c.benchmark_group("bulk_1MiB_16KiB_writes");
    g.throughput(Throughput::Bytes(BULK_BYTES as u64))
        .sample_size(50);
    for p in Provider::ALL {
        for (name, suite) in p.suites() {
            let mut pair = Pair::new(p, suite, &id);
            g.bench_function(BenchmarkId::new(name, p.name()), |b| {
                b.iter(|| pair.server_to_client(&data, BULK_WRITE).expect("bulk"))
            });
        }
    }
    g.finish();

    let (query, reply) = ([b'Q'; SMALL], [b'D'; SMALL]);
    let mut g = c.benchmark_group("round_100B");
    for p in Provider::ALL {
        for (name, suite) in p.suites() {
            let mut pair = Pair::new(p, suite, &id);
            g.bench_function(BenchmarkId::new(name, p.name()), |b| {
                b.iter(|| pair.round(&query, &reply).expect("round"))
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .with_measurement(ThreadCpuTime)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = handshakes, records
}
criterion_main!(benches);
