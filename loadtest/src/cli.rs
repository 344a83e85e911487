//! Command line definition (clap derive) and its conversion into
//! [`RunOptions`]. What the binary then does lives in `app.rs`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};

use crate::config::{
    parse_duration, Model, Profile, QueryMode, RetryBudget, RetryPolicy, RunOptions, Workload,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProfileArg {
    Constant,
    Ramp,
    Burst,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelArg {
    Cold,
    Warm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadArg {
    PointRead,
    Write,
    Mixed,
    Slow,
}

/// Replay a serverless (Lambda-style) fan-out against PostgreSQL, directly
/// or through Sluice, and report latency, throughput, errors, retries and
/// lost writes.
#[derive(Debug, Parser)]
#[command(name = "sluice-loadtest", version, max_term_width = 100)]
#[command(
    after_help = "Exit status: 0 ok, 1 error, 2 bad arguments, 3 lost/duplicated writes, \
4 error rate above --max-error-rate.\n\nExamples:\n  \
sluice-loadtest --setup --workload write --profile burst --burst-size 2000 postgres://app@127.0.0.1:6432/app\n  \
sluice-loadtest --compare postgres://app@db:5432/app postgres://app@127.0.0.1:6432/app --model warm --rate 200"
)]
pub struct Cli {
    /// Target connection URL (postgres://user:pass@host:port/db or key=value)
    #[arg(value_name = "URL", conflicts_with = "compare")]
    pub target: Option<String>,
    /// Target connection URL (alternative to the positional URL; ignored with --compare)
    #[arg(long, env = "SLUICE_LOADTEST_URL", hide_env_values = true)]
    pub url: Option<String>,
    /// Run the same profile directly and through the proxy, side by side
    #[arg(long, num_args = 2, value_names = ["DIRECT_URL", "PROXY_URL"])]
    pub compare: Option<Vec<String>>,
    /// Pause between the two runs of --compare
    #[arg(long, default_value = "5s", value_parser = parse_duration, env = "SLUICE_LOADTEST_COMPARE_PAUSE")]
    pub compare_pause: Duration,
    /// Direct URL for --setup and write verification [default: the target, or DIRECT_URL]
    #[arg(long, env = "SLUICE_LOADTEST_VERIFY_URL", hide_env_values = true)]
    pub verify_url: Option<String>,

    /// Arrival profile (constant, ramp and burst are open loop)
    #[arg(
        long,
        value_enum,
        default_value = "constant",
        env = "SLUICE_LOADTEST_PROFILE",
        help_heading = "Load"
    )]
    pub profile: ProfileArg,
    /// Invocations per second (constant), or the start rate (ramp)
    #[arg(
        long,
        default_value_t = 50.0,
        env = "SLUICE_LOADTEST_RATE",
        help_heading = "Load"
    )]
    pub rate: f64,
    /// End rate of a ramp
    #[arg(long, env = "SLUICE_LOADTEST_RATE_END", help_heading = "Load")]
    pub rate_end: Option<f64>,
    /// Length of a constant/ramp/closed run (30, 30s, 500ms, 2m)
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "SLUICE_LOADTEST_DURATION", help_heading = "Load")]
    pub duration: Duration,
    /// Invocations per burst
    #[arg(
        long,
        default_value_t = 1000,
        env = "SLUICE_LOADTEST_BURST_SIZE",
        help_heading = "Load"
    )]
    pub burst_size: u64,
    /// Window a burst is spread over (0 = all at once)
    #[arg(long, default_value = "1s", value_parser = parse_duration, env = "SLUICE_LOADTEST_BURST_WINDOW", help_heading = "Load")]
    pub burst_window: Duration,
    /// Number of bursts
    #[arg(
        long,
        default_value_t = 1,
        env = "SLUICE_LOADTEST_BURSTS",
        help_heading = "Load"
    )]
    pub bursts: u32,
    /// Time between burst starts
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "SLUICE_LOADTEST_BURST_INTERVAL", help_heading = "Load")]
    pub burst_interval: Duration,
    /// Closed loop: workers running invocations back to back
    #[arg(
        long,
        default_value_t = 10,
        env = "SLUICE_LOADTEST_WORKERS",
        help_heading = "Load"
    )]
    pub workers: usize,
    /// Closed loop: stop after this many invocations
    #[arg(long, env = "SLUICE_LOADTEST_COUNT", help_heading = "Load")]
    pub count: Option<u64>,
    /// Max invocations running at once (Lambda concurrency limit; max warm containers)
    #[arg(
        long,
        alias = "max-containers",
        default_value_t = 1000,
        env = "SLUICE_LOADTEST_MAX_CONCURRENCY",
        help_heading = "Load"
    )]
    pub max_concurrency: usize,
    /// Hard overall deadline [default: schedule + 2 x timeout + 10s]
    #[arg(long, value_parser = parse_duration, env = "SLUICE_LOADTEST_DEADLINE", help_heading = "Load")]
    pub deadline: Option<Duration>,

    /// cold: a new connection per invocation; warm: containers keep theirs
    #[arg(
        long,
        value_enum,
        default_value = "cold",
        env = "SLUICE_LOADTEST_MODEL",
        help_heading = "Functions"
    )]
    pub model: ModelArg,
    /// Warm: containers created and connected before the run
    #[arg(
        long,
        default_value_t = 0,
        env = "SLUICE_LOADTEST_CONTAINERS",
        help_heading = "Functions"
    )]
    pub containers: usize,
    /// Warm: retire a container after this many invocations (0 = never)
    #[arg(
        long,
        default_value_t = 0,
        env = "SLUICE_LOADTEST_CONTAINER_MAX_USES",
        help_heading = "Functions"
    )]
    pub container_max_uses: u64,
    /// Invocation timeout (like a Lambda timeout; covers retries)
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "SLUICE_LOADTEST_TIMEOUT", help_heading = "Functions")]
    pub timeout: Duration,
    /// Attempts per invocation including the first (1 = no retries)
    #[arg(
        long,
        default_value_t = 5,
        env = "SLUICE_LOADTEST_MAX_ATTEMPTS",
        help_heading = "Functions"
    )]
    pub max_attempts: u32,
    /// Backoff base (full jitter: uniform(0, min(cap, base*2^n)))
    #[arg(long, default_value = "50ms", value_parser = parse_duration, env = "SLUICE_LOADTEST_BACKOFF_BASE", help_heading = "Functions")]
    pub backoff_base: Duration,
    /// Backoff cap
    #[arg(long, default_value = "2s", value_parser = parse_duration, env = "SLUICE_LOADTEST_BACKOFF_CAP", help_heading = "Functions")]
    pub backoff_cap: Duration,
    /// Shared retry token bucket size (0 = unlimited retries within --max-attempts)
    #[arg(
        long,
        default_value_t = 0.0,
        env = "SLUICE_LOADTEST_RETRY_BUDGET",
        help_heading = "Functions"
    )]
    pub retry_budget: f64,
    /// Retry tokens refilled per second [default: budget / 10]
    #[arg(long, env = "SLUICE_LOADTEST_RETRY_REFILL", help_heading = "Functions")]
    pub retry_refill: Option<f64>,
    /// Retry after the backoff only, ignoring the retry delay in an error's HINT (by default a
    /// retry waits at least that long, plus jitter)
    #[arg(
        long,
        env = "SLUICE_LOADTEST_IGNORE_RETRY_HINT",
        help_heading = "Functions"
    )]
    pub ignore_retry_hint: bool,

    /// What each invocation runs
    #[arg(
        long,
        value_enum,
        default_value = "point-read",
        env = "SLUICE_LOADTEST_WORKLOAD",
        help_heading = "Workload"
    )]
    pub workload: WorkloadArg,
    /// Mixed: fraction of invocations that write
    #[arg(
        long,
        default_value_t = 0.2,
        env = "SLUICE_LOADTEST_WRITE_RATIO",
        help_heading = "Workload"
    )]
    pub write_ratio: f64,
    /// Slow: pg_sleep inside the transaction
    #[arg(long, default_value = "1s", value_parser = parse_duration, env = "SLUICE_LOADTEST_SLEEP", help_heading = "Workload")]
    pub sleep: Duration,
    /// Custom SQL file (simple protocol; {{invocation_id}} {{run_id}} {{seq}} {{random_id}})
    #[arg(
        long,
        value_name = "FILE",
        env = "SLUICE_LOADTEST_SQL",
        help_heading = "Workload"
    )]
    pub sql: Option<PathBuf>,
    /// Protocol used for queries
    #[arg(
        long,
        value_enum,
        default_value = "unnamed",
        env = "SLUICE_LOADTEST_QUERY_MODE",
        help_heading = "Workload"
    )]
    pub query_mode: QueryMode,
    /// Create the tables/rows the workload needs (idempotent), then run
    #[arg(long, help_heading = "Workload")]
    pub setup: bool,
    /// Create the tables/rows, then exit
    #[arg(long, help_heading = "Workload")]
    pub setup_only: bool,
    /// Rows in the point-read table created by --setup
    #[arg(
        long,
        default_value_t = 10_000,
        env = "SLUICE_LOADTEST_ROWS",
        help_heading = "Workload"
    )]
    pub rows: i64,
    /// Tag for written rows [default: generated]
    #[arg(long, env = "SLUICE_LOADTEST_RUN_ID", help_heading = "Workload")]
    pub run_id: Option<String>,

    /// Skip verifying writes after the run
    #[arg(long, help_heading = "Output")]
    pub no_verify: bool,
    /// Exit 0 even when writes were lost or duplicated
    #[arg(long, help_heading = "Output")]
    pub allow_loss: bool,
    /// Exit 4 when failed/invocations exceeds this fraction
    #[arg(long, env = "SLUICE_LOADTEST_MAX_ERROR_RATE", help_heading = "Output")]
    pub max_error_rate: Option<f64>,
    /// Write the full report as JSON
    #[arg(
        long,
        value_name = "FILE",
        env = "SLUICE_LOADTEST_JSON",
        help_heading = "Output"
    )]
    pub json: Option<PathBuf>,
    /// Plot throughput and p99 per second as SVG
    #[arg(
        long,
        value_name = "FILE.svg",
        env = "SLUICE_LOADTEST_CHART",
        help_heading = "Output"
    )]
    pub chart: Option<PathBuf>,
    /// No progress bar
    #[arg(long, short, help_heading = "Output")]
    pub quiet: bool,

    /// Test hook: delete N acknowledged rows before verifying
    #[arg(long, hide = true, default_value_t = 0)]
    pub plant_lost: usize,
    /// Test hook: duplicate N acknowledged rows before verifying
    #[arg(long, hide = true, default_value_t = 0)]
    pub plant_duplicates: usize,
}

