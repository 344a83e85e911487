//! The scanners that read a client's SQL in transaction pooling, in every client-encoding
//! layout: `sql::pins` (state that outlives a transaction), `sql::set_names` (the settings a
//! session SET changes), `sql::ends_transaction` (statements that may commit) and
//! `prepared::statement_command` (DEALLOCATE and DISCARD ALL); and `Encoding::from_name` on
//! the `client_encoding` a server reports.
//!
//! Checks: no panic, and the answers agree with each other and with the statements the
//! splitter finds (a command that forgets statements is one lone statement, a setting name is
//! one Sluice can put in its own SQL, a commit starts some statement).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::prepared::{statement_command, StatementCommand};
use sluice::sql::{self, statements, Encoding, Pin};

const LAYOUTS: [Encoding; 5] = Encoding::ALL;

fuzz_target!(|sql: &[u8]| {
    let _ = Encoding::from_name(&String::from_utf8_lossy(sql));
    for enc in LAYOUTS {
        scan(sql, enc);
    }
});

fn starts_ci(s: &[u8], word: &[u8]) -> bool {
    s.get(..word.len())
        .is_some_and(|h| h.eq_ignore_ascii_case(word))
}

fn scan(sql: &[u8], enc: Encoding) {
    let stmts: Vec<&[u8]> = statements(sql, enc).collect();
    let pin = sql::pins(sql, enc);
    match pin {
        Some(Pin::AdvisoryLock) => {
            let lower = sql.to_ascii_lowercase();
            assert!(lower.windows(13).any(|w| w == b"advisory_lock"));
        }
        Some(_) => assert!(!stmts.is_empty()),
        None => {}
    }
    if let Some(names) = sql::set_names(sql, enc) {
        assert!(!names.is_empty());
        for name in &names {
            assert!(sql::valid_name(name), "{name:?}");
        }
        // Settings changed by a SET: that statement pins, when not inside a block.
        assert!(matches!(pin, Some(Pin::Set | Pin::AdvisoryLock)), "{pin:?}");
    }
    if sql::ends_transaction(sql, enc) {
        assert!(stmts
            .iter()
            .any(|s| starts_ci(s, b"commit") || starts_ci(s, b"end") || starts_ci(s, b"prepare")));
    }
    match statement_command(sql, enc) {
        StatementCommand::Other => {}
        StatementCommand::ForgetAll | StatementCommand::Forget(_) => {
            assert_eq!(stmts.len(), 1);
            assert!(starts_ci(stmts[0], b"deallocate") || starts_ci(stmts[0], b"discard"));
        }
    }
}
