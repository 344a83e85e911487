//! Server side of PostgreSQL client authentication: the secrets Sluice keeps
//! for each user ([`Credentials`]), the SCRAM-SHA-256 exchange
//! ([`ScramServer`]) and the legacy md5 challenge ([`Md5Hash`]).
//!
//! This module is pure computation: it never touches sockets or an async
//! runtime, so the protocol layer decides how messages are framed and sent.
//! The exception is [`iam`], RDS IAM tokens toward the server, whose
//! credentials come from AWS's credential sources (environment, container
//! credentials endpoint, instance metadata).
//! See <https://www.postgresql.org/docs/current/sasl-authentication.html>
//! for the SCRAM message flow (RFC 5802 / RFC 7677).
//!
//! Error texts ([`AuthError`]'s `Display`) are safe to send to clients: none
//! of them depends on whether the user exists, and an unknown user is meant
//! to be run through a full exchange against [`ScramVerifier::mock`], which
//! fails with the same [`AuthError::BadPassword`] as a wrong password.

pub mod iam;
mod md5;
mod scram;
mod scram_client;

pub use self::md5::Md5Hash;
pub use self::scram::{Channel, Key, ScramServer, ScramVerifier};
pub use self::scram_client::{Binding, ScramClient, ScramKeys};

use crate::protocol::sqlstate::{self, SqlState};

/// Why an authentication step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A client SCRAM message does not follow RFC 5802; the payload names
    /// the offending part.
    #[error("malformed SCRAM message: {0}")]
    MalformedScram(&'static str),
    /// The client asked for a channel-binding type other than
    /// `tls-server-end-point`.
    #[error("unsupported SCRAM channel-binding type")]
    UnsupportedChannelBinding,
    /// The client says it could bind but thinks the server cannot, while
    /// SCRAM-SHA-256-PLUS was offered: someone in the middle removed it.
    #[error("SCRAM channel binding negotiation error: the client supports channel binding but thinks the server does not; this server does support it")]
    ChannelBindingDowngrade,
    /// The `c=` attribute of client-final does not echo the gs2 header.
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    /// The nonce in client-final is not client nonce + server nonce.
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    /// The client sent a non-empty `a=` authorization identity.
    #[error("SCRAM authorization identity is not supported")]
    AuthzidNotSupported,
    /// The client requires a mandatory SCRAM extension (`m=`).
    #[error("unsupported SCRAM extension")]
    UnsupportedExtension,
    /// The proof or md5 response does not match the stored secret (or the
    /// user does not exist: the two are deliberately indistinguishable).
    #[error("password authentication failed")]
    BadPassword,
    /// A configured `SCRAM-SHA-256$...` verifier cannot be parsed.
    #[error("invalid SCRAM verifier: {0}")]
    InvalidVerifier(&'static str),
    /// A configured md5 hash is not `md5` followed by 32 hex digits.
    #[error("invalid md5 password hash")]
    InvalidMd5Hash,
    /// A configured secret is unusable (e.g. an empty password).
    #[error("invalid secret: {0}")]
    InvalidSecret(&'static str),
    /// The server's final SCRAM message does not prove it knows the password (Sluice's own
    /// logins to the server).
    #[error("the server's SCRAM signature does not match: it does not know the password")]
    ServerSignatureMismatch,
    /// The caller-supplied server nonce is empty or not SCRAM-printable.
    #[error("invalid SCRAM server nonce")]
    InvalidServerNonce,
}

impl AuthError {
    /// The SQLSTATE to put in the `ErrorResponse` sent to the client,
    /// matching what PostgreSQL reports for the same failure.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            AuthError::BadPassword => sqlstate::INVALID_PASSWORD,
            AuthError::InvalidVerifier(_)
            | AuthError::InvalidMd5Hash
            | AuthError::InvalidSecret(_)
            | AuthError::InvalidServerNonce => sqlstate::INTERNAL_ERROR,
            _ => sqlstate::PROTOCOL_VIOLATION,
        }
    }
}

