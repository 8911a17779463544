//! The work floor of a backup: the CPU time that the work every backup of a folder must do
//! takes on one core, with nothing else (no journal, no index, no network, no threads).
//!
//! For each file of the folder, as the agent and receiver do it: read it (from the page
//! cache), hash it (the content hash the journal records), cut it into chunks, take each
//! chunk's keyed id, compress and seal it, hash the sealed bytes (the agent sends the hash,
//! the receiver checks it: counted twice), and seal its manifest. What a real backup adds on
//! top (system calls for stat/open, the socket, writing packs, SQLite, fsync, hand-offs
//! between threads) is not here, so `total / cores` is a bound no implementation of this
//! format can beat on this machine, and the gap to a measured backup is the overhead.
//!
//! Run with `cargo bench -p coffer-common --bench floor -- DIR [DIR...]` (the folders must be
//! in the page cache for a fair figure: read them once before). `COFFER_BENCH_TRIALS=N` sets
//! the trials per folder (default 3; the median is reported).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coffer_common::chunk::{chunk_stream_sized, Crypto, HashingReader, MIN_CHUNK};
use coffer_common::keys::MasterSecret;
use coffer_common::manifest::{ChunkRef, EntryKind, Manifest};
use coffer_common::wire::sealed_hash;

/// Time spent in each kind of work.
#[derive(Default, Clone, Copy)]
struct Spent {
    /// Reading, the content hash and cutting (one pass; the hash rides on the reads).
    read_hash_cut: Duration,
    chunk_ids: Duration,
    compress_seal: Duration,
    /// Hashing the sealed bytes once (done by the agent, checked by the receiver).
    sealed_hash: Duration,
    manifests: Duration,
}

impl Spent {
    fn total(&self) -> Duration {
        self.read_hash_cut
            + self.chunk_ids
            + self.compress_seal
            + 2 * self.sealed_hash
            + self.manifests
    }
}

struct Totals {
    files: u64,
    bytes: u64,
    sealed: u64,
}

/// Regular files under `dir`, in a stable order.
fn files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d)
            .map_err(|e| anyhow::anyhow!("reading folder {}: {e}", d.display()))?;
        for e in rd {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// One pass over `paths`: the work of backing each one up, timed by kind.
fn pass(crypto: &Crypto, paths: &[PathBuf]) -> anyhow::Result<(Spent, Totals)> {
    let mut s = Spent::default();
    let mut t = Totals {
        files: 0,
        bytes: 0,
        sealed: 0,
    };
    let timed = |slot: &mut Duration, start: Instant| *slot += start.elapsed();
    for p in paths {
        let file = std::fs::File::open(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        let len = file.metadata()?.len();
        let mut refs = Vec::new();
        let hash;
        if len < u64::from(MIN_CHUNK) {
            let c = Instant::now();
            let mut data = Vec::with_capacity(len as usize);
            (&file).take(u64::from(MIN_CHUNK)).read_to_end(&mut data)?;
            hash = *blake3::hash(&data).as_bytes();
            timed(&mut s.read_hash_cut, c);
            if !data.is_empty() {
                let c = Instant::now();
                let id = crypto.chunk_id(&data);
                timed(&mut s.chunk_ids, c);
                let c = Instant::now();
                let sealed = crypto.seal_chunk(&id, &data)?;
                timed(&mut s.compress_seal, c);
                let c = Instant::now();
                std::hint::black_box(sealed_hash(&sealed));
                timed(&mut s.sealed_hash, c);
                t.sealed += sealed.len() as u64;
                refs.push(ChunkRef {
                    id,
                    len: data.len() as u32,
                });
            }
            t.bytes += data.len() as u64;
        } else {
            let mut reader = HashingReader::new(&file);
            let mut chunks = chunk_stream_sized(&mut reader, len);
            loop {
                let c = Instant::now();
                let Some(chunk) = chunks.next() else {
                    timed(&mut s.read_hash_cut, c);
                    break;
                };
                let chunk = chunk?;
                timed(&mut s.read_hash_cut, c);
                let c = Instant::now();
                let id = crypto.chunk_id(&chunk);
                timed(&mut s.chunk_ids, c);
                let n = chunk.len() as u32;
                let c = Instant::now();
                let sealed = crypto.seal_chunk_owned(&id, chunk)?;
                timed(&mut s.compress_seal, c);
                let c = Instant::now();
                std::hint::black_box(sealed_hash(&sealed));
                timed(&mut s.sealed_hash, c);
                t.sealed += sealed.len() as u64;
                refs.push(ChunkRef { id, len: n });
            }
            drop(chunks);
            let (h, n) = reader.finish();
            hash = h;
            t.bytes += n;
        }
        let c = Instant::now();
        let path = p.as_os_str().as_encoded_bytes().to_vec();
        let file_id = crypto.file_id(&path);
        let m = Manifest {
            path,
            kind: EntryKind::File,
            size: len,
            mtime_ns: 0,
            mode: 0o644,
            uid: 0,
            gid: 0,
            content_hash: hash,
            chunks: refs,
            sparse: None,
            xattrs: vec![],
            hardlink: None,
        };
        std::hint::black_box(crypto.seal_manifest(&file_id, &m.encode())?);
        timed(&mut s.manifests, c);
        t.files += 1;
    }
    Ok((s, t))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let dirs: Vec<PathBuf> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .collect();
    if dirs.is_empty() {
        println!("floor: no folder given (cargo bench -p coffer-common --bench floor -- DIR)");
        return Ok(());
    }
    let trials = std::env::var("COFFER_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3usize)
        .max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let crypto = Crypto::new(&MasterSecret::generate()?.sub_keys());
    for dir in dirs {
        let paths = files(&dir)?;
        let mut runs = Vec::new();
        let mut totals = None;
        for _ in 0..trials {
            let (s, t) = pass(&crypto, &paths)?;
            runs.push(s);
            totals = Some(t);
        }
        runs.sort_by_key(Spent::total);
        let s = runs[runs.len() / 2];
        let Some(t) = totals else { continue };
        let total = secs(s.total());
        let mb = t.bytes as f64 / 1e6;
        println!(
            "work floor of {} ({} files, {:.0} MB, {:.0} MB sealed; median of {trials}, one core):",
            dir.display(),
            t.files,
            mb,
            t.sealed as f64 / 1e6
        );
        let row = |what: &str, d: f64| {
            println!(
                "  {what:<44} {d:7.3} s  {:5.1}%  {:7.0} MB/s",
                100.0 * d / total,
                mb / d
            )
        };
        row("read + content hash + cut", secs(s.read_hash_cut));
        row("chunk ids (keyed BLAKE3)", secs(s.chunk_ids));
        row(
            "compress (zstd) + seal (XChaCha20-Poly1305)",
            secs(s.compress_seal),
        );
        row("sealed-bytes hash, agent", secs(s.sealed_hash));
        row("sealed-bytes hash, receiver's check", secs(s.sealed_hash));
        row("manifests (file id, encode, seal)", secs(s.manifests));
        println!(
            "  {:<44} {total:7.3} s  => on {cores} cores with no other work: >= {:.2} s, <= {:.0} MB/s",
            "total",
            total / cores as f64,
            mb / (total / cores as f64)
        );
    }
    Ok(())
}
