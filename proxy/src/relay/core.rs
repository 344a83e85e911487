//! The relay's decisions, without I/O: fed the bytes each side has sent, it says what to
//! forward, what to add or leave out, and when the server may go back to the pool.
//!
//! Frame, don't decode: a walk reads the 5-byte headers of the bytes buffered from one side and
//! forwards everything walked as one run, straight from the caller's buffer (no copy, no
//! allocation in steady state). Only when a message is rewritten, dropped or answered around
//! does the walk stage its output in a buffer of its own. A message too large to buffer whole is
//! streamed: its header is acted on and its body forwarded as it arrives. On the server side
//! only ReadyForQuery, CopyInResponse and the tags that end a message's response are looked at;
//! on the client side the tags and, in transaction pooling, the statement names of Parse, Bind,
//! Describe and Close (see [`crate::prepared`]).
//!
//! # When the server goes back to the pool
//! `pending` counts the requests forwarded that will each end in a ReadyForQuery (Query, Sync,
//! FunctionCall); `partial` is set while messages have been forwarded since the last of those. A
//! ReadyForQuery with status `I` that brings `pending` to zero while nothing is `partial` ends the
//! transaction. A client walk counts a message before it is forwarded, so the release can never
//! cut a client message in two. Syncs that the server reads during COPY FROM STDIN are ignored by
//! it and so are not counted.
//!
//! # Answers Sluice adds or removes
//! When statements are rewritten, the client walk queues an entry per message sent (or
//! answered by Sluice itself) and the server walk matches the responses against that queue: a
//! response that ends an entry sent by Sluice is swallowed, and an entry Sluice answers itself
//! is answered when its turn comes. An ErrorResponse makes the server skip to the next Sync, so
//! the queue skips with it.
//!
//! A client's `RESET ALL`, `RESET name` or `DISCARD ALL` gets a statement of Sluice's own added
//! to its Query (through the extended protocol: a Query of Sluice's own after its pipeline,
//! ahead of the client's next messages), which puts the client's startup values back; its
//! answers are recognised and left out, in both pooling modes (see `core/reset.rs`).

mod flow;
mod reset;
mod rewrite;

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

pub use self::flow::Flow;
use self::rewrite::{
    ends_a_response, look, names_for_error, needs_look, rename_in_error, respond, take_injections,
    Action, Entry, Kind, Tracker,
};
use crate::error::PgError;
use crate::prepared::{ClientStatements, ServerStatements};
use crate::protocol::backend::{self, tag as be, TxStatus};
use crate::protocol::frontend::tag as fe;
use crate::protocol::{Header, HEADER_LEN};
use crate::settings::Settings;
use crate::sql::resets;
use crate::sql::Encoding;

/// Reported parameters by name, and their values, as the client's bytes: shared between the
/// sessions that were told the same at start-up (see [`crate::shared`]), copied when one is
/// told something new.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Reported(crate::shared::Shared<Parameter>);

pub use crate::protocol::backend::Parameter;

impl Reported {
    /// Records that the client is told `name` = `value`; false when it was told so already.
    pub fn tell(&mut self, name: &[u8], value: &[u8]) -> bool {
        match self.0.as_slice().iter().position(|(n, _)| &n[..] == name) {
            Some(i) if &self.0.as_slice()[i].1[..] == value => false,
            Some(i) => {
                self.0.make_mut()[i].1 = value.into();
                true
            }
            None => {
                self.0.make_mut().push((name.into(), value.into()));
                true
            }
        }
    }

