//! Run configuration: what to drive, how, and for how long.
//!
//! Owns [`RunOptions`] and the enums it is made of. Everything here is plain
//! data that can be built in code (tests, the proxy's integration tests) as
//! well as from the command line (`cli.rs` converts into it), plus the small
//! parsing/redaction helpers both sides share.

use std::time::Duration;

use crate::db::redact_url;
pub use crate::retry::RetryBudget;
use crate::LoadtestError;

/// How invocations arrive.
#[derive(Debug, Clone, PartialEq)]
pub enum Profile {
    /// Open loop: `rate` invocations per second for `duration`.
    Constant { rate: f64, duration: Duration },
    /// Open loop: the rate moves linearly from `from` to `to` over `duration`.
    Ramp {
        from: f64,
        to: f64,
        duration: Duration,
    },
    /// Open loop: `size` invocations released evenly within `window`
    /// (zero = all at once), repeated `bursts` times, `interval` apart —
    /// an SQS batch fan-out.
    Burst {
        size: u64,
        window: Duration,
        bursts: u32,
        interval: Duration,
    },
    /// Closed loop (like pgbench): `workers` run invocations back to back
    /// until `duration` elapses or `max_invocations` have started.
    Closed {
        workers: usize,
        duration: Duration,
        max_invocations: Option<u64>,
    },
}

impl Profile {
    /// Short human description, used in reports.
    pub fn describe(&self) -> String {
        match self {
            Profile::Constant { rate, duration } => {
                format!("constant {rate}/s for {}s", duration.as_secs_f64())
            }
            Profile::Ramp { from, to, duration } => {
                format!("ramp {from}/s -> {to}/s over {}s", duration.as_secs_f64())
            }
            Profile::Burst {
                size,
                window,
                bursts,
                interval,
            } => format!(
                "burst {size} within {}ms x{bursts} every {}s",
                window.as_millis(),
                interval.as_secs_f64()
            ),
            Profile::Closed {
                workers, duration, ..
            } => format!("closed {workers} workers for {}s", duration.as_secs_f64()),
        }
    }
}

/// How an invocation gets its database connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Model {
    /// Every invocation opens a new connection and closes it at the end.
    Cold,
    /// A population of function containers, each keeping one connection
    /// across invocations and sitting idle ("frozen") in between.
    Warm {
        /// Containers created and connected before the run starts.
        prewarm: usize,
        /// A container is retired (connection closed) after this many
        /// invocations, like Lambda recycling environments; 0 = never.
        max_uses: u64,
    },
}

/// What SQL an invocation runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// `SELECT` one account row by primary key.
    PointRead,
    /// `BEGIN; INSERT` a row keyed by the invocation id`; COMMIT`.
    Write,
    /// Each invocation is a write with probability `write_ratio`, else a read.
    Mixed { write_ratio: f64 },
    /// `BEGIN; SELECT pg_sleep(sleep); COMMIT`: holds a transaction open.
    Slow { sleep: Duration },
    /// Custom SQL run with the simple query protocol; `{{invocation_id}}`,
    /// `{{run_id}}`, `{{seq}}` and `{{random_id}}` are substituted.
    Custom { sql: String },
}

impl Workload {
    /// Whether this workload writes rows that must be verified afterwards.
    pub fn writes(&self) -> bool {
        match self {
            Workload::Write => true,
            Workload::Mixed { write_ratio } => *write_ratio > 0.0,
            _ => false,
        }
    }

    /// Whether this workload reads the accounts table (needs its rows).
    pub fn reads_accounts(&self) -> bool {
        match self {
            Workload::PointRead => true,
            Workload::Mixed { write_ratio } => *write_ratio < 1.0,
            _ => false,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Workload::PointRead => "point-read".into(),
            Workload::Write => "write".into(),
            Workload::Mixed { write_ratio } => {
                format!("mixed ({:.0}% writes)", write_ratio * 100.0)
            }
            Workload::Slow { sleep } => format!("slow (pg_sleep {}ms)", sleep.as_millis()),
            Workload::Custom { .. } => "custom sql".into(),
        }
    }
}

/// Which protocol flavour queries use. Matters through a transaction pooler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QueryMode {
    /// Extended protocol with the unnamed statement (what node-postgres and
    /// most serverless drivers send for parameterised queries).
    #[default]
    Unnamed,
    /// Named prepared statements (tokio-postgres' default: Parse/Bind/Close).
    Prepared,
    /// Simple query protocol with values inlined as literals.
    Simple,
}

/// Retry behaviour of a well-written function.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per invocation including the first; 1 = never retry.
    pub max_attempts: u32,
    /// Backoff base: attempt n waits uniform(0, min(cap, base * 2^(n-1))).
    pub base: Duration,
    pub cap: Duration,
    /// Optional shared token bucket; each retry takes one token.
    pub budget: Option<RetryBudget>,
    /// Whether a retry waits at least the delay the error's HINT suggests (Sluice's).
    pub honour_hint: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(50),
            cap: Duration::from_secs(2),
            budget: None,
            honour_hint: true,
        }
    }
}

