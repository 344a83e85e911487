//! The relay: client ⇄ server bytes while a client holds a server connection.
//!
//! Frame, don't decode: each direction reads into its buffer, walks the 5-byte headers, and
//! forwards everything walked with one write, straight from the buffer (no copy, no allocation
//! in steady state). A message too large to buffer whole is streamed: its header is acted on and
//! its body forwarded as it arrives. Only ReadyForQuery, CopyInResponse and the tags that end a
//! message's response are looked at on the server side; on the client side the tags, and in
//! transaction pooling the statement names of Parse, Bind, Describe and Close (see
//! [`super::prepared`]).
//!
//! Both directions run concurrently in one task, so neither side can deadlock the other by
//! filling a socket buffer while Sluice waits to write the opposite way.
//!
//! # When the server goes back to the pool
//! `pending` counts the requests forwarded that will each end in a ReadyForQuery (Query, Sync,
//! FunctionCall); `partial` is set while messages have been forwarded since the last of those. A
//! ReadyForQuery with status `I` that brings `pending` to zero while nothing is `partial` ends the
//! transaction. Whenever the client half is inside a write, `pending > 0` or `partial` holds (it
//! counts before writing), so the release can never cut a client message in two. Syncs that the
//! server reads during COPY FROM STDIN are ignored by it and so are not counted.
//!
//! # Answers Sluice adds or removes
//! When statements are rewritten, the client half queues an [`Entry`] per message sent (or
//! answered by Sluice itself) and the server half walks the responses against that queue: a
//! response that ends an entry sent by Sluice is swallowed, and an entry Sluice answers itself
//! is answered when its turn comes. An ErrorResponse makes the server skip to the next Sync, so
//! the queue skips with it.

use std::collections::VecDeque;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed,
};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::prepared::{self, ClientStatements, Statement, StatementCommand};
use super::state::{self, Pin};
use super::ClientIo;
use crate::protocol::backend::{self, Out, TxStatus};
use crate::protocol::frontend::{self, tag};
use crate::protocol::{Header, HEADER_LEN};
use crate::server::{statement_name, Prepared, ServerConn, READ_BUFFER};

/// A value both halves read and write. They run in one task, never at once, so relaxed
/// loads and stores suffice (plain moves on common targets); atomics only keep the future `Send`.
#[derive(Default)]
pub struct Shared<A>(A);

macro_rules! shared {
    ($atomic:ty, $t:ty) => {
        impl Shared<$atomic> {
            pub fn new(v: $t) -> Self {
                Shared(<$atomic>::new(v))
            }
            #[inline]
            pub fn get(&self) -> $t {
                self.0.load(Relaxed)
            }
            #[inline]
            pub fn set(&self, v: $t) {
                self.0.store(v, Relaxed)
            }
            #[inline]
            #[allow(dead_code)]
            pub fn replace(&self, v: $t) -> $t {
                let old = self.get();
                self.set(v);
                old
            }
        }
    };
}
shared!(AtomicU32, u32);
shared!(AtomicBool, bool);
shared!(AtomicU64, u64);
shared!(AtomicUsize, usize);

/// The extended-protocol messages whose responses are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Parse,
    Bind,
    Close,
    Describe,
    Execute,
    Sync,
    Query,
    FunctionCall,
}

impl Kind {
    /// Whether a response with `tag` is the last one for this message.
    fn ends_with(self, tag: u8) -> bool {
        match self {
            Kind::Parse => tag == b'1',
            Kind::Bind => tag == b'2',
            Kind::Close => tag == b'3',
            Kind::Describe => tag == b'T' || tag == b'n',
            Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
            Kind::Sync | Kind::Query | Kind::FunctionCall => tag == backend::tag::READY_FOR_QUERY,
        }
    }
}

#[derive(Debug)]
enum Action {
    /// Sent for the client: its responses go to the client.
    Forward,
    /// Sent by Sluice: its closing response is swallowed (errors still reach the client).
    Swallow,
    /// Answered by Sluice with these bytes when its turn comes.
    Inject(Bytes),
}

/// One message in flight, in the order sent.
#[derive(Debug)]
struct Entry {
    kind: Kind,
    action: Action,
    /// A Parse that registered (client name, hash): undone if the server refuses it.
    registered: Option<(String, u64)>,
    /// A `DISCARD ALL`/`DEALLOCATE ALL` that empties the server's statements if it succeeds.
    clears_server: bool,
    errored: bool,
}

