//! PostgreSQL's legacy md5 password scheme, server side.
//!
//! The stored secret is `"md5" + hex(md5(password + user))`; after an
//! `AuthenticationMD5Password` request carrying a 4-byte salt the client
//! answers `"md5" + hex(md5(hex(md5(password + user)) + salt))`. See
//! <https://www.postgresql.org/docs/current/auth-password.html>; SCRAM
//! (<https://www.postgresql.org/docs/current/sasl-authentication.html>)
//! should be preferred whenever the user's secret allows it.

use std::fmt;

use ::md5::{Digest, Md5};

use super::{constant_time_eq, AuthError};

const PREFIX: &str = "md5";
const HEX_LEN: usize = 32;

/// A user's md5 password hash as stored in `pg_authid`: the lowercase hex
/// digest of `password + user`, without the `md5` prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct Md5Hash([u8; HEX_LEN]);

impl Md5Hash {
    /// Hashes a plaintext password the way `CREATE ROLE ... PASSWORD` does
    /// under `password_encryption = md5`; the user name is the salt.
    pub fn from_password(user: &str, password: &str) -> Self {
        let mut h = Md5::new();
        h.update(password.as_bytes());
        h.update(user.as_bytes());
        Md5Hash(hex(&h.finalize().into()))
    }

    /// Parses `md5` followed by 32 hex digits. Upper-case digits are
    /// accepted and normalised, since clients always answer in lower case.
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        let digits = s
            .strip_prefix(PREFIX)
            .map(str::as_bytes)
            .filter(|d| d.len() == HEX_LEN && d.iter().all(u8::is_ascii_hexdigit))
            .ok_or(AuthError::InvalidMd5Hash)?;
        let mut out = [0u8; HEX_LEN];
        for (o, d) in out.iter_mut().zip(digits) {
            *o = d.to_ascii_lowercase();
        }
        Ok(Md5Hash(out))
    }

    /// Whether `s` has the shape of a stored md5 hash, which is how
    /// PostgreSQL tells it apart from a plaintext password.
    pub(crate) fn looks_like_hash(s: &str) -> bool {
        Md5Hash::parse(s).is_ok()
    }

    /// Checks the client's `PasswordMessage` payload against this hash for
    /// the salt sent in `AuthenticationMD5Password`. A single trailing NUL
    /// (the message's C-string terminator) is tolerated. The comparison is
    /// constant-time.
    pub fn verify(&self, salt: [u8; 4], client_response: &[u8]) -> bool {
        let response = client_response
            .strip_suffix(b"\0")
            .unwrap_or(client_response);
        constant_time_eq(&self.response(salt), response)
    }

    /// What a client knowing the password answers for `salt`: the hash is all it takes, so
    /// Sluice logs in to a server that asks md5 with a hash `auth_query` fetched.
    pub fn response(&self, salt: [u8; 4]) -> [u8; PREFIX.len() + HEX_LEN] {
        let mut h = Md5::new();
        h.update(self.0);
        h.update(salt);
        let mut out = [0u8; PREFIX.len() + HEX_LEN];
        let (prefix, digits) = out.split_at_mut(PREFIX.len());
        prefix.copy_from_slice(PREFIX.as_bytes());
        digits.copy_from_slice(&hex(&h.finalize().into()));
        out
    }
}

/// Prints the `pg_authid` form, `md5<32 hex>`.
impl fmt::Display for Md5Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PREFIX)?;
        // The digits are always ASCII hex, so this never replaces anything.
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

/// Redacted: the hash is password-equivalent for md5 authentication, so it
/// must not end up in logs via `{:?}`.
impl fmt::Debug for Md5Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Md5Hash(<redacted>)")
    }
}

fn hex(digest: &[u8; 16]) -> [u8; HEX_LEN] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; HEX_LEN];
    for (pair, byte) in out.chunks_exact_mut(2).zip(digest) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::md5_hash;

    #[test]
    fn matches_postgres_protocol_stored_form() {
        let h = Md5Hash::from_password("md5_user", "password");
        assert_eq!(
            h.to_string(),
            postgres_protocol::password::md5(b"password", "md5_user")
        );
        assert_eq!(Md5Hash::parse(&h.to_string()).unwrap(), h);
    }

    #[test]
    fn verifies_client_response() {
        let h = Md5Hash::from_password("md5_user", "password");
        let salt = [0x2a, 0x3d, 0x8f, 0xe0];
        let good = md5_hash(b"md5_user", b"password", salt);
        assert_eq!(good, "md562af4dd09bbb41884907a838a3233294");
        assert!(h.verify(salt, good.as_bytes()));
        assert!(h.verify(salt, format!("{good}\0").as_bytes()));

        let wrong_pw = md5_hash(b"md5_user", b"passwore", salt);
        assert!(!h.verify(salt, wrong_pw.as_bytes()));
        let wrong_user = md5_hash(b"other", b"password", salt);
        assert!(!h.verify(salt, wrong_user.as_bytes()));
        assert!(!h.verify([0, 0, 0, 0], good.as_bytes()));
        assert!(!h.verify(salt, b""));
        assert!(!h.verify(salt, &good.as_bytes()[..34]));
        assert!(!h.verify(salt, format!("{good}x").as_bytes()));
    }

    #[test]
    fn parse_accepts_upper_case_and_normalises() {
        let stored = postgres_protocol::password::md5(b"pw", "u");
        let upper = format!("md5{}", stored[3..].to_ascii_uppercase());
        assert_eq!(Md5Hash::parse(&upper).unwrap().to_string(), stored);
    }

    #[test]
    fn parse_rejects_malformed() {
        for s in [
            "",
            "md5",
            "md5abc",
            "MD5d41d8cd98f00b204e9800998ecf8427e",
            "md5d41d8cd98f00b204e9800998ecf8427",
            "md5d41d8cd98f00b204e9800998ecf8427e0",
            "md5g41d8cd98f00b204e9800998ecf8427e",
            "md5d41d8cd98f00b204e9800998ecf842é",
        ] {
            assert_eq!(Md5Hash::parse(s), Err(AuthError::InvalidMd5Hash), "{s:?}");
        }
    }

    #[test]
    fn debug_is_redacted() {
        let h = Md5Hash::from_password("u", "pw");
        assert!(!format!("{h:?}").contains(&h.to_string()[3..]));
    }
}
