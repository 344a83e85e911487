//! The errors clients are told about: [`PgError`], one type for every ErrorResponse Sluice
//! sends, whether the error is Sluice's own or a server's passed on.
//!
//! Each carries what the client reads (severity, SQLSTATE, message, detail, hint: client-safe
//! text only; internal details go to the logs), which [`Side`] failed, and a [`PgError::kind`]
//! for metrics. [`PgError::encode`] is the one place such an error becomes ErrorResponse bytes.
//!
//! See <https://www.postgresql.org/docs/current/protocol-error-fields.html>.

use bytes::BytesMut;

use crate::protocol::backend::{tag, ErrorFields, Out};
pub use crate::protocol::sqlstate::{self, SqlState};

/// How bad an error is for the client's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement (or request) failed; the connection goes on.
    Error,
    /// The connection ends after this error.
    Fatal,
}

impl Severity {
    /// As the `S` and `V` fields spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Which side of Sluice an error comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client: it broke the protocol, failed authentication, asked for something Sluice
    /// does not allow, or stayed idle too long.
    Client,
    /// The database server: it refused or failed, or could not be reached.
    Server,
    /// Sluice itself: a limit, shutdown, or an internal error.
    Sluice,
}

impl Side {
    /// A metric label: `client`, `server` or `sluice`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
            Side::Sluice => "sluice",
        }
    }
}

/// An error for a client, as an ErrorResponse will tell it.
///
/// Built with [`PgError::error`], [`PgError::fatal`] or [`PgError::protocol_violation`] (Sluice's
/// own, [`Side::Sluice`] unless [`PgError::with_side`] says otherwise), or
/// [`PgError::from_server`] for a server's error; `with_*` add the rest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PgError {
    severity: Severity,
    code: SqlState,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
    side: Side,
}

impl PgError {
    pub fn new(severity: Severity, code: SqlState, message: impl Into<String>) -> Self {
        PgError {
            severity,
            code,
            message: message.into(),
            detail: None,
            hint: None,
            side: Side::Sluice,
        }
    }

    /// A non-fatal error of Sluice's own: the client keeps its connection.
    pub fn error(code: SqlState, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    /// A fatal error of Sluice's own: the connection ends after it.
    pub fn fatal(code: SqlState, message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, code, message)
    }

    /// The client broke the protocol (SQLSTATE 08P01); the connection ends.
    pub fn protocol_violation(message: impl Into<String>) -> Self {
        Self::fatal(sqlstate::PROTOCOL_VIOLATION, message).with_side(Side::Client)
    }

    /// The client sent nothing for `client_stall_timeout` in the middle of a request (FATAL
    /// 57014); `held_server`: a server connection was taken for it and closed, which rolled back
    /// its transaction.
    pub fn client_stalled(held_server: bool) -> Self {
        let after = if held_server {
            " and its transaction was rolled back"
        } else {
            ""
        };
        Self::fatal(
            sqlstate::QUERY_CANCELED,
            format!("terminating connection: the client sent nothing in the middle of a request for client_stall_timeout; the request was not completed{after}"),
        )
        .with_side(Side::Client)
    }

