//! Session state in transaction pooling: the startup parameters each client must see on
//! whichever server it gets, and the statements whose effects outlive a transaction, which pin
//! the client to its server (or are refused, by configuration).

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

mod lex;
pub mod resets;

pub use self::lex::{statements, trim_start, Encoding};
pub use crate::settings::Settings;

/// Why the `options` startup parameter could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("\"-c\" in options needs name=value")]
    MissingPair,
    #[error("unsupported startup option \"{0}\": only -c name=value is supported")]
    Unsupported(String),
    #[error("startup option \"{0}\" is not name=value")]
    NotNameValue(String),
}

/// The settings a StartupMessage asks for, including `-c name=value` (and `--name=value`) pairs
/// in `options`. Errors name what could not be understood.
///
/// A client that names no `application_name` gets PostgreSQL's default for it, the empty
/// string, as it would directly: not the server connection's own (`sluice`).
pub fn startup_settings(params: &[(String, String)]) -> Result<Settings, OptionsError> {
    let mut out = Settings::new();
    for (name, value) in params {
        if name == "options" {
            parse_options(value, &mut out)?;
        } else if !NOT_SETTINGS.contains(&name.as_str()) {
            out.insert(name.to_ascii_lowercase(), value.clone());
        }
    }
    if !out.contains_key("application_name") {
        out.insert("application_name".into(), String::new());
    }
    Ok(out)
}

/// Splits `options` like PostgreSQL: whitespace separates, backslash escapes.
fn parse_options(options: &str, out: &mut Settings) -> Result<(), OptionsError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let pair = if w == "-c" {
            it.next().ok_or(OptionsError::MissingPair)?
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_string()
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_string()
        } else {
            return Err(OptionsError::Unsupported(w));
        };
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| OptionsError::NotNameValue(pair.clone()))?;
        out.insert(
            name.trim().to_ascii_lowercase().replace('-', "_"),
            value.to_string(),
        );
    }
    Ok(())
}

/// Whether a setting name is safe to put in a SET statement unquoted.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// SQL that takes a server from `have` to `want`: `set_config` for what differs (it parses
/// values as the startup packet and the configuration file do, so list settings such as
/// `search_path = a,b` keep their meaning) and `RESET` for settings the client did not ask for.
pub fn settings_sql(want: &Settings, have: &Settings) -> String {
    if want == have {
        return String::new();
    }
    let mut calls = Vec::new();
    for (name, value) in want.iter() {
        if have.get(name) != Some(value) {
            calls.push(format!(
                "set_config({}, {}, false)",
                quote_literal(name),
                quote_literal(value)
            ));
        }
    }
    let mut sql = if calls.is_empty() {
        String::new()
    } else {
        format!("SELECT {};", calls.join(", "))
    };
    for name in have.keys() {
        if !want.contains_key(name) {
            sql.push_str(&format!("RESET {name};"));
        }
    }
    sql
}

/// A query reading the current values of `names` (valid names), each as hex of its UTF-8
/// bytes: the row comes back in the session's `client_encoding`, which may be the client's.
pub fn read_back_sql(names: &[String]) -> String {
    let list = names
        .iter()
        .map(|n| format!("encode(convert_to(current_setting('{n}'), 'UTF8'), 'hex')"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("SELECT {list}")
}

/// A value read by [`read_back_sql`]: pairs of hex digits, nothing else (`u8::from_str_radix`
/// would take `+f` for `0f`).
pub fn read_back_value(hex: &str) -> Option<String> {
    let digits = hex.as_bytes();
    if digits.len() % 2 != 0 {
        return None;
    }
    let digit = |b: u8| char::from(b).to_digit(16);
    let bytes = digits
        .chunks(2)
        .map(|pair| u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// A string literal of only ASCII bytes: the server reads Sluice's own SQL in whatever
/// `client_encoding` the session has, so anything else is a Unicode escape of an `E''` string.
pub fn quote_literal(v: &str) -> String {
    use std::fmt::Write as _;
    if v.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'\\') {
        return format!("'{}'", v.replace('\'', "''"));
    }
    let mut out = String::with_capacity(v.len() + 8);
    out.push_str("E'");
    for c in v.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if u32::from(c) <= 0xffff => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\U{:08x}", u32::from(c));
            }
        }
    }
    out.push('\'');
    out
}

