//! The first bytes of a client connection: the startup packet family (StartupMessage,
//! SSLRequest, GSSENCRequest, CancelRequest) as `ClientConn::read_startup` reads them, the
//! direct-TLS sniff in front of it, and the `options` a StartupMessage carries.
//!
//! Checks: a packet is taken whole or not at all (`None` only while it is incomplete, never
//! more than its length field says), a TLS handshake record never parses as a startup packet,
//! and what parses is what postgres-protocol's client writes for it, byte for byte.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postgres_protocol::message::frontend;
use sluice::protocol::frontend::{Startup, MAX_STARTUP_LEN};
use sluice::tls::HANDSHAKE_RECORD;

fuzz_target!(|data: &[u8]| {
    let parsed = Startup::parse(data);
    if data.first() == Some(&HANDSHAKE_RECORD) && data.len() >= 8 {
        // `read_startup` sends these to the TLS handshake: no length can start with 0x16.
        assert!(parsed.is_err(), "a TLS record parsed as a startup packet");
    }
    let (msg, used) = match parsed {
        Ok(Some(p)) => p,
        Ok(None) => {
            // Its length is checked once 8 bytes are in: then only a packet that is not all
            // here yet waits for more.
            if data.len() >= 8 {
                let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
                assert!(len > data.len() && len <= MAX_STARTUP_LEN);
            }
            return;
        }
        Err(_) => return,
    };
    assert!((8..=MAX_STARTUP_LEN).contains(&used) && used <= data.len());
    assert_eq!(
        used,
        u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize
    );
    // Bytes after the packet change nothing about it.
    assert_eq!(Startup::parse(&data[..used]), Ok(Some((msg.clone(), used))));

    let mut again = BytesMut::new();
    match &msg {
        Startup::SslRequest => frontend::ssl_request(&mut again),
        Startup::GssEncRequest => {
            again.extend_from_slice(&8u32.to_be_bytes());
            again.extend_from_slice(&sluice::protocol::GSSENC_REQUEST_CODE.to_be_bytes());
        }
        Startup::Cancel {
            process_id,
            secret_key,
        } => frontend::cancel_request(*process_id, *secret_key, &mut again),
        Startup::Startup { params } => {
            let pairs = params.iter().map(|(n, v)| (n.as_str(), v.as_str()));
            frontend::startup_message(pairs, &mut again).expect("parameters have no NUL");
            // The parameters are the session's settings, `options` split as PostgreSQL does.
            if let Ok(settings) = sluice::sql::startup_settings(params) {
                for (name, _) in settings.iter() {
                    assert!(!name.bytes().any(|b| b.is_ascii_uppercase()), "{name:?}");
                }
            }
        }
    }
    assert_eq!(&again[..], &data[..used], "re-encoded {msg:?}");
});
