//! What passthrough authentication (`auth = "passthrough"`) remembers: the SCRAM keys of the
//! users the server has verified, and recent failures, which limit how fast passwords can be
//! tried through Sluice.
//!
//! A user that is not configured in Sluice logs in with a cleartext password (asked only over
//! TLS or from loopback); Sluice verifies it by logging in to the server as that user
//! (`session::passthrough`), and keeps the [`ScramKeys`] that login derived from the server's
//! salt: the user's next logins run SCRAM (SCRAM-SHA-256-PLUS too) against them without the
//! server, and further server connections log in with them. The keys are password-equivalent
//! toward that server: they are held in memory only, never logged, and dropped when no server
//! login has used them for `passthrough_ttl`, or when the server refuses them (its salt for the
//! user changed: the password was set again).
//!
//! A client may present an RDS IAM token as its password: the server (RDS) verifies it the
//! same way, and Sluice then remembers that verdict, by the token's SHA-256, until the token
//! expires (its `X-Amz-Date` plus `X-Amz-Expires`), so the same token logs in again without a
//! server login. Server connections log in as the role with Sluice's own tokens under
//! `server_auth = "rds_iam"`, else with the client's token until it expires.
//!
//! Failed verifications are counted per user and per client address: after
//! [`USER_FAILURE_LIMIT`] for a user or [`ADDR_FAILURE_LIMIT`] from an address within
//! [`FAILURE_WINDOW`] (from the first), further cleartext logins for that user or from that address are
//! answered `28P01` after [`LIMITED_DELAY`], without a server login, until the window has
//! passed. Logins against kept keys are never limited (they cost the server nothing), so an
//! attacker guessing passwords cannot lock out a user Sluice already knows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::auth::{ScramKeys, ScramVerifier};
use crate::server::ServerPassword;

/// Failed verifications for one user that start limiting it.
pub const USER_FAILURE_LIMIT: u32 = 5;
/// Failed verifications from one client address that start limiting it: more than a user's,
/// as functions behind one NAT address share it.
pub const ADDR_FAILURE_LIMIT: u32 = 20;
/// The window failures are counted in, from the first.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a limited login waits before its `28P01`.
pub const LIMITED_DELAY: Duration = Duration::from_secs(2);
/// Most failure records kept; when full, expired ones are dropped, and failures for keys not
/// yet recorded are not counted (their address or user may still be).
const MAX_FAILURE_RECORDS: usize = 10_000;
/// Most accepted RDS IAM tokens remembered per role (the oldest is forgotten first).
const MAX_TOKENS_PER_USER: usize = 64;

/// One verified user's keys.
pub struct Kept {
    /// What the user's next logins are verified against.
    pub verifier: ScramVerifier,
    /// The keys, as the credential of server logins as the user.
    pub password: Arc<ServerPassword>,
    /// Dropped after this, unless a server login with the keys renews it.
    expires: Mutex<Instant>,
}

/// A role verified with RDS IAM tokens: the tokens the server accepted (by their SHA-256),
/// each good until its own expiry, and the credential of server logins as the role.
struct TokenUser {
    tokens: Vec<([u8; 32], SystemTime)>,
    password: Arc<ServerPassword>,
    /// When `password` stops working: a client's token, its expiry; `None` for Sluice's own
    /// tokens (`server_auth = "rds_iam"`), which it renews.
    until: Option<SystemTime>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    User(String),
    Addr(IpAddr),
}

/// Kept keys and failure counts; one per process, in the [`crate::context::Context`].
#[derive(Default)]
pub struct Passthrough {
    users: Mutex<HashMap<String, Arc<Kept>>>,
    tokens: Mutex<HashMap<String, TokenUser>>,
    failures: Mutex<HashMap<Key, (u32, Instant)>>,
}

impl Passthrough {
    /// `user`'s kept keys, unless they have expired (then they are dropped).
    pub fn kept(&self, user: &str) -> Option<Arc<Kept>> {
        let mut users = self.users.lock();
        let kept = users.get(user)?;
        if *kept.expires.lock() <= Instant::now() {
            users.remove(user);
            return None;
        }
        Some(kept.clone())
    }

    /// The credential for server logins as `user`: its kept keys, else what its RDS IAM
    /// tokens left (while that works).
    pub fn server_password(&self, user: &str) -> Option<Arc<ServerPassword>> {
        if let Some(kept) = self.kept(user) {
            return Some(kept.password.clone());
        }
        let tokens = self.tokens.lock();
        let t = tokens.get(user)?;
        match t.until {
            Some(until) if until <= SystemTime::now() => None,
            _ => Some(t.password.clone()),
        }
    }

