//! The admin console's per-database controls (PgBouncer's `PAUSE db`, `RESUME db`, `KILL db`,
//! `RECONNECT [db]`, `WAIT_CLOSE [db]`) and per-database counts (`SHOW STATS`).

use std::time::Duration;

use tokio::time::Instant;

use super::{Entry, State};

/// One pool's controls and counts.
#[derive(Debug, Default)]
pub(crate) struct PoolControl {
    /// No new checkouts (`PAUSE db`, `KILL db`) until `RESUME`.
    pub paused: bool,
    /// Connections opened before this are closed as they come back (`RECONNECT`).
    pub reconnect_before: Option<Instant>,
    /// Lent connections opened before `reconnect_before`, not yet back (`WAIT_CLOSE`).
    pub old_lent: u32,
    pub transactions: u64,
    pub transaction_time: Duration,
    pub wait_time: Duration,
}

impl PoolControl {
    pub fn opened_before_reconnect<C>(&self, e: &Entry<C>) -> bool {
        self.reconnect_before.is_some_and(|t| e.created < t)
    }
}

/// One database's counts, over its pools (`SHOW STATS`).
#[derive(Debug, Clone, Default)]
pub struct DatabaseStats {
    pub database: String,
    pub transactions: u64,
    pub transaction_time: Duration,
    pub wait_time: Duration,
    /// Server connections open now, and whether the database is paused.
    pub connections: u32,
    pub paused: bool,
}

impl<C: Send + 'static> State<C> {
    fn matching(&self, database: Option<&str>) -> Vec<usize> {
        (0..self.pools.len())
            .filter(|p| database.is_none_or(|d| self.pools[*p].database == d))
            .collect()
    }

    /// Pauses or resumes the pools of `database` (all with `None`); returns how many.
    pub fn set_database_paused(&mut self, database: Option<&str>, paused: bool) -> usize {
        let pools = self.matching(database);
        for p in &pools {
            self.pools[*p].control.paused = paused;
        }
        pools.len()
    }

    /// `RECONNECT`: closes the idle connections of `database` (all with `None`) now and the lent
    /// ones as they come back; new ones are opened as needed. Returns how many were closed now.
    pub fn reconnect(&mut self, database: Option<&str>, now: Instant) -> usize {
        let mut closed = 0;
        for p in self.matching(database) {
            let ps = &mut self.pools[p];
            ps.control.reconnect_before = Some(now);
            ps.control.old_lent = ps.active.saturating_sub(ps.connecting);
            let idle = std::mem::take(&mut ps.idle);
            ps.total -= idle.len() as u32;
            self.total -= idle.len() as u32;
            closed += idle.len();
            for e in idle {
                crate::metrics::server_closed("reconnect");
                self.dead.push(e.conn);
            }
        }
        closed
    }

    /// Lent connections of `database` (all with `None`) that a `RECONNECT` is still waiting for.
    pub fn close_needed(&self, database: Option<&str>) -> u32 {
        self.matching(database)
            .into_iter()
            .map(|p| self.pools[p].control.old_lent)
            .sum()
    }

    /// Server connections now: (lent and connected, idle, connecting).
    pub fn server_counts(&self) -> (u32, u32, u32) {
        self.pools.iter().fold((0, 0, 0), |(a, i, c), p| {
            (
                a + p.active.saturating_sub(p.connecting),
                i + p.idle.len() as u32,
                c + p.connecting,
            )
        })
    }

    /// Whether any pool of `database` exists.
    pub fn has_database(&self, database: &str) -> bool {
        self.pools.iter().any(|p| p.database == database)
    }

    /// Active server connections of `database` (all with `None`), connecting ones included.
    pub fn active_in(&self, database: Option<&str>) -> u32 {
        self.matching(database)
            .into_iter()
            .map(|p| self.pools[p].active)
            .sum()
    }

    /// Sets each group's gauge of its longest wait so far (a scrape, the housekeeping).
    pub fn set_oldest_wait_gauges(&self, now: Instant) {
        for g in &self.groups {
            let oldest = g
                .waiters
                .front()
                .map_or(Duration::ZERO, |w| now.saturating_duration_since(w.since));
            g.metrics.oldest_wait.set(oldest.as_secs_f64());
        }
    }

    pub fn database_stats(&self) -> Vec<DatabaseStats> {
        let mut out: Vec<DatabaseStats> = Vec::new();
        for ps in &self.pools {
            let i = match out.iter().position(|d| d.database == ps.database) {
                Some(i) => i,
                None => {
                    out.push(DatabaseStats {
                        database: ps.database.clone(),
                        paused: true,
                        ..Default::default()
                    });
                    out.len() - 1
                }
            };
            let d = &mut out[i];
            d.transactions += ps.control.transactions;
            d.transaction_time += ps.control.transaction_time;
            d.wait_time += ps.control.wait_time;
            d.connections += ps.total - ps.connecting;
            d.paused &= ps.control.paused || self.paused;
        }
        out
    }
}
