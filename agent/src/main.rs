use clap::Parser;
use coffer_agent::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cli::init_logging(&cli.log);
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
