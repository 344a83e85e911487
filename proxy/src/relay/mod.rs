//! The relay: client ⇄ server bytes while a client holds a server connection.
//!
//! [`core`] decides what to forward, add, leave out, and when the server may go back to the
//! pool; this module only moves bytes. Both directions are driven by one hand-written poll in
//! one task, so neither side can deadlock the other by filling a socket buffer while Sluice waits
//! to write the opposite way, and the core is held by `&mut` (no locks, no atomics). Each
//! direction is either reading (then walking what arrived) or writing the output of its last
//! walk; its input buffer is advanced past the walked bytes once they are written.

pub mod core;

use std::future::poll_fn;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use self::core::CANCEL_GRACE;
pub use self::core::{Core, End, Flow, Parameter, Reported, ServerFault, Statements, Walked};
use crate::client_conn::ClientConn;
use crate::prepared::ServerStatements;
use crate::server::{CancelKey, ServerConn, READ_BUFFER};
use crate::settings::Settings;

/// Relays until one of the [`End`]s. With `flow.release` false (session pooling, pinned
/// clients) the relay only ends when one side goes away. `prefix` is a Query Sluice sends first
/// (the client's settings), whose answers are swallowed; only with `statements`. `startup`: the
/// client's startup settings, which its `RESET ALL` and the like bring back.
pub async fn relay(
    client: &mut ClientConn,
    server: &mut ServerConn,
    flow: &mut Flow,
    max_message: usize,
    statements: Option<Statements<'_>>,
    prefix: Option<Bytes>,
    startup: &Settings,
) -> End {
    let (client, client_buf) = client.relay_parts();
    let cancel = Some(server.cancel_key());
    let ends = Ends {
        client,
        client_buf,
        server: &mut server.stream,
        server_buf: &mut server.buf,
        on_server: &mut server.prepared,
        cancel,
    };
    relay_streams(ends, flow, max_message, statements, prefix, startup).await
}

/// The two ends of a relay: each side's stream and read buffer, and the statements prepared on
/// the server.
pub struct Ends<'a, C, S> {
    pub client: &'a mut C,
    pub client_buf: &'a mut BytesMut,
    pub server: &'a mut S,
    pub server_buf: &'a mut BytesMut,
    pub on_server: &'a mut ServerStatements,
    /// How to cancel the server's request (`query_timeout`); none, and the timeout ends the
    /// relay at once.
    pub cancel: Option<CancelKey>,
}

/// [`relay`] over any streams (benchmarks drive it over in-memory pipes).
pub async fn relay_streams<C, S>(
    ends: Ends<'_, C, S>,
    flow: &mut Flow,
    max_message: usize,
    statements: Option<Statements<'_>>,
    prefix: Option<Bytes>,
    startup: &Settings,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let prefix = prefix.filter(|_| statements.is_some());
    let mut core = Core::new(flow, max_message, statements, ends.on_server, startup);
    let up = match prefix {
        Some(p) => {
            core.prefix();
            Direction::writing(Output::Prefix(p), 0)
        }
        None => Direction::walking(),
    };
    let mut shell = Shell {
        core,
        client: ends.client,
        cbuf: ends.client_buf,
        server: ends.server,
        sbuf: ends.server_buf,
        up,
        down: Direction::walking(),
        client_timer: None,
        query_timer: None,
        cancel: ends.cancel,
        cancelled: false,
    };
    poll_fn(|cx| shell.poll(cx)).await
}

/// Where the bytes of a write come from.
enum Output {
    /// The first `n` bytes of the direction's input buffer, as walked.
    Buffer(usize),
    /// The core's staged output for this direction.
    Staged,
    /// Bytes of their own (the settings prefix).
    Prefix(Bytes),
}

/// One direction's state.
enum Step {
    /// Walk what is buffered (just read, or left after a write).
    Walk,
    /// Read more.
    Read,
    /// Write `output` (`written` bytes of it so far), then flush and advance the input buffer
    /// by `used`.
    Write {
        output: Output,
        written: usize,
        used: usize,
    },
}

struct Direction {
    step: Step,
    /// Room the input buffer must have for the next read (a whole message the walk waits for).
    need: usize,
    /// After this write: the walk saw a ReadyForQuery, or Sluice's own answers went out; the
    /// server may be releasable.
    check_release: bool,
    /// After this write: the client said goodbye.
    terminate: bool,
    /// The last walk stopped at messages that wait for a Query of Sluice's own.
    held: bool,
}

impl Direction {
    fn walking() -> Self {
        Direction {
            step: Step::Walk,
            need: 0,
            check_release: false,
            terminate: false,
            held: false,
        }
    }

    fn writing(output: Output, used: usize) -> Self {
        Direction {
            step: Step::Write {
                output,
                written: 0,
                used,
            },
            ..Direction::walking()
        }
    }