    /// The credential for `user`'s server logins when the server has accepted `token` (its
    /// SHA-256) and the token has not expired.
    pub fn token_accepted(&self, user: &str, token: &[u8; 32]) -> Option<Arc<ServerPassword>> {
        let now = SystemTime::now();
        let tokens = self.tokens.lock();
        let t = tokens.get(user)?;
        t.tokens
            .iter()
            .any(|(hash, expires)| hash == token && now < *expires)
            .then(|| t.password.clone())
    }

    /// Keeps the verdict on `token` (its SHA-256), which the server accepted for `user`, until
    /// it `expires`. `password` is the credential of further server logins as the user (the
    /// token itself, good until it `expires`, or Sluice's own tokens: `until` `None`); the
    /// one returned is what server logins use from now on (the token that lasts longest).
    pub fn keep_token(
        &self,
        user: &str,
        token: [u8; 32],
        expires: SystemTime,
        password: Arc<ServerPassword>,
        until: Option<SystemTime>,
    ) -> Arc<ServerPassword> {
        let now = SystemTime::now();
        let mut tokens = self.tokens.lock();
        let t = tokens.entry(user.to_string()).or_insert_with(|| TokenUser {
            tokens: Vec::new(),
            password: password.clone(),
            until,
        });
        t.tokens.retain(|(_, e)| now < *e);
        if t.tokens.len() >= MAX_TOKENS_PER_USER {
            t.tokens.remove(0);
        }
        t.tokens.push((token, expires));
        let outlasts = match (until, t.until) {
            (_, Some(old)) if old <= now => true,
            (None, _) => true,
            (Some(new), Some(old)) => new > old,
            (Some(_), None) => false,
        };
        if outlasts {
            (t.password, t.until) = (password, until);
        }
        t.password.clone()
    }

    /// Keeps `keys`, which a server login as `user` has just proved, for `ttl`.
    pub fn keep(&self, user: &str, keys: Arc<ScramKeys>, ttl: Duration) -> Arc<Kept> {
        let kept = Arc::new(Kept {
            verifier: ScramVerifier::from_keys(&keys),
            password: Arc::new(ServerPassword::scram_keys_only(keys)),
            expires: Mutex::new(Instant::now() + ttl),
        });
        self.users.lock().insert(user.to_string(), kept.clone());
        self.failures.lock().remove(&Key::User(user.to_string()));
        kept
    }

    /// A server login as `user` with `password` succeeded: when those are its kept keys,
    /// they are good for `ttl` more.
    pub fn renew(&self, user: &str, password: &Arc<ServerPassword>, ttl: Duration) {
        if let Some(kept) = self.users.lock().get(user) {
            if Arc::ptr_eq(&kept.password, password) {
                *kept.expires.lock() = Instant::now() + ttl;
            }
        }
    }

    /// The server refused a login as `user` with `password`: when those are its kept keys,
    /// they are dropped (the next login needs the password again).
    pub fn forget(&self, user: &str, password: &Arc<ServerPassword>) {
        let mut users = self.users.lock();
        if users
            .get(user)
            .is_some_and(|k| Arc::ptr_eq(&k.password, password))
        {
            users.remove(user);
            tracing::info!(%user, "the server refused the SCRAM keys kept for a passthrough user; its next login needs its password");
        }
    }

