//! `sluice-loadtest` binary: parse arguments, run the library, map errors to
//! a message and a non-zero exit code.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use sluice_loadtest::app::execute;
use sluice_loadtest::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr (warnings by default; RUST_LOG to change).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