    /// Shares this list with every other holder of the same one.
    pub fn intern(&mut self, interner: &crate::shared::Interner<Vec<Parameter>>) {
        self.0.intern(interner);
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// The transaction ended (status `I`, nothing in flight): the server can be reused.
    Released,
    /// The client closed its connection or sent Terminate.
    ClientGone,
    /// The client broke the protocol: the FATAL error it is told.
    ClientProtocol(PgError),
    /// The server connection failed or broke the protocol.
    ServerGone(ServerFault),
    /// The client sent nothing for `idle_transaction_timeout` inside a transaction block.
    IdleInTransaction,
    /// The client sent nothing for `client_stall_timeout` in the middle of a message or a COPY
    /// FROM STDIN.
    ClientStalled,
    /// The server answered a request neither within `query_timeout` nor within
    /// [`CANCEL_GRACE`] of the CancelRequest Sluice then sent.
    QueryTimeout,
}

/// After `query_timeout` Sluice cancels the request; a server that has not answered this long
/// after the cancel is given up on.
pub const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How the server connection failed while relaying (logged; the client is told the connection
/// was lost).
#[derive(Debug, thiserror::Error)]
pub enum ServerFault {
    #[error("server closed the connection unexpectedly")]
    Closed,
    #[error("reading from the server failed: {0}")]
    Read(std::io::Error),
    #[error("writing to the server failed: {0}")]
    Write(std::io::Error),
    #[error("the server broke the protocol: {0}")]
    Protocol(crate::protocol::ProtocolError),
}

/// In session pooling, the largest Query the client walk waits to have whole to look for resets
/// in it (larger ones are streamed unread).
const LOOK_LIMIT: usize = 64 * 1024;

/// The statements of a Query body, when some of them are resets.
fn query_resets(body: &[u8], enc: Encoding) -> Option<Vec<resets::Statement>> {
    let text = &body[..memchr::memchr(0, body)?];
    resets::scan(text, enc)
}

/// Named statements to rewrite (transaction pooling), or none (session pooling, where the
/// client's names live on its own server).
pub struct Statements<'a> {
    pub client: &'a mut ClientStatements,
    pub hasher: &'a RandomState,
    /// Refuse statements whose state outlives the transaction instead of pinning.
    pub reject_session_state: bool,
}

/// What a walk does with one message.
enum Verdict {
    /// Forward the message (as much of it as is buffered), with these answers of Sluice's own
    /// before and after it (`after` only for a whole message).
    Pass { before: Bytes, after: Bytes },
    /// Forward these bytes in its place (possibly none).
    Replace(Bytes),
    /// Stop before this message until `usize` bytes of it are buffered.
    Wait(usize),
    /// Stop before this message and end the walk (the client's Terminate).
    Stop,
}

const PASS: Verdict = Verdict::Pass {
    before: Bytes::new(),
    after: Bytes::new(),
};

/// The outcome of one walk over a side's buffered bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Walked {
    /// Bytes of the buffer consumed: the caller advances past them once the output is written.
    pub used: usize,
    /// The output is [`Core::staged_for_server`]/[`Core::staged_for_client`], not `buf[..used]`.
    pub staged: bool,
    /// Room the buffer needs from its new start before the walk can go on (a whole message).
    pub need: usize,
    /// Server walk: a ReadyForQuery ended a request; once the output is written the caller asks
    /// [`Core::releasable`].
    pub ready: bool,
    /// Client walk: the client said goodbye after `used` bytes.
    pub terminate: bool,
    /// Client walk: the rest waits for a Query of Sluice's own (see [`Core::holding`]).
    pub held: bool,
}

/// One direction's walk state: the rest of a message being streamed, and the staged output.
#[derive(Default)]
struct Walker {
    staged: BytesMut,
}

