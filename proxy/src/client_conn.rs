//! The client's connection: its socket and read buffer, and the framing of what the client
//! sends, in one place.
//!
//! Start-up reads the untagged startup packet ([`ClientConn::read_startup`]), authentication and
//! the admin console read whole messages ([`ClientConn::read_message`]), and the session walks
//! a request's messages without consuming them ([`ClientConn::read_frame`]) so the relay can
//! forward them straight from the buffer. The relay alone works on the socket and the buffer
//! directly (`ClientConn::relay_parts`).
//!
//! [`ClientConn`] is generic over the byte stream: sessions use [`Stream`] (plain TCP, or TLS
//! after the upgrade during start-up); the tests below use in-memory pipes.
//!
//! See <https://www.postgresql.org/docs/current/protocol-overview.html#PROTOCOL-MESSAGE-CONCEPTS>.

use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::PgError;
use crate::protocol::frontend::Startup;
use crate::protocol::{Header, ProtocolError, HEADER_LEN};
use crate::stream::Stream;
use crate::tls::{Acceptor, HandshakeError, HANDSHAKE_RECORD};

/// How much a read makes room for, at least.
const READ_CHUNK: usize = 1024;

/// Why reading from or writing to the client failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The client closed the connection.
    #[error("the client closed the connection")]
    Closed,
    #[error("client connection failed: {0}")]
    Io(#[from] io::Error),
    /// The client sent bytes that break the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The TLS handshake with the client failed.
    #[error("client TLS handshake failed: {}", .0.reason())]
    Tls(HandshakeError),
    /// The client sent part of a message and then nothing for the stall timeout
    /// ([`ClientConn::set_stall_timeout`]).
    #[error("the client sent nothing in the middle of a message for {0:?}")]
    Stalled(Duration),
}

/// The first packet of a connection, as [`ClientConn::read_startup`] found it.
#[derive(Debug, PartialEq, Eq)]
pub enum Opening {
    /// A startup packet, consumed from the buffer.
    Packet(Startup),
    /// A TLS ClientHello (PostgreSQL 17's direct TLS), left in the buffer for the handshake.
    TlsHello,
}

/// What [`ClientConn::read_frame`] found at the offset it was asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framed {
    /// A whole message with this header is buffered there.
    Whole(Header),
    /// The message there is not all buffered and the buffer already holds the limit: the caller
    /// streams it rather than buffer more. Its header, when that much has arrived.
    Partial(Option<Header>),
}

/// One whole message, cut off the buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub body: BytesMut,
}

/// A client connection: the byte stream and the bytes read from it and not yet consumed.
pub struct ClientConn<S = Stream> {
    stream: S,
    buf: BytesMut,
    /// How long [`ClientConn::read_frame`] waits for the rest of a message it holds part of;
    /// zero waits for ever.
    stall: Duration,
    /// The client's address as a PROXY protocol header gave it ([`ClientConn::read_proxy_header`]),
    /// in place of the TCP peer's (the load balancer's).
    /// Boxed: only a client behind a load balancer has one.
    client_addr: Option<Box<SocketAddr>>,
}

impl<S> ClientConn<S> {
    pub fn new(stream: S) -> Self {
        ClientConn {
            stream,
            buf: BytesMut::new(),
            stall: Duration::ZERO,
            client_addr: None,
        }
    }

    /// From now on a client that stops for `stall` in the middle of a message is
    /// [`ClientError::Stalled`] (`client_stall_timeout`, set once the client has logged in:
    /// `client_login_timeout` bounds the login as a whole). Partial messages are what a
    /// client can make Sluice keep for it before any server is involved, so this bounds how
    /// long each byte of them is kept.
    pub fn set_stall_timeout(&mut self, stall: Duration) {
        self.stall = stall;
    }

    /// How many bytes are buffered, read and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Drops the first `n` buffered bytes: messages the caller has dealt with (at most what
    /// is buffered).
    pub fn consume(&mut self, n: usize) {
        self.buf.advance(n.min(self.buf.len()));
    }

