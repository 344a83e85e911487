//! Statement rewriting and the response queue (transaction pooling): what the client walk does
//! with Parse, Bind, Describe, Close and Query, and how the server walk matches responses to
//! the messages in flight, answering or swallowing Sluice's own.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::{Flow, Verdict};
use crate::error::{sqlstate, PgError, Side};
use crate::prepared::{self, ClientStatements, ServerStatements, Statement, StatementCommand};
use crate::protocol::backend::{tag as be, Out, TxStatus};
use crate::protocol::frontend::{self, tag as fe, STATEMENT};
use crate::protocol::{ProtocolError, HEADER_LEN};
use crate::sql::resets;
use crate::sql::{self, Pin};

/// The extended-protocol messages whose responses are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
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
    pub(super) fn of(tag: u8) -> Option<Kind> {
        Some(match tag {
            fe::PARSE => Kind::Parse,
            fe::BIND => Kind::Bind,
            fe::CLOSE => Kind::Close,
            fe::DESCRIBE => Kind::Describe,
            fe::EXECUTE => Kind::Execute,
            fe::SYNC => Kind::Sync,
            fe::QUERY => Kind::Query,
            fe::FUNCTION_CALL => Kind::FunctionCall,
            _ => return None,
        })
    }

    /// Whether a response with `tag` is the last one for this message.
    fn ends_with(self, tag: u8) -> bool {
        match self {
            Kind::Parse => tag == be::PARSE_COMPLETE,
            Kind::Bind => tag == be::BIND_COMPLETE,
            Kind::Close => tag == be::CLOSE_COMPLETE,
            Kind::Describe => matches!(tag, be::ROW_DESCRIPTION | be::NO_DATA),
            Kind::Execute => matches!(
                tag,
                be::COMMAND_COMPLETE | be::EMPTY_QUERY_RESPONSE | be::PORTAL_SUSPENDED
            ),
            Kind::Sync | Kind::Query | Kind::FunctionCall => tag == be::READY_FOR_QUERY,
        }
    }
}

/// Server messages that can end a message's response, after which Sluice may add answers.
pub(super) fn ends_a_response(tag: u8) -> bool {
    matches!(
        tag,
        be::PARSE_COMPLETE
            | be::BIND_COMPLETE
            | be::CLOSE_COMPLETE
            | be::ROW_DESCRIPTION
            | be::NO_DATA
            | be::COMMAND_COMPLETE
            | be::EMPTY_QUERY_RESPONSE
            | be::PORTAL_SUSPENDED
            | be::ERROR_RESPONSE
            | be::READY_FOR_QUERY
    )
}

/// Messages whose bodies the client walk reads when rewriting statements.
pub(super) fn needs_look(tag: u8) -> bool {
    matches!(
        tag,
        fe::PARSE | fe::BIND | fe::DESCRIBE | fe::CLOSE | fe::QUERY
    )
}

#[derive(Debug)]
pub(super) enum Action {
    /// Sent for the client: its responses go to the client.
    Forward,
    /// Sent by Sluice: its closing response is swallowed (errors still reach the client).
    Swallow,
    /// Answered by Sluice with these bytes when its turn comes.
    Inject(Bytes),
}

/// One message in flight, in the order sent.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) kind: Kind,
    pub(super) action: Action,
    /// A Parse that registered (client name, hash): undone if the server refuses it.
    pub(super) registered: Option<(Box<[u8]>, u64)>,
    /// The client's named statement a Parse, Bind or Describe is about: an error the server
    /// answers it with names the statement as the client does.
    pub(super) statement: Option<Arc<Statement>>,
    /// A `DISCARD ALL`/`DEALLOCATE ALL` that empties the server's statements if it succeeds.
    pub(super) clears_server: bool,
    pub(super) errored: bool,
}

impl Entry {
    pub(super) fn new(kind: Kind, action: Action) -> Self {
        Entry {
            kind,
            action,
            registered: None,
            statement: None,
            clears_server: false,
            errored: false,
        }
    }
}

/// Statement bookkeeping and the response queue (transaction pooling only).
pub(super) struct Tracker<'a> {
    pub(super) queue: VecDeque<Entry>,
    pub(super) reject_session_state: bool,
    /// After refusing a Parse, the client's messages up to its Sync are dropped, as the server
    /// would after an error.
    pub(super) discarding: bool,
    pub(super) client: &'a mut ClientStatements,
    pub(super) server: &'a mut ServerStatements,
    pub(super) hasher: &'a RandomState,
}

