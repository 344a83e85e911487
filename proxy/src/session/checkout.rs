//! Borrowing a server connection for a request: from the pool, or a new one, held through an
//! outage while Sluice reconnects with backoff.

use std::time::Duration;

use tokio::time::Instant;

use super::ending::rejection;
use super::Session;
use crate::context::ServerParams;
use crate::error::{sqlstate, PgError, Severity};
use crate::pool::Lease;
use crate::server::{self, ServerConn, ServerError, Target};

/// Delays between connect attempts through an outage: 100 ms doubling up to 1 s, each drawn
/// between half and all of that so the sessions waiting do not come back in step.
#[derive(Default)]
struct Backoff {
    tries: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);

    fn next(&mut self) -> Duration {
        let full = Self::FIRST
            .saturating_mul(1 << self.tries.min(4))
            .min(Self::MAX);
        self.tries += 1;
        full.mul_f64(rand::random_range(0.5..=1.0))
    }
}

/// Whether a connection that lay idle for `server_check_delay` still answers: an empty query
/// (EmptyQueryResponse and ReadyForQuery, one round trip, nothing run) within `timeout`. A flow
/// a load balancer forgot, a server that went away without a word: found here, not by the
/// client's request.
async fn check(conn: &mut ServerConn, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, conn.simple_query("")).await {
        Ok(Ok(crate::protocol::backend::TxStatus::Idle)) => true,
        Ok(Ok(status)) => {
            tracing::warn!(?status, "idle server connection not idle; closing it");
            false
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "idle server connection failed its check");
            false
        }
        Err(_) => {
            tracing::debug!(?timeout, "idle server connection did not answer its check");
            false
        }
    }
}

impl Session<'_> {
    /// Borrows a usable server connection, connecting when the lease brings none, and
    /// replacing an idle one that died while pooled. Errors are what the client is told.
    pub(super) async fn checkout(&self) -> Result<Lease<Box<ServerConn>>, PgError> {
        let arrived = Instant::now();
        let mut lease = self
            .ctx
            .pools
            .acquire(self.pool, self.group)
            .await
            .map_err(rejection)?;
        let idle_for = lease.idle_for();
        if let Some(conn) = lease.conn() {
            let dead = if !conn.is_reusable() {
                Some("dead_on_checkout")
            } else if idle_for < self.config.server_check_delay
                || check(conn, self.config.server_connect_timeout).await
            {
                None
            } else {
                Some("failed_check")
            };
            match dead {
                None => return Ok(lease),
                Some(reason) => lease.reconnect(reason),
            }
        }
        self.connect(&mut lease, arrived).await?;
        Ok(lease)
    }

    /// Fills `lease` with a new server connection. Through an outage it tries again with
    /// backoff, each attempt resolving the server's name anew, until `server_unavailable_timeout`
    /// after the request `arrived`.
    async fn connect(
        &self,
        lease: &mut Lease<Box<ServerConn>>,
        arrived: Instant,
    ) -> Result<(), PgError> {
        let g = crate::metrics::global();
        let hold = arrived + self.config.server_unavailable_timeout();
        let mut backoff = Backoff::default();
        loop {
            let started = std::time::Instant::now();
            let password = self
                .ctx
                .server_password(&self.user)
                .or_else(|| self.kept.clone());
            let target = Target::new(
                &self.config,
                &self.ctx.tls().connector,
                password.clone(),
                &self.database,
                &self.user,
            );
            // Boxed: a login's future (TLS, SCRAM, an IAM token's credentials) is large, and
            // the first one runs inside every client's start-up future, which idle sockets
            // that have not sent their startup packet keep too.
            let connecting = Box::pin(ServerConn::connect(
                &target,
                &self.database,
                &self.ctx.servers,
            ));
            let result = connecting.await;
            if let Some(p) = password.as_ref().filter(|p| p.is_keys_only()) {
                match &result {
                    Ok(_) => self
                        .ctx
                        .passthrough
                        .renew(&self.user, p, self.config.passthrough_ttl),
                    Err(e) if e.is_login_refused() || matches!(e, ServerError::Auth(_)) => {
                        self.ctx.passthrough.forget(&self.user, p)
                    }
                    Err(_) => {}
                }
            }
            let e = match result {
                Ok(conn) => {
                    g.connect_time.record(started.elapsed().as_secs_f64());
                    self.ctx
                        .record_login(self.pool, &self.database, &self.user, Ok(&conn));
                    lease.fill(Box::new(conn));
                    return Ok(());
                }
                Err(e) => e,
            };
            self.ctx
                .record_login(self.pool, &self.database, &self.user, Err(&e));
            let delay = backoff.next();
            if e.is_outage() && Instant::now() + delay < hold {
                tracing::debug!(error = %e, ?delay, "server connect failed; trying again");
                tokio::time::sleep(delay).await;
                continue;
            }
            tracing::warn!(error = %e, database = %self.database, user = %self.user, "server connect failed");
            let mut error = server::client_error(&e).with_severity(Severity::Error);
            if e.is_outage() && backoff.tries > 1 && error.detail().is_none() {
                error = error.with_detail(format!(
                    "Sluice tried {} times for {} ms (server_unavailable_timeout); the last attempt: {e}",
                    backoff.tries,
                    arrived.elapsed().as_millis()
                ));
            }
            return Err(error);
        }
    }

    /// The server's ParameterStatus values for this pool, connecting once if none are known.
    pub(super) async fn server_params(&self) -> Result<ServerParams, PgError> {
        if let Some(p) = self.ctx.server_params.lock().get(&self.pool) {
            return Ok(p.clone());
        }
        let lease = self.checkout().await?;
        lease.release();
        self.ctx
            .server_params
            .lock()
            .get(&self.pool)
            .cloned()
            .ok_or_else(|| PgError::fatal(sqlstate::INTERNAL_ERROR, "no server parameters known"))
    }
}
