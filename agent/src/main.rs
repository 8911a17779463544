//! The `coffer-agent` binary: parses the command line and hands it to the library.

use clap::Parser;
use coffer_agent::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    coffer_common::host::log::init(&cli.log);
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", coffer_common::error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
