//! The relay's sans-I/O core (`relay::Core`): fed what a client and a server send, cut into
//! reads anywhere, it frames both directions, rewrites prepared statements, answers or
//! swallows messages, and says when the server may go back to the pool. Driven as the relay's
//! shell and the session drive it: one core per transaction, each side walked after each read.
//!
//! Input: one byte of configuration (bit 0: session pooling; bit 1: `on_session_state =
//! "reject"`; bit 2: a small `max_message_bytes`; bits 3-4: room for 1-4 statements per
//! server; bit 5: Sluice's settings Query first; bit 6: the client started with settings of its
//! own, which its resets bring back), then reads, each a byte (even: the client's,
//! odd: the server's), a big-endian `u16` length and that many bytes.
//!
//! Checks: a walk consumes only what is buffered; without statement tracking or startup values
//! to bring back it forwards the client's bytes as they came and the server's with at most
//! repeated ParameterStatus messages left out; both output streams are well framed; and a server goes back to the pool
//! only between whole messages in both directions. A client walk that holds the rest for a
//! Query of Sluice's own is not walked again until the core lets it go, and that Query goes to
//! the server first, as the shell does it.
#![no_main]

use std::collections::hash_map::RandomState;
use std::sync::OnceLock;

use bytes::{Buf, BytesMut};
use libfuzzer_sys::fuzz_target;
use sluice::prepared::{ClientStatements, ServerStatements};
use sluice::protocol::backend::Out;
use sluice::protocol::frontend::tag as fe;
use sluice::protocol::Header;
use sluice::relay::{Core, End, Flow, Statements};
use sluice::settings::Settings;
use sluice::sql::Encoding;

fn hasher() -> &'static RandomState {
    static H: OnceLock<RandomState> = OnceLock::new();
    H.get_or_init(RandomState::new)
}

/// The reads of one input, client's and server's.
struct Reads<'a> {
    data: &'a [u8],
}

impl Reads<'_> {
    /// Appends the next read to its side's buffer; false when there are no more.
    fn feed(&mut self, client: &mut BytesMut, server: &mut BytesMut) -> bool {
        let Some((&side, rest)) = self.data.split_first() else {
            return false;
        };
        let len = match rest {
            [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
            _ => 0,
        };
        let rest = rest.get(2..).unwrap_or_default();
        let (read, rest) = rest.split_at(len.min(rest.len()));
        self.data = rest;
        let buf = if side % 2 == 0 { client } else { server };
        buf.extend_from_slice(read);
        true
    }
}

/// Whether `stream` is whole messages with valid headers (`whole`), or so up to a last
/// message still being streamed.
fn framed(stream: &[u8], whole: bool) {
    let mut pos = 0;
    while pos < stream.len() {
        match Header::peek(&stream[pos..]) {
            Ok(Some(h)) if pos + h.total() <= stream.len() => pos += h.total(),
            Ok(_) => {
                assert!(!whole, "a partial message at {pos} of {}", stream.len());
                return;
            }
            Err(e) => panic!("a corrupt header at {pos}: {e}"),
        }
    }
}

/// The messages of a well-framed `stream` (its last one possibly partial), split into
/// ParameterStatus messages and the others.
fn split_parameter_status(stream: &[u8]) -> (Vec<&[u8]>, Vec<&[u8]>) {
    let (mut reports, mut others) = (Vec::new(), Vec::new());
    let mut pos = 0;
    while pos < stream.len() {
        let end = match Header::peek(&stream[pos..]) {
            Ok(Some(h)) => (pos + h.total()).min(stream.len()),
            _ => stream.len(),
        };
        let msg = &stream[pos..end];
        if msg[0] == b'S' {
            reports.push(msg);
        } else {
            others.push(msg);
        }
        pos = end;
    }
    (reports, others)
}

