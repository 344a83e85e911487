//! Hostile clients, each bounded by a named limit, against the `sluice` binary so that its
//! memory alone is measured (`/proc/PID/status`), with a normal client served throughout:
//! sockets that never send a startup packet (`client_login_timeout`), half packets
//! (`client_login_timeout` before login, `client_stall_timeout` after), slow readers of huge
//! results (backpressure to the server) and a slow COPY writer (streamed, never buffered whole).
//! The memory figures printed here are the ones the README's "Memory under hostile clients"
//! states.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use futures_util::StreamExt;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::admin::{http_get, metric};
use crate::pg::PgServer;
use crate::support::process::SluiceProcess;
use crate::support::raw::{error_code, Raw};
use crate::support::{start_pg_with_user, within_secs};

const USER: &str = "hostile_app";
const PASSWORD: &str = "hostile-pw";
const DB: &str = "hostile_db";

/// The limits under test, short so the test is: in production they are seconds more.
const LOGIN_TIMEOUT: &str = "2s";
const STALL_TIMEOUT: &str = "2s";

/// PostgreSQL and the `sluice` binary in front of it, with a pool of 8.
async fn start() -> (PgServer, SluiceProcess) {
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let upstream = pg.url(USER, PASSWORD, DB);
    let sluice = SluiceProcess::spawn(&[
        ("SLUICE_UPSTREAM", &upstream),
        ("SLUICE_MAX_SERVER_CONNECTIONS", "8"),
        ("SLUICE_POOL_SIZE", "8"),
        ("SLUICE_MAX_CLIENT_CONNECTIONS", "10000"),
        ("SLUICE_CLIENT_LOGIN_TIMEOUT", LOGIN_TIMEOUT),
        ("SLUICE_CLIENT_STALL_TIMEOUT", STALL_TIMEOUT),
    ]);
    (pg, sluice)
}

