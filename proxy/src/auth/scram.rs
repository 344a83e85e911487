//! SCRAM-SHA-256 (RFC 5802 / RFC 7677), server side: the stored verifier in
//! PostgreSQL's `pg_authid` format and the two-round exchange that checks a
//! client's proof against it. See
//! <https://www.postgresql.org/docs/current/sasl-authentication.html>.
//!
//! `SCRAM-SHA-256-PLUS` binds the exchange to the TLS channel with
//! `tls-server-end-point` (RFC 5929), the only binding type PostgreSQL knows;
//! the caller supplies the binding data (a hash of the certificate it serves).

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};

use super::{constant_time_eq, AuthError};

pub(crate) const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";
const DEFAULT_ITERATIONS: u32 = 4096;
const DEFAULT_SALT_LEN: usize = 16;
pub(super) const KEY_LEN: usize = 32;
/// Real client messages are around 100 bytes; anything this large is abuse.
const MAX_MESSAGE_LEN: usize = 2048;
const MAX_NONCE_LEN: usize = 512;
const MAX_SALT_LEN: usize = 1024;

pub type Key = [u8; KEY_LEN];

/// A user's SCRAM-SHA-256 secret: enough to verify a client's proof and to
/// prove the server knows the password, without holding the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub(super) iterations: u32,
    pub(super) salt: Vec<u8>,
    pub(super) stored_key: Key,
    pub(super) server_key: Key,
    /// Stands in for an unknown user; no proof is ever accepted.
    mock: bool,
}

impl ScramVerifier {
    /// Derives a verifier from a plaintext password. Like PostgreSQL, the
    /// password is SASLprep'd, falling back to its raw bytes when SASLprep
    /// rejects it, so any password PostgreSQL accepts works here too.
    /// An iteration count of 0 is treated as 1.
    ///
    /// Runs PBKDF2 (`iterations` HMAC rounds): keep it off async threads.
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> Self {
        ScramVerifier::from_keys(&super::ScramKeys::derive(password, salt, iterations))
    }

    /// The verifier of `keys`: the client's keys without the ClientKey, which a verifier does
    /// not keep. No PBKDF2 is run.
    pub fn from_keys(keys: &super::ScramKeys) -> Self {
        ScramVerifier {
            iterations: keys.iterations,
            salt: keys.salt.clone(),
            stored_key: keys.stored_key,
            server_key: keys.server_key,
            mock: false,
        }
    }

    /// [`derive`](Self::derive) with a fresh random 16-byte salt and 4096
    /// iterations, PostgreSQL's defaults. Same PBKDF2 cost.
    pub fn from_password(password: &str) -> Self {
        let mut salt = [0u8; DEFAULT_SALT_LEN];
        rand::rng().fill_bytes(&mut salt);
        ScramVerifier::derive(password, &salt, DEFAULT_ITERATIONS)
    }

    /// A verifier for a user that does not exist, so the proxy can run the
    /// whole exchange and fail only at the proof, exactly as for a wrong
    /// password. The salt is derived from (`secret`, `user`) so repeated
    /// probes for one name see a stable salt, as they would for a real user;
    /// `secret` should be random per process. No PBKDF2 is run.
    pub fn mock(user: &str, secret: &[u8; 32]) -> Self {
        let user = user.as_bytes();
        let salt = hmac(secret, &[b"mock salt\0", user]);
        ScramVerifier {
            iterations: DEFAULT_ITERATIONS,
            salt: salt[..DEFAULT_SALT_LEN].to_vec(),
            stored_key: hmac(secret, &[b"mock stored key\0", user]),
            server_key: hmac(secret, &[b"mock server key\0", user]),
            mock: true,
        }
    }

    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
    /// (base64 fields), the format of `pg_authid.rolpassword`.
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        use AuthError::InvalidVerifier as Bad;
        let rest = s
            .strip_prefix(VERIFIER_PREFIX)
            .ok_or(Bad("missing SCRAM-SHA-256$ prefix"))?;
        let (params, keys) = rest.split_once('$').ok_or(Bad("missing keys"))?;
        let (iterations, salt) = params.split_once(':').ok_or(Bad("missing salt"))?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(Bad("missing server key"))?;

        // Digits only: `u32::from_str` would also take a leading '+'.
        // PostgreSQL stores the count as a signed int.
        let iterations = Some(iterations)
            .filter(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|i| i.parse::<u32>().ok())
            .filter(|&i| i >= 1 && i <= i32::MAX as u32)
            .ok_or(Bad("iteration count must be between 1 and 2147483647"))?;
        let salt = decode_b64(salt.as_bytes(), MAX_SALT_LEN)
            .filter(|s| !s.is_empty())
            .ok_or(Bad("invalid salt"))?;
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: decode_key(stored_key.as_bytes()).ok_or(Bad("invalid stored key"))?,
            server_key: decode_key(server_key.as_bytes()).ok_or(Bad("invalid server key"))?,
            mock: false,
        })
    }

    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    pub fn salt(&self) -> &[u8] {
        &self.salt
    }
}

