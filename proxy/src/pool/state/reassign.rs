//! Connections and slots that change hands outside a checkout: a connect slot moving to another
//! pool (a passthrough login verified for one pool whose connection belongs to another), and
//! idle connections the server has closed.

use super::{PoolId, State};

impl<C: Send + 'static> State<C> {
    /// Moves a connect slot (leased on behalf of a group when `leased`) from pool `from` to
    /// pool `to`, unless `to` is full. Totals and the budget do not change.
    pub fn move_slot(&mut self, from: PoolId, to: PoolId, leased: bool) -> bool {
        let (f, t) = (from.0, to.0);
        if f == t {
            return true;
        }
        if self.pools[t].total >= self.pools[t].size {
            return false;
        }
        self.pools[f].total -= 1;
        self.pools[f].connecting -= 1;
        self.pools[t].total += 1;
        self.pools[t].connecting += 1;
        if leased {
            self.pools[f].active -= 1;
            self.pools[t].active += 1;
        }
        true
    }

    /// Takes the idle connections `gone` says are dead (the server closed them, or said
    /// something unasked), for the caller to close outside the lock.
    pub fn reap_gone(&mut self, gone: &mut dyn FnMut(&mut C) -> bool) -> Vec<C> {
        let mut out = Vec::new();
        for ps in &mut self.pools {
            let mut i = 0;
            while i < ps.idle.len() {
                if gone(&mut ps.idle[i].conn) {
                    out.push(ps.idle.remove(i).conn);
                    ps.total -= 1;
                    self.total -= 1;
                    crate::metrics::server_closed("closed_by_server");
                } else {
                    i += 1;
                }
            }
        }
        out
    }
}
