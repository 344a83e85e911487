//! Waiting for a client's requests: as an idle client (the wait every connected client keeps),
//! then for the rest of a request it has started.

use crate::client_conn::{ClientConn, ClientError, Exit, Framed};
use crate::clients;
use crate::error::{sqlstate, PgError, Side};
use crate::protocol::frontend::tag;
use crate::protocol::ProtocolError;

/// The request at the head of the client's buffer.
pub(super) enum Request {
    /// Whole messages up to `end`, ending with the message tagged `last`.
    Complete { end: usize, last: u8 },
    /// Too large to buffer whole: a server relays it as it arrives.
    Streamed,
    /// The client said goodbye.
    Terminate,
}

/// Waits for the client's next request: whole messages up to one that ends a request (Query,
/// Sync, FunctionCall, Flush), or, when `limit` bytes are buffered without that end, the head of
/// a request too large to buffer. Consumes nothing. Called once the client has sent something
/// (after [`wait_idle`]), so that the wait as an idle client happens once per request.
pub(super) async fn next_request(
    conn: &mut ClientConn,
    max_message: usize,
    limit: usize,
) -> Result<Request, Exit> {
    let mut end = 0;
    loop {
        let h = match conn.read_frame(end, max_message, limit).await {
            Ok(Framed::Whole(h)) => h,
            Ok(Framed::Partial(Some(h))) if h.tag == tag::TERMINATE => {
                return Ok(Request::Terminate)
            }
            Ok(Framed::Partial(_)) => return Ok(Request::Streamed),
            Err(e) => return Err(client_failed(e)),
        };
        if h.tag == tag::TERMINATE {
            return Ok(Request::Terminate);
        }
        end += h.total();
        if matches!(
            h.tag,
            tag::QUERY | tag::SYNC | tag::FUNCTION_CALL | tag::FLUSH
        ) {
            return Ok(Request::Complete { end, last: h.tag });
        }
    }
}

/// Drops the client's messages up to and including a Sync, each as soon as it is whole, so a
/// batch being discarded holds at most one message (`max_message_bytes`) however long it runs.
pub(super) async fn discard_until_sync(
    conn: &mut ClientConn,
    max_message: usize,
) -> Result<(), Exit> {
    loop {
        match conn
            .read_message(max_message)
            .await
            .map_err(client_failed)?
            .tag
        {
            tag::SYNC => return Ok(()),
            tag::TERMINATE => return Err(Exit::Quiet),
            _ => {}
        }
    }
}

/// What the client is told when reading its request failed.
pub(super) fn client_failed(e: ClientError) -> Exit {
    match e {
        ClientError::Protocol(e @ ProtocolError::TooLong { .. }) => {
            PgError::protocol_violation(format!("{e} (max_message_bytes)")).into()
        }
        ClientError::Stalled(_) => {
            tracing::info!(
                timeout = "client_stall_timeout",
                "timed out: client disconnected in the middle of a request"
            );
            crate::metrics::client_timed_out("client_stall_timeout");
            e.into()
        }
        e => e.into(),
    }
}

/// Waits, as an idle client, until the client sends something. The read buffer is freed
/// meanwhile, so an idle client holds none; the wait ends early when the registry kicks the
/// session (idle timeout, shutdown). No timer is armed per wait.
pub(super) fn wait_idle<'a>(
    conn: &'a mut ClientConn,
    slot: &'a clients::ClientSlot,
) -> impl std::future::Future<Output = Result<(), Exit>> + 'a {
    use futures_util::FutureExt;
    slot.went_idle();
    // Room at the relay's read size, so a request never makes the buffer grow (copy) mid-way.
    // A plain future, not an `async fn`: it is kept by every idle client.
    conn.wait_readable(crate::server::READ_BUFFER, |cx| slot.poll_kicked(cx))
        .map(|kicked| match kicked {
            None => Ok(()),
            Some(kick) => Err(kicked_exit(kick)),
        })
}

/// What the client is told when the registry ends its session.
fn kicked_exit(kick: clients::Kick) -> Exit {
    match kick {
        clients::Kick::IdleTimeout => PgError::fatal(
            sqlstate::IDLE_SESSION_TIMEOUT,
            "terminating connection due to idle-session timeout (client_idle_timeout)",
        )
        .with_side(Side::Client)
        .into(),
        clients::Kick::Shutdown => PgError::fatal(
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection because Sluice is shutting down",
        )
        .into(),
        clients::Kick::Killed => PgError::fatal(
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection due to administrator command (KILL of its database on Sluice's admin console)",
        )
        .into(),
    }
}
