//! The password Sluice presents to the server for one user, and the file it comes from, if any.
//!
//! A rotated password reaches Sluice in two ways: a RELOAD (or SIGHUP) loads the configuration
//! again, files included, and replaces every [`ServerPassword`]; and a login the server refuses
//! (`28P01`, `28000`) makes [`ServerConn::connect`](super::ServerConn::connect) ask
//! [`ServerPassword::after_refused_login`] for a newer password, which reads the file again
//! (at most once per [`REREAD_INTERVAL`] per user) and, only when its content differs from the
//! password just refused, returns it for one more login. A wrong password in the file therefore
//! costs one read and one failed login per connection attempt, never a loop.
//!
//! With `server_auth = "rds_iam"` there is no password: every login presents an RDS IAM
//! token for its host, port and user ([`ServerPassword::rds_iam`]), which [`IamTokens`] signs
//! and renews before it expires; a refused token is not retried (a new one would be refused
//! for the same reason: a missing grant or policy).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::ServerError;
use crate::auth::iam::{IamError, IamTokens};
use crate::auth::ScramKeys;
use crate::config::{read_secret_file, Config, ServerAuth};

/// Shortest time between two reads of a user's password file after refused logins, so a burst
/// of refused logins (every pool connecting at once) reads it once.
pub const REREAD_INTERVAL: Duration = Duration::from_secs(1);

/// The password for one user's server logins. `Debug` shows where it comes from, not the value.
pub struct ServerPassword {
    /// The configuration key naming the file, and the file, when the password comes from one.
    file: Option<(String, PathBuf)>,
    state: Mutex<State>,
    /// With `server_auth = "rds_iam"`: the tokens presented in place of a password.
    iam: Option<Arc<IamTokens>>,
    /// Only SCRAM keys, or an md5 hash, no password (a passthrough or auth_query user's).
    keys_only: bool,
    /// The md5 hash answering a server's md5 challenge (an auth_query user's).
    md5: Option<crate::auth::Md5Hash>,
}

struct State {
    /// The password to log in with: as loaded, or as last read from the file.
    value: String,
    /// The SCRAM keys of `value` for the salt the server last named: a login with the same
    /// salt needs no PBKDF2 run. Dropped when `value` changes.
    scram: Option<Arc<ScramKeys>>,
    /// When the file was last read after a refused login.
    reread_at: Option<Instant>,
}

impl ServerPassword {
    /// A password that is not read again (a value in the configuration or the environment).
    pub fn fixed(value: impl Into<String>) -> ServerPassword {
        ServerPassword {
            file: None,
            state: Mutex::new(State {
                value: value.into(),
                reread_at: None,
                scram: None,
            }),
            iam: None,
            keys_only: false,
            md5: None,
        }
    }

    /// An md5 hash in place of a password: logins work where the server asks md5.
    pub fn md5_hash_only(hash: crate::auth::Md5Hash) -> ServerPassword {
        ServerPassword {
            keys_only: true,
            md5: Some(hash),
            ..ServerPassword::fixed(String::new())
        }
    }

    /// The md5 hash this answers md5 challenges with, when it holds one instead of a password.
    pub fn md5_hash(&self) -> Option<&crate::auth::Md5Hash> {
        self.md5.as_ref()
    }

    /// SCRAM keys in place of a password: logins work while the server names their salt.
    pub fn scram_keys_only(keys: Arc<ScramKeys>) -> ServerPassword {
        let password = ServerPassword::fixed(String::new());
        password.state.lock().scram = Some(keys);
        ServerPassword {
            keys_only: true,
            ..password
        }
    }

    /// Whether this holds only SCRAM keys.
    pub fn is_keys_only(&self) -> bool {
        self.keys_only
    }

    /// The SCRAM keys the last SCRAM login derived or used, if any.
    pub fn kept_scram_keys(&self) -> Option<Arc<ScramKeys>> {
        self.state.lock().scram.clone()
    }

    /// RDS IAM tokens from `tokens` in place of a password.
    pub fn rds_iam(tokens: Arc<IamTokens>) -> ServerPassword {
        let mut password = ServerPassword::fixed(String::new());
        password.iam = Some(tokens);
        password
    }

    /// Whether logins present RDS IAM tokens.
    pub fn is_rds_iam(&self) -> bool {
        self.iam.is_some()
    }

    /// `user`'s password as configured, with the file it was read from; `None` when none is
    /// configured (logins then work only where the server asks for none).
    pub fn for_user(cfg: &Config, user: &str) -> Option<ServerPassword> {
        let mut password = ServerPassword::fixed(cfg.server_password(user)?);
        password.file = cfg
            .server_password_file(user)
            .map(|(key, path)| (key, path.to_path_buf()));
        Some(password)
    }

