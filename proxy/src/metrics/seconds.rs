//! The histograms every transaction records (`sluice_pool_wait_seconds`,
//! `sluice_transaction_seconds`), kept by Sluice itself in fixed buckets and rendered beside the
//! exporter's output.
//!
//! Written by hand for the hot path: the exporter keeps each sample (value and a timestamp, in
//! a lock-free list drained every few seconds), some 280 instructions per record on this
//! machine; here a record is a search of [`SECONDS_BUCKETS`] and two relaxed atomic adds. The
//! text is the exporter's own format for a histogram with those buckets.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// Histogram buckets for every `_seconds` histogram: from half a millisecond to half a minute.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0,
    5.0, 7.5, 10.0, 30.0,
];

const BUCKETS: usize = 20;

/// [`SECONDS_BUCKETS`] in nanoseconds (a test checks that the two agree).
const BOUNDS_NS: [u64; BUCKETS] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    750_000_000,
    1_000_000_000,
    1_500_000_000,
    2_000_000_000,
    3_000_000_000,
    4_000_000_000,
    5_000_000_000,
    7_500_000_000,
    10_000_000_000,
    30_000_000_000,
];

/// One series: counts per bucket (the last one past every bound) and the sum in nanoseconds
/// (it wraps after 584 years of recorded time, which Prometheus would read as a counter reset).
pub struct Seconds {
    counts: [AtomicU64; BUCKETS + 1],
    sum_ns: AtomicU64,
}

impl Seconds {
    fn new() -> Self {
        Seconds {
            counts: [const { AtomicU64::new(0) }; BUCKETS + 1],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one duration: counted in the first bucket whose bound it does not exceed.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Appends the series' lines: cumulative buckets, `+Inf`, sum (seconds) and count.
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let mut total = 0u64;
        for (bound, count) in SECONDS_BUCKETS.iter().zip(&self.counts) {
            total += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {total}");
        }
        total += self.counts[BUCKETS].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {total}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
    }
}

/// The histograms by name, each with its help text and its series by `group` label.
struct Family {
    name: &'static str,
    help: &'static str,
    series: Vec<(String, Arc<Seconds>)>,
}

static FAMILIES: Mutex<Vec<Family>> = Mutex::new(Vec::new());

/// The series of histogram `name` for `group` (a label from `super::group_label`), registered on
/// first use; the same label gets the same series.
pub fn series(name: &'static str, help: &'static str, group: &str) -> Arc<Seconds> {
    let mut families = FAMILIES.lock();
    let i = match families.iter().position(|f| f.name == name) {
        Some(i) => i,
        None => {
            families.push(Family {
                name,
                help,
                series: Vec::new(),
            });
            families.len() - 1
        }
    };
    let family = &mut families[i];
    if let Some((_, s)) = family.series.iter().find(|(g, _)| g == group) {
        return s.clone();
    }
    let s = Arc::new(Seconds::new());
    family.series.push((group.to_string(), s.clone()));
    s
}

/// Appends every registered histogram in the Prometheus text format.
pub fn render(out: &mut String) {
    let families = FAMILIES.lock();
    for f in families.iter().filter(|f| !f.series.is_empty()) {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} histogram", f.name);
        for (group, s) in &f.series {
            s.render(f.name, &format!("group=\"{}\"", escape(group)), out);
        }
        out.push('\n');
    }
}

/// A label value as the text format wants it: backslash, double quote and line feed escaped.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_the_buckets() {
        assert_eq!(SECONDS_BUCKETS.len(), BUCKETS);
        for (s, ns) in SECONDS_BUCKETS.iter().zip(BOUNDS_NS) {
            assert_eq!((s * 1e9).round() as u64, ns);
        }
    }

    #[test]
    fn counts_each_duration_in_the_first_bucket_it_fits() {
        let h = Seconds::new();
        h.record(Duration::ZERO);
        h.record(Duration::from_micros(500)); // on a bound: `le` includes it
        h.record(Duration::from_micros(501));
        h.record(Duration::from_secs(31));
        h.record(Duration::MAX);
        let mut out = String::new();
        h.render("x_seconds", "group=\"g\"", &mut out);
        let line = |series: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
                .unwrap_or_else(|| panic!("{series} in {out}"))
                .to_string()
        };
        assert_eq!(line("x_seconds_bucket{group=\"g\",le=\"0.0005\"}"), "2");
        assert_eq!(line("x_seconds_bucket{group=\"g\",le=\"0.001\"}"), "3");
        assert_eq!(line("x_seconds_bucket{group=\"g\",le=\"30\"}"), "3");
        assert_eq!(line("x_seconds_bucket{group=\"g\",le=\"+Inf\"}"), "5");
        assert_eq!(line("x_seconds_count{group=\"g\"}"), "5");
        let sum: f64 = line("x_seconds_sum{group=\"g\"}").parse().unwrap();
        // Duration::MAX saturates to u64::MAX nanoseconds, and the sum wraps.
        let expected = (1_001_000u64 + 31_000_000_000).wrapping_add(u64::MAX) as f64 / 1e9;
        assert!((sum - expected).abs() < 1e-9, "{sum} vs {expected}");
    }

    #[test]
    fn one_series_per_label_and_escaped_labels() {
        let a = series("test_a_seconds", "A", "g1");
        let b = series("test_a_seconds", "A", "g1");
        assert!(Arc::ptr_eq(&a, &b));
        let c = series("test_a_seconds", "A", "q\"\\\n");
        assert!(!Arc::ptr_eq(&a, &c));
        a.record(Duration::from_millis(2));
        let mut out = String::new();
        render(&mut out);
        assert!(out.contains("# HELP test_a_seconds A\n# TYPE test_a_seconds histogram\n"));
        assert!(
            out.contains("test_a_seconds_count{group=\"g1\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("test_a_seconds_count{group=\"q\\\"\\\\\\n\"} 0\n"),
            "{out}"
        );
        assert_eq!(out.matches("# TYPE test_a_seconds ").count(), 1);
    }
}
