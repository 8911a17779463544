//! The journal's checkpointer: a connection of its own that copies the WAL into the
//! database file, so that no writer holding the journal does it. Only the daemon's
//! checkpoint thread holds one.

use super::*;

/// Checkpoints the journal's WAL from a connection of its own, so that no writer does it.
///
/// Why: a checkpoint copies the WAL's pages into the database file and syncs both, and run
/// by the committing connection it would hold the journal's lock, stalling every thread
/// that needs the journal, for that long. A `PASSIVE` checkpoint on another connection
/// takes no lock that writers need (WAL mode: they append while it copies), and the next
/// write after a complete one starts the WAL over from its beginning.
pub struct Checkpointer {
    conn: Connection,
    wal: std::path::PathBuf,
    path: PathBuf,
}

impl Checkpointer {
    /// A connection to the journal at `path` (which `Journal::open` has created).
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let conn = SCHEMA.connect(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let sql = sql_err(path);
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        // This connection writes nothing: it never checkpoints on commit.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(sql)?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(Self {
            conn,
            wal: wal.into(),
            path: path.to_path_buf(),
        })
    }

    /// Runs a `PASSIVE` checkpoint if the WAL file holds at least `min_bytes`; returns the
    /// WAL's frames and how many of them are now in the database, if it ran.
    pub fn maybe_run(&self, min_bytes: u64) -> Result<Option<(i64, i64)>, JournalError> {
        let len = std::fs::metadata(&self.wal).map_or(0, |m| m.len());
        if len < min_bytes {
            return Ok(None);
        }
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })
            .map(Some)
            .map_err(sql_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::tests::j;

    #[test]
    fn the_checkpointer_copies_the_wal_only_past_its_threshold() {
        let (d, mut j) = j();
        let items: Vec<_> = (0..2000)
            .map(|i| (format!("w/f{i:05}").into_bytes(), "w".to_string()))
            .collect();
        j.mark_dirty(&items, 0, 0).expect("mark");
        let c = Checkpointer::open(&d.path().join("j.sqlite")).expect("checkpointer");
        let wal = std::fs::metadata(d.path().join("j.sqlite-wal"))
            .expect("wal")
            .len();
        assert!(wal > 0, "the writes are in the WAL");
        let db_len = || {
            std::fs::metadata(d.path().join("j.sqlite"))
                .expect("db")
                .len()
        };
        let before = db_len();
        assert_eq!(c.maybe_run(wal + 1).expect("below"), None);
        assert_eq!(db_len(), before, "nothing copied below the threshold");
        let (frames, done) = c.maybe_run(wal).expect("run").expect("ran");
        assert!(
            frames > 0 && done == frames,
            "{done} of {frames} frames copied"
        );
        assert!(db_len() > before, "the pages are in the database file");
        // The writer goes on, and what was copied reads back from the database.
        j.mark_dirty(&items[..10], 1, 0).expect("mark again");
        drop(c);
        drop(j);
        let r = Journal::open_read_only(&d.path().join("j.sqlite")).expect("reopen");
        assert_eq!(r.summary().expect("summary").dirty, 2000);
    }
}
