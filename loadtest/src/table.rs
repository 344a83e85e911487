//! Plain-text rendering of reports for stdout: one run, or a comparison
//! side by side with a proxy/direct ratio column.

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::report::{fmt_ms, Percentiles, Report};

/// Render one run.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "sluice-loadtest [{}] {}", r.label, r.target);
    let _ = writeln!(s, "  run id      {}", r.run_id);
    let _ = writeln!(s, "  profile     {}", r.profile);
    let _ = writeln!(s, "  model       {}", r.model);
    let _ = writeln!(s, "  workload    {}", r.workload);
    let _ = writeln!(s, "  elapsed     {:.1} s", r.elapsed_secs);
    let c = &r.counts;
    let _ = writeln!(s);
    let _ = writeln!(s, "  invocations {:>10}", c.invocations);
    let _ = writeln!(s, "  succeeded   {:>10}", c.succeeded);
    let _ = writeln!(
        s,
        "  failed      {:>10}  ({:.2}%)",
        c.failed,
        r.error_rate() * 100.0
    );
    let _ = writeln!(s, "  retries     {:>10}", c.retries);
    if c.retries_hinted > 0 {
        let _ = writeln!(
            s,
            "  hinted      {:>10}  (retries that waited the delay the error's HINT asked for)",
            c.retries_hinted
        );
    }
    if c.retries_denied > 0 {
        let _ = writeln!(
            s,
            "  denied      {:>10}  (retries refused by the retry budget)",
            c.retries_denied
        );
    }
    let _ = writeln!(s, "  connects    {:>10}", c.connects);
    let _ = writeln!(s, "  throughput  {:>10.1} ok/s", r.throughput);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  {:<22}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}",
        "latency (ms)", "p50", "p90", "p99", "p99.9", "max", "n"
    );
    pct_row(&mut s, "invocation (intended)", &r.latency_ms);
    pct_row(&mut s, "connect", &r.connect_ms);
    if !c.by_error.is_empty() || !c.retries_by_error.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "  {:<18}{:>9}{:>9}  example",
            "error", "failed", "retried"
        );
        let keys: BTreeSet<&String> = c.by_error.keys().chain(c.retries_by_error.keys()).collect();
        for k in keys {
            let _ = writeln!(
                s,
                "  {:<18}{:>9}{:>9}  {}",
                k,
                c.by_error.get(k).copied().unwrap_or(0),
                c.retries_by_error.get(k).copied().unwrap_or(0),
                clip(r.error_examples.get(k).map_or("", String::as_str), 70)
            );
        }
    }
    if let Some(v) = &r.verification {
        let _ = writeln!(s);
        match &v.error {
            Some(e) => {
                let _ = writeln!(s, "  writes NOT verified: {e}");
            }
            None => {
                let verdict = if v.lost == 0 && v.duplicated == 0 {
                    "OK"
                } else {
                    "DATA LOSS"
                };
                let _ = writeln!(
                    s,
                    "  writes verified: {} acknowledged, {} lost, {} duplicated, \
                     {} unacknowledged-but-present  {verdict}",
                    v.checked, v.lost, v.duplicated, v.unacknowledged
                );
                if !v.lost_ids.is_empty() {
                    let _ = writeln!(s, "    lost e.g.: {}", v.lost_ids.join(", "));
                }
                if !v.duplicated_ids.is_empty() {
                    let _ = writeln!(s, "    duplicated e.g.: {}", v.duplicated_ids.join(", "));
                }
            }
        }
    }
    s
}

fn pct_row(s: &mut String, name: &str, p: &Percentiles) {
    if p.count == 0 {
        let _ = writeln!(s, "  {name:<22}{:>9}", "-");
        return;
    }
    let _ = writeln!(
        s,
        "  {name:<22}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}",
        fmt_ms(p.p50),
        fmt_ms(p.p90),
        fmt_ms(p.p99),
        fmt_ms(p.p99_9),
        fmt_ms(p.max),
        p.count
    );
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// `b / a` formatted, or `-` when undefined.
pub fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}x", b / a)
    } else {
        "-".into()
    }
}