/// State a statement leaves behind after its transaction ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    Set,
    Listen,
    AdvisoryLock,
    TempTable,
    HoldCursor,
    Prepare,
    Load,
}

impl Pin {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Pin::Set => "set",
            Pin::Listen => "listen",
            Pin::AdvisoryLock => "advisory_lock",
            Pin::TempTable => "temp_table",
            Pin::HoldCursor => "with_hold_cursor",
            Pin::Prepare => "sql_prepare",
            Pin::Load => "load",
        }
    }

    /// The statement, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Pin::Set => "a session-level SET or RESET",
            Pin::Listen => "LISTEN",
            Pin::AdvisoryLock => "a session-level advisory lock",
            Pin::TempTable => "a temporary table",
            Pin::HoldCursor => "a cursor WITH HOLD",
            Pin::Prepare => "SQL-level PREPARE",
            Pin::Load => "LOAD",
        }
    }

    /// What to do instead, for the error in `reject` mode.
    pub fn advice(self) -> &'static str {
        match self {
            Pin::Set => "use SET LOCAL inside a transaction, or set it in the connection's startup parameters (options=-c name=value)",
            Pin::Listen => "use a database in session pooling mode for LISTEN",
            Pin::AdvisoryLock => "use pg_advisory_xact_lock, which is released at the end of the transaction",
            Pin::TempTable => "create the temporary table with ON COMMIT DROP inside a transaction, or use a regular table",
            Pin::HoldCursor => "declare the cursor WITHOUT HOLD inside a transaction",
            Pin::Prepare => "use protocol-level prepared statements (your driver's prepare), which Sluice carries across connections",
            Pin::Load => "load the library with shared_preload_libraries or session_preload_libraries on the server",
        }
    }
}

/// Case-insensitive (ASCII) substring search, without allocating.
#[cfg(test)]
fn contains_ci(haystack: &[u8], needle: &str) -> bool {
    contains_ci_at(haystack, needle, 0)
}

/// Case-insensitive (ASCII) substring search anchored on `needle[anchor]`: only where that
/// byte (either case) occurs, found by `memchr2` many bytes at a time, is the rest compared.
/// Anchoring on a byte that is rare in SQL (`_`, `m`, `y`) makes the search of a typical query
/// a few instructions. (A match may include trailing bytes of multibyte characters in some
/// encodings: it can only make a statement pin needlessly.)
fn contains_ci_at(h: &[u8], needle: &str, anchor: usize) -> bool {
    let n = needle.as_bytes();
    let Some(&a) = n.get(anchor) else {
        return n.is_empty();
    };
    let Some(last_start) = h.len().checked_sub(n.len()) else {
        return false;
    };
    let (lo, up) = (a.to_ascii_lowercase(), a.to_ascii_uppercase());
    // Offsets into this window are the candidate starts of the needle.
    let window = &h[anchor..=last_start + anchor];
    let matches = |start: usize| h[start..start + n.len()].eq_ignore_ascii_case(n);
    if lo == up {
        memchr::memchr_iter(a, window).any(matches)
    } else {
        memchr::memchr2_iter(lo, up, window).any(matches)
    }
}

/// Whether a statement has ` INTO TEMP ` or ` INTO TEMPORARY ` (any case): one search, anchored
/// on the `m`.
fn into_temp(h: &[u8]) -> bool {
    const HEAD: &[u8] = b" into temp";
    let Some(last_start) = h.len().checked_sub(HEAD.len()) else {
        return false;
    };
    memchr::memchr2_iter(b'm', b'M', &h[8..=last_start + 8]).any(|start| {
        let rest = &h[start + HEAD.len()..];
        h[start..start + HEAD.len()].eq_ignore_ascii_case(HEAD)
            && (rest.first() == Some(&b' ')
                || rest
                    .get(..6)
                    .is_some_and(|r| r.eq_ignore_ascii_case(b"orary ")))
    })
}

/// Whether `s` starts with the keyword `word` (any case) as a whole word.
fn starts_with_word(s: &[u8], word: &str) -> bool {
    let w = word.as_bytes();
    s.len() >= w.len()
        && s[..w.len()].eq_ignore_ascii_case(w)
        // Any non-ASCII byte continues an identifier, as in PostgreSQL's lexer.
        && s
            .get(w.len())
            .is_none_or(|&b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80))
}

