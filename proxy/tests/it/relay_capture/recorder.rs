//! Two recording TCP relays: client → relay A → Sluice → relay B → PostgreSQL.
//!
//! Each relay forwards both directions of its connections, and every chunk read is appended,
//! with its direction, to one shared log before it is forwarded, so the log is in causal order.
//!
//! # Why one scheduler does all the reading
//! A plain copy loop per direction logs whatever each `read` returned, and what a read returns
//! depends on timing: two writes of PostgreSQL's (an ErrorResponse is flushed at once, the
//! ReadyForQuery at the Sync) come as one chunk or as two, and Sluice's answer to the client
//! and its request to the server land in the log in either order. Golden files must come out
//! the same on every run, so here a single task reads every socket: it waits until nothing has
//! moved anywhere for [`quiet`] (no new bytes queued, no write of ours in progress), then reads
//! one chunk of at most [`CHUNK`] bytes from the first socket with bytes queued, in a fixed
//! order (Sluice's output to the client, Sluice's output to the server, the server's output,
//! the client's output), and forwards it. Everything one chunk causes has happened before the
//! next is read, so the log depends only on what the programs do, not on how they are
//! scheduled. A message longer than a chunk is still split, at deterministic places.
//!
//! Only connections that start with a StartupMessage are scheduled and recorded. Sluice's
//! upstream probe (an SSLRequest every second) and cancel requests are copied straight through.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read as _};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::fixture::{messages, Dir};
use crate::support::within;

/// The most one read takes.
pub const CHUNK: usize = 16 * 1024;
/// The receive buffer of every relay socket. Fixed, so the kernel does not tune it as it goes
/// (which depends on timing), and large: a sender that is ahead always has more than a chunk
/// queued, even while the receive window waits to reopen by a whole segment.
const RECEIVE_BUFFER: u32 = 1 << 20;
/// How often the scheduler looks at the sockets.
const TICK: Duration = Duration::from_millis(2);
/// Protocol version 3.0, the code of a StartupMessage.
const PROTOCOL_3: u32 = 196_608;

/// How long nothing may move before the next chunk is read: `RELAY_CAPTURE_QUIET_MS`, 50 ms by
/// default. Raise it on a busy machine if two captures differ.
pub fn quiet() -> Duration {
    let ms = std::env::var("RELAY_CAPTURE_QUIET_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    Duration::from_millis(ms)
}

/// One chunk as read, and its direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub dir: Dir,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Start-up: forwarded, not recorded.
    Before,
    Recording,
    /// The client sent Terminate: what follows is not the relay's.
    After,
}

/// What the relays saw.
pub struct Recording {
    /// From [`Recorder::start_recording`] to the client's Terminate.
    pub chunks: Vec<Chunk>,
    /// After the client's Terminate (Sluice's clean-up of the server, outside the relay).
    pub after: Vec<Chunk>,
    /// Whether the client's Terminate was seen.
    pub terminated: bool,
    /// The connections that carried recorded chunks: (relay B?, connection number).
    pub connections: BTreeSet<(bool, usize)>,
}

