//! The client listener: accepting, the client connection cap, and draining on shutdown.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::context::Context;
use crate::error::{sqlstate, PgError};
use crate::session;

/// Counts a live client and uncounts it when its task ends, however it ends.
struct ClientSlot(Arc<AtomicU32>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts clients until shutdown, then waits up to `drain` for their sessions to end.
pub async fn serve(ctx: Arc<Context>, listener: TcpListener, drain: Duration) {
    let tracker = TaskTracker::new();
    let live = Arc::new(AtomicU32::new(0));
    let accepted = &crate::metrics::global().accepted;
    loop {
        let accept = tokio::select! {
            a = listener.accept() => a,
            _ = ctx.shutdown.cancelled() => break,
        };
        let (stream, peer) = match accept {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let max = ctx.config().max_client_connections;
        if live.fetch_add(1, Ordering::AcqRel) >= max {
            live.fetch_sub(1, Ordering::AcqRel);
            crate::metrics::client_rejected("max_client_connections");
            tracing::debug!(%peer, "client refused: max_client_connections");
            let error = PgError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!("too many client connections: Sluice accepts at most {max} (max_client_connections)"),
            )
            .with_hint("Retry with backoff, or raise max_client_connections.");
            tracker.spawn(session::refuse(stream, error));
            continue;
        }
        accepted.increment(1);
        let slot = ClientSlot(live.clone());
        tracker.spawn(session::serve(ctx.clone(), stream, slot));
    }
    drop(listener);
    // Sessions waiting for their client end now; those mid-transaction end when it does.
    ctx.clients.kick_all();
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!(
            remaining = live.load(Ordering::Acquire),
            "shutdown drain timed out"
        );
    }
}
