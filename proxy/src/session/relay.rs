//! The relay: client ⇄ server bytes while a client holds a server connection.
//!
//! Frame, don't decode: each direction reads into its buffer, walks the 5-byte headers, and
//! forwards everything walked with one write, straight from the buffer (no copy, no allocation
//! in steady state). A message too large to buffer whole is streamed: its header is acted on and
//! its body forwarded as it arrives. Only ReadyForQuery and CopyInResponse from the server, and
//! the tags of what the client sends, are looked at.
//!
//! Both directions run concurrently in one task, so neither side can deadlock the other by
//! filling a socket buffer while Sluice waits to write the opposite way.
//!
//! # When the server goes back to the pool
//! `pending` counts the requests forwarded that will each end in a ReadyForQuery (Query, Sync,
//! FunctionCall); `partial` is set while messages have been forwarded since the last of those. A
//! ReadyForQuery with status `I` that brings `pending` to zero while nothing is `partial` ends the
//! transaction. Whenever the client half is inside a write, `pending > 0` or `partial` holds (it
//! counts before writing), so the release can never cut a client message in two. Syncs that the
//! server reads during COPY FROM STDIN are ignored by it and so are not counted.

use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed,
};

use bytes::Buf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::ClientIo;
use crate::protocol::backend::{self, TxStatus};
use crate::protocol::frontend::tag;
use crate::protocol::{Header, HEADER_LEN};
use crate::server::{ServerConn, READ_BUFFER};

/// A value both halves read and write. They run in one task, never at once, so relaxed
/// loads and stores suffice (plain moves on common targets); atomics only keep the future `Send`.
#[derive(Default)]
pub struct Shared<A>(A);

macro_rules! shared {
    ($atomic:ty, $t:ty) => {
        impl Shared<$atomic> {
            pub fn new(v: $t) -> Self {
                Shared(<$atomic>::new(v))
            }
            #[inline]
            pub fn get(&self) -> $t {
                self.0.load(Relaxed)
            }
            #[inline]
            pub fn set(&self, v: $t) {
                self.0.store(v, Relaxed)
            }
            #[inline]
            #[allow(dead_code)]
            pub fn replace(&self, v: $t) -> $t {
                let old = self.get();
                self.set(v);
                old
            }
        }
    };
}
shared!(AtomicU32, u32);
shared!(AtomicBool, bool);
shared!(AtomicU64, u64);
shared!(AtomicUsize, usize);

/// Request-tracking state shared by the two halves.
pub struct Flow {
    pub pending: Shared<AtomicU32>,
    pub partial: Shared<AtomicBool>,
    pub copy_in: Shared<AtomicBool>,
    syncs_since_execute: Shared<AtomicU32>,
    status: AtomicU8,
    /// Bytes of a server message still to be streamed to the client.
    pub server_skip: Shared<AtomicUsize>,
    pub to_server: Shared<AtomicU64>,
    pub to_client: Shared<AtomicU64>,
}

impl Flow {
    pub fn new() -> Self {
        Flow {
            pending: Shared::<AtomicU32>::new(0),
            partial: Shared::<AtomicBool>::new(false),
            copy_in: Shared::<AtomicBool>::new(false),
            syncs_since_execute: Shared::<AtomicU32>::new(0),
            status: AtomicU8::new(b'I'),
            server_skip: Shared::<AtomicUsize>::new(0),
            to_server: Shared::<AtomicU64>::new(0),
            to_client: Shared::<AtomicU64>::new(0),
        }
    }

    /// The transaction status of the last ReadyForQuery.
    pub fn status(&self) -> TxStatus {
        TxStatus::from_byte(self.status.load(Relaxed)).unwrap_or(TxStatus::Failed)
    }

    /// Nothing in flight in either direction: the server is between requests.
    pub fn at_rest(&self) -> bool {
        self.pending.get() == 0
            && !self.partial.get()
            && !self.copy_in.get()
            && self.server_skip.get() == 0
    }
}

pub enum End {
    /// The transaction ended (status `I`, nothing in flight): the server can be reused.
    Released,
    /// The client closed its connection or sent Terminate.
    ClientGone,
    /// The client broke the protocol; the text is for its FATAL error.
    ClientProtocol(String),
    /// The server connection failed or broke the protocol.
    ServerGone(String),
}

