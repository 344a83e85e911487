//! `RESET ALL`, `RESET name`, `SET name TO DEFAULT` and `DISCARD ALL` in a client's simple
//! Query: they must bring back the client's startup values, not the server connection's (its
//! session defaults are Sluice's own startup packet's).
//!
//! Sluice adds a statement of its own to the client's Query, `SELECT set_config(name,
//! startup value, …) AS "sluice.reset"`, for the startup settings each reset touches:
//!
//! - after a `RESET`/`SET … TO DEFAULT` statement it goes into the Query's text, right after
//!   that statement, so the statements that follow in the same Query (`SHOW`,
//!   `current_setting`) already see the startup values;
//! - a `DISCARD ALL` cannot share a Query with another statement (it refuses to run in the
//!   implicit transaction block that would make), so that Query is sent as the extended-protocol
//!   messages Parse/Bind/Execute of the client's text, then of Sluice's statement, then one Sync:
//!   DISCARD ALL runs first in the pipeline (allowed) and commits at once.
//!
//! Either way the server ends the request with the client's values in place and sends
//! ParameterStatus, just before ReadyForQuery (PostgreSQL 14 and later), only for reported
//! settings whose value differs from what it last reported, which, since Sluice's settings
//! prefix brought the server to the client's values, is what the client was last told: exactly
//! the messages PostgreSQL would have sent the client directly. What Sluice added answers is
//! recognised by the column name of its RowDescription and swallowed, up to its
//! CommandComplete; the ParseComplete and BindComplete of a converted `DISCARD ALL` are
//! swallowed too. If an earlier statement fails, the server skips Sluice's with the rest.
//!
//! Known differences: an error *after* an inserted statement reports a position (`P`) counted
//! in the text the server got, which is longer than the client's; the server's own views
//! (`pg_stat_activity.query`, logs) show the longer text.
//!
//! Resets through the extended protocol are put right after their pipeline: see [`Extended`].

use std::collections::{HashMap, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};

use super::{Flow, Verdict};
use crate::protocol::backend::{self, tag as be, TxStatus};
use crate::protocol::frontend::{self, tag as fe, PORTAL};
use crate::protocol::{ProtocolError, HEADER_LEN};
use crate::settings::Settings;
use crate::sql::resets::{self, Kind, Reset, Statement};
use crate::sql::{self, Pin};

/// The column name of Sluice's own statement, by which its answer is recognised.
const MARKER: &str = "sluice.reset";

/// A client Query that carries a statement of Sluice's own, in flight.
#[derive(Debug)]
struct Rewritten {
    /// ReadyForQuery messages the client gets before this Query's own.
    ahead: u32,
    /// Sent as extended-protocol messages (`DISCARD ALL`): ParseComplete and BindComplete are
    /// Sluice's.
    extended: bool,
}

/// The Queries Sluice added statements to, while they are answered.
#[derive(Debug, Default)]
pub(super) struct Own {
    in_flight: VecDeque<Rewritten>,
    /// Resets sent through the extended protocol.
    pub(super) extended: Extended,
    /// Inside the answer to Sluice's statement: after its RowDescription, up to its
    /// CommandComplete.
    swallowing: bool,
}

impl Own {
    /// Nothing of Sluice's own is being answered (the server walk's fast path).
    pub(super) fn is_idle(&self) -> bool {
        self.in_flight.is_empty() && !self.swallowing
    }

    /// Inside the answer to Sluice's statement.
    pub(super) fn swallowing(&self) -> bool {
        self.swallowing
    }

