//! Durable divergence records: one storage interface with two implementations, an embedded
//! SQLite store (the default, so the quick start needs nothing) and Redis (shared by all
//! replicas; also Redis Cluster), plus the writer that keeps the request path away from both.
//!
//! Both stores behave the same; `tests/store.rs` runs one behavioural suite against each.

pub mod redis;
pub mod spool;
pub mod sqlite;
pub mod writer;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;

use crate::record::{Record, State};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Whether a record keeps its route from reading ready: classified `defect`, and neither
/// resolved nor marked expected. Age-based retention keeps such records (the per-route cap
/// still bounds them), or the block would lift with nobody having acted.
pub fn blocks_verdict(r: &Record) -> bool {
    r.class.as_deref() == Some("defect") && matches!(r.state, State::Open | State::Acknowledged)
}

/// A change to one stored record (state, class, note, history), for [`Store::modify`]. It may
/// be applied more than once, each time to a fresh copy of the stored record.
pub type RecordChange = Arc<dyn Fn(&mut Record) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bad store URL `{url}`: {message}")]
    Url { url: String, message: String },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("store task failed: {0}")]
    Task(String),
    #[error("corrupt record {id}: {source}")]
    Corrupt {
        id: String,
        source: serde_json::Error,
    },
    #[error("store timed out")]
    Timeout,
}

/// Which records to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub route: Option<String>,
    pub state: Option<State>,
    pub class: Option<String>,
    pub fingerprint: Option<String>,
    /// Inclusive lower bound, Unix ms.
    pub since_ms: Option<u64>,
    /// Exclusive upper bound, Unix ms.
    pub until_ms: Option<u64>,
    /// At most this many (0 means 50).
    pub limit: usize,
    /// The `next` of the previous page.
    pub cursor: Option<String>,
}

impl Filter {
    pub fn limit(&self) -> usize {
        match self.limit {
            0 => 50,
            n => n.min(1000),
        }
    }

    /// Whether `record` passes every condition but the cursor.
    pub fn accepts(&self, r: &Record) -> bool {
        let at = r.at_ms();
        self.route.as_ref().is_none_or(|v| *v == r.route)
            && self.state.is_none_or(|v| v == r.state)
            && self
                .class
                .as_ref()
                .is_none_or(|v| Some(v) == r.class.as_ref())
            && self
                .fingerprint
                .as_ref()
                .is_none_or(|v| *v == r.fingerprint)
            && self.since_ms.is_none_or(|v| at >= v)
            && self.until_ms.is_none_or(|v| at < v)
    }
}

/// One page of records and the cursor of the next (`None` at the end).
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub items: Vec<Record>,
    pub next: Option<String>,
}

/// Comparisons and divergences of a route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub comparisons: u64,
    pub divergences: u64,
}

/// Counts to add for one route and one hour (Unix hours).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountDelta {
    pub route: String,
    pub hour: u64,
    pub counts: Counts,
}

/// How long records and counters are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Records older than this are deleted (with their index entries).
    pub records_ms: u64,
    /// At most this many records per route; the oldest go first.
    pub per_route_cap: usize,
}

/// A fleet-wide emergency override of a route, kept in the store so that every replica
/// applies it (and one that starts later too).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Override {
    pub route: String,
    /// `"legacy"` or `"new"`: who answers, whatever the rules say.
    pub authority: Option<String>,
    /// `Some(false)` stops shadowing on the route.
    pub shadow: Option<bool>,
    /// Unix ms after which the override no longer applies.
    pub until_ms: u64,
    pub reason: String,
    pub who: String,
    /// RFC 3339.
    pub at: String,
}

/// A group marked `expected` through the API: the divergences of this fingerprint that are
/// recorded later are written expected too (with the mark's class and note, when it has
/// them), until the group is given another state. Kept in the store so that every replica
/// applies it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct GroupMark {
    pub fingerprint: String,
    pub route: String,
    /// Set on later records when the mark gave one (`None`: their own class stays).
    pub class: Option<String>,
    pub note: Option<String>,
    pub who: String,
    /// RFC 3339.
    pub at: String,
}