impl Entry {
    fn new(kind: Kind, action: Action) -> Self {
        Entry {
            kind,
            action,
            registered: None,
            clears_server: false,
            errored: false,
        }
    }
}

/// Statement bookkeeping and the response queue, shared by the two halves.
struct Tracker<'a> {
    queue: VecDeque<Entry>,
    reject_session_state: bool,
    /// After refusing a Parse, the client's messages up to its Sync are dropped, as the server
    /// would after an error.
    discarding: bool,
    /// The client ran `DISCARD ALL`/`DEALLOCATE ALL`: the server's settings are its defaults.
    settings_reset: bool,
    client: &'a mut ClientStatements,
    server: Prepared,
    hasher: &'a std::collections::hash_map::RandomState,
}

/// Request-tracking state shared by the two halves.
#[derive(Default)]
pub struct Flow {
    pub pending: Shared<AtomicU32>,
    pub partial: Shared<AtomicBool>,
    pub copy_in: Shared<AtomicBool>,
    syncs_since_execute: Shared<AtomicU32>,
    status: AtomicU8,
    /// Bytes of a server message still to be streamed to the client.
    pub server_skip: Shared<AtomicUsize>,
    /// Bytes of a client message still to be streamed to the server: while any remain the
    /// server is mid-message and must not be released.
    client_skip: Shared<AtomicUsize>,
    pub to_server: Shared<AtomicU64>,
    pub to_client: Shared<AtomicU64>,
    /// Wakes the server half when the client half queued an answer of Sluice's own.
    wake: Notify,
    /// The client reset the server's session (`DISCARD ALL`): its settings are the defaults.
    pub settings_reset: Shared<AtomicBool>,
    /// Settings the client changed with a session SET inside a transaction block.
    pub settings_changed: Mutex<Vec<String>>,
    /// Whether the server goes back to the pool when a transaction ends; cleared by a pin.
    pub release: Shared<AtomicBool>,
    /// The first statement seen whose state outlives its transaction (index + 1 into PINS).
    pin: AtomicU8,
}

const PINS: [Pin; 7] = [
    Pin::Set,
    Pin::Listen,
    Pin::AdvisoryLock,
    Pin::TempTable,
    Pin::HoldCursor,
    Pin::Prepare,
    Pin::Load,
];

impl Flow {
    pub fn new() -> Self {
        Flow {
            status: AtomicU8::new(b'I'),
            release: Shared::<AtomicBool>::new(true),
            ..Default::default()
        }
    }

    /// Why the session must keep its server, if a statement said so.
    pub fn pinned(&self) -> Option<Pin> {
        PINS.get(usize::from(self.pin.load(Relaxed)).checked_sub(1)?)
            .copied()
    }

    /// Keeps the server for the rest of the session; counted and logged once, when it happens.
    fn pin(&self, p: Pin) {
        if self.pin.load(Relaxed) == 0 && self.release.get() {
            let i = PINS.iter().position(|x| *x == p).unwrap_or(0);
            self.pin.store(i as u8 + 1, Relaxed);
            crate::metrics::session_pinned(p.as_str());
            crate::metrics::global().pinned.increment(1.0);
            tracing::info!(
                reason = p.as_str(),
                "session pinned to its server connection"
            );
        }
        self.release.set(false);
    }

    /// The transaction status of the last ReadyForQuery.
    pub fn status(&self) -> TxStatus {
        TxStatus::from_byte(self.status.load(Relaxed)).unwrap_or(TxStatus::Failed)
    }

    /// Nothing in flight in either direction: the server is between requests.
    pub fn at_rest(&self) -> bool {
        self.between_requests() && self.server_skip.get() == 0
    }

    /// Every request sent has been answered and the client is not inside a message or a COPY:
    /// the next client byte starts a new request.
    fn between_requests(&self) -> bool {
        self.pending.get() == 0
            && !self.partial.get()
            && !self.copy_in.get()
            && self.client_skip.get() == 0
    }
}

pub enum End {
    /// The transaction ended (status `I`, nothing in flight): the server can be reused.
    Released,
    /// The client closed its connection or sent Terminate.
    ClientGone,
    /// The client broke the protocol; the text is for its FATAL error.
    ClientProtocol(String),
    /// The server connection failed or broke the protocol.
    ServerGone(String),
}

