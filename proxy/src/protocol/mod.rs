//! PostgreSQL wire protocol v3: framing, parsing and building of the messages Sluice acts on.
//!
//! Pure code: no sockets, no tokio. The relay frames messages from their 5-byte headers
//! ([`Header`]) and forwards whole runs of them; only the few messages Sluice must act on are
//! decoded ([`frontend`] for what clients send, [`backend`] for what servers send and for the
//! messages Sluice itself answers with).
//!
//! See <https://www.postgresql.org/docs/current/protocol-message-formats.html>.

pub mod backend;
pub mod frontend;
pub mod proxy_header;
pub mod sqlstate;

use thiserror::Error;

/// Length of a regular message header: one tag byte and a big-endian `i32` length that counts
/// itself but not the tag.
pub const HEADER_LEN: usize = 5;

/// Protocol version 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: u32 = 196_608;
/// Request codes that take the place of a protocol version in a startup packet.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// Errors in bytes received from a peer. Every variant is the peer's fault: the connection that
/// sent them is answered with SQLSTATE 08P01 and closed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {len} for message type '{tag}'", tag = char::from(*.tag))]
    BadLength { tag: u8, len: u32 },
    #[error("message of type '{tag}' is {len} bytes, over the limit of {max}", tag = char::from(*.tag))]
    TooLong { tag: u8, len: usize, max: usize },
    #[error("invalid startup packet length {0}")]
    BadStartupLength(u32),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("unexpected message type '{tag}' {context}", tag = char::from(*.tag))]
    Unexpected { tag: u8, context: &'static str },
    /// `proxy_protocol` is on and the connection did not open with a valid PROXY v2 header.
    #[error("{0}")]
    ProxyHeader(String),
}

/// The header of one regular (tagged) message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// The length field: body length plus the 4 bytes of the field itself.
    pub len: u32,
}

impl Header {
    /// Reads a header from the start of `buf`; `None` when fewer than 5 bytes are buffered.
    #[inline]
    pub fn peek(buf: &[u8]) -> Result<Option<Header>, ProtocolError> {
        let Some(h) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let tag = h[0];
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        // The length counts itself; anything below 4 (or negative as i32) is corrupt.
        if !(4..=i32::MAX as u32).contains(&len) {
            return Err(ProtocolError::BadLength { tag, len });
        }
        Ok(Some(Header { tag, len }))
    }

    /// Whole message size on the wire, tag included.
    #[inline]
    pub fn total(self) -> usize {
        self.len as usize + 1
    }

    #[inline]
    pub fn body_len(self) -> usize {
        self.len as usize - 4
    }
}

/// One whole message borrowed from a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub tag: u8,
    pub body: &'a [u8],
}

/// Cuts the first whole message off `buf`, checking its length against `max` (the whole
/// message size). `Ok(None)` means more bytes are needed.
pub fn next_frame(buf: &[u8], max: usize) -> Result<Option<(Frame<'_>, usize)>, ProtocolError> {
    let Some(h) = Header::peek(buf)? else {
        return Ok(None);
    };
    let total = h.total();
    if total > max {
        return Err(ProtocolError::TooLong {
            tag: h.tag,
            len: total,
            max,
        });
    }
    match buf.get(HEADER_LEN..total) {
        Some(body) => Ok(Some((Frame { tag: h.tag, body }, total))),
        None => Ok(None),
    }
}

/// A cursor over a message body for the few fields Sluice decodes. Every read is checked.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn err(&self) -> ProtocolError {
        ProtocolError::Malformed(self.what)
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| self.err())?;
        self.buf = rest;
        Ok(b)
    }

    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.err());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A NUL-terminated string, without the NUL. Must be UTF-8.
    pub fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let raw = self.cbytes()?;
        std::str::from_utf8(raw).map_err(|_| self.err())
    }

    /// NUL-terminated bytes, without the NUL.
    pub fn cbytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let end = memchr::memchr(0, self.buf).ok_or_else(|| self.err())?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_needs_five_bytes() {
        assert_eq!(Header::peek(b"Q\0\0\0").unwrap(), None);
        let h = Header::peek(b"Q\0\0\0\x09").unwrap().unwrap();
        assert_eq!((h.tag, h.total(), h.body_len()), (b'Q', 10, 5));
    }

    #[test]
    fn header_rejects_short_and_negative_lengths() {
        assert!(Header::peek(b"Q\0\0\0\x03").is_err());
        assert!(Header::peek(b"Q\xff\xff\xff\xff").is_err());
    }

    #[test]
    fn next_frame_waits_for_the_body_and_caps_size() {
        let msg = b"Q\0\0\0\x09abcd\0rest";
        let (f, n) = next_frame(msg, 100).unwrap().unwrap();
        assert_eq!((f.tag, f.body, n), (b'Q', &b"abcd\0"[..], 10));
        assert_eq!(next_frame(&msg[..7], 100).unwrap(), None);
        assert!(matches!(
            next_frame(msg, 9),
            Err(ProtocolError::TooLong { .. })
        ));
    }

    #[test]
    fn reader_checks_every_read() {
        let mut r = Reader::new(b"ab\0\x01", "test");
        assert_eq!(r.cstr().unwrap(), "ab");
        assert_eq!(r.u8().unwrap(), 1);
        assert!(r.u8().is_err());
        assert!(Reader::new(b"no-nul", "test").cstr().is_err());
        assert!(Reader::new(b"\x01", "test").i32().is_err());
    }
}
