//! The two sorted streams a scan merges, both in journal key order: the journal's rows
//! under the scanned folder, read a page at a time ([`JournalRows`]), and the folder's
//! entries, walked depth first with each folder's entries sorted ([`Folder`]).
//!
//! The order is that of the bytes of the journal keys (`watch/rel/path`, a folder's with a
//! trailing `/`): SQLite orders the `files` table's BLOB keys with `memcmp` (the shorter
//! first on a tie), as `[u8]`'s `Ord` does. A walk yields its keys in that order when each
//! folder's entries are sorted by their name's bytes followed, for a folder, by `/` (its
//! key's last component), and a folder's own key is followed by everything under it before
//! its next sibling: every key under `d/` starts with `d/`, so it sorts after `d/` and
//! before any sibling whose sort key is greater than `d/`'s (a name contains no `/`, so no
//! sibling's sort key starts with `d/`). Names are compared as bytes, never as text: no
//! locale, no Unicode normalization (`é` as one code point and as `e` + accent are two
//! names, as they are two files).
//!
//! Memory: one page of rows, and the sorted entries of each folder from the scanned one
//! down to the one being walked; never a map of every known path.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{DirEntry, FileType};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;

use crate::journal::{Journal, JournalError, Known};

/// Rows read from the journal per page (the journal is locked once per page).
const PAGE: usize = 2048;

/// The journal's rows with keys in `[lo, hi)`, in key order.
pub(super) struct JournalRows<'a> {
    journal: &'a Mutex<Journal>,
    lo: Vec<u8>,
    hi: Vec<u8>,
    /// The last key read (the next page starts after it).
    last: Option<Vec<u8>>,
    page: VecDeque<(Vec<u8>, Known)>,
    exhausted: bool,
}

impl<'a> JournalRows<'a> {
    /// The rows under the folder whose journal key without its `/` is `prefix` (the watch's
    /// name for the whole watch): keys starting with `prefix/`, i.e. in `[prefix/, prefix0)`
    /// (`0` is the byte after `/`).
    pub(super) fn under(journal: &'a Mutex<Journal>, prefix: &[u8]) -> Self {
        let (lo, hi) = range_under(prefix);
        JournalRows {
            journal,
            lo,
            hi,
            last: None,
            page: VecDeque::new(),
            exhausted: false,
        }
    }

    /// The next row, without taking it.
    pub(super) fn peek(&mut self) -> Result<Option<&(Vec<u8>, Known)>, JournalError> {
        if self.page.is_empty() && !self.exhausted {
            let rows = match self.journal.lock() {
                Ok(j) => j.known_page(&self.lo, &self.hi, self.last.as_deref(), PAGE)?,
                // A poisoned journal: the daemon is going down; nothing more is known.
                Err(_) => Vec::new(),
            };
            self.exhausted = rows.len() < PAGE;
            if let Some((k, _)) = rows.last() {
                self.last = Some(k.clone());
            }
            self.page.extend(rows);
        }
        Ok(self.page.front())
    }

    /// Takes the next row.
    pub(super) fn next(&mut self) -> Result<Option<(Vec<u8>, Known)>, JournalError> {
        self.peek()?;
        Ok(self.page.pop_front())
    }
}

/// The key range `[prefix/, prefix0)`: every key starting with `prefix/`.
pub(super) fn range_under(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut lo = prefix.to_vec();
    lo.push(b'/');
    let mut hi = prefix.to_vec();
    hi.push(b'/' + 1);
    (lo, hi)
}

/// An entry of a folder being walked.
pub(super) struct Entry {
    pub entry: DirEntry,
    pub file_type: FileType,
    /// The name's bytes, followed by `/` for a folder: the entry's order among its
    /// siblings, that of its journal key.
    sort_key: Vec<u8>,
}

impl Entry {
    pub(super) fn is_dir(&self) -> bool {
        self.file_type.is_dir()
    }
}

/// A folder being walked: its entries in journal key order, and how far the walk is.
pub(super) struct Folder {
    entries: std::vec::IntoIter<Entry>,
}