/// Named statements to rewrite (transaction pooling), or none (session pooling, where the
/// client's names live on its own server).
pub struct Statements<'a> {
    pub client: &'a mut ClientStatements,
    pub hasher: &'a std::collections::hash_map::RandomState,
    /// Refuse statements whose state outlives the transaction instead of pinning.
    pub reject_session_state: bool,
}

/// What the client half does with one whole message it looked into.
enum Rewrite {
    /// Forward it as it is.
    Keep,
    /// Forward these bytes instead (queue entries already pushed).
    Replace(BytesMut),
    /// Send nothing (the answer is queued).
    Drop,
}

/// Relays until one of the [`End`]s. With `flow.release` false (session pooling, pinned
/// clients) the relay only ends when one side goes away. `prefix` is a Query Sluice sends first
/// (the client's settings), whose answers are swallowed.
pub async fn relay(
    client: &mut ClientIo,
    server: &mut ServerConn,
    flow: &Flow,
    max_message: usize,
    statements: Option<Statements<'_>>,
    prefix: Option<Bytes>,
) -> End {
    let (client_stream, cbuf) = client.relay_parts();
    let (cr, cw) = client_stream.split();
    let (sr, sw) = server.stream.split();
    let sides = Sides {
        cr,
        cw,
        cbuf,
        sr,
        sw,
        sbuf: &mut server.buf,
        prepared: &mut server.prepared,
    };
    relay_streams(sides, flow, max_message, statements, prefix).await
}

/// The two ends of a relay: each side's read and write halves and read buffer, and the
/// statements prepared on the server.
pub struct Sides<'a, CR, CW, SR, SW> {
    pub cr: CR,
    pub cw: CW,
    pub cbuf: &'a mut BytesMut,
    pub sr: SR,
    pub sw: SW,
    pub sbuf: &'a mut BytesMut,
    pub prepared: &'a mut Prepared,
}

