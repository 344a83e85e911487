//! The serialisable result of a run and its number formatting.
//!
//! Latency is measured from each invocation's *intended* start, so time
//! spent waiting behind a slow target counts (no coordinated omission).
//! `succeeded + failed == invocations` always holds (see `recorder.rs`).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The result of checking a write run's rows (see `verify.rs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    /// Write invocations that reported success and were checked.
    pub checked: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub unacknowledged: u64,
    /// Rows found for this run.
    pub rows: u64,
    pub lost_ids: Vec<String>,
    pub duplicated_ids: Vec<String>,
    /// Set when verification could not be carried out.
    pub error: Option<String>,
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl Percentiles {
    /// Summarise a histogram of microseconds.
    pub fn from_micros(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Format milliseconds with precision that suits the magnitude.
pub fn fmt_ms(ms: f64) -> String {
    if !ms.is_finite() {
        "-".into()
    } else if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// Invocation and error counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Invocations started (dispatched); equals succeeded + failed.
    pub invocations: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Retries performed (attempts beyond the first).
    pub retries: u64,
    /// Retries wanted but refused by the retry token bucket.
    pub retries_denied: u64,
    /// Retries that waited for the delay the error's HINT suggested.
    #[serde(default)]
    pub retries_hinted: u64,
    /// Final failure reason (SQLSTATE or reason) -> invocations.
    pub by_error: BTreeMap<String, u64>,
    /// Error that caused a retry -> retries.
    pub retries_by_error: BTreeMap<String, u64>,
    /// Connections opened successfully.
    pub connects: u64,
    /// Successful invocations whose row is missing (from verification).
    pub lost: u64,
    /// Invocations whose row exists more than once (from verification).
    pub duplicated: u64,
}

/// One second of the run, by completion time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecondSample {
    pub second: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// p99 latency (ms) of the invocations that succeeded in this second.
    pub p99_ms: Option<f64>,
}

/// The full result of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub label: String,
    /// Target URL with the password hidden.
    pub target: String,
    pub run_id: String,
    pub profile: String,
    pub model: String,
    pub workload: String,
    pub elapsed_secs: f64,
    pub counts: Counts,
    /// Successful invocations, from intended start to completion.
    pub latency_ms: Percentiles,
    /// Time to open a connection (successful connects).
    pub connect_ms: Percentiles,
    /// Successful invocations per second over the run.
    pub throughput: f64,
    /// First message seen for each error key, to explain the codes.
    pub error_examples: BTreeMap<String, String>,
    pub timeline: Vec<SecondSample>,
    /// `None` when the workload does not write or verification was off.
    pub verification: Option<Verification>,
    /// Sequence numbers of write invocations that reported success; kept
    /// for [`crate::verify`] and not serialised.
    #[serde(skip)]
    pub acked_writes: Vec<u64>,
}

impl Report {
    /// Lost or duplicated writes found, or verification that could not run.
    pub fn data_loss(&self) -> bool {
        match &self.verification {
            Some(v) => v.lost > 0 || v.duplicated > 0 || v.error.is_some(),
            None => false,
        }
    }

    /// Failed / invocations, 0 when nothing ran.
    pub fn error_rate(&self) -> f64 {
        if self.counts.invocations == 0 {
            0.0
        } else {
            self.counts.failed as f64 / self.counts.invocations as f64
        }
    }

    /// Store a verification result and copy its counts into `counts`.
    pub fn set_verification(&mut self, v: Verification) {
        self.counts.lost = v.lost;
        self.counts.duplicated = v.duplicated;
        self.verification = Some(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_from_histogram() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for ms in 1..=1000u64 {
            h.record(ms * 1000).unwrap();
        }
        let p = Percentiles::from_micros(&h);
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 500.0).abs() < 1.0, "{}", p.p50);
        assert!((p.p99 - 990.0).abs() < 1.0, "{}", p.p99);
        assert!((p.max - 1000.0).abs() < 1.0, "{}", p.max);
        assert!(p.p50 <= p.p90 && p.p90 <= p.p99 && p.p99 <= p.p99_9 && p.p99_9 <= p.max);
        assert_eq!(
            Percentiles::from_micros(&Histogram::<u64>::new(3).unwrap()),
            Percentiles::default()
        );
    }

    #[test]
    fn formats_milliseconds() {
        assert_eq!(fmt_ms(0.4234), "0.42");
        assert_eq!(fmt_ms(9.5), "9.50");
        assert_eq!(fmt_ms(12.345), "12.3");
        assert_eq!(fmt_ms(1234.5), "1234");
        assert_eq!(fmt_ms(f64::NAN), "-");
    }
}
