//! What a server sends: its bytes framed by their headers, and the messages Sluice decodes
//! itself (ErrorResponse and NoticeResponse fields, ParameterStatus, ReadyForQuery, SQLSTATE
//! codes) or through postgres-protocol while it logs in and runs its own queries
//! (`ServerConn`: authentication requests, BackendKeyData, RowDescription, DataRow, whose
//! values `sql::read_back_value` reads).
//!
//! Checks: frames are cut back to back within the input; decoded fields survive Sluice's
//! encoders unchanged (an error passed on to a client says what the server said); a
//! ReadyForQuery status is its byte; a hex value read back is its digits.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postgres_protocol::message::backend::Message;
use sluice::error::{PgError, SqlState};
use sluice::protocol::backend::{self, tag, ErrorFields, Out};
use sluice::protocol::{next_frame, HEADER_LEN};
use sluice::sql::Encoding;

/// `ServerConn`'s cap on one message while it logs in or runs its own queries.
const MAX_CONTROL_MESSAGE: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut pos = 0;
    while let Ok(Some((frame, used))) = next_frame(&data[pos..], usize::MAX) {
        assert!(used >= HEADER_LEN && pos + used <= data.len());
        decode(frame.tag, frame.body);
        pos += used;
    }
    control(data);
});

/// The messages the relay and the session decode.
fn decode(msg_tag: u8, body: &[u8]) {
    match msg_tag {
        tag::ERROR_RESPONSE | tag::NOTICE_RESPONSE => {
            let Ok(fields) = ErrorFields::parse(body) else {
                return;
            };
            // Sent on as Sluice's own ErrorResponse (or NoticeResponse): the same fields.
            let mut out = BytesMut::new();
            Out::error_fields(&mut out, msg_tag, &fields);
            assert_eq!(reparse(&out, msg_tag), fields);
            // Passed on to a client as a PgError: the code kept when it is a SQLSTATE.
            let code = SqlState::parse(&fields.code);
            if let Some(c) = code {
                assert_eq!(c.as_str(), fields.code);
            }
            let e = PgError::from_server(fields.clone());
            out.clear();
            e.encode(&mut out);
            let back = reparse(&out, tag::ERROR_RESPONSE);
            assert_eq!(
                back.code,
                code.map_or_else(|| "XX000".into(), |c| c.to_string())
            );
            assert_eq!(back.ends_session(), fields.ends_session());
            assert_eq!(
                (back.message, back.detail, back.hint),
                (fields.message, fields.detail, fields.hint)
            );
        }
        tag::PARAMETER_STATUS => {
            if let Ok((name, value)) = backend::parameter_status(body) {
                assert_eq!([name, b"\0", value, b"\0"].concat(), body);
                if name == b"client_encoding" {
                    let _ = Encoding::from_name(&String::from_utf8_lossy(value));
                }
            }
        }
        tag::READY_FOR_QUERY => {
            if let Ok(status) = backend::ready_for_query_status(body) {
                assert_eq!(&[status.byte()], body);
            }
        }
        _ => {}
    }
}

fn reparse(msg: &[u8], msg_tag: u8) -> ErrorFields {
    let (f, n) = next_frame(msg, usize::MAX)
        .expect("valid header")
        .expect("whole message");
    assert_eq!((f.tag, n), (msg_tag, msg.len()));
    ErrorFields::parse(f.body).expect("Sluice's ErrorResponse parses")
}

/// What `ServerConn::read_message` does: frames checked against its cap, then
/// postgres-protocol's parser, and the accessors the connection uses.
fn control(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        if next_frame(&buf, MAX_CONTROL_MESSAGE).is_err() {
            return;
        }
        let before = buf.len();
        let msg = match Message::parse(&mut buf) {
            Ok(Some(m)) => m,
            _ => return,
        };
        assert!(buf.len() < before);
        match msg {
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                while let Ok(Some(_)) = fallible_iterator::FallibleIterator::next(&mut mechanisms) {
                }
            }
            Message::AuthenticationMd5Password(body) => {
                let _ = body.salt();
            }
            Message::AuthenticationSaslContinue(body) => {
                let _ = body.data();
            }
            Message::ParameterStatus(body) => {
                let _ = (body.name(), body.value());
            }
            Message::BackendKeyData(body) => {
                let _ = (body.process_id(), body.secret_key());
            }
            Message::ReadyForQuery(body) => {
                let _ = backend::TxStatus::from_byte(body.status());
            }
            Message::RowDescription(body) => {
                let mut fields = body.fields();
                while let Ok(Some(f)) = fallible_iterator::FallibleIterator::next(&mut fields) {
                    let _ = (f.name(), f.type_oid(), f.format());
                }
            }
            Message::DataRow(body) => {
                let values = body.buffer();
                let mut ranges = body.ranges();
                while let Ok(Some(r)) = fallible_iterator::FallibleIterator::next(&mut ranges) {
                    let value = r.and_then(|r| values.get(r)).unwrap_or_default();
                    read_back(&String::from_utf8_lossy(value));
                }
            }
            _ => {}
        }
    }
}

/// A setting's value read back as hex of its UTF-8 bytes.
fn read_back(hex: &str) {
    if let Some(v) = sluice::sql::read_back_value(hex) {
        let digits: String = v.bytes().map(|b| format!("{b:02x}")).collect();
        assert_eq!(digits, hex.to_ascii_lowercase());
    }
}
