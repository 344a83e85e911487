//! The statement splitter (`sql::statements`, `sql/lex.rs`) over a Query's text, in every
//! client-encoding layout: it decides which statements of a multi-statement Query pin a
//! session, so a wrong cut is a leak of session state.
//!
//! Checks, per layout: statements are non-empty pieces of the input, in order, not
//! overlapping, each starting at a token and followed by `;` or the end; what lies between
//! them holds no statement; each statement split alone is itself; and the statements joined
//! with `;` split back into the same statements.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::sql::{statements, trim_start, Encoding};

const LAYOUTS: [Encoding; 5] = Encoding::ALL;

fuzz_target!(|sql: &[u8]| {
    for enc in LAYOUTS {
        split(sql, enc);
    }
});

fn split(sql: &[u8], enc: Encoding) {
    if !sql.is_empty() {
        let n = enc.char_len(sql);
        assert!((1..=sql.len()).contains(&n));
    }
    let trimmed = trim_start(sql, enc);
    assert!(sql.ends_with(trimmed));

    let base = sql.as_ptr() as usize;
    let mut next_free = 0;
    let mut found = Vec::new();
    for stmt in statements(sql, enc) {
        let at = stmt.as_ptr() as usize - base;
        let end = at + stmt.len();
        assert!(
            !stmt.is_empty() && at >= next_free && end <= sql.len(),
            "{at}..{end}"
        );
        assert!(
            sql.get(end).is_none_or(|&b| b == b';'),
            "cut at {end}, not at a ';'"
        );
        assert_eq!(trim_start(stmt, enc), stmt, "does not start at a token");
        // Between statements: only separators, whitespace and comments.
        let gap = &sql[next_free..at];
        assert_eq!(statements(gap, enc).count(), 0, "a statement in {gap:?}");
        // A statement holds no statement boundary of its own.
        assert_eq!(statements(stmt, enc).collect::<Vec<_>>(), [stmt]);
        found.push(stmt);
        next_free = end + 1;
    }
    let tail = sql.get(next_free..).unwrap_or_default();
    assert_eq!(statements(tail, enc).count(), 0, "a statement in the tail");

    let joined = found.join(&b';');
    assert_eq!(statements(&joined, enc).collect::<Vec<_>>(), found);
}