/// Everything one run needs. Build with `RunOptions::new(url)` and adjust
/// the public fields, or `RunOptions { url, ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Target: a `postgres://` URL or `key=value` connection string.
    pub url: String,
    /// Direct URL used for `setup` and write verification; `None` = `url`.
    pub verify_url: Option<String>,
    /// Name of the run in reports ("direct", "proxy", ...).
    pub label: String,
    pub profile: Profile,
    pub model: Model,
    pub workload: Workload,
    pub query_mode: QueryMode,
    pub retry: RetryPolicy,
    /// Per-invocation timeout, like a Lambda timeout (covers retries).
    pub invocation_timeout: Duration,
    /// Max invocations running at once (Lambda's concurrency limit); in the
    /// warm model also the max number of containers. Arrivals beyond it wait
    /// up to `invocation_timeout` for a slot, then fail as `throttled`.
    pub max_concurrency: usize,
    /// Hard overall deadline; `None` = schedule length + 2 * timeout + 10 s.
    pub deadline: Option<Duration>,
    /// Create the tables/rows the workload needs (idempotent) first.
    pub setup: bool,
    /// Rows in the accounts table created by setup.
    pub rows: i64,
    /// Verify writes at the end of `run` (when the workload writes).
    pub verify: bool,
    /// Draw a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
    /// Stop dispatching on Ctrl-C and report what ran (CLI only).
    pub stop_on_ctrl_c: bool,
    /// Run id tagging written rows; `None` = generated. `[A-Za-z0-9_-]` only.
    pub run_id: Option<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            verify_url: None,
            label: "run".into(),
            profile: Profile::Constant {
                rate: 50.0,
                duration: Duration::from_secs(10),
            },
            model: Model::Cold,
            workload: Workload::PointRead,
            query_mode: QueryMode::Unnamed,
            retry: RetryPolicy::default(),
            invocation_timeout: Duration::from_secs(10),
            max_concurrency: 1000,
            deadline: None,
            setup: false,
            rows: 10_000,
            verify: true,
            progress: false,
            stop_on_ctrl_c: false,
            run_id: None,
        }
    }
}

impl RunOptions {
    pub fn new(url: impl Into<String>) -> Self {
        RunOptions {
            url: url.into(),
            ..Default::default()
        }
    }

    pub fn with_profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }

    pub fn with_model(mut self, model: Model) -> Self {
        self.model = model;
        self
    }

    pub fn with_workload(mut self, workload: Workload) -> Self {
        self.workload = workload;
        self
    }

    /// The URL used for setup and verification.
    pub fn verify_url(&self) -> &str {
        self.verify_url.as_deref().unwrap_or(&self.url)
    }

    /// Reject combinations that cannot run, with a message for a person.
    pub fn validate(&self) -> Result<(), LoadtestError> {
        let bad = |m: String| Err(LoadtestError::Config(m));
        let positive = |x: f64| x.is_finite() && x > 0.0;
        match &self.profile {
            Profile::Constant { rate, duration } => {
                if !positive(*rate) || duration.is_zero() {
                    return bad("constant profile needs --rate > 0 and --duration > 0".into());
                }
            }
            Profile::Ramp { from, to, duration } => {
                let ok = from.is_finite() && to.is_finite() && *from >= 0.0 && *to >= 0.0;
                if !ok || from + to <= 0.0 || duration.is_zero() {
                    return bad(
                        "ramp profile needs rates >= 0 (not both 0) and --duration > 0".into(),
                    );
                }
            }
            Profile::Burst { size, bursts, .. } => {
                if *size == 0 || *bursts == 0 {
                    return bad("burst profile needs --burst-size > 0 and --bursts > 0".into());
                }
            }
            Profile::Closed {
                workers, duration, ..
            } => {
                if *workers == 0 || duration.is_zero() {
                    return bad("closed profile needs --workers > 0 and --duration > 0".into());
                }
            }
        }
        if let Workload::Mixed { write_ratio } = self.workload {
            if !(0.0..=1.0).contains(&write_ratio) {
                return bad(format!(
                    "--write-ratio must be within 0..=1, got {write_ratio}"
                ));
            }
        }
        if self.retry.max_attempts == 0 {
            return bad("--max-attempts must be at least 1".into());
        }
        if self.max_concurrency == 0 {
            return bad("--max-concurrency must be at least 1".into());
        }
        if self.invocation_timeout.is_zero() {
            return bad("--timeout must be > 0".into());
        }
        if self.rows < 1 {
            return bad("--rows must be at least 1".into());
        }
        if let Some(id) = &self.run_id {
            let ok = !id.is_empty()
                && id.len() <= 100
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return bad(format!(
                    "--run-id must be 1-100 chars of [A-Za-z0-9_-], got {id:?}"
                ));
            }
        }
        for url in [Some(self.url.as_str()), self.verify_url.as_deref()]
            .into_iter()
            .flatten()
        {
            url.parse::<tokio_postgres::Config>().map_err(|e| {
                LoadtestError::Config(format!(
                    "invalid connection URL {}: {}",
                    redact_url(url),
                    crate::retry::full_message(&e)
                ))
            })?;
        }
        Ok(())
    }
}

/// Parse `1.5`, `1.5s`, `250ms`, `2m` into a duration (bare numbers are seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (use e.g. 30, 30s, 250ms, 2m)"))?;
    if !v.is_finite() || v < 0.0 || v * mult > 86_400.0 * 7.0 {
        return Err(format!("duration out of range: {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn validation_catches_bad_values() {
        let mut o = RunOptions::new("postgres://u@127.0.0.1:1/db");
        assert!(o.validate().is_ok());
        o.workload = Workload::Mixed { write_ratio: 1.5 };
        assert!(o.validate().is_err());
        o.workload = Workload::Write;
        o.url = "postgres://[bad".into();
        assert!(o.validate().is_err());
        o.url = "postgres://u@127.0.0.1:1/db".into();
        o.run_id = Some("a b".into());
        assert!(o.validate().is_err());
    }
}
