use clap::Parser;

/// Coffer receiver: stores sealed chunks durably; never sees keys or plaintext.
#[derive(Parser)]
#[command(name = "coffer-receiver", version)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