/// The secret Sluice holds for one user. Which variant it is decides which
/// authentication methods the proxy can offer that user: a SCRAM verifier
/// cannot answer an md5 challenge and an md5 hash cannot run SCRAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Configured with a plaintext password: both methods work. The
    /// plaintext itself is not kept.
    Password { scram: ScramVerifier, md5: Md5Hash },
    /// Configured with a `SCRAM-SHA-256$...` verifier: SCRAM only.
    Scram(ScramVerifier),
    /// Configured with an `md5<32 hex>` hash: md5 only.
    Md5(Md5Hash),
}

impl Credentials {
    /// [`Credentials::from_secret_string`] for each (user, secret); the first that fails is
    /// returned with its user's name. Runs PBKDF2 per password: call it off the async workers.
    pub fn derive_all(
        secrets: impl IntoIterator<Item = (String, String)>,
    ) -> Result<std::collections::HashMap<String, Credentials>, (String, AuthError)> {
        secrets
            .into_iter()
            .map(
                |(user, secret)| match Credentials::from_secret_string(&user, &secret) {
                    Ok(c) => Ok((user, c)),
                    Err(e) => Err((user, e)),
                },
            )
            .collect()
    }

    /// Derives both secrets from a plaintext password, with a fresh random
    /// 16-byte salt and 4096 iterations (PostgreSQL's defaults).
    ///
    /// This runs PBKDF2 and takes milliseconds of CPU: call it from a
    /// blocking thread (e.g. `spawn_blocking`), never on an async worker.
    pub fn from_password(user: &str, password: &str) -> Self {
        Credentials::Password {
            scram: ScramVerifier::from_password(password),
            md5: Md5Hash::from_password(user, password),
        }
    }

    /// Interprets a configured secret the way PostgreSQL reads
    /// `pg_authid.rolpassword`: a SCRAM verifier, an md5 hash, or otherwise a
    /// plaintext password (which costs a PBKDF2 run, see
    /// [`Credentials::from_password`]).
    ///
    /// Unlike PostgreSQL, a string that starts with `SCRAM-SHA-256$` but does
    /// not parse is an error rather than a plaintext password, so that a
    /// mangled verifier in the config is reported instead of silently
    /// becoming a password nobody knows.
    pub fn from_secret_string(user: &str, s: &str) -> Result<Self, AuthError> {
        if s.starts_with(scram::VERIFIER_PREFIX) {
            return ScramVerifier::parse(s).map(Credentials::Scram);
        }
        if Md5Hash::looks_like_hash(s) {
            return Md5Hash::parse(s).map(Credentials::Md5);
        }
        if s.is_empty() {
            // PostgreSQL never accepts an empty password either.
            return Err(AuthError::InvalidSecret("empty password"));
        }
        Ok(Credentials::from_password(user, s))
    }

    /// The SCRAM verifier, if this user can authenticate with SCRAM.
    pub fn scram(&self) -> Option<&ScramVerifier> {
        match self {
            Credentials::Password { scram, .. } | Credentials::Scram(scram) => Some(scram),
            Credentials::Md5(_) => None,
        }
    }

    /// The md5 hash, if this user can authenticate with md5.
    pub fn md5(&self) -> Option<&Md5Hash> {
        match self {
            Credentials::Password { md5, .. } | Credentials::Md5(md5) => Some(md5),
            Credentials::Scram(_) => None,
        }
    }
}