fn parse_complete() -> Bytes {
    Bytes::from_static(&[be::PARSE_COMPLETE, 0, 0, 0, 4])
}

fn close_complete() -> Bytes {
    Bytes::from_static(&[be::CLOSE_COMPLETE, 0, 0, 0, 4])
}

/// Makes sure the server has `stmt`, appending (and queueing) a Close for an evicted statement
/// and a Parse when it lacks it.
fn ensure(t: &mut Tracker<'_>, stmt: &Statement, out: &mut BytesMut) {
    if t.server.touch(stmt.hash) {
        return;
    }
    if let Some(old) = t.server.insert(stmt.hash) {
        frontend::put_target(out, fe::CLOSE, STATEMENT, &prepared::statement_name(old));
        t.queue.push_back(Entry::new(Kind::Close, Action::Swallow));
    }
    out.extend_from_slice(&stmt.parse);
    let mut e = Entry::new(Kind::Parse, Action::Swallow);
    e.registered = Some((Box::default(), stmt.hash));
    t.queue.push_back(e);
}

/// Looks into a whole Parse, Bind, Describe, Close or Query: what to send instead, if not the
/// message itself. `resets`: a Query's statements, when some of them are resets (which leave
/// no state behind: see `super::reset`).
pub(super) fn look(
    t: &mut Tracker<'_>,
    flow: &mut Flow,
    tag: u8,
    body: &[u8],
    resets: Option<&[resets::Statement]>,
) -> Result<Option<Verdict>, ProtocolError> {
    match tag {
        fe::PARSE => {
            let p = frontend::parse(body)?;
            if let Some(old) = (!p.name.is_empty()).then(|| t.client.get(p.name)).flatten() {
                // PostgreSQL refuses to redefine a statement that was not closed, and skips the
                // rest of the batch. The name is the client's bytes, in its encoding: written
                // in place of Sluice's (ASCII) name for the statement.
                t.discarding = true;
                let mut answer = BytesMut::new();
                PgError::error(
                    sqlstate::DUPLICATE_PREPARED_STATEMENT,
                    format!("prepared statement \"{}\" already exists", old.server_name),
                )
                .with_side(Side::Client)
                .encode(&mut answer);
                let answer = rename_in_error(&answer, &old.server_name, p.name)
                    .unwrap_or_else(|| answer.freeze());
                t.queue
                    .push_back(Entry::new(Kind::Parse, Action::Inject(answer)));
                return Ok(Some(Verdict::Replace(Bytes::new())));
            }
            let text = &p.rest[..memchr::memchr(0, p.rest).unwrap_or(p.rest.len())];
            let enc = flow.encoding;
            // Outside a transaction block every statement may commit: no need to look.
            flow.commits_seen |= flow.status != TxStatus::Idle && sql::ends_transaction(text, enc);
            // A reset leaves nothing behind: Sluice puts the client's startup values back once
            // it has run (see `super::reset::Extended`).
            let reset = resets::prepared(text, enc);
            // A session SET inside a transaction block, into the unnamed statement (run in this
            // transaction, as a driver's `execute` does), does not pin: as in a Query.
            let set_names = (flow.status != TxStatus::Idle && p.name.is_empty())
                .then(|| sql::set_names(text, enc))
                .flatten();
            let pin = match &reset {
                Some(kind) if kind.is_reset() => None,
                _ if set_names.is_some() => None,
                _ => sql::pins(text, enc),
            };
            flow.settings_changed
                .extend(set_names.into_iter().flatten());
            if let Some(pin) = pin {
                if t.reject_session_state {
                    t.discarding = true;
                    t.queue
                        .push_back(Entry::new(Kind::Parse, Action::Inject(refusal(pin, None))));
                    return Ok(Some(Verdict::Replace(Bytes::new())));
                }
                flow.pin(pin);
            }
            if p.name.is_empty() {
                t.queue.push_back(Entry::new(Kind::Parse, Action::Forward));
                return Ok(None);
            }
            let mut stmt = prepared::statement(t.hasher, p.rest);
            stmt.reset = reset;
            let stmt = Arc::new(stmt);
            let name: Box<[u8]> = p.name.into();
            tracing::trace!(name = %String::from_utf8_lossy(&name), server_name = %stmt.server_name, on_server = t.server.len(), "client Parse");
            t.client.insert(&name, stmt.clone());
            if t.server.touch(stmt.hash) {
                t.queue
                    .push_back(Entry::new(Kind::Parse, Action::Inject(parse_complete())));
                return Ok(Some(Verdict::Replace(Bytes::new())));
            }
            let mut out = BytesMut::new();
            if let Some(old) = t.server.insert(stmt.hash) {
                frontend::put_target(
                    &mut out,
                    fe::CLOSE,
                    STATEMENT,
                    &prepared::statement_name(old),
                );
                t.queue.push_back(Entry::new(Kind::Close, Action::Swallow));
            }
            out.extend_from_slice(&stmt.parse);
            let mut e = Entry::new(Kind::Parse, Action::Forward);
            e.registered = Some((name, stmt.hash));
            e.statement = Some(stmt);
            t.queue.push_back(e);
            Ok(Some(Verdict::Replace(out.freeze())))
        }
        fe::BIND => {
            let (portal, name, used) = frontend::bind(body)?;
            let Some(stmt) = (!name.is_empty())
                .then(|| t.client.get(name).cloned())
                .flatten()
            else {
                t.queue.push_back(Entry::new(Kind::Bind, Action::Forward));
                return Ok(None);
            };
            let mut out = BytesMut::new();
            ensure(t, &stmt, &mut out);
            frontend::put_bind(&mut out, portal, &stmt.server_name, &body[used..]);
            let mut e = Entry::new(Kind::Bind, Action::Forward);
            e.statement = Some(stmt);
            t.queue.push_back(e);
            Ok(Some(Verdict::Replace(out.freeze())))
        }
        fe::DESCRIBE => {
            let (kind, name) = frontend::target(body, "Describe")?;
            let stmt = (kind == STATEMENT && !name.is_empty())
                .then(|| t.client.get(name).cloned())
                .flatten();
            let Some(stmt) = stmt else {
                t.queue
                    .push_back(Entry::new(Kind::Describe, Action::Forward));
                return Ok(None);
            };
            let mut out = BytesMut::new();
            ensure(t, &stmt, &mut out);
            frontend::put_target(&mut out, fe::DESCRIBE, STATEMENT, &stmt.server_name);
            let mut e = Entry::new(Kind::Describe, Action::Forward);
            e.statement = Some(stmt);
            t.queue.push_back(e);
            Ok(Some(Verdict::Replace(out.freeze())))
        }
        fe::CLOSE => {
            let (kind, name) = frontend::target(body, "Close")?;
            if kind == STATEMENT && !name.is_empty() {
                // The server keeps its copy, shared with other clients; the client forgets.
                t.client.remove(name);
                t.queue
                    .push_back(Entry::new(Kind::Close, Action::Inject(close_complete())));
                return Ok(Some(Verdict::Replace(Bytes::new())));
            }
            t.queue.push_back(Entry::new(Kind::Close, Action::Forward));
            Ok(None)
        }
        fe::QUERY => {
            let sql = frontend::query(body)?;
            // A session SET inside a transaction block does not pin: the session reads back what
            // the transaction left (see `Flow::settings_changed`) and carries it as its own.
            let in_block = flow.status != TxStatus::Idle;
            let enc = flow.encoding;
            flow.commits_seen = in_block && sql::ends_transaction(sql, enc);
            let set_names = if in_block && resets.is_none() {
                sql::set_names(sql, enc)
            } else {
                None
            };
            let pin = match resets {
                _ if set_names.is_some() => None,
                Some(stmts) => super::reset::pins(flow, sql, stmts),
                None => sql::pins(sql, enc),
            };
            if let Some(names) = set_names {
                flow.settings_changed.extend(names);
            } else if let Some(pin) = pin {
                tracing::trace!(
                    reason = pin.as_str(),
                    reject = t.reject_session_state,
                    "session state in a Query"
                );
                if t.reject_session_state {
                    t.queue.push_back(Entry::new(
                        Kind::Query,
                        Action::Inject(refusal(pin, Some(flow.status))),
                    ));
                    return Ok(Some(Verdict::Replace(Bytes::new())));
                }
                flow.pin(pin);
            }
            match prepared::statement_command(sql, enc) {
                StatementCommand::ForgetAll => {
                    t.client.clear();
                    let mut e = Entry::new(Kind::Query, Action::Forward);
                    e.clears_server = true;
                    t.queue.push_back(e);
                    Ok(None)
                }
                StatementCommand::Forget(name) if t.client.remove(&name).is_some() => {
                    let mut answer = BytesMut::new();
                    Out::command_complete(&mut answer, "DEALLOCATE");
                    Out::ready_for_query(&mut answer, flow.status);
                    t.queue
                        .push_back(Entry::new(Kind::Query, Action::Inject(answer.freeze())));
                    Ok(Some(Verdict::Replace(Bytes::new())))
                }
                _ => {
                    t.queue.push_back(Entry::new(Kind::Query, Action::Forward));
                    Ok(None)
                }
            }
        }
        _ => Ok(None),
    }
}

