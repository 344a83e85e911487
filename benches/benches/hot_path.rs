//! Criterion micro-benchmarks of the per-message and per-transaction hot path: framing, the
//! relay loop over in-memory pipes, and pool checkout/return; and the once-a-second sweep of
//! the client registry, which holds up a one-thread runtime while it runs.

// Benchmark code: a failed unwrap is a broken benchmark.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use sluice::clients::{ClientIdentity, ClientRegistry};
use sluice::pool::{GroupLimits, Limits, Pools};
use sluice::prepared::ServerStatements;
use sluice::protocol::backend::{Out, TxStatus};
use sluice::protocol::frontend::Startup;
use sluice::protocol::Header;
use sluice::relay::{relay_streams, End, Ends, Flow};

/// `rows` DataRow messages of one `width`-byte text column, then CommandComplete and
/// ReadyForQuery('I'): what a server sends for a large SELECT.
fn result_set(rows: usize, width: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(rows * (width + 11) + 32);
    let value = vec![b'x'; width];
    for _ in 0..rows {
        b.put_u8(b'D');
        b.put_u32((4 + 2 + 4 + width) as u32);
        b.put_u16(1);
        b.put_u32(width as u32);
        b.put_slice(&value);
    }
    Out::command_complete(&mut b, &format!("SELECT {rows}"));
    Out::ready_for_query(&mut b, TxStatus::Idle);
    b
}

fn framing(c: &mut Criterion) {
    let buf = result_set(10_000, 100);
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("walk_headers_1MB_of_datarows", |b| {
        b.iter(|| {
            let (mut pos, mut n) = (0, 0u32);
            while let Ok(Some(h)) = Header::peek(&buf[pos..]) {
                pos += h.total();
                n += 1;
            }
            std::hint::black_box(n)
        })
    });
    g.finish();

    let mut startup = BytesMut::new();
    let params =
        b"user\0app\0database\0appdb\0application_name\0lambda-fn\0client_encoding\0UTF8\0\0";
    startup.put_u32((8 + params.len()) as u32);
    startup.put_u32(196_608);
    startup.put_slice(params);
    c.bench_function("startup_packet_parse", |b| {
        b.iter(|| std::hint::black_box(Startup::parse(&startup)))
    });
}

