//! What `prune` asks of the index: removals (with the write path's transaction, through
//! [`Index::add_recorded_removing`]), the chunks no version references, each pack's live
//! bytes, and moving records' locations when compaction rewrites a pack.
//!
//! Prune reads through a connection of its own ([`Index::open_scan`]), which holds its
//! working sets in TEMP tables (on disk, behind a small page cache), never in memory:
//! `gone` (the versions it removes), `live` (every chunk a remaining version references,
//! built by one sequential scan of `version_chunks`), `snap` (each pack's indexed length
//! when `live` was built) and `moving` (the commit records in the packs compaction
//! rewrites, found by one scan of `versions`).

use coffer_common::chunk::{ChunkId, FileId};
use coffer_common::wire::CommitId;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::{blob_err, sql_err, Index, IndexError, RecordedRemoval, SCHEMA};
use crate::store::{PackNo, RECORD_HEADER_LEN};

/// Page cache of prune's own connection (and of its TEMP tables), KiB.
const SCAN_CACHE_KIB: i64 = 8 << 10;

/// One version, as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileVersion {
    pub file_id: FileId,
    pub version: u64,
    pub commit_id: CommitId,
    /// The receiver's commit time, Unix seconds.
    pub commit_time: i64,
    /// `None`: committed before the flag existed.
    pub deleted: Option<bool>,
}

/// A pack's recorded length and the bytes of the records in it the index still holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackUse {
    pub pack: PackNo,
    /// Its recorded (durable, indexed) length, header included.
    pub length: u64,
    /// Bytes of its records that the index references (headers included).
    pub live: u64,
}

impl PackUse {
    /// Bytes of records nothing references.
    pub fn unused(&self) -> u64 {
        self.length
            .saturating_sub(crate::store::PACK_HEADER_LEN)
            .saturating_sub(self.live)
    }

    /// The share of its records' bytes that nothing references (0 for an empty pack).
    pub fn unused_share(&self) -> f64 {
        let records = self.length.saturating_sub(crate::store::PACK_HEADER_LEN);
        if records == 0 {
            0.0
        } else {
            self.unused() as f64 / records as f64
        }
    }
}

/// What a record a pack holds is, for compaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// A chunk record (its id).
    Chunk(ChunkId),
    /// A version's commit record.
    Version(u64),
    /// A removal record (the BLAKE3 of its body).
    Removal([u8; 32]),
}

/// A live record of a pack: what it is, where, and how long (header included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Moved {
    pub what: Held,
    pub from: (PackNo, u64),
    pub len: u64,
    /// Where its copy is (set by compaction).
    pub to: (PackNo, u64),
}

/// Registers a removal record and forgets the versions it names, inside `tx`. Returns how
/// many versions were forgotten.
pub(super) fn apply_removal(tx: &Connection, r: &RecordedRemoval) -> rusqlite::Result<u64> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO removals (hash, pack, offset, len) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![&r.hash[..], r.at.0 .0, r.at.1, r.record_len()])?;
    let mut find = tx.prepare_cached(
        "SELECT version FROM versions WHERE file_id = ?1 AND commit_id = ?2 AND version <= ?3",
    )?;
    let mut del_refs = tx.prepare_cached("DELETE FROM version_chunks WHERE version = ?1")?;
    let mut del = tx.prepare_cached("DELETE FROM versions WHERE version = ?1")?;
    let mut note = tx.prepare_cached(
        "INSERT OR IGNORE INTO removed (file_id, commit_id, version) VALUES (?1, ?2, ?3)",
    )?;
    let mut gone = 0;
    for e in &r.record.removed {
        let versions: Vec<u64> = find
            .query_map(params![e.file_id, e.commit_id, e.version], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        for v in versions {
            del_refs.execute([v])?;
            gone += del.execute([v])? as u64;
        }
        note.execute(params![e.file_id, e.commit_id, e.version])?;
    }
    Ok(gone)
}

impl Index {
    /// True when a removal names commit `commit_id` of file `file_id` at `version` or
    /// above: a commit record of it at `version` must not be indexed again.
    pub fn is_removed(
        &self,
        file_id: &FileId,
        commit_id: &CommitId,
        version: u64,
    ) -> Result<bool, IndexError> {
        if !self.has_removals()? {
            return Ok(false);
        }
        self.conn
            .prepare_cached(
                "SELECT 1 FROM removed WHERE file_id = ?1 AND commit_id = ?2 AND version >= ?3",
            )
            .and_then(|mut s| s.exists(params![file_id, commit_id, version]))
            .map_err(self.err())
    }

