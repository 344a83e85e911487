//! The live status page's data (`GET /status` on the admin endpoint; the page itself is
//! `admin/status.html`): the budget and its use over the last minutes, each group's rate,
//! queue, wait percentiles and rejections, pinned sessions, server connects.
//!
//! The housekeeping samples once a second ([`Status::sample`]): four numbers for the budget
//! history, and each group's cumulative counts, from which rates and percentiles over the last
//! [`WINDOW`] seconds are differences. Nothing is recorded on the per-request path beyond the
//! pool's own counters.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;

use crate::clients::ClientState;
use crate::context::Context;
use crate::metrics::{self, TALLIES};
use crate::pool::{GroupStats, Reason, WAIT_BUCKETS, WAIT_BUCKETS_MS};

/// Budget samples kept: five minutes at one a second.
const HISTORY: usize = 300;
/// Seconds over which rates and percentiles are computed.
const WINDOW: usize = 10;
/// Groups shown, busiest first (the rest are summed into `other`).
const MAX_GROUPS: usize = 50;
/// Groups whose counts a sample keeps, busiest first, so that a flood of application names
/// cannot make the samples large.
const MAX_SAMPLED_GROUPS: usize = 500;

/// One second of budget use.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub t: u64,
    pub active: u32,
    pub idle: u32,
    pub connecting: u32,
    pub budget: u32,
}

/// What the housekeeping has sampled.
pub struct Status {
    started: Instant,
    inner: Mutex<Samples>,
}

#[derive(Default)]
struct Samples {
    history: VecDeque<Sample>,
    /// Each group's cumulative counts, one entry a second, oldest first; whether groups were
    /// left out of it ([`MAX_SAMPLED_GROUPS`]).
    groups: VecDeque<(Instant, Vec<GroupStats>, bool)>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            started: Instant::now(),
            inner: Mutex::new(Samples::default()),
        }
    }
}

impl Status {
    /// Records this second's budget use and group counts.
    pub fn sample(&self, ctx: &Context) {
        let (active, idle, connecting) = ctx.pools.server_counts();
        let sample = Sample {
            t: unix_ms(),
            active,
            idle,
            connecting,
            budget: ctx.config().max_server_connections,
        };
        let mut groups = ctx.pools.group_stats();
        let truncated = groups.len() > MAX_SAMPLED_GROUPS;
        if truncated {
            groups.sort_by_key(|g| std::cmp::Reverse(g.transactions + g.rejected));
            groups.truncate(MAX_SAMPLED_GROUPS);
        }
        let mut inner = self.inner.lock();
        if inner.history.len() == HISTORY {
            inner.history.pop_front();
        }
        inner.history.push_back(sample);
        if inner.groups.len() > WINDOW {
            inner.groups.pop_front();
        }
        inner.groups.push_back((Instant::now(), groups, truncated));
    }

