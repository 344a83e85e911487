//! The core replayed over sessions captured from a real PostgreSQL through Sluice (see
//! `../fixtures/README.md`): fed the recorded client and server bytes, it must send each side
//! exactly what Sluice sent, however the bytes are cut into reads; and scenario by scenario, the
//! decisions that matter (answers added or swallowed, statements re-prepared, releases) are
//! checked on the messages themselves.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};

use bytes::{Buf, BytesMut};

use super::*;
use crate::prepared::{ClientStatements, ServerStatements};
use crate::protocol::frontend::tag as fe;
use crate::sql::Pin;

/// One captured session.
struct Fixture {
    name: &'static str,
    config: HashMap<String, String>,
    /// Input chunks in causal order: `c` from the client, `s` from the server.
    inputs: Vec<(char, Vec<u8>)>,
    /// What Sluice sent the server (`>`) and the client (`<`), concatenated.
    to_server: Vec<u8>,
    to_client: Vec<u8>,
}

macro_rules! fixture {
    ($name:literal) => {
        Fixture::parse($name, include_str!(concat!("../fixtures/", $name, ".txt")))
    };
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

impl Fixture {
    fn parse(name: &'static str, text: &str) -> Fixture {
        let mut f = Fixture {
            name,
            config: HashMap::new(),
            inputs: Vec::new(),
            to_server: Vec::new(),
            to_client: Vec::new(),
        };
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (dir, rest) = line.split_once(' ').expect("direction and data");
            match dir {
                "@" => {
                    let (k, v) = rest.split_once('=').expect("key = value");
                    f.config
                        .insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
                }
                "c" => f.inputs.push(('c', unhex(rest))),
                "s" => f.inputs.push(('s', unhex(rest))),
                ">" => f.to_server.extend(unhex(rest)),
                "<" => f.to_client.extend(unhex(rest)),
                other => panic!("{name}: unknown line kind {other:?}"),
            }
        }
        f
    }

    fn config(&self, key: &str) -> Option<&str> {
        self.config.get(key).map(String::as_str)
    }
}

/// What the core did over a whole session.
#[derive(Debug, Default)]
struct Replayed {
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    /// How each relay (one per transaction, or one for a pinned session) ended.
    ends: Vec<End>,
    pinned: Option<Pin>,
}

/// Replays `f`'s inputs, each chunk cut into pieces of at most `piece` bytes, as the session and
/// the relay's shell would: one core per transaction, started when the client has sent
/// something, walking each side after every read and releasing when the core says so.
fn replay(f: &Fixture, piece: usize) -> Replayed {
    let pooling = f.config("pool_mode") != Some("session");
    let reject = f.config("on_session_state") == Some("reject");
    let max_prepared = f
        .config("max_prepared_statements")
        .map_or(200, |v| v.parse().expect("number"));
    let max_message = f
        .config("max_message_bytes")
        .map_or(64 << 20, |v| v.parse().expect("number"));
    let hasher = RandomState::new();
    let mut client = ClientStatements::default();
    let mut on_server = ServerStatements::with_capacity(max_prepared);
    let mut out = Replayed::default();
    let (mut cbuf, mut sbuf) = (BytesMut::new(), BytesMut::new());
    let mut inputs = Inputs {
        chunks: f.inputs.iter(),
        pending: VecDeque::new(),
        piece,
    };
    let mut feed = |cbuf: &mut BytesMut, sbuf: &mut BytesMut, to_server: &[u8]| {
        inputs.feed(cbuf, sbuf, to_server)
    };
    'session: loop {
        // Between transactions the session waits for the client; a pooled server is not read.
        while cbuf.is_empty() {
            if !feed(&mut cbuf, &mut sbuf, &out.to_server) {
                break 'session;
            }
        }
        if cbuf.first() == Some(&fe::TERMINATE) {
            break;
        }
        let mut flow = Flow::new();
        flow.release = pooling && out.pinned.is_none();
        let statements = pooling.then_some(Statements {
            client: &mut client,
            hasher: &hasher,
            reject_session_state: reject,
        });
        let startup = Settings::new();
        let mut core = Core::new(&mut flow, max_message, statements, &mut on_server, &startup);
        let end = 'relay: loop {
            let w = match core.client(&cbuf) {
                Ok(w) => w,
                Err(end) => break 'relay end,
            };
            let bytes = if w.staged {
                core.staged_for_server()
            } else {
                &cbuf[..w.used]
            };
            out.to_server.extend_from_slice(bytes);
            cbuf.advance(w.used);
            if w.terminate {
                break 'relay End::ClientGone;
            }
            if core.take_due() {
                out.to_client.extend_from_slice(core.staged_for_client());
                if sbuf.is_empty() && core.releasable() {
                    break 'relay End::Released;
                }
            }
            let w = match core.server(&sbuf) {
                Ok(w) => w,
                Err(end) => break 'relay end,
            };
            let bytes = if w.staged {
                core.staged_for_client()
            } else {
                &sbuf[..w.used]
            };
            out.to_client.extend_from_slice(bytes);
            sbuf.advance(w.used);
            if w.ready && sbuf.is_empty() && core.releasable() {
                break 'relay End::Released;
            }
            if !feed(&mut cbuf, &mut sbuf, &out.to_server) {
                break 'relay End::ClientGone;
            }
        };
        drop(core);
        out.pinned = out.pinned.or(flow.pinned());
        let gone = !matches!(end, End::Released);
        out.ends.push(end);
        if gone {
            break;
        }
    }
    out
}