/// One direction of one relayed connection.
struct Pipe {
    dir: Dir,
    conn: usize,
    /// The socket read (non-blocking).
    from: StdStream,
    /// The writer of the other socket: bytes to write, `None` to shut it down.
    to: mpsc::UnboundedSender<Option<Vec<u8>>>,
    done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Avail {
    Nothing,
    /// Bytes queued, at most [`CHUNK`] counted.
    Bytes(usize),
    Eof,
    Done,
}

struct Log {
    phase: Phase,
    chunks: Vec<Chunk>,
    after: Vec<Chunk>,
    /// Everything the client sent while recording, to see its Terminate.
    client: Vec<u8>,
    connections: BTreeSet<(bool, usize)>,
}

struct Shared {
    pipes: Mutex<Vec<Pipe>>,
    log: Mutex<Log>,
    /// Chunks handed to writers and not written yet.
    in_flight: AtomicUsize,
    /// Since when the scheduler has found nothing to read, everything having been quiet.
    idle_since: Mutex<Option<Instant>>,
}

/// A handle to wait for the relays to go quiet.
#[derive(Clone)]
pub struct Tap(Arc<Shared>);

impl Tap {
    /// Waits until, after this call, the scheduler has found nothing left to read. Call it
    /// after a write: the bytes written are queued before it starts.
    pub async fn settle(&self) {
        let start = Instant::now();
        within("the relays to go quiet", async {
            loop {
                if self.0.idle_since.lock().unwrap().is_some_and(|t| t > start) {
                    return;
                }
                tokio::time::sleep(TICK).await;
            }
        })
        .await
    }
}

pub struct Recorder {
    shared: Arc<Shared>,
    front: Option<TcpListener>,
    front_addr: SocketAddr,
    back_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Recorder {
    /// Binds both relays; relay B forwards to `server` (PostgreSQL).
    pub async fn start(server: SocketAddr) -> Recorder {
        let shared = Arc::new(Shared {
            pipes: Mutex::new(Vec::new()),
            log: Mutex::new(Log {
                phase: Phase::Before,
                chunks: Vec::new(),
                after: Vec::new(),
                client: Vec::new(),
                connections: BTreeSet::new(),
            }),
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(None),
        });
        let (front, back) = (listen(), listen());
        let front_addr = front.local_addr().unwrap();
        let back_addr = back.local_addr().unwrap();
        let tasks = vec![
            tokio::spawn(schedule(shared.clone(), quiet())),
            tokio::spawn(accept(back, server, shared.clone(), true)),
        ];
        Recorder {
            shared,
            front: Some(front),
            front_addr,
            back_addr,
            tasks,
        }
    }

    /// Relay B's address: Sluice's upstream.
    pub fn server_side(&self) -> SocketAddr {
        self.back_addr
    }

    /// Starts relay A in front of Sluice; returns its address, for the client.
    pub fn serve_clients(&mut self, sluice: SocketAddr) -> SocketAddr {
        let front = self.front.take().expect("serve_clients called once");
        let shared = self.shared.clone();
        self.tasks
            .push(tokio::spawn(accept(front, sluice, shared, false)));
        self.front_addr
    }

    pub fn tap(&self) -> Tap {
        Tap(self.shared.clone())
    }

    /// Records from now on (call it when everything is quiet: see [`Tap::settle`]).
    pub fn start_recording(&self) {
        let mut log = self.shared.log.lock().unwrap();
        assert_eq!(log.phase, Phase::Before, "recording started twice");
        log.phase = Phase::Recording;
    }

    /// Stops the relays (their sockets close) and returns what they recorded.
    pub fn finish(self) -> Recording {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.pipes.lock().unwrap().clear();
        let mut log = self.shared.log.lock().unwrap();
        Recording {
            chunks: std::mem::take(&mut log.chunks),
            after: std::mem::take(&mut log.after),
            terminated: log.phase == Phase::After,
            connections: std::mem::take(&mut log.connections),
        }
    }
}

/// A socket with the fixed [`RECEIVE_BUFFER`].
fn socket() -> TcpSocket {
    let s = TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(RECEIVE_BUFFER).unwrap();
    s
}

/// A listener on a free loopback port; the sockets it accepts inherit its receive buffer.
fn listen() -> TcpListener {
    let s = socket();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    s.listen(64).unwrap()
}

/// Accepts connections and relays each to `target`: relay A (`back` false, client → Sluice) or
/// relay B (`back` true, Sluice → PostgreSQL).
async fn accept(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>, back: bool) {
    let mut next = 0;
    loop {
        let Ok((down, _)) = listener.accept().await else {
            return;
        };
        next += 1;
        let conn = next;
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(up) = socket().connect(target).await else {
                return;
            };
            let (mut down, mut up) = (down, up);
            let _ = (down.set_nodelay(true), up.set_nodelay(true));
            // The first 8 bytes say what the connection is: a StartupMessage, or an SSLRequest
            // or CancelRequest (copied straight through, never recorded).
            let mut first = [0u8; 8];
            if down.read_exact(&mut first).await.is_err() || up.write_all(&first).await.is_err() {
                return;
            }
            let code = u32::from_be_bytes([first[4], first[5], first[6], first[7]]);
            if code != PROTOCOL_3 {
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                return;
            }
            let (dir_in, dir_out) = if back {
                (Dir::ServerOut, Dir::ServerIn)
            } else {
                (Dir::ClientIn, Dir::ClientOut)
            };
            register(&shared, conn, dir_in, down, dir_out, up);
        });
    }
}

/// Hands both directions of a connection pair to the scheduler: bytes read from `down` go to
/// `up` as `dir_down`, bytes read from `up` go to `down` as `dir_up`.
fn register(
    shared: &Arc<Shared>,
    conn: usize,
    dir_down: Dir,
    down: TcpStream,
    dir_up: Dir,
    up: TcpStream,
) {
    // Reads go through a std handle (non-blocking, as tokio left it), writes through tokio.
    let split = |s: TcpStream| {
        let std = s.into_std().unwrap();
        let read = std.try_clone().unwrap();
        (read, TcpStream::from_std(std).unwrap())
    };
    let (down_read, down_write) = split(down);
    let (up_read, up_write) = split(up);
    let to_up = writer(up_write, shared.clone());
    let to_down = writer(down_write, shared.clone());
    let mut pipes = shared.pipes.lock().unwrap();
    pipes.push(Pipe {
        dir: dir_down,
        conn,
        from: down_read,
        to: to_up,
        done: false,
    });
    pipes.push(Pipe {
        dir: dir_up,
        conn,
        from: up_read,
        to: to_down,
        done: false,
    });
}