/// Lets this process (and the `sluice` it starts) open `need` descriptors: the soft limit is
/// raised to the hard one. Fails, rather than skips, where the hard limit is too low.
fn allow_fds(need: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < need {
            assert!(
                lim.rlim_max >= need,
                "this test needs {need} file descriptors; the hard limit is {}",
                lim.rlim_max
            );
            lim.rlim_cur = lim.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

/// A normal client running `SELECT 1` in a loop beside the hostile ones: each
/// [`Steady::served`] checks that it made progress since the last and met no error.
struct Steady {
    done: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    seen: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Steady {
    async fn start(sluice: &SluiceProcess) -> Steady {
        let (client, conn) =
            tokio_postgres::connect(&sluice.url(USER, PASSWORD, DB), tokio_postgres::NoTls)
                .await
                .expect("the normal client logs in");
        tokio::spawn(conn);
        let done = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let (d, e) = (done.clone(), error.clone());
        let task = tokio::spawn(async move {
            loop {
                let r =
                    tokio::time::timeout(Duration::from_secs(10), client.simple_query("SELECT 1"))
                        .await;
                match r {
                    Ok(Ok(_)) => {
                        d.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(err)) => {
                        *e.lock().unwrap() = Some(format!("{err:?}"));
                        return;
                    }
                    Err(_) => {
                        *e.lock().unwrap() = Some("no answer within 10 s".into());
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Steady {
            done,
            error,
            seen: 0,
            task,
        }
    }

    /// Asserts the normal client was served, without an error, since the last call.
    async fn served(&mut self, during: &str) {
        // At least one more answer, waiting a little for it (a busy machine).
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.done.load(Ordering::Relaxed) <= self.seen && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(e) = self.error.lock().unwrap().clone() {
            panic!("the normal client failed during {during}: {e}");
        }
        let now = self.done.load(Ordering::Relaxed);
        assert!(
            now > self.seen,
            "the normal client was not served during {during}"
        );
        self.seen = now;
    }
}

impl Drop for Steady {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `conn` is closed by Sluice (EOF or reset), reading and dropping what it sends.
async fn closed_by_sluice(mut conn: TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_that_never_send_a_startup_packet_cost_little_and_are_closed() {
    const N: usize = 2_000;
    // Bound on what each costs, from the measured ~FIGURE KiB (README).
    const MAX_KIB_EACH: i64 = 8;
    allow_fds(2 * N as u64 + 1_000);
    let (_pg, sluice) = start().await;
    let mut steady = Steady::start(&sluice).await;
    // A first round so the process has grown to its working size (threads, allocator arenas).
    let open = |n: usize| {
        let addr = sluice.local;
        futures_util::stream::iter(0..n)
            .map(move |_| async move { TcpStream::connect(addr).await.expect("connect") })
            .buffer_unordered(100)
            .collect::<Vec<_>>()
    };
    let warm = open(200).await;
    within_secs(30, "the warm-up sockets closed", async {
        futures_util::future::join_all(warm.into_iter().map(closed_by_sluice)).await
    })
    .await;
    steady.served("the warm-up").await;

    let accepted = || async {
        let body = http_get(sluice.admin, "/metrics").1;
        metric(&body, "sluice_client_connections_accepted_total") as usize
    };
    let fds = sluice.open_fds();
    let accepted_before = accepted().await;
    let before = sluice.rss_kib();
    let started = Instant::now();
    let socks = open(N).await;
    // Sluice has accepted them all.
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted().await < accepted_before + N && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        accepted().await >= accepted_before + N,
        "sluice accepted all {N} sockets"
    );
    let during = sluice.rss_kib();
    steady.served("2,000 silent sockets").await;
    let each = (during - before) as f64 / N as f64;
    eprintln!(
        "{N} sockets without a startup packet: RSS {before} -> {during} KiB, {each:.2} KiB each"
    );
    assert!(
        during - before <= MAX_KIB_EACH * N as i64,
        "{N} silent sockets cost {each:.2} KiB each, over {MAX_KIB_EACH} KiB"
    );

    // Each is closed at client_login_timeout, with nothing said (it never spoke the protocol
    // far enough to read an error) or a FATAL.
    let answers = within_secs(
        30,
        "the silent sockets closed at client_login_timeout",
        async { futures_util::future::join_all(socks.into_iter().map(closed_by_sluice)).await },
    )
    .await;
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_secs(2),
        "closed before client_login_timeout: {closed_after:?}"
    );
    for a in &answers {
        assert!(
            a.is_empty() || a[0] == b'E',
            "a silent socket was sent {a:?}"
        );
    }
    // Its descriptors are back where they were (give or take the pool's server connections,
    // which come and go on their own).
    let slack = 4;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sluice.open_fds() > fds + slack && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sluice.open_fds() <= fds + slack,
        "sluice's descriptors went back to {fds}: {}",
        sluice.open_fds()
    );
    steady.served("the closing of 2,000 sockets").await;
}

/// Logs in a raw client.
async fn raw_login(sluice: &SluiceProcess) -> Raw {
    Raw::login(sluice.local, false, USER, PASSWORD, DB).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_packets_are_dropped_at_their_timeouts_and_their_memory_is_reused() {
    const STARTUPS: usize = 500;
    const HALF_QUERIES: usize = 100;
    const SENT: usize = 256 << 10;
    allow_fds(4 * STARTUPS as u64 + 1_000);
    let (_pg, sluice) = start().await;
    let mut steady = Steady::start(&sluice).await;

    // Half a startup packet: its length says 200 bytes, 20 come.
    let mut startup = BytesMut::new();
    startup.put_u32(200);
    startup.put_u32(196_608);
    startup.put_slice(b"user\0hostile");
    let half_startups = futures_util::stream::iter(0..STARTUPS)
        .map(|_| {
            let (addr, head) = (sluice.local, startup.clone());
            async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                s.write_all(&head).await.expect("send");
                s
            }
        })
        .buffer_unordered(100)
        .collect::<Vec<_>>()
        .await;
    let answers = within_secs(
        30,
        "half startup packets closed at client_login_timeout",
        async {
            futures_util::future::join_all(half_startups.into_iter().map(closed_by_sluice)).await
        },
    )
    .await;
    assert_eq!(answers.len(), STARTUPS);
    steady.served("half startup packets").await;

    // Logged-in clients that send the first 256 KiB of a 512 KiB Query and stop: no server is
    // theirs yet (the request buffer holds up to 1 MiB), so it is their buffered bytes alone
    // that client_stall_timeout bounds. Twice, so a second round can show the memory reused.
    let mut head = BytesMut::new();
    head.put_u8(b'Q');
    head.put_u32(4 + (512 << 10));
    head.put_bytes(b' ', SENT - 5);
    let head = head.freeze();
    let mut peaks = Vec::new();
    for round in 1..=2 {
        let before = sluice.rss_kib();
        let mut clients = Vec::new();
        for _ in 0..HALF_QUERIES {
            let mut c = raw_login(&sluice).await;
            c.send(&head).await;
            clients.push(c);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let during = sluice.rss_kib();
        steady
            .served("clients stalled half-way through a Query")
            .await;
        let ends = within_secs(30, "half-sent queries end at client_stall_timeout", async {
            futures_util::future::join_all(clients.into_iter().map(|mut c| async move {
                let msgs = c.until_eof().await;
                error_code(&msgs)
            }))
            .await
        })
        .await;
        for code in ends {
            assert_eq!(code.as_deref(), Some("57014"), "a stalled client's FATAL");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = sluice.rss_kib();
        eprintln!(
            "round {round}: {HALF_QUERIES} clients holding {} KiB of a Query each: RSS {before} \
             -> {during} KiB while they stall ({:.0} KiB each), {after} KiB once they are gone",
            SENT >> 10,
            (during - before) as f64 / HALF_QUERIES as f64
        );
        // The buffered bytes, a buffer that grew to hold them, and the rest of a client.
        let bound = HALF_QUERIES as i64 * (2 * (SENT as i64 >> 10) + 64);
        assert!(
            during - before <= bound,
            "{HALF_QUERIES} stalled clients grew the RSS by {} KiB, over {bound} KiB",
            during - before
        );
        peaks.push((before, during, after));
    }
    // Round two reuses what round one freed: its peak stays near round one's, where a leak would
    // add round one's growth again. Peaks, not what is left after each round: how soon the
    // allocator hands freed pages back to the system is its own affair.
    let ((before, first, _), (_, second, last)) = (peaks[0], peaks[1]);
    let slack = (first - before).max(0) / 10 + 2_048;
    assert!(
        second <= first + slack && last <= first + slack,
        "the second round of stalled clients peaked at {second} KiB and left {last} KiB, after \
         the first peaked at {first} KiB (from {before} KiB): their buffers are not given back"
    );
    steady.served("the end of the stalled clients").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_of_huge_results_hold_bounded_memory() {
    const READERS: usize = 4;
    const ROWS: usize = 50_000; // of 1 KiB: ~50 MB each
    const MAX_KIB_EACH: i64 = 2_048;
    let (_pg, sluice) = start().await;
    let mut steady = Steady::start(&sluice).await;
    let before = sluice.rss_kib();
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut c = raw_login(&sluice).await;
        let mut b = BytesMut::new();
        frontend::query(
            &format!("SELECT repeat('x', 1024) FROM generate_series(1, {ROWS})"),
            &mut b,
        )
        .expect("encode");
        c.send(&b).await;
        readers.push(c);
    }
    // They read nothing for 3 s: the server is held back, Sluice buffers no more than its read
    // buffer per session (the rest waits in socket buffers and the server).
    let mut peak = before;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(sluice.rss_kib());
    }
    steady.served("slow readers that read nothing").await;
    // Then they read, slowly: 16 KiB at a time with a pause, while the RSS is sampled.
    let rss_peak = Arc::new(AtomicU64::new(peak as u64));
    let pid = sluice.child.id().to_string();
    let sampler = {
        let rss_peak = rss_peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(kib) = crate::support::process::rss_kib_of(&pid) {
                    rss_peak.fetch_max(kib as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let read_all = readers.into_iter().map(|c| async move {
        let mut stream = c.stream;
        let mut buf = vec![0u8; 16 << 10];
        let mut total = 0usize;
        let mut tail = Vec::new();
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "the result ended early, after {total} bytes");
            total += n;
            tail.extend_from_slice(&buf[..n]);
            let keep = tail.len().saturating_sub(64);
            tail.drain(..keep);
            // The stream ends with ReadyForQuery ('Z', length 5, 'I').
            if tail.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
                return total;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    });
    let totals = within_secs(300, "the slow readers read their results", async {
        futures_util::future::join_all(read_all).await
    })
    .await;
    sampler.abort();
    steady.served("slow readers").await;
    let peak = rss_peak.load(Ordering::Relaxed) as i64;
    for t in &totals {
        assert!(*t > ROWS * 1024, "a whole result: {t} bytes");
    }
    eprintln!(
        "{READERS} slow readers of {} MB each: RSS {before} KiB, peak {peak} KiB (+{} KiB)",
        totals[0] >> 20,
        peak - before
    );
    assert!(
        peak - before <= MAX_KIB_EACH * READERS as i64,
        "{READERS} slow readers grew the RSS by {} KiB, over {MAX_KIB_EACH} KiB each",
        peak - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_copy_writer_is_streamed_not_buffered() {
    const CHUNK: usize = 64 << 10;
    const CHUNKS: usize = 640; // 40 MiB
    const MAX_KIB: i64 = 4_096;
    let (pg, sluice) = start().await;
    pg.psql_db(
        DB,
        "CREATE TABLE hostile_copy (line text); GRANT ALL ON hostile_copy TO hostile_app",
    );
    let mut steady = Steady::start(&sluice).await;
    let mut c = raw_login(&sluice).await;
    let mut b = BytesMut::new();
    frontend::query("COPY hostile_copy FROM STDIN", &mut b).expect("encode");
    c.send(&b).await;
    let (tag, _) = c.recv().await;
    assert_eq!(tag, b'G', "CopyInResponse");
    // Lines of 1 KiB, 64 per CopyData message.
    let mut line = vec![b'y'; 1023];
    line.push(b'\n');
    let mut msg = BytesMut::new();
    msg.put_u8(b'd');
    msg.put_u32(4 + CHUNK as u32);
    for _ in 0..CHUNK / line.len() {
        msg.put_slice(&line);
    }
    let msg = msg.freeze();
    let before = sluice.rss_kib();
    let mut peak = before;
    for i in 0..CHUNKS {
        c.stream.write_all(&msg).await.expect("CopyData");
        if i % 32 == 0 {
            peak = peak.max(sluice.rss_kib());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if i == CHUNKS / 2 {
            // A pause shorter than client_stall_timeout: slow is not stalled.
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            steady.served("a paused COPY").await;
        }
    }
    let mut done = BytesMut::new();
    frontend::copy_done(&mut done);
    c.send(&done).await;
    let msgs = c.until_ready().await;
    assert_eq!(error_code(&msgs), None, "{msgs:?}");
    let lines = CHUNKS * (CHUNK / line.len());
    let count = pg.psql_db(DB, "SELECT count(*) FROM hostile_copy");
    assert_eq!(count.trim(), lines.to_string());
    steady.served("a slow COPY").await;
    eprintln!(
        "a COPY of {} MiB written slowly: RSS {before} KiB, peak {peak} KiB (+{} KiB)",
        (CHUNKS * CHUNK) >> 20,
        peak - before
    );
    assert!(
        peak - before <= MAX_KIB,
        "a slow COPY grew the RSS by {} KiB, over {MAX_KIB} KiB",
        peak - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_is_dropped_as_it_arrives() {
    const MESSAGES: usize = 1_024; // of 64 KiB: 64 MiB before the Sync
    const MAX_KIB: i64 = 4_096;
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let upstream = pg.url(USER, PASSWORD, DB);
    let sluice = SluiceProcess::spawn(&[
        ("SLUICE_UPSTREAM", &upstream),
        ("SLUICE_MAX_SERVER_CONNECTIONS", "1"),
        ("SLUICE_MAX_WAITING", "0"),
    ]);
    let hold =
        crate::support::hold_the_only_connection(sluice.local.port(), USER, PASSWORD, DB).await;
    let mut c = raw_login(&sluice).await;
    // Parse + Flush finds no server and no queue: refused, and the batch runs on to a Sync
    // that Sluice drops it up to.
    let mut b = BytesMut::new();
    frontend::parse("", "SELECT 1", [], &mut b).expect("encode");
    frontend::flush(&mut b);
    c.send(&b).await;
    let (tag, body) = c.recv().await;
    assert_eq!(tag, b'E');
    assert_eq!(
        crate::support::raw::fields(&body)
            .get(&'C')
            .map(String::as_str),
        Some("53300")
    );
    let mut parse = BytesMut::new();
    let sql = format!("SELECT '{}'", "z".repeat((64 << 10) - 20));
    frontend::parse("", &sql, [], &mut parse).expect("encode");
    let before = sluice.rss_kib();
    let mut peak = before;
    for i in 0..MESSAGES {
        c.stream.write_all(&parse).await.expect("Parse");
        if i % 64 == 0 {
            peak = peak.max(sluice.rss_kib());
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    peak = peak.max(sluice.rss_kib());
    b.clear();
    frontend::sync(&mut b);
    c.send(&b).await;
    let (tag, _) = c.recv().await;
    assert_eq!(tag, b'Z', "the Sync is answered");
    eprintln!(
        "{} MiB of a refused batch: RSS {before} KiB, peak {peak} KiB (+{} KiB)",
        (MESSAGES * parse.len()) >> 20,
        peak - before
    );
    assert!(
        peak - before <= MAX_KIB,
        "a refused batch grew the RSS by {} KiB, over {MAX_KIB} KiB: it was buffered",
        peak - before
    );
    // The client is in step: once the holder is done, it is served.
    hold.batch_execute("COMMIT").await.expect("holder commits");
    drop(hold);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = c.query("SELECT 'after'").await;
        match error_code(&m) {
            None => break,
            // The holder's connection may be on its way back to the pool still.
            Some(code) if code == "53300" && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Some(_) => panic!("served after the refusal: {m:?}"),
        }
    }
}
