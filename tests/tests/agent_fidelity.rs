//! Files as the system holds them: a sparse file restores with its holes, hard links
//! restore as links, an extended attribute set later makes a version and comes back, a
//! FIFO and a device node are made again by a root restore, and a repository written by
//! the release before manifest format 2 still restores (issue 23).

mod support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use coffer_agent::fidelity::xattr;
use coffer_common::manifest::Xattr;
use support::*;

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// Bytes allocated to a file.
fn allocated(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p)?.blocks() * 512)
}

/// BLAKE3 of everything `r` gives.
fn hash_reader(mut r: impl Read) -> Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(*h.finalize().as_bytes());
        }
        h.update(&buf[..n]);
    }
}

/// Starts `run --metrics` on a free loopback port; returns its address.
fn run_with_metrics(agent: &mut Agent) -> Result<std::net::SocketAddr> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(agent.dir.join("agent.log"))?;
    let child = agent
        .cmd()
        .args(["run", "--metrics", &addr.to_string(), "--config"])
        .arg(&agent.config)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()?;
    agent.proc = Proc(Some(child));
    Ok(addr)
}

/// Bytes the agent has read from watched files (`coffer_agent_read_bytes`).
fn bytes_read(addr: std::net::SocketAddr) -> Result<u64> {
    wait_for("/metrics", T, || {
        let mut s = std::net::TcpStream::connect(addr).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        resp.lines().find_map(|l| {
            let v = l
                .strip_prefix("coffer_agent_read_bytes_total ")
                .or_else(|| l.strip_prefix("coffer_agent_read_bytes "))?;
            v.trim().parse::<f64>().ok().map(|v| v as u64)
        })
    })
}

fn versions(agent: &Agent, path: &str) -> Result<usize> {
    let o = agent
        .cmd()
        .args(["versions", "--config"])
        .arg(&agent.config)
        .arg(path)
        .output()?;
    Ok(String::from_utf8_lossy(&o.stdout).lines().count())
}

/// A 1 GiB file with 1 MiB of data at 512 MiB: backed up without reading its holes,
/// restored with under 8 MiB allocated and the same bytes (through `--to -` too, its holes
/// streamed as zeros); a file of zeros that is not sparse restores as it was, allocated.
#[test]
fn a_sparse_file_restores_with_its_holes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::create_dir_all(&agent.watch)?;
    let img = agent.watch.join("disk.img");
    let payload = data(MIB as usize, 23);
    {
        let mut f = std::fs::File::create(&img)?;
        f.set_len(1 << 30)?;
        f.seek(SeekFrom::Start(512 * MIB))?;
        f.write_all(&payload)?;
        f.sync_all()?;
    }
    if allocated(&img)? >= 8 * MIB {
        eprintln!("SKIP: this file system does not keep holes");
        return Ok(());
    }
    let zeros = agent.watch.join("zeros.bin");
    std::fs::write(&zeros, vec![0u8; 4 << 20])?;
    std::fs::File::open(&zeros)?.sync_all()?;
    let want = {
        let mut h = blake3::Hasher::new();
        h.update(&vec![0u8; 512 * MIB as usize]);
        h.update(&payload);
        h.update(&vec![0u8; (511 * MIB) as usize]);
        *h.finalize().as_bytes()
    };
    let metrics = run_with_metrics(&mut agent)?;
    agent.wait_settled(2, T)?;
    // The holes were not read, and the receiver holds the data, not the holes.
    let read = bytes_read(metrics)?;
    assert!(read < 8 * MIB, "read {read} bytes");
    assert!(
        rcv.pack_bytes("r") < 8 * MIB,
        "packs hold {} bytes",
        rcv.pack_bytes("r")
    );

    let out = tmp.path().join("out");
    let r = agent.restore(&out, &[])?;
    ok(&r);
    let back = out.join("w/disk.img");
    assert_eq!(std::fs::metadata(&back)?.len(), 1 << 30);
    let used = allocated(&back)?;
    assert!(used < 8 * MIB, "restored with {used} bytes allocated");
    // The data is where it was, and only there.
    let f = std::fs::File::open(&back)?;
    let first = nix::unistd::lseek(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        0,
        nix::unistd::Whence::SeekData,
    )?;
    assert!(
        (first as u64) <= 512 * MIB && (first as u64) > 500 * MIB,
        "first data at {first}"
    );
    assert_eq!(
        hash_reader(std::fs::File::open(&back)?)?,
        want,
        "restored bytes differ"
    );
    // The dense file of zeros stays dense.
    let z = out.join("w/zeros.bin");
    assert_eq!(std::fs::read(&z)?, vec![0u8; 4 << 20]);
    assert!(allocated(&z)? >= 4 << 20, "a dense file came back sparse");

    // To stdout: the holes as zeros.
    let mut child = agent
        .cmd()
        .args(["restore", "--config"])
        .arg(&agent.config)
        .args(["--to", "-", "w/disk.img"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let got = hash_reader(stdout)?;
    let status = child.wait()?;
    assert!(status.success(), "restore --to - failed");
    assert_eq!(got, want, "bytes to stdout differ");
    Ok(())
}

/// Two names of one file (a large and a small pair) restore as one inode each when
/// restored together; one restored alone is a plain file with the content.
#[test]
fn hard_links_restore_as_links() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::create_dir_all(agent.watch.join("sub"))?;
    let big = data(3 * MIB as usize, 5);
    std::fs::write(agent.watch.join("a.bin"), &big)?;
    std::fs::hard_link(agent.watch.join("a.bin"), agent.watch.join("sub/b.bin"))?;
    std::fs::write(agent.watch.join("c.txt"), b"small and linked")?;
    std::fs::hard_link(agent.watch.join("c.txt"), agent.watch.join("d.txt"))?;
    std::fs::write(agent.watch.join("alone.txt"), b"one name")?;
    agent.run()?;
    agent.wait_settled(5, T)?;

    let out = tmp.path().join("out");
    assert_eq!(agent.restore_all_and_compare(&out)?, 5);
    let ino = |p: &str| -> Result<(u64, u64)> {
        let m = std::fs::metadata(out.join("w").join(p))?;
        Ok((m.ino(), m.nlink()))
    };
    let (a, an) = ino("a.bin")?;
    assert_eq!(
        ino("sub/b.bin")?.0,
        a,
        "a.bin and sub/b.bin are not one inode"
    );
    assert_eq!(an, 2);
    assert_eq!(ino("c.txt")?.0, ino("d.txt")?.0, "c.txt and d.txt");
    assert_eq!(ino("alone.txt")?.1, 1);

    // One name alone: a plain file with the content.
    let one = tmp.path().join("one");
    ok(&agent.restore(&one, &["w/sub/b.bin"])?);
    let p = one.join("w/sub/b.bin");
    assert_eq!(std::fs::read(&p)?, big);
    assert_eq!(std::fs::metadata(&p)?.nlink(), 1);
    Ok(())
}