    /// Sets up the write of a walk's output (or, with nothing to write, goes on reading).
    fn walked(&mut self, w: Walked, staged_len: usize, buf: &mut BytesMut) {
        self.need = w.need;
        self.held = w.held;
        let len = if w.staged { staged_len } else { w.used };
        if len == 0 && !w.terminate && !w.ready {
            buf.advance(w.used);
            self.step = Step::Read;
            return;
        }
        self.check_release = w.ready;
        self.terminate = w.terminate;
        self.step = Step::Write {
            output: if w.staged {
                Output::Staged
            } else {
                Output::Buffer(w.used)
            },
            written: 0,
            used: w.used,
        };
    }
}

/// What follows a write: walking what is left (a message the walk waits for), or reading.
fn after_write(buf: &BytesMut) -> Step {
    if buf.is_empty() {
        Step::Read
    } else {
        Step::Walk
    }
}

struct Shell<'a, C, S> {
    core: Core<'a>,
    client: &'a mut C,
    cbuf: &'a mut BytesMut,
    server: &'a mut S,
    sbuf: &'a mut BytesMut,
    /// Client → server.
    up: Direction,
    /// Server → client.
    down: Direction,
    /// Running while the server waits for the client: idle inside a transaction
    /// (`idle_transaction_timeout`) or stalled mid-request (`client_stall_timeout`).
    client_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Running while the server owes an answer (`query_timeout`), from the request sent or the
    /// last ReadyForQuery; after the cancel, for [`CANCEL_GRACE`].
    query_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    cancel: Option<CancelKey>,
    /// A CancelRequest went out for the request in flight.
    cancelled: bool,
}

/// What one poll of a direction did: `Ready(Ok)` made progress (poll again), `Pending` waits
/// for a waker already registered.
type Progress = Poll<Result<(), End>>;

