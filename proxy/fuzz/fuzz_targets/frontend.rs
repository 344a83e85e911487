//! What a client sends after start-up: its bytes cut into messages by their 5-byte headers
//! (`next_frame`, as `ClientConn::read_message` and the relay frame them), and the bodies
//! Sluice decodes: Query, Parse, Bind, Describe, Close, PasswordMessage and
//! SASLInitialResponse.
//!
//! Checks: frames are cut back to back and within the input, no frame exceeds the cap, and
//! each decoded body is what its parts say (re-encoded with Sluice's own builders where there
//! is one, and a Parse renamed as the prepared-statement rewriting renames it).
#![no_main]

use std::collections::hash_map::RandomState;
use std::sync::OnceLock;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sluice::protocol::frontend::{self, tag};
use sluice::protocol::{next_frame, Header, HEADER_LEN};

/// The cap on one message (`max_message_bytes`): small, so that its error is reached too.
const MAX_MESSAGE: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let mut pos = 0;
    loop {
        let rest = &data[pos..];
        let (frame, used) = match next_frame(rest, MAX_MESSAGE) {
            Ok(Some(f)) => f,
            Ok(None) => {
                // Waiting for more only while the message is incomplete.
                if let Ok(Some(h)) = Header::peek(rest) {
                    assert!(h.total() > rest.len());
                }
                break;
            }
            Err(_) => {
                // A corrupt length, or one over the cap.
                if let Ok(h) = Header::peek(rest) {
                    assert!(h.expect("a whole header").total() > MAX_MESSAGE);
                }
                break;
            }
        };
        assert!(used >= HEADER_LEN && used <= rest.len() && used <= MAX_MESSAGE);
        assert_eq!(frame.tag, rest[0]);
        assert_eq!(frame.body, &rest[HEADER_LEN..used]);
        body(frame.tag, frame.body, &rest[..used]);
        pos += used;
    }
});

fn hasher() -> &'static RandomState {
    static H: OnceLock<RandomState> = OnceLock::new();
    H.get_or_init(RandomState::new)
}

/// Decodes one client message as Sluice would; `msg` is the whole message.
fn body(msg_tag: u8, body: &[u8], msg: &[u8]) {
    match msg_tag {
        tag::QUERY => {
            if let Ok(sql) = frontend::query(body) {
                assert!(!sql.contains(&0));
                assert_eq!([sql, b"\0"].concat(), body);
            }
        }
        tag::PARSE => {
            if let Ok(p) = frontend::parse(body) {
                assert!(!p.name.contains(&0));
                assert_eq!([p.name, b"\0", p.rest].concat(), body);
                // Renamed for a server: the same statement under Sluice's name.
                let stmt = sluice::prepared::statement(hasher(), p.rest);
                let (f, n) = next_frame(&stmt.parse, usize::MAX)
                    .expect("a valid Parse")
                    .expect("a whole Parse");
                assert_eq!((f.tag, n), (tag::PARSE, stmt.parse.len()));
                let renamed = frontend::parse(f.body).expect("the renamed Parse parses");
                assert_eq!(renamed.name, stmt.server_name.as_bytes());
                assert_eq!(renamed.rest, p.rest);
            }
        }
        tag::BIND => {
            if let Ok((portal, stmt, used)) = frontend::bind(body) {
                assert_eq!([portal, b"\0", stmt, b"\0"].concat(), &body[..used]);
                if let Ok(stmt) = std::str::from_utf8(stmt) {
                    let mut again = BytesMut::new();
                    frontend::put_bind(&mut again, portal, stmt, &body[used..]);
                    assert_eq!(&again[..], msg);
                }
            }
        }
        tag::DESCRIBE | tag::CLOSE => {
            if let Ok((kind, name)) = frontend::target(body, "Describe") {
                assert!(kind == frontend::STATEMENT || kind == frontend::PORTAL);
                if let Ok(name) = std::str::from_utf8(name) {
                    let mut again = BytesMut::new();
                    frontend::put_target(&mut again, msg_tag, kind, name);
                    assert_eq!(&again[..], msg);
                }
            }
        }
        tag::PASSWORD => {
            if let Ok(pw) = frontend::password(body) {
                assert_eq!([pw, b"\0"].concat(), body);
            }
            if let Ok((mechanism, first)) = frontend::sasl_initial_response(body) {
                let head = mechanism.len() + 1 + 4;
                assert!(body.starts_with(mechanism.as_bytes()) && body[mechanism.len()] == 0);
                assert_eq!(&body[head..], first);
            }
        }
        _ => {}
    }
}
