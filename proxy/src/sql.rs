//! Session state in transaction pooling: the startup parameters each client must see on
//! whichever server it gets, and the statements whose effects outlive a transaction, which pin
//! the client to its server (or are refused, by configuration).

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

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
pub fn startup_settings(params: &[(String, String)]) -> Result<Settings, OptionsError> {
    let mut out = Settings::new();
    for (name, value) in params {
        if name == "options" {
            parse_options(value, &mut out)?;
        } else if !NOT_SETTINGS.contains(&name.as_str()) {
            out.insert(name.to_ascii_lowercase(), value.clone());
        }
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

/// `v` as an SQL string literal.
pub fn quote_literal(v: &str) -> String {
    let escaped = v.replace('\'', "''");
    if v.contains('\\') {
        format!("E'{}'", escaped.replace('\\', "\\\\"))
    } else {
        format!("'{escaped}'")
    }
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

/// Strips leading whitespace and SQL comments.
fn skip_comments(mut s: &str) -> &str {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map(|(_, r)| r).unwrap_or("");
        } else if let Some(rest) = s.strip_prefix("/*") {
            s = rest.split_once("*/").map(|(_, r)| r).unwrap_or("");
        } else {
            return s;
        }
    }
}

/// Case-insensitive (ASCII) substring search, without allocating.
#[cfg(test)]
fn contains_ci(haystack: &str, needle: &str) -> bool {
    contains_ci_at(haystack, needle, 0)
}

/// Case-insensitive (ASCII) substring search anchored on `needle[anchor]`: only where that
/// byte (either case) occurs, found by `memchr2` many bytes at a time, is the rest compared.
/// Anchoring on a byte that is rare in SQL (`_`, `m`, `y`) makes the search of a typical query
/// a few instructions.
fn contains_ci_at(haystack: &str, needle: &str, anchor: usize) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    let Some(&a) = n.get(anchor) else {
        return n.is_empty();
    };
    let Some(last_start) = h.len().checked_sub(n.len()) else {
        return false;
    };
    let (lo, up) = (a.to_ascii_lowercase(), a.to_ascii_uppercase());
    // Offsets into this window are the candidate starts of the needle.
    memchr::memchr2_iter(lo, up, &h[anchor..=last_start + anchor])
        .any(|start| h[start..start + n.len()].eq_ignore_ascii_case(n))
}

/// Whether a statement has ` INTO TEMP ` or ` INTO TEMPORARY ` (any case): one search, anchored
/// on the `m`.
fn into_temp(s: &str) -> bool {
    const HEAD: &[u8] = b" into temp";
    let h = s.as_bytes();
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

fn starts_with_word(s: &str, word: &str) -> bool {
    // The first bytes must be the ASCII word, so slicing after them is on a char boundary.
    s.len() >= word.len()
        && s.as_bytes()[..word.len()].eq_ignore_ascii_case(word.as_bytes())
        && s[word.len()..]
            .chars()
            .next()
            .is_none_or(|c| !c.is_alphanumeric() && c != '_')
}

/// The settings a Query changes with session-level `SET name …`/`RESET name` statements, when
/// every statement in it is one of those or leaves no session state. `None` when there is none,
/// or when something else (such as `RESET ALL`) needs the full pinning rules.
pub fn set_names(sql: &str) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for stmt in sql.split(';') {
        let s = skip_comments(stmt);
        let rest = if starts_with_word(s, "set") {
            skip_comments(&s[3..])
        } else if starts_with_word(s, "reset") {
            skip_comments(&s[5..])
        } else if s.is_empty() || pins(s).is_none() {
            continue;
        } else {
            return None;
        };
        let rest = if starts_with_word(rest, "session") {
            skip_comments(&rest[7..])
        } else {
            rest
        };
        if [
            "local",
            "transaction",
            "constraints",
            "all",
            "role",
            "session",
        ]
        .iter()
        .any(|w| starts_with_word(rest, w))
        {
            if starts_with_word(rest, "local")
                || starts_with_word(rest, "transaction")
                || starts_with_word(rest, "constraints")
            {
                continue;
            }
            return None;
        }
        let name = if starts_with_word(rest, "time") {
            "timezone".to_string()
        } else {
            rest.split(|c: char| c.is_whitespace() || c == '=')
                .next()
                .unwrap_or("")
                .trim_matches('"')
                .to_ascii_lowercase()
        };
        if !valid_name(&name) {
            return None;
        }
        names.push(name);
    }
    (!names.is_empty()).then_some(names)
}

/// Finds the first statement in `sql` whose effect outlives its transaction. Every statement of
/// a multi-statement Query is looked at. Text inside quotes is not parsed, so a keyword inside a
/// string literal may pin needlessly, which is safe.
pub fn pins(sql: &str) -> Option<Pin> {
    if contains_ci_at(sql, "advisory_lock", 8)
        && (contains_ci_at(sql, "pg_advisory_lock", 2)
            || contains_ci_at(sql, "pg_try_advisory_lock", 2))
    {
        return Some(Pin::AdvisoryLock);
    }
    for stmt in sql.split(';') {
        let s = skip_comments(stmt);
        if starts_with_word(s, "set") {
            let rest = skip_comments(&s[3..]);
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
            let rest = skip_comments(&s[7..]);
            if !starts_with_word(rest, "transaction") {
                return Some(Pin::Prepare);
            }
        } else if starts_with_word(s, "load") {
            return Some(Pin::Load);
        } else if starts_with_word(s, "declare") && contains_ci_at(s, " with hold", 1) {
            return Some(Pin::HoldCursor);
        } else if starts_with_word(s, "create") {
            let mut words = s[6..].split_whitespace();
            let mut w = words.next().unwrap_or("");
            if w.eq_ignore_ascii_case("local") || w.eq_ignore_ascii_case("global") {
                w = words.next().unwrap_or("");
            }
            if w.eq_ignore_ascii_case("temp") || w.eq_ignore_ascii_case("temporary") {
                return Some(Pin::TempTable);
            }
        } else if into_temp(s) {
            return Some(Pin::TempTable);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
