//! The verifying login of passthrough authentication: a client's cleartext password is right
//! when the server accepts a login as that user with it ([`crate::passthrough`]).
//!
//! The login takes a connect slot of its database's verification pool ([`VERIFY_USER`], which
//! no client can be), so it waits in line, counts in the budget and in `max_connecting`, and
//! creates no pool for a user nobody has verified; accepted, the slot moves to the user's pool
//! and the connection becomes that pool's first (closed instead when that pool is full).

use std::net::IpAddr;
use std::sync::Arc;

use super::startup::{password_failed, Login};
use super::Exit;
use crate::auth::iam;
use crate::config::Config;
use crate::context::{group_limits, verify_pool_size, Context, VERIFY_GROUP, VERIFY_USER};
use crate::error::{sqlstate, PgError, Severity, Side};
use crate::passthrough::LIMITED_DELAY;
use crate::server::{self, ServerConn, ServerError, ServerPassword, Target};
use sha2::{Digest, Sha256};

/// Verifies `password` for `login.user` on `login.database` (a configured database): against
/// keys another login kept meanwhile, else with a server login. Returns the user's kept keys.
pub(super) async fn verify(
    ctx: &Context,
    cfg: &Arc<Config>,
    login: &Login,
    addr: Option<IpAddr>,
    password: String,
) -> Result<Arc<ServerPassword>, Exit> {
    let user = login.user.as_str();
    if ctx.passthrough.limited(user, addr) {
        crate::metrics::client_login("passthrough", "password", "limited");
        tracing::info!(%user, ?addr, "passthrough login refused without a server login: too many failures");
        tokio::time::sleep(LIMITED_DELAY).await;
        return Err(password_failed(login));
    }
    if password.is_empty() {
        // PostgreSQL never accepts an empty password.
        ctx.passthrough.failed(user, addr);
        crate::metrics::client_login("passthrough", "password", "refused");
        return Err(password_failed(login));
    }
    let token = iam::parse_client_token(&password);
    let token_hash: [u8; 32] = match &token {
        Some(t) => {
            check_token(cfg, login, t)?;
            Sha256::digest(password.as_bytes()).into()
        }
        None => [0; 32],
    };
    let known = || async {
        match &token {
            Some(_) => ctx
                .passthrough
                .token_accepted(user, &token_hash)
                .inspect(|_| {
                    crate::metrics::client_login("passthrough", "password", "ok");
                }),
            None => matches_kept(ctx, user, &password).await,
        }
    };
    // A burst of a user's first logins: those behind the first check against its keys; a
    // token already verified is not verified again.
    if let Some(kept) = known().await {
        return Ok(kept);
    }
    let database = login.database.as_str();
    let verify_pool = ctx
        .pools
        .pool(database, VERIFY_USER, verify_pool_size(cfg), 0);
    let group = ctx
        .pools
        .group(VERIFY_GROUP, group_limits(cfg, VERIFY_GROUP));
    let mut lease = ctx.pools.acquire(verify_pool, group).await.map_err(|r| {
        crate::metrics::client_login("passthrough", "password", "error");
        let e = super::ending::rejection(r);
        PgError::fatal(
            e.code(),
            format!("Sluice is at capacity: no server connection to verify the password of \"{user}\" could be had; retry later"),
        )
        .with_hint(e.hint().unwrap_or_default().to_string())
    })?;
    // Kept while this login waited for its slot.
    if let Some(kept) = known().await {
        return Ok(kept);
    }
    if lease.conn().is_some() {
        lease.reconnect("evicted");
    }
    let source = Arc::new(ServerPassword::fixed(password.as_str()));
    let target = Target::new(
        cfg,
        &ctx.tls().connector,
        Some(source.clone()),
        database,
        user,
    );
    let started = std::time::Instant::now();
    let result = Box::pin(ServerConn::connect(&target, database, &ctx.servers)).await;
    let conn = match result {
        Ok(conn) => conn,
        Err(ServerError::LoginRefused { error, .. }) => {
            ctx.passthrough.failed(user, addr);
            crate::metrics::client_login("passthrough", "password", "refused");
            if token.is_some() {
                crate::metrics::global().auth_failures.increment(1);
                tracing::info!(%user, "passthrough: the server refused an RDS IAM token");
                return Err(PgError::fatal(error.code(), error.message())
                    .with_side(Side::Client)
                    .with_hint(format!("The server refused the RDS IAM token: check that the role has GRANT rds_iam TO \"{user}\", that the function's IAM policy allows rds-db:connect for this user, and that the token is signed for the database's endpoint and port."))
                    .into());
            }
            if error.code() == sqlstate::INVALID_PASSWORD {
                return Err(password_failed(login));
            }
            // Another refusal of PostgreSQL's own (28000: no pg_hba.conf entry, a role that
            // may not log in), as PostgreSQL gives it.
            crate::metrics::global().auth_failures.increment(1);
            return Err(PgError::fatal(error.code(), error.message())
                .with_side(Side::Client)
                .into());
        }
        Err(e) => {
            crate::metrics::client_login("passthrough", "password", "error");
            ctx.record_login(verify_pool, database, user, Err(&e));
            tracing::warn!(error = %e, %database, %user, "passthrough: the verifying login failed");
            return Err(server::client_error(&e)
                .with_severity(Severity::Fatal)
                .into());
        }
    };
    crate::metrics::global()
        .connect_time
        .record(started.elapsed().as_secs_f64());
    let kept = match (source.kept_scram_keys(), &token) {
        (Some(keys), _) => {
            tracing::info!(%database, %user, "passthrough: the server verified the user's password; its SCRAM keys are kept");
            ctx.passthrough
                .keep(user, keys, cfg.passthrough_ttl)
                .password
                .clone()
        }
        (None, Some(t)) => {
            // Server logins as the role: Sluice's own tokens with server_auth = "rds_iam",
            // else this one while it lasts.
            let own = ctx.iam_tokens.read().clone();
            let (password, until) = match own {
                Some(tokens) => (Arc::new(ServerPassword::rds_iam(tokens)), None),
                None => (source.clone(), Some(t.expires)),
            };
            tracing::info!(%database, %user, "passthrough: the server accepted the user's RDS IAM token, until it expires");
            ctx.passthrough
                .keep_token(user, token_hash, t.expires, password, until)
        }
        (None, None) => {
            // md5, trust or a cleartext request: nothing to verify later logins against, and
            // with trust any password would have passed.
            crate::metrics::client_login("passthrough", "password", "error");
            tracing::warn!(%database, %user, "passthrough: the server did not authenticate the user with SCRAM-SHA-256; refused");
            return Err(PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("passthrough authentication needs the server to authenticate \"{user}\" with scram-sha-256 (its password stored as SCRAM, pg_hba.conf method scram-sha-256), or an RDS IAM token"),
            )
            .with_side(Side::Sluice)
            .into());
        }
    };
    crate::metrics::client_login("passthrough", "password", "ok");
    let pool = ctx.pools.pool(
        database,
        user,
        cfg.pool_size_for(database),
        cfg.min_pool_size_for(database),
    );
    ctx.record_login(pool, database, user, Ok(&conn));
    if lease.move_to(pool) {
        lease.fill(Box::new(conn));
        lease.release();
    } else {
        crate::metrics::server_closed("pool_full");
    }
    Ok(kept)
}