    /// [`ServerPassword::for_user`] for every configured user; with `server_auth =
    /// "rds_iam"`, tokens from `iam` for every one of them.
    pub fn all(cfg: &Config, iam: Option<&Arc<IamTokens>>) -> HashMap<String, Arc<ServerPassword>> {
        if cfg.server_auth == ServerAuth::RdsIam {
            // No tokens (none could be had): no credential at all, never a password.
            let Some(tokens) = iam else {
                return HashMap::new();
            };
            let password = Arc::new(ServerPassword::rds_iam(tokens.clone()));
            return Self::users(cfg)
                .map(|user| (user.to_string(), password.clone()))
                .collect();
        }
        Self::users(cfg)
            .filter_map(|user| Some((user.to_string(), Arc::new(Self::for_user(cfg, user)?))))
            .collect()
    }

    /// Every user Sluice logs in as: the configured users and `control_user`.
    fn users(cfg: &Config) -> impl Iterator<Item = &str> {
        cfg.users
            .keys()
            .map(String::as_str)
            .chain(cfg.separate_control_user())
    }

    /// What to present at a login as `user` on `host:port`: the password, or a fresh RDS
    /// IAM token (signed or renewed here when the cached one is due).
    pub async fn for_login(
        &self,
        host: &str,
        port: u16,
        user: &str,
    ) -> Result<String, ServerError> {
        match &self.iam {
            None => Ok(self.current()),
            Some(tokens) => match tokens.token(host, port, user).await {
                Ok(token) => Ok(token.as_str().to_string()),
                Err(e) => {
                    tracing::warn!(server = %format!("{host}:{port}"), %user, error = %e, kind = e.kind(), "no RDS IAM token for a server login");
                    Err(ServerError::Auth(format!(
                        "no RDS IAM token for \"{user}\": {e}"
                    )))
                }
            },
        }
    }

    /// The password to log in with now.
    pub fn current(&self) -> String {
        self.state.lock().value.clone()
    }

    /// The SCRAM keys kept for `password` (the one in force) and this salt and iteration
    /// count, if an earlier login derived them.
    pub fn scram_keys(
        &self,
        password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> Option<Arc<ScramKeys>> {
        let state = self.state.lock();
        let keys = state.scram.as_ref()?;
        (state.value == password && keys.fits(salt, iterations)).then(|| keys.clone())
    }

    /// Keeps `keys`, derived from `password`, for the next logins (unless the password in
    /// force has changed meanwhile).
    pub fn keep_scram_keys(&self, password: &str, keys: Arc<ScramKeys>) {
        let mut state = self.state.lock();
        if state.value == password {
            state.scram = Some(keys);
        }
    }

    /// After the server refused a login with `refused`: a different password to try once, or
    /// `None`. When another login already read a new password, that one; otherwise the file is
    /// read again, unless it was read less than [`REREAD_INTERVAL`] ago, and its content is
    /// returned when it differs from `refused`.
    pub async fn after_refused_login(&self, refused: &str) -> Option<String> {
        if self.iam.is_some() || self.keys_only {
            return None;
        }
        let (key, path) = {
            let mut state = self.state.lock();
            if state.value != refused {
                return Some(state.value.clone());
            }
            let (key, path) = self.file.clone()?;
            let now = Instant::now();
            if state
                .reread_at
                .is_some_and(|at| now.duration_since(at) < REREAD_INTERVAL)
            {
                return None;
            }
            state.reread_at = Some(now);
            (key, path)
        };
        let read = {
            let (key, path) = (key.clone(), path.clone());
            tokio::task::spawn_blocking(move || read_secret_file(&key, &path)).await
        };
        let fresh = match read {
            Ok(Ok(fresh)) => fresh,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "server login refused; the password file could not be read again");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, key, "reading the password file failed");
                return None;
            }
        };
        if fresh == refused {
            tracing::debug!(key, path = %path.display(), "server login refused; the password file is unchanged");
            return None;
        }
        tracing::info!(key, path = %path.display(), "server login refused; the password file has changed: logging in with its new content");
        let mut state = self.state.lock();
        state.value = fresh.clone();
        state.scram = None;
        Some(fresh)
    }
}

/// The RDS IAM token source `cfg` asks for (`server_auth = "rds_iam"`, else `None`): `current`
/// when it signs for the same region, else a new one on the AWS SDK's default credential chain
/// (which fetches nothing until the first token).
pub async fn rds_iam_tokens(
    cfg: &Config,
    current: Option<&Arc<IamTokens>>,
) -> Result<Option<Arc<IamTokens>>, IamError> {
    if cfg.server_auth != ServerAuth::RdsIam {
        return Ok(None);
    }
    let region = cfg.resolved_aws_region().ok_or(IamError::NoRegion)?;
    if let Some(tokens) = current.filter(|t| t.region() == region) {
        return Ok(Some(tokens.clone()));
    }
    // Boxed: building the SDK's credential chain is a future of several KiB, and RELOAD (this
    // function's caller) can run inside any client's session future, which every connected
    // client keeps, idle or not.
    #[cfg(feature = "aws-sdk")]
    {
        let chain = Box::pin(IamTokens::from_environment(Some(&region)));
        Ok(Some(Arc::new(chain.await?)))
    }
    #[cfg(not(feature = "aws-sdk"))]
    {
        Err(IamError::Credentials {
            what: "not built in",
            detail: "this build of Sluice has no AWS credential chain (feature aws-sdk)".into(),
        })
    }
}