/// A task writing what the scheduler forwards to `w`.
fn writer(mut w: TcpStream, shared: Arc<Shared>) -> mpsc::UnboundedSender<Option<Vec<u8>>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Option<Vec<u8>>>();
    tokio::spawn(async move {
        while let Some(item) = rx.recv().await {
            match item {
                Some(bytes) => {
                    let _ = w.write_all(&bytes).await;
                }
                None => {
                    let _ = w.shutdown().await;
                }
            }
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    });
    tx
}

/// The order in which sockets that all have bytes are read: Sluice's output first, then the
/// server's, then the client's.
fn priority(dir: Dir) -> u8 {
    match dir {
        Dir::ClientOut => 0,
        Dir::ServerOut => 1,
        Dir::ServerIn => 2,
        Dir::ClientIn => 3,
    }
}

fn avail(p: &Pipe, scratch: &mut [u8]) -> Avail {
    if p.done {
        return Avail::Done;
    }
    match p.from.peek(scratch) {
        Ok(0) => Avail::Eof,
        Ok(n) => Avail::Bytes(n),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Avail::Nothing,
        Err(_) => Avail::Eof,
    }
}

/// The one reader of every socket (see the module documentation).
async fn schedule(shared: Arc<Shared>, quiet: Duration) {
    let mut scratch = vec![0u8; CHUNK];
    let mut last: Vec<Avail> = Vec::new();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(TICK).await;
        let mut pipes = shared.pipes.lock().unwrap();
        let snapshot: Vec<Avail> = pipes.iter().map(|p| avail(p, &mut scratch)).collect();
        let writing = shared.in_flight.load(Ordering::SeqCst) > 0;
        if writing || snapshot != last {
            last = snapshot;
            since = Instant::now();
            *shared.idle_since.lock().unwrap() = None;
            continue;
        }
        if since.elapsed() < quiet {
            continue;
        }
        let pick = (0..pipes.len())
            .filter(|&i| matches!(snapshot[i], Avail::Bytes(_) | Avail::Eof))
            .min_by_key(|&i| (priority(pipes[i].dir), i));
        let Some(i) = pick else {
            shared
                .idle_since
                .lock()
                .unwrap()
                .get_or_insert_with(Instant::now);
            continue;
        };
        *shared.idle_since.lock().unwrap() = None;
        let pipe = &mut pipes[i];
        let item = match snapshot[i] {
            Avail::Bytes(n) => {
                let mut buf = vec![0u8; n];
                match (&pipe.from).read(&mut buf) {
                    Ok(got) if got > 0 => {
                        buf.truncate(got);
                        record(&shared, pipe.dir, pipe.conn, &buf);
                        Some(buf)
                    }
                    _ => {
                        pipe.done = true;
                        None
                    }
                }
            }
            _ => {
                pipe.done = true;
                None
            }
        };
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        if pipe.to.send(item).is_err() {
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        // Wait for a new quiet period before the next read.
        last.clear();
        since = Instant::now();
    }
}

fn record(shared: &Shared, dir: Dir, conn: usize, bytes: &[u8]) {
    let mut log = shared.log.lock().unwrap();
    let chunk = Chunk {
        dir,
        bytes: bytes.to_vec(),
    };
    if std::env::var_os("RELAY_CAPTURE_TRACE").is_some() {
        // Raw bytes, for debugging a scenario that goes wrong.
        eprintln!(
            "{:?} {} {}",
            log.phase,
            dir.symbol(),
            String::from_utf8_lossy(bytes).escape_debug()
        );
    }
    match log.phase {
        Phase::Before => {}
        Phase::Recording => {
            let back = matches!(dir, Dir::ServerOut | Dir::ServerIn);
            log.connections.insert((back, conn));
            log.chunks.push(chunk);
            if dir == Dir::ClientIn {
                log.client.extend_from_slice(bytes);
                let ended = messages(&log.client)
                    .is_ok_and(|m| m.last().is_some_and(|(tag, _)| *tag == b'X'));
                if ended {
                    log.phase = Phase::After;
                }
            }
        }
        Phase::After => log.after.push(chunk),
    }
}
