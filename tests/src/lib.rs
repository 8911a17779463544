//! Shared helpers for black-box tests.
//!
//! - [`Receiver`]: a real `coffer-receiver` (`init`, `authorize`, `serve` on 127.0.0.1:0)
//!   in a directory of the test's choosing; knows its address and public key.
//! - [`TestAgent`] / [`Client`]: a minimal protocol client built on `coffer-common`
//!   (handshake, Hello, puts, commits, reads), plus [`SealedFile`] to make real sealed
//!   chunks and manifests.
//! - [`proxy::DelayProxy`]: a loopback link with a fixed delay each way, a rate limit, a
//!   black hole.
//! - [`wait_for`]: poll a condition with a deadline (tests never sleep for timing).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use coffer_common::channel::{self, Channel, PublicKey, StaticKeypair};
use coffer_common::chunk::{chunk_stream, ChunkId, Crypto, FileId};
use coffer_common::keys::{fill_random, MasterSecret};
use coffer_common::manifest::{ChunkRef, EntryKind, Manifest};
use coffer_common::wire::{CommitId, ErrorCode, Message, VersionEntry, PROTOCOL_VERSION};
use tokio::net::TcpStream;

pub mod proxy;

/// Polls `f` until it returns `Some`, or fails after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Path of a binary built by this workspace, next to the running test's directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// The receiver binary: this crate's own build of `receiver/src/main.rs`
/// (`coffer-receiver-test`, always current when this crate's tests run), else the
/// receiver package's `coffer-receiver`.
pub fn receiver_bin() -> PathBuf {
    let own = bin("coffer-receiver-test");
    if own.exists() {
        own
    } else {
        bin("coffer-receiver")
    }
}

