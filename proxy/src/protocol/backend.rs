//! Messages servers send: their tags, the few Sluice decodes, and builders for the ones Sluice
//! itself sends to clients (authentication, parameters, errors, ReadyForQuery).
//!
//! See <https://www.postgresql.org/docs/current/protocol-message-formats.html>.

use bytes::{BufMut, BytesMut};

use super::{ProtocolError, Reader};

/// Message tags of protocol 3.0 backend messages that Sluice looks at.
pub mod tag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const DATA_ROW: u8 = b'D';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
    pub const NO_DATA: u8 = b'n';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ROW_DESCRIPTION: u8 = b'T';
}

/// Field types of ErrorResponse and NoticeResponse bodies.
pub mod field {
    /// Severity, possibly localized.
    pub const SEVERITY: u8 = b'S';
    /// Severity, never localized (PostgreSQL 9.6 and later).
    pub const SEVERITY_NONLOCALIZED: u8 = b'V';
    pub const CODE: u8 = b'C';
    pub const MESSAGE: u8 = b'M';
    pub const DETAIL: u8 = b'D';
    pub const HINT: u8 = b'H';
}

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Result<TxStatus, ProtocolError> {
        match b {
            b'I' => Ok(TxStatus::Idle),
            b'T' => Ok(TxStatus::InTransaction),
            b'E' => Ok(TxStatus::Failed),
            _ => Err(ProtocolError::Malformed("ReadyForQuery")),
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// The status byte of a ReadyForQuery body.
pub fn ready_for_query_status(body: &[u8]) -> Result<TxStatus, ProtocolError> {
    match body {
        [b] => TxStatus::from_byte(*b),
        _ => Err(ProtocolError::Malformed("ReadyForQuery")),
    }
}

/// The fields of an ErrorResponse or NoticeResponse that Sluice reads or writes.
/// A ParameterStatus body: the parameter's name and value (bytes: values are in the client's
/// encoding).
pub fn parameter_status(body: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let mut r = Reader::new(body, "ParameterStatus");
    let name = r.cbytes()?;
    let value = r.cbytes()?;
    r.finish()?;
    Ok((name, value))
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorFields {
    /// A FATAL or PANIC: the server ends the session after sending it.
    pub fn ends_session(&self) -> bool {
        matches!(self.severity.as_str(), "FATAL" | "PANIC")
    }

    /// Whether an ErrorResponse body is a FATAL or PANIC (see [`ErrorFields::ends_session`]),
    /// read in place: the relay asks this of every error the server sends.
    pub fn body_ends_session(body: &[u8]) -> Result<bool, ProtocolError> {
        let mut r = Reader::new(body, "ErrorResponse");
        let mut severity: &[u8] = b"";
        loop {
            let kind = r.u8()?;
            if kind == 0 {
                break;
            }
            let value = r.cbytes()?;
            match kind {
                field::SEVERITY_NONLOCALIZED => severity = value,
                field::SEVERITY if severity.is_empty() => severity = value,
                _ => {}
            }
        }
        r.finish()?;
        Ok(matches!(severity, b"FATAL" | b"PANIC"))
    }

    /// Decodes an ErrorResponse/NoticeResponse body; unknown fields are skipped.
    pub fn parse(body: &[u8]) -> Result<ErrorFields, ProtocolError> {
        let mut r = Reader::new(body, "ErrorResponse");
        let mut f = ErrorFields::default();
        loop {
            let kind = r.u8()?;
            if kind == 0 {
                break;
            }
            let value = String::from_utf8_lossy(r.cbytes()?).into_owned();
            match kind {
                field::SEVERITY_NONLOCALIZED => f.severity = value,
                field::SEVERITY if f.severity.is_empty() => f.severity = value,
                field::CODE => f.code = value,
                field::MESSAGE => f.message = value,
                field::DETAIL => f.detail = Some(value),
                field::HINT => f.hint = Some(value),
                _ => {}
            }
        }
        r.finish()?;
        Ok(f)
    }
}

/// Builders append whole messages to a buffer that is then written with one call.
pub struct Out;

fn begin(buf: &mut BytesMut, tag: u8) -> usize {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_u32(0);
    at
}

fn end(buf: &mut BytesMut, at: usize) {
    let len = (buf.len() - at) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    // A NUL inside a field would cut the message short; we never send one.
    if !s.contains(&0) {
        buf.extend_from_slice(s);
    } else {
        buf.extend(s.iter().copied().filter(|&b| b != 0));
    }
    buf.put_u8(0);
}

impl Out {
    pub fn auth_ok(buf: &mut BytesMut) {
        Self::auth(buf, 0, &[]);
    }

    pub fn auth_cleartext(buf: &mut BytesMut) {
        Self::auth(buf, 3, &[]);
    }

    pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
        Self::auth(buf, 5, &salt);
    }

    /// AuthenticationSASL with the list of mechanisms offered.
    pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
        let at = begin(buf, super::backend::tag::AUTHENTICATION);
        buf.put_i32(10);
        for m in mechanisms {
            put_cstr(buf, m.as_bytes());
        }
        buf.put_u8(0);
        end(buf, at);
    }

    pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
        Self::auth(buf, 11, data);
    }

    pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
        Self::auth(buf, 12, data);
    }

    fn auth(buf: &mut BytesMut, code: i32, data: &[u8]) {
        let at = begin(buf, tag::AUTHENTICATION);
        buf.put_i32(code);
        buf.put_slice(data);
        end(buf, at);
    }

    pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
        let at = begin(buf, tag::PARAMETER_STATUS);
        put_cstr(buf, name.as_bytes());
        put_cstr(buf, value.as_bytes());
        end(buf, at);
    }

    pub fn backend_key_data(buf: &mut BytesMut, process_id: i32, secret_key: i32) {
        let at = begin(buf, tag::BACKEND_KEY_DATA);
        buf.put_i32(process_id);
        buf.put_i32(secret_key);
        end(buf, at);
    }

    pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
        let at = begin(buf, tag::READY_FOR_QUERY);
        buf.put_u8(status.byte());
        end(buf, at);
    }

    /// ErrorResponse (or NoticeResponse with `tag::NOTICE_RESPONSE`).
    pub fn error_fields(buf: &mut BytesMut, msg_tag: u8, f: &ErrorFields) {
        Self::error_response(
            buf,
            msg_tag,
            &f.severity,
            &f.code,
            &f.message,
            f.detail.as_deref(),
            f.hint.as_deref(),
        );
    }

    /// ErrorResponse (or NoticeResponse with `tag::NOTICE_RESPONSE`) from borrowed fields: the
    /// severity (sent both as `S` and `V`), SQLSTATE, message, and the optional detail and hint.
    pub fn error_response(
        buf: &mut BytesMut,
        msg_tag: u8,
        severity: &str,
        code: &str,
        message: &str,
        detail: Option<&str>,
        hint: Option<&str>,
    ) {
        let at = begin(buf, msg_tag);
        for (kind, value) in [
            (field::SEVERITY, Some(severity)),
            (field::SEVERITY_NONLOCALIZED, Some(severity)),
            (field::CODE, Some(code)),
            (field::MESSAGE, Some(message)),
            (field::DETAIL, detail),
            (field::HINT, hint),
        ] {
            if let Some(v) = value {
                buf.put_u8(kind);
                put_cstr(buf, v.as_bytes());
            }
        }
        buf.put_u8(0);
        end(buf, at);
    }

    /// Builds a simple Query message (used for Sluice's own statements on server connections).
    pub fn query(buf: &mut BytesMut, sql: &str) {
        let at = begin(buf, super::frontend::tag::QUERY);
        put_cstr(buf, sql.as_bytes());
        end(buf, at);
    }

    /// RowDescription for text columns (`int8` where `numeric` is set, else `text`).
    pub fn row_description(buf: &mut BytesMut, columns: &[(&str, bool)]) {
        let at = begin(buf, b'T');
        buf.put_i16(columns.len() as i16);
        for (name, numeric) in columns {
            put_cstr(buf, name.as_bytes());
            buf.put_i32(0); // table oid
            buf.put_i16(0); // column number
            let (oid, len) = if *numeric { (20, 8) } else { (25, -1) };
            buf.put_i32(oid);
            buf.put_i16(len);
            buf.put_i32(-1); // type modifier
            buf.put_i16(0); // text format
        }
        end(buf, at);
    }

    /// DataRow of text values; `None` is SQL NULL.
    pub fn data_row(buf: &mut BytesMut, values: &[Option<&str>]) {
        let at = begin(buf, tag::DATA_ROW);
        buf.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    buf.put_i32(v.len() as i32);
                    buf.put_slice(v.as_bytes());
                }
                None => buf.put_i32(-1),
            }
        }
        end(buf, at);
    }

    pub fn command_complete(buf: &mut BytesMut, command_tag: &str) {
        let at = begin(buf, tag::COMMAND_COMPLETE);
        put_cstr(buf, command_tag.as_bytes());
        end(buf, at);
    }

    pub fn empty_query_response(buf: &mut BytesMut) {
        let at = begin(buf, b'I');
        end(buf, at);
    }

    pub fn terminate(buf: &mut BytesMut) {
        let at = begin(buf, super::frontend::tag::TERMINATE);
        end(buf, at);
    }
}