/// The storage interface. Writes are idempotent by record id: delivering a record twice
/// (after a crash, from the spool) stores it once.
pub trait Store: Send + Sync {
    /// `"sqlite"` or `"redis"`.
    fn kind(&self) -> &'static str;
    /// Stores new records; ids already present are left untouched.
    fn put<'a>(&'a self, records: &'a [Record]) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Applies `change` to the record as stored, keeping indexes right, and returns the record
    /// written; `None` when there is no such record. The change is applied to the stored
    /// record at the moment of writing (again, if the record changed meanwhile), so two
    /// changes made at once, on one replica or on two, never undo each other.
    fn modify<'a>(
        &'a self,
        id: &'a str,
        change: RecordChange,
    ) -> BoxFuture<'a, Result<Option<Record>, StoreError>>;
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Record>, StoreError>>;
    fn list<'a>(&'a self, filter: &'a Filter) -> BoxFuture<'a, Result<Page, StoreError>>;
    /// How many records pass the filter (its cursor and limit are ignored).
    fn count<'a>(&'a self, filter: &'a Filter) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// Adds per-route, per-hour counts (and to the route's totals), at most once per flush:
    /// `seq` grows with every new flush of `writer`, and a flush sent again with the same `seq`
    /// (its first attempt timed out on ficus's side but reached the store) adds nothing.
    fn add_counts<'a>(
        &'a self,
        writer: &'a str,
        seq: u64,
        deltas: &'a [CountDelta],
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// A route's totals, and its counts from `since_hour` to the current hour (hours written
    /// by a clock ahead of this one are left out until it gets there).
    fn counts<'a>(
        &'a self,
        route: &'a str,
        since_hour: u64,
    ) -> BoxFuture<'a, Result<(Counts, Counts), StoreError>>;
    /// When (Unix ms) each of a route's records in `state` from `since_ms` on was made, newest
    /// first, at most `limit` of them (the newest), and whether there were more (or the store
    /// stopped looking: Redis examines at most 100,000 index entries); the records themselves
    /// are not read. Feeds the report's per-hour figures of records marked `expected`.
    fn record_times<'a>(
        &'a self,
        route: &'a str,
        state: State,
        since_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<(Vec<u64>, bool), StoreError>>;
    /// A route's counts per hour from `since_hour` to the current hour, oldest first; hours
    /// without any comparison are left out. Feeds the divergence-rate charts of the workbench.
    fn hourly<'a>(
        &'a self,
        route: &'a str,
        since_hour: u64,
    ) -> BoxFuture<'a, Result<Vec<(u64, Counts)>, StoreError>>;
    /// Deletes records past retention; returns how many went.
    fn expire(&self, retention: Retention, now_ms: u64) -> BoxFuture<'_, Result<u64, StoreError>>;
    /// Sets (or replaces) the override of a route.
    fn put_override<'a>(&'a self, o: &'a Override) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Lifts the override of a route; whether there was one.
    fn delete_override<'a>(&'a self, route: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Every override stored (expired ones included; callers check `until_ms`).
    fn overrides(&self) -> BoxFuture<'_, Result<Vec<Override>, StoreError>>;
    /// Sets (or replaces) the mark of a group.
    fn put_group_mark<'a>(&'a self, m: &'a GroupMark) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Removes the mark of a group; whether there was one.
    fn delete_group_mark<'a>(
        &'a self,
        fingerprint: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Every group mark stored.
    fn group_marks(&self) -> BoxFuture<'_, Result<Vec<GroupMark>, StoreError>>;
    /// Appends an entry to the audit log (override set or lifted: who, when, why).
    fn append_audit<'a>(
        &'a self,
        entry: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// The newest audit entries, newest first (the log keeps the last 10,000).
    fn audit(&self, limit: usize) -> BoxFuture<'_, Result<Vec<serde_json::Value>, StoreError>>;
    /// Cheap reachability check.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Takes the claim `name` for every replica sharing the store, for at most `ttl` (a
    /// replica that dies holding it does not hold it for ever): the token to release it with,
    /// or `None` when another holder has it. A store only one replica uses (SQLite) has no
    /// other holder, and the replica keeps its own claims in memory: it always grants.
    fn claim<'a>(
        &'a self,
        _name: &'a str,
        _ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async { Ok(Some(String::new())) })
    }
    /// Releases a claim taken with [`Store::claim`], if `token` still holds it (one that
    /// expired and was taken by another holder is left to that holder).
    fn release<'a>(
        &'a self,
        _name: &'a str,
        _token: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Opens the store named by `url`: `sqlite:PATH`, `redis://[:PASSWORD@]HOST:PORT/DB`,
/// `rediss://...` (TLS) or `redis+cluster://HOST:PORT,HOST:PORT,...`.
pub async fn open(url: &str, prefix: &str) -> Result<Arc<dyn Store>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        return Ok(Arc::new(sqlite::SqliteStore::open(path).await?));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return Ok(Arc::new(redis::RedisStore::single(url, prefix)?));
    }
    if let Some(nodes) = url.strip_prefix("redis+cluster://") {
        return Ok(Arc::new(redis::RedisStore::cluster(nodes, prefix).await?));
    }
    Err(StoreError::Url {
        url: url.to_string(),
        message:
            "use sqlite:PATH, redis://HOST:PORT/DB, rediss://... or redis+cluster://H1:P1,H2:P2"
                .into(),
    })
}

/// Audit entries kept.
pub const AUDIT_KEPT: usize = 10_000;

/// The Unix hour of a Unix ms time.
pub fn hour_of(ms: u64) -> u64 {
    ms / 3_600_000
}
