//! [`Lease`]: an admitted claim on one server connection, returned or discarded exactly once.

use std::sync::Arc;

use tokio::time::Instant;

use super::state::Entry;
use super::{GroupId, PoolId, Shared};

/// A borrowed connection (or the right to open one, see [`Lease::needs_connect`]).
///
/// Dropping a lease discards its connection and frees its budget slot: only [`Lease::release`]
/// puts a connection back for reuse, so an error path can never hand on a dirty connection.
pub struct Lease<C: Send + 'static> {
    shared: Arc<Shared<C>>,
    pool: PoolId,
    /// `None` for warm-up slots, which are not admitted on behalf of any client.
    group: Option<GroupId>,
    entry: Option<Entry<C>>,
    granted: Instant,
    done: bool,
}

impl<C: Send + 'static> Lease<C> {
    pub(crate) fn new(
        shared: Arc<Shared<C>>,
        pool: PoolId,
        group: Option<GroupId>,
        entry: Option<Entry<C>>,
        granted: Instant,
    ) -> Self {
        Lease {
            shared,
            pool,
            group,
            entry,
            granted,
            done: false,
        }
    }

    pub fn pool(&self) -> PoolId {
        self.pool
    }

    /// True when the lease holds no connection yet: the holder must connect and [`Lease::fill`].
    pub fn needs_connect(&self) -> bool {
        self.entry.is_none()
    }

    pub fn conn(&mut self) -> Option<&mut C> {
        self.entry.as_mut().map(|e| &mut e.conn)
    }

    /// How long the connection has existed.
    pub fn age(&self) -> std::time::Duration {
        self.entry
            .as_ref()
            .map(|e| e.created.elapsed())
            .unwrap_or_default()
    }

    /// How long the connection lay idle in the pool before this lease took it (zero for a new one).
    pub fn idle_for(&self) -> std::time::Duration {
        self.entry
            .as_ref()
            .map(|e| self.granted.saturating_duration_since(e.since))
            .unwrap_or_default()
    }

    /// Puts a freshly opened connection in an empty lease.
    pub fn fill(&mut self, conn: C) {
        let now = Instant::now();
        let after = {
            let mut st = self.shared.state.lock();
            st.filled(self.pool);
            // A connect slot is free again: another waiter may now connect.
            st.dispatch(&self.shared, now)
        };
        after.run();
        self.entry = Some(Entry {
            conn,
            created: now,
            since: now,
        });
    }

    /// Makes an empty lease a connect slot of `pool` instead (a login verified for one pool
    /// whose connection belongs to another), unless `pool` is full: then `false`, and it
    /// stays where it was.
    pub fn move_to(&mut self, pool: PoolId) -> bool {
        if self.entry.is_some() {
            return false;
        }
        let moved = self
            .shared
            .state
            .lock()
            .move_slot(self.pool, pool, self.group.is_some());
        if moved {
            self.pool = pool;
        }
        moved
    }

    /// Drops a connection found dead before use and makes the lease a connect slot again,
    /// keeping its place in the budget; `reason` labels the closed-connections metric.
    pub fn reconnect(&mut self, reason: &'static str) {
        if let Some(e) = self.entry.take() {
            let dead = {
                let mut st = self.shared.state.lock();
                st.refill(self.pool, e.conn);
                st.take_dead()
            };
            crate::metrics::server_closed(reason);
            drop(dead);
        }
    }

    /// Returns a clean connection for reuse.
    pub fn release(mut self) {
        self.finish(true);
    }

    /// Closes the connection and frees its slot.
    pub fn discard(mut self) {
        self.finish(false);
    }

    fn finish(&mut self, reuse: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let now = Instant::now();
        let entry = self.entry.take();
        let after = {
            let mut st = self.shared.state.lock();
            st.release(self.pool, self.group, entry, reuse, self.granted, now);
            st.dispatch(&self.shared, now)
        };
        after.run();
    }
}

impl<C: Send + 'static> Drop for Lease<C> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl<C: Send + 'static> std::fmt::Debug for Lease<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("pool", &self.pool)
            .field("connected", &self.entry.is_some())
            .finish()
    }
}
