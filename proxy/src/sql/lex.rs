//! SQL text as the bytes a client sends, in its own encoding: how its multibyte characters are
//! laid out, and where its statements begin and end.
//!
//! PostgreSQL converts a client's text to the server encoding before it parses it. Sluice reads
//! it unconverted, so it must know which bytes belong to a multibyte character. In UTF-8, the
//! EUC encodings, MULE_INTERNAL and every single-byte encoding each byte of a multibyte
//! character has its high bit set, so an ASCII byte is always that ASCII character. In the
//! client-only encodings SJIS, SHIFT_JIS_2004, BIG5, GBK, UHC, GB18030 and JOHAB the bytes after
//! the first can be in the ASCII range (`\`, letters, digits; in JOHAB also `;`): there a scan
//! steps over whole characters. Every non-ASCII character is a letter to the scanner, as it is to
//! PostgreSQL's (identifiers may hold any of them).
//!
//! Hand-written: the splitter runs on every Query in transaction pooling, and needs only the
//! little of PostgreSQL's lexer that finds statement boundaries.

/// How a client encoding lays out its multibyte characters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encoding {
    /// Every byte of a multibyte character has its high bit set (UTF8, EUC_*, MULE_INTERNAL,
    /// SQL_ASCII and the single-byte encodings).
    #[default]
    AsciiSafe,
    /// SJIS, SHIFT_JIS_2004: a high byte starts two bytes, except the one-byte kana 0xA1-0xDF.
    Sjis,
    /// BIG5, GBK, UHC: a high byte starts two bytes.
    TwoByte,
    /// GB18030: a high byte starts two bytes, or four when the second is a digit.
    Gb18030,
    /// JOHAB: 0x8F starts three bytes, any other high byte two.
    Johab,
}

impl Encoding {
    /// Every layout (for the tests and the fuzz targets, which try each).
    pub const ALL: [Encoding; 5] = [
        Encoding::AsciiSafe,
        Encoding::Sjis,
        Encoding::TwoByte,
        Encoding::Gb18030,
        Encoding::Johab,
    ];

    /// The layout of a `client_encoding` value (any spelling PostgreSQL accepts: case, `-` and
    /// `_` do not matter, and Windows code page aliases count).
    pub fn from_name(name: &str) -> Encoding {
        let clean: String = name
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect();
        match clean.as_str() {
            "sjis" | "shiftjis" | "mskanji" | "win932" | "windows932" | "shiftjis2004" => {
                Encoding::Sjis
            }
            "big5" | "win950" | "windows950" | "gbk" | "win936" | "windows936" | "uhc"
            | "win949" | "windows949" => Encoding::TwoByte,
            "gb18030" => Encoding::Gb18030,
            "johab" => Encoding::Johab,
            _ => Encoding::AsciiSafe,
        }
    }

    /// The length of the character starting at `s[0]` (at least 1, at most what is left).
    #[inline]
    pub fn char_len(self, s: &[u8]) -> usize {
        let Some(&b) = s.first() else {
            return 1;
        };
        if b < 0x80 {
            return 1;
        }
        let len = match self {
            Encoding::AsciiSafe => 1,
            Encoding::Sjis if (0xa1..=0xdf).contains(&b) => 1,
            Encoding::Sjis | Encoding::TwoByte => 2,
            Encoding::Gb18030 if s.get(1).is_some_and(u8::is_ascii_digit) => 4,
            Encoding::Gb18030 => 2,
            Encoding::Johab if b == 0x8f => 3,
            Encoding::Johab => 2,
        };
        len.min(s.len())
    }
}

/// Whether `b` can continue an identifier (or a dollar-quote tag, or a keyword).
#[inline]
fn ident_cont(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// The statements of a Query, split at the semicolons PostgreSQL splits at: not inside string
/// literals (standard, `E''` with backslash escapes, dollar-quoted), quoted identifiers or
/// comments (nested `/* */` too). Each is given from its first token, leading whitespace and
/// comments skipped; empty statements are left out.
pub fn statements(sql: &[u8], enc: Encoding) -> Statements<'_> {
    Statements { sql, pos: 0, enc }
}

/// See [`statements`].
pub struct Statements<'a> {
    sql: &'a [u8],
    pos: usize,
    enc: Encoding,
}

impl<'a> Iterator for Statements<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let sql = self.sql;
        self.next_span().map(|r| &sql[r])
    }
}

impl Statements<'_> {
    /// The next statement as a range of the Query's text: from its first token to its `;` (not
    /// included) or the end of the text.
    pub fn next_span(&mut self) -> Option<std::ops::Range<usize>> {
        while self.pos < self.sql.len() {
            let start = skip_space(self.sql, self.pos, self.enc);
            let end = statement_end(self.sql, start, self.enc);
            self.pos = end + 1;
            if end > start {
                return Some(start..end);
            }
        }
        None
    }
}

