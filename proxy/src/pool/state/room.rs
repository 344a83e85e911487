//! Room in the budget as the server sees it: a connection the pool has let go of still holds
//! its place until its backend has gone, so the server never counts more than the budget, not
//! even for the moment a backend takes to exit.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::State;

impl<C: Send + 'static> State<C> {
    /// Counts server connections with `backends` from now on (see [`super::super::Pools::count_backends`]).
    pub fn count_backends(&mut self, backends: Arc<AtomicU32>) {
        self.backends = Some(backends);
    }

    /// Server connections the server may hold for this pool now: the counted ones, plus slots
    /// still connecting (a connection counts itself once its socket is open, so for a moment
    /// one may be counted twice: never too few).
    pub fn on_server(&self) -> u32 {
        match &self.backends {
            Some(b) => b.load(Ordering::Acquire) + self.connecting,
            None => self.total,
        }
    }

    /// Whether one more connection fits under `limit`, in the pool's count and the server's.
    pub fn room(&self, limit: u32) -> bool {
        self.total < limit && self.on_server() < limit
    }

    /// Connections let go of whose backends have not gone yet (and others the pool does not
    /// hold, such as readiness logins).
    pub fn lingering(&self) -> u32 {
        self.on_server().saturating_sub(self.total)
    }
}

impl<C: Send + 'static> State<C> {
    /// A new budget; idle connections over it are taken to be closed (the oldest first), lent
    /// ones are closed as they come back.
    pub fn set_budget(&mut self, budget: u32) {
        self.limits.budget = budget;
        while self.total > budget {
            let oldest = (0..self.pools.len())
                .filter_map(|p| self.pools[p].idle.first().map(|e| (p, e.since)))
                .min_by_key(|(_, since)| *since);
            let Some((p, _)) = oldest else { break };
            let e = self.pools[p].idle.remove(0);
            self.pools[p].total -= 1;
            self.total -= 1;
            crate::metrics::server_closed("fleet_share");
            self.dead.push(e.conn);
        }
    }

    /// (lent and connecting, waiting, on the server): see [`super::super::Pools::demand`].
    pub fn demand(&self) -> (u32, u32, u32) {
        (self.active, self.waiting, self.on_server())
    }
}
