//! Property tests: messages encoded by an independent implementation (postgres-protocol, what
//! tokio-postgres sends and reads) come back out of Sluice's parsers as they went in, and what
//! Sluice encodes, postgres-protocol reads back; a stream of messages cut anywhere is framed
//! whole. The fuzz targets (`proxy/fuzz/`) try arbitrary bytes; these try valid ones.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::{backend as pgb, frontend as pgf};
use proptest::collection::vec;
use proptest::prelude::*;
use sluice::protocol::backend::{self, ErrorFields, Out, TxStatus};
use sluice::protocol::frontend::{self, Startup};
use sluice::protocol::{next_frame, Header};

/// A C string's contents: any characters but NUL.
fn cstr() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,40}"
}

/// A non-empty C string.
fn name() -> impl Strategy<Value = String> {
    "[^\u{0}]{1,20}"
}

/// One frontend message as postgres-protocol encodes it, with what Sluice must read from it.
#[derive(Debug, Clone)]
enum Sent {
    Query(String),
    Parse(String, String, Vec<u32>),
    Bind(String, String),
    Execute(String, i32),
    Describe(u8, String),
    Close(u8, String),
    Password(String),
    SaslInitial(String, Vec<u8>),
    Sync,
}

fn sent() -> impl Strategy<Value = Sent> {
    let kind = prop_oneof![Just(b'S'), Just(b'P')];
    prop_oneof![
        cstr().prop_map(Sent::Query),
        (cstr(), cstr(), vec(any::<u32>(), 0..5)).prop_map(|(n, q, t)| Sent::Parse(n, q, t)),
        (cstr(), cstr()).prop_map(|(p, s)| Sent::Bind(p, s)),
        (cstr(), any::<i32>()).prop_map(|(p, n)| Sent::Execute(p, n)),
        (kind.clone(), cstr()).prop_map(|(k, n)| Sent::Describe(k, n)),
        (kind, cstr()).prop_map(|(k, n)| Sent::Close(k, n)),
        cstr().prop_map(Sent::Password),
        (name(), vec(any::<u8>(), 0..200)).prop_map(|(m, d)| Sent::SaslInitial(m, d)),
        Just(Sent::Sync),
    ]
}

fn encode(m: &Sent, buf: &mut BytesMut) {
    match m {
        Sent::Query(q) => pgf::query(q, buf).unwrap(),
        Sent::Parse(n, q, t) => pgf::parse(n, q, t.iter().copied(), buf).unwrap(),
        Sent::Bind(p, s) => pgf::bind(
            p,
            s,
            [1i16],
            [Some("41")],
            |v, out| {
                match v {
                    Some(v) => out.extend_from_slice(v.as_bytes()),
                    None => return Ok(postgres_protocol::IsNull::Yes),
                }
                Ok(postgres_protocol::IsNull::No)
            },
            [0i16],
            buf,
        )
        .map_err(|_| "bind")
        .unwrap(),
        Sent::Execute(p, n) => pgf::execute(p, *n, buf).unwrap(),
        Sent::Describe(k, n) => pgf::describe(*k, n, buf).unwrap(),
        Sent::Close(k, n) => pgf::close(*k, n, buf).unwrap(),
        Sent::Password(p) => pgf::password_message(p.as_bytes(), buf).unwrap(),
        Sent::SaslInitial(m, d) => pgf::sasl_initial_response(m, d, buf).unwrap(),
        Sent::Sync => pgf::sync(buf),
    }
}

