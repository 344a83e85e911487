//! SCRAM-SHA-256 (RFC 5802 / RFC 7677), client side, for Sluice's own logins to the server.
//!
//! The exchange is split from the keys it proves: [`ScramKeys`] holds what PBKDF2 derives from
//! a password for one salt and iteration count (ClientKey, StoredKey, ServerKey), so a pool
//! that logs in as the same user again, with the same salt, skips the PBKDF2 run (4,096 HMAC
//! rounds by default, about a millisecond of CPU per login) and needs nothing but the keys.
//! postgres-protocol's client takes only a password and derives anew at every login, so this
//! side of the exchange is written here, beside the server side ([`super::ScramServer`]).
//!
//! Channel binding is `tls-server-end-point` (RFC 5929), the only type PostgreSQL knows.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::Rng;
use sha2::{Digest, Sha256};

use super::scram::{attr, decode_b64, decode_key, hmac, is_valid_nonce, salted_password, Key};
use super::{constant_time_eq, AuthError, ScramVerifier};

/// Largest server message read (real ones are about 100 bytes).
const MAX_MESSAGE_LEN: usize = 2048;
/// Largest salt accepted from a server.
const MAX_SALT_LEN: usize = 1024;
/// Most PBKDF2 rounds a server may ask for (about 3 s of CPU): PostgreSQL's default is 4,096
/// and hardened setups use some 600,000; a server asking for billions would keep a blocking
/// thread busy for hours.
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// The keys one password gives for one salt and iteration count: password-equivalent toward
/// that server (they log in as the user), so never written anywhere; `Debug` leaves them out.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub(super) salt: Vec<u8>,
    pub(super) iterations: u32,
    client_key: Key,
    pub(super) stored_key: Key,
    pub(super) server_key: Key,
}

impl ScramKeys {
    /// Derives the keys of `password` for `salt` and `iterations` (0 is taken as 1).
    ///
    /// Runs PBKDF2: keep it off async threads.
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
        let iterations = iterations.max(1);
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        ScramKeys {
            salt: salt.to_vec(),
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            client_key,
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    /// The keys a client's proof against `verifier` revealed (`client_key`, from
    /// [`super::ScramServer::finish_with_key`]): they log in to a server that holds the same
    /// verifier, with no password known anywhere.
    pub fn recovered(verifier: &ScramVerifier, client_key: Key) -> ScramKeys {
        ScramKeys {
            salt: verifier.salt.clone(),
            iterations: verifier.iterations,
            client_key,
            stored_key: verifier.stored_key,
            server_key: verifier.server_key,
        }
    }

    /// Whether `password` gives these keys (for their salt and iteration count).
    ///
    /// Runs PBKDF2: keep it off async threads.
    pub fn matches(&self, password: &str) -> bool {
        let other = ScramKeys::derive(password, &self.salt, self.iterations);
        super::constant_time_eq(&other.stored_key, &self.stored_key)
    }

    /// Whether these keys were derived for this salt and iteration count (what the server's
    /// first message names); a server that names others has another password for the user.
    pub fn fits(&self, salt: &[u8], iterations: u32) -> bool {
        self.iterations == iterations.max(1) && self.salt == salt
    }
}

impl fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramKeys")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// What the client says about channel binding (the gs2 header of RFC 5802 section 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// `n`: the client cannot bind (no TLS).
    Unsupported,
    /// `y`: the client could bind but the server did not offer SCRAM-SHA-256-PLUS.
    Unrequested,
    /// `p=tls-server-end-point`: SCRAM-SHA-256-PLUS, bound to this hash of the server's
    /// certificate.
    ServerEndPoint(Vec<u8>),
}

/// The client's half of one exchange.
pub struct ScramClient {
    /// What `c=` carries: the gs2 header, then the binding data when bound.
    cbind_input: Vec<u8>,
    nonce: String,
    /// `client-first-bare "," server-first "," client-final-without-proof` once known.
    auth_message: Vec<u8>,
    /// The combined nonce the server sent.
    server_nonce: Vec<u8>,
    /// The ServerSignature the server must send, once the proof is computed.
    expected: Option<Key>,
}

impl ScramClient {
    /// Starts an exchange; returns the client and its client-first-message (the data of
    /// `SASLInitialResponse`). The user name is empty, as libpq sends it: the server takes the
    /// one of the startup packet.
    pub fn start(binding: Binding) -> (ScramClient, Vec<u8>) {
        let mut raw = [0u8; 18];
        rand::rng().fill_bytes(&mut raw);
        Self::start_with_nonce(binding, STANDARD.encode(raw))
    }