/// A `user.*` attribute set after the first backup makes a second version (the content
/// unchanged) and is restored.
#[test]
fn an_attribute_set_later_makes_a_version_and_restores() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::create_dir_all(&agent.watch)?;
    let f = agent.watch.join("tagged.txt");
    std::fs::write(&f, b"content stays the same")?;
    let big = agent.watch.join("big.bin");
    std::fs::write(&big, data(2 * MIB as usize, 9))?;
    let tag = |p: &Path, v: &[u8]| {
        let file = std::fs::File::open(p)?;
        let w = xattr::restore_fd(
            &file,
            &[Xattr {
                name: b"user.color".to_vec(),
                value: v.to_vec(),
            }],
            p,
        );
        if w.is_empty() {
            Ok(())
        } else {
            bail!("{w:?}")
        }
    };
    let probe = agent.watch.with_file_name("probe");
    std::fs::write(&probe, b"")?;
    if tag(&probe, b"x").is_err() {
        eprintln!("SKIP: no user attributes on this file system");
        return Ok(());
    }
    let metrics = run_with_metrics(&mut agent)?;
    agent.wait_settled(2, T)?;
    assert_eq!(versions(&agent, "w/tagged.txt")?, 1);
    let read_before = bytes_read(metrics)?;
    assert!(read_before >= 2 * MIB, "read {read_before} bytes");
    tag(&f, b"red")?;
    tag(&big, b"blue")?;
    wait_for("a second version of each", T, || {
        (versions(&agent, "w/tagged.txt").ok()? == 2 && versions(&agent, "w/big.bin").ok()? == 2)
            .then_some(())
    })
    .with_context(|| tail(&agent.log()))?;
    agent.wait_settled(2, T)?;
    // The attribute change did not read the content again.
    let read_after = bytes_read(metrics)?;
    assert!(
        read_after - read_before < MIB,
        "read {} more bytes for an attribute change",
        read_after - read_before
    );
    let out = tmp.path().join("out");
    assert_eq!(agent.restore_all_and_compare(&out)?, 2);
    let got = xattr::read_path(&out.join("w/tagged.txt"), false)?;
    assert_eq!(
        got,
        vec![Xattr {
            name: b"user.color".to_vec(),
            value: b"red".to_vec()
        }]
    );
    let got = xattr::read_path(&out.join("w/big.bin"), false)?;
    assert_eq!(got[0].value, b"blue");
    // The first version, before the attribute, restores without it.
    let v = agent
        .cmd()
        .args(["versions", "--json", "--config"])
        .arg(&agent.config)
        .arg("w/tagged.txt")
        .output()?;
    let doc: serde_json::Value = serde_json::from_str(&ok(&v))?;
    let list = &doc[0]["versions"];
    assert_eq!(list[0]["content_hash"], list[1]["content_hash"]);
    assert_eq!(list[1]["xattrs"][0], "user.color");
    Ok(())
}

