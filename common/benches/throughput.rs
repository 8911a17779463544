//! Throughput of the building blocks, in MB/s on one core:
//! chunk + id + seal, open, and the secure channel over loopback TCP.
//!
//! Run with `cargo bench -p coffer-common`.

use std::time::Instant;

use coffer_common::channel::{accept, connect, StaticKeypair};
use coffer_common::chunk::{chunk_stream, ChunkId, Crypto};
use coffer_common::keys::MasterSecret;
use coffer_common::wire::Message;

fn mbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn main() -> anyhow::Result<()> {
    let size = 256usize << 20;
    let mut data = vec![0u8; size];
    blake3::Hasher::new()
        .update(b"bench")
        .finalize_xof()
        .fill(&mut data);
    let crypto = Crypto::new(&MasterSecret::generate()?.sub_keys());

    // Building blocks, one at a time.
    let t = Instant::now();
    let n = chunk_stream(&data[..]).count();
    println!(
        "  fastcdc stream           : {:8.1} MB/s ({n} chunks)",
        mbps(size, t.elapsed().as_secs_f64())
    );
    let t = Instant::now();
    let h = blake3::keyed_hash(&[7; 32], &data);
    println!(
        "  blake3 keyed (1 thread)  : {:8.1} MB/s ({})",
        mbps(size, t.elapsed().as_secs_f64()),
        &h.to_hex()[..8]
    );
    let block = &data[..1 << 20];
    let id = crypto.chunk_id(block);
    let t = Instant::now();
    for _ in 0..256 {
        std::hint::black_box(crypto.seal_chunk(&id, block)?);
    }
    println!(
        "  seal 1 MiB (xchacha+zstd probe): {:8.1} MB/s",
        mbps(256 << 20, t.elapsed().as_secs_f64())
    );

    let t = Instant::now();
    let mut sealed = Vec::new();
    for c in chunk_stream(&data[..]) {
        let c = c?;
        let id = crypto.chunk_id(&c);
        let s = crypto.seal_chunk(&id, &c)?;
        sealed.push((id, s));
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "chunk+id+seal  random {} MiB: {:8.1} MB/s ({} chunks)",
        size >> 20,
        mbps(size, el),
        sealed.len()
    );

    let text: Vec<u8> = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit 0123456789\n"
        .iter()
        .copied()
        .cycle()
        .take(64 << 20)
        .collect();
    let t = Instant::now();
    let mut n = 0;
    for c in chunk_stream(&text[..]) {
        let c = c?;
        let id = crypto.chunk_id(&c);
        n += crypto.seal_chunk(&id, &c)?.len();
    }
    println!(
        "chunk+id+seal  text    64 MiB: {:8.1} MB/s (sealed to {} MiB)",
        mbps(text.len(), t.elapsed().as_secs_f64()),
        n >> 20
    );

    let t = Instant::now();
    let mut opened = 0;
    for (id, s) in &sealed {
        opened += crypto.open_chunk(id, s)?.len();
    }
    println!(
        "open+verify    random {} MiB: {:8.1} MB/s",
        size >> 20,
        mbps(opened, t.elapsed().as_secs_f64())
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
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
        let msg = Message::PutChunk {
            id: ChunkId([0; 32]),
            sealed: vec![7u8; frame],
        };
        let t = Instant::now();
        for _ in 0..total / frame {
            ch.send(&msg).await?;
        }
        srv.await??;
        println!(
            "channel        loopback TCP 1 GiB in 4 MiB frames: {:8.1} MB/s",
            mbps(total, t.elapsed().as_secs_f64())
        );
        anyhow::Ok(())
    })?;
    Ok(())
}