    /// A server's ErrorResponse, passed on with the server's code, message, detail and hint.
    /// A code that is not a SQLSTATE (no PostgreSQL sends one) becomes `XX000`.
    pub fn from_server(fields: ErrorFields) -> Self {
        let severity = match fields.severity.as_str() {
            "FATAL" | "PANIC" => Severity::Fatal,
            _ => Severity::Error,
        };
        let code = SqlState::parse(&fields.code).unwrap_or(sqlstate::INTERNAL_ERROR);
        PgError {
            severity,
            code,
            message: fields.message,
            detail: fields.detail,
            hint: fields.hint,
            side: Side::Server,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_side(mut self, side: Side) -> Self {
        self.side = side;
        self
    }

    /// The same error at another severity (a server's error that ends start-up is fatal, a
    /// failed connect that a request can survive is not).
    pub fn with_severity(mut self, severity: Severity) -> Self {
        self.severity = severity;
        self
    }

    pub fn severity(&self) -> Severity {
        self.severity
    }

    pub fn code(&self) -> SqlState {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    pub fn side(&self) -> Side {
        self.side
    }

    /// A stable, low-cardinality metric label, from the side and the SQLSTATE (its class, or
    /// the code where a class holds several kinds):
    ///
    /// | side   | SQLSTATE               | kind                 |
    /// |--------|------------------------|----------------------|
    /// | client | class 08               | `protocol_violation` |
    /// | client | class 28               | `auth_failed`        |
    /// | client | class 3D               | `unknown_database`   |
    /// | client | 42501                  | `permission_denied`  |
    /// | client | other class 42         | `invalid_request`    |
    /// | client | class 0A               | `not_supported`      |
    /// | client | 57P05                  | `idle_timeout`       |
    /// | client | any other              | `client_error`       |
    /// | server | class 28, 08004        | `server_auth_failed` |
    /// | server | class 08, 53 or 57     | `server_unavailable` |
    /// | server | any other              | `server_error`       |
    /// | sluice | class 53               | `too_many_clients`   |
    /// | sluice | class 57               | `shutting_down`      |
    /// | sluice | class XX               | `internal`           |
    /// | sluice | any other              | `sluice_error`       |
    pub fn kind(&self) -> &'static str {
        match (self.side, self.code.class()) {
            (Side::Client, "08") => "protocol_violation",
            (Side::Client, "28") => "auth_failed",
            (Side::Client, "3D") => "unknown_database",
            (Side::Client, "42") if self.code == sqlstate::INSUFFICIENT_PRIVILEGE => {
                "permission_denied"
            }
            (Side::Client, "42") => "invalid_request",
            (Side::Client, "0A") => "not_supported",
            (Side::Client, _) if self.code == sqlstate::IDLE_SESSION_TIMEOUT => "idle_timeout",
            (Side::Client, _) => "client_error",
            (Side::Server, "28") => "server_auth_failed",
            (Side::Server, _) if self.code == sqlstate::SERVER_REJECTED_CONNECTION => {
                "server_auth_failed"
            }
            (Side::Server, "08" | "53" | "57") => "server_unavailable",
            (Side::Server, _) => "server_error",
            (Side::Sluice, "53") => "too_many_clients",
            (Side::Sluice, "57") => "shutting_down",
            (Side::Sluice, "XX") => "internal",
            (Side::Sluice, _) => "sluice_error",
        }
    }

    /// Appends this error as an ErrorResponse message.
    pub fn encode(&self, out: &mut BytesMut) {
        Out::error_response(
            out,
            tag::ERROR_RESPONSE,
            self.severity.as_str(),
            self.code.as_str(),
            &self.message,
            self.detail.as_deref(),
            self.hint.as_deref(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::next_frame;

    fn decode(buf: &[u8]) -> ErrorFields {
        let (frame, n) = next_frame(buf, 1 << 20).unwrap().unwrap();
        assert_eq!((frame.tag, n), (tag::ERROR_RESPONSE, buf.len()));
        ErrorFields::parse(frame.body).unwrap()
    }

    #[test]
    fn encodes_every_field() {
        let e = PgError::error(sqlstate::TOO_MANY_CONNECTIONS, "busy")
            .with_detail("d")
            .with_hint("h");
        let mut buf = BytesMut::new();
        e.encode(&mut buf);
        assert_eq!(
            decode(&buf),
            ErrorFields {
                severity: "ERROR".into(),
                code: "53300".into(),
                message: "busy".into(),
                detail: Some("d".into()),
                hint: Some("h".into()),
            }
        );
        // S, V, C, M, D, H in that order, as the wire has always carried them.
        assert_eq!(
            &buf[..],
            b"E\0\0\0\x26SERROR\0VERROR\0C53300\0Mbusy\0Dd\0Hh\0\0"
        );
    }

    #[test]
    fn encodes_like_the_field_encoder() {
        let e = PgError::protocol_violation("bad\0message");
        let mut ours = BytesMut::new();
        e.encode(&mut ours);
        let mut theirs = BytesMut::new();
        Out::error_fields(
            &mut theirs,
            tag::ERROR_RESPONSE,
            &ErrorFields {
                severity: "FATAL".into(),
                code: "08P01".into(),
                message: "bad\0message".into(),
                detail: None,
                hint: None,
            },
        );
        assert_eq!(ours, theirs);
        let back = decode(&ours);
        assert_eq!((back.message.as_str(), back.detail), ("badmessage", None));
    }

    #[test]
    fn server_errors_keep_the_servers_fields() {
        let e = PgError::from_server(ErrorFields {
            severity: "FATAL".into(),
            code: "3D000".into(),
            message: "database \"x\" does not exist".into(),
            detail: Some("d".into()),
            hint: None,
        });
        assert_eq!(
            (e.severity(), e.code().as_str(), e.side(), e.detail()),
            (Severity::Fatal, "3D000", Side::Server, Some("d"))
        );
        assert_eq!(e.to_string(), "database \"x\" does not exist");
        let e = e.with_severity(Severity::Error);
        let mut buf = BytesMut::new();
        e.encode(&mut buf);
        let back = decode(&buf);
        assert_eq!(
            (back.severity.as_str(), back.code.as_str()),
            ("ERROR", "3D000")
        );

        let odd = |severity: &str, code: &str| {
            PgError::from_server(ErrorFields {
                severity: severity.into(),
                code: code.into(),
                ..Default::default()
            })
        };
        assert_eq!(odd("PANIC", "XX000").severity(), Severity::Fatal);
        assert_eq!(odd("WARNING", "01000").severity(), Severity::Error);
        assert_eq!(odd("ERROR", "bogus").code(), sqlstate::INTERNAL_ERROR);
    }

    #[test]
    fn kinds() {
        let client = |code| PgError::fatal(code, "").with_side(Side::Client).kind();
        let server = |code| PgError::error(code, "").with_side(Side::Server).kind();
        let sluice = |code| PgError::error(code, "").kind();
        let code = |s| SqlState::parse(s).unwrap();
        assert_eq!(
            PgError::protocol_violation("x").kind(),
            "protocol_violation"
        );
        assert_eq!(client(sqlstate::INVALID_PASSWORD), "auth_failed");
        assert_eq!(
            client(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION),
            "auth_failed"
        );
        assert_eq!(client(sqlstate::INVALID_CATALOG_NAME), "unknown_database");
        assert_eq!(
            client(sqlstate::INSUFFICIENT_PRIVILEGE),
            "permission_denied"
        );
        assert_eq!(client(sqlstate::INVALID_NAME), "invalid_request");
        assert_eq!(client(sqlstate::SYNTAX_ERROR), "invalid_request");
        assert_eq!(client(sqlstate::FEATURE_NOT_SUPPORTED), "not_supported");
        assert_eq!(client(sqlstate::IDLE_SESSION_TIMEOUT), "idle_timeout");
        assert_eq!(client(code("22023")), "client_error");
        assert_eq!(server(sqlstate::CONNECTION_FAILURE), "server_unavailable");
        assert_eq!(server(sqlstate::TOO_MANY_CONNECTIONS), "server_unavailable");
        assert_eq!(server(sqlstate::CANNOT_CONNECT_NOW), "server_unavailable");
        assert_eq!(server(sqlstate::INVALID_PASSWORD), "server_auth_failed");
        assert_eq!(
            server(sqlstate::SERVER_REJECTED_CONNECTION),
            "server_auth_failed"
        );
        assert_eq!(server(sqlstate::INVALID_CATALOG_NAME), "server_error");
        assert_eq!(server(code("22023")), "server_error");
        assert_eq!(sluice(sqlstate::TOO_MANY_CONNECTIONS), "too_many_clients");
        assert_eq!(sluice(sqlstate::ADMIN_SHUTDOWN), "shutting_down");
        assert_eq!(sluice(sqlstate::CANNOT_CONNECT_NOW), "shutting_down");
        assert_eq!(sluice(sqlstate::INTERNAL_ERROR), "internal");
        assert_eq!(sluice(sqlstate::PROGRAM_LIMIT_EXCEEDED), "sluice_error");
    }

    #[test]
    fn labels() {
        assert_eq!(Severity::Fatal.as_str(), "FATAL");
        assert_eq!(Severity::Error.as_str(), "ERROR");
        assert_eq!(
            [Side::Client, Side::Server, Side::Sluice].map(Side::as_str),
            ["client", "server", "sluice"]
        );
    }
}