    /// Whether the server message `tag` (`msg` whole, for a RowDescription) answers Sluice's
    /// statement and is left out.
    pub(super) fn swallows(&mut self, tag: u8, msg: &[u8]) -> bool {
        if self.swallowing {
            match tag {
                be::DATA_ROW => return true,
                be::COMMAND_COMPLETE => {
                    self.swallowing = false;
                    return true;
                }
                be::ERROR_RESPONSE | be::READY_FOR_QUERY => self.swallowing = false,
                _ => {}
            }
            return false;
        }
        match tag {
            be::ROW_DESCRIPTION if is_marker(msg) => {
                self.swallowing = true;
                true
            }
            be::PARSE_COMPLETE | be::BIND_COMPLETE => self
                .in_flight
                .front()
                .is_some_and(|r| r.extended && r.ahead == 0),
            _ => false,
        }
    }

    /// A ReadyForQuery reached the client.
    pub(super) fn ready(&mut self) {
        self.swallowing = false;
        let mut done = false;
        for r in &mut self.in_flight {
            if r.ahead == 0 {
                done = true;
            } else {
                r.ahead -= 1;
            }
        }
        if done {
            self.in_flight.pop_front();
        }
    }

    /// A ReadyForQuery from the server (after [`Own::ready`]): when it ends a pipeline with
    /// resets, they are recorded in `flow`, and Sluice's Query putting back the client's startup
    /// values may be due (see [`Extended`]).
    pub(super) fn pipeline_ready(&mut self, flow: &mut Flow, status: TxStatus) -> Ready {
        self.extended.ready(&mut self.in_flight, flow, status)
    }

    /// COPY FROM STDIN began: `ignored` Syncs sent since will get no ReadyForQuery.
    pub(super) fn copy_ignored(&mut self, ignored: u32) {
        if let Some(a) = self.extended.awaiting.as_mut() {
            a.ahead = a.ahead.saturating_sub(ignored);
        }
        for r in &mut self.in_flight {
            r.ahead = r.ahead.saturating_sub(ignored);
        }
    }
}

/// Resets a client runs through the extended protocol (a driver's `execute("DISCARD ALL")`):
/// Parse, Bind and Execute of a statement that is one. Their text cannot carry a statement of
/// Sluice's, so Sluice sends its own Query once the client's pipeline is answered: the client's
/// messages after its Sync wait (the client walk holds them) until the server has answered
/// the pipeline. If the pipeline failed, Sluice's Query is not sent (the reset may not have
/// run) and the session reads the settings back instead. Otherwise the pipeline's
/// ReadyForQuery is kept back, Sluice's Query is sent, and its answer is swallowed up to its
/// ReadyForQuery, which the client gets in place of the pipeline's (with the ParameterStatus
/// messages of the values put back before it).
#[derive(Debug, Default)]
pub(super) struct Extended {
    /// The client's named statements that are resets (while this relay lasts; in transaction
    /// pooling the client's statements remember it too).
    statements: HashMap<Box<[u8]>, Kind>,
    /// The unnamed statement, if it is a reset.
    unnamed: Option<Kind>,
    /// Portals bound to a reset statement.
    portals: Vec<(Box<[u8]>, Kind)>,
    /// Resets executed since the last Sync.
    executed: Vec<Kind>,
    /// The Sync that ended a pipeline with resets, until its ReadyForQuery.
    awaiting: Option<Awaiting>,
    /// Sluice's Query, to be sent before anything else of the client's.
    due: Option<Bytes>,
    /// Sluice's Query is being answered.
    restoring: bool,
    /// ParameterStatus messages kept back, by name: see [`Extended::holds_report`].
    reports: Vec<(String, Bytes)>,
}

#[derive(Debug)]
struct Awaiting {
    resets: Vec<Kind>,
    /// Sluice's Query putting back the startup values the resets touch (empty if none).
    restore: String,
    /// ReadyForQuery messages the client gets before the pipeline's own.
    ahead: u32,
    /// The server answered the pipeline with an error.
    failed: bool,
}

impl Extended {
    /// The client walk must not go on: Sluice's Query goes first.
    pub(super) fn holding(&self) -> bool {
        self.awaiting.is_some() || self.due.is_some()
    }

