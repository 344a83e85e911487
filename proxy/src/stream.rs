//! A connection's byte stream, plain TCP or TLS over it, for clients and servers alike.
//!
//! Session, relay and server code read and write a [`Stream`] and never know which kind it is;
//! the TLS handshake itself happens in [`crate::tls`]. Writes to a TLS stream may leave
//! encrypted bytes inside rustls when the socket is full, so every write is followed by a
//! flush ([`Stream::send`], and the relay flushes its halves): on plain TCP a flush is free.

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A TLS session over TCP, either side.
pub type TlsStream = tokio_rustls::TlsStream<TcpStream>;

/// A socket, plain or encrypted.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
    /// Left behind for the moment a plain stream is handed to the TLS handshake; reads and
    /// writes on it fail.
    Upgrading,
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(s) => Some(s.get_ref().0),
            Stream::Upgrading => None,
        }
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().ok_or_else(gone)?.peer_addr()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().ok_or_else(gone)?.local_addr()
    }

    /// The ALPN protocol the TLS handshake agreed on (`None` for plain TCP).
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        match self {
            Stream::Tls(s) => s.get_ref().1.alpn_protocol(),
            _ => None,
        }
    }

    /// Takes the plain socket out for a TLS handshake (the stream is [`Stream::Upgrading`]
    /// until the caller puts the TLS stream back).
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, Stream::Upgrading) {
            Stream::Plain(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }

    /// Writes all of `bytes` and flushes them to the socket. Cancel-safe only in that a
    /// cancelled send leaves the stream unusable (part of `bytes` may have gone).
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes).await?;
        self.flush().await
    }

    /// Ready when a read would not wait: bytes in the socket, or plaintext already decrypted
    /// inside the TLS session (which the socket's readiness would not show). Stores nothing,
    /// so a waiting idle client costs no buffer.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => s.poll_read_ready(cx),
            Stream::Tls(s) => {
                let (tcp, session) = s.get_ref();
                if !session.wants_read() {
                    return Poll::Ready(Ok(()));
                }
                tcp.poll_read_ready(cx)
            }
            Stream::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    /// Whether anything arrived (or the peer closed) on a connection that should be silent: a
    /// pooled server connection between uses. Consumes what it finds; such a connection is
    /// not used again.
    pub fn has_unexpected_input(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            Stream::Plain(s) => {
                !matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Stream::Tls(s) => {
                let (tcp, session) = s.get_ref();
                !session.wants_read()
                    || !matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Stream::Upgrading => true,
        }
    }

    /// Best-effort goodbye that never blocks: `message` (e.g. Terminate) and, over TLS, a
    /// close_notify, written only if the socket takes them at once.
    pub fn try_goodbye(&mut self, message: &[u8]) {
        match self {
            Stream::Plain(s) => {
                let _ = s.try_write(message);
            }
            Stream::Tls(s) => match s.as_mut() {
                tokio_rustls::TlsStream::Client(c) => {
                    let (tcp, conn) = c.get_mut();
                    goodbye(tcp, conn, message);
                }
                tokio_rustls::TlsStream::Server(c) => {
                    let (tcp, conn) = c.get_mut();
                    goodbye(tcp, conn, message);
                }
            },
            Stream::Upgrading => {}
        }
    }

    /// The socket under the stream (TLS state dropped), for reading what a peer still sends
    /// after a goodbye.
    pub fn into_tcp(self) -> Option<TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(s) => Some(match *s {
                tokio_rustls::TlsStream::Client(c) => c.into_inner().0,
                tokio_rustls::TlsStream::Server(c) => c.into_inner().0,
            }),
            Stream::Upgrading => None,
        }
    }

    /// The two directions, usable at once (the relay reads one while writing the other).
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
            Stream::Upgrading => (ReadHalf::Gone, WriteHalf::Gone),
        }
    }
}

fn goodbye<D>(tcp: &TcpStream, session: &mut rustls::ConnectionCommon<D>, message: &[u8]) {
    let _ = session.writer().write_all(message);
    session.send_close_notify();
    let mut out = TryWriter(tcp);
    while session.wants_write() {
        match session.write_tls(&mut out) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "stream is being upgraded to TLS",
    )
}

/// A non-blocking `std::io::Write` over a tokio socket.
struct TryWriter<'a>(&'a TcpStream);

impl io::Write for TryWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reading half of a [`Stream::split`].
pub enum ReadHalf<'a> {
    Plain(tokio::net::tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream>),
    Gone,
}

/// Writing half of a [`Stream::split`].
pub enum WriteHalf<'a> {
    Plain(tokio::net::tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream>),
    Gone,
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Stream::Upgrading => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Stream::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            Stream::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            Stream::Upgrading => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Tls(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Gone => Poll::Ready(Err(gone())),
        }
    }
}

/// TCP keepalive (and, toward servers, `TCP_USER_TIMEOUT`) for a socket: how a peer that went
/// silent without a FIN or RST (a cut link, a failed-over host, a load balancer's idle timeout)
/// is noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe; zero leaves keepalive off.
    pub idle: std::time::Duration,
    pub interval: std::time::Duration,
    pub count: u32,
    /// How long sent data may stay unacknowledged (and, with keepalive on, probes unanswered)
    /// before the connection is dropped; zero leaves the system default.
    pub user_timeout: std::time::Duration,
}

impl Keepalive {
    /// Applies the options to `tcp`.
    pub fn apply(&self, tcp: &TcpStream) -> io::Result<()> {
        let sock = socket2::SockRef::from(tcp);
        if !self.idle.is_zero() {
            let ka = socket2::TcpKeepalive::new()
                .with_time(self.idle)
                .with_interval(self.interval)
                .with_retries(self.count);
            sock.set_tcp_keepalive(&ka)?;
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if !self.user_timeout.is_zero() {
            sock.set_tcp_user_timeout(Some(self.user_timeout))?;
        }
        Ok(())
    }
}