/// The one statement `sql` can hold, when a glance tells that it holds one at most: it has no
/// `;` byte, or a single one followed by nothing but whitespace (the statement ends there, or at
/// the text's end if that `;` is inside a comment or an unterminated literal: the lexer cannot
/// find a second statement either way). Given from its first token to that `;` or the end; an
/// empty range when the text has no statement. `None`: a second `;` or something after the
/// first, so only [`statements`] can tell.
///
/// One `memchr` instead of the lexer for the common Query of one statement. Its end may differ
/// from the lexer's in that one case; the callers' checks read a statement from its start and
/// never look for a `;` (see `crate::sql::pins`, `resets::scan`), and the tests compare their
/// answers with the lexer's.
pub(crate) fn at_most_one(sql: &[u8], enc: Encoding) -> Option<std::ops::Range<usize>> {
    let end = match memchr::memchr(b';', sql) {
        None => sql.len(),
        Some(p) if sql[p + 1..].iter().all(u8::is_ascii_whitespace) => p,
        Some(_) => return None,
    };
    // A `;` inside a leading comment is followed by the comment's end, or by whitespace only
    // when the comment runs to the end of the text: then there is no statement.
    let start = skip_space(sql, 0, enc).min(end);
    Some(start..end)
}

/// Leading whitespace and comments skipped from `at`.
pub(crate) fn skip_space(s: &[u8], mut at: usize, enc: Encoding) -> usize {
    loop {
        while s.get(at).is_some_and(u8::is_ascii_whitespace) {
            at += 1;
        }
        match (s.get(at), s.get(at + 1)) {
            (Some(b'-'), Some(b'-')) => at = line_comment_end(s, at),
            (Some(b'/'), Some(b'*')) => at = block_comment_end(s, at, enc),
            _ => return at,
        }
    }
}

/// `s` from its first token: whitespace and comments skipped.
pub fn trim_start(s: &[u8], enc: Encoding) -> &[u8] {
    &s[skip_space(s, 0, enc).min(s.len())..]
}

fn line_comment_end(s: &[u8], at: usize) -> usize {
    // No trailing byte of any encoding is a newline.
    memchr::memchr2(b'\n', b'\r', &s[at..]).map_or(s.len(), |n| at + n + 1)
}

/// The end of the `/* */` comment at `at` (they nest).
fn block_comment_end(s: &[u8], mut at: usize, enc: Encoding) -> usize {
    let mut depth = 0usize;
    while at < s.len() {
        match (s[at], s.get(at + 1)) {
            (b'/', Some(b'*')) => {
                depth += 1;
                at += 2;
            }
            (b'*', Some(b'/')) => {
                depth -= 1;
                at += 2;
                if depth == 0 {
                    return at;
                }
            }
            _ => at += enc.char_len(&s[at..]),
        }
    }
    s.len()
}

/// What the characters just before a quote were, for telling `E'...'` apart.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Before {
    /// Not part of a word.
    Space,
    /// A lone `e` or `E` starting a token.
    LoneE,
    /// Any other word.
    Word,
}

/// The index of the `;` ending the statement that starts at `at`, or the text's end.
/// A `;` inside parentheses does not end a statement: PostgreSQL's grammar reads the actions of
/// `CREATE RULE ... DO (a; b)` as one.
fn statement_end(s: &[u8], mut at: usize, enc: Encoding) -> usize {
    let mut before = Before::Space;
    let mut depth = 0usize;
    while at < s.len() {
        let b = s[at];
        let was = std::mem::replace(&mut before, Before::Space);
        match b {
            b';' if depth == 0 => return at,
            b'(' => {
                depth += 1;
                at += 1;
            }
            b')' => {
                depth = depth.saturating_sub(1);
                at += 1;
            }
            b'\'' => at = quoted_end(s, at + 1, b'\'', was == Before::LoneE, enc),
            b'"' => at = quoted_end(s, at + 1, b'"', false, enc),
            b'-' if s.get(at + 1) == Some(&b'-') => at = line_comment_end(s, at),
            b'/' if s.get(at + 1) == Some(&b'*') => at = block_comment_end(s, at, enc),
            b'$' if was == Before::Space => match dollar_tag(s, at, enc) {
                Some(tag) => at = dollar_end(s, at + tag.len(), tag),
                None => {
                    // A parameter (`$1`) or a lone `$`.
                    at += 1;
                    before = Before::Word;
                }
            },
            _ if enc == Encoding::AsciiSafe => {
                // No byte of a multibyte character is ASCII here, so the run of bytes up to the
                // next one that needs a decision is skipped at once (most of every Query).
                // `b` itself is one (a `-`, `/` or `$` that starts nothing), or none.
                let run = 1 + s[at + 1..]
                    .iter()
                    .position(|&c| DECIDES[usize::from(c)])
                    .unwrap_or(s.len() - at - 1);
                let last = s[at + run - 1];
                let before_last = if run == 1 {
                    was
                } else if ident_cont(s[at + run - 2]) {
                    Before::Word
                } else {
                    Before::Space
                };
                before = after_byte(before_last, last);
                at += run;
            }
            _ => {
                before = after_byte(was, b);
                // A multibyte character is one step: its trailing bytes are not ASCII.
                at += enc.char_len(&s[at..]);
            }
        }
    }
    s.len()
}