/// Render a comparison side by side; the ratio column is proxy / direct.
pub fn render_compare(direct: &Report, proxy: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "sluice-loadtest compare");
    let _ = writeln!(s, "  direct    {}  (run {})", direct.target, direct.run_id);
    let _ = writeln!(s, "  proxy     {}  (run {})", proxy.target, proxy.run_id);
    let _ = writeln!(s, "  profile   {}", direct.profile);
    let _ = writeln!(s, "  model     {} | {}", direct.model, proxy.model);
    let _ = writeln!(s, "  workload  {}", direct.workload);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  {:<24}{:>12}{:>12}{:>10}",
        "", "direct", "proxy", "ratio"
    );
    let mut row = |name: &str, a: f64, b: f64, fmt: &dyn Fn(f64) -> String| {
        let _ = writeln!(
            s,
            "  {name:<24}{:>12}{:>12}{:>10}",
            fmt(a),
            fmt(b),
            ratio(a, b)
        );
    };
    let int = |x: f64| format!("{x:.0}");
    let (d, p) = (&direct.counts, &proxy.counts);
    row(
        "invocations",
        d.invocations as f64,
        p.invocations as f64,
        &int,
    );
    row("succeeded", d.succeeded as f64, p.succeeded as f64, &int);
    row("failed", d.failed as f64, p.failed as f64, &int);
    row(
        "error rate %",
        direct.error_rate() * 100.0,
        proxy.error_rate() * 100.0,
        &|x| format!("{x:.2}"),
    );
    row("retries", d.retries as f64, p.retries as f64, &int);
    row("connects", d.connects as f64, p.connects as f64, &int);
    row(
        "throughput ok/s",
        direct.throughput,
        proxy.throughput,
        &|x| format!("{x:.1}"),
    );
    let ms = |x: f64| fmt_ms(x);
    let (dl, pl) = (&direct.latency_ms, &proxy.latency_ms);
    row("latency p50 ms", dl.p50, pl.p50, &ms);
    row("latency p90 ms", dl.p90, pl.p90, &ms);
    row("latency p99 ms", dl.p99, pl.p99, &ms);
    row("latency p99.9 ms", dl.p99_9, pl.p99_9, &ms);
    row("latency max ms", dl.max, pl.max, &ms);
    row(
        "connect p50 ms",
        direct.connect_ms.p50,
        proxy.connect_ms.p50,
        &ms,
    );
    row(
        "connect p99 ms",
        direct.connect_ms.p99,
        proxy.connect_ms.p99,
        &ms,
    );
    if direct.verification.is_some() || proxy.verification.is_some() {
        row("lost writes", d.lost as f64, p.lost as f64, &int);
        row(
            "duplicated writes",
            d.duplicated as f64,
            p.duplicated as f64,
            &int,
        );
    }
    let keys: BTreeSet<&String> = d
        .by_error
        .keys()
        .chain(p.by_error.keys())
        .chain(d.retries_by_error.keys())
        .chain(p.retries_by_error.keys())
        .collect();
    if !keys.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "  {:<18}{:>18}{:>18}",
            "error", "direct fail/retry", "proxy fail/retry"
        );
        for k in keys {
            let pair = |c: &crate::report::Counts| {
                format!(
                    "{}/{}",
                    c.by_error.get(k).copied().unwrap_or(0),
                    c.retries_by_error.get(k).copied().unwrap_or(0)
                )
            };
            let _ = writeln!(s, "  {:<18}{:>18}{:>18}", k, pair(d), pair(p));
        }
    }
    for r in [direct, proxy] {
        if let Some(v) = &r.verification {
            let state = match &v.error {
                Some(e) => format!("NOT verified: {e}"),
                None if v.lost == 0 && v.duplicated == 0 => format!("{} writes OK", v.checked),
                None => format!(
                    "DATA LOSS: {} lost, {} duplicated of {}",
                    v.lost, v.duplicated, v.checked
                ),
            };
            let _ = writeln!(s, "  {:<8}{state}", r.label);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_tables() {
        assert_eq!(ratio(2.0, 3.0), "1.50x");
        assert_eq!(ratio(0.0, 3.0), "-");
        let mut r = Report {
            label: "direct".into(),
            ..Default::default()
        };
        r.counts.invocations = 3;
        r.counts.succeeded = 2;
        r.counts.failed = 1;
        r.counts.by_error.insert("53300".into(), 1);
        r.error_examples
            .insert("53300".into(), "sorry, too many clients already".into());
        let t = render(&r);
        assert!(t.contains("53300"), "{t}");
        assert!(t.contains("too many clients"), "{t}");
        let c = render_compare(&r, &r);
        assert!(c.contains("1.00x"), "{c}");
    }
}
