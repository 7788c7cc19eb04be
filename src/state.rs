//! The state store: an embedded SQLite database that makes the counts exact across crashes.
//!
//! One transaction per batch holds everything the batch changed: the session's cursor and
//! tracker state, the new values of the series it touched, and the turns it closed (the span
//! outbox). Either all of it is on disk or none of it is, so after `kill -9` the exporter
//! re-reads from the committed cursor and arrives at the same numbers an uninterrupted run shows.
//!
//! The file is marked with an application id; a file that is not SQLite, or is another
//! program's database, is a startup error and is never overwritten. A lock on `<path>.lock`
//! keeps a second exporter off the same file.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::record::EventRecord;
use crate::sinks::metrics::{Family, SeriesKey, SeriesValue};
use crate::turn::ClosedTurn;

/// The store's two outboxes: closed turns waiting to become spans, and counted events waiting
/// to become log records. Each is written in the transaction of the batch that made its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outbox {
    Turns,
    Records,
}

impl Outbox {
    /// (table, column): fixed names, never input.
    fn table(self) -> (&'static str, &'static str) {
        match self {
            Outbox::Turns => ("outbox", "turn"),
            Outbox::Records => ("log_outbox", "record"),
        }
    }
}

/// `QODX` in ASCII: marks the file as ours.
const APPLICATION_ID: i32 = 0x514F_4458;
/// Tables added since (`event_ids`) are additive: an older release opens the file and leaves
/// them alone, so the version stays 1 until a change an older release would misread. (An older
/// release run in between records no ids and leaves the rows of the sessions it finishes; the
/// ids it counted are then unknown to this one, as for a file from before the table.) The JSON
/// this file keeps (session state, outbox turns) is read with `#[serde(default)]` on every
/// stored struct: a field added later reads as its default from an older file. A change that
/// an older file would be misread by (a field's meaning, an enum's variants) needs a migration
/// and a version bump; a newer file than this release knows is refused.
const SCHEMA_VERSION: i32 = 1;
/// A stream's id digests are merged into one row when reading them finds more rows than this.
const EVENT_ID_ROWS_MERGED: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    // Causes are `#[source]` and not repeated in the message: `{:#}` prints each once.
    #[error("state file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "state file {path} is not a qoder-exporter state file (application id {found:#x}); refusing to touch it"
    )]
    Foreign { path: PathBuf, found: i32 },
    #[error("state file {path} is corrupt or not an SQLite database: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "state file {path} has schema version {found}, newer than this exporter's {SCHEMA_VERSION}"
    )]
    TooNew { path: PathBuf, found: i32 },
    #[error("state file {path} is in use by another qoder-exporter (lock {lock} is held)")]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("state file lock {lock}")]
    Lock {
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state directory {dir} does not exist, nor does its parent: create it, or point --state.path elsewhere"
    )]
    NoDirectory { dir: PathBuf },
    #[error("state store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state store: bad stored value: {0}")]
    Value(#[from] serde_json::Error),
}

/// A session as the store remembers it. `S` is the tracker's state of the session, stored as
/// JSON: the store keeps it without knowing its shape.
#[derive(Debug, Clone)]
pub struct StoredSession<S> {
    pub id: String,
    pub cursor: Option<String>,
    /// Drained after termination, or gone (404): never read again.
    pub finished: bool,
    pub state: S,
}

/// One batch's writes, committed together.
#[derive(Debug)]
pub struct BatchWrite<'a, S> {
    pub session_id: &'a str,
    pub cursor: Option<&'a str>,
    pub finished: bool,
    pub state: &'a S,
    pub series: &'a [(SeriesKey, SeriesValue)],
    pub closed_turns: &'a [ClosedTurn],
    /// Counted events for the log outbox (logs on).
    pub log_records: &'a [EventRecord],
    /// Digests of the event ids the batch counted, by thread (`""`: the session's stream).
    pub event_ids: &'a [(String, Vec<u64>)],
}