/// The ErrorResponse (and ReadyForQuery, for a simple Query) refusing a statement whose state
/// would outlive its transaction (`on_session_state = "reject"`).
fn refusal(pin: Pin, ready: Option<TxStatus>) -> Bytes {
    let mut out = BytesMut::new();
    PgError::error(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!(
            "{} is not supported in transaction pooling: its effect would outlive the transaction and reach other clients",
            pin.describe()
        ),
    )
    .with_detail("Sluice is configured with on_session_state = \"reject\". The statement was not executed.")
    .with_hint(format!("Instead, {}.", pin.advice()))
    .encode(&mut out);
    if let Some(status) = ready {
        Out::ready_for_query(&mut out, status);
    }
    out.freeze()
}

/// Pops the answers of Sluice's own at the head of the queue into `out`.
pub(super) fn take_injections(t: &mut Tracker<'_>, out: &mut BytesMut) {
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
}

/// Takes the answers of Sluice's own at the head of the queue, if any.
fn injections(t: &mut Tracker<'_>) -> Bytes {
    if !matches!(
        t.queue.front(),
        Some(Entry {
            action: Action::Inject(_),
            ..
        })
    ) {
        return Bytes::new();
    }
    let mut out = BytesMut::new();
    take_injections(t, &mut out);
    out.freeze()
}