/// Prints the `pg_authid` format accepted by [`ScramVerifier::parse`].
impl fmt::Display for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{VERIFIER_PREFIX}{}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key)
        )
    }
}

/// Redacted: the keys let anyone impersonate the server to clients, and the
/// stored key enables offline guessing, so they must stay out of logs.
impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("mock", &self.mock)
            .finish_non_exhaustive()
    }
}

/// What the connection offers for channel binding (RFC 5802 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel<'a> {
    /// No TLS, or no binding data for its certificate: only SCRAM-SHA-256 was offered.
    Unavailable,
    /// SCRAM-SHA-256-PLUS was offered and the client chose SCRAM-SHA-256: a client that says
    /// it could bind (`y`) was downgraded by someone in the middle.
    Offered,
    /// The client chose SCRAM-SHA-256-PLUS: it must bind to this `tls-server-end-point` data.
    Bound(&'a [u8]),
}

/// The server's half of one SCRAM-SHA-256 exchange, between sending
/// server-first-message and receiving client-final-message.
pub struct ScramServer {
    stored_key: Key,
    server_key: Key,
    mock: bool,
    /// What `c=` must carry: the gs2 header exactly as the client sent it, followed by the
    /// channel-binding data when bound.
    cbind_input: Vec<u8>,
    /// Client nonce followed by server nonce.
    nonce: Vec<u8>,
    /// `client-first-bare "," server-first ","`: the AuthMessage up to the
    /// client-final part, which is appended in [`ScramServer::finish`].
    auth_message: Vec<u8>,
}

impl ScramServer {
    /// A fresh server nonce: 18 random bytes in base64, as PostgreSQL does.
    pub fn random_nonce() -> String {
        let mut raw = [0u8; 18];
        rand::rng().fill_bytes(&mut raw);
        STANDARD.encode(raw)
    }

    /// Handles the client-first-message (the data of `SASLInitialResponse`)
    /// and returns the state to keep plus the server-first-message to send
    /// in `AuthenticationSASLContinue`.
    ///
    /// The `n=` user name is ignored, as in PostgreSQL: the user comes from
    /// the startup packet. The gs2 flag must agree with `channel`, as
    /// PostgreSQL checks: `p=tls-server-end-point` exactly when the client
    /// chose -PLUS, and `y` ("client supports channel binding but thinks the
    /// server does not") refused when -PLUS was offered (a downgrade).
    pub fn start(
        verifier: &ScramVerifier,
        client_first: &[u8],
        server_nonce: &str,
        channel: Channel<'_>,
    ) -> Result<(ScramServer, Vec<u8>), AuthError> {
        use AuthError::MalformedScram as Bad;
        if !is_valid_nonce(server_nonce.as_bytes()) {
            return Err(AuthError::InvalidServerNonce);
        }
        if client_first.len() > MAX_MESSAGE_LEN {
            return Err(Bad("client-first-message too long"));
        }

        let mut parts = client_first.splitn(3, |&b| b == b',');
        let binding = match (parts.next().unwrap_or_default(), channel) {
            (b"n", Channel::Unavailable | Channel::Offered) => None,
            (b"y", Channel::Unavailable) => None,
            (b"y", Channel::Offered) => return Err(AuthError::ChannelBindingDowngrade),
            (b"n" | b"y", Channel::Bound(_)) => {
                return Err(Bad(
                    "SCRAM-SHA-256-PLUS selected without channel binding data",
                ))
            }
            (b"p=tls-server-end-point", Channel::Bound(data)) => Some(data),
            ([b'p', b'=', ..], Channel::Bound(_)) => {
                return Err(AuthError::UnsupportedChannelBinding)
            }
            ([b'p', b'=', ..], _) => {
                return Err(Bad("channel binding data sent without SCRAM-SHA-256-PLUS"))
            }
            _ => return Err(Bad("invalid channel binding flag")),
        };
        match parts.next().ok_or(Bad("missing authzid"))? {
            b"" | b"a=" => {}
            [b'a', b'=', ..] => return Err(AuthError::AuthzidNotSupported),
            _ => return Err(Bad("invalid authzid")),
        }
        let bare = parts
            .next()
            .ok_or(Bad("missing client-first-message-bare"))?;
        let gs2_header = client_first
            .get(..client_first.len() - bare.len())
            .ok_or(Bad("invalid gs2 header"))?;

        let mut attrs = bare.split(|&b| b == b',');
        let user = attrs.next().unwrap_or_default();
        if user.starts_with(b"m=") {
            return Err(AuthError::UnsupportedExtension);
        }
        attr(user, b'n').ok_or(Bad("missing user name"))?;
        let client_nonce = attrs
            .next()
            .and_then(|a| attr(a, b'r'))
            .ok_or(Bad("missing nonce"))?;
        if !is_valid_nonce(client_nonce) {
            return Err(Bad("invalid nonce"));
        }
        if !attrs.all(is_extension) {
            return Err(Bad("invalid extension in client-first-message"));
        }

        let nonce = [client_nonce, server_nonce.as_bytes()].concat();
        let server_first = [
            b"r=".as_slice(),
            &nonce,
            b",s=",
            STANDARD.encode(&verifier.salt).as_bytes(),
            b",i=",
            verifier.iterations.to_string().as_bytes(),
        ]
        .concat();
        let auth_message = [bare, b",", &server_first, b","].concat();
        let server = ScramServer {
            stored_key: verifier.stored_key,
            server_key: verifier.server_key,
            mock: verifier.mock,
            cbind_input: [gs2_header, binding.unwrap_or_default()].concat(),
            nonce,
            auth_message,
        };
        Ok((server, server_first))
    }