impl Walker {
    /// Walks the headers in `buf` from a message boundary, `skip` bytes of a streamed message
    /// first, asking `decide` about each message (given its header and what is buffered of it).
    fn walk(
        &mut self,
        buf: &[u8],
        skip: &mut usize,
        max_message: Option<usize>,
        gone: fn(crate::protocol::ProtocolError) -> End,
        mut decide: impl FnMut(Header, &[u8]) -> Result<Verdict, End>,
    ) -> Result<Walked, End> {
        let mut out = Walked::default();
        let mut pos = 0;
        // Start of the bytes walked but not yet copied to `staged` (once staging).
        let mut run_start = 0;
        loop {
            if *skip > 0 {
                let n = (*skip).min(buf.len() - pos);
                pos += n;
                *skip -= n;
                if *skip > 0 {
                    break;
                }
            }
            let h = match Header::peek(&buf[pos..]) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err(gone(e)),
            };
            if let Some(max) = max_message.filter(|max| h.total() > *max) {
                return Err(End::ClientProtocol(PgError::protocol_violation(format!(
                    "message of type '{}' is {} bytes, over the limit of {max} (max_message_bytes)",
                    char::from(h.tag),
                    h.total()
                ))));
            }
            let end = (pos + h.total()).min(buf.len());
            match decide(h, &buf[pos..end])? {
                Verdict::Wait(need) => {
                    out.need = need;
                    break;
                }
                Verdict::Stop => {
                    out.terminate = true;
                    break;
                }
                Verdict::Pass { before, after } => {
                    if !before.is_empty() || !after.is_empty() {
                        self.stage(&mut out, &buf[run_start..pos]);
                        self.staged.extend_from_slice(&before);
                        self.staged.extend_from_slice(&buf[pos..end]);
                        self.staged.extend_from_slice(&after);
                        run_start = end;
                    }
                    *skip = h.total() - (end - pos);
                    pos = end;
                }
                Verdict::Replace(bytes) => {
                    self.stage(&mut out, &buf[run_start..pos]);
                    self.staged.extend_from_slice(&bytes);
                    // Replaced messages are always whole.
                    pos = end;
                    run_start = pos;
                }
            }
        }
        if out.staged {
            self.staged.extend_from_slice(&buf[run_start..pos]);
        }
        out.used = pos;
        Ok(out)
    }

    /// Switches the walk's output to the staging buffer, with the run walked so far.
    fn stage(&mut self, out: &mut Walked, run: &[u8]) {
        if !out.staged {
            self.staged.clear();
            out.staged = true;
        }
        self.staged.extend_from_slice(run);
    }
}

/// The relay's state for one transaction (or, pinned, one session).
pub struct Core<'a> {
    flow: &'a mut Flow,
    max_message: usize,
    tracker: Option<Tracker<'a>>,
    /// The client's startup settings, which its resets bring back.
    startup: &'a Settings,
    own: reset::Own,
    client: Walker,
    server: Walker,
}

impl<'a> Core<'a> {
    /// A relay over a server holding `on_server`; `statements` when names are rewritten
    /// (transaction pooling); `startup`, the client's startup settings.
    pub fn new(
        flow: &'a mut Flow,
        max_message: usize,
        statements: Option<Statements<'a>>,
        on_server: &'a mut ServerStatements,
        startup: &'a Settings,
    ) -> Self {
        let tracker = statements.map(|s| Tracker {
            // Room for a typical extended-protocol batch without growing.
            queue: VecDeque::with_capacity(8),
            reject_session_state: s.reject_session_state,
            discarding: false,
            client: s.client,
            server: on_server,
            hasher: s.hasher,
        });
        Core {
            flow,
            max_message,
            tracker,
            startup,
            own: reset::Own::default(),
            client: Walker::default(),
            server: Walker::default(),
        }
    }

    /// Sluice sends a Query of its own first (the client's settings): its answers are
    /// swallowed. Only when statements are tracked.
    pub fn prefix(&mut self) {
        if let Some(t) = &mut self.tracker {
            t.queue.push_back(Entry::new(Kind::Query, Action::Swallow));
            self.flow.pending += 1;
        }
    }

    /// The output of the last client walk that said `staged`.
    pub fn staged_for_server(&self) -> &[u8] {
        &self.client.staged
    }

    /// The output of the last server walk (or [`Core::take_due`]) that said `staged`.
    pub fn staged_for_client(&self) -> &[u8] {
        &self.server.staged
    }

    pub fn flow(&self) -> &Flow {
        self.flow
    }

    /// Counts bytes written to each side.
    pub fn wrote(&mut self, to_server: usize, to_client: usize) {
        self.flow.to_server += to_server as u64;
        self.flow.to_client += to_client as u64;
    }