/// Checks that Sluice reads `body` (of a message tagged `tag`) as `m`.
fn read_back(m: &Sent, tag: u8, body: &[u8]) {
    match m {
        Sent::Query(q) => {
            assert_eq!(tag, b'Q');
            assert_eq!(frontend::query(body).unwrap(), q.as_bytes());
        }
        Sent::Parse(n, q, t) => {
            assert_eq!(tag, b'P');
            let p = frontend::parse(body).unwrap();
            assert_eq!(p.name, n.as_bytes());
            // The rest is the query, its NUL, the type count and the types.
            let mut rest = q.as_bytes().to_vec();
            rest.push(0);
            rest.extend_from_slice(&(t.len() as i16).to_be_bytes());
            for oid in t {
                rest.extend_from_slice(&oid.to_be_bytes());
            }
            assert_eq!(p.rest, &rest[..]);
        }
        Sent::Bind(p, s) => {
            assert_eq!(tag, b'B');
            let (portal, stmt, used) = frontend::bind(body).unwrap();
            assert_eq!((portal, stmt), (p.as_bytes(), s.as_bytes()));
            assert_eq!(used, p.len() + s.len() + 2);
        }
        Sent::Execute(p, n) => {
            assert_eq!(tag, b'E');
            assert_eq!(frontend::execute(body).unwrap(), (p.as_bytes(), *n));
        }
        Sent::Describe(k, n) => {
            assert_eq!(tag, b'D');
            assert_eq!(
                frontend::target(body, "Describe").unwrap(),
                (*k, n.as_bytes())
            );
        }
        Sent::Close(k, n) => {
            assert_eq!(tag, b'C');
            assert_eq!(frontend::target(body, "Close").unwrap(), (*k, n.as_bytes()));
        }
        Sent::Password(p) => {
            assert_eq!(tag, b'p');
            assert_eq!(frontend::password(body).unwrap(), p.as_bytes());
        }
        Sent::SaslInitial(m, d) => {
            assert_eq!(tag, b'p');
            let (mech, data) = frontend::sasl_initial_response(body).unwrap();
            assert_eq!((mech, data), (m.as_str(), &d[..]));
        }
        Sent::Sync => {
            assert_eq!((tag, body), (b'S', &[][..]));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn startup_packets_come_back_as_sent(
        params in vec((name(), cstr()), 0..8),
        extra in vec(any::<u8>(), 0..16),
    ) {
        // Parameter names are unique in a real startup packet (Sluice refuses repeats).
        let mut unique: Vec<(String, String)> = Vec::new();
        for (n, v) in params {
            if !unique.iter().any(|(m, _)| *m == n) {
                unique.push((n, v));
            }
        }
        let mut buf = BytesMut::new();
        pgf::startup_message(unique.iter().map(|(n, v)| (n.as_str(), v.as_str())), &mut buf)
            .unwrap();
        let len = buf.len();
        // Bytes after the packet are the next packet's, not this one's.
        buf.extend_from_slice(&extra);
        match Startup::parse(&buf) {
            Ok(Some((Startup::Startup { params }, used))) if len <= 10_000 => {
                prop_assert_eq!(used, len);
                prop_assert_eq!(params, unique);
            }
            Err(_) if len > 10_000 => {}
            other => prop_assert!(false, "{:?}", other),
        }
        // Any prefix is "more bytes needed", never an error or a different packet.
        for cut in [0, 4, 7, len / 2, len - 1] {
            if len <= 10_000 {
                prop_assert_eq!(Startup::parse(&buf[..cut]).ok(), Some(None));
            }
        }
    }

    #[test]
    fn cancel_requests_come_back_as_sent(pid in any::<i32>(), key in any::<i32>()) {
        let mut buf = BytesMut::new();
        pgf::cancel_request(pid, key, &mut buf);
        prop_assert_eq!(
            Startup::parse(&buf).unwrap(),
            Some((Startup::Cancel { process_id: pid, secret_key: key }, 16))
        );
    }

    #[test]
    fn client_messages_come_back_as_sent_however_the_stream_is_cut(
        msgs in vec(sent(), 1..12),
        cuts in vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut stream = BytesMut::new();
        for m in &msgs {
            encode(m, &mut stream);
        }
        // Read as the session does: whatever has arrived, one frame at a time.
        let mut cut_at: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cut_at.push(stream.len());
        cut_at.sort_unstable();
        let (mut got, mut pos) = (Vec::new(), 0);
        for end in cut_at {
            while let Some((frame, used)) = next_frame(&stream[pos..end], 1 << 20).unwrap() {
                let h = Header::peek(&stream[pos..end]).unwrap().unwrap();
                prop_assert_eq!((h.tag, h.total()), (frame.tag, used));
                got.push((frame.tag, frame.body.to_vec()));
                pos += used;
            }
        }
        prop_assert_eq!(pos, stream.len());
        prop_assert_eq!(got.len(), msgs.len());
        for (m, (tag, body)) in msgs.iter().zip(&got) {
            read_back(m, *tag, body);
        }
    }

    #[test]
    fn what_sluice_sends_postgres_protocol_reads(
        name in name(),
        value in cstr(),
        code in "[0-9A-Z]{5}",
        message in cstr(),
        detail in proptest::option::of(cstr()),
        hint in proptest::option::of(cstr()),
        fatal in any::<bool>(),
        status in prop_oneof![Just(TxStatus::Idle), Just(TxStatus::InTransaction), Just(TxStatus::Failed)],
    ) {
        let severity = if fatal { "FATAL" } else { "ERROR" };
        let fields = ErrorFields {
            severity: severity.into(),
            code: code.clone(),
            message: message.clone(),
            detail: detail.clone(),
            hint: hint.clone(),
        };
        let mut buf = BytesMut::new();
        Out::parameter_status(&mut buf, &name, &value);
        Out::error_fields(&mut buf, b'E', &fields);
        Out::ready_for_query(&mut buf, status);

        // postgres-protocol's reading.
        let mut theirs = buf.clone();
        match pgb::Message::parse(&mut theirs).unwrap() {
            Some(pgb::Message::ParameterStatus(p)) => {
                prop_assert_eq!(p.name().unwrap(), name.as_str());
                prop_assert_eq!(p.value().unwrap(), value.as_str());
            }
            _ => prop_assert!(false, "not a ParameterStatus"),
        }
        match pgb::Message::parse(&mut theirs).unwrap() {
            Some(pgb::Message::ErrorResponse(e)) => {
                let mut seen = std::collections::HashMap::new();
                let mut it = e.fields();
                while let Some(f) = it.next().unwrap() {
                    seen.insert(f.type_(), String::from_utf8_lossy(f.value_bytes()).into_owned());
                }
                prop_assert_eq!(seen.get(&b'S').map(String::as_str), Some(severity));
                prop_assert_eq!(seen.get(&b'V').map(String::as_str), Some(severity));
                prop_assert_eq!(seen.get(&b'C'), Some(&code));
                prop_assert_eq!(seen.get(&b'M'), Some(&message));
                prop_assert_eq!(seen.get(&b'D'), detail.as_ref());
                prop_assert_eq!(seen.get(&b'H'), hint.as_ref());
            }
            _ => prop_assert!(false, "not an ErrorResponse"),
        }
        match pgb::Message::parse(&mut theirs).unwrap() {
            Some(pgb::Message::ReadyForQuery(r)) => prop_assert_eq!(r.status(), status.byte()),
            _ => prop_assert!(false, "not a ReadyForQuery"),
        }
        prop_assert!(theirs.is_empty());

        // And Sluice's own, which the relay uses on the server's messages.
        let (f, used) = next_frame(&buf, 1 << 20).unwrap().unwrap();
        let (n, v) = backend::parameter_status(f.body).unwrap();
        prop_assert_eq!((n, v), (name.as_bytes(), value.as_bytes()));
        let (f, used2) = next_frame(&buf[used..], 1 << 20).unwrap().unwrap();
        prop_assert_eq!(ErrorFields::parse(f.body).unwrap(), fields);
        prop_assert_eq!(ErrorFields::body_ends_session(f.body).unwrap(), fatal);
        let (f, _) = next_frame(&buf[used + used2..], 1 << 20).unwrap().unwrap();
        prop_assert_eq!(backend::ready_for_query_status(f.body).unwrap(), status);
    }

    #[test]
    fn setting_values_read_back_as_they_were(v in any::<String>()) {
        let hex: String = v.bytes().map(|b| format!("{b:02x}")).collect();
        prop_assert_eq!(sluice::sql::read_back_value(&hex), Some(v.clone()));
        let upper = hex.to_uppercase();
        prop_assert_eq!(sluice::sql::read_back_value(&upper), Some(v));
    }
}