/// `s` after its first `n` bytes, from the next token.
fn after(s: &[u8], n: usize, enc: Encoding) -> &[u8] {
    lex::trim_start(&s[n.min(s.len())..], enc)
}

/// The settings a Query changes with session-level `SET name …`/`RESET name` statements, when
/// every statement in it is one of those or leaves no session state. `None` when there is none,
/// or when something else (such as `RESET ALL`) needs the full pinning rules.
pub fn set_names(sql: &[u8], enc: Encoding) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for s in lex::statements(sql, enc) {
        let rest = if starts_with_word(s, "set") {
            after(s, 3, enc)
        } else if starts_with_word(s, "reset") {
            after(s, 5, enc)
        } else if pin_of(s, enc).is_none() && !advisory_lock(s) {
            continue;
        } else {
            return None;
        };
        let rest = if starts_with_word(rest, "session") {
            after(rest, 7, enc)
        } else {
            rest
        };
        if ["local", "transaction", "constraints"]
            .iter()
            .any(|w| starts_with_word(rest, w))
        {
            continue;
        }
        if ["all", "role", "session", "authorization"]
            .iter()
            .any(|w| starts_with_word(rest, w))
        {
            return None;
        }
        let name = if starts_with_word(rest, "time") {
            "timezone".to_string()
        } else {
            let end = rest
                .iter()
                .position(|&b| b.is_ascii_whitespace() || b == b'=' || b == b';')
                .unwrap_or(rest.len());
            let raw = &rest[..end];
            let raw = raw
                .strip_prefix(b"\"")
                .and_then(|r| r.strip_suffix(b"\""))
                .unwrap_or(raw);
            String::from_utf8_lossy(raw).to_ascii_lowercase()
        };
        if !valid_name(&name) {
            return None;
        }
        names.push(name);
    }
    (!names.is_empty()).then_some(names)
}

/// Whether a statement of `sql` may commit a transaction block: `COMMIT`, `END`, `COMMIT
/// PREPARED` (and `PREPARE TRANSACTION`, whose outcome is as open).
pub fn ends_transaction(sql: &[u8], enc: Encoding) -> bool {
    lex::statements(sql, enc).any(|s| {
        starts_with_word(s, "commit")
            || starts_with_word(s, "end")
            || (starts_with_word(s, "prepare") && starts_with_word(after(s, 7, enc), "transaction"))
    })
}

fn advisory_lock(sql: &[u8]) -> bool {
    contains_ci_at(sql, "advisory_lock", 8)
        && (contains_ci_at(sql, "pg_advisory_lock", 2)
            || contains_ci_at(sql, "pg_try_advisory_lock", 2))
}

/// Finds the first statement in `sql` (bytes in the client's encoding `enc`) whose effect
/// outlives its transaction. Every statement of a multi-statement Query is looked at, split
/// where PostgreSQL splits them. A session-level advisory lock is found anywhere in the text,
/// so one named inside a string literal pins needlessly, which is safe.
pub fn pins(sql: &[u8], enc: Encoding) -> Option<Pin> {
    if advisory_lock(sql) {
        return Some(Pin::AdvisoryLock);
    }
    if let Some(one) = lex::at_most_one(sql, enc) {
        return (!one.is_empty()).then(|| pin_of(&sql[one], enc)).flatten();
    }
    lex::statements(sql, enc).find_map(|s| pin_of(s, enc))
}

/// [`pins`] without [`lex::at_most_one`]: the lexer always splits (for the tests, which compare
/// the two).
#[cfg(test)]
fn pins_by_lexer(sql: &[u8], enc: Encoding) -> Option<Pin> {
    if advisory_lock(sql) {
        return Some(Pin::AdvisoryLock);
    }
    lex::statements(sql, enc).find_map(|s| pin_of(s, enc))
}