    /// The relay's access: the stream (which it splits to read and write at once) and the
    /// buffer, whose bytes it forwards and consumes, and which it reads into. Nothing else
    /// works on them directly.
    pub(crate) fn relay_parts(&mut self) -> (&mut S, &mut BytesMut) {
        (&mut self.stream, &mut self.buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientConn<S> {
    /// Reads the PROXY protocol v2 header the connection must open with (`proxy_protocol`) and
    /// takes the client address it names; what follows it stays buffered.
    pub async fn read_proxy_header(&mut self) -> Result<Option<SocketAddr>, ClientError> {
        use crate::protocol::proxy_header::{parse, Parsed};
        loop {
            if let Parsed::Header { len, client } = parse(&self.buf)? {
                self.buf.advance(len);
                self.client_addr = client.map(Box::new);
                return Ok(client);
            }
            self.read_more().await?;
        }
    }

    /// Reads more bytes into the buffer; end of stream is [`ClientError::Closed`].
    ///
    /// Cancel-safe: a cancelled read loses no bytes.
    pub async fn read_more(&mut self) -> Result<(), ClientError> {
        self.buf.reserve(READ_CHUNK);
        match self.stream.read_buf(&mut self.buf).await? {
            0 => Err(ClientError::Closed),
            _ => Ok(()),
        }
    }

    /// Writes all of `bytes` and flushes them (a TLS stream could otherwise keep the last
    /// records).
    ///
    /// Not cancel-safe: part of `bytes` may have gone.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads the first packet of a connection (or the next, after an SSLRequest or GSSENCRequest
    /// was answered): untagged, its length first. With `direct_tls`, a TLS handshake record in
    /// its place is reported as [`Opening::TlsHello`] (the length of a startup packet never
    /// starts with that byte).
    ///
    /// Cancel-safe: nothing is consumed until a whole packet is returned.
    pub async fn read_startup(&mut self, direct_tls: bool) -> Result<Opening, ClientError> {
        loop {
            if direct_tls && self.buf.first() == Some(&HANDSHAKE_RECORD) {
                return Ok(Opening::TlsHello);
            }
            if let Some((packet, used)) = Startup::parse(&self.buf)? {
                self.buf.advance(used);
                return Ok(Opening::Packet(packet));
            }
            self.read_more().await?;
        }
    }

    /// Waits until the message that starts `at` bytes into the buffer is buffered whole
    /// ([`Framed::Whole`]), or until the buffer holds at least `limit` bytes without it
    /// ([`Framed::Partial`]). A message longer than `max` bytes (its header's length, tag
    /// included) is [`ProtocolError::TooLong`] as soon as its header is in. Consumes nothing:
    /// the caller walks a run of messages with growing `at`, then [`ClientConn::consume`]s them
    /// or leaves them for the relay. `at` must be a message boundary within the buffer.
    ///
    /// Cancel-safe: a cancelled call loses no bytes.
    pub async fn read_frame(
        &mut self,
        at: usize,
        max: usize,
        limit: usize,
    ) -> Result<Framed, ClientError> {
        loop {
            let rest = self.buf.get(at..).unwrap_or_default();
            let header = Header::peek(rest)?;
            if let Some(h) = header {
                if h.total() > max {
                    return Err(ProtocolError::TooLong {
                        tag: h.tag,
                        len: h.total(),
                        max,
                    }
                    .into());
                }
                if rest.len() >= h.total() {
                    return Ok(Framed::Whole(h));
                }
            }
            if self.buf.len() >= limit {
                return Ok(Framed::Partial(header));
            }
            self.read_rest().await?;
        }
    }

    /// [`ClientConn::read_more`], for the rest of a message: with part of one buffered, the
    /// client has the stall timeout to send more. A timer is made only here, so a request that
    /// arrives in one read costs none.
    async fn read_rest(&mut self) -> Result<(), ClientError> {
        if self.stall.is_zero() || self.buf.is_empty() {
            return self.read_more().await;
        }
        let stall = self.stall;
        tokio::time::timeout(stall, self.read_more())
            .await
            .map_err(|_| ClientError::Stalled(stall))?
    }

    /// Reads one whole message of at most `max` bytes (tag and length included) and cuts it
    /// off the buffer.
    ///
    /// Cancel-safe: nothing is consumed until a whole message is returned.
    pub async fn read_message(&mut self, max: usize) -> Result<Message, ClientError> {
        let h = match self.read_frame(0, max, usize::MAX).await? {
            Framed::Whole(h) => h,
            // Unreachable with no limit; treated as the client's error rather than a panic.
            Framed::Partial(_) => return Err(ProtocolError::Malformed("message").into()),
        };
        let mut body = self.buf.split_to(h.total());
        body.advance(HEADER_LEN);
        Ok(Message { tag: h.tag, body })
    }
}

impl ClientConn<Stream> {
    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    /// The ALPN protocol the TLS handshake agreed on (`None` for plain TCP).
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.stream.alpn_protocol()
    }

    /// The client's address: the one its PROXY protocol header named, else the TCP peer's.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self.client_addr.as_deref() {
            Some(a) => Ok(*a),
            None => self.stream.peer_addr(),
        }
    }

