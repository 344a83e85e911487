//! [`Flow`]: the request tracking a relay keeps and the session reads when it ends.

use super::Reported;
use crate::protocol::backend::TxStatus;
use crate::protocol::frontend::tag as fe;
use crate::sql::resets::Reset;
use crate::sql::{Encoding, Pin};

/// Request tracking: what is in flight, the transaction status, and what the session learns
/// from the relay when it ends. The session owns it across one relay.
#[derive(Debug)]
pub struct Flow {
    pub(super) pending: u32,
    pub(super) partial: bool,
    pub(super) copy_in: bool,
    pub(super) syncs_since_execute: u32,
    pub(super) status: TxStatus,
    /// Bytes of a server message still to be forwarded to the client.
    pub(super) server_skip: usize,
    /// Bytes of a client message still to be forwarded to the server: while any remain the
    /// server is mid-message and must not be released.
    pub(super) client_skip: usize,
    pub to_server: u64,
    pub to_client: u64,
    /// Settings the client returned to their startup values (`RESET ALL`, `RESET name`,
    /// `SET name TO DEFAULT`, `DISCARD ALL`), in order; Sluice put its startup values back.
    pub resets: Vec<Reset>,
    /// A reset ran in a transaction block, alongside an error, or behind other requests: whether
    /// it took effect is not known, and the session reads the values back.
    pub resets_unsure: bool,
    /// Settings the client changed with a session SET inside a transaction block.
    pub settings_changed: Vec<String>,
    /// Whether the server goes back to the pool when a transaction ends; cleared by a pin.
    pub release: bool,
    /// The first statement seen whose state outlives its transaction.
    pub(super) pin: Option<Pin>,
    /// The server sent the client a FATAL (or PANIC) error: it is ending the session, and the
    /// client has been told why.
    pub server_fatal: bool,
    /// A request in flight may commit (COMMIT, END, COMMIT PREPARED, or a statement outside a
    /// transaction block): if the server is lost now, its outcome is unknown.
    pub commit_in_flight: bool,
    /// The Query or Parse just looked at holds a statement that ends a transaction.
    pub(super) commits_seen: bool,
    /// A client inside a transaction block that sends nothing for this long is disconnected
    /// (zero: never).
    pub idle_transaction_timeout: std::time::Duration,
    /// A client that stops sending for this long in the middle of a message or of a COPY
    /// FROM STDIN, while its server waits for the rest, is disconnected (zero: never).
    pub client_stall_timeout: std::time::Duration,
    /// A request the server has not answered (ReadyForQuery) within this long is cancelled
    /// (zero: never).
    pub query_timeout: std::time::Duration,
    /// How the client's text is encoded (its `client_encoding`, as the server last reported
    /// it): the scanners step over its multibyte characters.
    pub encoding: Encoding,
    /// The values of the client's reported parameters (ParameterStatus) as it was last told
    /// them, by name: kept by the session across relays.
    pub reported: Reported,
}

impl Default for Flow {
    fn default() -> Self {
        Flow::new()
    }
}

impl Flow {
    pub fn new() -> Self {
        Flow {
            pending: 0,
            partial: false,
            copy_in: false,
            syncs_since_execute: 0,
            status: TxStatus::Idle,
            server_skip: 0,
            client_skip: 0,
            to_server: 0,
            to_client: 0,
            resets: Vec::new(),
            resets_unsure: false,
            settings_changed: Vec::new(),
            release: true,
            pin: None,
            encoding: Encoding::AsciiSafe,
            reported: Reported::default(),
            idle_transaction_timeout: std::time::Duration::ZERO,
            client_stall_timeout: std::time::Duration::ZERO,
            query_timeout: std::time::Duration::ZERO,
            server_fatal: false,
            commit_in_flight: false,
            commits_seen: false,
        }
    }

    /// Why the session must keep its server, if a statement said so.
    pub fn pinned(&self) -> Option<Pin> {
        self.pin
    }

    /// Keeps the server for the rest of the session; counted and logged once, when it happens.
    pub(super) fn pin(&mut self, p: Pin) {
        if self.pin.is_none() && self.release {
            self.pin = Some(p);
            crate::metrics::session_pinned(p.as_str());
            tracing::info!(
                reason = p.as_str(),
                "session pinned to its server connection"
            );
        }
        self.release = false;
    }

    /// The transaction status of the last ReadyForQuery.
    pub fn status(&self) -> TxStatus {
        self.status
    }

    /// Nothing in flight in either direction: the server is between requests.
    pub fn at_rest(&self) -> bool {
        self.between_requests() && self.server_skip == 0
    }

    /// How long the client may keep the server waiting now, and how the relay ends when it
    /// does: inside a transaction block with nothing in flight, `idle_transaction_timeout`; in
    /// the middle of a message (one being streamed, or `in_message`: the start of one is
    /// buffered, and the walk waits for the rest) or of a COPY FROM STDIN,
    /// `client_stall_timeout`; else no limit.
    pub fn client_deadline(&self, in_message: bool) -> Option<(std::time::Duration, super::End)> {
        if self.idle_in_transaction() && !self.idle_transaction_timeout.is_zero() {
            return Some((self.idle_transaction_timeout, super::End::IdleInTransaction));
        }
        let owes = in_message || self.client_skip > 0 || self.copy_in;
        if owes && !self.client_stall_timeout.is_zero() {
            return Some((self.client_stall_timeout, super::End::ClientStalled));
        }
        None
    }

    /// Requests sent that the server has yet to answer with a ReadyForQuery.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Inside a transaction block with nothing in flight: waiting for the client alone.
    pub fn idle_in_transaction(&self) -> bool {
        self.status != TxStatus::Idle && self.at_rest()
    }

    /// Every request sent has been answered and the client is not inside a message or a COPY:
    /// the next client byte starts a new request.
    /// Records that the client is told `name` = `value`; false when it was told so already and
    /// the ParameterStatus can be left out (one that Sluice's own statements made the server
    /// send again).
    pub(super) fn tell(&mut self, name: &[u8], value: &[u8]) -> bool {
        self.reported.tell(name, value)
    }

    pub(super) fn between_requests(&self) -> bool {
        self.pending == 0 && !self.partial && !self.copy_in && self.client_skip == 0
    }

    /// Updates the request counters for a client message about to be sent (or `dropped`:
    /// answered by Sluice itself, or discarded).
    pub(super) fn count(&mut self, tag: u8, dropped: bool) {
        match tag {
            fe::QUERY | fe::FUNCTION_CALL => {
                // A Query Sluice answers itself gets its ReadyForQuery from Sluice.
                if !dropped {
                    self.pending += 1;
                }
                self.partial = false;
                self.syncs_since_execute = 0;
            }
            fe::SYNC => {
                if !self.copy_in {
                    self.pending += 1;
                    self.syncs_since_execute += 1;
                }
                self.partial = false;
            }
            fe::EXECUTE => {
                self.syncs_since_execute = 0;
                self.partial = true;
            }
            fe::COPY_DONE | fe::COPY_FAIL => self.copy_in = false,
            fe::COPY_DATA => {}
            _ => self.partial = true,
        }
    }
}
