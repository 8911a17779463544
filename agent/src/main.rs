use clap::Parser;

/// Coffer backup agent: watches folders and backs up every change, end-to-end encrypted.
#[derive(Parser)]
#[command(name = "coffer-agent", version)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
