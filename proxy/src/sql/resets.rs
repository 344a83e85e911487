//! The statements of a simple Query that return settings to the session's defaults: `RESET
//! ALL`, `RESET name`, `SET [SESSION | LOCAL] name {TO | =} DEFAULT` (and `SET TIME ZONE
//! DEFAULT | LOCAL`) and `DISCARD ALL`.
//!
//! Directly against PostgreSQL these bring back the values of the client's own startup packet;
//! through a pooler the server's session defaults are the pooler's, so the relay has to put the
//! client's startup values back (see `relay::core::reset`). This module only reads the text: it
//! splits a Query where PostgreSQL does ([`super::lex`], in the client's encoding) and says
//! which statements are resets and of which settings. A backslash anywhere in the text makes it
//! answer "no resets" (whether one escapes a quote depends on `standard_conforming_strings`,
//! which Sluice cannot see), and the statement is then treated as any other session-state
//! statement.
//! See <https://www.postgresql.org/docs/current/sql-reset.html> and
//! <https://www.postgresql.org/docs/current/sql-discard.html>.

use super::lex::Encoding;

/// What one statement of a Query is, as far as session defaults go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `RESET ALL`.
    ResetAll,
    /// `DISCARD ALL`.
    DiscardAll,
    /// `RESET name`, `SET [SESSION] name TO DEFAULT`: the setting (lower case) is back at its
    /// session default.
    Reset(String),
    /// `SET LOCAL name TO DEFAULT`: back at the session default until the transaction ends.
    LocalDefault(String),
    /// A session-level `SET name …` to a value: overridden by a later reset of the same name.
    Set(String),
    /// Anything else.
    Other,
}

/// One statement: where its text is in the Query, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// Byte offset where the statement starts (after leading whitespace and comments).
    pub start: usize,
    /// Byte offset just past the statement and its `;` (or the end of the text).
    pub end: usize,
    /// Whether a `;` ends it.
    pub terminated: bool,
    pub kind: Kind,
}

impl Kind {
    /// Whether the statement returns a setting to its session default.
    pub fn is_reset(&self) -> bool {
        matches!(
            self,
            Kind::ResetAll | Kind::DiscardAll | Kind::Reset(_) | Kind::LocalDefault(_)
        )
    }
}

impl Statement {
    /// Whether the statement returns a setting to its session default.
    pub fn is_reset(&self) -> bool {
        self.kind.is_reset()
    }
}

/// A reset the session must record once the Query has run: which of its settings are back at
/// their startup values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reset {
    /// Every setting (`RESET ALL`, `DISCARD ALL`).
    All,
    /// One setting.
    Name(String),
}

/// The statements of `sql` (a Query's text, without its NUL), when at least one of them is a
/// reset; `None` otherwise, or when the text cannot be split with certainty. Most queries are
/// turned away by a few `memchr` passes, without allocating.
pub fn scan(sql: &[u8], enc: Encoding) -> Option<Vec<Statement>> {
    if let Some(one) = super::lex::at_most_one(sql, enc) {
        // Only a statement that starts with one of these words can be a reset (`classify`).
        let s = &sql[one];
        if !["set", "reset", "discard"]
            .iter()
            .any(|w| super::starts_with_word(s, w))
        {
            return None;
        }
    }
    if !mentions_reset(sql) {
        return None;
    }
    let stmts = split(sql, enc)?;
    stmts.iter().any(Statement::is_reset).then_some(stmts)
}

/// [`scan`] without its glance at the first word: the lexer always splits (for the tests, which
/// compare the two).
#[cfg(test)]
pub(super) fn scan_by_lexer(sql: &[u8], enc: Encoding) -> Option<Vec<Statement>> {
    if !mentions_reset(sql) {
        return None;
    }
    let stmts = split(sql, enc)?;
    stmts.iter().any(Statement::is_reset).then_some(stmts)
}