/// The bytes [`statement_end`] looks at one by one; the others it skips.
const DECIDES: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    let bytes = b";()'\"-/$";
    while i < bytes.len() {
        t[bytes[i] as usize] = true;
        i += 1;
    }
    t
};

/// What a character starting with `b` that is none of [`statement_end`]'s own cases leaves
/// behind, after `was`.
fn after_byte(was: Before, b: u8) -> Before {
    if !ident_cont(b) {
        Before::Space
    } else if was == Before::Space && b.eq_ignore_ascii_case(&b'e') {
        Before::LoneE
    } else {
        Before::Word
    }
}

/// The index just past the closing quote of a literal or quoted identifier whose body starts
/// at `at`; a doubled quote is one quote, and with `escapes` a backslash escapes the next
/// character.
fn quoted_end(s: &[u8], mut at: usize, quote: u8, escapes: bool, enc: Encoding) -> usize {
    while at < s.len() {
        let b = s[at];
        if b == quote {
            if s.get(at + 1) == Some(&quote) {
                at += 2;
                continue;
            }
            return at + 1;
        }
        if escapes && b == b'\\' {
            at += 1;
            if at < s.len() {
                at += enc.char_len(&s[at..]);
            }
            continue;
        }
        at += enc.char_len(&s[at..]);
    }
    s.len()
}

/// The tag (`$name$` or `$$`) of a dollar quote opening at `at`, if one does.
fn dollar_tag(s: &[u8], at: usize, enc: Encoding) -> Option<&[u8]> {
    let mut i = at + 1;
    if s.get(i).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    while i < s.len() {
        match s[i] {
            b'$' => return Some(&s[at..=i]),
            b if b.is_ascii_alphanumeric() || b == b'_' => i += 1,
            b if b >= 0x80 => i += enc.char_len(&s[i..]),
            _ => return None,
        }
    }
    None
}

