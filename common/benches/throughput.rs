//! Throughput of the building blocks, in MB/s on one core:
//! chunk + id + seal, open, and the secure channel over loopback TCP.
//!
//! Each figure is the median of `TRIALS` runs (min and max beside it): this machine is a
//! shared VM whose speed drifts by tens of percent from one second to the next.
//!
//! Run with `cargo bench -p coffer-common`. `COFFER_BENCH=WORDS` runs only the figures
//! whose label contains `WORDS` (`channel` skips the building blocks' set-up too, to profile
//! the channel alone); `COFFER_BENCH_TRIALS=N` changes the number of trials.

use std::time::Instant;

use coffer_common::channel::{accept, connect, StaticKeypair};
use coffer_common::chunk::{chunk_stream, ChunkId, Crypto};
use coffer_common::keys::MasterSecret;
use coffer_common::wire::Message;

fn mbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// Runs `f` (which returns MB/s) `trials` times and prints the median, min and max.
fn report(
    label: &str,
    trials: usize,
    mut f: impl FnMut() -> anyhow::Result<f64>,
) -> anyhow::Result<()> {
    if std::env::var("COFFER_BENCH").is_ok_and(|w| !label.contains(w.as_str())) {
        return Ok(());
    }
    let mut v = (0..trials)
        .map(|_| f())
        .collect::<anyhow::Result<Vec<f64>>>()?;
    v.sort_by(f64::total_cmp);
    println!(
        "{label:<48}: {:8.1} MB/s  (median of {trials}; min {:.1}, max {:.1})",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let trials = std::env::var("COFFER_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5usize)
        .max(1);
    if std::env::var("COFFER_BENCH").is_ok_and(|v| v == "channel") {
        return channel(trials);
    }
    building_blocks(trials)?;
    channel(trials)
}

fn building_blocks(trials: usize) -> anyhow::Result<()> {
    let size = 256usize << 20;
    let mut data = vec![0u8; size];
    blake3::Hasher::new()
        .update(b"bench")
        .finalize_xof()
        .fill(&mut data);
    let data = &data[..];
    let crypto = Crypto::new(&MasterSecret::generate()?.sub_keys());

    // Building blocks, one at a time.
    report("  fastcdc stream (256 MiB random)", trials, || {
        let t = Instant::now();
        let n = chunk_stream(data).count();
        std::hint::black_box(n);
        Ok(mbps(size, t.elapsed().as_secs_f64()))
    })?;
    report("  blake3 keyed (1 thread)", trials, || {
        let t = Instant::now();
        std::hint::black_box(blake3::keyed_hash(&[7; 32], data));
        Ok(mbps(size, t.elapsed().as_secs_f64()))
    })?;
    let block = &data[..1 << 20];
    let id = crypto.chunk_id(block);
    report(
        "  seal 1 MiB (xchacha20-poly1305 + zstd probe)",
        trials,
        || {
            let t = Instant::now();
            for _ in 0..256 {
                std::hint::black_box(crypto.seal_chunk(&id, block)?);
            }
            Ok(mbps(256 << 20, t.elapsed().as_secs_f64()))
        },
    )?;

    // As the agent does it: each sealed chunk is handed on (here: dropped) before the next
    // is cut, so memory stays bounded and is reused.
    report("chunk+id+seal  random 256 MiB", trials, || {
        let t = Instant::now();
        for c in chunk_stream(data) {
            let c = c?;
            let id = crypto.chunk_id(&c);
            std::hint::black_box(crypto.seal_chunk_owned(&id, c)?);
        }
        Ok(mbps(size, t.elapsed().as_secs_f64()))
    })?;

    let text: Vec<u8> = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit 0123456789\n"
        .iter()
        .copied()
        .cycle()
        .take(64 << 20)
        .collect();
    report("chunk+id+seal  text 64 MiB (compressed)", trials, || {
        let t = Instant::now();
        for c in chunk_stream(&text[..]) {
            let c = c?;
            let id = crypto.chunk_id(&c);
            std::hint::black_box(crypto.seal_chunk_owned(&id, c)?);
        }
        Ok(mbps(text.len(), t.elapsed().as_secs_f64()))
    })?;

    // As restore does it: the reply's buffer is opened in place. The copies of the
    // sealed chunks are made before the clock starts.
    let mut sealed = Vec::new();
    for c in chunk_stream(data) {
        let c = c?;
        let id = crypto.chunk_id(&c);
        sealed.push((id, crypto.seal_chunk(&id, &c)?));
    }
    report("open+verify    random 256 MiB", trials, || {
        let copies = sealed.clone();
        let t = Instant::now();
        let mut opened = 0;
        for (id, s) in copies {
            opened += crypto.open_chunk_owned(&id, s)?.len();
        }
        Ok(mbps(opened, t.elapsed().as_secs_f64()))
    })?;
    Ok(())
}

fn channel(trials: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    report(
        "channel        loopback TCP 1 GiB in 4 MiB frames",
        trials,
        || rt.block_on(channel_once()),
    )
}

/// Sends 1 GiB of `PutChunk` frames over a fresh loopback connection: the sender hashes
/// each, the receiver checks the hash.
async fn channel_once() -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = StaticKeypair::generate()?;
    let spub = server.public();
    let total = 1usize << 30;
    let frame = 4usize << 20;
    let srv = tokio::spawn(async move {
        let (s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let (mut ch, _) = accept(s, &server).await?;
        let mut got = 0;
        while got < total {
            if let Message::PutChunk { sealed, .. } = ch.recv().await? {
                got += sealed.len();
            }
        }
        anyhow::Ok(())
    });
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let client = StaticKeypair::generate()?;
    let mut ch = connect(s, &client, &spub).await?;
    let mut sealed = vec![7u8; frame];
    let t = Instant::now();
    for _ in 0..total / frame {
        // The sender hashes every chunk it puts, as the agent does.
        let msg = Message::put_chunk(ChunkId([0; 32]), sealed);
        ch.send(&msg).await?;
        let Message::PutChunk { sealed: s, .. } = msg else {
            unreachable!("built as a PutChunk")
        };
        sealed = s;
    }
    srv.await??;
    Ok(mbps(total, t.elapsed().as_secs_f64()))
}