    /// Sluice's Query, once it is due.
    pub(super) fn take_due(&mut self) -> Option<Bytes> {
        self.due.take()
    }

    /// A Parse of statement `name`, whose text is `reset` if it is one.
    pub(super) fn parse(&mut self, name: &[u8], reset: Option<Kind>) {
        if name.is_empty() {
            self.unnamed = reset;
        } else if let Some(kind) = reset {
            self.statements.insert(name.into(), kind);
        } else if !self.statements.is_empty() {
            self.statements.remove(name);
        }
    }

    /// A Bind of `portal` to `statement`; `known`: the reset the client's statement is, as
    /// remembered beyond this relay.
    pub(super) fn bind(&mut self, portal: &[u8], statement: &[u8], known: Option<Kind>) {
        let reset = if statement.is_empty() {
            self.unnamed.clone()
        } else {
            known.or_else(|| self.statements.get(statement).cloned())
        };
        self.portals.retain(|(p, _)| &p[..] != portal);
        if let Some(kind) = reset {
            self.portals.push((portal.into(), kind));
        }
    }

    /// A Close of statement (`S`) or portal (`P`) `name`.
    pub(super) fn close(&mut self, kind: u8, name: &[u8]) {
        if kind == PORTAL {
            self.portals.retain(|(p, _)| &p[..] != name);
        } else if name.is_empty() {
            self.unnamed = None;
        } else {
            self.statements.remove(name);
        }
    }

    /// An Execute of `portal`: the reset it runs, if it runs one.
    fn execute(&mut self, portal: &[u8]) -> Option<Kind> {
        let (_, kind) = self.portals.iter().find(|(p, _)| &p[..] == portal)?;
        let kind = kind.clone();
        if kind == Kind::DiscardAll {
            // DEALLOCATE ALL, and every portal closed.
            self.statements.clear();
            self.portals.clear();
        }
        self.executed.push(kind.clone());
        Some(kind)
    }

    /// A Sync, with `pending` ReadyForQuery messages owed before its own.
    fn sync(&mut self, pending: u32, status: TxStatus, startup: &Settings) {
        if status == TxStatus::Idle {
            // Outside a transaction block the portals end with the pipeline.
            self.portals.clear();
        }
        if !self.executed.is_empty() {
            let resets = std::mem::take(&mut self.executed);
            let restore = restore_for(&resets, startup);
            self.awaiting = Some(Awaiting {
                resets,
                restore,
                ahead: pending,
                failed: false,
            });
        }
    }

    /// An ErrorResponse from the server.
    pub(super) fn error(&mut self) {
        if let Some(a) = self.awaiting.as_mut().filter(|a| a.ahead == 0) {
            a.failed = true;
        }
    }