/// Refuses, without a server login, an RDS IAM token the server would refuse for a reason the
/// client can fix: signed for another endpoint (Sluice's address, say), for another user, or
/// expired.
fn check_token(cfg: &Config, login: &Login, t: &iam::ClientToken) -> Result<(), Exit> {
    let refuse = |code, message: String, hint: &str| -> Result<(), Exit> {
        crate::metrics::client_login("passthrough", "password", "refused");
        crate::metrics::global().auth_failures.increment(1);
        Err(PgError::fatal(code, message)
            .with_side(Side::Client)
            .with_hint(hint.to_string())
            .into())
    };
    if !t.host.eq_ignore_ascii_case(&cfg.server_host) || t.port != cfg.server_port {
        return refuse(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            format!(
                "the RDS IAM token is signed for {}:{}, but Sluice's database server is {}:{}, which would refuse it",
                t.host, t.port, cfg.server_host, cfg.server_port
            ),
            "Sign the token for the database's endpoint and port (generate_db_auth_token with the RDS host name), not for Sluice's address.",
        );
    }
    if t.user != login.user {
        return refuse(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            format!(
                "the RDS IAM token is for user \"{}\", not for \"{}\"",
                t.user, login.user
            ),
            "Sign the token for the user the client logs in as.",
        );
    }
    if t.expires <= std::time::SystemTime::now() {
        return refuse(
            sqlstate::INVALID_PASSWORD,
            format!(
                "password authentication failed for user \"{}\": the RDS IAM token expired at {}",
                login.user,
                humantime::format_rfc3339_seconds(t.expires)
            ),
            "Generate a new token: they are good for 15 minutes.",
        );
    }
    Ok(())
}

/// The keys kept for `user`, when `password` is theirs (checked off the async workers: PBKDF2).
async fn matches_kept(ctx: &Context, user: &str, password: &str) -> Option<Arc<ServerPassword>> {
    let kept = ctx.passthrough.kept(user)?;
    let keys = kept.password.kept_scram_keys()?;
    let pw = password.to_string();
    match tokio::task::spawn_blocking(move || keys.matches(&pw)).await {
        Ok(true) => {
            crate::metrics::client_login("passthrough", "password", "ok");
            Some(kept.password.clone())
        }
        _ => None,
    }
}