    /// Walks the client's buffered bytes (from where the last walk's `used` ended).
    pub fn client(&mut self, buf: &[u8]) -> Result<Walked, End> {
        let Core {
            flow,
            tracker,
            client,
            max_message,
            startup,
            own,
            ..
        } = self;
        let mut skip = flow.client_skip;
        let mut walked = client.walk(
            buf,
            &mut skip,
            Some(*max_message),
            |e| End::ClientProtocol(PgError::protocol_violation(e.to_string())),
            |h, msg| {
                if own.extended.holding() {
                    return Ok(Verdict::Wait(0));
                }
                if h.tag == fe::TERMINATE {
                    return Ok(Verdict::Stop);
                }
                let whole = msg.len() == h.total();
                let mut executed = None;
                // Resets through the extended protocol (see `reset::Extended`): looked for in
                // transaction pooling, and in session pooling when there are startup values.
                if reset::follows(h.tag) && (tracker.is_some() || !startup.is_empty()) {
                    if !whole && h.total() <= LOOK_LIMIT {
                        return Ok(Verdict::Wait(h.total()));
                    }
                    if whole {
                        let known = |name: &[u8]| {
                            tracker
                                .as_ref()
                                .and_then(|t| t.client.get(name))
                                .and_then(|s| s.reset.clone())
                        };
                        executed =
                            reset::extended(own, flow, h.tag, &msg[HEADER_LEN..], startup, known);
                    }
                }
                let mut verdict = PASS;
                if let Some(t) = tracker {
                    let mut drop = false;
                    if t.discarding {
                        if h.tag == fe::SYNC {
                            t.discarding = false;
                        } else if whole {
                            drop = true;
                        } else {
                            return Ok(Verdict::Wait(h.total()));
                        }
                    }
                    if drop {
                        verdict = Verdict::Replace(Bytes::new());
                    } else if needs_look(h.tag) {
                        if !whole {
                            return Ok(Verdict::Wait(h.total()));
                        }
                        let body = &msg[HEADER_LEN..];
                        let resets = (h.tag == fe::QUERY)
                            .then(|| query_resets(body, flow.encoding))
                            .flatten();
                        if let Some(v) =
                            look(t, flow, h.tag, body, resets.as_deref()).map_err(|e| {
                                End::ClientProtocol(PgError::protocol_violation(e.to_string()))
                            })?
                        {
                            verdict = v;
                        } else if let Some(stmts) = &resets {
                            if let Some(q) = reset::rewrite(own, flow, body, stmts, startup) {
                                verdict = Verdict::Replace(q);
                            }
                        }
                    } else if let Some(kind) = Kind::of(h.tag) {
                        let mut e = Entry::new(kind, Action::Forward);
                        if executed == Some(resets::Kind::DiscardAll) {
                            // As a DISCARD ALL in a Query (see `look`).
                            t.client.clear();
                            e.clears_server = true;
                        }
                        t.queue.push_back(e);
                    }
                } else if h.tag == fe::QUERY && !startup.is_empty() {
                    // Session pooling: only a client's resets are looked at. A Query too large
                    // to wait for is passed on unread.
                    if !whole && h.total() <= LOOK_LIMIT {
                        return Ok(Verdict::Wait(h.total()));
                    }
                    let body = &msg[HEADER_LEN..];
                    let rewritten = whole
                        .then(|| query_resets(body, flow.encoding))
                        .flatten()
                        .and_then(|stmts| reset::rewrite(own, flow, body, &stmts, startup));
                    if let Some(q) = rewritten {
                        verdict = Verdict::Replace(q);
                    }
                }
                // A message replaced by nothing is dropped: answered by Sluice, or discarded.
                let dropped = matches!(&verdict, Verdict::Replace(b) if b.is_empty());
                if !dropped && matches!(h.tag, fe::QUERY | fe::EXECUTE | fe::FUNCTION_CALL) {
                    // Outside a transaction block every statement commits; inside one, only
                    // the statements that end it (seen when statements are looked at).
                    flow.commit_in_flight |=
                        flow.status == TxStatus::Idle || tracker.is_none() || flow.commits_seen;
                    flow.commits_seen = false;
                }
                flow.count(h.tag, dropped);
                Ok(verdict)
            },
        )?;
        flow.client_skip = skip;
        walked.held = own.extended.holding();
        Ok(walked)
    }

