//! SVG chart of a run (or both runs of a comparison): successful
//! invocations per second on top, p99 latency per second below, sharing the
//! time axis so a latency spike can be matched to a throughput dip.

use std::path::Path;

use plotters::prelude::*;

use crate::report::Report;
use crate::LoadtestError;

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Write the chart for `reports` to `path` as SVG.
pub fn write_svg(path: &Path, reports: &[&Report]) -> Result<(), LoadtestError> {
    draw(path, reports)
        .map_err(|e| LoadtestError::Output(format!("cannot write chart {}: {e}", path.display())))
}

fn draw(path: &Path, reports: &[&Report]) -> Result<(), Box<dyn std::error::Error>> {
    let secs = reports
        .iter()
        .map(|r| r.timeline.len() as f64)
        .fold(1.0, f64::max);
    let max_rate = reports
        .iter()
        .flat_map(|r| r.timeline.iter().map(|s| s.succeeded as f64))
        .fold(1.0, f64::max);
    let max_p99 = reports
        .iter()
        .flat_map(|r| r.timeline.iter().filter_map(|s| s.p99_ms))
        .fold(1.0, f64::max);

    let root = SVGBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(320);

    let mut rate_chart = ChartBuilder::on(&top)
        .caption("successful invocations per second", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..secs, 0f64..max_rate * 1.1)?;
    rate_chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ok/s")
        .x_label_formatter(&|v| axis_label(*v))
        .y_label_formatter(&|v| axis_label(*v))
        .draw()?;

    let mut p99_chart = ChartBuilder::on(&bottom)
        .caption(
            "p99 latency per second (ms, from intended start)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..secs, 0f64..max_p99 * 1.1)?;
    p99_chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms")
        .x_label_formatter(&|v| axis_label(*v))
        .y_label_formatter(&|v| axis_label(*v))
        .draw()?;

    for (i, r) in reports.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let label = if r.label.is_empty() { "run" } else { &r.label };
        rate_chart
            .draw_series(LineSeries::new(
                r.timeline
                    .iter()
                    .map(|s| (s.second as f64 + 0.5, s.succeeded as f64)),
                color.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        // Seconds without a successful invocation have no p99: break the
        // line there instead of drawing a misleading zero.
        let mut segment: Vec<(f64, f64)> = Vec::new();
        let mut segments = Vec::new();
        for s in &r.timeline {
            match s.p99_ms {
                Some(v) => segment.push((s.second as f64 + 0.5, v)),
                None if !segment.is_empty() => segments.push(std::mem::take(&mut segment)),
                None => {}
            }
        }
        if !segment.is_empty() {
            segments.push(segment);
        }
        for (j, seg) in segments.into_iter().enumerate() {
            let series = p99_chart.draw_series(LineSeries::new(seg, color.stroke_width(2)))?;
            if j == 0 {
                series.label(label).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
            }
        }
    }
    for chart in [&mut rate_chart, &mut p99_chart] {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Whole numbers without decimals, others with one (axis ticks of short
/// runs fall on halves).
fn axis_label(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}