    /// Runs the TLS handshake on the plain socket and goes on over TLS. What is buffered is the
    /// handshake's beginning: a direct-TLS ClientHello (after an SSLRequest nothing may be
    /// buffered, see CVE-2021-23214).
    ///
    /// Not cancel-safe: a cancelled or failed handshake leaves the connection unusable.
    pub async fn start_tls(&mut self, acceptor: &Acceptor) -> Result<(), ClientError> {
        let tcp = self.stream.take_plain().ok_or_else(|| {
            ClientError::Io(io::Error::other("the connection is already encrypted"))
        })?;
        let early = std::mem::take(&mut self.buf);
        self.stream = crate::tls::accept(acceptor, tcp, &early)
            .await
            .map_err(ClientError::Tls)?;
        Ok(())
    }

    /// Waits until the client sends something (or closes the connection, or it fails: the next
    /// read tells), or until `interrupt` is ready, which it returns. With nothing buffered the
    /// buffer is freed first, so a client waiting here holds none; when the client is readable,
    /// room for `capacity` bytes is made. Returns at once when bytes are buffered.
    ///
    /// A future of three words (every idle client keeps one), written by hand rather than as an
    /// `async fn`, whose state would copy its arguments; no timer is armed. Cancel-safe.
    pub fn wait_readable<T, F>(&mut self, capacity: usize, interrupt: F) -> WaitReadable<'_, F>
    where
        F: FnMut(&mut Context<'_>) -> Poll<T> + Unpin,
    {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        WaitReadable {
            conn: self,
            capacity,
            interrupt,
        }
    }
}

/// See [`ClientConn::wait_readable`].
pub struct WaitReadable<'a, F> {
    conn: &'a mut ClientConn,
    capacity: usize,
    interrupt: F,
}

impl<F, T> std::future::Future for WaitReadable<'_, F>
where
    F: FnMut(&mut Context<'_>) -> Poll<T> + Unpin,
{
    type Output = Option<T>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        if !this.conn.buf.is_empty() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(v) = (this.interrupt)(cx) {
            return Poll::Ready(Some(v));
        }
        // Readiness errors show up again in the read.
        let _ = std::task::ready!(this.conn.stream.poll_read_ready(cx));
        this.conn.buf.reserve(this.capacity);
        Poll::Ready(None)
    }
}

/// How a session ends.
pub enum Exit {
    /// The client left, or there is nobody to tell.
    Quiet,
    /// Tell the client this error (FATAL), then close.
    Fatal(PgError),
}

impl From<PgError> for Exit {
    fn from(e: PgError) -> Exit {
        Exit::Fatal(e)
    }
}