    /// [`ScramClient::start`] with the nonce given, for reproducible exchanges (tests, the fuzz
    /// target); real logins use a random one.
    #[doc(hidden)]
    pub fn start_with_nonce(binding: Binding, nonce: String) -> (ScramClient, Vec<u8>) {
        let (header, data): (&[u8], &[u8]) = match &binding {
            Binding::Unsupported => (b"n,,", &[]),
            Binding::Unrequested => (b"y,,", &[]),
            Binding::ServerEndPoint(data) => (b"p=tls-server-end-point,,", data),
        };
        let bare = format!("n=,r={nonce}");
        let first = [header, bare.as_bytes()].concat();
        let client = ScramClient {
            cbind_input: [header, data].concat(),
            nonce,
            auth_message: bare.into_bytes(),
            server_nonce: Vec::new(),
            expected: None,
        };
        (client, first)
    }

    /// Reads the server-first-message; returns the salt and iteration count the keys must be
    /// derived for.
    pub fn server_first(&mut self, message: &[u8]) -> Result<(Vec<u8>, u32), AuthError> {
        use AuthError::MalformedScram as Bad;
        if message.len() > MAX_MESSAGE_LEN {
            return Err(Bad("server-first-message too long"));
        }
        let mut attrs = message.split(|&b| b == b',');
        let first = attrs.next().unwrap_or_default();
        if first.starts_with(b"m=") {
            return Err(AuthError::UnsupportedExtension);
        }
        let nonce = attr(first, b'r').ok_or(Bad("missing server nonce"))?;
        // The server's nonce extends ours by something of its own.
        if !nonce.starts_with(self.nonce.as_bytes())
            || nonce.len() == self.nonce.len()
            || !is_valid_nonce(nonce)
        {
            return Err(AuthError::NonceMismatch);
        }
        let salt = attrs
            .next()
            .and_then(|a| attr(a, b's'))
            .and_then(|s| decode_b64(s, MAX_SALT_LEN))
            .filter(|s| !s.is_empty())
            .ok_or(Bad("missing or invalid salt"))?;
        let iterations = attrs
            .next()
            .and_then(|a| attr(a, b'i'))
            .filter(|i| !i.is_empty() && i.iter().all(u8::is_ascii_digit))
            .and_then(|i| std::str::from_utf8(i).ok()?.parse::<u32>().ok())
            .filter(|&i| i >= 1)
            .ok_or(Bad("missing or invalid iteration count"))?;
        if iterations > MAX_ITERATIONS {
            return Err(Bad(
                "the server asks for more than 10,000,000 PBKDF2 iterations",
            ));
        }
        self.server_nonce = nonce.to_vec();
        self.auth_message.push(b',');
        self.auth_message.extend_from_slice(message);
        Ok((salt, iterations))
    }

    /// The client-final-message (the data of `SASLResponse`), proving `keys`, which must be
    /// those of the salt and iteration count [`ScramClient::server_first`] returned.
    pub fn client_final(&mut self, keys: &ScramKeys) -> Vec<u8> {
        let without_proof = [
            b"c=".as_slice(),
            STANDARD.encode(&self.cbind_input).as_bytes(),
            b",r=",
            &self.server_nonce,
        ]
        .concat();
        self.auth_message.push(b',');
        self.auth_message.extend_from_slice(&without_proof);
        let signature = hmac(&keys.stored_key, &[&self.auth_message]);
        let mut proof = keys.client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        self.expected = Some(hmac(&keys.server_key, &[&self.auth_message]));
        [
            without_proof.as_slice(),
            b",p=",
            STANDARD.encode(proof).as_bytes(),
        ]
        .concat()
    }

    /// Checks the server-final-message: the server proves it knows the keys too (a server
    /// that does not is refused, whatever it says next).
    pub fn finish(&self, message: &[u8]) -> Result<(), AuthError> {
        use AuthError::MalformedScram as Bad;
        let expected = self
            .expected
            .ok_or(Bad("server-final-message out of turn"))?;
        let first = message.split(|&b| b == b',').next().unwrap_or_default();
        if attr(first, b'e').is_some() {
            return Err(Bad("the server reported an error in server-final-message"));
        }
        let signature = attr(first, b'v')
            .and_then(decode_key)
            .ok_or(Bad("missing or invalid server signature"))?;
        if !constant_time_eq(&signature, &expected) {
            return Err(AuthError::ServerSignatureMismatch);
        }
        Ok(())
    }
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClient").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Channel, ScramServer, ScramVerifier};