/// Relays until one of the [`End`]s. With `release` false (session pooling, pinned clients)
/// the relay only ends when one side goes away.
pub async fn relay(
    client: &mut ClientIo,
    server: &mut ServerConn,
    flow: &Flow,
    release: bool,
    max_message: usize,
) -> End {
    let (mut cr, mut cw) = client.stream.split();
    let (mut sr, mut sw) = server.stream.split();
    let cbuf = &mut client.buf;
    let sbuf = &mut server.buf;

    let to_server = async {
        let mut skip = 0usize;
        loop {
            let mut pos = 0;
            loop {
                if skip > 0 {
                    let n = skip.min(cbuf.len() - pos);
                    pos += n;
                    skip -= n;
                    if skip > 0 {
                        break;
                    }
                }
                let h = match Header::peek(&cbuf[pos..]) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => return End::ClientProtocol(e.to_string()),
                };
                if h.total() > max_message {
                    return End::ClientProtocol(format!(
                        "message of type '{}' is {} bytes, over the limit of {max_message} (max_message_bytes)",
                        char::from(h.tag),
                        h.total()
                    ));
                }
                match h.tag {
                    tag::TERMINATE => {
                        if pos > 0 && sw.write_all(&cbuf[..pos]).await.is_err() {
                            return End::ServerGone("write failed".into());
                        }
                        cbuf.clear();
                        return End::ClientGone;
                    }
                    tag::QUERY | tag::FUNCTION_CALL => {
                        flow.pending.set(flow.pending.get() + 1);
                        flow.partial.set(false);
                        flow.syncs_since_execute.set(0);
                    }
                    tag::SYNC => {
                        if !flow.copy_in.get() {
                            flow.pending.set(flow.pending.get() + 1);
                            flow.syncs_since_execute
                                .set(flow.syncs_since_execute.get() + 1);
                        }
                        flow.partial.set(false);
                    }
                    tag::EXECUTE => {
                        flow.syncs_since_execute.set(0);
                        flow.partial.set(true);
                    }
                    tag::COPY_DONE | tag::COPY_FAIL => flow.copy_in.set(false),
                    tag::COPY_DATA => {}
                    _ => flow.partial.set(true),
                }
                let take = h.total().min(cbuf.len() - pos);
                pos += take;
                skip = h.total() - take;
            }
            if pos > 0 {
                if sw.write_all(&cbuf[..pos]).await.is_err() {
                    return End::ServerGone("write to server failed".into());
                }
                cbuf.advance(pos);
                flow.to_server.set(flow.to_server.get() + pos as u64);
            }
            cbuf.reserve(READ_BUFFER);
            match cr.read_buf(cbuf).await {
                Ok(0) | Err(_) => return End::ClientGone,
                Ok(_) => {}
            }
        }
    };

    let to_client = async {
        loop {
            let mut pos = 0;
            let mut done = false;
            loop {
                let skip = flow.server_skip.get();
                if skip > 0 {
                    let n = skip.min(sbuf.len() - pos);
                    pos += n;
                    flow.server_skip.set(skip - n);
                    if skip > n {
                        break;
                    }
                }
                let h = match Header::peek(&sbuf[pos..]) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => return End::ServerGone(e.to_string()),
                };
                done = false;
                match h.tag {
                    backend::tag::READY_FOR_QUERY => {
                        let Some(body) = sbuf.get(pos + HEADER_LEN..pos + h.total()) else {
                            break;
                        };
                        let status = match backend::ready_for_query_status(body) {
                            Ok(s) => s,
                            Err(e) => return End::ServerGone(e.to_string()),
                        };
                        flow.status.store(status.byte(), Relaxed);
                        flow.pending.set(flow.pending.get().saturating_sub(1));
                        done = release
                            && status == TxStatus::Idle
                            && flow.pending.get() == 0
                            && !flow.partial.get();
                    }
                    backend::tag::COPY_IN_RESPONSE => {
                        // Syncs sent after the Execute that started this COPY are read by the
                        // server in copy mode and ignored: they will get no ReadyForQuery.
                        let ignored = flow.syncs_since_execute.replace(0);
                        flow.pending.set(flow.pending.get().saturating_sub(ignored));
                        flow.copy_in.set(true);
                    }
                    _ => {}
                }
                let take = h.total().min(sbuf.len() - pos);
                pos += take;
                flow.server_skip.set(h.total() - take);
            }
            if pos > 0 {
                if cw.write_all(&sbuf[..pos]).await.is_err() {
                    return End::ClientGone;
                }
                sbuf.advance(pos);
                flow.to_client.set(flow.to_client.get() + pos as u64);
            }
            if done && sbuf.is_empty() && flow.server_skip.get() == 0 {
                return End::Released;
            }
            sbuf.reserve(READ_BUFFER);
            match sr.read_buf(sbuf).await {
                Ok(0) => {
                    return End::ServerGone("server closed the connection unexpectedly".into())
                }
                Err(e) => return End::ServerGone(e.to_string()),
                Ok(_) => {}
            }
        }
    };

    tokio::select! {
        end = to_server => end,
        end = to_client => end,
    }
}