/// A client that broke the protocol is told so; one that is gone is not.
impl From<ClientError> for Exit {
    fn from(e: ClientError) -> Exit {
        match e {
            ClientError::Protocol(e) => PgError::protocol_violation(e.to_string()).into(),
            ClientError::Stalled(_) => PgError::client_stalled(false).into(),
            ClientError::Closed | ClientError::Io(_) | ClientError::Tls(_) => Exit::Quiet,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{duplex, DuplexStream};

    use super::*;
    use crate::protocol::SSL_REQUEST_CODE;

    /// A connection over a pipe whose buffer holds `pipe` bytes, and the client's end.
    fn pair(pipe: usize) -> (ClientConn<DuplexStream>, DuplexStream) {
        let (ours, theirs) = duplex(pipe);
        (ClientConn::new(ours), theirs)
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = crate::protocol::PROTOCOL_3_0.to_be_bytes().to_vec();
        for (n, v) in params {
            body.extend_from_slice(n.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut p = (body.len() as u32 + 4).to_be_bytes().to_vec();
        p.extend_from_slice(&body);
        p
    }

    #[tokio::test]
    async fn messages_arrive_whole_however_they_are_cut() {
        let (mut conn, mut client) = pair(3);
        let mut bytes = msg(b'Q', b"select 1\0");
        bytes.extend(msg(b'S', b""));
        let writer = tokio::spawn(async move {
            for b in bytes {
                client.write_all(&[b]).await.unwrap();
            }
            client
        });
        let m = conn.read_message(100).await.unwrap();
        assert_eq!((m.tag, &m.body[..]), (b'Q', &b"select 1\0"[..]));
        let m = conn.read_message(100).await.unwrap();
        assert_eq!((m.tag, m.body.len()), (b'S', 0));
        assert_eq!(conn.buffered(), 0);
        drop(writer.await.unwrap());
        assert!(matches!(
            conn.read_message(100).await,
            Err(ClientError::Closed)
        ));
    }

    #[tokio::test]
    async fn length_errors_are_the_clients() {
        let (mut conn, mut client) = pair(64);
        client.write_all(&msg(b'Q', &[b'x'; 20])).await.unwrap();
        assert!(matches!(
            conn.read_message(10).await,
            Err(ClientError::Protocol(ProtocolError::TooLong {
                tag: b'Q',
                len: 25,
                max: 10
            }))
        ));
        let (mut conn, mut client) = pair(64);
        client.write_all(b"Q\0\0\0\x02").await.unwrap();
        assert!(matches!(
            conn.read_message(10).await,
            Err(ClientError::Protocol(ProtocolError::BadLength { .. }))
        ));
    }

    #[tokio::test]
    async fn end_of_stream_inside_a_message_is_closed() {
        let (mut conn, mut client) = pair(64);
        client.write_all(&msg(b'Q', b"sel")[..6]).await.unwrap();
        drop(client);
        assert!(matches!(
            conn.read_message(100).await,
            Err(ClientError::Closed)
        ));
    }

    #[tokio::test]
    async fn a_cancelled_read_loses_nothing() {
        let (mut conn, mut client) = pair(64);
        let m = msg(b'Q', b"select 1\0");
        client.write_all(&m[..4]).await.unwrap();
        let cut = tokio::time::timeout(Duration::from_millis(20), conn.read_message(100)).await;
        assert!(cut.is_err());
        client.write_all(&m[4..]).await.unwrap();
        let got = conn.read_message(100).await.unwrap();
        assert_eq!(&got.body[..], b"select 1\0");
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_left_half_sent_is_a_stall_and_an_idle_client_is_not() {
        let (mut conn, mut client) = pair(1 << 16);
        conn.set_stall_timeout(Duration::from_secs(10));
        // Nothing sent: an idle client waits for ever (an hour here).
        let idle = tokio::time::timeout(Duration::from_secs(3600), conn.read_frame(0, 100, 1000));
        assert!(idle.await.is_err(), "no stall without a message begun");
        // Part of a message, and then nothing: the stall timeout.
        let m = msg(b'Q', b"select 1\0");
        client.write_all(&m[..3]).await.unwrap();
        let started = tokio::time::Instant::now();
        let r = conn.read_frame(0, 100, 1000).await;
        assert!(matches!(r, Err(ClientError::Stalled(_))), "{r:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // Each byte that arrives starts the wait anew: a slow client is not a stalled one.
        let (mut conn, mut client) = pair(1 << 16);
        conn.set_stall_timeout(Duration::from_secs(10));
        let sender = tokio::spawn(async move {
            for b in m.iter() {
                client.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(Duration::from_secs(9)).await;
            }
            client
        });
        let r = conn.read_frame(0, 100, 1000).await;
        assert!(matches!(r, Ok(Framed::Whole(h)) if h.tag == b'Q'), "{r:?}");
        drop(sender.await.unwrap());
    }

    #[tokio::test]
    async fn frames_are_walked_in_place() {
        let (mut conn, mut client) = pair(1024);
        let (p, b) = (msg(b'P', b"\0x\0\0\0"), msg(b'B', &[0; 10]));
        let (pl, bl) = (p.len(), b.len());
        client.write_all(&[p, b].concat()).await.unwrap();
        let first = conn.read_frame(0, 100, 1 << 20).await.unwrap();
        assert!(matches!(first, Framed::Whole(h) if h.tag == b'P' && h.total() == pl));
        let second = conn.read_frame(pl, 100, 1 << 20).await.unwrap();
        assert!(matches!(second, Framed::Whole(h) if h.tag == b'B' && h.total() == bl));
        // Nothing was consumed: both are still there, for the relay.
        assert_eq!(conn.buffered(), pl + bl);
        conn.consume(pl);
        assert_eq!(conn.buffered(), bl);
        let (_, buf) = conn.relay_parts();
        assert_eq!(buf[0], b'B');
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_left_to_stream() {
        let (mut conn, mut client) = pair(1 << 16);
        let big = msg(b'Q', &[b'x'; 5000]);
        client.write_all(&big[..3000]).await.unwrap();
        // Past the limit with the message incomplete: its header, to stream it.
        let f = conn.read_frame(0, 1 << 20, 2000).await.unwrap();
        assert!(matches!(f, Framed::Partial(Some(h)) if h.tag == b'Q' && h.total() == 5005));
        // Past the limit before the next header: nothing to show.
        let (mut conn, mut client) = pair(1 << 16);
        let small = msg(b'B', &[0; 2500]);
        client.write_all(&small).await.unwrap();
        client.write_all(b"E\0").await.unwrap();
        let end = small.len();
        assert!(matches!(
            conn.read_frame(0, 1 << 20, 3000).await.unwrap(),
            Framed::Whole(_)
        ));
        while conn.buffered() < end + 2 {
            conn.read_more().await.unwrap();
        }
        assert_eq!(
            conn.read_frame(end, 1 << 20, 2000).await.unwrap(),
            Framed::Partial(None)
        );
        // The size cap holds even for a header alone.
        assert!(matches!(
            conn.read_frame(0, 100, 2000).await,
            Err(ClientError::Protocol(ProtocolError::TooLong { .. }))
        ));
    }

    #[tokio::test]
    async fn startup_packets_and_direct_tls() {
        let (mut conn, mut client) = pair(1024);
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        client.write_all(&ssl).await.unwrap();
        client
            .write_all(&startup_packet(&[("user", "u")]))
            .await
            .unwrap();
        assert_eq!(
            conn.read_startup(true).await.unwrap(),
            Opening::Packet(Startup::SslRequest)
        );
        assert_eq!(
            conn.read_startup(true).await.unwrap(),
            Opening::Packet(Startup::Startup {
                params: vec![("user".into(), "u".into())]
            })
        );
        assert_eq!(conn.buffered(), 0);

        let hello = [HANDSHAKE_RECORD, 3, 1, 0, 5, 1, 2, 3, 4, 5];
        let (mut conn, mut client) = pair(1024);
        client.write_all(&hello).await.unwrap();
        assert_eq!(conn.read_startup(true).await.unwrap(), Opening::TlsHello);
        // Left for the handshake.
        assert_eq!(conn.buffered(), hello.len());
        // Once encrypted, the same bytes are a bad startup packet.
        assert!(matches!(
            conn.read_startup(false).await,
            Err(ClientError::Protocol(ProtocolError::BadStartupLength(_)))
        ));
    }

    #[tokio::test]
    async fn sends_reach_the_client() {
        let (mut conn, mut client) = pair(4);
        let sent = tokio::spawn(async move {
            conn.send(b"hello, client").await.unwrap();
            conn
        });
        let mut got = vec![0; 13];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello, client");
        let mut conn = sent.await.unwrap();
        drop(client);
        assert!(conn.send(b"x").await.is_err());
    }
}