impl Cli {
    /// Build the run options (the target URL is filled by the caller).
    pub fn to_options(&self) -> anyhow::Result<RunOptions> {
        let profile = match self.profile {
            ProfileArg::Constant => Profile::Constant {
                rate: self.rate,
                duration: self.duration,
            },
            ProfileArg::Ramp => Profile::Ramp {
                from: self.rate,
                to: self
                    .rate_end
                    .context("--profile ramp needs --rate-end (and --rate as the start)")?,
                duration: self.duration,
            },
            ProfileArg::Burst => Profile::Burst {
                size: self.burst_size,
                window: self.burst_window,
                bursts: self.bursts,
                interval: self.burst_interval,
            },
            ProfileArg::Closed => Profile::Closed {
                workers: self.workers,
                duration: self.duration,
                max_invocations: self.count,
            },
        };
        let model = match self.model {
            ModelArg::Cold => Model::Cold,
            ModelArg::Warm => Model::Warm {
                prewarm: self.containers,
                max_uses: self.container_max_uses,
            },
        };
        let workload = match (&self.sql, self.workload) {
            (Some(path), _) => Workload::Custom {
                sql: std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --sql file {}", path.display()))?,
            },
            (None, WorkloadArg::PointRead) => Workload::PointRead,
            (None, WorkloadArg::Write) => Workload::Write,
            (None, WorkloadArg::Mixed) => Workload::Mixed {
                write_ratio: self.write_ratio,
            },
            (None, WorkloadArg::Slow) => Workload::Slow { sleep: self.sleep },
        };
        if !(self.retry_budget.is_finite() && self.retry_budget >= 0.0) {
            bail!("--retry-budget must be >= 0");
        }
        let budget = (self.retry_budget > 0.0).then(|| RetryBudget {
            capacity: self.retry_budget,
            refill_per_sec: self
                .retry_refill
                .unwrap_or(self.retry_budget / 10.0)
                .max(0.0),
        });
        if let Some(r) = self.max_error_rate {
            if !(0.0..=1.0).contains(&r) {
                bail!("--max-error-rate is a fraction within 0..=1, got {r}");
            }
        }
        Ok(RunOptions {
            url: String::new(),
            verify_url: self.verify_url.clone(),
            label: "run".into(),
            profile,
            model,
            workload,
            query_mode: self.query_mode,
            retry: RetryPolicy {
                max_attempts: self.max_attempts,
                base: self.backoff_base,
                cap: self.backoff_cap,
                budget,
                honour_hint: !self.ignore_retry_hint,
            },
            invocation_timeout: self.timeout,
            max_concurrency: self.max_concurrency,
            deadline: self.deadline,
            setup: self.setup,
            rows: self.rows,
            verify: !self.no_verify,
            progress: !self.quiet,
            stop_on_ctrl_c: true,
            run_id: self.run_id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_profiles() {
        let cli = Cli::try_parse_from([
            "sluice-loadtest",
            "--profile",
            "burst",
            "--burst-size",
            "2000",
            "--burst-window",
            "1s",
            "--model",
            "warm",
            "--containers",
            "50",
            "postgres://u@h/db",
        ])
        .unwrap();
        let o = cli.to_options().unwrap();
        assert!(matches!(o.profile, Profile::Burst { size: 2000, .. }));
        assert_eq!(
            o.model,
            Model::Warm {
                prewarm: 50,
                max_uses: 0
            }
        );
        let ramp = Cli::try_parse_from(["x", "--profile", "ramp", "u"]).unwrap();
        assert!(ramp.to_options().is_err());
        assert!(Cli::try_parse_from(["x", "--compare", "a"]).is_err());
        assert!(Cli::try_parse_from(["x", "--compare", "a", "b", "c"]).is_err());
    }
}
