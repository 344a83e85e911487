//! Pools of server connections under one global budget, with admission control.
//!
//! Generic over the connection type `C`: tests pool plain values. A [`Pools`] holds every
//! (database, user) pool and every client group; one short critical section per checkout and per
//! return decides who gets what, so no limit can be overshot by a race between threads:
//!
//! - the **budget** bounds all connections (connecting, idle, busy) together;
//! - each **pool** bounds its own connections (`size`);
//! - each **group** may cap the connections it holds at once and reserve part of the budget;
//! - waiters queue per group, and groups with waiters are served round robin, groups below their
//!   reservation first, so one hot function cannot starve the others;
//! - the queue is bounded, and requests that would only time out are shed at once ([`shed`]).
//!
//! A grant is a [`Lease`]: an admitted slot holding either an idle connection or the right to
//! open a new one. Dropping a lease without [`Lease::release`] discards its connection: a
//! connection is never handed on unless its holder vouched that it is clean.

mod lease;
pub mod shed;
mod state;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use thiserror::Error;
use tokio::sync::oneshot;
use tokio::time::Instant;

pub use lease::Lease;
use shed::Shedder;
use state::{Admit, Grant, State, Waiter};
pub use state::{DatabaseStats, GroupShare};

use crate::metrics::GroupMetrics;

/// Index of a (database, user) pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolId(pub(crate) usize);

/// Index of a client group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupId(pub(crate) usize);

/// Limits shared by every pool.
#[derive(Debug, Clone)]
pub struct Limits {
    pub budget: u32,
    pub max_connecting: u32,
    pub max_waiting: u32,
    pub wait_timeout: Duration,
    /// Overload (see [`shed`]): a queue that has not emptied for `shed_interval` keeps its
    /// requests' waits within `shed_target` (arrivals) and 1.5 × `shed_target` (the served).
    pub shed_target: Duration,
    pub shed_interval: Duration,
    /// While the server cannot be reached, how long a request may wait from its arrival.
    pub server_unavailable_timeout: Duration,
}

/// Per-group settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupLimits {
    pub max_connections: Option<u32>,
    pub reserved: u32,
    pub max_waiting: Option<u32>,
}

/// Why a request was refused without being executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    QueueFull,
    PredictedTimeout,
    Overload,
    WaitTimeout,
    /// The server could not be reached for `server_unavailable_timeout`.
    ServerUnavailable,
    Closed,
}

impl Reason {
    /// Every reason, in the order of their indexes (`reason as usize`).
    pub const ALL: [Reason; 6] = [
        Reason::QueueFull,
        Reason::PredictedTimeout,
        Reason::Overload,
        Reason::WaitTimeout,
        Reason::ServerUnavailable,
        Reason::Closed,
    ];

    /// The metric label and the word used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::QueueFull => "queue_full",
            Reason::PredictedTimeout => "predicted_timeout",
            Reason::Overload => "overload",
            Reason::WaitTimeout => "wait_timeout",
            Reason::ServerUnavailable => "server_unavailable",
            Reason::Closed => "shutting_down",
        }
    }
}

#[derive(Debug, Error, Clone)]
#[error("{reason:?}: {detail}")]
pub struct Rejected {
    pub reason: Reason,
    /// The limit that was hit, for the DETAIL of the error.
    pub detail: String,
    /// A suggested retry delay.
    pub retry_after: Duration,
}

/// A point-in-time view of one pool, for the admin console and gauges.
#[derive(Debug, Clone)]
pub struct PoolStats {
    pub database: String,
    pub user: String,
    pub size: u32,
    pub active: u32,
    pub idle: u32,
    pub connecting: u32,
    pub waiting: u32,
}

/// A point-in-time view of one group.
#[derive(Debug, Clone)]
pub struct GroupStats {
    pub name: String,
    pub active: u32,
    pub waiting: u32,
    pub max_connections: Option<u32>,
    pub reserved: u32,
    pub transactions: u64,
    pub transaction_time: Duration,
    pub wait_time: Duration,
    pub rejected: u64,
    /// Rejections by reason, indexed like [`Reason::ALL`].
    pub rejected_by: [u64; Reason::ALL.len()],
    /// Waits for a connection by bucket ([`wait_bucket`]).
    pub waits: [u64; WAIT_BUCKETS],
    /// How long the longest-waiting client has waited so far (zero when none waits).
    pub oldest_wait: Duration,
}

/// Wait buckets: index 0 counts grants with no wait, index `i` waits up to
/// `WAIT_BUCKETS_MS[i - 1]`, the last one longer waits.
pub const WAIT_BUCKETS: usize = WAIT_BUCKETS_MS.len() + 2;

