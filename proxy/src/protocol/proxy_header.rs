//! The PROXY protocol v2 header a load balancer (an AWS Network Load Balancer with proxy
//! protocol v2 on its target group) sends before the client's first byte: the client's own
//! address, which the TCP peer address (the load balancer's) hides. Parsed by the `ppp` crate;
//! this module decides when enough has arrived and what the header says about the client.
//!
//! See <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>, section 2.2.

use std::net::SocketAddr;

use ppp::v2::{Addresses, Command, Header, ParseError};

use super::ProtocolError;

/// The fixed part of a v2 header: the 12-byte signature, version and command, family and
/// protocol, and the 2-byte length of what follows.
pub const FIXED_LEN: usize = 16;

/// The most a header may carry after its fixed part (addresses and TLVs); an NLB's are well
/// under 100 bytes.
pub const MAX_PAYLOAD: usize = 2048;

/// What the buffered bytes hold so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole header yet: read more.
    More,
    /// A header of `len` bytes; `client` is the address it names (`None` for a `LOCAL`
    /// header, the load balancer's own health check, or an address family without one).
    Header {
        len: usize,
        client: Option<SocketAddr>,
    },
}

fn refused(what: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::ProxyHeader(format!(
        "this port expects a PROXY protocol v2 header first (proxy_protocol = true): {what}"
    ))
}

/// Parses the header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProtocolError> {
    if buf.len() >= FIXED_LEN {
        let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if payload > MAX_PAYLOAD && buf.starts_with(&SIGNATURE) {
            return Err(refused(format!(
                "its header announces {payload} bytes, over the limit of {MAX_PAYLOAD}"
            )));
        }
    }
    let header = match Header::try_from(buf) {
        Ok(h) => h,
        Err(ParseError::Incomplete(_)) | Err(ParseError::Partial(..)) => return Ok(Parsed::More),
        Err(ParseError::Prefix) => return Err(refused("the connection began with other bytes")),
        Err(e) => return Err(refused(e)),
    };
    let client = match (header.command, header.addresses) {
        (Command::Proxy, Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (Command::Proxy, Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        _ => None,
    };
    Ok(Parsed::Header {
        len: header.len(),
        client,
    })
}

/// The signature every v2 header starts with.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(payload_extra: &[u8]) -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.push(0x21); // version 2, PROXY
        h.push(0x11); // IPv4, stream
        let len = 12 + payload_extra.len();
        h.extend_from_slice(&(len as u16).to_be_bytes());
        h.extend_from_slice(&[203, 0, 113, 7]);
        h.extend_from_slice(&[10, 0, 0, 5]);
        h.extend_from_slice(&51234u16.to_be_bytes());
        h.extend_from_slice(&6432u16.to_be_bytes());
        h.extend_from_slice(payload_extra);
        h
    }

    #[test]
    fn a_proxy_header_names_the_client_and_leaves_what_follows() {
        // A TLV (type 0xEA, AWS: the VPC endpoint id) as an NLB may add.
        let mut bytes = v4(&[0xEA, 0, 3, 1, b'v', b'p']);
        let len = bytes.len();
        bytes.extend_from_slice(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f]);
        assert_eq!(
            parse(&bytes).expect("parses"),
            Parsed::Header {
                len,
                client: Some("203.0.113.7:51234".parse().expect("addr")),
            }
        );
        for cut in [0, 5, 12, 15, 16, len - 1] {
            assert_eq!(
                parse(&bytes[..cut]).expect("partial"),
                Parsed::More,
                "{cut}"
            );
        }
    }

    #[test]
    fn local_headers_name_no_client() {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            parse(&h).expect("parses"),
            Parsed::Header {
                len: 16,
                client: None
            }
        );
    }

    #[test]
    fn other_bytes_and_huge_headers_are_refused() {
        // A client that connected directly and sent its startup packet.
        let startup = [0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(parse(&startup).is_err());
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(parse(&h).is_err());
        // Version 1's text form is not accepted either.
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n").is_err());
    }
}
