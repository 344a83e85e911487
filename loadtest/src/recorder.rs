//! Collects outcomes while a run is in flight.
//!
//! One short mutex guards everything: each invocation records once (plus
//! connects and retries), far below contention levels at the rates one
//! machine can drive. Every dispatched invocation ends in exactly one of
//! succeeded/failed; those cut off by the hard deadline or a stop are
//! recorded as failed `aborted`, so `succeeded + failed == invocations`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::report::{Counts, Percentiles, Report, SecondSample};

/// How one invocation ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Succeeded,
    Failed { key: String, detail: String },
}

struct Second {
    succeeded: u64,
    failed: u64,
    latency: Histogram<u64>,
}

struct Inner {
    counts: Counts,
    latency: Histogram<u64>,
    connect: Histogram<u64>,
    seconds: Vec<Second>,
    examples: BTreeMap<String, String>,
    acked_writes: Vec<u64>,
    last_done: Duration,
}

/// Thread-safe collector for one run.
pub struct Recorder {
    t0: Instant,
    inner: Mutex<Inner>,
}

fn histogram<const SIGFIG: u8>() -> Histogram<u64> {
    // hdrhistogram refuses only more than 5 significant figures: ruled out at compile time.
    const { assert!(SIGFIG <= 5) };
    // Cannot fail (see the assertion).
    #[allow(clippy::expect_used)]
    let mut h = Histogram::new(SIGFIG).expect("SIGFIG <= 5");
    // Auto-resize: no upper bound to guess, memory follows the max seen.
    h.auto(true);
    h
}

impl Recorder {
    pub fn new(t0: Instant) -> Recorder {
        Recorder {
            t0,
            inner: Mutex::new(Inner {
                counts: Counts::default(),
                latency: histogram::<3>(),
                connect: histogram::<3>(),
                seconds: Vec::new(),
                examples: BTreeMap::new(),
                acked_writes: Vec::new(),
                last_done: Duration::ZERO,
            }),
        }
    }