fuzz_target!(|data: &[u8]| {
    let Some((&config, data)) = data.split_first() else {
        return;
    };
    let pooling = config & 1 == 0;
    let reject = config & 2 != 0;
    let max_message = if config & 4 != 0 { 1 << 12 } else { 1 << 20 };
    let max_prepared = usize::from((config >> 3) & 3) + 1;
    let mut prefix = config & 32 != 0;
    let mut startup = Settings::new();
    if config & 64 != 0 {
        startup.insert("application_name".into(), "fuzz".into());
        startup.insert("timezone".into(), "UTC".into());
    }

    let mut client = ClientStatements::default();
    let mut on_server = ServerStatements::with_capacity(max_prepared);
    let mut reads = Reads { data };
    let (mut cbuf, mut sbuf) = (BytesMut::new(), BytesMut::new());
    let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
    // What the server walks consumed, to compare with what reached the client.
    let mut from_server = Vec::new();
    let mut encoding = Encoding::AsciiSafe;
    let mut pinned = None;

    'session: loop {
        // Between transactions the session waits for the client; the pooled server is not read.
        while cbuf.is_empty() {
            if !reads.feed(&mut cbuf, &mut sbuf) {
                break 'session;
            }
        }
        if cbuf.first() == Some(&fe::TERMINATE) {
            break;
        }
        let mut flow = Flow::new();
        flow.encoding = encoding;
        flow.release = pooling && pinned.is_none();
        let statements = pooling.then_some(Statements {
            client: &mut client,
            hasher: hasher(),
            reject_session_state: reject,
        });
        let mut core = Core::new(&mut flow, max_message, statements, &mut on_server, &startup);
        if std::mem::take(&mut prefix) && pooling {
            core.prefix();
            let mut q = BytesMut::new();
            Out::query(&mut q, "SELECT set_config('work_mem', '8MB', false)");
            to_server.extend_from_slice(&q);
        }
        let mut held = false;
        let end = 'relay: loop {
            if !held || !core.holding() {
                let w = match core.client(&cbuf) {
                    Ok(w) => w,
                    Err(end) => break 'relay end,
                };
                assert!(w.used <= cbuf.len());
                // Resets are followed with statement tracking, or with startup values to bring back.
                assert!(
                    !w.held || pooling || !startup.is_empty(),
                    "held with nothing to reset"
                );
                held = w.held;
                if w.staged {
                    assert!(
                        pooling || !startup.is_empty(),
                        "staged with nothing to rewrite"
                    );
                    to_server.extend_from_slice(core.staged_for_server());
                } else {
                    to_server.extend_from_slice(&cbuf[..w.used]);
                }
                cbuf.advance(w.used);
                if w.terminate {
                    break 'relay End::ClientGone;
                }
            }
            if core.take_due() {
                to_client.extend_from_slice(core.staged_for_client());
                if sbuf.is_empty() && core.releasable() {
                    break 'relay End::Released;
                }
            }
            let w = match core.server(&sbuf) {
                Ok(w) => w,
                Err(end) => break 'relay end,
            };
            assert!(w.used <= sbuf.len());
            if w.staged {
                // Checked below when there is nothing to rewrite: only repeated
                // ParameterStatus messages are left out.
                to_client.extend_from_slice(core.staged_for_client());
            } else {
                to_client.extend_from_slice(&sbuf[..w.used]);
            }
            from_server.extend_from_slice(&sbuf[..w.used]);
            sbuf.advance(w.used);
            if let Some(own) = core.take_for_server() {
                assert!(
                    pooling || !startup.is_empty(),
                    "a Query of Sluice's own with nothing to reset"
                );
                framed(&own, true);
                to_server.extend_from_slice(&own);
            }
            if w.ready && sbuf.is_empty() && core.releasable() {
                break 'relay End::Released;
            }
            if !reads.feed(&mut cbuf, &mut sbuf) {
                break 'relay End::ClientGone;
            }
        };
        drop(core);
        encoding = flow.encoding;
        pinned = pinned.or(flow.pinned());
        let released = matches!(end, End::Released);
        // Released only between whole messages, both ways.
        framed(&to_server, released);
        framed(&to_client, released);
        if released {
            assert!(flow.at_rest() && pooling);
        } else {
            break;
        }
    }
    framed(&to_server, false);
    framed(&to_client, false);
    if !pooling && startup.is_empty() {
        let (reports_in, others_in) = split_parameter_status(&from_server);
        let (reports_out, others_out) = split_parameter_status(&to_client);
        assert_eq!(
            others_in, others_out,
            "the server's messages reach the client unchanged"
        );
        assert!(
            reports_out.iter().all(|r| reports_in.contains(r)),
            "a ParameterStatus the server did not send"
        );
    }
});