impl fmt::Debug for ServerPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.iam.is_some() {
            return f.write_str("ServerPassword(rds_iam)");
        }
        if self.keys_only {
            return f.write_str("ServerPassword(scram keys)");
        }
        match &self.file {
            Some((key, path)) => write!(f, "ServerPassword({key} = {})", path.display()),
            None => f.write_str("ServerPassword(********)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_file(dir: &std::path::Path, content: &str) -> (ServerPassword, PathBuf) {
        let path = dir.join("pw");
        std::fs::write(&path, content).unwrap();
        let mut p = ServerPassword::fixed(content.trim_end());
        p.file = Some(("users.u.server_password_file".into(), path.clone()));
        (p, path)
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_file_is_read_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let (p, path) = from_file(dir.path(), "old\n");
        // Unchanged: no retry, and the next refusal within the interval does not read again.
        assert_eq!(p.after_refused_login("old").await, None);
        std::fs::write(&path, "new\n").unwrap();
        assert_eq!(p.after_refused_login("old").await, None);
        tokio::time::advance(REREAD_INTERVAL).await;
        assert_eq!(p.after_refused_login("old").await.as_deref(), Some("new"));
        assert_eq!(p.current(), "new");
        // Logins that failed with the old password meanwhile get the new one without a read.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(p.after_refused_login("old").await.as_deref(), Some("new"));
        // The new one refused too, the file gone: no retry.
        tokio::time::advance(REREAD_INTERVAL).await;
        assert_eq!(p.after_refused_login("new").await, None);
        assert_eq!(p.current(), "new");
    }

    struct At(std::time::SystemTime);
    impl crate::auth::iam::Clock for At {
        fn now(&self) -> std::time::SystemTime {
            self.0
        }
    }

    #[tokio::test]
    async fn rds_iam_presents_a_token_and_never_retries_it() {
        use crate::auth::iam::{self, AwsCredentials};
        let at = std::time::UNIX_EPOCH + Duration::from_secs(1_724_709_600);
        let creds = AwsCredentials::new("AKIDEXAMPLE", "secret", None, None, "test");
        let tokens = IamTokens::with_provider("eu-west-2", creds.clone(), Arc::new(At(at)));
        let p = ServerPassword::rds_iam(Arc::new(tokens));
        assert!(p.is_rds_iam());
        let token = p.for_login("db.example.com", 5432, "app").await.unwrap();
        let expected = iam::generate(&creds, "eu-west-2", "db.example.com", 5432, "app", at);
        assert_eq!(Some(token.clone()), expected.ok());
        assert_eq!(p.after_refused_login(&token).await, None);
        assert_eq!(format!("{p:?}"), "ServerPassword(rds_iam)");
        // A host no token can be signed for is an authentication error naming the user.
        let e = p.for_login("bad host", 5432, "app").await.unwrap_err();
        assert!(
            matches!(&e, ServerError::Auth(why) if why.contains("\"app\"")),
            "{e}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn scram_keys_are_kept_for_their_password_and_salt() {
        let dir = tempfile::tempdir().unwrap();
        let (p, path) = from_file(dir.path(), "old\n");
        assert!(p.scram_keys("old", b"salt", 4096).is_none());
        let keys = Arc::new(ScramKeys::derive("old", b"salt", 4096));
        p.keep_scram_keys("old", keys.clone());
        assert_eq!(p.scram_keys("old", b"salt", 4096), Some(keys.clone()));
        // Another salt (the role's password was set again) or another password: derive anew.
        assert!(p.scram_keys("old", b"pepper", 4096).is_none());
        assert!(p.scram_keys("other", b"salt", 4096).is_none());
        // Keys of a password no longer in force are not kept.
        p.keep_scram_keys("stale", Arc::new(ScramKeys::derive("stale", b"salt", 1)));
        assert_eq!(p.scram_keys("old", b"salt", 4096), Some(keys));
        // A new password from the file drops them.
        std::fs::write(&path, "new\n").unwrap();
        assert_eq!(p.after_refused_login("old").await.as_deref(), Some("new"));
        assert!(p.scram_keys("new", b"salt", 4096).is_none());
    }

    #[tokio::test]
    async fn a_fixed_password_is_not_read_again() {
        let p = ServerPassword::fixed("pw");
        assert_eq!(p.after_refused_login("pw").await, None);
        assert_eq!(format!("{p:?}"), "ServerPassword(********)");
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = from_file(dir.path(), "hunter2\n");
        assert!(!format!("{p:?}").contains("hunter2"), "{p:?}");
    }
}