/// The fixture's input chunks, each cut into pieces, fed one piece at a time.
struct Inputs<'f> {
    chunks: std::slice::Iter<'f, (char, Vec<u8>)>,
    pending: VecDeque<(char, Vec<u8>)>,
    piece: usize,
}

impl Inputs<'_> {
    /// Appends the next piece to the client's or the server's buffer; false when all are fed.
    /// The server's chunks name statements as the fixture does (`sluice_` and an ordinal): they
    /// get the names this replay gave them, in the same order of first appearance.
    fn feed(&mut self, cbuf: &mut BytesMut, sbuf: &mut BytesMut, to_server: &[u8]) -> bool {
        if self.pending.is_empty() {
            let Some((dir, bytes)) = self.chunks.next() else {
                return false;
            };
            let bytes = if *dir == 's' {
                denormalize(bytes, to_server)
            } else {
                bytes.clone()
            };
            for piece in bytes.chunks(self.piece) {
                self.pending.push_back((*dir, piece.to_vec()));
            }
        }
        match self.pending.pop_front() {
            Some(('c', b)) => cbuf.extend_from_slice(&b),
            Some((_, b)) => sbuf.extend_from_slice(&b),
            None => {}
        }
        true
    }
}

const NAME_PREFIX: &[u8] = b"sluice_";

/// Every `sluice_<16 hex>` statement name in `bytes`, as (position, digits).
fn statement_names(bytes: &[u8]) -> Vec<(usize, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = memchr::memmem::find(&bytes[i..], NAME_PREFIX) {
        let digits = i + at + NAME_PREFIX.len();
        match bytes.get(digits..digits + 16) {
            Some(d) if d.iter().all(u8::is_ascii_hexdigit) => {
                out.push((digits, d));
                i = digits + 16;
            }
            _ => i = digits,
        }
    }
    out
}

/// `bytes` with the fixture's statement ordinals replaced by the names `to_server` used first.
fn denormalize(bytes: &[u8], to_server: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let found = statement_names(bytes);
    if found.is_empty() {
        return out;
    }
    let mut order: Vec<&[u8]> = Vec::new();
    for (_, d) in statement_names(to_server) {
        if !order.contains(&d) {
            order.push(d);
        }
    }
    for (at, d) in found {
        let n = std::str::from_utf8(d)
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok());
        if let Some(name) = n.and_then(|n| n.checked_sub(1)).and_then(|i| order.get(i)) {
            out[at..at + 16].copy_from_slice(name);
        }
    }
    out
}