    /// The client walk holds the client's messages until a Query of Sluice's own is sent
    /// ([`Core::take_for_server`]) ahead of them.
    pub fn holding(&self) -> bool {
        self.own.extended.holding()
    }

    /// A Query of Sluice's own to send the server before anything more of the client's.
    pub fn take_for_server(&mut self) -> Option<Bytes> {
        self.own.extended.take_due()
    }

    /// Walks the server's buffered bytes (from where the last walk's `used` ended).
    pub fn server(&mut self, buf: &[u8]) -> Result<Walked, End> {
        let Core {
            flow,
            tracker,
            server,
            own,
            ..
        } = self;
        let mut skip = flow.server_skip;
        let mut ready = false;
        let mut walked = server.walk(
            buf,
            &mut skip,
            None,
            |e| End::ServerGone(ServerFault::Protocol(e)),
            |h, msg| {
                let whole = msg.len() == h.total();
                if matches!(
                    h.tag,
                    be::READY_FOR_QUERY | be::PARAMETER_STATUS | be::ERROR_RESPONSE
                ) && !whole
                {
                    return Ok(Verdict::Wait(h.total()));
                }
                if h.tag == be::ERROR_RESPONSE && !flow.server_fatal {
                    flow.server_fatal = backend::ErrorFields::body_ends_session(&msg[HEADER_LEN..])
                        .map_err(|e| End::ServerGone(ServerFault::Protocol(e)))?;
                }
                if h.tag == be::PARAMETER_STATUS {
                    // The client's own SET or Sluice's: either way the text that follows is in
                    // this encoding.
                    let (name, value) = backend::parameter_status(&msg[HEADER_LEN..])
                        .map_err(|e| End::ServerGone(ServerFault::Protocol(e)))?;
                    if name == b"client_encoding" {
                        flow.encoding = Encoding::from_name(&String::from_utf8_lossy(value));
                    }
                    if own.extended.holds_report(name, msg) || !flow.tell(name, value) {
                        return Ok(Verdict::Replace(Bytes::new()));
                    }
                }
                if !own.is_idle() {
                    // Small messages that may be Sluice's are taken whole (a DataRow only once
                    // it is known to be Sluice's: the client's may be large).
                    let small = matches!(
                        h.tag,
                        be::ROW_DESCRIPTION
                            | be::COMMAND_COMPLETE
                            | be::PARSE_COMPLETE
                            | be::BIND_COMPLETE
                    ) || (h.tag == be::DATA_ROW && own.swallowing());
                    if small && !whole {
                        return Ok(Verdict::Wait(h.total()));
                    }
                    if own.swallows(h.tag, msg) {
                        // The answer to a statement Sluice added to the client's request.
                        return Ok(Verdict::Replace(Bytes::new()));
                    }
                }
                let mut verdict = PASS;
                if let Some(t) = tracker.as_mut() {
                    let swallowing = t.queue.front().is_some_and(|e| {
                        e.kind == Kind::Query && matches!(e.action, Action::Swallow)
                    });
                    if (swallowing || ends_a_response(h.tag)) && !whole {
                        // Answers of Sluice's own may follow it: take it whole.
                        return Ok(Verdict::Wait(h.total()));
                    }
                    let renamed = (h.tag == be::ERROR_RESPONSE)
                        .then(|| names_for_error(t))
                        .flatten()
                        .and_then(|(server, client)| rename_in_error(msg, &server, &client));
                    let (swallow, before, after) = respond(t, h.tag);
                    verdict = match renamed {
                        // Not the client's: it changes nothing the client sees (a
                        // ReadyForQuery still ends a request, below).
                        _ if swallow => {
                            let mut out = BytesMut::with_capacity(before.len() + after.len());
                            out.extend_from_slice(&before);
                            out.extend_from_slice(&after);
                            Verdict::Replace(out.freeze())
                        }
                        // The server named the client's statement by Sluice's name for it.
                        Some(msg) => {
                            let mut out =
                                BytesMut::with_capacity(before.len() + msg.len() + after.len());
                            out.extend_from_slice(&before);
                            out.extend_from_slice(&msg);
                            out.extend_from_slice(&after);
                            Verdict::Replace(out.freeze())
                        }
                        None => Verdict::Pass { before, after },
                    };
                }
                match h.tag {
                    be::READY_FOR_QUERY => {
                        let status = backend::ready_for_query_status(&msg[HEADER_LEN..])
                            .map_err(|e| End::ServerGone(ServerFault::Protocol(e)))?;
                        flow.status = status;
                        flow.pending = flow.pending.saturating_sub(1);
                        if flow.pending == 0 {
                            flow.commit_in_flight = false;
                        }
                        ready = true;
                        own.ready();
                        if status != TxStatus::Idle && !flow.resets.is_empty() {
                            flow.resets_unsure = true;
                        }
                        let restore;
                        (verdict, restore) = reset::at_ready(own, flow, status, verdict)
                            .map_err(|e| End::ServerGone(ServerFault::Protocol(e)))?;
                        if restore {
                            // Sluice's Query goes next; its ReadyForQuery is the client's.
                            flow.pending += 1;
                            if let Some(t) = tracker.as_mut() {
                                t.queue.push_back(Entry::new(Kind::Query, Action::Forward));
                            }
                        }
                    }
                    be::ERROR_RESPONSE => {
                        own.extended.error();
                        if !flow.resets.is_empty() {
                            flow.resets_unsure = true;
                        }
                    }
                    be::COPY_IN_RESPONSE => {
                        // Syncs sent after the Execute that started this COPY are read by the server
                        // in copy mode and ignored: they will get no ReadyForQuery.
                        let ignored = std::mem::take(&mut flow.syncs_since_execute);
                        flow.pending = flow.pending.saturating_sub(ignored);
                        own.copy_ignored(ignored);
                        flow.copy_in = true;
                        if let Some(t) = tracker.as_mut() {
                            let mut first = true;
                            t.queue.retain(|e| {
                                std::mem::replace(&mut first, false) || e.kind != Kind::Sync
                            });
                        }
                    }
                    _ => {}
                }
                Ok(verdict)
            },
        )?;
        flow.server_skip = skip;
        walked.ready = ready;
        Ok(walked)
    }