/// A ParameterStatus's name and value, as the client's bytes.
pub type Parameter = (Box<[u8]>, Box<[u8]>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::next_frame;

    #[test]
    fn error_round_trip() {
        let f = ErrorFields {
            severity: "ERROR".into(),
            code: "53300".into(),
            message: "no\0nul".into(),
            detail: Some("d".into()),
            hint: None,
        };
        let mut buf = BytesMut::new();
        Out::error_fields(&mut buf, tag::ERROR_RESPONSE, &f);
        let (frame, n) = next_frame(&buf, 1 << 20).unwrap().unwrap();
        assert_eq!((frame.tag, n), (b'E', buf.len()));
        let back = ErrorFields::parse(frame.body).unwrap();
        assert_eq!(back.message, "nonul");
        assert_eq!(
            (back.code.as_str(), back.detail.as_deref()),
            ("53300", Some("d"))
        );
        assert_eq!(ErrorFields::body_ends_session(frame.body), Ok(false));
        // The non-localized severity wins over a translated one, in either order.
        assert_eq!(
            ErrorFields::body_ends_session(b"SFATAL\0VFATAL\0C57P01\0\0"),
            Ok(true)
        );
        assert_eq!(
            ErrorFields::body_ends_session(b"VPANIC\0SPANIK\0\0"),
            Ok(true)
        );
        assert_eq!(
            ErrorFields::body_ends_session(b"SFATAL\0VERROR\0\0"),
            Ok(false)
        );
        assert!(ErrorFields::body_ends_session(b"SFATAL").is_err());
    }

    #[test]
    fn builders_frame_correctly() {
        let mut buf = BytesMut::new();
        Out::auth_ok(&mut buf);
        Out::parameter_status(&mut buf, "server_version", "15.0");
        Out::backend_key_data(&mut buf, 1, 2);
        Out::ready_for_query(&mut buf, TxStatus::Idle);
        Out::auth_sasl(&mut buf, &["SCRAM-SHA-256"]);
        Out::row_description(&mut buf, &[("a", false), ("b", true)]);
        Out::data_row(&mut buf, &[Some("x"), None]);
        Out::command_complete(&mut buf, "SHOW");
        let mut rest = &buf[..];
        let mut tags = vec![];
        while let Some((f, n)) = next_frame(rest, 1 << 20).unwrap() {
            tags.push(f.tag);
            if f.tag == tag::READY_FOR_QUERY {
                assert_eq!(ready_for_query_status(f.body).unwrap(), TxStatus::Idle);
            }
            rest = &rest[n..];
        }
        assert!(rest.is_empty());
        assert_eq!(tags, b"RSKZRTDC");
    }

    #[test]
    fn bad_error_and_rfq_bodies() {
        assert!(ErrorFields::parse(b"Mabc").is_err());
        assert!(ErrorFields::parse(b"").is_err());
        assert!(ready_for_query_status(b"X").is_err());
        assert!(ready_for_query_status(b"").is_err());
    }
}