/// Output's stdout as text, failing with stderr when the command failed.
pub fn stdout_ok(o: &Output) -> Result<String> {
    if !o.status.success() {
        bail!(
            "command failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// A real receiver in a directory.
pub struct Receiver {
    /// `--root`.
    pub root: PathBuf,
    /// The receiver's public key (printed by `init`).
    pub public_key: PublicKey,
    /// Address of the running (or last) `serve`.
    pub addr: Option<SocketAddr>,
    /// Extra environment for every command run (e.g. `HOME`, `TMPDIR`).
    pub env: Vec<(String, PathBuf)>,
    /// Working directory for every command run after `init` (default: inherited).
    pub cwd: Option<PathBuf>,
    child: Option<Child>,
}

impl Receiver {
    /// `coffer-receiver init --root ROOT --listen 127.0.0.1:0`.
    pub fn init(root: &Path) -> Result<Self> {
        Self::init_with_env(root, Vec::new())
    }

    /// [`Receiver::init`] with extra environment for this and every later command.
    pub fn init_with_env(root: &Path, env: Vec<(String, PathBuf)>) -> Result<Self> {
        let mut cmd = Command::new(receiver_bin());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let o = cmd
            .args(["init", "--root"])
            .arg(root)
            .args(["--listen", "127.0.0.1:0"])
            .output()
            .context("running coffer-receiver init")?;
        let out = stdout_ok(&o)?;
        let lines: Vec<&str> = out.lines().collect();
        if lines.len() != 1 {
            bail!("init printed {} lines, expected one: {out:?}", lines.len());
        }
        let public_key = lines[0]
            .parse()
            .map_err(|e| anyhow!("init printed {:?}: {e}", lines[0]))?;
        Ok(Self {
            root: root.to_path_buf(),
            public_key,
            addr: None,
            env,
            cwd: None,
            child: None,
        })
    }

    /// `init` then `serve`.
    pub fn start(root: &Path) -> Result<Self> {
        let mut r = Self::init(root)?;
        r.serve()?;
        Ok(r)
    }

    /// A command for the receiver binary (with [`Receiver::env`]).
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(receiver_bin());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        c
    }

    /// Runs `coffer-receiver SUBCOMMAND --root ROOT ARGS...`.
    pub fn run(&self, subcommand: &str, args: &[&str]) -> Result<Output> {
        self.cmd()
            .arg(subcommand)
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .output()
            .with_context(|| format!("running coffer-receiver {subcommand}"))
    }

    /// Replaces `receiver.toml` (takes effect at the next `serve`).
    pub fn set_config(&self, toml: &str) -> Result<()> {
        std::fs::write(self.root.join("receiver.toml"), toml).context("writing receiver.toml")
    }

    /// Lets `key` write repository `repo`.
    pub fn authorize(&self, repo: &str, key: &PublicKey) -> Result<()> {
        stdout_ok(&self.run("authorize", &["--name", repo, &key.to_string()])?)?;
        Ok(())
    }

    /// Revokes `key`.
    pub fn revoke(&self, key: &PublicKey) -> Result<()> {
        stdout_ok(&self.run("revoke", &[&key.to_string()])?)?;
        Ok(())
    }

    /// `status --json`.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = stdout_ok(&self.run("status", &["--json"])?)?;
        serde_json::from_str(&out).context("parsing status --json")
    }

    /// Where `serve` logs (stderr), next to the root.
    pub fn log_path(&self) -> PathBuf {
        self.root.with_extension("serve.log")
    }

    /// The serve log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts `serve` on 127.0.0.1:0, or on the previous address when there was one, and
    /// waits for its `listening on` line.
    pub fn serve(&mut self) -> Result<SocketAddr> {
        self.serve_with(&[])
    }

    /// [`Receiver::serve`] with more arguments (e.g. `--metrics ADDR`).
    pub fn serve_with(&mut self, extra: &[&str]) -> Result<SocketAddr> {
        self.kill9();
        let listen = self
            .addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "127.0.0.1:0".into());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening the serve log")?;
        let mut child = self
            .cmd()
            .args(["serve", "--root"])
            .arg(&self.root)
            .args(["--listen", &listen])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawning coffer-receiver serve")?;
        let stdout = child.stdout.take().context("serve stdout")?;
        self.child = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let res = r.read_line(&mut line).map(|_| line);
            let _ = tx.send(res);
            // Keep reading so the pipe never fills; serve prints nothing else.
            let mut rest = String::new();
            while matches!(r.read_line(&mut rest), Ok(n) if n > 0) {
                rest.clear();
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("serve printed nothing in 30 s; log:\n{}", self.log()))?
            .context("reading serve stdout")?;
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| anyhow!("unexpected first line {line:?}; log:\n{}", self.log()))?
            .parse()
            .context("parsing the listening address")?;
        self.addr = Some(addr);
        Ok(addr)
    }

    /// The address of the running serve.
    pub fn addr(&self) -> Result<SocketAddr> {
        self.addr.context("receiver is not serving")
    }

    /// The serve process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills `serve` with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits (at most `limit`) for `serve` to exit.
    pub fn terminate(&mut self, limit: Duration) -> Result<ExitStatus> {
        let mut c = self.child.take().context("receiver is not serving")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .context("sending SIGTERM")?;
        let r = wait_for("serve to exit after SIGTERM", limit, || {
            c.try_wait().ok().flatten()
        });
        if r.is_err() {
            let _ = c.kill();
            let _ = c.wait();
        }
        r
    }

    /// Connects `agent` (handshake, Hello) to the running serve.
    pub async fn connect(&self, agent: &TestAgent) -> Result<Client> {
        agent.connect(self.addr()?, &self.public_key).await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An agent identity with its keys, for talking to a receiver directly.
pub struct TestAgent {
    pub keypair: StaticKeypair,
    pub crypto: Crypto,
}

/// A file cut, sealed and ready to upload.
#[derive(Clone)]
pub struct SealedFile {
    pub path: Vec<u8>,
    pub plain: Vec<u8>,
    pub file_id: FileId,
    pub commit_id: CommitId,
    pub manifest: Vec<u8>,
    pub chunks: Vec<(ChunkId, Vec<u8>)>,
}

impl SealedFile {
    /// The chunk ids in order.
    pub fn ids(&self) -> Vec<ChunkId> {
        self.chunks.iter().map(|(i, _)| *i).collect()
    }

    /// The `CommitFile` request.
    pub fn commit_message(&self) -> Message {
        Message::CommitFile {
            commit_id: self.commit_id,
            file_id: self.file_id,
            manifest: self.manifest.clone(),
            chunks: self.ids(),
            deleted: false,
        }
    }
}

/// A fresh random commit id.
pub fn commit_id() -> Result<CommitId> {
    let mut c = [0u8; 16];
    fill_random(&mut c)?;
    Ok(CommitId(c))
}

/// A well-formed key file (structure, minimum Argon2id parameters, checksum) sealing
/// noise, different for each `seed`: what a receiver accepts for escrow, made without
/// running Argon2id.
pub fn key_file(seed: u64) -> Vec<u8> {
    let mut v = b"COFFERKF\x01\0\0\0".to_vec();
    for x in [19 * 1024u32, 2, 1] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.extend_from_slice(&data(112 - 24, seed));
    let sum = *blake3::hash(&v).as_bytes();
    v.extend_from_slice(&sum);
    v
}

/// Deterministic pseudo-random bytes.
pub fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut v);
    v
}

