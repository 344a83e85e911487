//! Protocol-level named prepared statements in transaction pooling.
//!
//! A client's named statements must survive its hopping between server connections. Sluice
//! tracks what each client prepared (name → [`Statement`]) and names every statement on the
//! server after a keyed hash of its text and parameter types (`sluice_<hash>`), so clients that
//! prepare the same statement share it on each server. Each server connection remembers which
//! of those it has ([`ServerStatements`], bounded, least recently used evicted with a
//! Close). In the client's stream:
//!
//! - `Parse(name)` is renamed; when the server already has the statement it is not sent at all
//!   and Sluice answers ParseComplete itself;
//! - `Bind`/`Describe` of a named statement are renamed, and a Parse is slipped in first when the
//!   server lacks the statement (its ParseComplete is swallowed);
//! - `Close` of a named statement only forgets it (the server keeps its shared copy) and is
//!   answered with CloseComplete;
//! - `DEALLOCATE name|ALL` and `DISCARD ALL` act on the client's statements.
//!
//! Unknown names go to the server unchanged, so its errors name them as the client did.
//! See <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-EXT-QUERY>.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::frontend::tag;
use crate::sql::resets::Kind;
use crate::sql::{self, Encoding};

/// One statement as prepared on servers.
#[derive(Debug)]
pub struct Statement {
    pub hash: u64,
    pub server_name: String,
    /// A whole Parse message under `server_name`, to prepare it on a server that lacks it.
    pub parse: Bytes,
    /// The reset (`RESET ALL`, `DISCARD ALL`, ...) the statement is, if it is one.
    pub reset: Option<Kind>,
}

/// The named statements one client has prepared, by name as the client's bytes (names are in
/// its encoding). The map is allocated with the first one: most clients never prepare a named
/// statement, and every connected client keeps this.
#[derive(Default)]
pub struct ClientStatements {
    by_name: Option<Box<ByName>>,
}

type ByName = HashMap<Box<[u8]>, Arc<Statement>>;

impl ClientStatements {
    pub fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        self.by_name.as_ref()?.get(name)
    }

    pub fn insert(&mut self, name: &[u8], s: Arc<Statement>) {
        self.by_name
            .get_or_insert_with(Default::default)
            .insert(name.into(), s);
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        self.by_name.as_mut()?.remove(name)
    }

    pub fn clear(&mut self) {
        self.by_name = None;
    }

    /// The name the client knows `stmt` by (for errors that would name it as the server does).
    pub fn name_of(&self, stmt: &Arc<Statement>) -> Option<&[u8]> {
        self.by_name
            .as_ref()?
            .iter()
            .find(|(_, s)| Arc::ptr_eq(s, stmt))
            .map(|(n, _)| &n[..])
    }
}

/// Makes the statement for a Parse body, named by a keyed hash of its text and types.
pub fn statement(hasher: &impl BuildHasher, rest: &[u8]) -> Statement {
    let mut h = hasher.build_hasher();
    h.write(rest);
    let hash = h.finish();
    let server_name = statement_name(hash);
    let mut parse = BytesMut::with_capacity(rest.len() + server_name.len() + 6);
    parse.put_u8(tag::PARSE);
    parse.put_u32((4 + server_name.len() + 1 + rest.len()) as u32);
    parse.put_slice(server_name.as_bytes());
    parse.put_u8(0);
    parse.put_slice(rest);
    Statement {
        hash,
        server_name,
        parse: parse.freeze(),
        reset: None,
    }
}

/// What a simple Query does to prepared statements.
#[derive(Debug, PartialEq, Eq)]
pub enum StatementCommand {
    /// `DEALLOCATE [PREPARE] ALL` or `DISCARD ALL`.
    ForgetAll,
    /// `DEALLOCATE [PREPARE] name`: the name as PostgreSQL reads it (unquoted folded to lower
    /// case, quoted taken as written).
    Forget(Vec<u8>),
    Other,
}

/// Recognises the statements that act on prepared statements (bytes in the client's encoding
/// `enc`). Only a lone statement counts.
pub fn statement_command(sql: &[u8], enc: Encoding) -> StatementCommand {
    let sql = sql::trim_start(sql, enc);
    // Most queries are neither: one byte tells.
    if !sql.first().is_some_and(|b| b.eq_ignore_ascii_case(&b'd')) {
        return StatementCommand::Other;
    }
    let mut statements = sql::statements(sql, enc);
    let (Some(stmt), None) = (statements.next(), statements.next()) else {
        return StatementCommand::Other;
    };
    let mut words = Words { s: stmt, enc };
    let first = words.next().unwrap_or_default();
    let second = words.next().unwrap_or_default();
    let third = words.next();
    if first.eq_ignore_ascii_case(b"discard")
        && second.eq_ignore_ascii_case(b"all")
        && third.is_none()
    {
        return StatementCommand::ForgetAll;
    }
    if !first.eq_ignore_ascii_case(b"deallocate") {
        return StatementCommand::Other;
    }
    let (name, extra) = if second.eq_ignore_ascii_case(b"prepare") {
        (third.unwrap_or_default(), words.next())
    } else {
        (second, third)
    };
    if name.is_empty() || extra.is_some() {
        return StatementCommand::Other;
    }
    if name.eq_ignore_ascii_case(b"all") {
        return StatementCommand::ForgetAll;
    }
    match name.strip_prefix(b"\"").and_then(|n| n.strip_suffix(b"\"")) {
        Some(quoted) => {
            let mut out = Vec::with_capacity(quoted.len());
            let mut rest = quoted;
            while let Some((&b, tail)) = rest.split_first() {
                out.push(b);
                rest = if b == b'"' {
                    tail.strip_prefix(b"\"").unwrap_or(tail)
                } else {
                    tail
                };
            }
            StatementCommand::Forget(out)
        }
        None => StatementCommand::Forget(name.to_ascii_lowercase()),
    }
}