    /// Handles the client-final-message (the data of `SASLResponse`) and,
    /// if the proof is right, returns the server-final-message (`v=...`) to
    /// send in `AuthenticationSASLFinal`, which proves to the client that
    /// the server knows its secret too.
    pub fn finish(self, client_final: &[u8]) -> Result<Vec<u8>, AuthError> {
        self.finish_with_key(client_final).map(|(last, _)| last)
    }

    /// [`finish`](Self::finish), also returning the ClientKey the client's proof reveals
    /// (ClientProof XOR ClientSignature): with the verifier's salt, StoredKey and ServerKey,
    /// the keys of a login to the server as the user ([`super::ScramKeys::recovered`]).
    pub fn finish_with_key(self, client_final: &[u8]) -> Result<(Vec<u8>, Key), AuthError> {
        use AuthError::MalformedScram as Bad;
        if client_final.len() > MAX_MESSAGE_LEN {
            return Err(Bad("client-final-message too long"));
        }
        // The proof must be the last attribute, and everything before it is
        // signed, so split it off first.
        let mut tail = client_final.rsplitn(2, |&b| b == b',');
        let proof = attr(tail.next().unwrap_or_default(), b'p');
        let (Some(proof), Some(without_proof)) = (proof, tail.next()) else {
            return Err(Bad("missing proof"));
        };
        let mut attrs = without_proof.split(|&b| b == b',');
        let cbind = attrs
            .next()
            .and_then(|a| attr(a, b'c'))
            .ok_or(Bad("missing channel binding"))?;
        let nonce = attrs
            .next()
            .and_then(|a| attr(a, b'r'))
            .ok_or(Bad("missing nonce"))?;
        if !attrs.all(is_extension) {
            return Err(Bad("invalid extension in client-final-message"));
        }

        let cbind = decode_b64(cbind, MAX_MESSAGE_LEN).ok_or(Bad("invalid channel binding"))?;
        if !constant_time_eq(&cbind, &self.cbind_input) {
            return Err(AuthError::ChannelBindingMismatch);
        }
        if nonce != self.nonce.as_slice() {
            return Err(AuthError::NonceMismatch);
        }
        let proof = decode_key(proof).ok_or(Bad("invalid proof"))?;

        let mut auth_message = self.auth_message;
        auth_message.extend_from_slice(without_proof);
        // ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage), so
        // undoing the XOR recovers the client key, whose hash must be ours.
        let signature = hmac(&self.stored_key, &[&auth_message]);
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(signature) {
            *k ^= s;
        }
        let matches = constant_time_eq(&Sha256::digest(client_key), &self.stored_key);
        if !matches || self.mock {
            return Err(AuthError::BadPassword);
        }
        let server_signature = hmac(&self.server_key, &[&auth_message]);
        let last = [
            b"v=".as_slice(),
            STANDARD.encode(server_signature).as_bytes(),
        ]
        .concat();
        Ok((last, client_key))
    }
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramServer").finish_non_exhaustive()
    }
}