    /// A ParameterStatus (`name`, whole message `msg`) from the server: whether Sluice keeps it
    /// back. At the end of a pipeline whose resets Sluice is about to undo, the server reports
    /// its own defaults for the settings Sluice puts back, then Sluice's Query makes it report
    /// the startup values: the client must see only what the settings end up as, in the
    /// server's order. Both are kept back, a later value of a setting in the place of its
    /// earlier one, until the ReadyForQuery the client gets.
    pub(super) fn holds_report(&mut self, name: &[u8], msg: &[u8]) -> bool {
        let holding = self.restoring
            || self
                .awaiting
                .as_ref()
                .is_some_and(|a| a.ahead == 0 && !a.restore.is_empty());
        if !holding {
            return false;
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let msg = Bytes::copy_from_slice(msg);
        match self.reports.iter_mut().find(|(n, _)| *n == name) {
            Some((_, m)) => *m = msg,
            None => self.reports.push((name, msg)),
        }
        true
    }

    /// A ReadyForQuery from the server (see [`Own::pipeline_ready`]).
    fn ready(
        &mut self,
        own_in_flight: &mut VecDeque<Rewritten>,
        flow: &mut Flow,
        status: TxStatus,
    ) -> Ready {
        if status == TxStatus::Idle {
            self.portals.clear();
        }
        if std::mem::take(&mut self.restoring) {
            return Ready::Pass(self.held_reports());
        }
        let Some(a) = self.awaiting.as_mut() else {
            return Ready::Pass(Vec::new());
        };
        if a.ahead > 0 {
            a.ahead -= 1;
            return Ready::Pass(Vec::new());
        }
        let Some(a) = self.awaiting.take() else {
            return Ready::Pass(Vec::new());
        };
        for kind in &a.resets {
            match kind {
                Kind::ResetAll | Kind::DiscardAll => flow.resets.push(Reset::All),
                Kind::Reset(n) => flow.resets.push(Reset::Name(n.clone())),
                _ => {}
            }
        }
        if a.failed || status == TxStatus::Failed || a.restore.is_empty() {
            flow.resets_unsure |= a.failed || status != TxStatus::Idle;
            return Ready::Pass(self.held_reports());
        }
        if status != TxStatus::Idle {
            flow.resets_unsure = true;
        }
        let mut q = BytesMut::with_capacity(a.restore.len() + HEADER_LEN + 1);
        q.put_u8(fe::QUERY);
        q.put_u32((4 + a.restore.len() + 1) as u32);
        q.put_slice(a.restore.as_bytes());
        q.put_u8(0);
        self.due = Some(q.freeze());
        self.restoring = true;
        own_in_flight.push_back(Rewritten {
            ahead: 0,
            extended: false,
        });
        Ready::Restore
    }

    fn held_reports(&mut self) -> Vec<Bytes> {
        self.reports.drain(..).map(|(_, msg)| msg).collect()
    }
}

/// What becomes of a ReadyForQuery from the server, as far as extended-protocol resets go.
pub(super) enum Ready {
    /// It goes to the client, after these ParameterStatus messages Sluice kept back (whole).
    Pass(Vec<Bytes>),
    /// Kept back: Sluice's Query goes first, and its ReadyForQuery is the client's.
    Restore,
}

/// The Query putting back the startup values `resets` touch (empty if none).
fn restore_for(resets: &[Kind], startup: &Settings) -> String {
    let mut sql = String::new();
    for kind in resets {
        let (restore, local): (Vec<_>, bool) = match kind {
            Kind::ResetAll | Kind::DiscardAll => (startup.iter().collect(), false),
            Kind::Reset(n) => (startup.get_key_value(n).into_iter().collect(), false),
            Kind::LocalDefault(n) => (startup.get_key_value(n).into_iter().collect(), true),
            _ => continue,
        };
        if restore.is_empty() {
            continue;
        }
        if !sql.is_empty() {
            sql.push_str("; ");
        }
        sql.push_str(&restore_sql(restore.into_iter(), local));
    }
    sql
}

/// A ReadyForQuery (status `status`) from the server, whose verdict so far is `verdict`: the
/// verdict once extended-protocol resets are seen to (see [`Extended`]), and whether Sluice's
/// Query goes next (the ReadyForQuery is then kept back).
pub(super) fn at_ready(
    own: &mut Own,
    flow: &mut Flow,
    status: TxStatus,
    verdict: Verdict,
) -> Result<(Verdict, bool), ProtocolError> {
    let held = match own.pipeline_ready(flow, status) {
        Ready::Restore => {
            let verdict = match verdict {
                Verdict::Pass { before, after } => {
                    Verdict::Replace([before, after].concat().into())
                }
                other => other,
            };
            return Ok((verdict, true));
        }
        Ready::Pass(held) => held,
    };
    // Reports kept back that the client still needs, then the ReadyForQuery.
    let mut told = Vec::new();
    for m in held {
        let (name, value) = backend::parameter_status(&m[HEADER_LEN..])?;
        if flow.tell(name, value) {
            told.extend_from_slice(&m);
        }
    }
    if told.is_empty() {
        return Ok((verdict, false));
    }
    let verdict = match verdict {
        Verdict::Pass { before, after } => Verdict::Pass {
            before: [&before[..], &told[..]].concat().into(),
            after,
        },
        Verdict::Replace(b) => Verdict::Replace([&b[..], &told[..]].concat().into()),
        other => other,
    };
    Ok((verdict, false))
}

/// The extended-protocol messages [`extended`] follows.
pub(super) fn follows(tag: u8) -> bool {
    matches!(
        tag,
        fe::PARSE | fe::BIND | fe::EXECUTE | fe::CLOSE | fe::SYNC
    )
}

/// Follows a whole client message `tag` (body `body`) of the extended protocol for resets;
/// `known`, the reset a client's named statement is, as its statements remember (transaction
/// pooling). A malformed message is left for the rest of the walk to refuse.
pub(super) fn extended(
    own: &mut Own,
    flow: &Flow,
    tag: u8,
    body: &[u8],
    startup: &Settings,
    known: impl Fn(&[u8]) -> Option<Kind>,
) -> Option<Kind> {
    let x = &mut own.extended;
    match tag {
        fe::PARSE => {
            let Ok(p) = frontend::parse(body) else {
                return None;
            };
            let text = &p.rest[..memchr::memchr(0, p.rest).unwrap_or(p.rest.len())];
            x.parse(p.name, resets::prepared(text, flow.encoding));
        }
        fe::BIND => {
            if let Ok((portal, statement, _)) = frontend::bind(body) {
                let known = (!statement.is_empty()).then(|| known(statement)).flatten();
                x.bind(portal, statement, known);
            }
        }
        fe::EXECUTE if !x.portals.is_empty() => {
            if let Ok((portal, _)) = frontend::execute(body) {
                return x.execute(portal);
            }
        }
        fe::CLOSE => {
            if let Ok((kind, name)) = frontend::target(body, "Close") {
                x.close(kind, name);
            }
        }
        fe::SYNC => x.sync(flow.pending, flow.status, startup),
        _ => {}
    }
    None
}

/// Whether a whole RowDescription describes Sluice's statement (its first column).
fn is_marker(msg: &[u8]) -> bool {
    msg.get(HEADER_LEN + 2..)
        .and_then(|names| names.strip_prefix(MARKER.as_bytes()))
        .is_some_and(|rest| rest.first() == Some(&0))
}

/// The pin, if any, of a Query's statements other than its resets. A session `SET` that a
/// later statement of the same Query resets leaves nothing behind either. Inside a transaction
/// block a session `SET` does not pin (see [`Flow::settings_changed`]).
pub(super) fn pins(flow: &mut Flow, sql: &[u8], stmts: &[Statement]) -> Option<Pin> {
    let in_block = flow.status != TxStatus::Idle;
    for (i, st) in stmts.iter().enumerate() {
        if st.is_reset() {
            continue;
        }
        if let Kind::Set(name) = &st.kind {
            let reset_later = stmts[i + 1..].iter().any(|l| match &l.kind {
                Kind::ResetAll | Kind::DiscardAll => true,
                Kind::Reset(n) => n == name,
                _ => false,
            });
            if reset_later {
                continue;
            }
        }
        let text = sql.get(st.start..st.end).unwrap_or(sql);
        if in_block {
            if let Some(names) = sql::set_names(text, flow.encoding) {
                flow.settings_changed.extend(names);
                continue;
            }
        }
        if let Some(pin) = sql::pins(text, flow.encoding) {
            return Some(pin);
        }
    }
    None
}

/// Records the resets of a client's Query (body `body`, whose statements are `stmts`) in
/// `flow`, and returns the message to send in its place when Sluice has startup values to put
/// back.
pub(super) fn rewrite(
    own: &mut Own,
    flow: &mut Flow,
    body: &[u8],
    stmts: &[Statement],
    startup: &Settings,
) -> Option<Bytes> {
    for st in stmts {
        match &st.kind {
            Kind::ResetAll | Kind::DiscardAll => flow.resets.push(Reset::All),
            Kind::Reset(n) => flow.resets.push(Reset::Name(n.clone())),
            _ => {}
        }
    }
    // The session can take the resets as done only for a Query that runs alone, outside a
    // transaction block; otherwise it reads the values back afterwards.
    if flow.status != TxStatus::Idle || flow.pending > 0 {
        flow.resets_unsure = true;
    }
    if startup.is_empty() {
        return None;
    }
    let sql = &body[..memchr::memchr(0, body)?];
    let ahead = flow.pending;
    if let [only] = stmts {
        if only.kind == Kind::DiscardAll {
            own.in_flight.push_back(Rewritten {
                ahead,
                extended: true,
            });
            return Some(discard_all(sql, &restore_sql(startup.iter(), false)));
        }
    }
    let mut out = BytesMut::with_capacity(body.len() + 128);
    out.put_u8(fe::QUERY);
    out.put_u32(0);
    let mut copied = 0;
    for st in stmts {
        let (restore, local): (Vec<_>, bool) = match &st.kind {
            Kind::ResetAll => (startup.iter().collect(), false),
            Kind::Reset(n) => (startup.get_key_value(n).into_iter().collect(), false),
            Kind::LocalDefault(n) => (startup.get_key_value(n).into_iter().collect(), true),
            _ => continue,
        };
        if restore.is_empty() {
            continue;
        }
        out.extend_from_slice(&sql[copied..st.end]);
        copied = st.end;
        if !st.terminated {
            // The text may end inside a `--` comment.
            out.extend_from_slice(b"\n;");
        }
        out.extend_from_slice(restore_sql(restore.into_iter(), local).as_bytes());
        if st.terminated {
            out.put_u8(b';');
        }
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&sql[copied..]);
    out.put_u8(0);
    let len = u32::try_from(out.len() - 1).ok()?;
    out[1..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    own.in_flight.push_back(Rewritten {
        ahead,
        extended: false,
    });
    Some(out.freeze())
}

/// `SELECT set_config('name', 'value', local) AS "sluice.reset", …`.
fn restore_sql<'s>(
    settings: impl Iterator<Item = (&'s String, &'s String)>,
    local: bool,
) -> String {
    let mut sql = String::from("SELECT ");
    for (i, (name, value)) in settings.enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "set_config({}, {}, {local})",
            sql::quote_literal(name),
            sql::quote_literal(value)
        ));
        if i == 0 {
            sql.push_str(&format!(" AS \"{MARKER}\""));
        }
    }
    sql
}

/// The client's `DISCARD ALL` (text `sql`), then `restore`, as one extended-protocol request.
fn discard_all(sql: &[u8], restore: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(sql.len() + restore.len() + 64);
    for (text, describe) in [(sql, false), (restore.as_bytes(), true)] {
        // Parse of the unnamed statement, no parameter types.
        out.put_u8(fe::PARSE);
        out.put_u32((4 + 1 + text.len() + 1 + 2) as u32);
        out.put_u8(0);
        out.put_slice(text);
        out.put_u8(0);
        out.put_i16(0);
        // Bind of the unnamed portal: no parameters, text results.
        out.put_u8(fe::BIND);
        out.put_u32(4 + 1 + 1 + 2 + 2 + 2);
        out.put_u8(0);
        out.put_u8(0);
        out.put_i16(0);
        out.put_i16(0);
        out.put_i16(0);
        if describe {
            crate::protocol::frontend::put_target(&mut out, fe::DESCRIBE, PORTAL, "");
        }
        out.put_u8(fe::EXECUTE);
        out.put_u32(4 + 1 + 4);
        out.put_u8(0);
        out.put_i32(0);
    }
    out.put_u8(fe::SYNC);
    out.put_u32(4);
    out.freeze()
}