/// Upper bounds (milliseconds) of the wait buckets after the first (no wait at all).
pub const WAIT_BUCKETS_MS: [u64; 14] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000,
];

/// The bucket of a wait of `waited`: 0 only for no wait, else the first bound it is within.
pub fn wait_bucket(waited: Duration) -> usize {
    if waited.is_zero() {
        return 0;
    }
    let ms = waited.as_micros().div_ceil(1000) as u64;
    1 + WAIT_BUCKETS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(WAIT_BUCKETS_MS.len())
}

pub(crate) struct Shared<C: Send + 'static> {
    pub(crate) state: Mutex<State<C>>,
    on_queue: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// All pools and groups that share one budget.
pub struct Pools<C: Send + 'static> {
    shared: Arc<Shared<C>>,
}

impl<C: Send + 'static> Clone for Pools<C> {
    fn clone(&self) -> Self {
        Pools {
            shared: self.shared.clone(),
        }
    }
}

impl<C: Send + 'static> Pools<C> {
    pub fn new(limits: Limits) -> Self {
        let shedder = Shedder::new(limits.shed_target, limits.shed_interval);
        Pools {
            shared: Arc::new(Shared {
                state: Mutex::new(State::new(limits, shedder)),
                on_queue: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The pool for (database, user), created with `size`/`min` on first use.
    pub fn pool(&self, database: &str, user: &str, size: u32, min: u32) -> PoolId {
        self.shared.state.lock().pool_id(database, user, size, min)
    }

    /// The group called `name`, created with `limits` on first use.
    pub fn group(&self, name: &str, limits: GroupLimits) -> GroupId {
        let mut st = self.shared.state.lock();
        if let Some(g) = st.find_group(name) {
            return g;
        }
        // Registering metric handles takes the recorder's lock; it happens once per group.
        let metrics = GroupMetrics::new(name);
        st.add_group(name, limits, metrics)
    }

    /// Borrows a connection slot for `pool` on behalf of `group`: at once when capacity allows,
    /// else after waiting in the group's queue, or a [`Rejected`] that says why not.
    ///
    /// Cancel safe: dropping the future leaves the queue as if it had never waited.
    pub async fn acquire(&self, pool: PoolId, group: GroupId) -> Result<Lease<C>, Rejected> {
        let started = Instant::now();
        let (mut rx, id, deadline, evicted) = {
            let mut st = self.shared.state.lock();
            let admitted = st.try_admit(&self.shared, pool, group, started);
            // An idle connection evicted to make room is closed at once, outside the lock.
            let evicted = st.take_dead();
            let done = match admitted {
                Ok(Admit::Queue) => None,
                Ok(Admit::Granted(lease)) => Some(Ok(lease)),
                Err(rejected) => Some(Err(rejected)),
            };
            if let Some(done) = done {
                drop(st);
                drop(evicted);
                return done;
            }
            let (tx, rx) = oneshot::channel();
            let id = st.enqueue(
                Waiter {
                    id: 0,
                    pool,
                    tx,
                    since: started,
                },
                group,
            );
            (rx, id, started + st.limits.wait_timeout, evicted)
        };
        drop(evicted);
        if let Some(f) = self.shared.on_queue.get() {
            f();
        }
        let mut guard = WaitGuard {
            shared: &self.shared,
            group,
            id: Some(id),
        };
        let mut deadline = deadline;
        let received = loop {
            if let Ok(received) = tokio::time::timeout_at(deadline, &mut rx).await {
                break received;
            }
            let rejected = {
                let mut st = self.shared.state.lock();
                // An outage holds requests longer than wait_timeout when the operator says so
                // (server_unavailable_timeout), and ends them with its own reason.
                let outage = st.outage();
                let hold = started + st.limits.server_unavailable_timeout;
                if outage.is_some() && hold > deadline {
                    deadline = hold;
                    continue;
                }
                // Not there: granted between the timer firing and the lock, the lease is on
                // its way (grants are sent right after the lock is released).
                st.remove_waiter(group, id).then(|| {
                    let waited = deadline.saturating_duration_since(started).as_millis();
                    match outage {
                        Some(since) => {
                            let down = Instant::now().saturating_duration_since(since).as_millis();
                            st.reject(
                                group,
                                Reason::ServerUnavailable,
                                format!("the database server has been unreachable for {down} ms; no server connection could be had within {waited} ms"),
                            )
                        }
                        None => st.reject(
                            group,
                            Reason::WaitTimeout,
                            format!("no server connection became free within {waited} ms (wait_timeout)"),
                        ),
                    }
                })
            };
            guard.id = None;
            match rejected {
                Some(r) => return Err(r),
                None => break (&mut rx).await,
            }
        };
        guard.id = None;
        // Senders are dropped without a grant only on shutdown.
        received.unwrap_or_else(|_| {
            Err(Rejected {
                reason: Reason::Closed,
                detail: "Sluice is shutting down".into(),
                retry_after: Duration::from_secs(1),
            })
        })
    }

    /// Marks the server unreachable (`down`: a connect attempt failed as in an outage) or
    /// reachable again (a login succeeded). Returns whether that changed.
    pub fn outage_since(&self) -> Option<Instant> {
        self.shared.state.lock().outage()
    }

    pub fn set_outage(&self, down: bool) -> bool {
        self.shared.state.lock().set_outage(down, Instant::now())
    }

    /// Takes idle connections that have idled past `idle_timeout` or lived past `lifetime`
    /// (keeping each pool's minimum), for the caller to close outside the lock.
    pub fn reap(&self, now: Instant, idle_timeout: Duration, lifetime: Duration) -> Vec<C> {
        let (out, after) = {
            let mut st = self.shared.state.lock();
            let out = st.reap(now, idle_timeout, lifetime);
            (out, st.dispatch(&self.shared, now))
        };
        after.run();
        out
    }

    /// Takes the idle connections `gone` says are dead, for the caller to close; the budget
    /// they held is free again (and `min_pool_size` warms new ones).
    pub fn reap_gone(&self, mut gone: impl FnMut(&mut C) -> bool) -> Vec<C> {
        let (out, after) = {
            let mut st = self.shared.state.lock();
            let out = st.reap_gone(&mut gone);
            (out, st.dispatch(&self.shared, Instant::now()))
        };
        after.run();
        out
    }

    /// Takes every idle connection (for shutdown and PAUSE).
    pub fn drain_idle(&self) -> Vec<C> {
        let (out, after) = {
            let mut st = self.shared.state.lock();
            let out = st.drain_idle();
            (out, st.dispatch(&self.shared, Instant::now()))
        };
        after.run();
        out
    }

    /// Slots for warm connections each pool lacks (`min`), within the budget and connect limit.
    pub fn warm_slots(&self) -> Vec<Lease<C>> {
        self.shared.state.lock().warm_slots(&self.shared)
    }

    /// A connect slot for `pool` if one is free without taking from anyone (see
    /// `State::spare_slot`); filled and released, its connection is pooled like any other.
    pub fn spare_slot(&self, pool: PoolId) -> Option<Lease<C>> {
        self.shared.state.lock().spare_slot(&self.shared, pool)
    }

    /// Counts the server connections that exist with `backends` (their owner adds one when a
    /// connection's socket opens and takes it away once the server has closed it), so that a
    /// connection let go of keeps its place in the budget until its backend has gone; call
    /// [`Pools::wake`] when the count drops.
    pub fn count_backends(&self, backends: Arc<std::sync::atomic::AtomicU32>) {
        self.shared.state.lock().count_backends(backends);
    }

    /// Sets the budget alone (a fleet member's share changed): idle connections over it are
    /// closed now, lent ones as they come back.
    pub fn set_budget(&self, budget: u32) {
        let (dead, after) = {
            let mut st = self.shared.state.lock();
            st.set_budget(budget);
            let dead = st.take_dead();
            (dead, st.dispatch(&self.shared, Instant::now()))
        };
        drop(dead);
        after.run();
    }

    /// Sets a fleet member's shares of its groups' limits, in place of those set before (a
    /// group not seen yet gets its share when it is made); waiters a raised share lets in are
    /// served.
    pub fn set_group_shares(&self, shares: &[(&str, GroupShare)]) {
        let after = {
            let mut st = self.shared.state.lock();
            if !st.set_group_shares(shares) {
                return;
            }
            st.dispatch(&self.shared, Instant::now())
        };
        after.run();
    }

    /// A group's demand here, for a fleet's coordination: (connections lent and connecting,
    /// clients waiting).
    pub fn group_demand(&self, name: &str) -> (u32, u32) {
        self.shared.state.lock().group_demand(name)
    }

    /// What this instance needs and holds, for a fleet's coordination: (connections lent and
    /// connecting, clients waiting, server connections that exist or are being opened).
    pub fn demand(&self) -> (u32, u32, u32) {
        self.shared.state.lock().demand()
    }

    /// Calls `f` (outside the lock) whenever a request has to queue.
    pub fn on_queue(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.shared.on_queue.set(f);
    }

    /// Serves waiters that room made since (a backend has gone).
    pub fn wake(&self) {
        let after = self
            .shared
            .state
            .lock()
            .dispatch(&self.shared, Instant::now());
        after.run();
    }

    /// Refuses every waiter and every later request (shutdown).
    pub fn close(&self) {
        let waiters = self.shared.state.lock().close();
        drop(waiters);
    }

    pub fn pool_stats(&self) -> Vec<PoolStats> {
        self.shared.state.lock().pool_stats()
    }

    pub fn group_stats(&self) -> Vec<GroupStats> {
        self.shared.state.lock().group_stats()
    }

    /// Stops (or resumes) handing out server connections; requests queue meanwhile.
    pub fn set_paused(&self, paused: bool) {
        let after = {
            let mut st = self.shared.state.lock();
            st.set_paused(paused);
            st.dispatch(&self.shared, Instant::now())
        };
        after.run();
    }

    /// Pauses or resumes the pools of `database` (all with `None`); returns how many.
    pub fn set_database_paused(&self, database: Option<&str>, paused: bool) -> usize {
        let (n, after) = {
            let mut st = self.shared.state.lock();
            let n = st.set_database_paused(database, paused);
            (n, st.dispatch(&self.shared, Instant::now()))
        };
        after.run();
        n
    }

    /// Closes the idle server connections of `database` (all with `None`) now and the lent ones
    /// as they come back (`RECONNECT`); returns how many were closed now.
    pub fn reconnect(&self, database: Option<&str>) -> usize {
        let (n, dead, after) = {
            let mut st = self.shared.state.lock();
            let n = st.reconnect(database, Instant::now());
            let dead = st.take_dead();
            (n, dead, st.dispatch(&self.shared, Instant::now()))
        };
        drop(dead);
        after.run();
        n
    }

    /// Lent connections a `RECONNECT` of `database` (all with `None`) still waits for.
    pub fn close_needed(&self, database: Option<&str>) -> u32 {
        self.shared.state.lock().close_needed(database)
    }

    /// Server connections of `database` (all with `None`) lent to clients now.
    pub fn active_in(&self, database: Option<&str>) -> u32 {
        self.shared.state.lock().active_in(database)
    }

    pub fn has_database(&self, database: &str) -> bool {
        self.shared.state.lock().has_database(database)
    }

    /// Brings each group's `sluice_pool_oldest_wait_seconds` up to date.
    pub fn set_oldest_wait_gauges(&self) {
        self.shared
            .state
            .lock()
            .set_oldest_wait_gauges(Instant::now());
    }

    pub fn database_stats(&self) -> Vec<DatabaseStats> {
        self.shared.state.lock().database_stats()
    }

    /// Server connections currently lent to clients.
    pub fn active(&self) -> u32 {
        self.shared.state.lock().active()
    }

    /// Applies new limits, pool sizes and group limits (RELOAD).
    pub fn reconfigure(
        &self,
        limits: Limits,
        pool_size: &dyn Fn(&str, &str) -> (u32, u32),
        group: &dyn Fn(&str) -> GroupLimits,
    ) {
        let after = {
            let mut st = self.shared.state.lock();
            st.reconfigure(limits, pool_size, group);
            st.dispatch(&self.shared, Instant::now())
        };
        after.run();
    }

    /// Server connections now: (lent and connected, idle, connecting).
    pub fn server_counts(&self) -> (u32, u32, u32) {
        let st = self.shared.state.lock();
        st.server_counts()
    }

    /// (total connections, budget).
    pub fn totals(&self) -> (u32, u32) {
        let st = self.shared.state.lock();
        (st.total, st.limits.budget)
    }
}

/// Sends grants outside the lock; a grant whose waiter has gone comes back and is dropped
/// here, which returns it through the lease's own drop path.
pub(crate) fn deliver<C: Send + 'static>(grants: Vec<(oneshot::Sender<Grant<C>>, Grant<C>)>) {
    for (tx, grant) in grants {
        if let Err(back) = tx.send(grant) {
            drop(back);
        }
    }
}

/// Removes a waiter whose `acquire` future was dropped (the client went away).
struct WaitGuard<'a, C: Send + 'static> {
    shared: &'a Arc<Shared<C>>,
    group: GroupId,
    id: Option<u64>,
}

impl<C: Send + 'static> Drop for WaitGuard<'_, C> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.shared.state.lock().remove_waiter(self.group, id);
        }
    }
}

#[cfg(test)]
mod tests;
