//! `coffer-receiver`: parses the command line, sets up logging and runs
//! [`coffer_receiver::cli`], which holds the commands.

use std::process::ExitCode;

use clap::Parser;
use coffer_receiver::cli::{self, Cli};

fn main() -> ExitCode {
    coffer_common::host::mem::one_malloc_arena();
    let cli = Cli::parse();
    coffer_common::host::log::init(&cli.log);
    match cli::run(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", coffer_common::error_text(&e));
            ExitCode::FAILURE
        }
    }
}
