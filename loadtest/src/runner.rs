//! Drives one run: preflight, optional setup, dispatch of invocations
//! (open loop from the arrival schedule, or closed-loop workers), the live
//! progress bar, the hard deadline, and the final report.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::RngExt;
use tokio::task::JoinSet;
use tokio::time::sleep_until;

use crate::arrival::Arrivals;
use crate::config::{Model, Profile, RunOptions};
use crate::db::{connect_admin, parse_config, redact_url};
use crate::invocation::{invoke, Shared};
use crate::recorder::Recorder;
use crate::report::{fmt_ms, Report};
use crate::retry::full_message;
use crate::workload::{check_ready, setup_schema, WorkContext};
use crate::LoadtestError;

const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Create the tables/rows the workloads need on `url` (idempotent).
pub async fn setup(url: &str, rows: i64) -> Result<(), LoadtestError> {
    let client = connect_admin(url, ADMIN_TIMEOUT).await?;
    setup_schema(&client, rows)
        .await
        .map_err(|e| LoadtestError::Setup {
            target: redact_url(url),
            reason: full_message(&e),
        })
}

/// A fresh run id: time-based and random, so rows of different runs (and
/// of both halves of a comparison) never mix.
pub fn new_run_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("lt{ms}-{:06x}", rand::rng().random::<u32>() & 0xff_ffff)
}