/// [`relay`] over any streams (benchmarks drive it over in-memory pipes).
pub async fn relay_streams<CR, CW, SR, SW>(
    sides: Sides<'_, CR, CW, SR, SW>,
    flow: &Flow,
    max_message: usize,
    statements: Option<Statements<'_>>,
    prefix: Option<Bytes>,
) -> End
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let Sides {
        mut cr,
        mut cw,
        cbuf,
        mut sr,
        mut sw,
        sbuf,
        prepared,
    } = sides;
    let tracking = statements.is_some();
    let tracker = statements.map(|s| {
        Mutex::new(Tracker {
            // Room for a typical extended-protocol batch without growing.
            queue: VecDeque::with_capacity(8),
            reject_session_state: s.reject_session_state,
            discarding: false,
            settings_reset: false,
            client: s.client,
            server: std::mem::take(&mut *prepared),
            hasher: s.hasher,
        })
    });
    let tracker = &tracker;

    let to_server = async {
        let mut skip = 0usize;
        let mut staged = BytesMut::new();
        if let (Some(p), Some(t)) = (prefix, tracker) {
            t.lock()
                .queue
                .push_back(Entry::new(Kind::Query, Action::Swallow));
            if send(&mut sw, &p).await.is_err() {
                return End::ServerGone("write to server failed".into());
            }
        }
        loop {
            let mut pos = 0;
            // Start of the bytes walked but not yet copied to `staged` (when rewriting).
            let mut run_start = 0;
            let mut rewrote = false;
            let mut injected = false;
            loop {
                if skip > 0 {
                    let n = skip.min(cbuf.len() - pos);
                    pos += n;
                    skip -= n;
                    if skip > 0 {
                        break;
                    }
                }
                let h = match Header::peek(&cbuf[pos..]) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => return End::ClientProtocol(e.to_string()),
                };
                if h.total() > max_message {
                    return End::ClientProtocol(format!(
                        "message of type '{}' is {} bytes, over the limit of {max_message} (max_message_bytes)",
                        char::from(h.tag),
                        h.total()
                    ));
                }
                if h.tag == tag::TERMINATE {
                    if rewrote {
                        staged.extend_from_slice(&cbuf[run_start..pos]);
                    }
                    let bytes = if rewrote { &staged[..] } else { &cbuf[..pos] };
                    if !bytes.is_empty() && send(&mut sw, bytes).await.is_err() {
                        return End::ServerGone("write failed".into());
                    }
                    cbuf.clear();
                    return End::ClientGone;
                }
                let mut rewrite = Rewrite::Keep;
                if let Some(t) = tracker {
                    // One lock per client message.
                    let mut t = t.lock();
                    let mut discard = false;
                    if t.discarding {
                        if h.tag == tag::SYNC {
                            t.discarding = false;
                        } else if cbuf.len() >= pos + h.total() {
                            discard = true;
                        } else {
                            cbuf.reserve(h.total());
                            break;
                        }
                    }
                    if discard {
                        rewrite = Rewrite::Drop;
                    } else if needs_look(h) {
                        let Some(body) = cbuf.get(pos + HEADER_LEN..pos + h.total()) else {
                            // Wait for the whole message; make room for it.
                            cbuf.reserve(h.total());
                            break;
                        };
                        match look(&mut t, h.tag, body, flow) {
                            Ok((r, inj)) => {
                                rewrite = r;
                                injected |= inj;
                            }
                            Err(e) => return End::ClientProtocol(e),
                        }
                    } else if let Some(kind) = kind_of(h.tag) {
                        t.queue.push_back(Entry::new(kind, Action::Forward));
                    }
                }
                count(h.tag, flow, &rewrite);
                match rewrite {
                    Rewrite::Keep => {
                        let take = h.total().min(cbuf.len() - pos);
                        pos += take;
                        skip = h.total() - take;
                    }
                    Rewrite::Replace(_) | Rewrite::Drop => {
                        if !rewrote {
                            staged.clear();
                            rewrote = true;
                        }
                        staged.extend_from_slice(&cbuf[run_start..pos]);
                        if let Rewrite::Replace(bytes) = rewrite {
                            staged.extend_from_slice(&bytes);
                        }
                        pos += h.total();
                        run_start = pos;
                    }
                }
            }
            if rewrote {
                staged.extend_from_slice(&cbuf[run_start..pos]);
            }
            flow.client_skip.set(skip);
            let bytes = if rewrote { &staged[..] } else { &cbuf[..pos] };
            if !bytes.is_empty() {
                if send(&mut sw, bytes).await.is_err() {
                    return End::ServerGone("write to server failed".into());
                }
                flow.to_server
                    .set(flow.to_server.get() + bytes.len() as u64);
            }
            cbuf.advance(pos);
            if injected {
                flow.wake.notify_one();
            }
            cbuf.reserve(READ_BUFFER);
            match cr.read_buf(cbuf).await {
                Ok(0) | Err(_) => return End::ClientGone,
                Ok(_) => {}
            }
        }
    };

    let to_client = async {
        let mut staged = BytesMut::new();
        loop {
            let mut pos = 0;
            let mut run_start = 0;
            let mut restaged = false;
            let mut done = false;
            loop {
                let skip = flow.server_skip.get();
                if skip > 0 {
                    let n = skip.min(sbuf.len() - pos);
                    pos += n;
                    flow.server_skip.set(skip - n);
                    if skip > n {
                        break;
                    }
                }
                let h = match Header::peek(&sbuf[pos..]) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => return End::ServerGone(e.to_string()),
                };
                if h.tag == backend::tag::READY_FOR_QUERY && sbuf.len() < pos + h.total() {
                    break;
                }
                done = false;
                if let Some(t) = tracker {
                    // One lock per server message.
                    let mut t = t.lock();
                    let swallowing = t.queue.front().is_some_and(|e| {
                        e.kind == Kind::Query && matches!(e.action, Action::Swallow)
                    });
                    if (swallowing || ends_a_response(h.tag)) && sbuf.len() < pos + h.total() {
                        // Answers of Sluice's own may follow it: take it whole.
                        sbuf.reserve(h.total());
                        break;
                    }
                    let (swallow, inj) = respond(&mut t, h.tag);
                    drop(t);
                    if swallow || !inj.is_empty() {
                        if !restaged {
                            staged.clear();
                            restaged = true;
                        }
                        staged.extend_from_slice(&sbuf[run_start..pos]);
                        staged.extend_from_slice(&inj.before);
                        if swallow {
                            staged.extend_from_slice(&inj.after);
                            pos += h.total();
                            run_start = pos;
                            continue;
                        }
                        // Answers due after a message come only after whole ones (see above);
                        // a message streamed in parts only has answers due before it.
                        let end = (pos + h.total()).min(sbuf.len());
                        staged.extend_from_slice(&sbuf[pos..end]);
                        staged.extend_from_slice(&inj.after);
                        run_start = end;
                    }
                }
                match h.tag {
                    backend::tag::READY_FOR_QUERY => {
                        let body = &sbuf[pos + HEADER_LEN..pos + h.total()];
                        let status = match backend::ready_for_query_status(body) {
                            Ok(s) => s,
                            Err(e) => return End::ServerGone(e.to_string()),
                        };
                        flow.status.store(status.byte(), Relaxed);
                        flow.pending.set(flow.pending.get().saturating_sub(1));
                        done = flow.release.get()
                            && status == TxStatus::Idle
                            && flow.between_requests();
                    }
                    backend::tag::COPY_IN_RESPONSE => {
                        // Syncs sent after the Execute that started this COPY are read by the
                        // server in copy mode and ignored: they will get no ReadyForQuery.
                        let ignored = flow.syncs_since_execute.replace(0);
                        flow.pending.set(flow.pending.get().saturating_sub(ignored));
                        flow.copy_in.set(true);
                        if let Some(t) = tracker {
                            let mut t = t.lock();
                            let mut first = true;
                            t.queue.retain(|e| {
                                std::mem::replace(&mut first, false) || e.kind != Kind::Sync
                            });
                        }
                    }
                    _ => {}
                }
                let take = h.total().min(sbuf.len() - pos);
                pos += take;
                flow.server_skip.set(h.total() - take);
            }
            if restaged {
                staged.extend_from_slice(&sbuf[run_start..pos]);
            }
            let bytes = if restaged { &staged[..] } else { &sbuf[..pos] };
            if !bytes.is_empty() {
                if send(&mut cw, bytes).await.is_err() {
                    return End::ClientGone;
                }
                flow.to_client
                    .set(flow.to_client.get() + bytes.len() as u64);
            }
            sbuf.advance(pos);
            let owed = || tracker.as_ref().is_some_and(|t| !t.lock().queue.is_empty());
            if done && sbuf.is_empty() && flow.server_skip.get() == 0 && !owed() {
                return End::Released;
            }
            sbuf.reserve(READ_BUFFER);
            tokio::select! {
                biased;
                r = sr.read_buf(sbuf) => match r {
                    Ok(0) => return End::ServerGone("server closed the connection unexpectedly".into()),
                    Err(e) => return End::ServerGone(e.to_string()),
                    Ok(_) => {}
                },
                _ = flow.wake.notified(), if tracking => {
                    // Answers of Sluice's own with nothing ahead of them in the queue.
                    let due = tracker.as_ref().map(|t| take_injections(&mut t.lock())).unwrap_or_default();
                    tracing::trace!(bytes = due.len(), pending = flow.pending.get(), partial = flow.partial.get(), "woken for answers of Sluice's own");
                    if !due.is_empty() {
                        if send(&mut cw, &due).await.is_err() {
                            return End::ClientGone;
                        }
                        flow.to_client.set(flow.to_client.get() + due.len() as u64);
                    }
                    // Nothing may be owed by the server either (Sluice's own statements in flight).
                    let owed = tracker.as_ref().is_some_and(|t| !t.lock().queue.is_empty());
                    let idle = flow.status() == TxStatus::Idle && flow.between_requests() && !owed;
                    if flow.release.get() && idle && sbuf.is_empty() && flow.server_skip.get() == 0 {
                        return End::Released;
                    }
                }
            }
        }
    };

    let end = tokio::select! {
        biased;
        end = to_server => end,
        end = to_client => end,
    };
    if let Some(t) = tracker {
        let mut t = t.lock();
        // An entry still queued means the server owes responses: it is not at rest.
        if !t.queue.is_empty() {
            flow.partial.set(true);
        }
        *prepared = std::mem::take(&mut t.server);
        if t.settings_reset {
            flow.settings_reset.set(true);
        }
    }
    end
}