    /// One exchange against Sluice's own server side; returns the server's verdict.
    fn exchange(
        verifier: &ScramVerifier,
        password: &str,
        binding: Binding,
        channel: Channel<'_>,
    ) -> Result<(), AuthError> {
        let (mut client, first) = ScramClient::start(binding);
        let (server, server_first) =
            ScramServer::start(verifier, &first, &ScramServer::random_nonce(), channel)?;
        let (salt, iterations) = client.server_first(&server_first)?;
        let keys = ScramKeys::derive(password, &salt, iterations);
        let server_final = server.finish(&client.client_final(&keys))?;
        client.finish(&server_final)
    }

    #[test]
    fn logs_in_against_the_server_side_plain_and_bound() {
        let v = ScramVerifier::derive("pencil", b"salt of the earth", 4096);
        assert_eq!(
            exchange(&v, "pencil", Binding::Unsupported, Channel::Unavailable),
            Ok(())
        );
        assert_eq!(
            exchange(&v, "pencil", Binding::Unrequested, Channel::Unavailable),
            Ok(())
        );
        let cert_hash = [9u8; 32];
        assert_eq!(
            exchange(
                &v,
                "pencil",
                Binding::ServerEndPoint(cert_hash.to_vec()),
                Channel::Bound(&cert_hash)
            ),
            Ok(())
        );
        // Bound to another certificate (a machine in the middle): refused.
        assert_eq!(
            exchange(
                &v,
                "pencil",
                Binding::ServerEndPoint(vec![1; 32]),
                Channel::Bound(&cert_hash)
            ),
            Err(AuthError::ChannelBindingMismatch)
        );
        assert_eq!(
            exchange(&v, "pen", Binding::Unsupported, Channel::Unavailable),
            Err(AuthError::BadPassword)
        );
    }

    #[test]
    fn keys_match_their_salt_and_the_verifier() {
        let keys = ScramKeys::derive("pw", b"salt", 4096);
        assert!(keys.fits(b"salt", 4096));
        assert!(!keys.fits(b"salt", 4097) && !keys.fits(b"pepper", 4096));
        let v = ScramVerifier::derive("pw", b"salt", 4096);
        assert!(v.to_string().contains(&STANDARD.encode(keys.stored_key)));
        assert!(!format!("{keys:?}").contains(&STANDARD.encode(keys.client_key)));
        assert!(keys.matches("pw") && !keys.matches("pW") && !keys.matches(""));
        assert_eq!(ScramVerifier::from_keys(&keys), v);
        assert_eq!(ScramKeys::recovered(&v, keys.client_key), keys);
    }

    /// RFC 7677 section 3's example exchange, byte for byte.
    #[test]
    fn rfc_7677_example() {
        let (mut c, first) =
            ScramClient::start_with_nonce(Binding::Unsupported, "rOprNGfwEbeRWgbNEkqO".into());
        // The RFC's client sends its user name; PostgreSQL's leave it empty.
        assert_eq!(first, b"n,,n=,r=rOprNGfwEbeRWgbNEkqO");
        c.auth_message = b"n=user,r=rOprNGfwEbeRWgbNEkqO".to_vec();
        let server_first =
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let (salt, iterations) = c.server_first(server_first).unwrap();
        let keys = ScramKeys::derive("pencil", &salt, iterations);
        let fin = c.client_final(&keys);
        assert_eq!(
            String::from_utf8(fin).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(
            c.finish(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Ok(())
        );
        assert_eq!(
            c.finish(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Err(AuthError::ServerSignatureMismatch)
        );
    }

    #[test]
    fn refuses_bad_server_messages() {
        for bad in [
            b"".as_slice(),
            b"r=other,s=c2FsdA==,i=4096",
            b"r=NONCE,s=c2FsdA==,i=4096",
            b"r=NONCEx,s=,i=4096",
            b"r=NONCEx,s=!!,i=4096",
            b"r=NONCEx,s=c2FsdA==,i=0",
            b"r=NONCEx,s=c2FsdA==,i=+1",
            b"r=NONCEx,s=c2FsdA==,i=99999999999",
            b"r=NONCEx,s=c2FsdA==,i=10000001",
            b"r=NONCEx,s=c2FsdA==",
            b"m=ext,r=NONCEx,s=c2FsdA==,i=1",
        ] {
            let (mut c, _) = ScramClient::start_with_nonce(Binding::Unsupported, "NONCE".into());
            assert!(
                c.server_first(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let (c, _) = ScramClient::start_with_nonce(Binding::Unsupported, "NONCE".into());
        assert!(c.finish(b"v=AAAA").is_err(), "before the proof");
    }
}
