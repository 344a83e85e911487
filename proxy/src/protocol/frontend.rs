//! Messages clients send: the untagged startup packet family, and the tags of regular messages.
//!
//! See <https://www.postgresql.org/docs/current/protocol-message-formats.html>.

use bytes::{BufMut, BytesMut};

use super::{
    ProtocolError, Reader, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE,
};

/// Message tags of protocol 3.0 frontend messages.
pub mod tag {
    pub const BIND: u8 = b'B';
    pub const CLOSE: u8 = b'C';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const FLUSH: u8 = b'H';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const PARSE: u8 = b'P';
    /// PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse share this tag.
    pub const PASSWORD: u8 = b'p';
    pub const QUERY: u8 = b'Q';
    pub const SYNC: u8 = b'S';
    pub const TERMINATE: u8 = b'X';
}

/// PostgreSQL's own cap on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// The first packet of a connection, which has a length but no tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    SslRequest,
    GssEncRequest,
    Cancel {
        process_id: i32,
        secret_key: i32,
    },
    /// A protocol 3.0 StartupMessage with its parameters in the order sent.
    Startup {
        params: Vec<(String, String)>,
    },
}

impl Startup {
    /// Parses a startup packet from the start of `buf`. `Ok(None)` means more bytes are needed;
    /// the `usize` is how many bytes the packet took.
    pub fn parse(buf: &[u8]) -> Result<Option<(Startup, usize)>, ProtocolError> {
        let Some(head) = buf.get(..8) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if len < 8 || len as usize > MAX_STARTUP_LEN {
            return Err(ProtocolError::BadStartupLength(len));
        }
        let Some(packet) = buf.get(8..len as usize) else {
            return Ok(None);
        };
        let msg = match code {
            SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !packet.is_empty() => {
                return Err(ProtocolError::BadStartupLength(len))
            }
            SSL_REQUEST_CODE => Startup::SslRequest,
            GSSENC_REQUEST_CODE => Startup::GssEncRequest,
            CANCEL_REQUEST_CODE => {
                let mut r = Reader::new(packet, "CancelRequest");
                let process_id = r.i32()?;
                let secret_key = r.i32()?;
                r.finish()?;
                Startup::Cancel {
                    process_id,
                    secret_key,
                }
            }
            PROTOCOL_3_0 => Startup::Startup {
                params: parse_params(packet)?,
            },
            other => {
                return Err(ProtocolError::UnsupportedVersion {
                    major: (other >> 16) as u16,
                    minor: (other & 0xffff) as u16,
                })
            }
        };
        Ok(Some((msg, len as usize)))
    }
}

fn parse_params(packet: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut r = Reader::new(packet, "StartupMessage");
    let mut params = Vec::new();
    loop {
        let name = r.cstr()?;
        if name.is_empty() {
            break;
        }
        let value = r.cstr()?;
        if params.iter().any(|(n, _): &(String, String)| n == name) {
            return Err(ProtocolError::Malformed(
                "StartupMessage (duplicate parameter)",
            ));
        }
        params.push((name.to_owned(), value.to_owned()));
    }
    r.finish()?;
    Ok(params)
}

/// The body of a SASLInitialResponse: the chosen mechanism and the client-first-message.
pub fn sasl_initial_response(body: &[u8]) -> Result<(&str, &[u8]), ProtocolError> {
    let mut r = Reader::new(body, "SASLInitialResponse");
    let mechanism = r.cstr()?;
    let len = r.i32()?;
    let data = if len < 0 {
        &[][..]
    } else {
        r.bytes(len as usize)?
    };
    r.finish()?;
    Ok((mechanism, data))
}

/// The body of a PasswordMessage: a NUL-terminated password or md5 response.
pub fn password(body: &[u8]) -> Result<&[u8], ProtocolError> {
    let mut r = Reader::new(body, "PasswordMessage");
    let pw = r.cbytes()?;
    r.finish()?;
    Ok(pw)
}

/// The SQL text of a Query message, in the client's encoding.
pub fn query(body: &[u8]) -> Result<&[u8], ProtocolError> {
    let mut r = Reader::new(body, "Query");
    let q = r.cbytes()?;
    r.finish()?;
    Ok(q)
}

/// Describe's and Close's target kinds.
pub const STATEMENT: u8 = b'S';
pub const PORTAL: u8 = b'P';

/// The parts of a Parse body. Names, like query text, are bytes in the client's encoding.
pub struct Parse<'a> {
    pub name: &'a [u8],
    /// Query text and parameter types, exactly as sent (everything after the name).
    pub rest: &'a [u8],
}

/// Parse: statement name, and the rest of the body.
pub fn parse(body: &[u8]) -> Result<Parse<'_>, ProtocolError> {
    let mut r = Reader::new(body, "Parse");
    let name = r.cbytes()?;
    let rest = r.rest();
    // The query must be NUL-terminated and the type count present.
    let mut check = Reader::new(rest, "Parse");
    check.cbytes()?;
    let n = check.i16()?;
    check.bytes(usize::try_from(n).map_err(|_| ProtocolError::Malformed("Parse"))? * 4)?;
    check.finish()?;
    Ok(Parse { name, rest })
}

