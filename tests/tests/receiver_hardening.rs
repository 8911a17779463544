//! Peers that try to exhaust the receiver (issue 27): requests full of repeated ids.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use coffer_common::chunk::ChunkId;
use coffer_common::wire::{ErrorCode, Message, MAX_IDS};
use coffer_tests::*;

const T: Duration = Duration::from_secs(20);

async fn setup(tmp: &tempfile::TempDir) -> Result<(Receiver, TestAgent)> {
    let mut rcv = Receiver::init(&tmp.path().join("root"))?;
    let agent = TestAgent::new()?;
    rcv.authorize("r", &agent.public_key())?;
    rcv.serve()?;
    Ok((rcv, agent))
}

/// 65,536 ids: `known` twice and 32,767 unknown ids twice each, in an interleaved order.
fn many_repeated_ids(known: ChunkId) -> (Vec<ChunkId>, Vec<ChunkId>) {
    let unknown: Vec<ChunkId> = (0..MAX_IDS / 2 - 1)
        .map(|i| ChunkId(*blake3::hash(&(i as u64).to_le_bytes()).as_bytes()))
        .collect();
    let mut ids = vec![known];
    ids.extend(&unknown);
    ids.push(known);
    ids.extend(unknown.iter().rev());
    assert_eq!(ids.len(), MAX_IDS);
    (ids, unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_most_ids_a_request_may_carry_repeated_are_answered_promptly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp).await?;
    let mut c = rcv.connect(&agent).await?;
    let f = agent.seal_file("w/known", b"a chunk the receiver has")?;
    c.upload(&f).await?;
    let known = f.ids()[0];
    let (ids, unknown) = many_repeated_ids(known);
    let started = Instant::now();
    // Missing: each unknown id once, in the order first asked.
    assert_eq!(c.have(&ids).await?, unknown);
    // A commit referencing them: refused, counting each missing chunk once.
    let mut g = agent.seal_file("w/many", b"x")?;
    g.chunks.clear();
    let m = Message::CommitFile {
        commit_id: g.commit_id,
        file_id: g.file_id,
        manifest: g.manifest.clone(),
        chunks: ids,
    };
    match c.request(&m).await? {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::MissingChunks);
            assert!(
                message.contains(&format!("{} chunk(s)", unknown.len())),
                "{message}"
            );
        }
        m => bail!("expected MissingChunks, got {m:?}"),
    }
    // A commit referencing one present chunk 65,536 times is acknowledged.
    let m = Message::CommitFile {
        commit_id: g.commit_id,
        file_id: g.file_id,
        manifest: g.manifest.clone(),
        chunks: vec![known; MAX_IDS],
    };
    match c.request(&m).await? {
        Message::FileAcked { commit_id, .. } if commit_id == g.commit_id => {}
        m => bail!("expected FileAcked, got {m:?}"),
    }
    let took = started.elapsed();
    assert!(took < T, "three requests took {took:?}");
    Ok(())
}