/// The reset a prepared statement's text (a Parse's, without its NUL) is, if it is one (see
/// [`Kind::is_reset`]): the extended protocol allows one statement.
pub fn prepared(sql: &[u8], enc: Encoding) -> Option<Kind> {
    let mut stmts = scan(sql, enc)?;
    match stmts.pop() {
        Some(only) if stmts.is_empty() && only.is_reset() => Some(only.kind),
        _ => None,
    }
}

/// Whether `sql` contains `reset`, `discard`, `default` or `zone` (`SET TIME ZONE LOCAL`) in
/// any case: a cheap test before splitting, anchored on a letter of each.
fn mentions_reset(sql: &[u8]) -> bool {
    let at = |start: usize, word: &[u8]| {
        start
            .checked_sub(2)
            .and_then(|s| sql.get(s..s + word.len()))
            .is_some_and(|w| w.eq_ignore_ascii_case(word))
    };
    memchr::memchr2_iter(b's', b'S', sql).any(|i| at(i, b"reset") || at(i, b"discard"))
        || memchr::memchr2_iter(b'f', b'F', sql).any(|i| at(i, b"default"))
        || memchr::memchr2_iter(b'z', b'Z', sql).any(|i| {
            sql.get(i..i + 4)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"zone"))
        })
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Splits `sql` into its non-empty statements (see [`super::lex`]), or `None` when it cannot
/// be sure where they end: a backslash may escape a quote when `standard_conforming_strings` is
/// off, which Sluice cannot see.
fn split(sql: &[u8], enc: Encoding) -> Option<Vec<Statement>> {
    if memchr::memchr(b'\\', sql).is_some() {
        return None;
    }
    let mut spans = super::lex::statements(sql, enc);
    let mut out = Vec::new();
    while let Some(span) = spans.next_span() {
        let terminated = sql.get(span.end) == Some(&b';');
        out.push(Statement {
            start: span.start,
            end: span.end + usize::from(terminated),
            terminated,
            kind: classify(&sql[span.clone()], enc),
        });
    }
    Some(out)
}

/// The words of a statement's text (comments between them skipped), as byte slices.
struct Words<'a> {
    text: &'a [u8],
    pos: usize,
    enc: Encoding,
}

impl<'a> Words<'a> {
    fn next_word(&mut self) -> Option<&'a [u8]> {
        let t = self.text;
        let start = super::lex::skip_space(t, self.pos, self.enc);
        let first = *t.get(start)?;
        self.pos = start + self.enc.char_len(&t[start..]);
        if first == b'"' {
            // No trailing byte of any encoding is a `"`.
            self.pos = memchr::memchr(b'"', &t[start + 1..]).map_or(t.len(), |n| start + n + 2);
        } else if first == b'=' || !is_ident(first) {
            // One punctuation character ('=', ',', a quote starting a literal...).
        } else {
            while self.pos < t.len() && (is_ident(t[self.pos]) || t[self.pos] == b'.') {
                self.pos += self.enc.char_len(&t[self.pos..]);
            }
        }
        Some(&t[start..self.pos])
    }
}

fn is(word: Option<&[u8]>, keyword: &str) -> bool {
    word.is_some_and(|w| w.eq_ignore_ascii_case(keyword.as_bytes()))
}

/// A setting's name as PostgreSQL looks it up (any case), when it is one Sluice can name in
/// `set_config`.
fn setting_name(word: &[u8]) -> Option<String> {
    let word = word
        .strip_prefix(b"\"")
        .and_then(|w| w.strip_suffix(b"\""))
        .unwrap_or(word);
    let ok = !word.is_empty()
        && word.len() <= 63
        && word
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.');
    ok.then(|| String::from_utf8_lossy(word).to_ascii_lowercase())
}

