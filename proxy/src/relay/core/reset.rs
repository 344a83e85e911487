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

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

use super::Flow;
use crate::protocol::backend::{tag as be, TxStatus};
use crate::protocol::frontend::{tag as fe, PORTAL};
use crate::protocol::HEADER_LEN;
use crate::settings::Settings;
use crate::sql::resets::{Kind, Reset, Statement};
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

    /// COPY FROM STDIN began: `ignored` Syncs sent since will get no ReadyForQuery.
    pub(super) fn copy_ignored(&mut self, ignored: u32) {
        for r in &mut self.in_flight {
            r.ahead = r.ahead.saturating_sub(ignored);
        }
    }
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