/// `bytes` with each statement name replaced by its ordinal in `reference`'s order of first
/// appearance (the numbering the fixtures use throughout).
fn normalize_as(bytes: &[u8], reference: &[u8]) -> Vec<u8> {
    let mut order: Vec<&[u8]> = Vec::new();
    for (_, d) in statement_names(reference) {
        if !order.contains(&d) {
            order.push(d);
        }
    }
    let mut out = bytes.to_vec();
    for (at, d) in statement_names(bytes) {
        if let Some(i) = order.iter().position(|o| *o == d) {
            out[at..at + 16].copy_from_slice(format!("{:016x}", i + 1).as_bytes());
        }
    }
    out
}

/// Replaces the digits of every `sluice_<16 hex>` statement name by its number in order of
/// first appearance, as the fixtures do (the hash is keyed anew in every process).
fn normalize(bytes: &[u8]) -> Vec<u8> {
    const PREFIX: &[u8] = b"sluice_";
    let mut out = bytes.to_vec();
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut i = 0;
    while i + PREFIX.len() + 16 <= out.len() {
        let digits = i + PREFIX.len()..i + PREFIX.len() + 16;
        if &out[i..digits.start] == PREFIX && out[digits.clone()].iter().all(u8::is_ascii_hexdigit)
        {
            let name = out[digits.clone()].to_vec();
            let n = match seen.iter().position(|s| *s == name) {
                Some(p) => p + 1,
                None => {
                    seen.push(name);
                    seen.len()
                }
            };
            out[digits.clone()].copy_from_slice(format!("{n:016x}").as_bytes());
            i = digits.end;
        } else {
            i += 1;
        }
    }
    out
}

/// A byte stream as (tag, body) messages.
fn messages(bytes: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let h = Header::peek(&bytes[pos..])
            .expect("valid header")
            .expect("whole header");
        out.push((h.tag, &bytes[pos + HEADER_LEN..pos + h.total()]));
        pos += h.total();
    }
    out
}

fn tags(bytes: &[u8]) -> String {
    messages(bytes)
        .iter()
        .map(|(t, _)| char::from(*t))
        .collect()
}

fn count(bytes: &[u8], tag: u8) -> usize {
    messages(bytes).iter().filter(|(t, _)| *t == tag).count()
}

fn client_sent(f: &Fixture) -> Vec<u8> {
    f.inputs
        .iter()
        .filter(|(d, _)| *d == 'c')
        .flat_map(|(_, b)| b.iter().copied())
        .collect()
}

fn server_sent(f: &Fixture) -> Vec<u8> {
    f.inputs
        .iter()
        .filter(|(d, _)| *d == 's')
        .flat_map(|(_, b)| b.iter().copied())
        .collect()
}

/// Replays `f` as recorded and cut into small pieces; the core must send each side exactly what
/// Sluice sent, every time. Returns the replay as recorded.
fn golden(f: &Fixture) -> Replayed {
    let as_recorded = replay(f, usize::MAX);
    for piece in [usize::MAX, 7, 1] {
        // Single bytes only for the small fixtures (a walk per byte).
        if piece == 1 && f.inputs.iter().map(|(_, b)| b.len()).sum::<usize>() > 100_000 {
            continue;
        }
        let r = replay(f, piece);
        assert!(
            normalize(&r.to_server) == f.to_server,
            "{}: bytes to the server differ (pieces of {piece}):\n core: {}\n then: {}",
            f.name,
            tags(&r.to_server),
            tags(&f.to_server)
        );
        assert!(
            normalize_as(&r.to_client, &r.to_server) == f.to_client,
            "{}: bytes to the client differ (pieces of {piece}):\n core: {}\n then: {}",
            f.name,
            tags(&r.to_client),
            tags(&f.to_client)
        );
        assert_eq!(
            format!("{:?}", r.ends),
            format!("{:?}", as_recorded.ends),
            "{}: pieces of {piece}",
            f.name
        );
    }
    assert_eq!(
        statement_names(&as_recorded.to_client).len(),
        0,
        "{}: Sluice's statement names reach the client",
        f.name
    );
    assert!(
        as_recorded
            .ends
            .iter()
            .all(|e| matches!(e, End::Released | End::ClientGone)),
        "{}: {:?}",
        f.name,
        as_recorded.ends
    );
    as_recorded
}

