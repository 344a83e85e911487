//! `auth = "auth_query"` (PgBouncer's `auth_query`, for self-managed PostgreSQL): the secret of a
//! user that is not configured, its SCRAM verifier or md5 hash as `pg_shadow` (or a SECURITY
//! DEFINER function) gives it, is fetched from the server over Sluice's control pool
//! ([`crate::control`]) and used for `auth_query_ttl`. Clients then run SCRAM-SHA-256 (-PLUS
//! over TLS) or md5 against it as against a configured secret, and Sluice logs in to the server
//! as them with what the exchange gave it: the ClientKey a SCRAM proof reveals (SCRAM
//! passthrough), or the md5 hash itself. No cleartext password exists anywhere.
//!
//! A user the query finds no row for, or a NULL secret, is cached as unknown for the same
//! time and fails like a wrong password. At most [`MAX_CACHED`] users are cached.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::auth::Credentials;
use crate::config::Config;
use crate::control::{ControlError, ControlPool};
use crate::server::ServerPassword;
use crate::tls::Connector;

/// Users whose fetched secret (or its absence) is cached at most.
pub const MAX_CACHED: usize = 10_000;

/// Fetched secrets, and the control pool that fetches them.
#[derive(Default)]
pub struct AuthQuery {
    cache: Mutex<HashMap<String, (Option<Credentials>, Instant)>>,
    pool: Mutex<Option<Arc<ControlPool>>>,
}

impl AuthQuery {
    /// `user`'s secret: cached within `auth_query_ttl`, else fetched. `Ok(None)`: no such
    /// user, or none that may log in with a password.
    pub async fn credentials(
        &self,
        cfg: &Config,
        tls: &Arc<Connector>,
        password: Option<Arc<ServerPassword>>,
        user: &str,
    ) -> Result<Option<Credentials>, ControlError> {
        let now = Instant::now();
        if let Some((creds, at)) = self.cache.lock().get(user) {
            if now.saturating_duration_since(*at) < cfg.auth_query_ttl {
                return Ok(creds.clone());
            }
        }
        let pool = self.pool(cfg, tls, password)?;
        let row = pool.query_row(&cfg.auth_query, user).await?;
        // PgBouncer's form is (name, secret); the secret is the last column.
        let secret = row.and_then(|r| r.into_iter().last().flatten());
        let creds = match secret {
            None => None,
            Some(secret) => {
                let name = user.to_string();
                // A plaintext secret costs a PBKDF2 run.
                let parsed = tokio::task::spawn_blocking(move || {
                    Credentials::from_secret_string(&name, &secret)
                })
                .await
                .map_err(|e| ControlError::Query(e.to_string()))?;
                match parsed {
                    Ok(creds) => Some(creds),
                    Err(e) => {
                        tracing::warn!(%user, error = %e, "auth_query returned a secret Sluice cannot use; the user cannot log in");
                        None
                    }
                }
            }
        };
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_CACHED && !cache.contains_key(user) {
            cache.retain(|_, (_, at)| now.saturating_duration_since(*at) < cfg.auth_query_ttl);
        }
        if cache.len() < MAX_CACHED || cache.contains_key(user) {
            cache.insert(user.to_string(), (creds.clone(), now));
        }
        Ok(creds)
    }

    /// The control pool for `cfg`, built on first use and again when its settings change.
    fn pool(
        &self,
        cfg: &Config,
        tls: &Arc<Connector>,
        password: Option<Arc<ServerPassword>>,
    ) -> Result<Arc<ControlPool>, ControlError> {
        let mut slot = self.pool.lock();
        if let Some(pool) = slot.as_ref().filter(|p| p.fits(cfg, &password)) {
            return Ok(pool.clone());
        }
        let pool = ControlPool::new(cfg, tls, password)
            .map(Arc::new)
            .ok_or_else(|| {
                ControlError::Query("auth_query has no role to run as (auth_user)".into())
            })?;
        *slot = Some(pool.clone());
        Ok(pool)
    }

    /// Forgets every fetched secret (RELOAD: the next logins fetch them again).
    pub fn clear(&self) {
        self.cache.lock().clear();
    }
}
