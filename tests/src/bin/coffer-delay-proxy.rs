//! `coffer-delay-proxy`: the tests' delay proxy as a command, for the benchmark and for
//! trying Coffer over a long link by hand.
//!
//! Prints `listening ADDR` on stdout once it accepts connections, then forwards until
//! SIGTERM or SIGINT. SIGUSR1 black-holes the connections open at that moment.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use coffer_tests::proxy::{DelayProxy, ProxyConfig};

#[derive(Parser)]
#[command(about = "TCP forwarder with a fixed delay each way and an optional rate limit")]
struct Args {
    /// Address to listen on (port 0 = any; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to forward every connection (HOST:PORT).
    #[arg(long)]
    target: String,
    /// Delay added each way, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Rate limit each way in bytes per second (unset = none).
    #[arg(long)]
    rate: Option<u64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let target = args
        .target
        .to_socket_addrs()
        .with_context(|| format!("--target {}", args.target))?
        .next()
        .ok_or_else(|| anyhow!("--target {}: no address", args.target))?;
    if !(args.delay_ms >= 0.0 && args.delay_ms.is_finite()) {
        return Err(anyhow!("--delay-ms {}: not a delay", args.delay_ms));
    }
    let config = ProxyConfig {
        delay: Duration::from_secs_f64(args.delay_ms / 1000.0),
        rate: args.rate,
    };
    let proxy = DelayProxy::start_on(args.listen, target, config)?;
    println!("listening {}", proxy.addr());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = usr1.recv() => {
                    let n = proxy.black_hole_open_connections();
                    eprintln!("coffer-delay-proxy: black-holed {n} connection(s)");
                }
            }
        }
        eprintln!(
            "coffer-delay-proxy: {} connection(s), {} bytes up, {} bytes down",
            proxy.accepted(),
            proxy.bytes_up(),
            proxy.bytes_down()
        );
        Ok::<(), anyhow::Error>(())
    })?;
    drop(proxy);
    Ok(())
}