/// Run the load described by `opts` and return its report (verified when
/// the workload writes and `opts.verify` is set).
pub async fn run(opts: &RunOptions) -> Result<Report, LoadtestError> {
    opts.validate()?;
    let pg = parse_config(&opts.url)?;
    if opts.setup {
        setup(opts.verify_url(), opts.rows).await?;
    }
    // Preflight: fail fast with a clear message on a wrong URL, password or
    // missing schema instead of reporting thousands of identical failures.
    let probe = connect_admin(&opts.url, ADMIN_TIMEOUT).await?;
    let max_account_id = check_ready(&probe, &opts.workload)
        .await
        .map_err(|reason| LoadtestError::NotReady {
            target: redact_url(&opts.url),
            reason,
        })?;
    drop(probe);

    let run_id = opts.run_id.clone().unwrap_or_else(new_run_id);
    let work = WorkContext {
        run_id: run_id.clone(),
        workload: opts.workload.clone(),
        mode: opts.query_mode,
        max_account_id,
    };
    let arrivals = Arrivals::new(&opts.profile);
    let max_concurrency = match opts.profile {
        // Closed loop: the workers are the concurrency.
        Profile::Closed { workers, .. } => workers,
        _ => opts.max_concurrency,
    };
    // Pre-warming happens before t0 and is not part of the measurement, so
    // it runs against a scratch recorder replaced by the real one at t0.
    let scratch = Arc::new(Recorder::new(Instant::now()));
    let mut shared = Shared::new(
        pg,
        work,
        opts.model.clone(),
        opts.retry.clone(),
        opts.invocation_timeout,
        max_concurrency,
        scratch,
    );
    if let Model::Warm { prewarm, .. } = opts.model {
        shared.prewarm(prewarm.min(max_concurrency)).await;
    }

    let t0 = Instant::now();
    let recorder = Arc::new(Recorder::new(t0));
    shared.recorder = recorder.clone();
    let shared = Arc::new(shared);

    let span = match (&arrivals, &opts.profile) {
        (Some(a), _) => a.span(),
        (None, Profile::Closed { duration, .. }) => *duration,
        (None, _) => Duration::ZERO,
    };
    let deadline_after = opts
        .deadline
        .unwrap_or(span + opts.invocation_timeout * 2 + Duration::from_secs(10));
    let deadline = tokio::time::Instant::from_std(t0 + deadline_after);

    let planned = arrivals.as_ref().map(|a| a.total());
    let bar = progress_bar(opts, planned);
    let ticker = {
        let bar = bar.clone();
        let rec = recorder.clone();
        tokio::spawn(async move {
            loop {
                let l = rec.live();
                bar.set_position(l.done);
                bar.set_message(format!(
                    "{}/s ok, p99 {} ms, {} failed, {} retries",
                    l.rate,
                    l.p99_ms.map_or("-".into(), fmt_ms),
                    l.failed,
                    l.retries
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let mut tasks = JoinSet::new();
    match arrivals {
        Some(arrivals) => {
            dispatch_open(opts, &shared, &recorder, arrivals, t0, deadline, &mut tasks).await
        }
        None => dispatch_closed(opts, &shared, &recorder, t0, &mut tasks),
    }
    // Wait for everything in flight, but never past the hard deadline.
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = sleep_until(deadline) => {
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
    let elapsed = t0.elapsed();
    ticker.abort();
    let aborted = recorder.close_unfinished();
    if aborted > 0 {
        tracing::warn!("{aborted} invocations cut off by the hard deadline");
    }
    bar.finish_and_clear();
    shared.shutdown();

    let mut report = recorder.report(elapsed);
    report.label = opts.label.clone();
    report.target = redact_url(&opts.url);
    report.run_id = run_id;
    report.profile = opts.profile.describe();
    report.model = match &opts.model {
        Model::Cold => "cold".into(),
        Model::Warm { prewarm, max_uses } => format!(
            "warm ({prewarm} prewarmed, {} containers used, max uses {})",
            shared.containers_created(),
            if *max_uses == 0 {
                "unlimited".into()
            } else {
                max_uses.to_string()
            }
        ),
    };
    report.workload = opts.workload.describe();
    if opts.verify && opts.workload.writes() {
        let v = match crate::verify::verify(opts.verify_url(), &report).await {
            Ok(v) => v,
            Err(e) => crate::report::Verification {
                error: Some(e.to_string()),
                ..Default::default()
            },
        };
        report.set_verification(v);
    }
    Ok(report)
}

fn progress_bar(opts: &RunOptions, planned: Option<u64>) -> ProgressBar {
    if !opts.progress || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(planned, ProgressDrawTarget::hidden());
    }
    // Create the bar on its final target: switching targets later leaves
    // a stale first frame on the terminal.
    let bar = ProgressBar::with_draw_target(planned, ProgressDrawTarget::stderr_with_hz(5));
    let template = if planned.is_some() {
        "{spinner} {prefix} {elapsed:>4} [{bar:30}] {pos}/{len} {msg}"
    } else {
        "{spinner} {prefix} {elapsed:>4} {pos} done {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(opts.label.clone());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Start each invocation at its intended time, regardless of how the
/// previous ones are doing. If the dispatcher itself falls behind (a big
/// burst), invocations start late but keep their intended time, so the
/// lateness shows up in latency.
async fn dispatch_open(
    opts: &RunOptions,
    shared: &Arc<Shared>,
    recorder: &Arc<Recorder>,
    arrivals: Arrivals,
    t0: Instant,
    deadline: tokio::time::Instant,
    tasks: &mut JoinSet<()>,
) {
    let stop = stop_signal(opts.stop_on_ctrl_c);
    tokio::pin!(stop);
    for (seq, offset) in arrivals.enumerate() {
        let at = t0 + offset;
        tokio::select! {
            _ = sleep_until(tokio::time::Instant::from_std(at)) => {}
            _ = sleep_until(deadline) => return,
            _ = &mut stop => return,
        }
        recorder.dispatched();
        tasks.spawn(invoke(shared.clone(), seq as u64, at));
        // Reap finished tasks so a long run does not accumulate them.
        while tasks.try_join_next().is_some() {}
    }
}

/// Closed loop: `workers` tasks each run invocations back to back; the
/// intended start is the actual start (there is no schedule to fall
/// behind), as in pgbench.
fn dispatch_closed(
    opts: &RunOptions,
    shared: &Arc<Shared>,
    recorder: &Arc<Recorder>,
    t0: Instant,
    tasks: &mut JoinSet<()>,
) {
    let Profile::Closed {
        workers,
        duration,
        max_invocations,
    } = opts.profile
    else {
        return;
    };
    let end = t0 + duration;
    let next = Arc::new(AtomicU64::new(0));
    let limit = max_invocations.unwrap_or(u64::MAX);
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if opts.stop_on_ctrl_c {
        let stopped = stopped.clone();
        tokio::spawn(async move {
            stop_signal(true).await;
            stopped.store(true, Ordering::Relaxed);
        });
    }
    for _ in 0..workers {
        let (shared, recorder, next, stopped) = (
            shared.clone(),
            recorder.clone(),
            next.clone(),
            stopped.clone(),
        );
        tasks.spawn(async move {
            while Instant::now() < end && !stopped.load(Ordering::Relaxed) {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= limit {
                    break;
                }
                recorder.dispatched();
                invoke(shared.clone(), seq, Instant::now()).await;
            }
        });
    }
}

/// Resolves on the first Ctrl-C (when enabled). Once a handler is
/// installed the default "die on SIGINT" is gone, so a second Ctrl-C during
/// the drain exits at once.
async fn stop_signal(enabled: bool) {
    if enabled && tokio::signal::ctrl_c().await.is_ok() {
        eprintln!("stopping: finishing in-flight invocations (Ctrl-C again to quit now)");
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        });
        return;
    }
    std::future::pending::<()>().await
}
