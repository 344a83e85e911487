//! Client authentication messages: SCRAM-SHA-256's client-first-message and
//! client-final-message (`ScramServer::start` and `finish`, over each channel-binding offer),
//! the md5 response in a PasswordMessage, and RDS IAM tokens presented as passwords
//! (`iam::parse_client_token`).
//!
//! Input: a mode byte, then the message. In the SCRAM modes (0-5: the channel offer is mode
//! % 3, a real verifier below 3 and an unknown user's mock from 3) the client-first-message
//! runs to the first NUL and the client-final-message is the rest. Mode 6 is an md5
//! PasswordMessage body, mode 7 a token. Mode 8 is the other side: the server's messages to
//! Sluice's own SCRAM client (`ScramClient`), server-first-message to the first NUL and
//! server-final-message after it.
//!
//! Checks: an unknown user's exchange never succeeds; a server-first-message carries the
//! client's nonce and then the server's; a successful exchange proves the server with `v=`; a
//! token's fields are the ones it was read with; the client accepts a server-first-message
//! only with its nonce extended and a salt, and a server-final-message only with the signature
//! of the keys it proved.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice::auth::iam;
use sluice::auth::{
    Binding, Channel, Credentials, ScramClient, ScramKeys, ScramServer, ScramVerifier,
};
use sluice::protocol::frontend;

/// RFC 7677's example exchange: password `pencil`, this salt and server nonce, 4096 rounds, so
/// its messages (in the seed corpus) complete an exchange.
const SALT: &[u8] = b"\x5b\x6d\x99\x68\x9d\x12\x35\x8e\xec\xa0\x4b\x14\x12\x36\xfa\x81";
const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
/// `tls-server-end-point` data for the -PLUS mode.
const BINDING: [u8; 32] = [7; 32];

fn verifiers() -> &'static (ScramVerifier, ScramVerifier, Credentials) {
    static V: OnceLock<(ScramVerifier, ScramVerifier, Credentials)> = OnceLock::new();
    V.get_or_init(|| {
        let real = ScramVerifier::derive("pencil", SALT, 4096);
        let mock = ScramVerifier::mock("user", &[9; 32]);
        let md5 = Credentials::from_secret_string("user", "md5a3556571e93b0d20722ba62be61e8c2d")
            .expect("an md5 hash");
        (real, mock, md5)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, msg)) = data.split_first() else {
        return;
    };
    let (real, mock, md5) = verifiers();
    match mode % 9 {
        m @ 0..=5 => {
            let channel = match m % 3 {
                0 => Channel::Unavailable,
                1 => Channel::Offered,
                _ => Channel::Bound(&BINDING),
            };
            let unknown = m >= 3;
            let verifier = if unknown { mock } else { real };
            let (first, last) = match msg.iter().position(|&b| b == 0) {
                Some(i) => (&msg[..i], Some(&msg[i + 1..])),
                None => (msg, None),
            };
            scram(verifier, unknown, channel, first, last);
        }
        6 => {
            if let Ok(response) = frontend::password(msg) {
                let hash = md5.md5().expect("an md5 secret");
                let _ = hash.verify(*b"salt", response);
            }
        }
        7 => token(msg),
        _ => client(msg),
    }
});

/// The RFC 7677 client nonce, and the keys of `pencil` for its salt.
const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";

fn keys() -> &'static ScramKeys {
    static K: OnceLock<ScramKeys> = OnceLock::new();
    K.get_or_init(|| ScramKeys::derive("pencil", SALT, 4096))
}

fn client(msg: &[u8]) {
    let (first, last) = match msg.iter().position(|&b| b == 0) {
        Some(i) => (&msg[..i], Some(&msg[i + 1..])),
        None => (msg, None),
    };
    let (mut c, _) = ScramClient::start_with_nonce(Binding::Unsupported, CLIENT_NONCE.into());
    let Ok((salt, iterations)) = c.server_first(first) else {
        return;
    };
    assert!(first.starts_with(format!("r={CLIENT_NONCE}").as_bytes()));
    assert!(!salt.is_empty() && iterations >= 1);
    // Whatever salt was named, the proof is computed with the fixed keys (no PBKDF2 here).
    let final_message = c.client_final(keys());
    assert!(final_message.starts_with(b"c=biws,r="));
    if let Some(last) = last {
        if c.finish(last).is_ok() {
            assert!(last.starts_with(b"v="), "accepted without a signature");
        }
    }
}

fn scram(
    verifier: &ScramVerifier,
    unknown: bool,
    channel: Channel<'_>,
    first: &[u8],
    last: Option<&[u8]>,
) {
    let Ok((server, server_first)) = ScramServer::start(verifier, first, SERVER_NONCE, channel)
    else {
        return;
    };
    // r=<client nonce><server nonce>,s=<salt>,i=<rounds>
    let nonce = first
        .split(|&b| b == b',')
        .find_map(|a| a.strip_prefix(b"r="))
        .expect("a client nonce");
    let want = [b"r=", nonce, SERVER_NONCE.as_bytes(), b",s="].concat();
    assert!(server_first.starts_with(&want), "{server_first:?}");
    let rounds = format!(",i={}", verifier.iterations());
    assert!(server_first.ends_with(rounds.as_bytes()));
    let Some(last) = last else {
        return;
    };
    if let Ok(server_final) = server.finish(last) {
        assert!(!unknown, "an unknown user logged in");
        assert!(server_final.starts_with(b"v=") && server_final.len() == 2 + 44);
    }
}

fn token(msg: &[u8]) {
    let Ok(password) = std::str::from_utf8(msg) else {
        return;
    };
    let Some(t) = iam::parse_client_token(password) else {
        assert_eq!(iam::token_expiry(password), None);
        return;
    };
    assert_eq!(iam::token_expiry(password), Some(t.expires));
    assert!(password.starts_with(&format!("{}:", t.host)));
    assert!(!t.user.is_empty() && iam::valid_region(&t.region));
}
