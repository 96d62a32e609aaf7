//! The embedded store: one SQLite file, in WAL mode. Calls run on the blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    BoxFuture, CountDelta, Counts, Filter, GroupMark, Override, Page, RecordChange, Retention,
    Store, StoreError,
};
use crate::record::{Record, State};

/// How long a writer's last flush is remembered (see `Store::add_counts`).
const FLUSH_MARKER_MS: u64 = 30 * 24 * 3_600_000;

pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    id          TEXT PRIMARY KEY,
    route       TEXT NOT NULL,
    at_ms       INTEGER NOT NULL,
    state       TEXT NOT NULL,
    class       TEXT,
    fingerprint TEXT NOT NULL,
    json        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_route ON records (route, id);
CREATE INDEX IF NOT EXISTS records_state ON records (state, id);
CREATE INDEX IF NOT EXISTS records_fingerprint ON records (fingerprint, id);
CREATE INDEX IF NOT EXISTS records_at ON records (at_ms);
CREATE INDEX IF NOT EXISTS records_route_state_at ON records (route, state, at_ms);
CREATE TABLE IF NOT EXISTS audit (
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS overrides (
    route TEXT PRIMARY KEY,
    json  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS group_marks (
    fingerprint TEXT PRIMARY KEY,
    json        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS count_flushes (
    writer TEXT PRIMARY KEY,
    seq    INTEGER NOT NULL,
    at_ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counts (
    route       TEXT NOT NULL,
    hour        INTEGER NOT NULL,
    comparisons INTEGER NOT NULL DEFAULT 0,
    divergences INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (route, hour)
);
";

impl SqliteStore {
    pub async fn open(path: &str) -> Result<SqliteStore, StoreError> {
        let path = path.to_string();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, StoreError> {
            if let Some(dir) = Path::new(&path).parent()
                && !dir.as_os_str().is_empty()
            {
                let _ = std::fs::create_dir_all(dir);
            }
            let conn = Connection::open(&path)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.execute_batch(SCHEMA)?;
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let conn = self.conn.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
                f(&mut conn)
            })
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
        })
    }
}

fn decode(id: &str, json: &str) -> Result<Record, StoreError> {
    serde_json::from_str(json).map_err(|source| StoreError::Corrupt {
        id: id.to_string(),
        source,
    })
}

/// SQLite integers are signed; times and counts fit comfortably.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn upsert_counts(tx: &rusqlite::Transaction<'_>, deltas: &[CountDelta]) -> Result<(), StoreError> {
    let mut upsert = tx.prepare_cached(
        "INSERT INTO counts (route, hour, comparisons, divergences) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (route, hour) DO UPDATE SET
            comparisons = comparisons + excluded.comparisons,
            divergences = divergences + excluded.divergences",
    )?;
    for d in deltas {
        upsert.execute(params![
            d.route,
            int(d.hour),
            int(d.counts.comparisons),
            int(d.counts.divergences)
        ])?;
    }
    Ok(())
}

fn encode(r: &Record) -> String {
    serde_json::to_string(r).unwrap_or_default()
}

impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn put<'a>(&'a self, records: &'a [Record]) -> BoxFuture<'a, Result<(), StoreError>> {
        let rows: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r.id.clone(),
                    r.route.clone(),
                    int(r.at_ms()),
                    r.state.as_str(),
                    r.class.clone(),
                    r.fingerprint.clone(),
                    encode(r),
                )
            })
            .collect();
        self.with(move |conn| {
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT OR IGNORE INTO records (id, route, at_ms, state, class, fingerprint, json)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for (id, route, at, state, class, fp, json) in &rows {
                    insert.execute(params![id, route, at, state, class, fp, json])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn modify<'a>(
        &'a self,
        id: &'a str,
        change: RecordChange,
    ) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        let id = id.to_string();
        self.with(move |conn| {
            // IMMEDIATE takes the write lock before the read: another process on the same file
            // cannot change the record between the two.
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let json: Option<String> = tx
                .query_row("SELECT json FROM records WHERE id = ?1", [&id], |row| {
                    row.get(0)
                })
                .optional()?;
            let Some(json) = json else {
                return Ok(None);
            };
            let mut record = decode(&id, &json)?;
            change(&mut record);
            tx.execute(
                "UPDATE records SET state = ?2, class = ?3, json = ?4 WHERE id = ?1",
                params![id, record.state.as_str(), record.class, encode(&record)],
            )?;
            tx.commit()?;
            Ok(Some(record))
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        let id = id.to_string();
        self.with(move |conn| {
            let json: Option<String> = conn
                .query_row("SELECT json FROM records WHERE id = ?1", [&id], |row| {
                    row.get(0)
                })
                .optional()?;
            json.map(|j| decode(&id, &j)).transpose()
        })
    }

    fn list<'a>(&'a self, filter: &'a Filter) -> BoxFuture<'a, Result<Page, StoreError>> {
        let f = filter.clone();
        self.with(move |conn| {
            let limit = f.limit();
            let mut stmt = conn.prepare_cached(
                "SELECT id, json FROM records
                 WHERE (?1 IS NULL OR route = ?1)
                   AND (?2 IS NULL OR state = ?2)
                   AND (?3 IS NULL OR class = ?3)
                   AND (?4 IS NULL OR fingerprint = ?4)
                   AND (?5 IS NULL OR at_ms >= ?5)
                   AND (?6 IS NULL OR at_ms < ?6)
                   AND (?7 IS NULL OR id < ?7)
                 ORDER BY id DESC LIMIT ?8",
            )?;
            let rows = stmt.query_map(
                params![
                    f.route,
                    f.state.map(|s| s.as_str()),
                    f.class,
                    f.fingerprint,
                    f.since_ms.map(int),
                    f.until_ms.map(int),
                    f.cursor,
                    limit as i64 + 1,
                ],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)),
            )?;
            let mut items = Vec::new();
            for row in rows {
                let (id, json) = row?;
                items.push(decode(&id, &json)?);
            }
            let next = if items.len() > limit {
                items.truncate(limit);
                items.last().map(|r| r.id.clone())
            } else {
                None
            };
            Ok(Page { items, next })
        })
    }

    fn count<'a>(&'a self, filter: &'a Filter) -> BoxFuture<'a, Result<u64, StoreError>> {
        let f = filter.clone();
        self.with(move |conn| {
            let n: i64 = conn.query_row(
                "SELECT COUNT(*) FROM records
                 WHERE (?1 IS NULL OR route = ?1)
                   AND (?2 IS NULL OR state = ?2)
                   AND (?3 IS NULL OR class = ?3)
                   AND (?4 IS NULL OR fingerprint = ?4)
                   AND (?5 IS NULL OR at_ms >= ?5)
                   AND (?6 IS NULL OR at_ms < ?6)",
                params![
                    f.route,
                    f.state.map(|s| s.as_str()),
                    f.class,
                    f.fingerprint,
                    f.since_ms.map(int),
                    f.until_ms.map(int),
                ],
                |row| row.get(0),
            )?;
            Ok(n.max(0) as u64)
        })
    }

    fn add_counts<'a>(
        &'a self,
        writer: &'a str,
        seq: u64,
        deltas: &'a [CountDelta],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let (writer, deltas) = (writer.to_string(), deltas.to_vec());
        self.with(move |conn| {
            let tx = conn.transaction()?;
            let applied: Option<i64> = tx
                .query_row(
                    "SELECT seq FROM count_flushes WHERE writer = ?1",
                    [&writer],
                    |row| row.get(0),
                )
                .optional()?;
            if applied.is_some_and(|s| s >= int(seq)) {
                return Ok(());
            }
            tx.execute(
                "INSERT INTO count_flushes (writer, seq, at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (writer) DO UPDATE SET seq = excluded.seq, at_ms = excluded.at_ms",
                params![writer, int(seq), int(crate::store::writer::now_ms())],
            )?;
            upsert_counts(&tx, &deltas)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn counts<'a>(
        &'a self,
        route: &'a str,
        since_hour: u64,
    ) -> BoxFuture<'a, Result<(Counts, Counts), StoreError>> {
        let route = route.to_string();
        // Up to the current hour, as on Redis: hours a clock ahead has written are not yet.
        let now_hour = super::hour_of(crate::store::writer::now_ms());
        self.with(move |conn| {
            let sum = |since: u64, last: u64| -> Result<Counts, StoreError> {
                Ok(conn.query_row(
                    "SELECT COALESCE(SUM(comparisons), 0), COALESCE(SUM(divergences), 0)
                     FROM counts WHERE route = ?1 AND hour >= ?2 AND hour <= ?3",
                    params![route, int(since), int(last)],
                    |row| {
                        Ok(Counts {
                            comparisons: row.get::<_, i64>(0)?.max(0) as u64,
                            divergences: row.get::<_, i64>(1)?.max(0) as u64,
                        })
                    },
                )?)
            };
            Ok((sum(0, u64::MAX)?, sum(since_hour, now_hour)?))
        })
    }

    fn record_times<'a>(
        &'a self,
        route: &'a str,
        state: State,
        since_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<(Vec<u64>, bool), StoreError>> {
        let route = route.to_string();
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT at_ms FROM records WHERE route = ?1 AND state = ?2 AND at_ms >= ?3
                 ORDER BY id DESC LIMIT ?4",
            )?;
            let wanted = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
            let rows = stmt.query_map(
                params![route, state.as_str(), int(since_ms), wanted],
                |row| Ok(row.get::<_, i64>(0)?.max(0) as u64),
            )?;
            let mut times = rows.collect::<Result<Vec<_>, _>>()?;
            let more = times.len() > limit;
            times.truncate(limit);
            Ok((times, more))
        })
    }

    fn hourly<'a>(
        &'a self,
        route: &'a str,
        since_hour: u64,
    ) -> BoxFuture<'a, Result<Vec<(u64, Counts)>, StoreError>> {
        let route = route.to_string();
        let now_hour = super::hour_of(crate::store::writer::now_ms());
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT hour, comparisons, divergences FROM counts
                 WHERE route = ?1 AND hour >= ?2 AND hour <= ?3 AND comparisons > 0
                 ORDER BY hour",
            )?;
            let rows = stmt.query_map(params![route, int(since_hour), int(now_hour)], |row| {
                Ok((
                    row.get::<_, i64>(0)?.max(0) as u64,
                    Counts {
                        comparisons: row.get::<_, i64>(1)?.max(0) as u64,
                        divergences: row.get::<_, i64>(2)?.max(0) as u64,
                    },
                ))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn expire(&self, retention: Retention, now_ms: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.with(move |conn| {
            let cutoff = now_ms.saturating_sub(retention.records_ms);
            // Unresolved defects stay (see `blocks_verdict`); `IS` because class may be NULL.
            let mut gone = conn.execute(
                "DELETE FROM records WHERE at_ms < ?1
                   AND NOT (class IS 'defect' AND state IN ('open', 'acknowledged'))",
                [int(cutoff)],
            )? as u64;
            // Per-route cap: keep the newest `cap` records of each route.
            gone += conn.execute(
                "DELETE FROM records WHERE id IN (
                    SELECT id FROM (
                        SELECT id, ROW_NUMBER() OVER (PARTITION BY route ORDER BY id DESC) AS n
                        FROM records
                    ) WHERE n > ?1
                )",
                [retention.per_route_cap as i64],
            )? as u64;
            // Flush markers of writers gone for 30 days (a live writer refreshes its own; a
            // restart sends the flush its predecessor left unconfirmed again, and the marker
            // must outlive the wait for that restart).
            conn.execute(
                "DELETE FROM count_flushes WHERE at_ms < ?1",
                [int(now_ms.saturating_sub(FLUSH_MARKER_MS))],
            )?;
            Ok(gone)
        })
    }

    fn put_override<'a>(&'a self, o: &'a Override) -> BoxFuture<'a, Result<(), StoreError>> {
        let (route, json) = (
            o.route.clone(),
            serde_json::to_string(o).unwrap_or_default(),
        );
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO overrides (route, json) VALUES (?1, ?2)
                 ON CONFLICT (route) DO UPDATE SET json = excluded.json",
                params![route, json],
            )?;
            Ok(())
        })
    }

    fn delete_override<'a>(&'a self, route: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        let route = route.to_string();
        self.with(move |conn| {
            Ok(conn.execute("DELETE FROM overrides WHERE route = ?1", [route])? > 0)
        })
    }

    fn put_group_mark<'a>(&'a self, m: &'a GroupMark) -> BoxFuture<'a, Result<(), StoreError>> {
        let (fingerprint, json) = (
            m.fingerprint.clone(),
            serde_json::to_string(m).unwrap_or_default(),
        );
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO group_marks (fingerprint, json) VALUES (?1, ?2)
                 ON CONFLICT (fingerprint) DO UPDATE SET json = excluded.json",
                params![fingerprint, json],
            )?;
            Ok(())
        })
    }

    fn delete_group_mark<'a>(
        &'a self,
        fingerprint: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let fingerprint = fingerprint.to_string();
        self.with(move |conn| {
            Ok(conn.execute(
                "DELETE FROM group_marks WHERE fingerprint = ?1",
                [fingerprint],
            )? > 0)
        })
    }

    fn group_marks(&self) -> BoxFuture<'_, Result<Vec<GroupMark>, StoreError>> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached("SELECT fingerprint, json FROM group_marks")?;
            let rows = stmt.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (fingerprint, json) = row?;
                out.push(
                    serde_json::from_str(&json).map_err(|source| StoreError::Corrupt {
                        id: fingerprint,
                        source,
                    })?,
                );
            }
            Ok(out)
        })
    }

    fn overrides(&self) -> BoxFuture<'_, Result<Vec<Override>, StoreError>> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached("SELECT route, json FROM overrides")?;
            let rows = stmt.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (route, json) = row?;
                out.push(
                    serde_json::from_str(&json)
                        .map_err(|source| StoreError::Corrupt { id: route, source })?,
                );
            }
            Ok(out)
        })
    }

    fn append_audit<'a>(
        &'a self,
        entry: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let json = entry.to_string();
        self.with(move |conn| {
            conn.execute("INSERT INTO audit (json) VALUES (?1)", [json])?;
            conn.execute(
                "DELETE FROM audit WHERE seq <= (SELECT MAX(seq) FROM audit) - ?1",
                [super::AUDIT_KEPT as i64],
            )?;
            Ok(())
        })
    }

    fn audit(&self, limit: usize) -> BoxFuture<'_, Result<Vec<serde_json::Value>, StoreError>> {
        self.with(move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT json FROM audit ORDER BY seq DESC LIMIT ?1")?;
            let rows = stmt.query_map([limit as i64], |row| row.get::<_, String>(0))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(serde_json::from_str(&row?).unwrap_or(serde_json::Value::Null));
            }
            Ok(out)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.with(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
    }
}
