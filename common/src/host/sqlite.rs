//! One way to open a SQLite database and bring its schema up to date, for the agent's
//! journal and the receiver's indexes; and `ToSql`/`FromSql` for the ids stored in them.
//!
//! Migrations are SQL files applied in order by `PRAGMA user_version`: migration `i` brings
//! the schema to version `i + 1`. Each runs in its own `IMMEDIATE` transaction, and the
//! version is read inside it, so two processes opening one database at once cannot both
//! apply a migration. A schema newer than this build knows is refused, on read-only opens
//! too: a build must not read what it does not understand.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::chunk::{ChunkId, FileId};
use crate::wire::CommitId;

/// How long a statement waits for another connection's lock before it fails.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of a database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{what} {}: {source}", path.display())]
    Sql {
        /// What the database is ("journal", "index").
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "{what} {} has schema version {found}, newer than this build knows ({known}); \
         upgrade {program}",
        path.display()
    )]
    TooNew {
        what: &'static str,
        path: PathBuf,
        found: i64,
        known: usize,
        /// The program to upgrade.
        program: &'static str,
    },
}

impl DbError {
    /// True when SQLite reported a full disk.
    pub fn is_no_space(&self) -> bool {
        self.code() == Some(rusqlite::ErrorCode::DiskFull)
    }

    /// True when SQLite reported a damaged database file.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self.code(),
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        )
    }

    fn code(&self) -> Option<rusqlite::ErrorCode> {
        match self {
            DbError::Sql {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } => Some(e.code),
            _ => None,
        }
    }
}

/// A database kind: what it is called in errors, who reads it, and its migrations.
#[derive(Debug)]
pub struct Schema {
    /// What the database is called in errors ("journal", "index").
    pub what: &'static str,
    /// The program that owns it, named in "upgrade ..." ("coffer-agent").
    pub program: &'static str,
    /// The migrations, in order; never edit or reorder a shipped one.
    pub migrations: &'static [&'static str],
}

impl Schema {
    /// A function that wraps a SQLite error with this database's name and `path`.
    pub fn err(&self, path: &Path) -> impl Fn(rusqlite::Error) -> DbError + '_ {
        let path = path.to_path_buf();
        move |source| DbError::Sql {
            what: self.what,
            path: path.clone(),
            source,
        }
    }

    /// Opens the database at `path` with `flags`, with the shared busy timeout.
    pub fn connect(&self, path: &Path, flags: OpenFlags) -> Result<Connection, DbError> {
        let conn = Connection::open_with_flags(path, flags).map_err(self.err(path))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(self.err(path))?;
        Ok(conn)
    }

    /// The number of migrations this build knows.
    pub fn latest(&self) -> usize {
        self.migrations.len()
    }

    /// Applies every migration the database lacks. Each runs in its own `IMMEDIATE`
    /// transaction, the version read inside it; a newer schema is refused.
    pub fn migrate(&self, conn: &mut Connection, path: &Path) -> Result<(), DbError> {
        let e = self.err(path);
        // A migration may rebuild a table others reference (create the new one, copy, drop
        // the old, rename): with foreign keys enforced, dropping the old one fails on every
        // reference to it. SQLite's recipe: enforcement off (outside any transaction) while
        // migrating, back as it was afterwards.
        let fk: bool = conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .map_err(&e)?;
        if fk {
            conn.pragma_update(None, "foreign_keys", false)
                .map_err(&e)?;
        }
        let r = self.apply(conn, path);
        if fk {
            conn.pragma_update(None, "foreign_keys", true).map_err(&e)?;
        }
        r
    }

    fn apply(&self, conn: &mut Connection, path: &Path) -> Result<(), DbError> {
        let e = self.err(path);
        loop {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&e)?;
            let v = self.version_of(&tx, path)?;
            let Some(sql) = self.migrations.get(v) else {
                return Ok(());
            };
            tx.execute_batch(sql).map_err(&e)?;
            tx.pragma_update(None, "user_version", (v + 1) as i64)
                .map_err(&e)?;
            tx.commit().map_err(&e)?;
            tracing::debug!(db = %path.display(), what = self.what, version = v + 1, "applied migration");
        }
    }

    /// The database's schema version, refused when newer than this build knows (for
    /// read-only opens, which do not migrate).
    pub fn check(&self, conn: &Connection, path: &Path) -> Result<usize, DbError> {
        self.version_of(conn, path)
    }

    fn version_of(&self, conn: &Connection, path: &Path) -> Result<usize, DbError> {
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(self.err(path))?;
        let known = self.latest();
        match usize::try_from(v) {
            Ok(v) if v <= known => Ok(v),
            _ => Err(DbError::TooNew {
                what: self.what,
                path: path.to_path_buf(),
                found: v,
                known,
                program: self.program,
            }),
        }
    }
}

fn blob<const N: usize>(v: ValueRef<'_>) -> FromSqlResult<[u8; N]> {
    let b = v.as_blob()?;
    b.try_into().map_err(|_| FromSqlError::InvalidBlobSize {
        expected_size: N,
        blob_size: b.len(),
    })
}

macro_rules! blob_id {
    ($t:ty) => {
        impl ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(&self.0[..]))
            }
        }
        impl FromSql for $t {
            fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
                blob(v).map(Self)
            }
        }
    };
}

blob_id!(ChunkId);
blob_id!(FileId);
blob_id!(CommitId);

#[cfg(test)]
mod tests {
    use super::*;

    static SCHEMA: Schema = Schema {
        what: "test db",
        program: "coffer-test",
        migrations: &[
            "CREATE TABLE a (x INTEGER);",
            "CREATE TABLE b (id BLOB NOT NULL);",
        ],
    };

    fn open(p: &Path) -> Connection {
        SCHEMA
            .connect(p, OpenFlags::default())
            .expect("open database")
    }

    #[test]
    fn migrates_once_and_refuses_a_newer_schema() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("t.sqlite");
        let mut c = open(&p);
        SCHEMA.migrate(&mut c, &p).expect("migrate");
        SCHEMA.migrate(&mut c, &p).expect("again: nothing to do");
        assert_eq!(SCHEMA.check(&c, &p).expect("version"), 2);
        c.pragma_update(None, "user_version", 3).expect("bump");
        drop(c);
        let mut c = open(&p);
        let e = SCHEMA.migrate(&mut c, &p).expect_err("newer");
        assert!(
            e.to_string()
                .contains("schema version 3, newer than this build knows (2)")
                && e.to_string().contains("upgrade coffer-test"),
            "{e}"
        );
        let ro = SCHEMA
            .connect(&p, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("read-only");
        assert!(matches!(
            SCHEMA.check(&ro, &p),
            Err(DbError::TooNew { found: 3, .. })
        ));
    }

    #[test]
    fn ids_round_trip_and_a_short_blob_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("t.sqlite");
        let mut c = open(&p);
        SCHEMA.migrate(&mut c, &p).expect("migrate");
        let id = ChunkId([7; 32]);
        c.execute("INSERT INTO b (id) VALUES (?1)", [&id])
            .expect("insert");
        let back: ChunkId = c
            .query_row("SELECT id FROM b", [], |r| r.get(0))
            .expect("read back");
        assert_eq!(back, id);
        let short: rusqlite::Result<CommitId> = c.query_row("SELECT id FROM b", [], |r| r.get(0));
        assert!(short.is_err());
    }
}
