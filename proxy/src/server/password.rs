//! The password Sluice presents to the server for one user, and the file it comes from, if any.
//!
//! A rotated password reaches Sluice in two ways: a RELOAD (or SIGHUP) loads the configuration
//! again, files included, and replaces every [`ServerPassword`]; and a login the server refuses
//! (`28P01`, `28000`) makes [`ServerConn::connect`](super::ServerConn::connect) ask
//! [`ServerPassword::after_refused_login`] for a newer password, which reads the file again
//! (at most once per [`REREAD_INTERVAL`] per user) and, only when its content differs from the
//! password just refused, returns it for one more login. A wrong password in the file therefore
//! costs one read and one failed login per connection attempt, never a loop.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::{read_secret_file, Config};

/// Shortest time between two reads of a user's password file after refused logins, so a burst
/// of refused logins (every pool connecting at once) reads it once.
pub const REREAD_INTERVAL: Duration = Duration::from_secs(1);

/// The password for one user's server logins. `Debug` shows where it comes from, not the value.
pub struct ServerPassword {
    /// The configuration key naming the file, and the file, when the password comes from one.
    file: Option<(String, PathBuf)>,
    state: Mutex<State>,
}

struct State {
    /// The password to log in with: as loaded, or as last read from the file.
    value: String,
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
            }),
        }
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

    /// [`ServerPassword::for_user`] for every configured user.
    pub fn all(cfg: &Config) -> HashMap<String, Arc<ServerPassword>> {
        cfg.users
            .keys()
            .filter_map(|user| Some((user.clone(), Arc::new(Self::for_user(cfg, user)?))))
            .collect()
    }

    /// The password to log in with now.
    pub fn current(&self) -> String {
        self.state.lock().value.clone()
    }

    /// After the server refused a login with `refused`: a different password to try once, or
    /// `None`. When another login already read a new password, that one; otherwise the file is
    /// read again, unless it was read less than [`REREAD_INTERVAL`] ago, and its content is
    /// returned when it differs from `refused`.
    pub async fn after_refused_login(&self, refused: &str) -> Option<String> {
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
        self.state.lock().value = fresh.clone();
        Some(fresh)
    }
}

impl fmt::Debug for ServerPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