/// The index just past the closing `tag` of a dollar-quoted string whose body starts at `at`.
/// Tags compare byte for byte, in the client's own bytes.
fn dollar_end(s: &[u8], at: usize, tag: &[u8]) -> usize {
    memchr::memmem::find(&s[at..], tag).map_or(s.len(), |n| at + n + tag.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// The run-skipping of the ASCII-safe layout splits ASCII text exactly as stepping
        /// one character at a time does (every layout steps ASCII one byte at a time).
        #[test]
        fn skipping_runs_splits_as_stepping_does(
            sql in proptest::collection::vec(
                proptest::sample::select(b"aeE $1;()'\"-/*\\\n_,".to_vec()),
                0..40,
            )
        ) {
            let fast: Vec<_> = statements(&sql, Encoding::AsciiSafe).collect();
            let stepped: Vec<_> = statements(&sql, Encoding::Sjis).collect();
            prop_assert_eq!(fast, stepped);
        }
    }

    fn split(sql: &[u8], enc: Encoding) -> Vec<String> {
        statements(sql, enc)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    }

    #[test]
    fn splits_where_postgresql_does() {
        let e = Encoding::AsciiSafe;
        assert_eq!(split(b"select 1; select 2", e), ["select 1", "select 2"]);
        assert_eq!(split(b"select ';'; set x=1", e), ["select ';'", "set x=1"]);
        assert_eq!(split(b"select 'it''s;'; b", e), ["select 'it''s;'", "b"]);
        assert_eq!(split(b"select E'\\';'; b", e), ["select E'\\';'", "b"]);
        assert_eq!(split(b"select e'a\\\\'; b", e), ["select e'a\\\\'", "b"]);
        // Not an E string: `e` ends a longer word.
        assert_eq!(split(b"select be'\\'; b", e), ["select be'\\'", "b"]);
        assert_eq!(
            split(b"select \"a;\"\"b\"; c", e),
            ["select \"a;\"\"b\"", "c"]
        );
        assert_eq!(split(b"select $$;$$; c", e), ["select $$;$$", "c"]);
        assert_eq!(
            split(b"select $a$ $b$; $a$; c", e),
            ["select $a$ $b$; $a$", "c"]
        );
        assert_eq!(split(b"select $1; c", e), ["select $1", "c"]);
        assert_eq!(split(b"select a$b$; c", e), ["select a$b$", "c"]);
        assert_eq!(
            split(b"-- x;\nselect 1 -- ;\n; c", e),
            ["select 1 -- ;\n", "c"]
        );
        assert_eq!(
            split(b"/* a /* ; */ ; */ select 1; c", e),
            ["select 1", "c"]
        );
        assert_eq!(split(b" ; ;; select 1;", e), ["select 1"]);
        assert_eq!(
            split(b"select 'unterminated; c", e),
            ["select 'unterminated; c"]
        );
        assert!(split(b"", e).is_empty());
        // A rule's actions in parentheses are one statement; a stray `)` changes nothing.
        assert_eq!(
            split(
                b"create rule r as on insert to t do (select 1; select 2); c",
                e
            ),
            [
                "create rule r as on insert to t do (select 1; select 2)",
                "c"
            ]
        );
        assert_eq!(split(b"select ')'; select (');'); c", e).len(), 3);
        assert_eq!(split(b"select 1); c", e), ["select 1)", "c"]);
    }

    #[test]
    fn steps_over_multibyte_characters() {
        // SJIS 0x83 0x5C is one character whose second byte is `\`: not an escape.
        let sjis = b"select E'\x83\x5c'; set x=1";
        assert_eq!(statements(sjis, Encoding::Sjis).count(), 2);
        assert_eq!(statements(sjis, Encoding::AsciiSafe).count(), 1);
        // `e` after an SJIS character ends an identifier: the string after it has no escapes.
        let word = b"select \x83\x5ce'\\'; x";
        assert_eq!(statements(word, Encoding::Sjis).count(), 2);
        // JOHAB 0x88 0x3B is one character whose second byte is `;`.
        let johab = b"select 1 as \x88\x3b select 2";
        assert_eq!(statements(johab, Encoding::Johab).count(), 1);
        assert_eq!(statements(johab, Encoding::AsciiSafe).count(), 2);
        // GB18030 four-byte characters have digits in them.
        assert_eq!(Encoding::Gb18030.char_len(b"\x81\x30\x81\x30"), 4);
        assert_eq!(Encoding::Gb18030.char_len(b"\x81\x40"), 2);
        assert_eq!(Encoding::Sjis.char_len(b"\xb1x"), 1);
        assert_eq!(Encoding::Johab.char_len(b"\x8f\xa1\xa1"), 3);
        assert_eq!(Encoding::TwoByte.char_len(b"\xa4"), 1, "cut short");
    }

    /// Arbitrary bytes, in every layout: the scanners never panic, and every statement is a
    /// piece of the text.
    #[test]
    fn any_bytes_scan_without_panicking() {
        let layouts = Encoding::ALL;
        let alphabet = b"';\"$-*/\\eEaS \n\x80\x8f\x81\xa1\xff09";
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 24) as usize;
            let text: Vec<u8> = (0..len)
                .map(|i| alphabet[((state >> (i % 8 * 8)) as usize + i) % alphabet.len()])
                .collect();
            for enc in layouts {
                let base = text.as_ptr() as usize;
                for stmt in statements(&text, enc) {
                    let at = stmt.as_ptr() as usize - base;
                    assert!(!stmt.is_empty() && at + stmt.len() <= text.len());
                }
                let _ = crate::sql::pins(&text, enc);
                let _ = crate::sql::set_names(&text, enc);
            }
        }
    }

    #[test]
    fn names_every_spelling() {
        assert_eq!(Encoding::from_name("SJIS"), Encoding::Sjis);
        assert_eq!(Encoding::from_name("Shift_JIS_2004"), Encoding::Sjis);
        assert_eq!(Encoding::from_name("win932"), Encoding::Sjis);
        assert_eq!(Encoding::from_name("BIG5"), Encoding::TwoByte);
        assert_eq!(Encoding::from_name("WIN936"), Encoding::TwoByte);
        assert_eq!(Encoding::from_name("uhc"), Encoding::TwoByte);
        assert_eq!(Encoding::from_name("GB18030"), Encoding::Gb18030);
        assert_eq!(Encoding::from_name("JOHAB"), Encoding::Johab);
        assert_eq!(Encoding::from_name("EUC_JP"), Encoding::AsciiSafe);
        assert_eq!(Encoding::from_name("UTF8"), Encoding::AsciiSafe);
        assert_eq!(Encoding::from_name("LATIN1"), Encoding::AsciiSafe);
    }
}