/// Bind's portal and statement names, and where the rest of its body starts.
pub fn bind(body: &[u8]) -> Result<(&[u8], &[u8], usize), ProtocolError> {
    let mut r = Reader::new(body, "Bind");
    let portal = r.cbytes()?;
    let stmt = r.cbytes()?;
    let used = portal.len() + stmt.len() + 2;
    Ok((portal, stmt, used))
}

/// Execute: portal name and row limit (0: all rows).
pub fn execute(body: &[u8]) -> Result<(&[u8], i32), ProtocolError> {
    let mut r = Reader::new(body, "Execute");
    let portal = r.cbytes()?;
    let limit = r.i32()?;
    r.finish()?;
    Ok((portal, limit))
}

/// Describe's or Close's kind (`S` or `P`) and name.
pub fn target<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a [u8]), ProtocolError> {
    let mut r = Reader::new(body, what);
    let kind = r.u8()?;
    let name = r.cbytes()?;
    r.finish()?;
    if kind != STATEMENT && kind != PORTAL {
        return Err(ProtocolError::Malformed(what));
    }
    Ok((kind, name))
}

/// Appends a Bind with its statement name replaced.
pub fn put_bind(out: &mut BytesMut, portal: &[u8], stmt: &str, rest: &[u8]) {
    out.put_u8(tag::BIND);
    out.put_u32((4 + portal.len() + 1 + stmt.len() + 1 + rest.len()) as u32);
    out.put_slice(portal);
    out.put_u8(0);
    out.put_slice(stmt.as_bytes());
    out.put_u8(0);
    out.put_slice(rest);
}

/// Appends a Describe or Close (`tag`) of a statement or portal.
pub fn put_target(out: &mut BytesMut, tag: u8, kind: u8, name: &str) {
    out.put_u8(tag);
    out.put_u32((4 + 1 + name.len() + 1) as u32);
    out.put_u8(kind);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut v = ((rest.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn parses_startup_message() {
        let p = packet(PROTOCOL_3_0, b"user\0app\0database\0db\0\0");
        let (s, n) = Startup::parse(&p).unwrap().unwrap();
        assert_eq!(n, p.len());
        let Startup::Startup { params } = s else {
            panic!("not a startup")
        };
        assert_eq!(params[0], ("user".into(), "app".into()));
        assert_eq!(params[1], ("database".into(), "db".into()));
        assert_eq!(Startup::parse(&p[..p.len() - 1]).unwrap(), None);
    }

    #[test]
    fn parses_requests() {
        assert_eq!(
            Startup::parse(&packet(SSL_REQUEST_CODE, b""))
                .unwrap()
                .unwrap()
                .0,
            Startup::SslRequest
        );
        assert_eq!(
            Startup::parse(&packet(GSSENC_REQUEST_CODE, b""))
                .unwrap()
                .unwrap()
                .0,
            Startup::GssEncRequest
        );
        let c = packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 0, 0, 0, 9]);
        assert_eq!(
            Startup::parse(&c).unwrap().unwrap().0,
            Startup::Cancel {
                process_id: 7,
                secret_key: 9
            }
        );
    }

    #[test]
    fn rejects_malformed_startup() {
        for bad in [
            packet(PROTOCOL_3_0, b"user\0app"), // missing terminators
            packet(PROTOCOL_3_0, b"user\0a\0user\0b\0\0"), // duplicate
            packet(PROTOCOL_3_0, b"user\0\xff\0\0"), // not UTF-8
            packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7]),
            packet(SSL_REQUEST_CODE, b"x"),
            packet(0x0002_0000, b""),
        ] {
            assert!(Startup::parse(&bad).is_err(), "{bad:?}");
        }
        assert!(Startup::parse(&[0, 0, 0, 4, 0, 3, 0, 0]).is_err());
        assert!(Startup::parse(&[0, 1, 0, 0, 0, 3, 0, 0]).is_err());
    }

    #[test]
    fn parses_sasl_and_password() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert_eq!(
            sasl_initial_response(&body).unwrap(),
            ("SCRAM-SHA-256", &b"abc"[..])
        );
        body.push(0);
        assert!(sasl_initial_response(&body).is_err());
        assert!(sasl_initial_response(b"SCRAM\0\0\0\0\x09ab").is_err());
        assert_eq!(password(b"secret\0").unwrap(), b"secret");
        assert!(password(b"secret").is_err());
        assert_eq!(query(b"select 1\0").unwrap(), b"select 1");
        assert_eq!(
            query(b"select \xe9\0").unwrap(),
            b"select \xe9",
            "any encoding"
        );
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(parse(b"a\0select").is_err());
        assert!(parse(b"a\0select\0\0\x02\0\0\0\x17").is_err());
        assert!(bind(b"portal").is_err());
        assert!(target(b"Xname\0", "Describe").is_err());
        assert!(target(b"S", "Close").is_err());
        assert_eq!(target(b"Sname\0", "Close").unwrap(), (b'S', &b"name"[..]));
        assert_eq!(bind(b"p\0s\0rest").unwrap(), (&b"p"[..], &b"s"[..], 4));
    }
}
