//! The binary's flow: run or compare, print the table, write the JSON and
//! chart files, and choose the exit code. `main.rs` parses [`Cli`] and
//! calls [`execute`].

use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::cli::Cli;
use crate::{chart, table, verify, Comparison, Report};

/// Exit code when writes were lost or duplicated (or could not be verified).
pub const EXIT_DATA_LOSS: u8 = 3;
/// Exit code when the error rate exceeded `--max-error-rate`.
pub const EXIT_ERROR_RATE: u8 = 4;

/// Run the command line; errors are reported by `main` and exit 1.
pub async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut opts = cli.to_options()?;
    if let Some(urls) = &cli.compare {
        let [direct, proxy] = urls.as_slice() else {
            bail!("--compare needs DIRECT_URL PROXY_URL");
        };
        if cli.setup_only {
            crate::setup(cli.verify_url.as_deref().unwrap_or(direct), cli.rows).await?;
            eprintln!("setup done");
            return Ok(ExitCode::SUCCESS);
        }
        let cmp = crate::compare(&opts, direct, proxy, cli.compare_pause).await?;
        print!("{}", table::render_compare(&cmp.direct, &cmp.proxy));
        write_outputs(&cli, &[&cmp.direct, &cmp.proxy], Some(&cmp))?;
        return Ok(exit_code(&cli, &[&cmp.direct, &cmp.proxy]));
    }
    opts.url =
        cli.target.clone().or_else(|| cli.url.clone()).context(
            "no target: give a URL (positional, --url or SLUICE_LOADTEST_URL) or --compare",
        )?;
    if cli.setup_only {
        crate::setup(opts.verify_url(), opts.rows).await?;
        eprintln!("setup done");
        return Ok(ExitCode::SUCCESS);
    }
    let hooks = cli.plant_lost > 0 || cli.plant_duplicates > 0;
    let verify_after = opts.verify && opts.workload.writes();
    if hooks {
        // Verify ourselves after damaging the rows on purpose.
        opts.verify = false;
    }
    let mut report = crate::run(&opts).await?;
    if hooks && verify_after {
        let url = opts.verify_url().to_string();
        let lost = verify::plant_lost_writes(&url, &report, cli.plant_lost).await?;
        let dup = verify::plant_duplicate_writes(&url, &report, cli.plant_duplicates).await?;
        eprintln!(
            "test hook: deleted {} rows, duplicated {}",
            lost.len(),
            dup.len()
        );
        report.set_verification(verify::verify(&url, &report).await?);
    }
    print!("{}", table::render(&report));
    write_outputs(&cli, &[&report], None)?;
    Ok(exit_code(&cli, &[&report]))
}

fn write_outputs(cli: &Cli, reports: &[&Report], cmp: Option<&Comparison>) -> anyhow::Result<()> {
    if let Some(path) = &cli.json {
        let text = match cmp {
            Some(c) => serde_json::to_string_pretty(c),
            None => serde_json::to_string_pretty(reports[0]),
        }
        .context("cannot serialise the report")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &cli.chart {
        chart::write_svg(path, reports)?;
    }
    Ok(())
}

fn exit_code(cli: &Cli, reports: &[&Report]) -> ExitCode {
    if !cli.allow_loss && reports.iter().any(|r| r.data_loss()) {
        eprintln!("FAILED: acknowledged writes were lost or duplicated (or could not be verified)");
        return ExitCode::from(EXIT_DATA_LOSS);
    }
    if let Some(max) = cli.max_error_rate {
        if let Some(r) = reports.iter().find(|r| r.error_rate() > max) {
            eprintln!(
                "FAILED: error rate {:.2}% of [{}] is above --max-error-rate {:.2}%",
                r.error_rate() * 100.0,
                r.label,
                max * 100.0
            );
            return ExitCode::from(EXIT_ERROR_RATE);
        }
    }
    ExitCode::SUCCESS
}