/// An agent's name learned, and the series and sessions it moves from the id to the name.
#[derive(Debug)]
pub(crate) struct AgentRelabel<'a, S> {
    pub id: &'a str,
    pub name: &'a str,
    pub remove: &'a [SeriesKey],
    pub put: &'a [(SeriesKey, SeriesValue)],
    pub sessions: &'a [(String, S)],
}

#[derive(Debug)]
pub struct StateStore {
    conn: Connection,
    path: PathBuf,
    /// Held for the life of the store; dropping it releases the lock.
    _lock: Option<File>,
}

impl StateStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<StateStore, StateError> {
        // A missing directory is made when its parent exists (a fresh volume mount point's
        // subdirectory); a deeper miss is more likely a typo and is refused.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            std::fs::create_dir(dir).map_err(|_| StateError::NoDirectory {
                dir: dir.to_owned(),
            })?;
            tracing::info!(dir = %dir.display(), "state directory created");
        }
        let lock_path = lock_path(path);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StateError::Lock {
                lock: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateError::Locked {
                    path: path.to_owned(),
                    lock: lock_path,
                });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(StateError::Lock {
                    lock: lock_path,
                    source,
                });
            }
        }
        let conn = Connection::open(path).map_err(|source| StateError::Open {
            path: path.to_owned(),
            source,
        })?;
        let mut store = StateStore {
            conn,
            path: path.to_owned(),
            _lock: Some(lock),
        };
        store.init()?;
        Ok(store)
    }

    fn corrupt(&self, e: &rusqlite::Error) -> StateError {
        StateError::Corrupt {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }

    fn init(&mut self) -> Result<(), StateError> {
        // The first read of the header tells a non-database from a database.
        let app_id: i32 = self
            .conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(|e| self.corrupt(&e))?;
        let tables: i64 = self
            .conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(|e| self.corrupt(&e))?;
        if app_id != APPLICATION_ID && (app_id != 0 || tables > 0) {
            return Err(StateError::Foreign {
                path: self.path.clone(),
                found: app_id,
            });
        }
        let version: i32 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StateError::TooNew {
                path: self.path.clone(),
                found: version,
            });
        }
        let check: String = self
            .conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| self.corrupt(&e))?;
        if check != "ok" {
            return Err(StateError::Corrupt {
                path: self.path.clone(),
                detail: check,
            });
        }
        // WAL with synchronous=FULL: a commit is on disk when it returns, and readers of the
        // file never block the writer.
        self.conn
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| self.corrupt(&e))?;
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        let tx = self.conn.transaction()?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS sessions (
                id       TEXT PRIMARY KEY,
                cursor   TEXT,
                finished INTEGER NOT NULL DEFAULT 0,
                state    TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS series (
                family TEXT NOT NULL,
                labels TEXT NOT NULL,
                value  TEXT NOT NULL,
                PRIMARY KEY (family, labels)
            );
            CREATE TABLE IF NOT EXISTS outbox (
                seq  INTEGER PRIMARY KEY AUTOINCREMENT,
                turn TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS agents (
                id   TEXT PRIMARY KEY,
                name TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS event_ids (
                session TEXT NOT NULL,
                thread  TEXT NOT NULL,
                ids     BLOB NOT NULL
            );
            CREATE INDEX IF NOT EXISTS event_ids_stream ON event_ids (session, thread);
            CREATE TABLE IF NOT EXISTS log_outbox (
                seq    INTEGER PRIMARY KEY AUTOINCREMENT,
                record TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS meta (
                key   TEXT PRIMARY KEY,
                value TEXT NOT NULL
            );",
        )?;
        // When the durable series started counting: their OTLP start time, the same across
        // restarts. A file from before this key gets the time it was first opened with it.
        tx.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('series_start_unix_nano', ?1)",
            [crate::event::unix_nanos(std::time::SystemTime::now()).to_string()],
        )?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(())
    }

    /// When the durable series started counting, in Unix nanoseconds (kept in the file).
    pub(crate) fn series_start(&self) -> Result<u64, StateError> {
        let v: String = self.conn.query_row(
            "SELECT value FROM meta WHERE key = 'series_start_unix_nano'",
            [],
            |r| r.get(0),
        )?;
        v.parse().map_err(|_| StateError::Corrupt {
            path: self.path.clone(),
            detail: format!("meta series_start_unix_nano {v:?} is not a number"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load_sessions<S: DeserializeOwned>(&self) -> Result<Vec<StoredSession<S>>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, cursor, finished, state FROM sessions ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, cursor, finished, state) = row?;
            out.push(StoredSession {
                id,
                cursor,
                finished,
                state: serde_json::from_str(&state)?,
            });
        }
        Ok(out)
    }

    pub(crate) fn load_series(&self) -> Result<Vec<(SeriesKey, SeriesValue)>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT family, labels, value FROM series")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (family, labels, value) = row?;
            // A family this version does not know (written by a newer one) is left alone.
            let Some(family) = Family::from_name(&family) else {
                continue;
            };
            out.push((
                (family, serde_json::from_str(&labels)?),
                serde_json::from_str(&value)?,
            ));
        }
        Ok(out)
    }

    /// The agent directory: agent id → name, as learned from objects that show both.
    pub(crate) fn load_agents(&self) -> Result<Vec<(String, String)>, StateError> {
        let mut stmt = self.conn.prepare("SELECT id, name FROM agents")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Commits a learned agent name and the relabelling it causes, in one transaction: the
    /// directory entry, the merged series (`put`) and the ones merged away (`remove`), and
    /// the sessions whose label changed.
    pub(crate) fn commit_agent<S: Serialize>(
        &mut self,
        r: &AgentRelabel<'_, S>,
    ) -> Result<(), StateError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO agents (id, name) VALUES (?1, ?2)
             ON CONFLICT(id) DO UPDATE SET name = excluded.name",
            params![r.id, r.name],
        )?;
        {
            let mut del =
                tx.prepare_cached("DELETE FROM series WHERE family = ?1 AND labels = ?2")?;
            for (family, labels) in r.remove {
                del.execute(params![family.name(), serde_json::to_string(labels)?])?;
            }
            let mut put = tx.prepare_cached(
                "INSERT INTO series (family, labels, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT(family, labels) DO UPDATE SET value = excluded.value",
            )?;
            for ((family, labels), value) in r.put {
                put.execute(params![
                    family.name(),
                    serde_json::to_string(labels)?,
                    serde_json::to_string(value)?
                ])?;
            }
            let mut session = tx.prepare_cached("UPDATE sessions SET state = ?2 WHERE id = ?1")?;
            for (id, state) in r.sessions {
                session.execute(params![id, serde_json::to_string(state)?])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records a session before its first batch (its agent and model), or updates them. A
    /// finished session is never read again: the ids it counted are forgotten with it.
    pub(crate) fn upsert_session<S: Serialize>(
        &mut self,
        id: &str,
        state: &S,
        finished: bool,
    ) -> Result<(), StateError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO sessions (id, cursor, finished, state) VALUES (?1, NULL, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET finished = excluded.finished, state = excluded.state",
            params![id, finished, serde_json::to_string(state)?],
        )?;
        if finished {
            tx.execute("DELETE FROM event_ids WHERE session = ?1", [id])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The digests of the event ids one stream counted (`thread` `""`: the session's own).
    /// A stream written in many batches is merged into one row on the way.
    pub(crate) fn load_event_ids(
        &mut self,
        session: &str,
        thread: &str,
    ) -> Result<Vec<u64>, StateError> {
        let rows: Vec<Vec<u8>> = {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT ids FROM event_ids WHERE session = ?1 AND thread = ?2")?;
            stmt.query_map([session, thread], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        let digests: Vec<u64> = rows
            .iter()
            .flat_map(|b| b.chunks_exact(8))
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        if rows.len() > EVENT_ID_ROWS_MERGED {
            let tx = self.conn.transaction()?;
            tx.execute(
                "DELETE FROM event_ids WHERE session = ?1 AND thread = ?2",
                [session, thread],
            )?;
            tx.execute(
                "INSERT INTO event_ids (session, thread, ids) VALUES (?1, ?2, ?3)",
                params![session, thread, digest_blob(&digests)],
            )?;
            tx.commit()?;
        }
        Ok(digests)
    }

    /// Commits one batch atomically.
    pub fn commit<S: Serialize>(&mut self, w: &BatchWrite<'_, S>) -> Result<(), StateError> {
        self.commit_many(std::slice::from_ref(w))
    }

    /// Commits several batches (of any sessions) in one transaction: all or none. A batch
    /// without a cursor (it read nothing new) keeps the session's stored one: a cursor only
    /// ever moves forward, never back to the start of the log.
    pub fn commit_many<S: Serialize>(
        &mut self,
        writes: &[BatchWrite<'_, S>],
    ) -> Result<(), StateError> {
        let tx = self.conn.transaction()?;
        {
            let mut session = tx.prepare_cached(
                "INSERT INTO sessions (id, cursor, finished, state) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET cursor = coalesce(excluded.cursor, cursor),
                     finished = excluded.finished, state = excluded.state",
            )?;
            let mut put = tx.prepare_cached(
                "INSERT INTO series (family, labels, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT(family, labels) DO UPDATE SET value = excluded.value",
            )?;
            let mut outbox = tx.prepare_cached("INSERT INTO outbox (turn) VALUES (?1)")?;
            let mut records = tx.prepare_cached("INSERT INTO log_outbox (record) VALUES (?1)")?;
            let mut ids = tx.prepare_cached(
                "INSERT INTO event_ids (session, thread, ids) VALUES (?1, ?2, ?3)",
            )?;
            for w in writes {
                session.execute(params![
                    w.session_id,
                    w.cursor,
                    w.finished,
                    serde_json::to_string(w.state)?
                ])?;
                for ((family, labels), value) in w.series {
                    put.execute(params![
                        family.name(),
                        serde_json::to_string(labels)?,
                        serde_json::to_string(value)?
                    ])?;
                }
                for t in w.closed_turns {
                    outbox.execute(params![serde_json::to_string(t)?])?;
                }
                for r in w.log_records {
                    records.execute(params![serde_json::to_string(r)?])?;
                }
                for (thread, digests) in w.event_ids {
                    ids.execute(params![w.session_id, thread, digest_blob(digests)])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The oldest `limit` rows of an outbox, with their sequence numbers. A row that no longer
    /// decodes (written by another version) comes back as `None`, so the caller can remove it
    /// instead of stalling on it.
    pub(crate) fn outbox_peek<T: DeserializeOwned>(
        &self,
        which: Outbox,
        limit: usize,
    ) -> Result<Vec<(i64, Option<T>)>, StateError> {
        let (table, column) = which.table();
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT seq, {column} FROM {table} ORDER BY seq LIMIT ?1"
        ))?;
        let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, text) = row?;
            out.push((seq, serde_json::from_str(&text).ok()));
        }
        Ok(out)
    }

    /// Removes exported (or given-up) rows up to and including `seq`.
    pub(crate) fn outbox_remove_through(
        &mut self,
        which: Outbox,
        seq: i64,
    ) -> Result<usize, StateError> {
        let (table, _) = which.table();
        Ok(self
            .conn
            .execute(&format!("DELETE FROM {table} WHERE seq <= ?1"), [seq])?)
    }

    pub(crate) fn outbox_len(&self, which: Outbox) -> Result<u64, StateError> {
        let (table, _) = which.table();
        let n: i64 = self
            .conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Drops the oldest rows beyond `max`, never one at or below `keep_through` (a batch being
    /// exported right now); returns the dropped rows (`None`: a row that no longer decodes).
    pub(crate) fn outbox_trim<T: DeserializeOwned>(
        &mut self,
        which: Outbox,
        max: u64,
        keep_through: Option<i64>,
    ) -> Result<Vec<Option<T>>, StateError> {
        let len = self.outbox_len(which)?;
        if len <= max {
            return Ok(Vec::new());
        }
        let (table, column) = which.table();
        let excess = i64::try_from(len - max).unwrap_or(i64::MAX);
        let floor = keep_through.unwrap_or(i64::MIN);
        let tx = self.conn.transaction()?;
        let mut dropped = Vec::new();
        {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT seq, {column} FROM {table} WHERE seq > ?1 ORDER BY seq LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![floor, excess], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut last = None;
            for row in rows {
                let (seq, text) = row?;
                last = Some(seq);
                dropped.push(serde_json::from_str(&text).ok());
            }
            if let Some(last) = last {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE seq > ?1 AND seq <= ?2"),
                    params![floor, last],
                )?;
            }
        }
        tx.commit()?;
        Ok(dropped)
    }

    /// The stored cursor of one session (tests and tools).
    pub fn cursor(&self, id: &str) -> Result<Option<String>, StateError> {
        Ok(self
            .conn
            .query_row("SELECT cursor FROM sessions WHERE id = ?1", [id], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()?
            .flatten())
    }
}

/// Digests as stored: 8 bytes each, little endian.
fn digest_blob(digests: &[u64]) -> Vec<u8> {
    digests.iter().flat_map(|d| d.to_le_bytes()).collect()
}

/// `<file>.lock` beside the state file, for the file itself: symlinks and other spellings of
/// its path (`./s.db`, `dir/../s.db`) are resolved first, so two exporters handed the same
/// file under two names still meet at one lock.
fn lock_path(path: &Path) -> PathBuf {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| {
        // Not created yet: its directory is real, its name is the one given.
        match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) => std::fs::canonicalize(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })
            .map_or_else(|_| path.to_owned(), |d| d.join(name)),
            _ => path.to_owned(),
        }
    });
    let mut name = real
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".lock");
    real.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::tracker::SessionState;

    #[test]
    fn commit_then_reopen_reads_everything_back() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("s.db");
        let mut state = SessionState::new("agent".into());
        state.consumed = 7;
        {
            let mut store = StateStore::open(&path).expect("open");
            store
                .commit(&BatchWrite {
                    session_id: "sess_1",
                    cursor: Some("evt_7"),
                    finished: false,
                    state: &state,
                    series: &[(
                        (Family::Events, vec!["user.message".into(), "agent".into()]),
                        SeriesValue::Counter(7_000_000),
                    )],
                    closed_turns: &[],
                    log_records: &[],
                    event_ids: &[],
                })
                .expect("commit");
        }
        let mut store = StateStore::open(&path).expect("reopen");
        // A batch that moves no cursor (metadata only) leaves the stored one alone.
        store
            .commit(&BatchWrite {
                session_id: "sess_1",
                cursor: None,
                finished: false,
                state: &state,
                series: &[],
                closed_turns: &[],
                log_records: &[],
                event_ids: &[],
            })
            .expect("commit");
        let sessions: Vec<StoredSession<SessionState>> = store.load_sessions().expect("sessions");
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].cursor.as_deref(), Some("evt_7"));
        assert_eq!(sessions[0].state, state);
        assert_eq!(store.load_series().expect("series").len(), 1);
    }

    #[test]
    fn a_second_opener_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("s.db");
        let _first = StateStore::open(&path).expect("open");
        let err = StateStore::open(&path).expect_err("locked");
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("in use by another qoder-exporter"));
        // The same file under other names: a symlink, a path through `..`.
        let link = dir.path().join("other-name.db");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        let err = StateStore::open(&link).expect_err("locked through a symlink");
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        std::fs::create_dir(dir.path().join("sub")).expect("dir");
        let dotted = dir.path().join("sub/../s.db");
        let err = StateStore::open(&dotted).expect_err("locked through ..");
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
    }

    #[test]
    fn foreign_and_corrupt_files_are_refused_untouched() {
        let dir = tempfile::tempdir().expect("dir");
        let garbage = dir.path().join("garbage.db");
        std::fs::write(
            &garbage,
            b"this is not a database at all, not even close........",
        )
        .expect("write");
        let before = std::fs::read(&garbage).expect("read");
        let err = StateStore::open(&garbage).expect_err("corrupt");
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        assert_eq!(
            std::fs::read(&garbage).expect("read"),
            before,
            "left untouched"
        );

        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign)
            .and_then(|c| c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);"))
            .expect("foreign db");
        let err = StateStore::open(&foreign).expect_err("foreign");
        assert!(matches!(err, StateError::Foreign { .. }), "{err}");
    }

    #[test]
    fn event_ids_are_read_back_merged_and_forgotten_with_their_session() {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = StateStore::open(&dir.path().join("s.db")).expect("store");
        let state = SessionState::new("a".into());
        for n in 0..20u64 {
            let ids = [
                (String::new(), vec![n]),
                ("thr_1".to_owned(), vec![100 + n]),
            ];
            store
                .commit(&BatchWrite {
                    session_id: "s",
                    cursor: None,
                    finished: false,
                    state: &state,
                    series: &[],
                    closed_turns: &[],
                    log_records: &[],
                    event_ids: &ids,
                })
                .expect("commit");
        }
        let rows = |store: &StateStore| -> i64 {
            store
                .conn
                .query_row("SELECT count(*) FROM event_ids", [], |r| r.get(0))
                .expect("count")
        };
        assert_eq!(rows(&store), 40);
        let own = store.load_event_ids("s", "").expect("load");
        assert_eq!(own, (0..20).collect::<Vec<_>>());
        assert_eq!(rows(&store), 21, "the session's stream merged into one row");
        assert_eq!(store.load_event_ids("s", "").expect("again"), own);
        assert_eq!(
            store.load_event_ids("s", "thr_1").expect("thread"),
            (100..120).collect::<Vec<_>>()
        );
        assert!(store.load_event_ids("other", "").expect("none").is_empty());
        store.upsert_session("s", &state, true).expect("finish");
        assert_eq!(rows(&store), 0);
    }

    #[test]
    fn outbox_trims_oldest_first() {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = StateStore::open(&dir.path().join("s.db")).expect("open");
        let state = SessionState::new("a".into());
        let turn = |key: &str| ClosedTurn {
            session_id: "s".into(),
            agent: "a".into(),
            agent_id: None,
            model: "m".into(),
            turn: crate::turn::Turn {
                key: key.into(),
                has_turn_id: false,
                first_event_id: key.into(),
                start_ns: None,
                last_ns: None,
                tokens_from_requests: false,
                tokens: crate::event::Tokens::default(),
                credits: 0.0,
                tokens_reported: false,
                credits_reported: false,
                last_model: None,
                failed: None,
                children: vec![],
                children_dropped: 0,
                errors: vec![],
                span_events: vec![],
                messages: vec![],
                parent: None,
                error_code: None,
            },
            end_ns: None,
            end: crate::turn::TurnEnd::Terminated,
        };
        let turns: Vec<_> = ["1", "2", "3"].iter().map(|k| turn(k)).collect();
        store
            .commit(&BatchWrite {
                session_id: "s",
                cursor: None,
                finished: false,
                state: &state,
                series: &[],
                closed_turns: &turns,
                log_records: &[],
                event_ids: &[],
            })
            .expect("commit");
        let keys = |v: &[Option<ClosedTurn>]| {
            v.iter()
                .map(|t| t.as_ref().expect("decodes").turn.key.clone())
                .collect::<Vec<_>>()
        };
        // A batch being exported (seq 1) is kept; the next oldest goes instead.
        let first = store
            .outbox_peek::<ClosedTurn>(Outbox::Turns, 1)
            .expect("peek")[0]
            .0;
        let dropped = store
            .outbox_trim::<ClosedTurn>(Outbox::Turns, 2, Some(first))
            .expect("trim");
        assert_eq!(keys(&dropped), ["2"]);
        let dropped = store
            .outbox_trim::<ClosedTurn>(Outbox::Turns, 1, None)
            .expect("trim");
        assert_eq!(keys(&dropped), ["1"]);
        let left = store
            .outbox_peek::<ClosedTurn>(Outbox::Turns, 10)
            .expect("peek");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1.as_ref().expect("decodes").turn.key, "3");
    }
}
