//! The bookkeeping behind [`super::Pools`], always touched under its one mutex.
//!
//! Invariants, checked by the tests in `tests.rs`:
//! - `total` = connecting + idle + connections held by leases ≤ `limits.budget`;
//! - per pool, `total` ≤ `size` and `active` ≤ `size`;
//! - `active` (admitted leases) ≤ budget, and per group ≤ its `max_connections`;
//! - a waiter is in exactly one group queue, and `waiting` counts them.
//!
//! Since every lease that is admitted needs at most one connection and `active` ≤ budget, an
//! admitted lease can always be given one: an idle connection of its pool, a new one within the
//! budget, or a new one in place of an idle connection evicted from another pool.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::lease::Lease;
use super::shed::Shedder;
use super::{
    wait_bucket, GroupId, GroupLimits, GroupStats, Limits, PoolId, PoolStats, Reason, Rejected,
    Shared, WAIT_BUCKETS,
};
use crate::metrics::GroupMetrics;

/// What a waiter is sent: a lease, or the refusal of a request that waited too long while
/// overloaded.
pub(crate) type Grant<C> = Result<Lease<C>, Rejected>;

mod control;
mod reassign;
mod room;
mod share;
pub use control::DatabaseStats;
pub use share::GroupShare;

pub(crate) struct Waiter<C: Send + 'static> {
    pub id: u64,
    pub pool: PoolId,
    pub tx: oneshot::Sender<Grant<C>>,
    pub since: Instant,
}

/// A connection at rest in a pool, or held by a lease.
pub(crate) struct Entry<C> {
    pub conn: C,
    pub created: Instant,
    pub since: Instant,
}

struct PoolState<C> {
    database: String,
    user: String,
    size: u32,
    min: u32,
    total: u32,
    active: u32,
    connecting: u32,
    /// Most recently used last: checkout pops the warmest connection.
    idle: Vec<Entry<C>>,
    /// Per-database controls and counts of the admin console ([`control`]).
    control: control::PoolControl,
}

struct GroupState<C: Send + 'static> {
    name: String,
    /// The configured limits, and those in force (lowered to a fleet member's share).
    configured: GroupLimits,
    limits: GroupLimits,
    active: u32,
    transactions: u64,
    transaction_time: Duration,
    wait_time: Duration,
    rejected: u64,
    /// Rejections by [`Reason`] (its index).
    rejected_by: [u64; Reason::ALL.len()],
    /// Waits for a connection, counted by [`WAIT_BUCKETS_MS`].
    waits: [u64; WAIT_BUCKETS],
    waiters: VecDeque<Waiter<C>>,
    metrics: GroupMetrics,
}

enum Source {
    Idle,
    New,
    Evict(usize),
}

pub(crate) enum Admit<C: Send + 'static> {
    Granted(Lease<C>),
    Queue,
}

/// What an operation leaves to do once the lock is released.
pub(crate) struct Aftermath<C: Send + 'static> {
    pub grants: Vec<(oneshot::Sender<Grant<C>>, Grant<C>)>,
    pub dead: Vec<C>,
}

impl<C: Send + 'static> Aftermath<C> {
    pub fn run(self) {
        super::deliver(self.grants);
        drop(self.dead);
    }
}

pub(crate) struct State<C: Send + 'static> {
    pub limits: Limits,
    pub total: u32,
    connecting: u32,
    active: u32,
    waiting: u32,
    pools: Vec<PoolState<C>>,
    groups: Vec<GroupState<C>>,
    /// Groups with waiters, in the order they are next served.
    rr: VecDeque<usize>,
    next_id: u64,
    shedder: Shedder,
    /// Since when the server has been unreachable (see [`State::set_outage`]).
    outage: Option<Instant>,
    /// When the last outage ended, and whether requests held through it are still queued:
    /// until they are served, the queue stands because of the outage, not the load, and nothing
    /// is shed.
    recovered: Option<Instant>,
    backlog: bool,
    closed: bool,
    paused: bool,
    dead: Vec<C>,
    /// Server connections that exist, counted by their owner from the socket's opening to
    /// its end, closing ones included ([`super::Pools::count_backends`]); `None`: the pool's
    /// own count is taken for it.
    backends: Option<Arc<std::sync::atomic::AtomicU32>>,
    /// A fleet member's shares of groups' limits, by group name ([`share`]).
    shares: std::collections::HashMap<String, GroupShare>,
}