/// The words of one statement: split at whitespace and comments, a quoted identifier whole.
struct Words<'a> {
    s: &'a [u8],
    enc: Encoding,
}

impl<'a> Iterator for Words<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let s = sql::trim_start(self.s, self.enc);
        if s.is_empty() {
            return None;
        }
        let mut end = 0;
        let mut quoted = false;
        while end < s.len() {
            let b = s[end];
            if b == b'"' {
                quoted = !quoted;
            } else if !quoted
                && (b.is_ascii_whitespace()
                    || s[end..].starts_with(b"/*")
                    || s[end..].starts_with(b"--"))
            {
                break;
            }
            end += self.enc.char_len(&s[end..]);
        }
        self.s = &s[end..];
        Some(&s[..end])
    }
}

/// The `sluice_<hash>` statements prepared on one server connection, least recently used
/// evicted past `cap`.
#[derive(Debug, Default)]
pub struct ServerStatements {
    last_use: HashMap<u64, u64>,
    tick: u64,
    cap: usize,
}

impl ServerStatements {
    pub fn with_capacity(cap: usize) -> Self {
        ServerStatements {
            last_use: HashMap::new(),
            tick: 0,
            cap: cap.max(1),
        }
    }

    /// Whether the statement is there, marking it used.
    pub fn touch(&mut self, hash: u64) -> bool {
        self.tick += 1;
        match self.last_use.get_mut(&hash) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records a statement; returns the one evicted to make room, which the caller closes.
    pub fn insert(&mut self, hash: u64) -> Option<u64> {
        self.tick += 1;
        let evicted = if self.last_use.len() >= self.cap && !self.last_use.contains_key(&hash) {
            let oldest = self
                .last_use
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(h, _)| *h);
            oldest.inspect(|h| {
                self.last_use.remove(h);
            })
        } else {
            None
        };
        self.last_use.insert(hash, self.tick);
        evicted
    }

    pub fn remove(&mut self, hash: u64) {
        self.last_use.remove(&hash);
    }

    pub fn clear(&mut self) {
        self.last_use.clear();
    }

    pub fn len(&self) -> usize {
        self.last_use.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_use.is_empty()
    }
}

/// The server-side name of a statement hash.
pub fn statement_name(hash: u64) -> String {
    format!("sluice_{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frontend::parse;
    use std::collections::hash_map::RandomState;

    fn body(name: &str, query: &str) -> Vec<u8> {
        let mut v = format!("{name}\0{query}\0").into_bytes();
        v.extend_from_slice(&1i16.to_be_bytes());
        v.extend_from_slice(&23i32.to_be_bytes());
        v
    }

    #[test]
    fn same_text_same_server_name() {
        let h = RandomState::new();
        let a = body("a", "select $1");
        let b = body("other", "select $1");
        let pa = parse(&a).unwrap();
        let pb = parse(&b).unwrap();
        assert_eq!(pa.name, b"a");
        let (sa, sb) = (statement(&h, pa.rest), statement(&h, pb.rest));
        assert_eq!(sa.server_name, sb.server_name);
        assert_ne!(
            statement(&h, parse(&body("a", "select $2")).unwrap().rest).server_name,
            sa.server_name
        );
        // The rebuilt Parse frames correctly.
        let (f, n) = crate::protocol::next_frame(&sa.parse, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!((f.tag, n), (b'P', sa.parse.len()));
        assert_eq!(parse(f.body).unwrap().name, sa.server_name.as_bytes());
    }

    #[test]
    fn recognises_statement_commands() {
        use StatementCommand::*;
        let cmd = |s: &str| statement_command(s.as_bytes(), Encoding::AsciiSafe);
        let forget = |s: &str| Forget(s.as_bytes().to_vec());
        assert_eq!(cmd("DISCARD ALL"), ForgetAll);
        assert_eq!(cmd(" deallocate all; "), ForgetAll);
        assert_eq!(cmd("/* c */ DEALLOCATE PREPARE ALL"), ForgetAll);
        assert_eq!(cmd("deallocate s1"), forget("s1"));
        assert_eq!(
            cmd("deallocate S_1"),
            forget("s_1"),
            "folded as PostgreSQL does"
        );
        assert_eq!(cmd("DEALLOCATE PREPARE \"S 1\"\"\""), forget("S 1\""));
        assert_eq!(cmd("select 1; deallocate all"), Other);
        assert_eq!(cmd("deallocate all; select 1"), Other);
        assert_eq!(cmd("DISCARD PLANS"), Other);
        assert_eq!(cmd("deallocate"), Other);
        assert_eq!(cmd("deallocate a b"), Other);
        // A name in SJIS whose second byte is a backslash.
        assert_eq!(
            statement_command(b"deallocate \"\x83\x5c\"", Encoding::Sjis),
            Forget(b"\x83\x5c".to_vec())
        );
    }
}
