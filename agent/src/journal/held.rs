//! Deletions held for confirmation (`held_deletions`, migration 0010): a scan that would
//! record more than a watch's `max_delete_share` of its files as deleted lists them here
//! instead, their rows left as they were; `confirm-deletions` marks them dirty (the
//! uploader then records each deletion). Only this file touches `held_deletions`.

use super::*;

/// A deletion held for confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub path: Vec<u8>,
    pub watch: String,
    /// When a scan first held it (unix ms).
    pub held_at: i64,
}

/// Whether journal key `p` is under the folder (or watch) whose key is `prefix`.
fn under(p: &[u8], prefix: &[u8]) -> bool {
    p.len() > prefix.len() && p.starts_with(prefix) && p[prefix.len()] == b'/'
}

/// Removes `paths` from the held deletions (in the caller's transaction): they were seen
/// changed, came back, or are being recorded. One cheap query when nothing is held.
pub(super) fn release_held(tx: &Transaction<'_>, paths: &[&[u8]]) -> rusqlite::Result<()> {
    let any: bool = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM held_deletions)")?
        .query_row([], |r| r.get(0))?;
    if !any {
        return Ok(());
    }
    let mut del = tx.prepare_cached("DELETE FROM held_deletions WHERE path = ?1")?;
    for p in paths {
        del.execute([p])?;
    }
    Ok(())
}

impl Journal {
    /// Whether the journal has `held_deletions` (a journal not yet migrated, read by
    /// `status` while an older daemon runs, has none: nothing is held there).
    fn has_held(&self) -> Result<bool, JournalError> {
        self.conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'held_deletions'",
                [],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(|e| self.err(e))
    }

    /// Makes `paths` the held deletions of `watch` under `prefix` (the scanned folder's
    /// key, or the watch's name for a whole watch): those held there before and not in
    /// `paths` are no longer held (they came back, or are recorded now); those already held
    /// keep their `held_at`. An empty `paths` releases every hold under `prefix`.
    pub fn hold_deletions(
        &mut self,
        watch: &str,
        prefix: &[u8],
        paths: &[Vec<u8>],
        now: i64,
    ) -> Result<(), JournalError> {
        let e = sql_err(&self.path);
        let tx = self.conn.transaction().map_err(e)?;
        {
            let before: Vec<Vec<u8>> = {
                let mut st = tx
                    .prepare_cached("SELECT path FROM held_deletions WHERE watch = ?1")
                    .map_err(e)?;
                let rows = st.query_map([watch], |r| r.get(0)).map_err(e)?;
                rows.collect::<Result<_, _>>().map_err(e)?
            };
            let keep: std::collections::HashSet<&[u8]> =
                paths.iter().map(|p| p.as_slice()).collect();
            let mut del = tx
                .prepare_cached("DELETE FROM held_deletions WHERE path = ?1")
                .map_err(e)?;
            for p in before
                .iter()
                .filter(|p| under(p, prefix) && !keep.contains(p.as_slice()))
            {
                del.execute([p]).map_err(e)?;
            }
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO held_deletions (path, watch, held_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT(path) DO NOTHING",
                )
                .map_err(e)?;
            for p in paths {
                ins.execute(params![p, watch, now]).map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    /// The held deletions (of `watch` only, if given), in path order.
    pub fn held(&self, watch: Option<&str>) -> Result<Vec<Held>, JournalError> {
        if !self.has_held()? {
            return Ok(Vec::new());
        }
        let e = sql_err(&self.path);
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT path, watch, held_at FROM held_deletions
                 WHERE ?1 IS NULL OR watch = ?1 ORDER BY watch, path",
            )
            .map_err(e)?;
        let rows = st
            .query_map([watch], |r| {
                Ok(Held {
                    path: r.get(0)?,
                    watch: r.get(1)?,
                    held_at: r.get(2)?,
                })
            })
            .map_err(e)?;
        rows.collect::<Result<_, _>>().map_err(e)
    }

    /// Per watch with held deletions: how many, and since when (the oldest `held_at`).
    pub fn held_counts(&self) -> Result<HashMap<String, (i64, i64)>, JournalError> {
        if !self.has_held()? {
            return Ok(HashMap::new());
        }
        let e = sql_err(&self.path);
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT watch, COUNT(*), MIN(held_at) FROM held_deletions GROUP BY watch",
            )
            .map_err(e)?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .map_err(e)?;
        rows.collect::<Result<_, _>>().map_err(e)
    }

    /// Confirms `watch`'s held deletions: their rows become dirty and due now (the uploader
    /// records each deletion, or backs up a file that came back), and they are held no
    /// longer. Returns how many there were.
    pub fn confirm_held(&mut self, watch: &str, now: i64) -> Result<usize, JournalError> {
        let held = self.held(Some(watch))?;
        let items: Vec<(Vec<u8>, String)> = held.into_iter().map(|h| (h.path, h.watch)).collect();
        self.mark_dirty(&items, now, 0)?;
        Ok(items.len())
    }
}

#[cfg(test)]
mod tests {
    use crate::journal::tests::j;
    use crate::journal::FileState;

    #[test]
    fn holds_are_replaced_under_the_scanned_folder_and_confirmed_as_dirty_rows() {
        let (_d, mut j) = j();
        let p = |s: &str| s.as_bytes().to_vec();
        j.hold_deletions("w", b"w", &[p("w/a"), p("w/sub/b"), p("w/sub/c")], 10)
            .expect("hold");
        j.hold_deletions("v", b"v", &[p("v/x")], 11).expect("hold");
        // A scan of `w/sub` finds `c` back: `b` stays held with its first time.
        j.hold_deletions("w", b"w/sub", &[p("w/sub/b")], 20)
            .expect("hold");
        let held = j.held(Some("w")).expect("held");
        let paths: Vec<&[u8]> = held.iter().map(|h| h.path.as_slice()).collect();
        assert_eq!(paths, vec![&b"w/a"[..], b"w/sub/b"]);
        assert!(held.iter().all(|h| h.held_at == 10));
        let counts = j.held_counts().expect("counts");
        assert_eq!(counts.get("w"), Some(&(2, 10)));
        assert_eq!(counts.get("v"), Some(&(1, 11)));
        assert_eq!(j.confirm_held("w", 30).expect("confirm"), 2);
        assert!(j.held(Some("w")).expect("held").is_empty());
        assert_eq!(j.held(None).expect("held").len(), 1, "v's stays");
        let row = j.row(b"w/a").expect("row").expect("a row");
        assert_eq!(row.state, FileState::Dirty);
        assert_eq!(row.due_at, 30);
        // A held path marked dirty (seen back, or changed) is held no longer.
        j.hold_deletions("v", b"v", &[p("v/x"), p("v/y")], 35)
            .expect("hold");
        j.mark_dirty(&[(p("v/y"), "v".into())], 36, 0)
            .expect("dirty");
        assert_eq!(j.held(Some("v")).expect("held").len(), 1);
        // Nothing held: a whole watch's holds released.
        j.hold_deletions("v", b"v", &[], 40).expect("release");
        assert!(j.held(None).expect("held").is_empty());
    }
}