/// Writes `bytes` and flushes: a TLS stream may otherwise keep the last records inside rustls
/// when the socket was full. On plain TCP the flush returns at once.
async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Server messages that can end a message's response, after which Sluice may add answers.
fn ends_a_response(t: u8) -> bool {
    matches!(
        t,
        b'1' | b'2'
            | b'3'
            | b'T'
            | b'n'
            | b'C'
            | b'I'
            | b's'
            | b'E'
            | backend::tag::READY_FOR_QUERY
    )
}

/// Messages whose bodies the client half must read when rewriting statements.
fn needs_look(h: Header) -> bool {
    matches!(
        h.tag,
        tag::PARSE | tag::BIND | tag::DESCRIBE | tag::CLOSE | tag::QUERY
    )
}

fn kind_of(t: u8) -> Option<Kind> {
    Some(match t {
        tag::PARSE => Kind::Parse,
        tag::BIND => Kind::Bind,
        tag::CLOSE => Kind::Close,
        tag::DESCRIBE => Kind::Describe,
        tag::EXECUTE => Kind::Execute,
        tag::SYNC => Kind::Sync,
        tag::QUERY => Kind::Query,
        tag::FUNCTION_CALL => Kind::FunctionCall,
        _ => return None,
    })
}

/// Updates the request counters for a client message about to be sent (or answered by Sluice).
fn count(t: u8, flow: &Flow, rewrite: &Rewrite) {
    match t {
        tag::QUERY | tag::FUNCTION_CALL => {
            // A Query Sluice answers itself gets its ReadyForQuery from Sluice.
            if !matches!(rewrite, Rewrite::Drop) {
                flow.pending.set(flow.pending.get() + 1);
            }
            flow.partial.set(false);
            flow.syncs_since_execute.set(0);
        }
        tag::SYNC => {
            if !flow.copy_in.get() {
                flow.pending.set(flow.pending.get() + 1);
                flow.syncs_since_execute
                    .set(flow.syncs_since_execute.get() + 1);
            }
            flow.partial.set(false);
        }
        tag::EXECUTE => {
            flow.syncs_since_execute.set(0);
            flow.partial.set(true);
        }
        tag::COPY_DONE | tag::COPY_FAIL => flow.copy_in.set(false),
        tag::COPY_DATA => {}
        _ => flow.partial.set(true),
    }
}