impl TestAgent {
    /// A new identity with a new master secret.
    pub fn new() -> Result<Self> {
        Ok(Self {
            keypair: StaticKeypair::generate()?,
            crypto: Crypto::new(&MasterSecret::generate()?.sub_keys()),
        })
    }

    /// The agent's public key.
    pub fn public_key(&self) -> PublicKey {
        self.keypair.public()
    }

    /// Handshake only (no Hello).
    pub async fn handshake(
        &self,
        addr: SocketAddr,
        receiver: &PublicKey,
    ) -> Result<Channel<TcpStream>> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        Ok(channel::connect(s, &self.keypair, receiver).await?)
    }

    /// Handshake and Hello/Welcome.
    pub async fn connect(&self, addr: SocketAddr, receiver: &PublicKey) -> Result<Client> {
        let mut ch = self.handshake(addr, receiver).await?;
        let hello = Message::Hello {
            protocol: PROTOCOL_VERSION,
            agent_name: "test".into(),
            software: coffer_common::SOFTWARE.into(),
        };
        match ch.request(&hello).await? {
            Message::Welcome { protocol, repo, .. } if protocol == PROTOCOL_VERSION => {
                Ok(Client { ch, repo })
            }
            other => Err(anyhow!("expected Welcome, got {other:?}")),
        }
    }

    /// Cuts, seals and describes `plain` as the file `path`.
    pub fn seal_file(&self, path: &str, plain: &[u8]) -> Result<SealedFile> {
        let mut chunks = Vec::new();
        let mut refs = Vec::new();
        for c in chunk_stream(plain) {
            let c = c?;
            let id = self.crypto.chunk_id(&c);
            refs.push(ChunkRef {
                id,
                len: c.len() as u32,
            });
            chunks.push((id, self.crypto.seal_chunk(&id, &c)?));
        }
        let file_id = self.crypto.file_id(path.as_bytes());
        let m = Manifest {
            path: path.as_bytes().to_vec(),
            kind: EntryKind::File,
            size: plain.len() as u64,
            mtime_ns: 0,
            mode: 0o644,
            uid: 0,
            gid: 0,
            content_hash: *blake3::hash(plain).as_bytes(),
            chunks: refs,
            sparse: None,
            xattrs: vec![],
            hardlink: None,
        };
        Ok(SealedFile {
            path: path.as_bytes().to_vec(),
            plain: plain.to_vec(),
            file_id,
            commit_id: commit_id()?,
            manifest: self.crypto.seal_manifest(&file_id, &m.encode())?,
            chunks,
        })
    }

    /// Reads `file` back through `client` and checks every byte and the manifest.
    pub async fn verify(&self, client: &mut Client, file: &SealedFile) -> Result<()> {
        let mut got = Vec::with_capacity(file.plain.len());
        for (id, _) in &file.chunks {
            let sealed = client.get_chunk(id).await?;
            got.extend_from_slice(&self.crypto.open_chunk(id, &sealed)?);
        }
        if got != file.plain {
            bail!(
                "{}: read back {} bytes that differ from the {} sent",
                String::from_utf8_lossy(&file.path),
                got.len(),
                file.plain.len()
            );
        }
        Ok(())
    }
}