    /// How many users' keys are kept.
    pub fn len(&self) -> usize {
        self.users.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a cleartext login for `user` from `addr` is limited (see the module's text).
    pub fn limited(&self, user: &str, addr: Option<IpAddr>) -> bool {
        let now = Instant::now();
        let failures = self.failures.lock();
        keys(user, addr).any(|k| {
            let limit = match k {
                Key::User(_) => USER_FAILURE_LIMIT,
                Key::Addr(_) => ADDR_FAILURE_LIMIT,
            };
            failures
                .get(&k)
                .is_some_and(|&(n, first)| n >= limit && now < first + FAILURE_WINDOW)
        })
    }

    /// Counts a failed verification for `user` and for `addr`.
    pub fn failed(&self, user: &str, addr: Option<IpAddr>) {
        let now = Instant::now();
        let mut failures = self.failures.lock();
        for k in keys(user, addr) {
            if failures.len() >= MAX_FAILURE_RECORDS && !failures.contains_key(&k) {
                failures.retain(|_, (_, first)| now < *first + FAILURE_WINDOW);
                if failures.len() >= MAX_FAILURE_RECORDS {
                    continue;
                }
            }
            let entry = failures.entry(k).or_insert((0, now));
            if now >= entry.1 + FAILURE_WINDOW {
                *entry = (0, now);
            }
            entry.0 += 1;
        }
    }
}

fn keys(user: &str, addr: Option<IpAddr>) -> impl Iterator<Item = Key> {
    std::iter::once(Key::User(user.to_string())).chain(addr.map(Key::Addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Arc<ScramKeys> {
        Arc::new(ScramKeys::derive("pw", b"salt", 16))
    }

    #[tokio::test(start_paused = true)]
    async fn kept_keys_last_their_ttl_unless_a_login_renews_them() {
        let p = Passthrough::default();
        let ttl = Duration::from_secs(60);
        assert!(p.kept("u").is_none());
        let kept = p.keep("u", keys(), ttl);
        assert_eq!(
            kept.verifier,
            ScramVerifier::derive("pw", b"salt", 16),
            "the verifier is the keys'"
        );
        tokio::time::advance(Duration::from_secs(50)).await;
        p.renew("u", &kept.password, ttl);
        // Another credential's login does not renew them.
        p.renew("u", &Arc::new(ServerPassword::fixed("pw")), ttl);
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(p.server_password("u").is_some());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(p.kept("u").is_none());
        assert!(p.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn refused_keys_are_forgotten_but_not_newer_ones() {
        let p = Passthrough::default();
        let ttl = Duration::from_secs(60);
        let old = p.keep("u", keys(), ttl);
        let new = p.keep("u", keys(), ttl);
        p.forget("u", &old.password);
        assert!(p.kept("u").is_some_and(|k| Arc::ptr_eq(&k, &new)));
        p.forget("u", &new.password);
        assert!(p.kept("u").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_limit_a_user_and_an_address_for_the_window() {
        let p = Passthrough::default();
        let a: IpAddr = [192, 0, 2, 1].into();
        let b: IpAddr = [192, 0, 2, 2].into();
        for _ in 0..USER_FAILURE_LIMIT - 1 {
            p.failed("u", Some(a));
        }
        assert!(!p.limited("u", Some(a)));
        p.failed("u", Some(a));
        assert!(p.limited("u", Some(b)), "the user is limited from anywhere");
        assert!(!p.limited("v", Some(a)), "the address is not, yet");
        for i in USER_FAILURE_LIMIT..ADDR_FAILURE_LIMIT {
            p.failed(&format!("v{i}"), Some(a));
        }
        assert!(p.limited("v", Some(a)), "the address is limited for anyone");
        assert!(!p.limited("v", Some(b)));
        tokio::time::advance(FAILURE_WINDOW).await;
        assert!(!p.limited("u", Some(a)));
        // A success resets the user's count, not the address's.
        for i in 0..ADDR_FAILURE_LIMIT {
            p.failed(if i % 2 == 0 { "w" } else { "y" }, Some(b));
        }
        p.keep("w", keys(), Duration::from_secs(1));
        assert!(!p.limited("w", None));
        assert!(p.limited("y", None));
        assert!(p.limited("x", Some(b)));
    }

    #[test]
    fn accepted_tokens_are_remembered_until_they_expire() {
        let p = Passthrough::default();
        let now = SystemTime::now();
        let soon = now + Duration::from_secs(600);
        let fixed = |s: &str| Arc::new(ServerPassword::fixed(s));
        assert!(p.token_accepted("u", &[1; 32]).is_none());
        let first = p.keep_token("u", [1; 32], soon, fixed("t1"), Some(soon));
        assert_eq!(first.current(), "t1");
        assert!(p.token_accepted("u", &[1; 32]).is_some());
        assert!(p.token_accepted("u", &[2; 32]).is_none());
        assert!(p.token_accepted("v", &[1; 32]).is_none());
        // A token that lasts longer becomes the server logins' credential; a shorter one not.
        let later = soon + Duration::from_secs(60);
        assert_eq!(
            p.keep_token("u", [2; 32], later, fixed("t2"), Some(later))
                .current(),
            "t2"
        );
        assert_eq!(
            p.keep_token("u", [3; 32], soon, fixed("t3"), Some(soon))
                .current(),
            "t2"
        );
        assert_eq!(p.server_password("u").unwrap().current(), "t2");
        // An expired one is not accepted, and leaves no credential behind.
        let past = now - Duration::from_secs(1);
        p.keep_token("w", [4; 32], past, fixed("t4"), Some(past));
        assert!(p.token_accepted("w", &[4; 32]).is_none());
        assert!(p.server_password("w").is_none());
        // At most MAX_TOKENS_PER_USER per role.
        for i in 0..=MAX_TOKENS_PER_USER {
            p.keep_token("x", [i as u8; 32], soon, fixed("t"), None);
        }
        assert!(p.token_accepted("x", &[0; 32]).is_none());
        assert!(p
            .token_accepted("x", &[MAX_TOKENS_PER_USER as u8; 32])
            .is_some());
        assert_eq!(p.tokens.lock()["x"].tokens.len(), MAX_TOKENS_PER_USER);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_records_are_bounded() {
        let p = Passthrough::default();
        for i in 0..MAX_FAILURE_RECORDS + 10 {
            p.failed(&format!("user{i}"), None);
        }
        assert_eq!(p.failures.lock().len(), MAX_FAILURE_RECORDS);
        tokio::time::advance(FAILURE_WINDOW).await;
        p.failed("late", None);
        assert_eq!(p.failures.lock().len(), 1);
    }
}
