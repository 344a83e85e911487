//! SQLSTATE codes: the [`SqlState`] type, and the codes Sluice answers with.
//!
//! A code is five characters, digits and upper-case letters; its first two are its class.
//! Sluice's own errors use the constants below; a server's error keeps whatever code the server
//! sent ([`SqlState::parse`]).
//!
//! See <https://www.postgresql.org/docs/current/errcodes-appendix.html>.

use std::fmt;

/// A five-character SQLSTATE code.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState([u8; 5]);

impl SqlState {
    /// A code received from a peer; `None` unless it is five ASCII digits or upper-case
    /// letters.
    pub fn parse(code: &str) -> Option<SqlState> {
        let bytes: [u8; 5] = code.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
            .then_some(SqlState(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Always ASCII: the constants below are, and `parse` checks.
        std::str::from_utf8(&self.0).unwrap_or("XX000")
    }

    /// The class: the first two characters (`"08"` for connection exceptions).
    pub fn class(&self) -> &str {
        self.as_str().get(..2).unwrap_or("XX")
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// For [`super::backend::ErrorFields`], which carries codes as text.
impl From<SqlState> for String {
    fn from(code: SqlState) -> String {
        code.as_str().to_owned()
    }
}

impl fmt::Debug for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SqlState({})", self.as_str())
    }
}

pub const CONNECTION_EXCEPTION: SqlState = SqlState(*b"08000");
pub const SERVER_REJECTED_CONNECTION: SqlState = SqlState(*b"08004");
pub const CONNECTION_FAILURE: SqlState = SqlState(*b"08006");
pub const TRANSACTION_RESOLUTION_UNKNOWN: SqlState = SqlState(*b"08007");
pub const PROTOCOL_VIOLATION: SqlState = SqlState(*b"08P01");
pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState(*b"0A000");
pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: SqlState = SqlState(*b"25P03");
pub const INVALID_AUTHORIZATION_SPECIFICATION: SqlState = SqlState(*b"28000");
pub const INVALID_PASSWORD: SqlState = SqlState(*b"28P01");
pub const INVALID_CATALOG_NAME: SqlState = SqlState(*b"3D000");
pub const SYNTAX_ERROR: SqlState = SqlState(*b"42601");
pub const DUPLICATE_PREPARED_STATEMENT: SqlState = SqlState(*b"42P05");
pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState(*b"42501");
pub const INVALID_NAME: SqlState = SqlState(*b"42602");
pub const TOO_MANY_CONNECTIONS: SqlState = SqlState(*b"53300");
pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState(*b"54000");
pub const QUERY_CANCELED: SqlState = SqlState(*b"57014");
pub const ADMIN_SHUTDOWN: SqlState = SqlState(*b"57P01");
pub const CRASH_SHUTDOWN: SqlState = SqlState(*b"57P02");
pub const CANNOT_CONNECT_NOW: SqlState = SqlState(*b"57P03");
pub const IDLE_SESSION_TIMEOUT: SqlState = SqlState(*b"57P05");
pub const INTERNAL_ERROR: SqlState = SqlState(*b"XX000");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_spell_postgresql_codes() {
        for (code, text) in [
            (CONNECTION_EXCEPTION, "08000"),
            (SERVER_REJECTED_CONNECTION, "08004"),
            (CONNECTION_FAILURE, "08006"),
            (TRANSACTION_RESOLUTION_UNKNOWN, "08007"),
            (PROTOCOL_VIOLATION, "08P01"),
            (FEATURE_NOT_SUPPORTED, "0A000"),
            (IDLE_IN_TRANSACTION_SESSION_TIMEOUT, "25P03"),
            (INVALID_AUTHORIZATION_SPECIFICATION, "28000"),
            (INVALID_PASSWORD, "28P01"),
            (INVALID_CATALOG_NAME, "3D000"),
            (SYNTAX_ERROR, "42601"),
            (DUPLICATE_PREPARED_STATEMENT, "42P05"),
            (INSUFFICIENT_PRIVILEGE, "42501"),
            (INVALID_NAME, "42602"),
            (TOO_MANY_CONNECTIONS, "53300"),
            (PROGRAM_LIMIT_EXCEEDED, "54000"),
            (QUERY_CANCELED, "57014"),
            (ADMIN_SHUTDOWN, "57P01"),
            (CRASH_SHUTDOWN, "57P02"),
            (CANNOT_CONNECT_NOW, "57P03"),
            (IDLE_SESSION_TIMEOUT, "57P05"),
            (INTERNAL_ERROR, "XX000"),
        ] {
            assert_eq!(code.as_str(), text);
            assert_eq!(SqlState::parse(text), Some(code));
        }
        assert_eq!(PROTOCOL_VIOLATION.class(), "08");
        assert_eq!(PROTOCOL_VIOLATION.to_string(), "08P01");
    }

    #[test]
    fn parse_takes_any_well_formed_code() {
        assert_eq!(
            SqlState::parse("22023").map(|c| c.to_string()).as_deref(),
            Some("22023")
        );
        for bad in ["", "2202", "220233", "2202a", "22 23", "22\u{e9}3"] {
            assert_eq!(SqlState::parse(bad), None, "{bad:?}");
        }
    }
}