/// One request relayed: the client sends a Query, the server answers with `result`; ends when the
/// relay releases the server at ReadyForQuery('I').
async fn relay_once(result: &[u8]) {
    let (mut client_app, mut client_proxy) = tokio::io::duplex(64 * 1024);
    let (mut server_proxy, mut server_app) = tokio::io::duplex(64 * 1024);
    let mut cbuf = BytesMut::new();
    Out::query(&mut cbuf, "SELECT big");
    let mut sbuf = BytesMut::with_capacity(16 * 1024);
    let mut on_server = ServerStatements::with_capacity(16);
    let mut flow = Flow::new();
    let ends = Ends {
        client: &mut client_proxy,
        client_buf: &mut cbuf,
        server: &mut server_proxy,
        server_buf: &mut sbuf,
        on_server: &mut on_server,
        cancel: None,
    };
    let server = async {
        let mut q = [0u8; 64];
        let _ = server_app.read(&mut q).await;
        let _ = server_app.write_all(result).await;
    };
    let client = async {
        let mut sink = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < result.len() {
            match client_app.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    };
    let startup = sluice::settings::Settings::new();
    let (end, _, got) = tokio::join!(
        relay_streams(ends, &mut flow, 1 << 30, None, None, &startup),
        server,
        client
    );
    assert!(matches!(end, End::Released));
    assert_eq!(got, result.len());
}

fn relay(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("relay");
    for (name, rows, width) in [("8MB_of_100B_rows", 80_000, 100), ("small_result", 1, 20)] {
        let result = result_set(rows, width);
        g.throughput(Throughput::Bytes(result.len() as u64));
        g.bench_function(name, |b| b.to_async(&rt).iter(|| relay_once(&result)));
    }
    g.finish();
}

fn limits() -> Limits {
    Limits {
        budget: 20,
        max_connecting: 8,
        max_waiting: 10_000,
        wait_timeout: Duration::from_secs(5),
        shed_target: Duration::from_millis(500),
        shed_interval: Duration::from_secs(2),
        server_unavailable_timeout: Duration::from_secs(5),
    }
}

fn pool(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pools: Pools<u64> = Pools::new(limits());
    let p = pools.pool("db", "app", 20, 0);
    let g = pools.group("app", GroupLimits::default());
    c.bench_function("pool_checkout_return_uncontended", |b| {
        b.to_async(&rt).iter(|| async {
            let mut lease = pools.acquire(p, g).await.expect("admitted");
            if lease.needs_connect() {
                lease.fill(1);
            }
            lease.release();
        })
    });

    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    c.bench_function("pool_checkout_return_50_tasks_20_conns_x100", |b| {
        b.iter_batched(
            || (),
            |_| {
                mt.block_on(async {
                    let tasks: Vec<_> = (0..50)
                        .map(|_| {
                            let pools = pools.clone();
                            tokio::spawn(async move {
                                for _ in 0..100 {
                                    let mut lease = pools.acquire(p, g).await.expect("admitted");
                                    if lease.needs_connect() {
                                        lease.fill(1);
                                    }
                                    tokio::task::yield_now().await;
                                    lease.release();
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        let _ = t.await;
                    }
                })
            },
            BatchSize::PerIteration,
        )
    });
}

/// Sluice's side of a SCRAM login to the server: with the keys derived at this login (PBKDF2,
/// 4,096 rounds, what every login cost before keys were kept), and with the keys kept from an
/// earlier login as the same user.
fn scram_login(c: &mut Criterion) {
    use sluice::auth::{Binding, Channel, ScramClient, ScramKeys, ScramServer, ScramVerifier};
    let salt = b"sixteen byte slt";
    let verifier = ScramVerifier::derive("app-password", salt, 4096);
    let login = |keys: Option<&ScramKeys>| {
        let (mut client, first) = ScramClient::start(Binding::Unsupported);
        let (server, server_first) =
            ScramServer::start(&verifier, &first, "servernonce", Channel::Unavailable)
                .expect("server-first");
        let (salt, iterations) = client.server_first(&server_first).expect("salt");
        let derived;
        let keys = match keys {
            Some(k) => k,
            None => {
                derived = ScramKeys::derive("app-password", &salt, iterations);
                &derived
            }
        };
        let server_final = server.finish(&client.client_final(keys)).expect("proof");
        client.finish(&server_final).expect("signature");
    };
    let kept = ScramKeys::derive("app-password", salt, 4096);
    let mut g = c.benchmark_group("scram_server_login");
    g.bench_function("keys_derived", |b| b.iter(|| login(None)));
    g.bench_function("keys_kept", |b| b.iter(|| login(Some(&kept))));
    g.finish();
}

/// The idle-timeout sweep over 10,000 registered idle clients, none of them due: what the
/// registry's lock (and, with one worker thread, every session) waits for once a second.
fn registry_sweep(c: &mut Criterion) {
    let registry = ClientRegistry::default();
    let name = |s: &str| std::sync::Arc::new(s.to_owned());
    let (user, db, app) = (name("app"), name("appdb"), name("lambda"));
    let _held: Vec<_> = (0..10_000)
        .map(|_| {
            registry.register(ClientIdentity {
                user: user.clone(),
                database: db.clone(),
                application_name: app.clone(),
                addr: None,
                tls: false,
                idle_timeout: Duration::from_secs(900),
            })
        })
        .collect();
    let mut g = c.benchmark_group("client_registry");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("sweep_10000_idle", |b| {
        b.iter(|| assert_eq!(registry.sweep(), 0))
    });
    g.finish();
}

criterion_group!(benches, framing, relay, pool, scram_login, registry_sweep);
criterion_main!(benches);