/// Matches one server message (by tag) against the queue: whether to swallow it, and the
/// answers of Sluice's own due before and after it.
pub(super) fn respond(t: &mut Tracker<'_>, tag: u8) -> (bool, Bytes, Bytes) {
    tracing::trace!(tag = %char::from(tag), queue = ?t.queue.iter().map(|e| (e.kind, matches!(e.action, Action::Swallow), matches!(e.action, Action::Inject(_)))).collect::<Vec<_>>(), "server message");
    let before = injections(t);
    let Some(head) = t.queue.front_mut() else {
        // Notices, notifications and parameter changes come at any time.
        return (false, before, Bytes::new());
    };
    if head.kind == Kind::Query && matches!(head.action, Action::Swallow) {
        // Sluice's own statements: everything they answer is swallowed, errors included.
        if tag == be::ERROR_RESPONSE {
            tracing::warn!("a statement Sluice sent to apply client settings failed");
        }
        let mut after = Bytes::new();
        if tag == be::READY_FOR_QUERY {
            t.queue.pop_front();
            after = injections(t);
        }
        return (true, before, after);
    }
    if tag == be::ERROR_RESPONSE {
        head.errored = true;
        if matches!(head.kind, Kind::Query | Kind::FunctionCall) {
            return (false, before, Bytes::new());
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
        return (false, before, Bytes::new());
    }
    if !head.kind.ends_with(tag) {
        return (false, before, Bytes::new());
    }
    let Some(entry) = t.queue.pop_front() else {
        return (false, before, Bytes::new());
    };
    if entry.clears_server && !entry.errored {
        t.server.clear();
    }
    let after = injections(t);
    (matches!(entry.action, Action::Swallow), before, after)
}

/// For an ErrorResponse about to be matched against the queue: the server's name of the
/// client's statement the head message is about, and the client's name for it.
pub(super) fn names_for_error(t: &Tracker<'_>) -> Option<(String, Vec<u8>)> {
    let stmt = t.queue.front()?.statement.as_ref()?;
    let client = t.client.name_of(stmt)?;
    Some((stmt.server_name.clone(), client.to_vec()))
}

/// `msg` (a whole ErrorResponse) with every mention of `server_name` replaced by `client_name`,
/// or `None` if it mentions none.
pub(super) fn rename_in_error(msg: &[u8], server_name: &str, client_name: &[u8]) -> Option<Bytes> {
    let body = msg.get(HEADER_LEN..)?;
    let from = server_name.as_bytes();
    memchr::memmem::find(body, from)?;
    let mut renamed = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = memchr::memmem::find(rest, from) {
        renamed.extend_from_slice(&rest[..at]);
        renamed.extend_from_slice(client_name);
        rest = &rest[at + from.len()..];
    }
    renamed.extend_from_slice(rest);
    let mut out = BytesMut::with_capacity(HEADER_LEN + renamed.len());
    out.extend_from_slice(&[be::ERROR_RESPONSE]);
    out.extend_from_slice(&u32::try_from(4 + renamed.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&renamed);
    Some(out.freeze())
}
