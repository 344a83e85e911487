//! `sluice-loadtest`: replay a serverless function fan-out against
//! PostgreSQL, directly or through Sluice, and report latency, throughput,
//! errors, retries and — for writes — whether any acknowledged data was lost.
//!
//! The library is what the binary runs, and what integration tests call:
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice_loadtest::LoadtestError> {
//! use std::time::Duration;
//! use sluice_loadtest::{run, Model, Profile, RunOptions, Workload};
//!
//! let mut opts = RunOptions::new("postgres://postgres@127.0.0.1:6432/postgres")
//!     .with_profile(Profile::Burst { size: 500, window: Duration::from_secs(1),
//!                                    bursts: 1, interval: Duration::ZERO })
//!     .with_model(Model::Cold)
//!     .with_workload(Workload::Write);
//! opts.verify_url = Some("postgres://postgres@127.0.0.1:5432/postgres".into());
//! opts.setup = true;
//! let report = run(&opts).await?;
//! assert_eq!(report.counts.lost, 0);
//! # Ok(()) }
//! ```
//!
//! Modules: `config` (options), `cli` (command line) and `app` (what the
//! binary does with it), `arrival` (intended start times), `invocation`
//! (cold/warm containers, retries, timeout), `workload` (SQL and schema),
//! `retry` (classification, backoff, budget), `recorder` (measurement during
//! a run), `report` (the result), `table` (text output), `verify` (lost and
//! duplicated writes), `chart` (SVG), `runner` (orchestration), `db`
//! (connections).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod app;
pub mod arrival;
pub mod chart;
pub mod cli;
pub mod config;
pub mod db;
pub mod invocation;
pub mod recorder;
pub mod report;
pub mod retry;
pub mod runner;
pub mod table;
pub mod verify;
pub mod workload;

pub use config::{Model, Profile, QueryMode, RetryBudget, RetryPolicy, RunOptions, Workload};
pub use report::{Counts, Percentiles, Report, SecondSample, Verification};
pub use runner::{new_run_id, run, setup};
pub use verify::{plant_duplicate_writes, plant_lost_writes, verify, verify_writes};

use serde::{Deserialize, Serialize};

/// Errors that stop a run before or after the load (never during it:
/// failures of individual invocations are data in the [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("{target} is not ready: {reason}")]
    NotReady { target: String, reason: String },
    #[error("setup failed on {target}: {reason}")]
    Setup { target: String, reason: String },
    #[error("verification failed on {target}: {reason}")]
    Verify { target: String, reason: String },
    #[error("{0}")]
    Output(String),
}

/// Result of `--compare`: the same profile run directly and through the
/// proxy, one after the other.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub direct: Report,
    pub proxy: Report,
}

/// Run `opts` against `direct_url`, pause, then against `proxy_url`.
/// Setup (if asked) runs once; both runs verify through `opts.verify_url`,
/// or `direct_url` when unset.
pub async fn compare(
    opts: &RunOptions,
    direct_url: &str,
    proxy_url: &str,
    pause: std::time::Duration,
) -> Result<Comparison, LoadtestError> {
    let mut direct_opts = opts.clone();
    direct_opts.url = direct_url.to_string();
    direct_opts.label = "direct".into();
    direct_opts.run_id = opts.run_id.as_ref().map(|id| format!("{id}-direct"));
    if direct_opts.verify_url.is_none() {
        direct_opts.verify_url = Some(direct_url.to_string());
    }
    let mut proxy_opts = direct_opts.clone();
    proxy_opts.url = proxy_url.to_string();
    proxy_opts.label = "proxy".into();
    proxy_opts.run_id = opts.run_id.as_ref().map(|id| format!("{id}-proxy"));
    proxy_opts.setup = false;

    // Check the proxy answers before spending the direct run's time.
    drop(db::connect_admin(proxy_url, std::time::Duration::from_secs(15)).await?);
    let direct = run(&direct_opts).await?;
    tokio::time::sleep(pause).await;
    let proxy = run(&proxy_opts).await?;
    Ok(Comparison { direct, proxy })
}
