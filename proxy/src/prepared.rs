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

/// One statement as prepared on servers.
#[derive(Debug)]
pub struct Statement {
    pub hash: u64,
    pub server_name: String,
    /// A whole Parse message under `server_name`, to prepare it on a server that lacks it.
    pub parse: Bytes,
}

/// The named statements one client has prepared.
#[derive(Default)]
pub struct ClientStatements {
    by_name: HashMap<String, Arc<Statement>>,
}

impl ClientStatements {
    pub fn get(&self, name: &str) -> Option<&Arc<Statement>> {
        self.by_name.get(name)
    }

    pub fn insert(&mut self, name: String, s: Arc<Statement>) {
        self.by_name.insert(name, s);
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<Statement>> {
        self.by_name.remove(name)
    }

    pub fn clear(&mut self) {
        self.by_name.clear();
    }

    /// The name the client knows `stmt` by (for errors that would name it as the server does).
    pub fn name_of(&self, stmt: &Arc<Statement>) -> Option<&str> {
        self.by_name
            .iter()
            .find(|(_, s)| Arc::ptr_eq(s, stmt))
            .map(|(n, _)| n.as_str())
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
    }
}

/// What a simple Query does to prepared statements.
#[derive(Debug, PartialEq, Eq)]
pub enum StatementCommand<'a> {
    /// `DEALLOCATE [PREPARE] ALL` or `DISCARD ALL`.
    ForgetAll,
    /// `DEALLOCATE [PREPARE] name`.
    Forget(&'a str),
    Other,
}

/// Recognises the statements that act on prepared statements. Only a lone statement counts.
pub fn statement_command(sql: &str) -> StatementCommand<'_> {
    let sql = sql.trim_start();
    // Most queries are neither: one byte tells.
    if !sql
        .as_bytes()
        .first()
        .is_some_and(|b| b.eq_ignore_ascii_case(&b'd'))
    {
        return StatementCommand::Other;
    }
    let sql = sql.trim_end().trim_end_matches(';').trim_end();
    let mut words = sql.split_whitespace();
    let first = words.next().unwrap_or("");
    let second = words.next().unwrap_or("");
    let third = words.next();
    if sql.contains(';') {
        return StatementCommand::Other;
    }
    if first.eq_ignore_ascii_case("discard")
        && second.eq_ignore_ascii_case("all")
        && third.is_none()
    {
        return StatementCommand::ForgetAll;
    }
    if !first.eq_ignore_ascii_case("deallocate") {
        return StatementCommand::Other;
    }
    let (name, extra) = if second.eq_ignore_ascii_case("prepare") {
        (third.unwrap_or(""), words.next())
    } else {
        (second, third)
    };
    if name.is_empty() || extra.is_some() {
        return StatementCommand::Other;
    }
    if name.eq_ignore_ascii_case("all") {
        StatementCommand::ForgetAll
    } else {
        StatementCommand::Forget(name.trim_matches('"'))
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
        assert_eq!(pa.name, "a");
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
        assert_eq!(parse(f.body).unwrap().name, sa.server_name);
    }

    #[test]
    fn recognises_statement_commands() {
        use StatementCommand::*;
        assert_eq!(statement_command("DISCARD ALL"), ForgetAll);
        assert_eq!(statement_command(" deallocate all; "), ForgetAll);
        assert_eq!(statement_command("DEALLOCATE PREPARE ALL"), ForgetAll);
        assert_eq!(statement_command("deallocate s1"), Forget("s1"));
        assert_eq!(statement_command("DEALLOCATE PREPARE \"s1\""), Forget("s1"));
        assert_eq!(statement_command("select 1; deallocate all"), Other);
        assert_eq!(statement_command("DISCARD PLANS"), Other);
        assert_eq!(statement_command("deallocate"), Other);
    }
}