/// Compares two byte strings without an early exit on the first difference,
/// so response time does not reveal how much of a secret-derived value the
/// client guessed right. Lengths are not secret here, so a length mismatch
/// returns at once.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into a
    // short-circuiting comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    #[test]
    fn constant_time_eq_basics() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn plaintext_supports_both_methods() {
        let c = Credentials::from_secret_string("alice", "s3cret").unwrap();
        assert!(matches!(c, Credentials::Password { .. }));
        let md5 = postgres_protocol::password::md5(b"s3cret", "alice");
        assert_eq!(c.md5().unwrap().to_string(), md5);
        assert!(c.scram().is_some());
    }

    #[test]
    fn verifier_string_is_scram_only() {
        let v = postgres_protocol::password::scram_sha_256(b"pw");
        let c = Credentials::from_secret_string("bob", &v).unwrap();
        assert_eq!(c.scram().unwrap().to_string(), v);
        assert!(c.md5().is_none());
    }

    #[test]
    fn md5_string_is_md5_only() {
        let h = postgres_protocol::password::md5(b"pw", "carol");
        let c = Credentials::from_secret_string("carol", &h).unwrap();
        assert_eq!(c.md5().unwrap().to_string(), h);
        assert!(c.scram().is_none());
    }

    #[test]
    fn bad_secret_strings() {
        assert_eq!(
            Credentials::from_secret_string("u", ""),
            Err(AuthError::InvalidSecret("empty password"))
        );
        assert!(matches!(
            Credentials::from_secret_string("u", "SCRAM-SHA-256$garbage"),
            Err(AuthError::InvalidVerifier(_))
        ));
        // Not 32 hex digits after "md5": PostgreSQL treats it as plaintext.
        let c = Credentials::from_secret_string("u", "md5notahash").unwrap();
        assert!(matches!(c, Credentials::Password { .. }));
    }

    /// A full exchange with the real client: Ok only if the server accepts
    /// the proof and the client accepts the server's signature.
    fn exchange(v: &ScramVerifier, password: &str, cb: ChannelBinding) -> Result<(), AuthError> {
        exchange_on(v, password, cb, Channel::Unavailable)
    }

    fn exchange_on(
        v: &ScramVerifier,
        password: &str,
        cb: ChannelBinding,
        channel: Channel<'_>,
    ) -> Result<(), AuthError> {
        let mut client = ScramSha256::new(password.as_bytes(), cb);
        let nonce = ScramServer::random_nonce();
        let (server, first) = ScramServer::start(v, client.message(), &nonce, channel)?;
        client.update(&first).expect("client accepts server-first");
        let last = server.finish(client.message())?;
        client
            .finish(&last)
            .expect("client verifies the server signature");
        Ok(())
    }

    fn plain() -> ChannelBinding {
        ChannelBinding::unrequested()
    }

    #[test]
    fn channel_binding_with_real_client() {
        let v = ScramVerifier::derive("pw", b"salt", 64);
        let data = [7u8; 48];
        let bound = || ChannelBinding::tls_server_end_point(data.to_vec());
        assert_eq!(
            exchange_on(&v, "pw", bound(), Channel::Bound(&data)),
            Ok(())
        );
        // Bound to another certificate (a machine in the middle): refused.
        assert_eq!(
            exchange_on(&v, "pw", bound(), Channel::Bound(&[8u8; 48])),
            Err(AuthError::ChannelBindingMismatch)
        );
        assert_eq!(
            exchange_on(&v, "pw", bound(), Channel::Bound(&data[..32])),
            Err(AuthError::ChannelBindingMismatch)
        );
        // 'y' while -PLUS was offered is a downgrade; 'n' is a client that cannot bind.
        assert_eq!(
            exchange_on(&v, "pw", ChannelBinding::unrequested(), Channel::Offered),
            Err(AuthError::ChannelBindingDowngrade)
        );
        assert_eq!(
            exchange_on(&v, "pw", ChannelBinding::unsupported(), Channel::Offered),
            Ok(())
        );
        // The flag must match the mechanism chosen.
        assert!(matches!(
            exchange_on(
                &v,
                "pw",
                ChannelBinding::unsupported(),
                Channel::Bound(&data)
            ),
            Err(AuthError::MalformedScram(_))
        ));
        assert!(matches!(
            exchange_on(&v, "pw", bound(), Channel::Unavailable),
            Err(AuthError::MalformedScram(_))
        ));
        assert!(matches!(
            exchange_on(&v, "pw", bound(), Channel::Offered),
            Err(AuthError::MalformedScram(_))
        ));
        let other_type =
            ScramServer::start(&v, b"p=tls-unique,,n=,r=abc", "srv", Channel::Bound(&data));
        assert_eq!(other_type.err(), Some(AuthError::UnsupportedChannelBinding));
    }

    #[test]
    fn scram_round_trip_with_real_client() {
        let v = ScramVerifier::derive("correct horse", b"salt", 64);
        assert_eq!(exchange(&v, "correct horse", plain()), Ok(()));
        let y = ChannelBinding::unsupported();
        assert_eq!(exchange(&v, "correct horse", y), Ok(()));
        assert_eq!(
            exchange(&v, "wrong horse", plain()),
            Err(AuthError::BadPassword)
        );
        assert_eq!(exchange(&v, "", plain()), Err(AuthError::BadPassword));
    }

    #[test]
    fn the_client_key_a_proof_reveals_logs_in_without_the_password() {
        let v = ScramVerifier::derive("pw", b"salt", 64);
        let mut client = ScramSha256::new(b"pw", plain());
        let nonce = ScramServer::random_nonce();
        let (server, first) =
            ScramServer::start(&v, client.message(), &nonce, Channel::Unavailable).unwrap();
        client.update(&first).unwrap();
        let (_, key) = server.finish_with_key(client.message()).unwrap();
        assert_eq!(
            ScramKeys::recovered(&v, key),
            ScramKeys::derive("pw", b"salt", 64)
        );
    }

    #[test]
    fn scram_with_configured_secrets() {
        // As stored by `ALTER ROLE ... PASSWORD` with a client-side hash.
        let stored = postgres_protocol::password::scram_sha_256(b"pw");
        let from_verifier = Credentials::from_secret_string("u", &stored).unwrap();
        let from_plain = Credentials::from_password("u", "pw");
        for c in [from_verifier, from_plain] {
            let v = c.scram().unwrap();
            assert_eq!(exchange(v, "pw", plain()), Ok(()));
            assert_eq!(exchange(v, "pW", plain()), Err(AuthError::BadPassword));
        }
    }

    #[test]
    fn scram_saslprep_matches_client() {
        // NFKC turns U+FB01 into "fi"; non-ASCII spaces map to U+0020.
        let v = ScramVerifier::derive("\u{FB01}\u{A0}x", b"salt", 16);
        assert_eq!(exchange(&v, "fi x", plain()), Ok(()));
        // Prohibited characters: both sides fall back to the raw bytes.
        let v = ScramVerifier::derive("a\u{7}b", b"salt", 16);
        assert_eq!(exchange(&v, "a\u{7}b", plain()), Ok(()));
        assert_eq!(exchange(&v, "ab", plain()), Err(AuthError::BadPassword));
    }

    #[test]
    fn mock_verifier_always_fails() {
        let v = ScramVerifier::mock("ghost", &[9; 32]);
        for pw in ["", "pw", "ghost"] {
            assert_eq!(exchange(&v, pw, plain()), Err(AuthError::BadPassword));
        }
    }

    const FIRST: &[u8] = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const NONCE: &str = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const PROOF: &str = "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";

    #[test]
    fn rfc7677_test_vector() {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = ScramVerifier::derive("pencil", &salt, 4096);
        let (server, first) =
            ScramServer::start(&v, FIRST, SERVER_NONCE, Channel::Unavailable).unwrap();
        let want = format!("r={NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096");
        assert_eq!(first, want.as_bytes());
        let last = server.finish(format!("c=biws,r={NONCE},{PROOF}").as_bytes());
        assert_eq!(
            last.unwrap(),
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );

        let (server, _) =
            ScramServer::start(&v, FIRST, SERVER_NONCE, Channel::Unavailable).unwrap();
        let tampered = PROOF.replace("dHzb", "dHzc");
        let last = server.finish(format!("c=biws,r={NONCE},{tampered}").as_bytes());
        assert_eq!(last, Err(AuthError::BadPassword));
    }

    #[test]
    fn malformed_client_first_is_rejected() {
        use AuthError::MalformedScram as Bad;
        let v = ScramVerifier::mock("u", &[0; 32]);
        let long = [b"n,,n=,r=".as_slice(), &[b'a'; 3000]].concat();
        let long_nonce = [b"n,,n=,r=".as_slice(), &[b'a'; 600]].concat();
        let cases: &[(&[u8], AuthError)] = &[
            (b"", Bad("invalid channel binding flag")),
            (b"x,,n=,r=abc", Bad("invalid channel binding flag")),
            (
                b"p=tls-server-end-point,,n=,r=abc",
                Bad("channel binding data sent without SCRAM-SHA-256-PLUS"),
            ),
            (b"n", Bad("missing authzid")),
            (b"n,", Bad("missing client-first-message-bare")),
            (b"n,a=admin,n=,r=abc", AuthError::AuthzidNotSupported),
            (b"n,b=x,n=,r=abc", Bad("invalid authzid")),
            (b"n,,", Bad("missing user name")),
            (b"n,,r=abc", Bad("missing user name")),
            (b"n,,m=ext,n=,r=abc", AuthError::UnsupportedExtension),
            (b"n,,n=", Bad("missing nonce")),
            (b"n,,n=u,x=abc", Bad("missing nonce")),
            (b"n,,n=u,r=", Bad("invalid nonce")),
            (b"n,,n=u,r=a\x01b", Bad("invalid nonce")),
            (&long_nonce, Bad("invalid nonce")),
            (
                b"n,,n=u,r=abc,???",
                Bad("invalid extension in client-first-message"),
            ),
            (&long, Bad("client-first-message too long")),
        ];
        for (msg, want) in cases {
            let got = ScramServer::start(&v, msg, "srv", Channel::Unavailable).err();
            assert_eq!(got.as_ref(), Some(want), "{}", String::from_utf8_lossy(msg));
        }
        for ok in [&b"n,a=,n=,r=abc"[..], b"y,,n=\xff\xfe,r=abc,e=ext"] {
            assert!(ScramServer::start(&v, ok, "srv", Channel::Unavailable).is_ok());
        }
        for bad_nonce in ["", "a,b", "caf\u{e9}"] {
            let got = ScramServer::start(&v, b"n,,n=,r=abc", bad_nonce, Channel::Unavailable).err();
            assert_eq!(got, Some(AuthError::InvalidServerNonce));
        }
    }

    #[test]
    fn malformed_client_final_is_rejected() {
        use AuthError::MalformedScram as Bad;
        let v = ScramVerifier::mock("u", &[0; 32]);
        let cases = [
            (String::new(), Bad("missing proof")),
            (PROOF.into(), Bad("missing proof")),
            (format!("c=biws,r={NONCE}"), Bad("missing proof")),
            (
                format!("c=biws,r={NONCE},{PROOF},x=1"),
                Bad("missing proof"),
            ),
            (format!("r={NONCE},{PROOF}"), Bad("missing channel binding")),
            (format!("c=biws,{PROOF}"), Bad("missing nonce")),
            (
                format!("c=biws,r={NONCE},1,{PROOF}"),
                Bad("invalid extension in client-final-message"),
            ),
            (
                format!("c=!!,r={NONCE},{PROOF}"),
                Bad("invalid channel binding"),
            ),
            (
                format!("c=eSws,r={NONCE},{PROOF}"),
                AuthError::ChannelBindingMismatch,
            ),
            (
                format!("c=biws,r=rOprNGfwEbeRWgbNEkqO,{PROOF}"),
                AuthError::NonceMismatch,
            ),
            (
                format!("c=biws,r={NONCE}x,{PROOF}"),
                AuthError::NonceMismatch,
            ),
            (format!("c=biws,r={NONCE},p=!!"), Bad("invalid proof")),
            (format!("c=biws,r={NONCE},p=AAAA"), Bad("invalid proof")),
            (format!("c=biws,r={NONCE},p="), Bad("invalid proof")),
            ("c=".repeat(2000), Bad("client-final-message too long")),
            // Well-formed, but the verifier is a mock.
            (
                format!("c=biws,r={NONCE},e=x,{PROOF}"),
                AuthError::BadPassword,
            ),
        ];
        for (msg, want) in cases {
            let (server, _) =
                ScramServer::start(&v, FIRST, SERVER_NONCE, Channel::Unavailable).unwrap();
            assert_eq!(server.finish(msg.as_bytes()), Err(want), "{msg}");
        }
    }

    #[test]
    fn error_sqlstates() {
        // The codes' spelling (28P01, 08P01, XX000) is pinned in protocol::sqlstate's tests.
        assert_eq!(
            AuthError::BadPassword.sqlstate(),
            sqlstate::INVALID_PASSWORD
        );
        assert_eq!(
            AuthError::NonceMismatch.sqlstate(),
            sqlstate::PROTOCOL_VIOLATION
        );
        assert_eq!(
            AuthError::InvalidMd5Hash.sqlstate(),
            sqlstate::INTERNAL_ERROR
        );
    }
}