#[test]
fn simple_query() {
    let f = fixture!("simple_query");
    let r = golden(&f);
    // Nothing rewritten: what each side sent reaches the other unchanged.
    assert_eq!(f.to_server, client_sent(&f)[..f.to_server.len()]);
    assert_eq!(f.to_client, server_sent(&f));
    assert!(
        r.ends.iter().filter(|e| matches!(e, End::Released)).count() >= 3,
        "{:?}",
        r.ends
    );
}

#[test]
fn extended_pipelined() {
    let f = fixture!("extended_pipelined");
    let r = golden(&f);
    let sent = client_sent(&f);
    // Every Parse and Close the client sent is answered, though the server saw fewer: the
    // re-Parse of a statement it has and the Close of a named statement are Sluice's to answer;
    // a Parse of a name not closed is refused, as PostgreSQL refuses it.
    assert_eq!(
        count(&r.to_client, be::PARSE_COMPLETE),
        count(&sent, fe::PARSE) - 1
    );
    assert_eq!(occurrences(&r.to_client, b"C42P05\0"), 1);
    assert!(count(&r.to_server, fe::PARSE) < count(&sent, fe::PARSE));
    assert_eq!(
        count(&r.to_client, be::CLOSE_COMPLETE),
        count(&sent, fe::CLOSE)
    );
    assert_eq!(count(&r.to_server, fe::CLOSE), 0);
    // Statement names reach the server renamed (s1 itself only after its Close, unknown to
    // Sluice, so the server's error names it as the client did).
    assert!(r.to_server.windows(7).any(|w| w == b"sluice_"));
}

/// How many times `needle` occurs in `bytes`.
fn occurrences(bytes: &[u8], needle: &[u8]) -> usize {
    bytes.windows(needle.len()).filter(|w| *w == needle).count()
}

#[test]
fn error_mid_batch() {
    let f = fixture!("error_mid_batch");
    let r = golden(&f);
    let sent = client_sent(&f);
    // Every Sync gets its ReadyForQuery, errors or not; the server's errors reach the client.
    assert_eq!(
        count(&r.to_client, be::READY_FOR_QUERY),
        count(&sent, fe::SYNC)
    );
    assert!(count(&r.to_client, be::ERROR_RESPONSE) >= 4);
    // The statement the server refused is forgotten and prepared again when reused: the
    // server sees more Parses than the client's one per statement name.
    assert!(count(&r.to_server, fe::PARSE) > count(&sent, fe::PARSE) - 2);
}

#[test]
fn copy_in_out_and_fail() {
    let f = fixture!("copy");
    let r = golden(&f);
    let sent = client_sent(&f);
    assert_eq!(count(&r.to_client, be::COPY_IN_RESPONSE), 4);
    assert_eq!(count(&r.to_client, be::COPY_OUT_RESPONSE), 1);
    // All the client's CopyData reach the server, and CopyFail too.
    assert_eq!(
        count(&r.to_server, fe::COPY_DATA),
        count(&sent, fe::COPY_DATA)
    );
    assert_eq!(count(&r.to_server, fe::COPY_FAIL), 1);
    // Syncs the server reads in copy mode get no ReadyForQuery, yet every request ends and
    // the server goes back to the pool after each.
    assert!(
        count(&r.to_client, be::READY_FOR_QUERY) < count(&sent, fe::SYNC) + count(&sent, fe::QUERY)
    );
    assert!(
        r.ends.iter().filter(|e| matches!(e, End::Released)).count() >= 4,
        "{:?}",
        r.ends
    );
}

#[test]
fn portal_suspended() {
    let f = fixture!("portal_suspended");
    let r = golden(&f);
    assert_eq!(count(&r.to_client, be::PORTAL_SUSPENDED), 2);
    // The block holds its server from BEGIN to COMMIT: one relay for it.
    assert_eq!(
        r.ends.iter().filter(|e| matches!(e, End::Released)).count(),
        1,
        "{:?}",
        r.ends
    );
}