/// An open session with a receiver.
pub struct Client {
    pub ch: Channel<TcpStream>,
    /// The repository from `Welcome`.
    pub repo: String,
}

/// Turns an `Error` reply into an error naming its code.
pub fn expect_ok(m: Message) -> Result<Message> {
    match m {
        Message::Error { code, message } => Err(anyhow!("receiver error {code:?}: {message}")),
        m => Ok(m),
    }
}

/// The code of an `Error` reply, if it is one.
pub fn error_code(m: &Message) -> Option<ErrorCode> {
    match m {
        Message::Error { code, .. } => Some(*code),
        _ => None,
    }
}

impl Client {
    /// Sends one request and returns its reply (which may be an `Error`).
    pub async fn request(&mut self, m: &Message) -> Result<Message> {
        Ok(self.ch.request(m).await?)
    }

    /// Which of `ids` the receiver lacks.
    pub async fn have(&mut self, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        match expect_ok(
            self.request(&Message::HaveChunks { ids: ids.to_vec() })
                .await?,
        )? {
            Message::Missing { ids } => Ok(ids),
            m => Err(anyhow!("expected Missing, got {}", m.kind())),
        }
    }

    /// Stores one sealed chunk.
    pub async fn put(&mut self, id: &ChunkId, sealed: &[u8]) -> Result<()> {
        let m = Message::put_chunk(*id, sealed.to_vec());
        match expect_ok(self.request(&m).await?)? {
            Message::Stored { id: got } if got == *id => Ok(()),
            m => Err(anyhow!("expected Stored, got {}", m.kind())),
        }
    }

    /// Commits `file`; returns (version, commit time).
    pub async fn commit(&mut self, file: &SealedFile) -> Result<(u64, i64)> {
        match expect_ok(self.request(&file.commit_message()).await?)? {
            Message::FileAcked {
                commit_id,
                version,
                commit_time,
            } if commit_id == file.commit_id => Ok((version, commit_time)),
            m => Err(anyhow!("expected FileAcked, got {m:?}")),
        }
    }

    /// HaveChunks, PutChunk for the missing ones, CommitFile; returns the version.
    pub async fn upload(&mut self, file: &SealedFile) -> Result<u64> {
        let missing = self.have(&file.ids()).await?;
        for (id, sealed) in &file.chunks {
            if missing.contains(id) {
                self.put(id, sealed).await?;
            }
        }
        Ok(self.commit(file).await?.0)
    }

    /// Fetches a sealed chunk.
    pub async fn get_chunk(&mut self, id: &ChunkId) -> Result<Vec<u8>> {
        match expect_ok(self.request(&Message::GetChunk { id: *id }).await?)? {
            Message::Chunk {
                id: got, sealed, ..
            } if got == *id => Ok(sealed),
            m => Err(anyhow!("expected Chunk, got {}", m.kind())),
        }
    }

    /// Every version, following pages.
    pub async fn all_versions(&mut self) -> Result<Vec<VersionEntry>> {
        let mut out: Vec<VersionEntry> = Vec::new();
        loop {
            let after = out.last().map(|v| v.version).unwrap_or(0);
            match expect_ok(
                self.request(&Message::ListVersions { after, limit: 0 })
                    .await?,
            )? {
                Message::Versions { entries, more } => {
                    out.extend(entries);
                    if !more {
                        return Ok(out);
                    }
                }
                m => bail!("expected Versions, got {}", m.kind()),
            }
        }
    }
}

/// Every file under `dir`, with its length (for "nothing written outside" checks).
pub fn snapshot_tree(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(_) => {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    out.push((p, len));
                }
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}