impl<C, S> Shell<'_, C, S>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Drives both directions as far as they go. The server half only depends on the client
    /// half through answers of Sluice's own that a client walk queues, which the server half
    /// picks up when it runs next: so one pass, client half first, leaves nothing undone.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        loop {
            loop {
                match self.poll_up(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(end)) => return Poll::Ready(end),
                    Poll::Pending => break,
                }
            }
            loop {
                match self.poll_down(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(end)) => return Poll::Ready(end),
                    Poll::Pending => break,
                }
            }
            // The server half may have let the client half go on: with a Query of Sluice's own
            // to send first, or with the client's messages it held back.
            if matches!(self.up.step, Step::Read) {
                if let Some(own) = self.core.take_for_server() {
                    self.up.step = Step::Write {
                        output: Output::Prefix(own),
                        written: 0,
                        used: 0,
                    };
                    continue;
                }
                if self.up.held && !self.core.holding() {
                    self.up.held = false;
                    self.up.step = Step::Walk;
                    continue;
                }
            }
            // The server half may have just left the server waiting for the client (idle
            // inside a transaction, or in a COPY FROM STDIN): the client half arms its timer
            // when it next waits, so let it wait once more.
            if let Poll::Ready(end) = self.poll_query_timer(cx) {
                return Poll::Ready(end);
            }
            let arm = self.client_timer.is_none()
                && matches!(self.up.step, Step::Read)
                && self.client_deadline().is_some();
            if !arm {
                return Poll::Pending;
            }
        }
    }

    /// `query_timeout`: while the server owes an answer, a timer; when it fires, a CancelRequest
    /// (the server answers it with its own `57014` error, and the session goes on), and when
    /// even that is not answered within [`CANCEL_GRACE`], the end of the relay.
    fn poll_query_timer(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        let timeout = self.core.flow().query_timeout;
        if timeout.is_zero() || self.core.flow().pending() == 0 {
            self.query_timer = None;
            self.cancelled = false;
            return Poll::Pending;
        }
        loop {
            let timer = self
                .query_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let Some(key) = self.cancel.filter(|_| !self.cancelled) else {
                return Poll::Ready(End::QueryTimeout);
            };
            self.cancelled = true;
            tracing::info!(timeout = ?timeout, "request not answered within query_timeout: cancelling it");
            crate::metrics::query_cancelled("query_timeout");
            tokio::spawn(async move {
                if let Err(e) = key.send(CANCEL_GRACE).await {
                    tracing::warn!(error = %e, "sending a cancel request (query_timeout) failed");
                }
            });
            self.query_timer = Some(Box::pin(tokio::time::sleep(CANCEL_GRACE)));
        }
    }

    /// See [`Flow::client_deadline`]: client bytes buffered while the client half reads are
    /// the start of a message the walk waits to have whole (unless they are held back for a
    /// Query of Sluice's own, which waits for the server).
    fn client_deadline(&self) -> Option<(std::time::Duration, End)> {
        let in_message = !self.cbuf.is_empty() && !self.up.held;
        self.core.flow().client_deadline(in_message)
    }

    /// Client → server.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Progress {
        match &mut self.up.step {
            Step::Walk => {
                let w = self.core.client(self.cbuf)?;
                let staged = self.core.staged_for_server().len();
                self.up.walked(w, staged, self.cbuf);
                Poll::Ready(Ok(()))
            }
            Step::Read => {
                if let Some((timeout, end)) = self.client_deadline() {
                    // Armed once per wait (the timer is made only for a client that keeps its
                    // server waiting), dropped when the client sends something.
                    let timer = self
                        .client_timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(end));
                    }
                }
                let room = READ_BUFFER.max(self.up.need.saturating_sub(self.cbuf.len()));
                self.cbuf.reserve(room);
                match ready!(tokio_util::io::poll_read_buf(
                    Pin::new(&mut *self.client),
                    cx,
                    self.cbuf
                )) {
                    Ok(0) | Err(_) => Poll::Ready(Err(End::ClientGone)),
                    Ok(_) => {
                        self.client_timer = None;
                        self.up.step = Step::Walk;
                        Poll::Ready(Ok(()))
                    }
                }
            }
            Step::Write {
                output,
                written,
                used,
            } => {
                let bytes = match output {
                    Output::Buffer(n) => &self.cbuf[..*n],
                    Output::Staged => self.core.staged_for_server(),
                    Output::Prefix(p) => &p[..],
                };
                let failed = |e| Poll::Ready(Err(End::ServerGone(ServerFault::Write(e))));
                if *written < bytes.len() {
                    match ready!(Pin::new(&mut *self.server).poll_write(cx, &bytes[*written..])) {
                        Ok(0) => return failed(std::io::ErrorKind::WriteZero.into()),
                        Err(e) => return failed(e),
                        Ok(n) => *written += n,
                    }
                    return Poll::Ready(Ok(()));
                }
                // A TLS stream may keep the last records inside rustls until flushed.
                if let Err(e) = ready!(Pin::new(&mut *self.server).poll_flush(cx)) {
                    return failed(e);
                }
                let (len, used) = (bytes.len(), *used);
                self.core.wrote(len, 0);
                self.cbuf.advance(used);
                if self.up.terminate {
                    self.cbuf.clear();
                    return Poll::Ready(Err(End::ClientGone));
                }
                self.up.step = after_write(self.cbuf);
                Poll::Ready(Ok(()))
            }
        }
    }

    /// Server → client.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Progress {
        match &mut self.down.step {
            Step::Walk => {
                let w = self.core.server(self.sbuf)?;
                if w.ready {
                    // One request answered: the next one's time starts now.
                    self.query_timer = None;
                    self.cancelled = false;
                }
                let staged = self.core.staged_for_client().len();
                self.down.walked(w, staged, self.sbuf);
                Poll::Ready(Ok(()))
            }
            Step::Read => {
                if self.core.take_due() {
                    // Answers of Sluice's own with nothing ahead of them from the server.
                    self.down.step = Step::Write {
                        output: Output::Staged,
                        written: 0,
                        used: 0,
                    };
                    self.down.check_release = true;
                    return Poll::Ready(Ok(()));
                }
                let room = READ_BUFFER.max(self.down.need.saturating_sub(self.sbuf.len()));
                self.sbuf.reserve(room);
                match ready!(tokio_util::io::poll_read_buf(
                    Pin::new(&mut *self.server),
                    cx,
                    self.sbuf
                )) {
                    Ok(0) => Poll::Ready(Err(End::ServerGone(ServerFault::Closed))),
                    Err(e) => Poll::Ready(Err(End::ServerGone(ServerFault::Read(e)))),
                    Ok(_) => {
                        self.down.step = Step::Walk;
                        Poll::Ready(Ok(()))
                    }
                }
            }
            Step::Write {
                output,
                written,
                used,
            } => {
                let bytes = match output {
                    Output::Buffer(n) => &self.sbuf[..*n],
                    Output::Staged => self.core.staged_for_client(),
                    Output::Prefix(p) => &p[..],
                };
                if *written < bytes.len() {
                    match ready!(Pin::new(&mut *self.client).poll_write(cx, &bytes[*written..])) {
                        Ok(0) | Err(_) => return Poll::Ready(Err(End::ClientGone)),
                        Ok(n) => *written += n,
                    }
                    return Poll::Ready(Ok(()));
                }
                if ready!(Pin::new(&mut *self.client).poll_flush(cx)).is_err() {
                    return Poll::Ready(Err(End::ClientGone));
                }
                let (len, used) = (bytes.len(), *used);
                self.core.wrote(0, len);
                self.sbuf.advance(used);
                if std::mem::take(&mut self.down.check_release)
                    && self.sbuf.is_empty()
                    && self.core.releasable()
                {
                    return Poll::Ready(Err(End::Released));
                }
                self.down.step = after_write(self.sbuf);
                Poll::Ready(Ok(()))
            }
        }
    }
}