#[test]
fn flush() {
    let f = fixture!("flush");
    let r = golden(&f);
    // A Flush gets the answers so far, with no ReadyForQuery: the client reads ParseComplete
    // and the description before its first ReadyForQuery.
    let t = tags(&r.to_client);
    assert!(
        t.find('1') < t.find('Z') && t.find('t') < t.find('Z'),
        "{t}"
    );
    assert_eq!(
        count(&r.to_server, fe::FLUSH),
        count(&client_sent(&f), fe::FLUSH)
    );
}

#[test]
fn evicted_statement_is_prepared_again() {
    let f = fixture!("evicted_reprepared");
    let r = golden(&f);
    let sent = client_sent(&f);
    // Sluice closes evicted statements on the server (the client's one Close it answers
    // itself)...
    assert_eq!(count(&sent, fe::CLOSE), 1);
    assert!(count(&r.to_server, fe::CLOSE) >= 2);
    // ...prepares the ones used again, and swallows the answers to both: the client gets one
    // ParseComplete per Parse it sent and one CloseComplete, for its own Close.
    assert!(count(&r.to_server, fe::PARSE) > count(&sent, fe::PARSE));
    assert_eq!(
        count(&r.to_client, be::PARSE_COMPLETE),
        count(&sent, fe::PARSE)
    );
    assert_eq!(count(&r.to_client, be::CLOSE_COMPLETE), 1);
}

#[test]
fn deallocate_and_discard() {
    let f = fixture!("deallocate_discard");
    let r = golden(&f);
    // DEALLOCATE of a known name is Sluice's to answer: the client gets one more
    // "DEALLOCATE" command tag than the server sent.
    let tag = b"DEALLOCATE\0";
    assert_eq!(
        occurrences(&r.to_client, tag),
        occurrences(&server_sent(&f), tag) + 1
    );
    assert_eq!(
        occurrences(&r.to_server, b"DEALLOCATE s1"),
        0,
        "the server never hears of the client's names"
    );
    assert!(occurrences(&r.to_server, b"DISCARD ALL") == 1);
}

#[test]
fn session_state_is_refused_in_reject_mode() {
    let f = fixture!("session_state_reject");
    let r = golden(&f);
    // Three refusals by Sluice itself (0A000), none of them from the server, and none of the
    // refused statements sent.
    let code = b"C0A000\0";
    assert_eq!(occurrences(&r.to_client, code), 3);
    assert_eq!(occurrences(&server_sent(&f), code), 0);
    assert_eq!(occurrences(&r.to_server, b"LISTEN"), 0);
    assert!(r.pinned.is_none());
}

#[test]
fn session_state_pins_the_server() {
    let f = fixture!("session_state_pin");
    let r = golden(&f);
    assert_eq!(r.pinned, Some(Pin::Set));
    // Once pinned, the relay only ends when the client leaves.
    assert!(
        matches!(r.ends.last(), Some(End::ClientGone)),
        "{:?}",
        r.ends
    );
}

#[test]
fn session_pooling_passes_everything_through() {
    let f = fixture!("session_pooling");
    let r = golden(&f);
    let sent = client_sent(&f);
    assert_eq!(f.to_server[..], sent[..f.to_server.len()]);
    assert_eq!(f.to_client, server_sent(&f));
    assert_eq!(r.ends.len(), 1, "{:?}", r.ends);
}

#[test]
fn large_messages_stream() {
    let f = fixture!("large_message");
    let r = golden(&f);
    // Forwarded unchanged, though far larger than any read.
    assert_eq!(r.to_client, server_sent(&f));
    assert!(f.inputs.iter().all(|(_, b)| b.len() <= 16 * 1024));
    assert!(messages(&r.to_server)
        .iter()
        .any(|(_, body)| body.len() > 250_000));
}

/// Resets: the core fed bytes directly (a client with startup settings, answers built as
/// PostgreSQL sends them).
mod resets;
