//! What scans and `status` read of single rows: a watch's known paths with their stat (a
//! page at a time, in key order), one
//! path's row, the rows under a folder (files' for `status`, every key for a folder that
//! went), the failed rows. Read-only.

use super::*;

/// Where a known path stands, as far as a scan cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Backed up as it was last read.
    BackedUp,
    /// Backed up as a deletion.
    Deleted,
    /// Failed; read again when its stat changes or it disappears.
    Failed,
    /// Queued (dirty or uploading): the uploader reads it anyway.
    Queued,
}

/// What a scan needs to know about a known path (read a page at a time, in key order:
/// [`Journal::known_page`]).
#[derive(Debug, Clone, Copy)]
pub struct Known {
    pub standing: Standing,
    pub stat: Option<StatKey>,
}

/// One row, for `status PATH`.
#[derive(Debug, Clone)]
pub struct Row {
    pub path: Vec<u8>,
    pub state: FileState,
    pub kind: Option<String>,
    pub size: Option<i64>,
    pub dirty_since: Option<i64>,
    pub due_at: i64,
    pub reason: Option<String>,
    pub attempts: i64,
    pub stat: Option<StatKey>,
    pub backed_version: Option<i64>,
    pub backed_at: Option<i64>,
    pub backed_kind: Option<String>,
    pub backed_size: Option<i64>,
}

impl Journal {
    /// The known rows (files' and folders') with keys in `[lo, hi)`, after `after` if given,
    /// in key order, at most `limit`: a scan reads a watch's rows a page at a time, in the
    /// order it walks ([`crate::scan`]). The order is the primary key's: SQLite compares
    /// BLOBs with `memcmp` (shorter first on a tie), as `[u8]`'s `Ord` does.
    pub fn known_page(
        &self,
        lo: &[u8],
        hi: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Known)>, JournalError> {
        // Two statements, each a plain range of the primary key: a page starts at `lo`, or
        // just after the last key read (an `OR` of both would make every page read from
        // `lo` again).
        let mut st = match after {
            None => self.conn.prepare_cached(sql!(
                "SELECT path, CASE WHEN state = {BACKED_UP} AND kind = 'deleted' THEN 1 \
                 WHEN state = {BACKED_UP} THEN 0 WHEN state = {FAILED} THEN 2 ELSE 3 END, \
                 size, mtime_ns, ctime_ns, inode FROM files \
                 WHERE path >= ?1 AND path < ?2 ORDER BY path LIMIT ?3"
            )),
            Some(_) => self.conn.prepare_cached(sql!(
                "SELECT path, CASE WHEN state = {BACKED_UP} AND kind = 'deleted' THEN 1 \
                 WHEN state = {BACKED_UP} THEN 0 WHEN state = {FAILED} THEN 2 ELSE 3 END, \
                 size, mtime_ns, ctime_ns, inode FROM files \
                 WHERE path > ?1 AND path < ?2 ORDER BY path LIMIT ?3"
            )),
        }
        .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![after.unwrap_or(lo), hi, limit as i64], |r| {
                let size: Option<i64> = r.get(2)?;
                let stat = match size {
                    Some(size) => Some(StatKey {
                        size,
                        mtime_ns: r.get::<_, Option<i64>>(3)?.unwrap_or(0),
                        ctime_ns: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                        inode: r.get::<_, Option<i64>>(5)?.unwrap_or(0),
                    }),
                    None => None,
                };
                let standing = match r.get::<_, i64>(1)? {
                    0 => Standing::BackedUp,
                    1 => Standing::Deleted,
                    2 => Standing::Failed,
                    _ => Standing::Queued,
                };
                Ok((r.get::<_, Vec<u8>>(0)?, Known { standing, stat }))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// How many files (folders' rows left out) with keys in `[lo, hi)` are backed up as
    /// present (not as deletions): what a scan's held deletions are a share of.
    pub fn backed_up_files_in(&self, lo: &[u8], hi: &[u8]) -> Result<u64, JournalError> {
        self.conn
            .prepare_cached(sql!(
                "SELECT COUNT(*) FROM files WHERE path >= ?1 AND path < ?2 \
                 AND state = {BACKED_UP} AND kind IS NOT 'deleted' AND substr(path, -1) != x'2f'"
            ))
            .and_then(|mut st| st.query_row(params![lo, hi], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    fn row_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
        let size: Option<i64> = r.get(3)?;
        Ok(Row {
            path: r.get(0)?,
            state: r.get(1)?,
            kind: r.get(2)?,
            size,
            dirty_since: r.get(4)?,
            due_at: r.get(5)?,
            reason: r.get(6)?,
            attempts: r.get(7)?,
            stat: size.map(|size| StatKey {
                size,
                mtime_ns: r.get::<_, Option<i64>>(8).ok().flatten().unwrap_or(0),
                ctime_ns: r.get::<_, Option<i64>>(9).ok().flatten().unwrap_or(0),
                inode: r.get::<_, Option<i64>>(10).ok().flatten().unwrap_or(0),
            }),
            backed_version: r.get(11)?,
            backed_at: r.get(12)?,
            backed_kind: r.get(13)?,
            backed_size: r.get(14)?,
        })
    }

    const ROW_COLS: &'static str = "path, state, kind, size, dirty_since, due_at, reason, attempts, mtime_ns, ctime_ns, inode, backed_version, backed_at, backed_kind, backed_size";

    /// One path's row.
    pub fn row(&self, path: &[u8]) -> Result<Option<Row>, JournalError> {
        self.conn
            .query_row(
                &format!("SELECT {} FROM files WHERE path = ?1", Self::ROW_COLS),
                [path],
                Self::row_from,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Failed files, up to `limit` (through their partial index: no scan of every row).
    pub fn failed_rows(&self, limit: usize) -> Result<Vec<Row>, JournalError> {
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM files WHERE state = {FAILED} ORDER BY path LIMIT ?1",
                Self::ROW_COLS
            ))
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![limit as i64], Self::row_from)
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Files' rows whose path starts with `prefix` (a folder), up to `limit` (folders' own
    /// rows left out: `status` is about files).
    pub fn rows_under(&self, prefix: &[u8], limit: usize) -> Result<Vec<Row>, JournalError> {
        let mut hi = prefix.to_vec();
        hi.push(0xff);
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM files WHERE path >= ?1 AND path < ?2 AND substr(path, -1) != x'2f'
                 ORDER BY path LIMIT ?3",
                Self::ROW_COLS
            ))
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![prefix, hi, limit as i64], Self::row_from)
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// The keys of every row, a file's or a folder's, whose path starts with `prefix`.
    pub fn keys_under(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, JournalError> {
        let mut hi = prefix.to_vec();
        hi.push(0xff);
        let mut st = self
            .conn
            .prepare_cached("SELECT path FROM files WHERE path >= ?1 AND path < ?2 ORDER BY path")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![prefix, hi], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}
