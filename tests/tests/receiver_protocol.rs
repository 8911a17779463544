//! The receiver's protocol, end to end against the real binary: puts, commits, reads,
//! idempotence, version numbering, presence queries, escrow, authorization.

use std::collections::HashSet;

use anyhow::{Context, Result};
use coffer_common::chunk::ChunkId;
use coffer_common::wire::{ErrorCode, Message};
use coffer_tests::*;

async fn setup(tmp: &tempfile::TempDir) -> Result<(Receiver, TestAgent)> {
    let rcv = Receiver::init(&tmp.path().join("root"))?;
    let agent = TestAgent::new()?;
    rcv.authorize("laptop", &agent.public_key())?;
    let mut rcv = rcv;
    rcv.serve()?;
    Ok((rcv, agent))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_stored_acknowledged_and_read_back() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp).await?;
    let mut c = rcv.connect(&agent).await?;
    assert_eq!(c.repo, "laptop");
    let files = [
        agent.seal_file("w/empty", b"")?,
        agent.seal_file("w/small", b"hello")?,
        agent.seal_file("w/big", &data(5 << 20, 1))?,
    ];
    let mut versions = Vec::new();
    for f in &files {
        versions.push(c.upload(f).await?);
    }
    assert_eq!(versions, vec![1, 2, 3], "versions are numbered 1, 2, 3");
    for f in &files {
        agent.verify(&mut c, f).await?;
    }
    // Manifests come back as sent, in version order, and open with the agent's key.
    let listed = c.all_versions().await?;
    assert_eq!(listed.len(), 3);
    for (e, f) in listed.iter().zip(&files) {
        assert_eq!(e.file_id, f.file_id);
        assert_eq!(e.manifest, f.manifest);
        agent.crypto.open_manifest(&f.file_id, &e.manifest)?;
    }
    // And survive a restart.
    drop(c);
    let mut rcv = rcv;
    rcv.terminate(std::time::Duration::from_secs(20))?;
    rcv.serve()?;
    let mut c = rcv.connect(&agent).await?;
    for f in &files {
        agent.verify(&mut c, f).await?;
    }
    let st = rcv.status()?;
    let r = &st["repositories"][0];
    assert_eq!(r["name"], "laptop");
    assert_eq!(r["files"], 3);
    assert_eq!(r["versions"], 3);
    assert!(r["chunks"].as_u64().unwrap_or(0) >= 3);
    assert!(r["stored_bytes"].as_u64().unwrap_or(0) > 5 << 20);
    assert!(r["last_commit_at"].is_string());
    assert_eq!(st["serve_running"], true);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommit_is_idempotent_and_versions_are_monotonic() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp).await?;
    let mut c = rcv.connect(&agent).await?;
    let f = agent.seal_file("w/a", b"content a")?;
    let v1 = c.upload(&f).await?;
    let (again, _) = c.commit(&f).await?;
    assert_eq!(
        again, v1,
        "a repeated commit id returns the existing version"
    );
    // A new version of the same file, and one of another file, get higher numbers.
    let f2 = agent.seal_file("w/a", b"content a, edited")?;
    let v2 = c.upload(&f2).await?;
    let g = agent.seal_file("w/b", b"content b")?;
    let v3 = c.upload(&g).await?;
    assert!(v1 < v2 && v2 < v3, "{v1} {v2} {v3}");
    // Within one pipelined batch, the same commit twice gets one version.
    let h = agent.seal_file("w/c", b"content c")?;
    for (id, s) in &h.chunks {
        c.put(id, s).await?;
    }
    c.ch.send(&h.commit_message()).await?;
    c.ch.send(&h.commit_message()).await?;
    let (a, b) = (c.ch.recv().await?, c.ch.recv().await?);
    match (a, b) {
        (Message::FileAcked { version: x, .. }, Message::FileAcked { version: y, .. }) => {
            assert_eq!(x, y);
            assert!(x > v3);
        }
        other => panic!("expected two FileAcked, got {other:?}"),
    }
    // After a reconnect the old commit id still maps to its version.
    drop(c);
    let mut c = rcv.connect(&agent).await?;
    assert_eq!(c.commit(&f).await?.0, v1);
    assert_eq!(c.all_versions().await?.len(), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_queries_dedup_and_missing_chunks() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp).await?;
    let mut c = rcv.connect(&agent).await?;
    let f = agent.seal_file("w/x", &data(3 << 20, 7))?;
    let ids = f.ids();
    assert!(ids.len() >= 2);
    assert_eq!(c.have(&ids).await?, ids, "everything is missing at first");
    let (id0, s0) = &f.chunks[0];
    c.put(id0, s0).await?;
    let missing = c.have(&ids).await?;
    assert_eq!(missing, ids[1..].to_vec(), "only the chunks not yet sent");
    // A commit referencing absent chunks is refused, not acknowledged.
    let r = c.request(&f.commit_message()).await?;
    assert_eq!(error_code(&r), Some(ErrorCode::MissingChunks), "{r:?}");
    for (id, s) in &f.chunks[1..] {
        c.put(id, s).await?;
    }
    c.commit(&f).await?;
    let before = rcv.status()?["repositories"][0]["chunk_bytes"].clone();
    // Sending a present chunk again (another session too) stores nothing new.
    let mut c2 = rcv.connect(&agent).await?;
    c2.put(id0, s0).await?;
    let g = agent.seal_file("w/y", &f.plain)?;
    assert!(
        c2.have(&g.ids()).await?.is_empty(),
        "same content, no upload"
    );
    c2.commit(&g).await?;
    drop((c, c2));
    assert_eq!(rcv.status()?["repositories"][0]["chunk_bytes"], before);
    // Unknown chunks are NotFound.
    let mut c = rcv.connect(&agent).await?;
    let r = c
        .request(&Message::GetChunk {
            id: ChunkId([9; 32]),
        })
        .await?;
    assert_eq!(error_code(&r), Some(ErrorCode::NotFound), "{r:?}");
    // A sealed chunk larger than the limit is refused.
    let r = c
        .request(&Message::put_chunk(
            ChunkId([1; 32]),
            vec![0; coffer_common::chunk::MAX_SEALED + 1],
        ))
        .await?;
    assert_eq!(error_code(&r), Some(ErrorCode::Malformed), "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp).await?;
    let c = rcv.connect(&agent).await?;
    let files: Vec<SealedFile> = (0..300)
        .map(|i| agent.seal_file(&format!("w/f{i}"), &data(100 + i * 37, i as u64)))
        .collect::<Result<_>>()?;
    let (mut tx, mut rx) = c.ch.split();
    let expected: Vec<Message> = {
        let mut v = Vec::new();
        for f in &files {
            for (id, _) in &f.chunks {
                v.push(Message::Stored { id: *id });
            }
            v.push(f.commit_message());
            v.push(Message::HaveChunks { ids: f.ids() });
        }
        v
    };
    let sender = {
        let files = files.clone();
        tokio::spawn(async move {
            for f in &files {
                for (id, s) in &f.chunks {
                    tx.send(&Message::put_chunk(*id, s.clone())).await?;
                }
                tx.send(&f.commit_message()).await?;
                tx.send(&Message::HaveChunks { ids: f.ids() }).await?;
            }
            anyhow::Ok(tx)
        })
    };
    let mut last_version = 0;
    let mut seen = HashSet::new();
    for exp in &expected {
        let got = rx.recv().await.context("reply")?;
        match (exp, &got) {
            (Message::Stored { id }, Message::Stored { id: g }) => assert_eq!(id, g),
            (
                Message::CommitFile { commit_id, .. },
                Message::FileAcked {
                    commit_id: g,
                    version,
                    ..
                },
            ) => {
                assert_eq!(commit_id, g, "acks come in request order");
                assert!(*version > last_version);
                last_version = *version;
                seen.insert(*version);
            }
            (Message::HaveChunks { .. }, Message::Missing { ids }) => {
                assert!(ids.is_empty(), "chunks just stored are present");
            }
            _ => panic!("expected the reply to {}, got {got:?}", exp.kind()),
        }
    }
    assert_eq!(seen.len(), 300);
    let _tx = sender.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_escrow_round_trips() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp).await?;
    let mut c = rcv.connect(&agent).await?;
    assert_eq!(
        c.request(&Message::GetKeyFile).await?,
        Message::KeyFile { data: None }
    );
    let kf = key_file(3);
    assert_eq!(
        c.request(&Message::PutKeyFile { data: kf.clone() }).await?,
        Message::KeyFileStored
    );
    // A second machine authorized for the same repository fetches it.
    let other = TestAgent::new()?;
    rcv.authorize("laptop", &other.public_key())?;
    let mut c2 = rcv.connect(&other).await?;
    assert_eq!(
        c2.request(&Message::GetKeyFile).await?,
        Message::KeyFile {
            data: Some(kf.clone())
        }
    );
    let r = c2
        .request(&Message::PutKeyFile {
            data: vec![0; 4097],
        })
        .await?;
    assert_eq!(error_code(&r), Some(ErrorCode::Malformed), "{r:?}");
    // Not a key file: refused, nothing replaced.
    for junk in [Vec::new(), data(144, 4)] {
        let r = c2.request(&Message::PutKeyFile { data: junk }).await?;
        assert_eq!(error_code(&r), Some(ErrorCode::Malformed), "{r:?}");
    }
    // Another key file joins the history; the same one again is a no-op.
    let kf2 = key_file(4);
    for _ in 0..2 {
        assert_eq!(
            c2.request(&Message::PutKeyFile { data: kf2.clone() })
                .await?,
            Message::KeyFileStored
        );
    }
    match c.request(&Message::GetKeyFiles).await? {
        Message::KeyFiles { files } => {
            let got: Vec<_> = files.into_iter().map(|f| (f.number, f.data)).collect();
            assert_eq!(got, [(2, kf2.clone()), (1, kf)]);
        }
        m => anyhow::bail!("expected KeyFiles, got {m:?}"),
    }
    assert_eq!(
        c.request(&Message::GetKeyFile).await?,
        Message::KeyFile { data: Some(kf2) }
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_and_revoked_keys_are_refused_without_restart() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp).await?;
    let stranger = TestAgent::new()?;
    let mut ch = stranger.handshake(rcv.addr()?, &rcv.public_key).await?;
    match ch.recv().await? {
        Message::Error {
            code: ErrorCode::Unauthorized,
            message,
        } => assert!(
            message.contains(&stranger.public_key().to_string()),
            "{message}"
        ),
        m => panic!("expected Unauthorized, got {m:?}"),
    }
    let log = wait_for(
        "the refusal in the log",
        std::time::Duration::from_secs(10),
        || {
            let l = rcv.log();
            l.contains(&stranger.public_key().to_string()).then_some(l)
        },
    )?;
    assert!(log.contains("not authorized"), "{log}");
    // An agent that pipelines its Hello right after the handshake (as the real one does)
    // still reads the refusal rather than a connection reset.
    for _ in 0..20 {
        let mut ch = stranger.handshake(rcv.addr()?, &rcv.public_key).await?;
        let hello = Message::Hello {
            protocol: coffer_common::wire::PROTOCOL_VERSION,
            agent_name: "x".into(),
            software: "x".into(),
        };
        ch.send(&hello).await?;
        ch.send(&Message::GetKeyFile).await?;
        let m = ch.recv().await?;
        assert_eq!(error_code(&m), Some(ErrorCode::Unauthorized), "{m:?}");
    }
    // The authorized agent works; a session open at revocation time is not needed again.
    let mut c = rcv.connect(&agent).await?;
    c.upload(&agent.seal_file("w/a", b"a")?).await?;
    rcv.revoke(&agent.public_key())?;
    let mut ch = agent.handshake(rcv.addr()?, &rcv.public_key).await?;
    let m = ch.recv().await?;
    assert_eq!(error_code(&m), Some(ErrorCode::Unauthorized), "{m:?}");
    // Authorized again (and a new key on the same repository) works at once.
    rcv.authorize("laptop", &agent.public_key())?;
    let mut c = rcv.connect(&agent).await?;
    assert_eq!(c.all_versions().await?.len(), 1);
    // A wrong protocol version in Hello is a clear error.
    let mut ch = agent.handshake(rcv.addr()?, &rcv.public_key).await?;
    let r = ch
        .request(&Message::Hello {
            protocol: 99,
            agent_name: "x".into(),
            software: "x".into(),
        })
        .await?;
    match r {
        Message::Error {
            code: ErrorCode::ProtocolVersion,
            message,
        } => assert!(message.contains("99"), "{message}"),
        m => panic!("expected ProtocolVersion, got {m:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_share_a_repository_and_dedup() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::init(&tmp.path().join("root"))?;
    // Small packs: the writers also race over pack rotation.
    rcv.set_config("listen = \"127.0.0.1:0\"\npack_max_bytes = 1048576\n")?;
    let first = TestAgent::new()?;
    rcv.authorize("shared", &first.public_key())?;
    rcv.serve()?;
    // Every writer is another machine of the same repository, with its own connection key
    // and the same data keys, so their common files dedup.
    let master = coffer_common::keys::MasterSecret::generate()?;
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let agent = TestAgent {
            keypair: coffer_common::channel::StaticKeypair::generate()?,
            crypto: coffer_common::chunk::Crypto::new(&master.sub_keys()),
        };
        rcv.authorize("shared", &agent.public_key())?;
        let addr = rcv.addr()?;
        let key = rcv.public_key;
        tasks.push(tokio::spawn(async move {
            let mut c = agent.connect(addr, &key).await?;
            let mut files = Vec::new();
            for i in 0..40u64 {
                // Half of each writer's files hold the same bytes as the others'.
                let seed = if i % 2 == 0 { i } else { w * 1000 + i };
                let f = agent.seal_file(
                    &format!("w{w}/{i}"),
                    &data(20_000 + 9_000 * i as usize, seed),
                )?;
                c.upload(&f).await?;
                files.push(f);
            }
            for f in &files {
                agent.verify(&mut c, f).await?;
            }
            anyhow::Ok(files.iter().flat_map(|f| f.ids()).collect::<Vec<_>>())
        }));
    }
    let mut distinct = HashSet::new();
    let mut total = 0;
    for t in tasks {
        let ids = t.await??;
        total += 40;
        distinct.extend(ids);
    }
    let st = rcv.status()?;
    assert_eq!(
        st["repositories"][0]["chunks"].as_u64(),
        Some(distinct.len() as u64),
        "each distinct chunk stored once"
    );
    let mut c = rcv.connect(&first).await?;
    let versions = c.all_versions().await?;
    assert_eq!(versions.len(), total);
    let mut numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
    numbers.dedup();
    assert_eq!(numbers.len(), total, "version numbers are unique");
    assert_eq!(numbers, (1..=total as u64).collect::<Vec<_>>());
    drop(c);
    rcv.kill9();
    let o = rcv.run("scrub", &[])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_files_stores_and_acknowledges_many_files_in_one_request() -> Result<()> {
    use coffer_common::wire::{CommitResult, FileCommit, SealedChunk};
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp).await?;
    let mut c = rcv.connect(&agent).await?;
    let files: Vec<_> = (0..50)
        .map(|i| agent.seal_file(&format!("w/f{i}"), &data(100 + i * 37, i as u64)))
        .collect::<Result<_>>()?;
    let commit = |f: &SealedFile| FileCommit {
        commit_id: f.commit_id,
        file_id: f.file_id,
        manifest: f.manifest.clone(),
        chunks: f.ids(),
        deleted: false,
    };
    let chunks: Vec<SealedChunk> = files
        .iter()
        .flat_map(|f| f.chunks.iter())
        .map(|(id, sealed)| SealedChunk {
            id: *id,
            sealed: sealed.clone(),
        })
        .collect();
    // One commit references a chunk that was never sent: only that one is refused.
    let orphan = agent.seal_file("w/orphan", b"never sent")?;
    let mut commits: Vec<FileCommit> = files.iter().map(commit).collect();
    commits.push(commit(&orphan));
    let req = Message::PutFiles { chunks, commits };
    let results = match c.request(&req).await? {
        Message::FilesAcked { results } => results,
        m => anyhow::bail!("expected FilesAcked, got {m:?}"),
    };
    assert_eq!(results.len(), 51, "one result per commit, in order");
    let mut versions = Vec::new();
    for (r, f) in results.iter().zip(&files) {
        match r {
            CommitResult::Acked {
                commit_id, version, ..
            } => {
                assert_eq!(*commit_id, f.commit_id);
                versions.push(*version);
            }
            r => anyhow::bail!(
                "{} not acknowledged: {r:?}",
                String::from_utf8_lossy(&f.path)
            ),
        }
    }
    assert_eq!(versions, (1..=50).collect::<Vec<u64>>());
    match &results[50] {
        CommitResult::Failed { code, message } => {
            assert_eq!(*code, ErrorCode::MissingChunks);
            assert!(message.contains("does not have"), "{message}");
        }
        r => anyhow::bail!("the orphan commit was acknowledged: {r:?}"),
    }
    // Every file reads back; repeating the request changes nothing (idempotent).
    for f in &files {
        agent.verify(&mut c, f).await?;
    }
    let again = match c.request(&req).await? {
        Message::FilesAcked { results } => results,
        m => anyhow::bail!("expected FilesAcked, got {m:?}"),
    };
    assert_eq!(&again[..50], &results[..50], "same versions on a repeat");
    assert_eq!(c.all_versions().await?.len(), 50);
    // A chunk of an impossible size is refused without ending the session.
    let bad = Message::PutFiles {
        chunks: vec![SealedChunk {
            id: ChunkId([9; 32]),
            sealed: vec![1, 2, 3],
        }],
        commits: vec![],
    };
    let r = c.request(&bad).await?;
    assert_eq!(error_code(&r), Some(ErrorCode::Malformed), "{r:?}");
    assert_eq!(c.all_versions().await?.len(), 50, "the session goes on");
    Ok(())
}