fn classify(text: &[u8], enc: Encoding) -> Kind {
    let mut w = Words { text, pos: 0, enc };
    let first = w.next_word();
    if is(first, "discard") {
        let what = w.next_word();
        return if is(what, "all") && w.next_word().is_none() {
            Kind::DiscardAll
        } else {
            Kind::Other
        };
    }
    if is(first, "reset") {
        let name = w.next_word();
        if is(name, "all") {
            return if w.next_word().is_none() {
                Kind::ResetAll
            } else {
                Kind::Other
            };
        }
        if is(name, "time") {
            return if is(w.next_word(), "zone") && w.next_word().is_none() {
                Kind::Reset("timezone".into())
            } else {
                Kind::Other
            };
        }
        // RESET ROLE and RESET SESSION AUTHORIZATION are about who the session is, not about
        // its settings: left to the general rules.
        if is(name, "role") || is(name, "session") {
            return Kind::Other;
        }
        return match (name.and_then(setting_name), w.next_word()) {
            (Some(n), None) => Kind::Reset(n),
            _ => Kind::Other,
        };
    }
    if !is(first, "set") {
        return Kind::Other;
    }
    let mut word = w.next_word();
    let mut local = false;
    if is(word, "session") {
        word = w.next_word();
    } else if is(word, "local") {
        local = true;
        word = w.next_word();
    }
    if [
        "role",
        "session",
        "transaction",
        "constraints",
        "characteristics",
    ]
    .iter()
    .any(|k| is(word, k))
    {
        return Kind::Other;
    }
    let name = if is(word, "time") {
        if !is(w.next_word(), "zone") {
            return Kind::Other;
        }
        let value = w.next_word();
        let default = (is(value, "default") || is(value, "local")) && w.next_word().is_none();
        return match (default, local) {
            (true, false) => Kind::Reset("timezone".into()),
            (true, true) => Kind::LocalDefault("timezone".into()),
            (false, false) => Kind::Set("timezone".into()),
            (false, true) => Kind::Other,
        };
    } else {
        match word.and_then(setting_name) {
            Some(n) => n,
            None => return Kind::Other,
        }
    };
    let to = w.next_word();
    if !(is(to, "to") || to == Some(b"=")) {
        return Kind::Other;
    }
    let value = w.next_word();
    let default = is(value, "default") && w.next_word().is_none();
    match (default, local) {
        (true, false) => Kind::Reset(name),
        (true, true) => Kind::LocalDefault(name),
        (false, false) => Kind::Set(name),
        (false, true) => Kind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Option<Vec<Kind>> {
        scan(sql.as_bytes(), Encoding::AsciiSafe).map(|s| s.into_iter().map(|s| s.kind).collect())
    }

    fn name(n: &str) -> Kind {
        Kind::Reset(n.into())
    }

    #[test]
    fn recognises_the_reset_statements() {
        assert_eq!(kinds("RESET ALL"), Some(vec![Kind::ResetAll]));
        assert_eq!(kinds("  reset all ; "), Some(vec![Kind::ResetAll]));
        assert_eq!(kinds("DISCARD ALL"), Some(vec![Kind::DiscardAll]));
        assert_eq!(
            kinds("/* x */ discard /* y */ all;"),
            Some(vec![Kind::DiscardAll])
        );
        assert_eq!(
            kinds("RESET application_name"),
            Some(vec![name("application_name")])
        );
        assert_eq!(kinds("RESET \"TimeZone\""), Some(vec![name("timezone")]));
        assert_eq!(kinds("reset time zone"), Some(vec![name("timezone")]));
        assert_eq!(kinds("RESET my.custom"), Some(vec![name("my.custom")]));
        assert_eq!(
            kinds("SET search_path TO DEFAULT"),
            Some(vec![name("search_path")])
        );
        assert_eq!(
            kinds("set session work_mem=default"),
            Some(vec![name("work_mem")])
        );
        assert_eq!(kinds("SET TIME ZONE LOCAL"), Some(vec![name("timezone")]));
        assert_eq!(kinds("SET TIME ZONE DEFAULT"), Some(vec![name("timezone")]));
        assert_eq!(
            kinds("SET LOCAL DateStyle = DEFAULT"),
            Some(vec![Kind::LocalDefault("datestyle".into())])
        );
    }

    #[test]
    fn prepared_statements_are_one_reset() {
        let e = Encoding::AsciiSafe;
        assert_eq!(prepared(b"DISCARD ALL", e), Some(Kind::DiscardAll));
        assert_eq!(prepared(b" reset work_mem ", e), Some(name("work_mem")));
        assert_eq!(prepared(b"SET work_mem = 1", e), None);
        assert_eq!(prepared(b"RESET ALL; RESET ALL", e), None);
        assert_eq!(prepared(b"SELECT 'RESET ALL'", e), None);
    }

    #[test]
    fn leaves_everything_else() {
        for sql in [
            "SELECT 1",
            "SELECT 'RESET ALL'",
            "SELECT 1 -- RESET ALL",
            "SELECT /* RESET ALL; */ 1",
            "SELECT $$RESET ALL$$",
            "SELECT $f$ ; RESET ALL; $f$",
            "SELECT \"reset all\"",
            "SET application_name TO 'default'",
            "SET work_mem TO DEFAULT, 1",
            "RESET ROLE",
            "RESET SESSION AUTHORIZATION",
            "SET SESSION AUTHORIZATION DEFAULT",
            "SET ROLE DEFAULT",
            "DISCARD PLANS",
            "DISCARD ALL x",
            "RESET ALL x",
            "INSERT INTO t VALUES (DEFAULT)",
            "CREATE RULE r AS ON INSERT TO t DO ALSO (SELECT 1; RESET ALL)",
            // Cannot tell where the literal ends: not split.
            "SELECT 'a\\'; RESET ALL",
            "SELECT 'unterminated; RESET ALL",
        ] {
            assert_eq!(kinds(sql), None, "{sql}");
        }
    }

    #[test]
    fn splits_multi_statement_queries() {
        let sql = "SET application_name='x'; RESET ALL; SHOW application_name";
        let s = scan(sql.as_bytes(), Encoding::AsciiSafe).unwrap();
        assert_eq!(
            s.iter().map(|s| &s.kind).collect::<Vec<_>>(),
            [
                &Kind::Set("application_name".into()),
                &Kind::ResetAll,
                &Kind::Other
            ]
        );
        assert_eq!(&sql[s[1].start..s[1].end], "RESET ALL;");
        assert!(s[1].terminated && !s[2].terminated);
        assert_eq!(s[2].end, sql.len());
        let sql = "SELECT 'it''s; x', $1, $$a;b$$, \"q;\" ;; RESET work_mem -- end";
        let s = scan(sql.as_bytes(), Encoding::AsciiSafe).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].kind, name("work_mem"));
        assert_eq!(&sql[s[1].start..s[1].end], "RESET work_mem -- end");
        // A backslash may or may not escape a quote: no resets are claimed.
        assert!(scan(b"SELECT E'\\'; RESET ALL", Encoding::AsciiSafe).is_none());
        assert!(scan(b"SELECT 'a\\'; RESET ALL", Encoding::AsciiSafe).is_none());
        assert!(scan(
            "SELECT E'\u{e9}'; RESET ALL".as_bytes(),
            Encoding::AsciiSafe
        )
        .is_some());
        // SJIS 0x83 0x5C has a backslash for its second byte: still no certainty.
        assert!(scan(b"SELECT '\x83\x5c'; RESET ALL", Encoding::Sjis).is_none());
        // JOHAB 0x88 0x3B has a `;` for its second byte: one statement, no reset.
        assert!(scan(b"SELECT 1 AS \x88\x3b RESET ALL", Encoding::Johab).is_none());
        assert!(scan(b"SELECT 1 AS \x88\x3b RESET ALL", Encoding::AsciiSafe).is_some());
        // Inside a rule's actions, a reset is the rule's, not the session's.
        assert!(scan(
            b"CREATE RULE r AS ON INSERT TO t DO (SELECT 1; RESET ALL)",
            Encoding::AsciiSafe
        )
        .is_none());
    }
}