    /// Stages the answers of Sluice's own that nothing from the server is ahead of (a request
    /// Sluice answered whole); true when there are any, in [`Core::staged_for_client`].
    pub fn take_due(&mut self) -> bool {
        let Some(t) = &mut self.tracker else {
            return false;
        };
        if !matches!(
            t.queue.front(),
            Some(Entry {
                action: Action::Inject(_),
                ..
            })
        ) {
            return false;
        }
        self.server.staged.clear();
        take_injections(t, &mut self.server.staged);
        true
    }

    /// Whether the server may go back to the pool now that the client has been sent everything
    /// walked: the transaction is over, nothing is in flight or owed by either side. The caller
    /// checks that no server bytes are left unwalked.
    pub fn releasable(&self) -> bool {
        let owed = self.tracker.as_ref().is_some_and(|t| !t.queue.is_empty());
        self.flow.release
            && self.flow.status == TxStatus::Idle
            && self.flow.between_requests()
            && self.flow.server_skip == 0
            && !owed
            && self.own.is_idle()
    }
}

/// Hands what the session must know back to the flow, however the relay ended.
impl Drop for Core<'_> {
    fn drop(&mut self) {
        if let Some(t) = &self.tracker {
            // An entry still queued means the server owes responses: it is not at rest.
            if !t.queue.is_empty() {
                self.flow.partial = true;
            }
        }
    }
}

#[cfg(test)]
mod tests;