fn parse_complete() -> Bytes {
    Bytes::from_static(&[b'1', 0, 0, 0, 4])
}

fn close_complete() -> Bytes {
    Bytes::from_static(&[b'3', 0, 0, 0, 4])
}

/// Makes sure the server has `stmt`, appending (and queueing) a Close for an evicted statement
/// and a Parse when it lacks it.
fn ensure(t: &mut Tracker<'_>, stmt: &Statement, out: &mut BytesMut) {
    if t.server.touch(stmt.hash) {
        return;
    }
    if let Some(old) = t.server.insert(stmt.hash) {
        prepared::put_target(out, tag::CLOSE, b'S', &statement_name(old));
        t.queue.push_back(Entry::new(Kind::Close, Action::Swallow));
    }
    out.extend_from_slice(&stmt.parse);
    let mut e = Entry::new(Kind::Parse, Action::Swallow);
    e.registered = Some((String::new(), stmt.hash));
    t.queue.push_back(e);
}

/// Looks into a whole Parse, Bind, Describe, Close or short Query; returns what to send and
/// whether an answer of Sluice's own was queued.
fn look(
    t: &mut Tracker<'_>,
    msg_tag: u8,
    body: &[u8],
    flow: &Flow,
) -> Result<(Rewrite, bool), String> {
    let err = |e: crate::protocol::ProtocolError| e.to_string();
    match msg_tag {
        tag::PARSE => {
            let p = prepared::parse_parse(body).map_err(err)?;
            let text = &p.rest[..memchr::memchr(0, p.rest).unwrap_or(p.rest.len())];
            let pin = match std::str::from_utf8(text) {
                Ok(sql) => state::pins(sql),
                Err(_) => state::pins(&String::from_utf8_lossy(text)),
            };
            if let Some(pin) = pin {
                if t.reject_session_state {
                    t.discarding = true;
                    t.queue
                        .push_back(Entry::new(Kind::Parse, Action::Inject(refusal(pin, None))));
                    return Ok((Rewrite::Drop, true));
                }
                flow.pin(pin);
            }
            if p.name.is_empty() {
                t.queue.push_back(Entry::new(Kind::Parse, Action::Forward));
                return Ok((Rewrite::Keep, false));
            }
            let stmt = Arc::new(prepared::statement(t.hasher, p.rest));
            let name = p.name.to_string();
            tracing::trace!(%name, server_name = %stmt.server_name, on_server = t.server.len(), "client Parse");
            t.client.insert(name.clone(), stmt.clone());
            if t.server.touch(stmt.hash) {
                t.queue
                    .push_back(Entry::new(Kind::Parse, Action::Inject(parse_complete())));
                return Ok((Rewrite::Drop, true));
            }
            let mut out = BytesMut::new();
            if let Some(old) = t.server.insert(stmt.hash) {
                prepared::put_target(&mut out, tag::CLOSE, b'S', &statement_name(old));
                t.queue.push_back(Entry::new(Kind::Close, Action::Swallow));
            }
            out.extend_from_slice(&stmt.parse);
            let mut e = Entry::new(Kind::Parse, Action::Forward);
            e.registered = Some((name, stmt.hash));
            t.queue.push_back(e);
            Ok((Rewrite::Replace(out), false))
        }
        tag::BIND => {
            let (portal, name, used) = prepared::parse_bind(body).map_err(err)?;
            let Some(stmt) = (!name.is_empty())
                .then(|| t.client.get(name).cloned())
                .flatten()
            else {
                t.queue.push_back(Entry::new(Kind::Bind, Action::Forward));
                return Ok((Rewrite::Keep, false));
            };
            let mut out = BytesMut::new();
            ensure(t, &stmt, &mut out);
            prepared::put_bind(&mut out, portal, &stmt.server_name, &body[used..]);
            t.queue.push_back(Entry::new(Kind::Bind, Action::Forward));
            Ok((Rewrite::Replace(out), false))
        }
        tag::DESCRIBE => {
            let (kind, name) = prepared::parse_target(body, "Describe").map_err(err)?;
            let stmt = (kind == b'S' && !name.is_empty())
                .then(|| t.client.get(name).cloned())
                .flatten();
            let Some(stmt) = stmt else {
                t.queue
                    .push_back(Entry::new(Kind::Describe, Action::Forward));
                return Ok((Rewrite::Keep, false));
            };
            let mut out = BytesMut::new();
            ensure(t, &stmt, &mut out);
            prepared::put_target(&mut out, tag::DESCRIBE, b'S', &stmt.server_name);
            t.queue
                .push_back(Entry::new(Kind::Describe, Action::Forward));
            Ok((Rewrite::Replace(out), false))
        }
        tag::CLOSE => {
            let (kind, name) = prepared::parse_target(body, "Close").map_err(err)?;
            if kind == b'S' && !name.is_empty() {
                // The server keeps its copy, shared with other clients; the client forgets.
                t.client.remove(name);
                t.queue
                    .push_back(Entry::new(Kind::Close, Action::Inject(close_complete())));
                return Ok((Rewrite::Drop, true));
            }
            t.queue.push_back(Entry::new(Kind::Close, Action::Forward));
            Ok((Rewrite::Keep, false))
        }
        tag::QUERY => {
            let sql = frontend::query(body).map_err(err)?;
            // A session SET inside a transaction block does not pin: the session reads back what
            // the transaction left (see `Flow::settings_changed`) and carries it as its own.
            let in_block = flow.status() != TxStatus::Idle;
            let set_names = if in_block {
                state::set_names(sql)
            } else {
                None
            };
            if let Some(names) = set_names {
                flow.settings_changed.lock().extend(names);
            } else if let Some(pin) = state::pins(sql) {
                tracing::trace!(
                    reason = pin.as_str(),
                    reject = t.reject_session_state,
                    "session state in a Query"
                );
                if t.reject_session_state {
                    t.queue.push_back(Entry::new(
                        Kind::Query,
                        Action::Inject(refusal(pin, Some(flow.status()))),
                    ));
                    return Ok((Rewrite::Drop, true));
                }
                flow.pin(pin);
            }
            match prepared::statement_command(sql) {
                StatementCommand::ForgetAll => {
                    t.client.clear();
                    let mut e = Entry::new(Kind::Query, Action::Forward);
                    e.clears_server = true;
                    t.queue.push_back(e);
                    Ok((Rewrite::Keep, false))
                }
                StatementCommand::Forget(name) if t.client.remove(name).is_some() => {
                    let mut answer = BytesMut::new();
                    Out::command_complete(&mut answer, "DEALLOCATE");
                    Out::ready_for_query(&mut answer, flow.status());
                    t.queue
                        .push_back(Entry::new(Kind::Query, Action::Inject(answer.freeze())));
                    Ok((Rewrite::Drop, true))
                }
                _ => {
                    t.queue.push_back(Entry::new(Kind::Query, Action::Forward));
                    Ok((Rewrite::Keep, false))
                }
            }
        }
        _ => Ok((Rewrite::Keep, false)),
    }
}