    /// The document `GET /status` answers.
    pub fn report(&self, ctx: &Context) -> Report {
        let cfg = ctx.config();
        let (active, idle, connecting) = ctx.pools.server_counts();
        let now = ctx.pools.group_stats();
        let inner = self.inner.lock();
        let history: Vec<Sample> = inner.history.iter().copied().collect();
        let then = inner.groups.front();
        let seconds = then.map(|(at, _, _)| at.elapsed().as_secs_f64());
        let mut groups: Vec<GroupReport> = now
            .iter()
            .map(|g| {
                let before = then.map(|(_, gs, truncated)| {
                    match gs.iter().find(|b| b.name == g.name) {
                        Some(b) => Before::Sampled(b),
                        // Left out of a full sample: its rate is unknown.
                        None if *truncated => Before::Unknown,
                        // Created since.
                        None => Before::New,
                    }
                });
                group_report(g, before.unwrap_or(Before::Unknown), seconds)
            })
            .collect();
        drop(inner);
        groups.sort_by(|a, b| {
            (b.active + b.waiting)
                .cmp(&(a.active + a.waiting))
                .then(b.transactions.cmp(&a.transactions))
                .then(a.name.cmp(&b.name))
        });
        if groups.len() > MAX_GROUPS {
            let rest = groups.split_off(MAX_GROUPS - 1);
            groups.push(sum_groups(rest));
        }
        let counts = ctx.clients.state_counts();
        let client_states = ClientCounts {
            active: counts[ClientState::Active as usize] as u32,
            waiting: counts[ClientState::Waiting as usize] as u32,
            idle: counts[ClientState::Idle as usize] as u32,
        };
        let connects = metrics::read_tally(&TALLIES.connects, metrics::CONNECT_RESULTS);
        let pinned_by: Vec<(&str, i64)> =
            metrics::read_tally(&TALLIES.pinned_now, metrics::PIN_REASONS);
        Report {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            now_ms: unix_ms(),
            ready: ctx.ready.ready(),
            draining: ctx.ready.draining.load(Ordering::Relaxed) || ctx.shutdown.is_cancelled(),
            server: format!("{}:{}", cfg.server_host, cfg.server_port),
            budget: Budget {
                max: cfg.max_server_connections,
                active,
                idle,
                connecting,
            },
            history,
            window_seconds: seconds,
            clients: client_states,
            groups,
            pinned: Pinned {
                now: pinned_by.iter().map(|(_, n)| *n).sum(),
                by_reason: pinned_by.into_iter().filter(|(_, n)| *n > 0).collect(),
                total_by_reason: metrics::read_tally(&TALLIES.pins, metrics::PIN_REASONS)
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .collect(),
            },
            server_connects: ServerConnects {
                ok: connects.first().map(|(_, n)| *n).unwrap_or(0),
                failed: connects.iter().skip(1).map(|(_, n)| *n).sum(),
                by_result: connects.into_iter().filter(|(_, n)| *n > 0).collect(),
                unavailable: ctx.pools.outage_since().is_some(),
            },
            fleet: ctx.fleet.view().map(|v| {
                let me =
                    format!(
                    "this instance: {} of {} slots (fair share {}), fleet {} held by {} members{}",
                    v.held,
                    v.budget,
                    v.fair_share,
                    v.fleet_held,
                    v.members,
                    if v.connected { "" } else { " (coordination down)" }
                );
                std::iter::once(me)
                    .chain(
                        v.peers
                            .iter()
                            .map(|p| format!("member {} at {}", p.tag, p.addr)),
                    )
                    .collect()
            }),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A group's counts at the start of the window.
enum Before<'a> {
    Sampled(&'a GroupStats),
    /// The group did not exist yet: its counts started at 0.
    New,
    Unknown,
}

fn group_report(g: &GroupStats, before: Before<'_>, seconds: Option<f64>) -> GroupReport {
    let known = !matches!(before, Before::Unknown);
    let seconds = seconds.filter(|_| known);
    let before = match before {
        Before::Sampled(b) => Some(b),
        Before::New | Before::Unknown => None,
    };
    let rate = |now: u64, then: u64| {
        seconds
            .filter(|s| *s >= 0.5)
            .map(|s| now.saturating_sub(then) as f64 / s)
    };
    let zero = [0u64; WAIT_BUCKETS];
    let waits_then = before.map(|b| b.waits).unwrap_or(zero);
    let recent: Vec<u64> = g
        .waits
        .iter()
        .zip(waits_then)
        .map(|(n, t)| n.saturating_sub(t))
        .collect();
    GroupReport {
        name: g.name.clone(),
        active: g.active,
        waiting: g.waiting,
        max_connections: g.max_connections,
        reserved: g.reserved,
        transactions: g.transactions,
        tps: rate(g.transactions, before.map_or(0, |b| b.transactions)),
        rejections_per_second: rate(g.rejected, before.map_or(0, |b| b.rejected)),
        oldest_wait_ms: g.oldest_wait.as_millis() as u64,
        wait_p50_ms: quantile(&recent, 0.5).filter(|_| known),
        wait_p99_ms: quantile(&recent, 0.99).filter(|_| known),
        rejected: Reason::ALL
            .iter()
            .zip(g.rejected_by)
            .map(|(r, n)| (r.as_str(), n))
            .collect(),
    }
}

/// The upper bound (ms) of the bucket holding the `q` quantile of `counts` (`u64::MAX` past
/// the last bound), `None` when empty.
fn quantile(counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in counts.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(match i {
                0 => 0,
                i => WAIT_BUCKETS_MS.get(i - 1).copied().unwrap_or(u64::MAX),
            });
        }
    }
    None
}

fn sum_groups(rest: Vec<GroupReport>) -> GroupReport {
    let mut other = GroupReport {
        name: format!("other ({} groups)", rest.len()),
        active: 0,
        waiting: 0,
        max_connections: None,
        reserved: 0,
        transactions: 0,
        tps: None,
        rejections_per_second: None,
        oldest_wait_ms: 0,
        wait_p50_ms: None,
        wait_p99_ms: None,
        rejected: Reason::ALL.iter().map(|r| (r.as_str(), 0)).collect(),
    };
    for g in rest {
        other.active += g.active;
        other.waiting += g.waiting;
        other.oldest_wait_ms = other.oldest_wait_ms.max(g.oldest_wait_ms);
        other.transactions += g.transactions;
        other.tps = add(other.tps, g.tps);
        other.rejections_per_second = add(other.rejections_per_second, g.rejections_per_second);
        for (sum, (_, n)) in other.rejected.iter_mut().zip(g.rejected) {
            sum.1 += n;
        }
    }
    other
}

fn add(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub now_ms: u64,
    pub ready: bool,
    pub draining: bool,
    pub server: String,
    pub budget: Budget,
    /// Budget use, one sample a second, oldest first.
    pub history: Vec<Sample>,
    /// The seconds the rates are over (`None` before the first sample).
    pub window_seconds: Option<f64>,
    pub clients: ClientCounts,
    pub groups: Vec<GroupReport>,
    pub pinned: Pinned,
    pub server_connects: ServerConnects,
    /// This fleet member's share and the other members (a lone instance: none).
    pub fleet: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
pub struct Budget {
    pub max: u32,
    pub active: u32,
    pub idle: u32,
    pub connecting: u32,
}

#[derive(Debug, Serialize)]
pub struct ClientCounts {
    pub active: u32,
    pub waiting: u32,
    pub idle: u32,
}

#[derive(Debug, Serialize)]
pub struct GroupReport {
    pub name: String,
    pub active: u32,
    pub waiting: u32,
    pub max_connections: Option<u32>,
    pub reserved: u32,
    pub transactions: u64,
    pub tps: Option<f64>,
    pub rejections_per_second: Option<f64>,
    /// How long the longest-waiting client has waited so far.
    pub oldest_wait_ms: u64,
    pub wait_p50_ms: Option<u64>,
    pub wait_p99_ms: Option<u64>,
    /// Since start-up, by reason.
    pub rejected: Vec<(&'static str, u64)>,
}

#[derive(Debug, Serialize)]
pub struct Pinned {
    pub now: i64,
    pub by_reason: Vec<(&'static str, i64)>,
    pub total_by_reason: Vec<(&'static str, i64)>,
}

#[derive(Debug, Serialize)]
pub struct ServerConnects {
    pub ok: i64,
    pub failed: i64,
    pub by_result: Vec<(&'static str, i64)>,
    pub unavailable: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(name: &str, transactions: u64) -> GroupStats {
        GroupStats {
            name: name.into(),
            active: 0,
            waiting: 0,
            max_connections: None,
            reserved: 0,
            transactions,
            transaction_time: std::time::Duration::ZERO,
            wait_time: std::time::Duration::ZERO,
            rejected: 0,
            rejected_by: Default::default(),
            waits: Default::default(),
            oldest_wait: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn a_rate_needs_the_group_at_the_start_of_the_window() {
        let now = stats("g", 150);
        let then = stats("g", 50);
        let sampled = group_report(&now, Before::Sampled(&then), Some(10.0));
        assert_eq!(sampled.tps, Some(10.0));
        // Created within the window: counted from 0.
        assert_eq!(group_report(&now, Before::New, Some(10.0)).tps, Some(15.0));
        // Left out of a full sample: unknown, not "everything since start-up in 10 s".
        let unknown = group_report(&now, Before::Unknown, Some(10.0));
        assert_eq!((unknown.tps, unknown.wait_p50_ms), (None, None));
    }

    #[test]
    fn quantiles_are_bucket_bounds() {
        let mut counts = [0u64; WAIT_BUCKETS];
        assert_eq!(quantile(&counts, 0.5), None);
        counts[0] = 98; // granted at once
        counts[3] = 1; // up to 5 ms
        counts[8] = 1; // up to 250 ms
        assert_eq!(quantile(&counts, 0.5), Some(0));
        assert_eq!(quantile(&counts, 0.99), Some(5));
        assert_eq!(quantile(&counts, 1.0), Some(250));
        assert_eq!(
            crate::pool::wait_bucket(std::time::Duration::from_micros(4_100)),
            3
        );
        assert_eq!(crate::pool::wait_bucket(std::time::Duration::ZERO), 0);
        assert_eq!(
            crate::pool::wait_bucket(std::time::Duration::from_secs(60)),
            WAIT_BUCKETS - 1
        );
        counts[WAIT_BUCKETS - 1] = 100;
        assert_eq!(quantile(&counts, 0.99), Some(u64::MAX));
    }
}