/// What one statement (from its first token) leaves behind, advisory locks aside.
fn pin_of(s: &[u8], enc: Encoding) -> Option<Pin> {
    if starts_with_word(s, "set") {
        let rest = after(s, 3, enc);
        let transaction_scoped = ["local", "transaction", "constraints"]
            .iter()
            .any(|w| starts_with_word(rest, w));
        if !transaction_scoped {
            return Some(Pin::Set);
        }
    } else if starts_with_word(s, "reset") {
        return Some(Pin::Set);
    } else if starts_with_word(s, "listen") {
        return Some(Pin::Listen);
    } else if starts_with_word(s, "prepare") {
        if !starts_with_word(after(s, 7, enc), "transaction") {
            return Some(Pin::Prepare);
        }
    } else if starts_with_word(s, "load") {
        return Some(Pin::Load);
    } else if starts_with_word(s, "declare") && contains_ci_at(s, " with hold", 1) {
        return Some(Pin::HoldCursor);
    } else if starts_with_word(s, "create") {
        let mut rest = after(s, 6, enc);
        if starts_with_word(rest, "local") {
            rest = after(rest, 5, enc);
        } else if starts_with_word(rest, "global") {
            rest = after(rest, 6, enc);
        }
        if starts_with_word(rest, "temp") || starts_with_word(rest, "temporary") {
            return Some(Pin::TempTable);
        }
    } else if into_temp(s) {
        return Some(Pin::TempTable);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Pieces of SQL that the scanners decide on, for texts made of them.
    const PIECES: &[&[u8]] = &[
        b"select 1",
        b"SET x = 1",
        b"set local x to 2",
        b"RESET ALL",
        b"reset x",
        b"discard all",
        b"set time zone default",
        b"LISTEN c",
        b"create temp table t()",
        b" into temp ",
        b" INTO TEMPORARY ",
        b"declare c cursor with hold for",
        b"prepare p as",
        b"PREPARE TRANSACTION",
        b"load",
        b"pg_advisory_lock(1)",
        b";",
        b"; ",
        b" ",
        b"\n",
        b"\t",
        b"--",
        b"/*",
        b"*/",
        b"'",
        b"\"",
        b"$$",
        b"$a$",
        b"(",
        b")",
        b"e'",
        b"\\",
        b"x",
        b"\x88",
        b"\x83",
        b"\xe9",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// The glance of `lex::at_most_one` answers as the lexer does: the same pins, the same
        /// resets, in every layout.
        #[test]
        fn one_statement_glance_answers_as_the_lexer(
            picks in proptest::collection::vec(0..PIECES.len(), 0..10)
        ) {
            let sql: Vec<u8> = picks.iter().flat_map(|&i| PIECES[i].iter().copied()).collect();
            for enc in Encoding::ALL {
                prop_assert_eq!(crate::sql::pins(&sql, enc), pins_by_lexer(&sql, enc));
                prop_assert_eq!(resets::scan(&sql, enc), resets::scan_by_lexer(&sql, enc));
            }
        }
    }

    // The scanners over UTF-8 text (other encodings: `lex` and the integration tests).
    fn pins(s: &str) -> Option<Pin> {
        crate::sql::pins(s.as_bytes(), Encoding::AsciiSafe)
    }
    fn set_names(s: &str) -> Option<Vec<String>> {
        crate::sql::set_names(s.as_bytes(), Encoding::AsciiSafe)
    }
    fn contains_ci(h: &str, n: &str) -> bool {
        crate::sql::contains_ci(h.as_bytes(), n)
    }
    fn contains_ci_at(h: &str, n: &str, anchor: usize) -> bool {
        crate::sql::contains_ci_at(h.as_bytes(), n, anchor)
    }

    #[test]
    fn startup_settings_include_options() {
        let params = vec![
            ("user".to_string(), "u".to_string()),
            ("TimeZone".to_string(), "UTC".to_string()),
            (
                "options".to_string(),
                "-c search_path=a,b --statement-timeout=5s -cwork_mem=64MB -c x.y=a\\ b"
                    .to_string(),
            ),
        ];
        let s = startup_settings(&params).unwrap();
        assert_eq!(s["timezone"], "UTC");
        assert_eq!(s["search_path"], "a,b");
        assert_eq!(s["statement_timeout"], "5s");
        assert_eq!(s["work_mem"], "64MB");
        assert_eq!(s["x.y"], "a b");
        assert!(!s.contains_key("user"));
        assert!(startup_settings(&[("options".into(), "-x".into())]).is_err());
        assert!(startup_settings(&[("options".into(), "-c".into())]).is_err());
    }

    #[test]
    fn options_errors_say_what_is_wrong() {
        let err = |o: &str| {
            startup_settings(&[("options".into(), o.into())])
                .unwrap_err()
                .to_string()
        };
        assert_eq!(err("-c"), "\"-c\" in options needs name=value");
        assert_eq!(
            err("-x"),
            "unsupported startup option \"-x\": only -c name=value is supported"
        );
        assert_eq!(err("-c a"), "startup option \"a\" is not name=value");
    }

    #[test]
    fn settings_stay_sorted_and_compare_by_content() {
        let mut a = Settings::new();
        a.insert("work_mem".into(), "4MB".into());
        a.insert("application_name".into(), "x".into());
        a.insert("work_mem".into(), "8MB".into());
        assert_eq!(
            a.keys().map(String::as_str).collect::<Vec<_>>(),
            ["application_name", "work_mem"]
        );
        assert_eq!(a.get("work_mem").map(String::as_str), Some("8MB"));
        assert!(a.contains_key("application_name") && !a.contains_key("search_path"));
        let b: Settings = [
            ("work_mem".to_string(), "8MB".to_string()),
            ("application_name".to_string(), "x".to_string()),
        ]
        .into();
        assert_eq!(a, b);
        a.clear();
        assert!(a.is_empty() && a != b);
    }

    #[test]
    fn contains_ci_finds_any_case_anywhere() {
        assert!(contains_ci("SELECT pg_Advisory_Lock(1)", "advisory_lock"));
        assert!(contains_ci("advisory_lock", "ADVISORY_LOCK"));
        assert!(contains_ci("xx aDVISORY_LOCK", "advisory_lock"));
        assert!(!contains_ci("advisory_loc", "advisory_lock"));
        assert!(!contains_ci("a a a advisory lock", "advisory_lock"));
        assert!(contains_ci("select 1 into TEMP t", " into temp "));
        assert!(!contains_ci("", "x"));
        assert!(contains_ci("x", ""));
        assert!(contains_ci("é advisory_lock é", "advisory_lock"));
        for anchor in 0..13 {
            assert!(contains_ci_at("x Advisory_Lock(", "advisory_lock", anchor));
            assert!(contains_ci_at("advisory_lock", "advisory_lock", anchor));
            assert!(!contains_ci_at("advisory_loc", "advisory_lock", anchor));
            assert!(!contains_ci_at("dvisory_lock", "advisory_lock", anchor));
        }
        assert!(contains_ci_at(
            "SELECT 1 INTO TEMPORARY t",
            " into temporary ",
            15
        ));
        assert!(!contains_ci_at("SELECT 1 INTO t", " into temporary ", 15));
    }

    #[test]
    fn values_read_back_as_hex() {
        assert_eq!(
            read_back_sql(&["work_mem".into(), "timezone".into()]),
            "SELECT encode(convert_to(current_setting('work_mem'), 'UTF8'), 'hex'), \
             encode(convert_to(current_setting('timezone'), 'UTF8'), 'hex')"
        );
        assert_eq!(read_back_value("636166c3a9").as_deref(), Some("café"));
        assert_eq!(read_back_value("").as_deref(), Some(""));
        assert_eq!(read_back_value("6"), None);
        assert_eq!(read_back_value("zz"), None);
        assert_eq!(read_back_value("ff"), None);
        // A sign is not a digit (found by the `backend` fuzz target).
        assert_eq!(read_back_value("+6"), None);
        assert_eq!(read_back_value("6+61"), None);
        assert_eq!(read_back_value("4A").as_deref(), Some("J"));
    }

    #[test]
    fn settings_sql_applies_the_difference() {
        let want: Settings = [
            ("timezone".to_string(), "UTC".to_string()),
            ("application_name".to_string(), "o'k".to_string()),
        ]
        .into();
        let have: Settings = [
            ("timezone".to_string(), "UTC".to_string()),
            ("search_path".to_string(), "x".to_string()),
        ]
        .into();
        assert_eq!(
            settings_sql(&want, &have),
            "SELECT set_config('application_name', 'o''k', false);RESET search_path;"
        );
        assert_eq!(settings_sql(&want, &want), "");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
        assert_eq!(
            quote_literal("caf\u{e9} \u{1f600}'"),
            "E'caf\\u00e9 \\U0001f600'''"
        );
    }

    #[test]
    fn finds_the_settings_a_set_changes() {
        assert_eq!(
            set_names("SET work_mem = '9MB'"),
            Some(vec!["work_mem".to_string()])
        );
        assert_eq!(
            set_names("set session search_path to a, b; RESET statement_timeout"),
            Some(vec!["search_path".into(), "statement_timeout".into()])
        );
        assert_eq!(
            set_names("SET TIME ZONE 'UTC'"),
            Some(vec!["timezone".to_string()])
        );
        assert_eq!(set_names("SET LOCAL work_mem = '1MB'"), None);
        assert_eq!(set_names("RESET ALL"), None);
        assert_eq!(set_names("SET ROLE admin"), None);
        assert_eq!(set_names("SELECT 1"), None);
        assert_eq!(set_names("SET work_mem = '9MB'; LISTEN x"), None);
        assert_eq!(set_names("SET SESSION AUTHORIZATION u"), None);
        assert_eq!(
            set_names("SET work_mem = ';'; SELECT ';'"),
            Some(vec!["work_mem".to_string()])
        );
    }

    #[test]
    fn finds_statements_that_may_commit() {
        let commits = |s: &str| ends_transaction(s.as_bytes(), Encoding::AsciiSafe);
        assert!(commits("COMMIT"));
        assert!(commits("insert into t values (1); end"));
        assert!(commits("/* c */ commit prepared 'x'"));
        assert!(commits("PREPARE TRANSACTION 'x'"));
        assert!(!commits("ROLLBACK"));
        assert!(!commits("SELECT 'commit'"));
        assert!(!commits("PREPARE p AS SELECT 1"));
        assert!(!commits("SELECT endpoint FROM t"));
    }

    #[test]
    fn detects_state_that_outlives_a_transaction() {
        assert_eq!(pins("SET search_path = x"), Some(Pin::Set));
        assert_eq!(
            pins("  /* c */ set session timezone to 'UTC'"),
            Some(Pin::Set)
        );
        assert_eq!(pins("select 1; RESET ALL"), Some(Pin::Set));
        assert_eq!(pins("SET LOCAL search_path = x"), None);
        assert_eq!(pins("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"), None);
        assert_eq!(pins("set constraints all deferred"), None);
        assert_eq!(pins("LISTEN chan"), Some(Pin::Listen));
        assert_eq!(pins("SELECT pg_advisory_lock(1)"), Some(Pin::AdvisoryLock));
        assert_eq!(
            pins("SELECT pg_try_advisory_lock_shared(1)"),
            Some(Pin::AdvisoryLock)
        );
        assert_eq!(pins("SELECT pg_advisory_xact_lock(1)"), None);
        assert_eq!(pins("CREATE TEMP TABLE t (a int)"), Some(Pin::TempTable));
        assert_eq!(
            pins("create local temporary table t (a int)"),
            Some(Pin::TempTable)
        );
        assert_eq!(pins("SELECT * INTO TEMP t FROM x"), Some(Pin::TempTable));
        assert_eq!(pins("CREATE TABLE temp (a int)"), None);
        assert_eq!(
            pins("DECLARE c CURSOR WITH HOLD FOR SELECT 1"),
            Some(Pin::HoldCursor)
        );
        assert_eq!(pins("DECLARE c CURSOR FOR SELECT 1"), None);
        assert_eq!(pins("PREPARE p AS SELECT 1"), Some(Pin::Prepare));
        assert_eq!(pins("PREPARE TRANSACTION 'x'"), None);
        assert_eq!(pins("LOAD 'auto_explain'"), Some(Pin::Load));
        assert_eq!(pins("SELECT settings FROM t"), None);
        assert_eq!(pins("UPDATE t SET a = 1"), None);
        assert_eq!(pins("séléct 'ü'; sé"), None);
        // Statements split where PostgreSQL splits them.
        assert_eq!(pins("SELECT 'a; SET x = 1'"), None);
        assert_eq!(pins("SELECT $$;$$; LISTEN x"), Some(Pin::Listen));
        assert_eq!(pins("SELECT 1 /* ; */; /* c */ LOAD 'x'"), Some(Pin::Load));
        assert_eq!(pins("SETé = 1"), None);
    }
}