/// The ErrorResponse (and ReadyForQuery, for a simple Query) refusing a statement whose state
/// would outlive its transaction (`on_session_state = "reject"`).
fn refusal(pin: Pin, ready: Option<TxStatus>) -> Bytes {
    let mut out = BytesMut::new();
    let fields = backend::ErrorFields {
        severity: "ERROR".into(),
        code: crate::protocol::sqlstate::FEATURE_NOT_SUPPORTED.into(),
        message: format!("{} is not supported in transaction pooling: its effect would outlive the transaction and reach other clients", pin.describe()),
        detail: Some("Sluice is configured with on_session_state = \"reject\". The statement was not executed.".into()),
        hint: Some(format!("Instead, {}.", pin.advice())),
    };
    Out::error_fields(&mut out, backend::tag::ERROR_RESPONSE, &fields);
    if let Some(status) = ready {
        Out::ready_for_query(&mut out, status);
    }
    out.freeze()
}

/// Answers of Sluice's own to send around one server message.
#[derive(Default)]
struct Injections {
    before: BytesMut,
    after: BytesMut,
}

impl Injections {
    fn is_empty(&self) -> bool {
        self.before.is_empty() && self.after.is_empty()
    }
}

/// Pops the answers of Sluice's own at the head of the queue.
fn take_injections(t: &mut Tracker<'_>) -> BytesMut {
    let mut out = BytesMut::new();
    while let Some(Entry {
        action: Action::Inject(_),
        ..
    }) = t.queue.front()
    {
        if let Some(Entry {
            action: Action::Inject(b),
            ..
        }) = t.queue.pop_front()
        {
            out.extend_from_slice(&b);
        }
    }
    out
}