    /// True when the schema has the removal tables (a read-only open of an index not yet
    /// migrated does not).
    fn has_removals(&self) -> Result<bool, IndexError> {
        let v: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(self.err())?;
        Ok(v >= 4)
    }

    /// The newest indexed version of `file_id`.
    pub fn latest_version(&self, file_id: &FileId) -> Result<Option<u64>, IndexError> {
        self.conn
            .prepare_cached("SELECT MAX(version) FROM versions WHERE file_id = ?1")
            .and_then(|mut s| s.query_row([file_id], |r| r.get(0)))
            .map_err(self.err())
    }

    /// The highest indexed version number (0 when there is none).
    pub fn max_version(&self) -> Result<u64, IndexError> {
        let v: Option<u64> = self
            .conn
            .query_row("SELECT MAX(version) FROM versions", [], |r| r.get(0))
            .map_err(self.err())?;
        Ok(v.unwrap_or(0))
    }

    /// The chunks the versions numbered above `hi` reference (a range of the primary key:
    /// the versions indexed since `hi` was read, few while prune holds the writer lock).
    pub fn chunks_referenced_above(&self, hi: u64) -> Result<Vec<ChunkId>, IndexError> {
        self.conn
            .prepare_cached("SELECT chunk FROM version_chunks WHERE version > ?1")
            .and_then(|mut s| {
                s.query_map([hi], |r| r.get::<_, ChunkId>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(blob_err(&self.path, "a chunk id"))
    }

    /// Deletes the chunk rows of `ids` in one transaction; returns how many rows and how
    /// many bytes of records (headers included) they described.
    pub fn delete_chunks(&mut self, ids: &[ChunkId]) -> Result<(u64, u64), IndexError> {
        let e = sql_err(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(e)?;
        let (mut n, mut bytes) = (0u64, 0u64);
        {
            let mut len = tx
                .prepare_cached("SELECT len FROM chunks WHERE id = ?1")
                .map_err(e)?;
            let mut del = tx
                .prepare_cached("DELETE FROM chunks WHERE id = ?1")
                .map_err(e)?;
            for id in ids {
                let l: Option<u64> = len.query_row([id], |r| r.get(0)).optional().map_err(e)?;
                if let Some(l) = l {
                    del.execute([id]).map_err(e)?;
                    n += 1;
                    bytes += RECORD_HEADER_LEN + l;
                }
            }
        }
        tx.commit().map_err(e)?;
        Ok((n, bytes))
    }

    /// In one transaction: points every moved record's row at its copy (only where the
    /// row still points at the original), raises the recorded lengths of `packs` (the
    /// copies', synced), and forgets the packs in `done` (rewritten: nothing indexed is left
    /// in them). Returns the packs of `done` that still hold an indexed chunk (none should:
    /// they are kept).
    pub fn relocate(
        &mut self,
        moved: &[Moved],
        packs: &[(PackNo, u64)],
        done: &[PackNo],
    ) -> Result<Vec<PackNo>, IndexError> {
        let e = sql_err(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(e)?;
        let mut kept = Vec::new();
        {
            let mut chunk = tx
                .prepare_cached(
                    "UPDATE chunks SET pack = ?1, offset = ?2 WHERE id = ?3 AND pack = ?4 \
                     AND offset = ?5",
                )
                .map_err(e)?;
            let mut version = tx
                .prepare_cached(
                    "UPDATE versions SET record_pack = ?1, record_offset = ?2 WHERE version = ?3 \
                     AND record_pack = ?4 AND record_offset = ?5",
                )
                .map_err(e)?;
            let mut removal = tx
                .prepare_cached(
                    "UPDATE removals SET pack = ?1, offset = ?2 WHERE hash = ?3 AND pack = ?4 \
                     AND offset = ?5",
                )
                .map_err(e)?;
            for m in moved {
                let (to, from) = (m.to, m.from);
                match &m.what {
                    Held::Chunk(id) => chunk.execute(params![to.0 .0, to.1, id, from.0 .0, from.1]),
                    Held::Version(v) => {
                        version.execute(params![to.0 .0, to.1, v, from.0 .0, from.1])
                    }
                    Held::Removal(h) => {
                        removal.execute(params![to.0 .0, to.1, &h[..], from.0 .0, from.1])
                    }
                }
                .map_err(e)?;
            }
            let mut ins_pack = tx
                .prepare_cached(
                    "INSERT INTO packs (pack, length) VALUES (?1, ?2) \
                     ON CONFLICT (pack) DO UPDATE SET length = MAX(length, excluded.length)",
                )
                .map_err(e)?;
            for (p, len) in packs {
                ins_pack.execute(params![p.0, len]).map_err(e)?;
            }
            let mut left = tx
                .prepare_cached("SELECT 1 FROM chunks WHERE pack = ?1 LIMIT 1")
                .map_err(e)?;
            let mut forget = tx
                .prepare_cached("DELETE FROM packs WHERE pack = ?1")
                .map_err(e)?;
            for p in done {
                if left.exists([p.0]).map_err(e)? {
                    kept.push(*p);
                } else {
                    forget.execute([p.0]).map_err(e)?;
                }
            }
        }
        tx.commit().map_err(e)?;
        Ok(kept)
    }

    /// A `meta` row's value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, IndexError> {
        self.conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .map_err(self.err())
    }

    /// Sets a `meta` row.
    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<(), IndexError> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// Prune's own connection to an existing, migrated index: it reads the index and
    /// writes only its TEMP tables (created here, empty).
    pub fn open_scan(path: &std::path::Path) -> Result<Self, IndexError> {
        let e = sql_err(path);
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = SCHEMA.connect(path, flags)?;
        SCHEMA.check(&conn, path)?;
        conn.pragma_update(None, "cache_size", -SCAN_CACHE_KIB)
            .map_err(e)?;
        conn.pragma_update(None, "temp_store", "FILE").map_err(e)?;
        conn.execute_batch(&format!(
            "PRAGMA temp.cache_size = -{SCAN_CACHE_KIB};
             CREATE TEMP TABLE gone (version INTEGER PRIMARY KEY);
             CREATE TEMP TABLE live (id BLOB PRIMARY KEY) WITHOUT ROWID;
             CREATE TEMP TABLE snap (pack INTEGER PRIMARY KEY, length INTEGER NOT NULL);
             CREATE TEMP TABLE moving (pack INTEGER NOT NULL, offset INTEGER NOT NULL,
                 version INTEGER NOT NULL, len INTEGER NOT NULL, PRIMARY KEY (pack, offset))
                 WITHOUT ROWID;"
        ))
        .map_err(e)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Versions after `(file, version)` in file order, then version order: at most `limit`.
    pub fn versions_by_file_after(
        &self,
        after: Option<(FileId, u64)>,
        limit: usize,
    ) -> Result<Vec<FileVersion>, IndexError> {
        let e = sql_err(&self.path);
        let (file, version) = match after {
            Some((f, v)) => (f.0.to_vec(), v as i64),
            None => (Vec::new(), -1),
        };
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT file_id, version, commit_id, commit_time, deleted FROM versions \
                 WHERE (file_id, version) > (?1, ?2) ORDER BY file_id, version LIMIT ?3",
            )
            .map_err(e)?;
        let mut rows = s.query(params![file, version, limit as i64]).map_err(e)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(e)? {
            out.push(FileVersion {
                file_id: r.get(0).map_err(blob_err(&self.path, "a file id"))?,
                version: r.get(1).map_err(e)?,
                commit_id: r.get(2).map_err(blob_err(&self.path, "a commit id"))?,
                commit_time: r.get(3).map_err(e)?,
                deleted: r.get(4).map_err(e)?,
            });
        }
        Ok(out)
    }

    /// Notes versions as removed (or to be removed, in a dry run) in the TEMP table `gone`.
    pub fn mark_gone(&mut self, versions: &[u64]) -> Result<(), IndexError> {
        let e = sql_err(&self.path);
        let tx = self.conn.transaction().map_err(e)?;
        {
            let mut ins = tx
                .prepare_cached("INSERT OR IGNORE INTO temp.gone (version) VALUES (?1)")
                .map_err(e)?;
            for v in versions {
                ins.execute([v]).map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    /// Fills `live` with every chunk a version not in `gone` references, and `snap` with
    /// each pack's recorded length, from one state of the index (one sequential scan of
    /// `version_chunks`). Returns the highest version number in that state: a version
    /// indexed later has a higher one (they are indexed in the order numbered).
    pub fn build_live(&mut self) -> Result<u64, IndexError> {
        let e = sql_err(&self.path);
        let tx = self.conn.transaction().map_err(e)?;
        let hi: Option<u64> = tx
            .query_row("SELECT MAX(version) FROM main.versions", [], |r| r.get(0))
            .map_err(e)?;
        tx.execute_batch(
            "DELETE FROM temp.live; DELETE FROM temp.snap;
             INSERT OR IGNORE INTO temp.live (id) SELECT vc.chunk FROM main.version_chunks vc
                 WHERE NOT EXISTS (SELECT 1 FROM temp.gone g WHERE g.version = vc.version);
             INSERT INTO temp.snap (pack, length) SELECT pack, length FROM main.packs;",
        )
        .map_err(e)?;
        tx.commit().map_err(e)?;
        Ok(hi.unwrap_or(0))
    }

    /// Adds to `live` the chunks the versions numbered above `hi` reference; returns the
    /// new highest number.
    pub fn extend_live(&mut self, hi: u64) -> Result<u64, IndexError> {
        let e = sql_err(&self.path);
        let tx = self.conn.transaction().map_err(e)?;
        let new_hi: Option<u64> = tx
            .query_row("SELECT MAX(version) FROM main.versions", [], |r| r.get(0))
            .map_err(e)?;
        tx.execute(
            "INSERT OR IGNORE INTO temp.live (id) SELECT chunk FROM main.version_chunks \
             WHERE version > ?1",
            [hi],
        )
        .map_err(e)?;
        tx.commit().map_err(e)?;
        Ok(new_hi.unwrap_or(0).max(hi))
    }

    /// Chunks after `after` (in id order) that are not in `live` and were indexed when it
    /// was built (their record lies below their pack's length in `snap`): at most `limit`,
    /// with their sealed lengths.
    pub fn dead_chunks(
        &self,
        after: Option<&ChunkId>,
        limit: usize,
    ) -> Result<Vec<(ChunkId, u64)>, IndexError> {
        let e = sql_err(&self.path);
        let from = after.map(|c| c.0.to_vec()).unwrap_or_default();
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT c.id, c.len FROM main.chunks c WHERE c.id > ?1 \
                 AND NOT EXISTS (SELECT 1 FROM temp.live l WHERE l.id = c.id) \
                 AND EXISTS (SELECT 1 FROM temp.snap s WHERE s.pack = c.pack \
                     AND c.offset < s.length) \
                 ORDER BY c.id LIMIT ?2",
            )
            .map_err(e)?;
        let mut rows = s.query(params![from, limit as i64]).map_err(e)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(e)? {
            out.push((
                r.get(0).map_err(blob_err(&self.path, "a chunk id"))?,
                r.get(1).map_err(e)?,
            ));
        }
        Ok(out)
    }

    /// Every pack's recorded length and live bytes: its chunk rows, its versions' commit
    /// records and its registered removal records. With `planned`, as they will be once
    /// the versions in `gone` and the chunks not in `live` are removed (a dry run).
    pub fn pack_use(&self, planned: bool) -> Result<Vec<PackUse>, IndexError> {
        let e = sql_err(&self.path);
        let mut out: std::collections::BTreeMap<u32, PackUse> = self
            .pack_lengths()?
            .into_iter()
            .map(|(p, length)| {
                (
                    p.0,
                    PackUse {
                        pack: p,
                        length,
                        live: 0,
                    },
                )
            })
            .collect();
        let chunks = if planned {
            "SELECT c.pack, SUM(72 + c.len) FROM main.chunks c \
             WHERE EXISTS (SELECT 1 FROM temp.live l WHERE l.id = c.id) GROUP BY c.pack"
        } else {
            "SELECT pack, SUM(72 + len) FROM main.chunks GROUP BY pack"
        };
        // A commit record: header, fixed part, manifest, 32 bytes per distinct chunk.
        let versions = format!(
            "SELECT v.record_pack, SUM(72 + 44 + length(v.manifest) + 32 * \
             (SELECT COUNT(*) FROM main.version_chunks vc WHERE vc.version = v.version)) \
             FROM main.versions v WHERE v.record_pack IS NOT NULL {} GROUP BY v.record_pack",
            if planned {
                "AND NOT EXISTS (SELECT 1 FROM temp.gone g WHERE g.version = v.version)"
            } else {
                ""
            }
        );
        for sql in [
            chunks,
            versions.as_str(),
            "SELECT pack, SUM(len) FROM main.removals GROUP BY pack",
        ] {
            let mut s = self.conn.prepare(sql).map_err(e)?;
            let mut rows = s.query([]).map_err(e)?;
            while let Some(r) = rows.next().map_err(e)? {
                let p: u32 = r.get(0).map_err(e)?;
                let n: i64 = r.get(1).map_err(e)?;
                if let Some(u) = out.get_mut(&p) {
                    u.live += n.max(0) as u64;
                }
            }
        }
        Ok(out.into_values().collect())
    }

    /// Finds, in one scan of `versions`, the commit records that lie in `packs`, for
    /// [`Index::live_records`].
    pub fn plan_moves(&mut self, packs: &[PackNo]) -> Result<(), IndexError> {
        let e = sql_err(&self.path);
        let tx = self.conn.transaction().map_err(e)?;
        tx.execute_batch(
            "DELETE FROM temp.moving; CREATE TEMP TABLE IF NOT EXISTS compacting \
             (pack INTEGER PRIMARY KEY); DELETE FROM temp.compacting;",
        )
        .map_err(e)?;
        {
            let mut ins = tx
                .prepare("INSERT OR IGNORE INTO temp.compacting (pack) VALUES (?1)")
                .map_err(e)?;
            for p in packs {
                ins.execute([p.0]).map_err(e)?;
            }
        }
        tx.execute_batch(
            "INSERT OR IGNORE INTO temp.moving (pack, offset, version, len)
                 SELECT v.record_pack, v.record_offset, v.version,
                     72 + 44 + length(v.manifest) + 32 *
                     (SELECT COUNT(*) FROM main.version_chunks vc WHERE vc.version = v.version)
                 FROM main.versions v
                 WHERE v.record_pack IN (SELECT pack FROM temp.compacting);",
        )
        .map_err(e)?;
        tx.commit().map_err(e)
    }

    /// The records of `pack` the index holds (its chunk rows, the commit records
    /// [`Index::plan_moves`] found in it, its removal records), in pack order.
    pub fn live_records(&self, pack: PackNo) -> Result<Vec<Moved>, IndexError> {
        let e = sql_err(&self.path);
        let mut out = Vec::new();
        let at = |offset: u64, what: Held, len: u64| Moved {
            what,
            from: (pack, offset),
            len,
            to: (pack, offset),
        };
        {
            let mut s = self
                .conn
                .prepare_cached("SELECT id, offset, len FROM main.chunks WHERE pack = ?1")
                .map_err(e)?;
            let mut rows = s.query([pack.0]).map_err(e)?;
            while let Some(r) = rows.next().map_err(e)? {
                let id: ChunkId = r.get(0).map_err(blob_err(&self.path, "a chunk id"))?;
                let len: u64 = r.get(2).map_err(e)?;
                out.push(at(
                    r.get(1).map_err(e)?,
                    Held::Chunk(id),
                    RECORD_HEADER_LEN + len,
                ));
            }
        }
        {
            let mut s = self
                .conn
                .prepare_cached("SELECT offset, version, len FROM temp.moving WHERE pack = ?1")
                .map_err(e)?;
            let mut rows = s.query([pack.0]).map_err(e)?;
            while let Some(r) = rows.next().map_err(e)? {
                out.push(at(
                    r.get(0).map_err(e)?,
                    Held::Version(r.get(1).map_err(e)?),
                    r.get(2).map_err(e)?,
                ));
            }
        }
        {
            let mut s = self
                .conn
                .prepare_cached("SELECT hash, offset, len FROM main.removals WHERE pack = ?1")
                .map_err(e)?;
            let mut rows = s.query([pack.0]).map_err(e)?;
            while let Some(r) = rows.next().map_err(e)? {
                let h: [u8; 32] = r.get(0).map_err(blob_err(&self.path, "a removal hash"))?;
                out.push(at(
                    r.get(1).map_err(e)?,
                    Held::Removal(h),
                    r.get(2).map_err(e)?,
                ));
            }
        }
        out.sort_by_key(|m| m.from.1);
        Ok(out)
    }
}
