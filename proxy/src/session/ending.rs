//! How a request ends badly: the error for a request refused for capacity, and the clean-up
//! of a server whose client left mid-request.

use std::time::Duration;

use super::ROLLBACK_TIMEOUT;
use crate::config::PoolMode;
use crate::error::{sqlstate, PgError};
use crate::pool::{Lease, Reason, Rejected};
use crate::protocol::backend::TxStatus;
use crate::relay::Flow;
use crate::server::{self, ServerConn};

/// The error for a request refused for capacity, or held through an outage for
/// `server_unavailable_timeout`: it was not executed and may be retried.
pub(super) fn rejection(r: Rejected) -> PgError {
    if r.reason == Reason::ServerUnavailable {
        return PgError::error(
            sqlstate::CONNECTION_FAILURE,
            "the database server cannot be reached (server_unavailable): the query was not executed and is safe to retry",
        )
        .with_side(crate::error::Side::Server)
        .with_detail(r.detail)
        .with_hint(format!(
            "Retry after about {} ms, with backoff.",
            r.retry_after.as_millis()
        ));
    }
    let code = match r.reason {
        Reason::Closed => sqlstate::CANNOT_CONNECT_NOW,
        _ => sqlstate::TOO_MANY_CONNECTIONS,
    };
    PgError::error(
        code,
        format!(
            "Sluice is at capacity ({}): the query was not executed and is safe to retry",
            r.reason.as_str()
        ),
    )
    .with_detail(r.detail)
    .with_hint(format!(
        "Retry after about {} ms, with backoff.",
        r.retry_after.as_millis()
    ))
}

/// Returns or closes the server of a client that left mid-request. A server between requests
/// but inside a transaction is rolled back; one with a request in flight is cancelled and closed
/// (closing makes PostgreSQL roll back). Never hands on a connection in an unknown state.
pub(super) async fn cleanup(
    mut lease: Lease<Box<ServerConn>>,
    flow: &Flow,
    mode: PoolMode,
    reset_session: bool,
) {
    let Some(server) = lease.conn() else { return };
    if flow.at_rest() && server.buf.is_empty() {
        if flow.status() == TxStatus::Idle && mode == PoolMode::Transaction && !reset_session {
            lease.release();
            return;
        }
        // Roll back what the client left open; for session pooling and pinned sessions also
        // drop the session state (settings, prepared statements, temporary tables, advisory
        // locks, LISTENs) it built up.
        let reset = async {
            if flow.status() != TxStatus::Idle
                && server.simple_query("ROLLBACK").await? != TxStatus::Idle
            {
                return Ok(false);
            }
            if reset_session {
                server.prepared.clear();
                server.settings.clear();
                if server.simple_query("DISCARD ALL").await? != TxStatus::Idle {
                    return Ok(false);
                }
            }
            Ok::<_, server::ServerError>(true)
        };
        if let Ok(Ok(true)) = tokio::time::timeout(ROLLBACK_TIMEOUT, reset).await {
            lease.release();
            return;
        }
    } else {
        let key = server.cancel_key();
        tokio::spawn(async move {
            let _ = key.send(Duration::from_secs(5)).await;
        });
    }
    crate::metrics::server_closed("client_gone");
    lease.discard();
}