/// Matches one server message (by tag) against the queue: whether to swallow it, and the
/// answers of Sluice's own due before and after it.
fn respond(t: &mut Tracker<'_>, msg_tag: u8) -> (bool, Injections) {
    tracing::trace!(tag = %char::from(msg_tag), queue = ?t.queue.iter().map(|e| (e.kind, matches!(e.action, Action::Swallow), matches!(e.action, Action::Inject(_)))).collect::<Vec<_>>(), "server message");
    let mut inj = Injections {
        before: take_injections(t),
        after: BytesMut::new(),
    };
    let Some(head) = t.queue.front_mut() else {
        // Notices, notifications and parameter changes come at any time.
        return (false, inj);
    };
    if head.kind == Kind::Query && matches!(head.action, Action::Swallow) {
        // Sluice's own statements: everything they answer is swallowed, errors included.
        if msg_tag == backend::tag::ERROR_RESPONSE {
            tracing::warn!("a statement Sluice sent to apply client settings failed");
        }
        if msg_tag == backend::tag::READY_FOR_QUERY {
            t.queue.pop_front();
            inj.after = take_injections(t);
        }
        return (true, inj);
    }
    if msg_tag == backend::tag::ERROR_RESPONSE {
        head.errored = true;
        if matches!(head.kind, Kind::Query | Kind::FunctionCall) {
            return (false, inj);
        }
        // The server skips everything up to the next Sync: so does the queue.
        while let Some(e) = t.queue.front() {
            if e.kind == Kind::Sync {
                break;
            }
            if let Some(e) = t.queue.pop_front() {
                // A statement the server refused (or skipped) is not there after all.
                if let Some((name, hash)) = e.registered {
                    if !name.is_empty() {
                        t.client.remove(&name);
                    }
                    t.server.remove(hash);
                }
            }
        }
        return (false, inj);
    }
    if !head.kind.ends_with(msg_tag) {
        return (false, inj);
    }
    let Some(entry) = t.queue.pop_front() else {
        return (false, inj);
    };
    if entry.clears_server && !entry.errored {
        t.server.clear();
        t.settings_reset = true;
    }
    inj.after = take_injections(t);
    (matches!(entry.action, Action::Swallow), inj)
}