impl<C: Send + 'static> State<C> {
    pub fn new(limits: Limits, shedder: Shedder) -> Self {
        State {
            limits,
            total: 0,
            connecting: 0,
            active: 0,
            waiting: 0,
            pools: Vec::new(),
            groups: Vec::new(),
            rr: VecDeque::new(),
            next_id: 1,
            shedder,
            outage: None,
            recovered: None,
            backlog: false,
            closed: false,
            paused: false,
            dead: Vec::new(),
            backends: None,
            shares: Default::default(),
        }
    }

    pub fn pool_id(&mut self, database: &str, user: &str, size: u32, min: u32) -> PoolId {
        if let Some(i) = self
            .pools
            .iter()
            .position(|p| p.database == database && p.user == user)
        {
            return PoolId(i);
        }
        self.pools.push(PoolState {
            database: database.to_string(),
            user: user.to_string(),
            size,
            min,
            total: 0,
            active: 0,
            connecting: 0,
            idle: Vec::new(),
            control: Default::default(),
        });
        PoolId(self.pools.len() - 1)
    }

    pub fn find_group(&self, name: &str) -> Option<GroupId> {
        self.groups.iter().position(|g| g.name == name).map(GroupId)
    }

    pub fn add_group(&mut self, name: &str, limits: GroupLimits, metrics: GroupMetrics) -> GroupId {
        self.groups.push(GroupState {
            name: name.to_string(),
            configured: limits,
            limits: share::effective(limits, self.shares.get(name)),
            active: 0,
            transactions: 0,
            transaction_time: Duration::ZERO,
            wait_time: Duration::ZERO,
            rejected: 0,
            rejected_by: Default::default(),
            waits: Default::default(),
            waiters: VecDeque::new(),
            metrics,
        });
        GroupId(self.groups.len() - 1)
    }

    /// Reservations other groups hold back while they have waiters and are below them.
    fn protected_for(&self, g: usize) -> u32 {
        self.rr
            .iter()
            .filter(|&&h| h != g)
            .map(|&h| {
                self.groups[h]
                    .limits
                    .reserved
                    .saturating_sub(self.groups[h].active)
            })
            .sum()
    }

    /// Where a lease for group `g` in pool `p` would get its connection now, if anywhere.
    fn source(&self, g: usize, p: usize) -> Option<Source> {
        let gs = &self.groups[g];
        let ps = &self.pools[p];
        if gs
            .limits
            .max_connections
            .is_some_and(|max| gs.active >= max)
            || ps.active >= ps.size
        {
            return None;
        }
        if self.paused || ps.control.paused || self.active >= self.limits.budget {
            return None;
        }
        let within_reservation = gs.active < gs.limits.reserved;
        if !within_reservation && self.active + self.protected_for(g) >= self.limits.budget {
            return None;
        }
        if !ps.idle.is_empty() {
            return Some(Source::Idle);
        }
        if self.connecting >= self.limits.max_connecting || ps.total >= ps.size {
            return None;
        }
        if self.room(self.limits.budget) {
            return Some(Source::New);
        }
        // The budget is all in use but not all busy: close another pool's oldest idle
        // connection to open one here, once it has gone (see [`room`]). Closings already
        // under way are waited for rather than added to.
        if self.lingering() >= self.limits.max_connecting.max(1) {
            return None;
        }
        self.pools
            .iter()
            .position(|q| !q.idle.is_empty())
            .map(Source::Evict)
    }

    fn grant(
        &mut self,
        shared: &Arc<Shared<C>>,
        g: usize,
        p: usize,
        src: Source,
        now: Instant,
    ) -> Lease<C> {
        let entry = match src {
            Source::Idle => self.pools[p].idle.pop(),
            Source::New | Source::Evict(_) => {
                self.total += 1;
                self.connecting += 1;
                self.pools[p].total += 1;
                self.pools[p].connecting += 1;
                None
            }
        };
        self.active += 1;
        self.groups[g].active += 1;
        self.pools[p].active += 1;
        Lease::new(shared.clone(), PoolId(p), Some(GroupId(g)), entry, now)
    }

    /// Where a lease gets its connection now, an eviction done: `None` while the evicted
    /// connection still counts (its backend has not gone yet), a dispatch serves it then.
    fn settle(&mut self, src: Source) -> Option<Source> {
        let Source::Evict(q) = src else {
            return Some(src);
        };
        let old = self.pools[q].idle.remove(0);
        self.pools[q].total -= 1;
        self.total -= 1;
        crate::metrics::server_closed("evicted");
        self.dead.push(old.conn);
        self.room(self.limits.budget).then_some(Source::New)
    }

    pub fn try_admit(
        &mut self,
        shared: &Arc<Shared<C>>,
        pool: PoolId,
        group: GroupId,
        now: Instant,
    ) -> Result<Admit<C>, Rejected> {
        let (g, p) = (group.0, pool.0);
        if self.closed {
            return Err(self.reject(group, Reason::Closed, "Sluice is shutting down".into()));
        }
        // Nobody jumps their own group's queue; other groups' waiters could not use what is free,
        // or dispatch would already have given it to them.
        if self.groups[g].waiters.is_empty() {
            let src = self.source(g, p).and_then(|src| self.settle(src));
            if let Some(src) = src {
                let lease = self.grant(shared, g, p, src, now);
                self.groups[g].metrics.wait.record(Duration::ZERO);
                self.groups[g].waits[0] += 1;
                return Ok(Admit::Granted(lease));
            }
        }
        if self.waiting >= self.limits.max_waiting {
            let detail = format!(
                "max_waiting ({}) clients are already waiting for a server connection",
                self.limits.max_waiting
            );
            return Err(self.reject(group, Reason::QueueFull, detail));
        }
        let gs = &self.groups[g];
        if let Some(max) = gs.limits.max_waiting {
            if gs.waiters.len() as u32 >= max {
                let detail = format!(
                    "group \"{}\" already has max_waiting ({max}) clients waiting",
                    gs.name
                );
                return Err(self.reject(group, Reason::QueueFull, detail));
            }
        }
        let ahead = gs.waiters.len() as u32 + 1;
        let groups_waiting = (self.rr.len() as u32 + u32::from(gs.waiters.is_empty())).max(1);
        let ahead = (ahead * groups_waiting).min(self.waiting + 1);
        let steady = self.steady();
        if steady {
            self.shedder.observe(now, self.waiting);
        }
        if let Some((reason, detail)) = steady
            .then(|| self.shedder.check(now, ahead, self.limits.wait_timeout))
            .flatten()
        {
            return Err(self.reject(group, reason, detail));
        }
        Ok(Admit::Queue)
    }

    /// Whether queueing says anything about load: not while connections are being opened
    /// (requests wait on the connect limit, not on releases), during an outage, or while the
    /// requests held through one are still queued.
    fn steady(&self) -> bool {
        self.connecting == 0 && self.outage.is_none() && !self.backlog
    }

    /// See [`super::Pools::set_outage`].
    pub fn set_outage(&mut self, down: bool, now: Instant) -> bool {
        match (down, self.outage) {
            (true, None) => self.outage = Some(now),
            (false, Some(_)) => {
                self.outage = None;
                self.recovered = Some(now);
                self.backlog = self.waiting > 0;
                self.shedder.outage_over(now);
            }
            _ => return false,
        }
        true
    }

    pub fn outage(&self) -> Option<Instant> {
        self.outage
    }

    pub fn reject(&mut self, group: GroupId, reason: Reason, detail: String) -> Rejected {
        self.groups[group.0].metrics.rejected(reason.as_str());
        self.groups[group.0].rejected += 1;
        self.groups[group.0].rejected_by[reason as usize] += 1;
        tracing::debug!(group = %self.groups[group.0].name, reason = reason.as_str(), %detail, "request shed");
        let retry_after = self
            .shedder
            .retry_after(self.waiting, self.limits.wait_timeout);
        Rejected {
            reason,
            detail,
            retry_after,
        }
    }

    pub fn enqueue(&mut self, mut w: Waiter<C>, group: GroupId) -> u64 {
        w.id = self.next_id;
        self.next_id += 1;
        if self.waiting == 0 {
            self.shedder.queue_started(w.since);
        }
        let gs = &mut self.groups[group.0];
        if gs.waiters.is_empty() {
            self.rr.push_back(group.0);
        }
        gs.waiters.push_back(w);
        gs.metrics.waiting.increment(1.0);
        self.waiting += 1;
        self.next_id - 1
    }

    /// Removes waiter `id` if still queued (not yet granted).
    pub fn remove_waiter(&mut self, group: GroupId, id: u64) -> bool {
        let gs = &mut self.groups[group.0];
        let Some(pos) = gs.waiters.iter().position(|w| w.id == id) else {
            return false;
        };
        gs.waiters.remove(pos);
        gs.metrics.waiting.decrement(1.0);
        self.waiting -= 1;
        if gs.waiters.is_empty() {
            self.rr.retain(|&x| x != group.0);
            if self.rr.is_empty() {
                self.shedder.queue_empty();
            }
        }
        true
    }

    /// Serves waiters while capacity allows: groups below their reservation first, then the
    /// others round robin.
    pub fn dispatch(&mut self, shared: &Arc<Shared<C>>, now: Instant) -> Aftermath<C> {
        let mut grants = Vec::new();
        // As for arrivals (`try_admit`): only a steady pool, and no outage, says anything about
        // load.
        let steady = self.steady();
        if steady {
            self.shedder.observe(now, self.waiting);
        }
        let max_wait = steady.then(|| self.shedder.max_wait()).flatten();
        // With no group waiting (most releases when the pool keeps up) the passes below would
        // only drain and refill empty queues.
        while !self.rr.is_empty() {
            let mut progressed = false;
            for reserved_pass in [true, false] {
                // Groups served in this pass go to the back, in the order served; the others
                // keep their place, so a group that could not be served loses no turn.
                let order: Vec<usize> = self.rr.drain(..).collect();
                let mut kept = Vec::with_capacity(order.len());
                let mut served = Vec::new();
                for g in order {
                    self.drop_gone(g);
                    let Some(pool) = self.groups[g].waiters.front().map(|w| w.pool.0) else {
                        continue;
                    };
                    let needy = self.groups[g].active < self.groups[g].limits.reserved;
                    let src = if reserved_pass && !needy {
                        None
                    } else {
                        self.source(g, pool)
                    };
                    let Some(src) = src else {
                        kept.push(g);
                        continue;
                    };
                    // An eviction makes room; the waiter is served once the evicted one has gone.
                    let Some(src) = self.settle(src) else {
                        kept.push(g);
                        continue;
                    };
                    let Some(w) = self.groups[g].waiters.pop_front() else {
                        continue;
                    };
                    self.waiting -= 1;
                    self.groups[g].metrics.waiting.decrement(1.0);
                    let waited = now.saturating_duration_since(w.since);
                    progressed = true;
                    // Overloaded: served now, it would have waited too long (see `shed`).
                    if max_wait.is_some_and(|max| waited > max) {
                        let detail = format!(
                            "requests have been queueing for over {} ms (shed_interval), and this one waited {} ms, more than 1.5 × shed_target",
                            self.limits.shed_interval.as_millis(),
                            waited.as_millis()
                        );
                        let r = self.reject(GroupId(g), Reason::Overload, detail);
                        grants.push((w.tx, Err(r)));
                        if !self.groups[g].waiters.is_empty() {
                            served.push(g);
                        }
                        continue;
                    }
                    let gs = &mut self.groups[g];
                    gs.metrics.wait.record(waited);
                    gs.wait_time += waited;
                    gs.waits[wait_bucket(waited)] += 1;
                    self.pools[pool].control.wait_time += waited;
                    let lease = self.grant(shared, g, pool, src, now);
                    grants.push((w.tx, Ok(lease)));
                    if !self.groups[g].waiters.is_empty() {
                        served.push(g);
                    }
                }
                self.rr.extend(kept);
                self.rr.extend(served);
            }
            if !progressed {
                break;
            }
        }
        if self.rr.is_empty() {
            self.shedder.queue_empty();
        }
        if self.backlog {
            let r = self.recovered.unwrap_or(now);
            let held = |g: &GroupState<C>| g.waiters.front().is_some_and(|w| w.since < r);
            if !self.groups.iter().any(held) {
                self.backlog = false;
                self.shedder.restart_spell(now);
            }
        }
        Aftermath {
            grants,
            dead: std::mem::take(&mut self.dead),
        }
    }

    /// Pops waiters at the head of group `g` whose client has gone.
    fn drop_gone(&mut self, g: usize) {
        let gs = &mut self.groups[g];
        while gs.waiters.front().is_some_and(|w| w.tx.is_closed()) {
            gs.waiters.pop_front();
            gs.metrics.waiting.decrement(1.0);
            self.waiting -= 1;
        }
    }

    /// Takes a lease's connection back. `reuse` puts it in the idle list, else it is closed.
    pub fn release(
        &mut self,
        pool: PoolId,
        group: Option<GroupId>,
        entry: Option<Entry<C>>,
        reuse: bool,
        granted: Instant,
        now: Instant,
    ) {
        let p = pool.0;
        if let Some(g) = group {
            let gs = &mut self.groups[g.0];
            let held = now.saturating_duration_since(granted);
            gs.active -= 1;
            gs.metrics.transactions.increment(1);
            gs.metrics.transaction_time.record(held);
            gs.transactions += 1;
            gs.transaction_time += held;
            self.active -= 1;
            self.pools[p].active -= 1;
            self.pools[p].control.transactions += 1;
            self.pools[p].control.transaction_time += held;
            // While connections are being opened capacity is still growing: the release rate
            // would understate it.
            self.shedder.on_release(now, self.connecting == 0);
        }
        let entry = match entry {
            // Opened before a RECONNECT: closed rather than pooled again.
            Some(e) if self.pools[p].control.opened_before_reconnect(&e) => {
                let c = &mut self.pools[p].control;
                c.old_lent = c.old_lent.saturating_sub(1);
                crate::metrics::server_closed("reconnect");
                self.dead.push(e.conn);
                self.total -= 1;
                self.pools[p].total -= 1;
                return;
            }
            other => other,
        };
        match entry {
            // Over budget after a RELOAD lowered it: close instead of keeping it.
            Some(mut e) if reuse && !self.closed && self.total <= self.limits.budget => {
                e.since = now;
                self.pools[p].idle.push(e);
            }
            Some(e) => {
                self.dead.push(e.conn);
                self.total -= 1;
                self.pools[p].total -= 1;
            }
            None => {
                // A slot that was never filled: the connect failed or was abandoned.
                self.connecting -= 1;
                self.pools[p].connecting -= 1;
                self.total -= 1;
                self.pools[p].total -= 1;
            }
        }
    }

    /// A connect slot became a connection.
    pub fn filled(&mut self, pool: PoolId) {
        self.connecting -= 1;
        self.pools[pool.0].connecting -= 1;
    }

    /// A lease's dead connection is dropped and the lease becomes a connect slot again.
    pub fn refill(&mut self, pool: PoolId, old: C) {
        self.dead.push(old);
        self.connecting += 1;
        self.pools[pool.0].connecting += 1;
    }

    pub fn take_dead(&mut self) -> Vec<C> {
        std::mem::take(&mut self.dead)
    }

    pub fn reap(&mut self, now: Instant, idle_timeout: Duration, lifetime: Duration) -> Vec<C> {
        let mut out = std::mem::take(&mut self.dead);
        for ps in &mut self.pools {
            let mut i = 0;
            while i < ps.idle.len() {
                let e = &ps.idle[i];
                let old = now.saturating_duration_since(e.created) >= lifetime;
                let idle = !idle_timeout.is_zero()
                    && now.saturating_duration_since(e.since) >= idle_timeout
                    && ps.total > ps.min;
                if old || idle {
                    out.push(ps.idle.remove(i).conn);
                    ps.total -= 1;
                    self.total -= 1;
                    crate::metrics::server_closed(if old { "lifetime" } else { "idle_timeout" });
                } else {
                    i += 1;
                }
            }
        }
        out
    }

    pub fn drain_idle(&mut self) -> Vec<C> {
        let mut out = std::mem::take(&mut self.dead);
        for ps in &mut self.pools {
            ps.total -= ps.idle.len() as u32;
            self.total -= ps.idle.len() as u32;
            out.extend(ps.idle.drain(..).map(|e| e.conn));
        }
        out
    }

    pub fn warm_slots(&mut self, shared: &Arc<Shared<C>>) -> Vec<Lease<C>> {
        let now = Instant::now();
        let mut out = Vec::new();
        for p in 0..self.pools.len() {
            while !self.closed
                && self.pools[p].total < self.pools[p].min
                && self.room(self.limits.budget.saturating_sub(self.waiting.min(1)))
                && self.connecting < self.limits.max_connecting
            {
                self.total += 1;
                self.connecting += 1;
                self.pools[p].total += 1;
                self.pools[p].connecting += 1;
                out.push(Lease::new(shared.clone(), PoolId(p), None, None, now));
            }
        }
        out
    }

    /// A connect slot for `pool` that takes nothing from anyone: within the budget, the
    /// connect limit and the pool's size, and only while nobody waits.
    pub fn spare_slot(&mut self, shared: &Arc<Shared<C>>, pool: PoolId) -> Option<Lease<C>> {
        let p = pool.0;
        let spare = !self.closed
            && self.waiting == 0
            && self.pools[p].total < self.pools[p].size
            && self.room(self.limits.budget)
            && self.connecting < self.limits.max_connecting;
        if !spare {
            return None;
        }
        self.total += 1;
        self.connecting += 1;
        self.pools[p].total += 1;
        self.pools[p].connecting += 1;
        Some(Lease::new(shared.clone(), pool, None, None, Instant::now()))
    }

    pub fn close(&mut self) -> Vec<Waiter<C>> {
        self.closed = true;
        self.rr.clear();
        self.waiting = 0;
        self.groups
            .iter_mut()
            .flat_map(|g| g.waiters.drain(..))
            .collect()
    }

    pub fn pool_stats(&self) -> Vec<PoolStats> {
        let waiting = |p: usize| -> u32 {
            self.groups
                .iter()
                .map(|g| g.waiters.iter().filter(|w| w.pool.0 == p).count() as u32)
                .sum()
        };
        self.pools
            .iter()
            .enumerate()
            .map(|(i, p)| PoolStats {
                database: p.database.clone(),
                user: p.user.clone(),
                size: p.size,
                active: p.active,
                idle: p.idle.len() as u32,
                connecting: p.connecting,
                waiting: waiting(i),
            })
            .collect()
    }

    pub fn group_stats(&self) -> Vec<GroupStats> {
        let now = Instant::now();
        self.groups
            .iter()
            .map(|g| GroupStats {
                name: g.name.clone(),
                active: g.active,
                waiting: g.waiters.len() as u32,
                max_connections: g.limits.max_connections,
                reserved: g.limits.reserved,
                transactions: g.transactions,
                transaction_time: g.transaction_time,
                wait_time: g.wait_time,
                rejected: g.rejected,
                rejected_by: g.rejected_by,
                waits: g.waits,
                oldest_wait: g
                    .waiters
                    .front()
                    .map_or(Duration::ZERO, |w| now.saturating_duration_since(w.since)),
            })
            .collect()
    }

    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    pub fn active(&self) -> u32 {
        self.active
    }

    /// Applies new limits (RELOAD). Lower sizes take effect as connections are returned.
    pub fn reconfigure(
        &mut self,
        limits: Limits,
        pool_size: &dyn Fn(&str, &str) -> (u32, u32),
        group: &dyn Fn(&str) -> GroupLimits,
    ) {
        self.shedder
            .retarget(limits.shed_target, limits.shed_interval);
        self.limits = limits;
        for p in &mut self.pools {
            (p.size, p.min) = pool_size(&p.database, &p.user);
        }
        for g in &mut self.groups {
            g.configured = group(&g.name);
            g.limits = share::effective(g.configured, self.shares.get(&g.name));
        }
    }

    #[cfg(test)]
    pub fn check_invariants(&self) {
        let idle: u32 = self.pools.iter().map(|p| p.idle.len() as u32).sum();
        assert!(
            self.total <= self.limits.budget,
            "total {} > budget {}",
            self.total,
            self.limits.budget
        );
        assert!(self.active <= self.limits.budget);
        assert!(idle <= self.total);
        assert_eq!(self.pools.iter().map(|p| p.total).sum::<u32>(), self.total);
        for p in &self.pools {
            assert!(p.total <= p.size && p.active <= p.size);
        }
        for g in &self.groups {
            if let Some(max) = g.limits.max_connections {
                assert!(g.active <= max);
            }
        }
        assert_eq!(
            self.groups
                .iter()
                .map(|g| g.waiters.len() as u32)
                .sum::<u32>(),
            self.waiting
        );
    }
}