    pub fn t0(&self) -> Instant {
        self.t0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Counters stay meaningful even if a task panicked while holding it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dispatched(&self) {
        self.lock().counts.invocations += 1;
    }

    pub fn connected(&self, took: Duration) {
        let mut g = self.lock();
        g.counts.connects += 1;
        let _ = g.connect.record(micros(took));
    }

    pub fn retried(&self, key: &str, detail: &str) {
        let mut g = self.lock();
        g.counts.retries += 1;
        *g.counts
            .retries_by_error
            .entry(key.to_string())
            .or_default() += 1;
        if !g.examples.contains_key(key) {
            g.examples.insert(key.to_string(), detail.to_string());
        }
    }

    pub fn retry_denied(&self) {
        self.lock().counts.retries_denied += 1;
    }

    pub fn retry_hinted(&self) {
        self.lock().counts.retries_hinted += 1;
    }

    /// Record the end of an invocation that was intended to start at
    /// `intended`; `write_seq` is set for write invocations.
    pub fn finished(&self, intended: Instant, outcome: Outcome, write_seq: Option<u64>) {
        let now = Instant::now();
        let latency = now.saturating_duration_since(intended);
        let since = now.saturating_duration_since(self.t0);
        let sec = since.as_secs() as usize;
        let mut g = self.lock();
        g.last_done = g.last_done.max(since);
        while g.seconds.len() <= sec {
            g.seconds.push(Second {
                succeeded: 0,
                failed: 0,
                latency: histogram::<2>(),
            });
        }
        match outcome {
            Outcome::Succeeded => {
                g.counts.succeeded += 1;
                let _ = g.latency.record(micros(latency));
                let s = &mut g.seconds[sec];
                s.succeeded += 1;
                let _ = s.latency.record(micros(latency));
                if let Some(seq) = write_seq {
                    g.acked_writes.push(seq);
                }
            }
            Outcome::Failed { key, detail } => {
                g.counts.failed += 1;
                g.seconds[sec].failed += 1;
                if !g.examples.contains_key(&key) {
                    g.examples.insert(key.clone(), detail);
                }
                *g.counts.by_error.entry(key).or_default() += 1;
            }
        }
    }

    /// Count every dispatched invocation that never reported as failed
    /// `aborted` (cut off by the hard deadline or cancelled).
    pub fn close_unfinished(&self) -> u64 {
        let mut g = self.lock();
        let done = g.counts.succeeded + g.counts.failed;
        let missing = g.counts.invocations.saturating_sub(done);
        if missing > 0 {
            g.counts.failed += missing;
            *g.counts.by_error.entry("aborted".into()).or_default() += missing;
            g.examples
                .entry("aborted".into())
                .or_insert_with(|| "cut off by the run's hard deadline or stop".into());
        }
        missing
    }

    /// A live view for the progress bar: (done, succeeded, failed,
    /// successes in the last full second, p99 ms of the last full second).
    pub fn live(&self) -> Live {
        let g = self.lock();
        let cur = self.t0.elapsed().as_secs() as usize;
        let last = cur.checked_sub(1).and_then(|i| g.seconds.get(i));
        Live {
            done: g.counts.succeeded + g.counts.failed,
            failed: g.counts.failed,
            retries: g.counts.retries,
            rate: last.map_or(0, |s| s.succeeded),
            p99_ms: last
                .filter(|s| !s.latency.is_empty())
                .map(|s| s.latency.value_at_quantile(0.99) as f64 / 1000.0),
        }
    }

    /// Build the report. `elapsed` is the run's wall time from t0.
    pub fn report(&self, elapsed: Duration) -> Report {
        let g = self.lock();
        let elapsed_secs = elapsed.as_secs_f64().max(g.last_done.as_secs_f64());
        let timeline = g
            .seconds
            .iter()
            .enumerate()
            .map(|(i, s)| SecondSample {
                second: i as u64,
                succeeded: s.succeeded,
                failed: s.failed,
                p99_ms: (!s.latency.is_empty())
                    .then(|| s.latency.value_at_quantile(0.99) as f64 / 1000.0),
            })
            .collect();
        Report {
            elapsed_secs,
            counts: g.counts.clone(),
            latency_ms: Percentiles::from_micros(&g.latency),
            connect_ms: Percentiles::from_micros(&g.connect),
            throughput: if elapsed_secs > 0.0 {
                g.counts.succeeded as f64 / elapsed_secs
            } else {
                0.0
            },
            error_examples: g.examples.clone(),
            timeline,
            acked_writes: g.acked_writes.clone(),
            ..Report::default()
        }
    }
}

/// Snapshot for the progress bar.
#[derive(Debug, Clone, Copy)]
pub struct Live {
    pub done: u64,
    pub failed: u64,
    pub retries: u64,
    pub rate: u64,
    pub p99_ms: Option<f64>,
}

fn micros(d: Duration) -> u64 {
    (d.as_micros().min(u128::from(u64::MAX)) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_always_add_up() {
        let t0 = Instant::now();
        let r = Recorder::new(t0);
        for i in 0..10u64 {
            r.dispatched();
            let outcome = if i % 3 == 0 {
                Outcome::Failed {
                    key: "53300".into(),
                    detail: "too many".into(),
                }
            } else {
                Outcome::Succeeded
            };
            if i < 8 {
                r.finished(t0, outcome, Some(i));
            }
        }
        r.retried("53300", "x");
        assert_eq!(r.close_unfinished(), 2);
        let rep = r.report(Duration::from_secs(2));
        let c = &rep.counts;
        assert_eq!(c.invocations, 10);
        assert_eq!(c.succeeded + c.failed, c.invocations);
        assert_eq!(c.by_error.values().sum::<u64>(), c.failed);
        assert_eq!(c.by_error["aborted"], 2);
        assert_eq!(c.by_error["53300"], 3);
        assert_eq!(c.retries, 1);
        assert_eq!(rep.acked_writes.len() as u64, c.succeeded);
        let tl: u64 = rep.timeline.iter().map(|s| s.succeeded + s.failed).sum();
        assert_eq!(tl, 8);
        assert!((rep.throughput - c.succeeded as f64 / rep.elapsed_secs).abs() < 1e-9);
    }
}