impl Folder {
    /// Lists `path`'s entries, sorted (an error: the folder itself could not be opened). An
    /// entry that cannot be read is reported through `on_error` and left out, as one that
    /// vanished before it could be typed is.
    pub(super) fn open(
        path: &Path,
        on_error: &mut dyn FnMut(&Path, std::io::Error),
    ) -> std::io::Result<Folder> {
        let rd = std::fs::read_dir(path)?;
        let mut entries = Vec::new();
        for entry in rd {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    on_error(path, e);
                    continue;
                }
            };
            let file_type = match entry.file_type() {
                Ok(t) => t,
                Err(_) => continue, // vanished: a watcher event or the next scan handles it
            };
            let name: OsString = entry.file_name();
            let mut sort_key = name.as_bytes().to_vec();
            if file_type.is_dir() {
                sort_key.push(b'/');
            }
            entries.push(Entry {
                entry,
                file_type,
                sort_key,
            });
        }
        entries.sort_unstable_by(|a, b| a.sort_key.cmp(&b.sort_key));
        Ok(Folder {
            entries: entries.into_iter(),
        })
    }

    /// The next entry in key order.
    pub(super) fn next_entry(&mut self) -> Option<Entry> {
        self.entries.next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk's order is the journal's: a folder's key and everything under it come
    /// between the siblings that sort around the folder's name followed by `/`, whatever
    /// bytes the names hold (`-` and `.` sort before `/`, `0` and UTF-8 after).
    #[test]
    fn a_walk_yields_keys_in_the_journal_order() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("w");
        let names: &[&[u8]] = &[
            b"a",
            b"a-b",
            b"a.b",
            b"a0",
            b"ab",
            b"\xc3\xa9",
            b"e\xcc\x81",
            b"\xff\xfe",
            b"Z",
            b" ",
        ];
        for dir in [&b"a"[..], b"ab", b"\xc3\xa9"] {
            for n in names {
                let p = root
                    .join(std::ffi::OsStr::from_bytes(dir))
                    .join(std::ffi::OsStr::from_bytes(n));
                if *n == b"a" {
                    std::fs::create_dir_all(p.join("x")).expect("mkdir");
                    std::fs::write(p.join("x").join("f"), b"").expect("write");
                } else {
                    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
                    std::fs::write(&p, b"").expect("write");
                }
            }
        }
        for n in names {
            let p = root.join(std::ffi::OsStr::from_bytes(n));
            if !p.exists() {
                std::fs::write(&p, b"").expect("write");
            }
        }
        // The walk, as the scan does it: a folder's key, then what is under it.
        let mut keys: Vec<Vec<u8>> = vec![b"w/".to_vec()];
        let mut stack = vec![Folder::open(&root, &mut |_, _| {}).expect("open")];
        while let Some(f) = stack.last_mut() {
            let Some(e) = f.next_entry() else {
                stack.pop();
                continue;
            };
            let path = e.entry.path();
            let rel = path.strip_prefix(d.path()).expect("under");
            let mut k = rel.as_os_str().as_bytes().to_vec();
            if e.is_dir() {
                k.push(b'/');
                keys.push(k);
                stack.push(Folder::open(&path, &mut |_, _| {}).expect("open"));
            } else {
                keys.push(k);
            }
        }
        // SQLite's order of the same keys as BLOBs, as the journal's primary key keeps them.
        let c = rusqlite::Connection::open_in_memory().expect("db");
        c.execute_batch("CREATE TABLE t (k BLOB PRIMARY KEY) WITHOUT ROWID")
            .expect("table");
        for k in &keys {
            c.execute("INSERT INTO t (k) VALUES (?1)", [k])
                .expect("insert");
        }
        let sql_order: Vec<Vec<u8>> = c
            .prepare("SELECT k FROM t ORDER BY k")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert!(keys.len() > 30, "{}", keys.len());
        assert_eq!(keys, sql_order);
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }
}