/// A FIFO, and as root a character device, are backed up as such and made again by a
/// root restore; a restore by another user skips the device with a warning.
#[test]
fn a_root_restore_recreates_a_fifo_and_a_device() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: not root");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::create_dir_all(&agent.watch)?;
    std::fs::write(agent.watch.join("plain.txt"), b"plain")?;
    nix::unistd::mkfifo(
        &agent.watch.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )?;
    let dev = nix::sys::stat::makedev(1, 3);
    let made_dev = nix::sys::stat::mknod(
        &agent.watch.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        dev,
    )
    .is_ok();
    agent.run()?;
    agent.wait_settled(if made_dev { 3 } else { 2 }, T)?;
    let out = tmp.path().join("out");
    let r = agent.restore(&out, &[])?;
    ok(&r);
    let m = std::fs::symlink_metadata(out.join("w/pipe"))?;
    assert!(m.file_type().is_fifo(), "pipe is not a FIFO");
    assert_eq!(m.mode() & 0o7777, 0o640);
    if made_dev {
        let m = std::fs::symlink_metadata(out.join("w/null"))?;
        assert!(m.file_type().is_char_device(), "null is not a device");
        assert_eq!(m.rdev(), dev);
    }
    assert_eq!(std::fs::read(out.join("w/plain.txt"))?, b"plain");
    Ok(())
}

/// A repository written by the release before manifest format 2 (its receiver root, agent
/// state and config, made by those binaries: `tests/fixtures/format1/`) restores its files
/// byte-exact with today's binaries.
#[test]
fn a_repository_of_the_first_manifest_format_still_restores() -> Result<()> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/format1");
    let tmp = tempfile::tempdir()?;
    copy_tree(&fixture.join("rcv"), &tmp.path().join("rcv"))?;
    copy_tree(&fixture.join("agent"), &tmp.path().join("agent"))?;
    let mut rcv = Receiver {
        root: tmp.path().join("rcv"),
        key: std::fs::read_to_string(fixture.join("receiver.pub"))?
            .trim()
            .to_string(),
        addr: "127.0.0.1:0".into(),
        proc: Proc(None),
    };
    rcv.serve()?;
    let config = tmp.path().join("agent/agent.toml");
    let text = std::fs::read_to_string(fixture.join("agent.toml.in"))?
        .replace("@RECEIVER@", &rcv.addr)
        .replace(
            "@STATE@",
            &tmp.path().join("agent/state").display().to_string(),
        )
        .replace("@WATCH@", &tmp.path().join("agent/w").display().to_string());
    std::fs::write(&config, text)?;
    let agent = Agent {
        dir: tmp.path().join("agent"),
        config,
        watch: tmp.path().join("agent/w"),
        key: String::new(),
        proc: Proc(None),
    };
    let out = tmp.path().join("out");
    let r = agent.restore(&out, &[])?;
    ok(&r);
    // The same bytes and links as the files the old agent backed up (kept beside it).
    let n = same_bytes(&fixture.join("agent/w"), &out.join("w"))?;
    assert_eq!(n, 5, "files compared");
    Ok(())
}

/// Compares the files and symlinks under `a` with those under `b` (bytes and targets,
/// not times: a checkout sets its own); returns how many.
fn same_bytes(a: &Path, b: &Path) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(a)? {
        let e = e?;
        let (pa, pb) = (e.path(), b.join(e.file_name()));
        let t = e.file_type()?;
        if t.is_dir() {
            n += same_bytes(&pa, &pb)?;
        } else if t.is_symlink() {
            assert_eq!(
                std::fs::read_link(&pa)?,
                std::fs::read_link(&pb)?,
                "{}",
                pa.display()
            );
            n += 1;
        } else {
            let got = std::fs::read(&pb).with_context(|| pb.display().to_string())?;
            assert!(std::fs::read(&pa)? == got, "{} differs", pb.display());
            n += 1;
        }
    }
    Ok(n)
}

/// Copies a fixture tree, private as the daemons make it (a checkout gives its own modes).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let t = to.join(e.file_name());
        let ft = e.file_type()?;
        if ft.is_dir() {
            copy_tree(&e.path(), &t)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path())?, &t)?;
        } else {
            std::fs::copy(e.path(), &t)?;
            std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}