pub(super) fn hmac(key: &[u8], parts: &[&[u8]]) -> Key {
    // Cannot fail: HMAC takes keys of any length (longer ones are hashed, shorter ones padded).
    #[allow(clippy::expect_used)]
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// SaltedPassword: PBKDF2 of the SASLprep'd password (its raw bytes when SASLprep rejects it,
/// as PostgreSQL and libpq do).
pub(super) fn salted_password(password: &str, salt: &[u8], iterations: u32) -> Key {
    let prepared = stringprep::saslprep(password)
        .map(|p| p.into_owned().into_bytes())
        .unwrap_or_else(|_| password.as_bytes().to_vec());
    let mut salted = [0u8; KEY_LEN];
    pbkdf2::pbkdf2_hmac::<Sha256>(&prepared, salt, iterations, &mut salted);
    salted
}

/// The value of a `<name>=<value>` SCRAM attribute.
pub(super) fn attr(part: &[u8], name: u8) -> Option<&[u8]> {
    part.strip_prefix(&[name, b'='])
}

/// A non-empty, bounded run of RFC 5802 `printable`: visible ASCII but ','.
pub(super) fn is_valid_nonce(s: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NONCE_LEN
        && s.iter().all(|&b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// An optional attribute we ignore, as PostgreSQL does.
pub(super) fn is_extension(part: &[u8]) -> bool {
    matches!(part, [name, b'=', ..] if name.is_ascii_alphabetic())
}

/// Decodes base64, refusing input that would decode to over `max` bytes
/// before allocating for it.
pub(super) fn decode_b64(s: &[u8], max: usize) -> Option<Vec<u8>> {
    if s.len() > max.div_ceil(3) * 4 {
        return None;
    }
    STANDARD.decode(s).ok().filter(|d| d.len() <= max)
}

pub(super) fn decode_key(s: &[u8]) -> Option<Key> {
    decode_b64(s, KEY_LEN)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_verifier_round_trips_through_pg_authid_format() {
        let v = ScramVerifier::derive("pencil", b"0123456789abcdef", 4096);
        let s = v.to_string();
        assert!(s.starts_with("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$"));
        assert_eq!(ScramVerifier::parse(&s).unwrap(), v);
        assert_eq!(ScramVerifier::derive("x", b"s", 0).iterations(), 1);
        assert!(!format!("{v:?}").contains(&STANDARD.encode(v.stored_key)));
    }

    #[test]
    fn parses_postgres_protocol_verifier() {
        let s = postgres_protocol::password::scram_sha_256(b"pw");
        let v = ScramVerifier::parse(&s).unwrap();
        assert_eq!((v.iterations(), v.salt().len()), (4096, 16));
        assert_eq!(v.to_string(), s);
        assert_eq!(ScramVerifier::derive("pw", v.salt(), 4096), v);
    }

    #[test]
    fn parse_rejects_malformed_verifiers() {
        let k = STANDARD.encode([7u8; KEY_LEN]);
        let ok = format!("SCRAM-SHA-256$4096:c2FsdA==${k}:{k}");
        assert!(ScramVerifier::parse(&ok).is_ok());
        let short = STANDARD.encode([7u8; 31]);
        for bad in [
            String::new(),
            "SCRAM-SHA-256$".into(),
            "SCRAM-SHA-1$4096:c2FsdA==$a:b".into(),
            format!("SCRAM-SHA-256$4096:c2FsdA==${k}"),
            format!("SCRAM-SHA-256$4096${k}:{k}"),
            format!("SCRAM-SHA-256$99999999999999999999999:c2FsdA==${k}:{k}"),
            format!("SCRAM-SHA-256$4294967295:c2FsdA==${k}:{k}"),
            format!("SCRAM-SHA-256$0:c2FsdA==${k}:{k}"),
            format!("SCRAM-SHA-256$+4096:c2FsdA==${k}:{k}"),
            format!("SCRAM-SHA-256$-1:c2FsdA==${k}:{k}"),
            format!("SCRAM-SHA-256$:c2FsdA==${k}:{k}"),
            format!("SCRAM-SHA-256$4096:${k}:{k}"),
            format!("SCRAM-SHA-256$4096:!!!${k}:{k}"),
            format!("SCRAM-SHA-256$4096:{}${k}:{k}", "A".repeat(4000)),
            format!("SCRAM-SHA-256$4096:c2FsdA==${short}:{k}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${k}:{k}:{k}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${k}:{k}$"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${k}:{k} "),
        ] {
            let err = ScramVerifier::parse(&bad).unwrap_err();
            assert!(
                matches!(err, AuthError::InvalidVerifier(_)),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn mock_is_deterministic_per_user_and_secret() {
        let a = ScramVerifier::mock("alice", &[1; 32]);
        assert_eq!(a, ScramVerifier::mock("alice", &[1; 32]));
        assert_eq!((a.iterations(), a.salt().len()), (4096, 16));
        assert_ne!(a.salt(), ScramVerifier::mock("bob", &[1; 32]).salt());
        assert_ne!(a.salt(), ScramVerifier::mock("alice", &[2; 32]).salt());
    }

    #[test]
    fn random_nonce_is_printable_and_fresh() {
        let n = ScramServer::random_nonce();
        assert_eq!(n.len(), 24);
        assert!(is_valid_nonce(n.as_bytes()));
        assert_ne!(n, ScramServer::random_nonce());
    }
}
