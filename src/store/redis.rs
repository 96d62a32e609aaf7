//! The Redis store, shared by every replica. Layout (keys under a prefix, default `ficus:`):
//!
//! - `{p}rec:{id}`: the record as JSON.
//! - `{p}idx:all`, `{p}idx:route:{route}`, `{p}idx:state:{state}`, `{p}idx:class:{class}`,
//!   `{p}idx:fp:{fingerprint}`: sorted sets of ids, all scores 0, so members sort by id; ids
//!   are UUIDv7, so that is time order and time ranges are lexicographic ranges.
//! - `{p}routes`: the set of routes seen.
//! - `{p}overrides`: hash of route -> emergency override (JSON).
//! - `{p}group_marks`: hash of fingerprint -> group marked expected (JSON).
//! - `{p}audit`: list of audit entries, newest first, the last 10,000.
//! - `{p}cnt:{route}`: hash of total `comparisons` and `divergences`;
//!   `{p}cnt:{route}:{hour}`: the same per Unix hour, expiring after 400 days.
//! - `{p}claim:{name}`: a claim one replica holds (`replay:{id}` while it replays a record),
//!   with a random token, expiring by itself.
//!
//! Each record is written by one Lua script (atomic; `SET NX` first, so a redelivered record
//! changes nothing). In Redis Cluster every key carries the same hash tag (`{ficus}:`), since
//! scripts and transactions must stay within one slot.

use redis::aio::ConnectionLike;
use redis::{AsyncCommands, Script};
use tracing::warn;

use super::{
    BoxFuture, CountDelta, Counts, Filter, GroupMark, Override, Page, RecordChange, Retention,
    Store, StoreError,
};
use crate::record::{Record, State};

/// Hour counters outlive records by far: they are the evidence for readiness.
const HOUR_COUNTER_TTL_SECS: i64 = 400 * 24 * 3600;
/// Longest window `counts` sums hour by hour.
const MAX_WINDOW_HOURS: u64 = 24 * 62;

const PUT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  for i = 2, #KEYS - 1 do redis.call('ZADD', KEYS[i], 0, ARGV[2]) end
  redis.call('SADD', KEYS[#KEYS], ARGV[3])
  return 1
end
return 0";

/// One flush of a writer's counts, at most once: KEYS[1] remembers the writer's last flush,
/// KEYS[2] is the set of routes, then a total and an hour key per delta; ARGV: seq, marker TTL,
/// hour TTL, then comparisons, divergences and route per delta.
const ADD_COUNTS_ONCE: &str = r"
local last = tonumber(redis.call('GET', KEYS[1]) or '-1')
if last >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
for i = 1, (#KEYS - 2) / 2 do
  local total, hour = KEYS[2 * i + 1], KEYS[2 * i + 2]
  for _, k in ipairs({total, hour}) do
    redis.call('HINCRBY', k, 'comparisons', ARGV[3 * i + 1])
    redis.call('HINCRBY', k, 'divergences', ARGV[3 * i + 2])
  end
  redis.call('EXPIRE', hour, ARGV[3])
  redis.call('SADD', KEYS[2], ARGV[3 * i + 3])
end
return 1";

/// How long a writer's last flush is remembered (a live writer refreshes it every flush).
const FLUSH_MARKER_TTL_SECS: i64 = 30 * 24 * 3600;

/// ARGV[4] is the record as the caller read it: if it changed meanwhile (another update), the
/// old indexes in KEYS[2] and KEYS[4] may be wrong, so nothing is done (-1) and the caller reads
/// again.
const UPDATE: &str = r"
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if current ~= ARGV[4] then return -1 end
redis.call('SET', KEYS[1], ARGV[1])
if KEYS[2] ~= KEYS[3] then
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('ZADD', KEYS[3], 0, ARGV[2])
end
if KEYS[4] ~= KEYS[5] then
  if KEYS[4] ~= ARGV[3] then redis.call('ZREM', KEYS[4], ARGV[2]) end
  if KEYS[5] ~= ARGV[3] then redis.call('ZADD', KEYS[5], 0, ARGV[2]) end
end
return 1";

/// Releases a claim only for the token that took it: one that expired meanwhile and was taken
/// by another replica stays that replica's.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// Attempts of one update against concurrent ones.
const UPDATE_ATTEMPTS: usize = 8;

/// Compare and delete, as UPDATE compares and sets: ARGV[2] is the record as the caller read
/// it, whose indexes are KEYS[2..]. If another replica changed it meanwhile (a state or class
/// moved its id to other indexes), nothing is done (-1) and the caller reads it again, so no
/// index keeps the id of a deleted record.
const DELETE: &str = r"
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[2] then return -1 end
redis.call('DEL', KEYS[1])
for i = 2, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1";

/// What deleting a record needs of it (its indexes, and whether it blocks a verdict), read
/// leniently: a record this version cannot read as a [`Record`] (one a newer version wrote
/// during a rolling upgrade, with a state this one does not know) must still go in its time;
/// read strictly, it failed every retention sweep, every minute, so nothing expired again.
#[derive(serde::Deserialize)]
struct Stored {
    id: String,
    route: String,
    state: String,
    #[serde(default)]
    class: Option<String>,
    fingerprint: String,
}

impl Stored {
    /// [`super::blocks_verdict`], for a state this version may not know (which blocks nothing).
    fn blocks_verdict(&self) -> bool {
        self.class.as_deref() == Some("defect")
            && matches!(
                State::parse(&self.state),
                Some(State::Open | State::Acknowledged)
            )
    }
}

enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(Box<LazyCluster>),
}

/// A Redis Cluster connection made on first use, as the single-Redis one is: connecting at
/// once made ficus refuse to start (and so serve no request) while the cluster was down,
/// where it should start, spool, and deliver once the cluster is back. A failed attempt is
/// tried again by the next call; once made, the connection reconnects by itself.
struct LazyCluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
}

impl LazyCluster {
    async fn get(&self) -> Result<redis::cluster_async::ClusterConnection, redis::RedisError> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

pub struct RedisStore {
    conn: Conn,
    prefix: String,
    update: Script,
    delete: Script,
}

/// Runs `$body` with `$c` bound to a connection of either kind.
macro_rules! with_conn {
    ($self:expr, $c:ident => $body:expr) => {
        match &$self.conn {
            Conn::Single(c) => {
                let mut $c = c.clone();
                $body
            }
            Conn::Cluster(lazy) => {
                let mut $c = lazy.get().await?;
                $body
            }
        }
    };
}

impl RedisStore {
    /// A route's totals and its per-hour counts from `since_hour` (at most
    /// [`MAX_WINDOW_HOURS`] back) to now, in one round trip.
    async fn count_rows(
        &self,
        route: &str,
        since_hour: u64,
    ) -> Result<(Counts, Vec<(u64, Counts)>), StoreError> {
        let now_hour = super::hour_of(crate::store::writer::now_ms());
        let first = since_hour.max(now_hour.saturating_sub(MAX_WINDOW_HOURS));
        let mut pipe = redis::pipe();
        let hmget = |pipe: &mut redis::Pipeline, key: String| {
            pipe.cmd("HMGET")
                .arg(key)
                .arg("comparisons")
                .arg("divergences");
        };
        hmget(&mut pipe, self.key(&["cnt", route]));
        for h in first..=now_hour {
            hmget(&mut pipe, self.key(&["cnt", route, &h.to_string()]));
        }
        let rows: Vec<(Option<u64>, Option<u64>)> =
            with_conn!(self, c => pipe.query_async(&mut c).await?);
        let to_counts = |(c, d): (Option<u64>, Option<u64>)| Counts {
            comparisons: c.unwrap_or(0),
            divergences: d.unwrap_or(0),
        };
        let mut rows = rows.into_iter();
        let total = rows.next().map(to_counts).unwrap_or_default();
        Ok((total, (first..).zip(rows.map(to_counts)).collect()))
    }
    /// A single Redis (`redis://` or `rediss://`); connects lazily, reconnects by itself.
    pub fn single(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(2)))
            .set_number_of_retries(1);
        let conn = client.get_connection_manager_lazy(config)?;
        Ok(Self::with(Conn::Single(conn), prefix.to_string()))
    }

    /// A Redis Cluster from its seed nodes `host:port,host:port,...`; connects lazily.
    pub async fn cluster(nodes: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        let nodes: Vec<String> = nodes
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| format!("redis://{n}"))
            .collect();
        let client = redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(std::time::Duration::from_secs(2))
            .response_timeout(std::time::Duration::from_secs(2))
            .build()?;
        let conn = Box::new(LazyCluster {
            client,
            conn: tokio::sync::OnceCell::new(),
        });
        // One hash tag for every key: scripts may only touch keys of one slot.
        let prefix = if prefix.contains('{') {
            prefix.to_string()
        } else {
            format!("{{{}}}:", prefix.trim_end_matches(':'))
        };
        Ok(Self::with(Conn::Cluster(conn), prefix))
    }

    fn with(conn: Conn, prefix: String) -> RedisStore {
        RedisStore {
            conn,
            prefix,
            update: Script::new(UPDATE),
            delete: Script::new(DELETE),
        }
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        k.push_str(&parts.join(":"));
        k
    }

    fn rec(&self, id: &str) -> String {
        self.key(&["rec", id])
    }

    fn state_key(&self, state: State) -> String {
        self.key(&["idx", "state", state.as_str()])
    }

    /// The class index of a record; records without a class map to a key that is never
    /// written (a placeholder in the same hash slot, as Redis Cluster requires).
    fn class_key(&self, class: Option<&str>) -> String {
        class.map_or_else(|| self.no_class_key(), |c| self.key(&["idx", "class", c]))
    }

    fn no_class_key(&self) -> String {
        self.key(&["noclass"])
    }

    /// Every index a record is in, and the record key first.
    /// How many ids lie in every one of `keys` (same-score index sets) between the lex bounds
    /// `lower` and `upper`. One index: ZLEXCOUNT. More: the smallest is walked in pages of ids,
    /// each page checked against the others with ZMSCORE; exact however many there are.
    async fn count_range(
        &self,
        keys: &[String],
        mut lower: String,
        upper: &str,
    ) -> Result<u64, StoreError> {
        const PAGE: isize = 1000;
        if let [one] = keys {
            let n: u64 = with_conn!(self, c => redis::cmd("ZLEXCOUNT")
                .arg(one)
                .arg(&lower)
                .arg(upper)
                .query_async(&mut c)
                .await?);
            return Ok(n);
        }
        let mut sizes = Vec::with_capacity(keys.len());
        for k in keys {
            let n: u64 = with_conn!(self, c => c.zcard(k).await?);
            sizes.push(n);
        }
        let smallest = (0..keys.len()).min_by_key(|&i| sizes[i]).unwrap_or(0);
        let walk = &keys[smallest];
        let others: Vec<&String> = (0..keys.len())
            .filter(|&i| i != smallest)
            .map(|i| &keys[i])
            .collect();
        let mut n = 0;
        loop {
            let ids: Vec<String> =
                with_conn!(self, c => c.zrangebylex_limit(walk, &lower, upper, 0, PAGE).await?);
            let Some(last) = ids.last() else {
                return Ok(n);
            };
            lower = format!("({last}");
            let mut present = vec![true; ids.len()];
            for other in &others {
                let scores: Vec<Option<f64>> = with_conn!(self, c => redis::cmd("ZMSCORE")
                    .arg(*other)
                    .arg(&ids)
                    .query_async(&mut c)
                    .await?);
                for (p, score) in present.iter_mut().zip(scores) {
                    *p &= score.is_some();
                }
            }
            n += present.iter().filter(|&&p| p).count() as u64;
            if ids.len() < PAGE as usize {
                return Ok(n);
            }
        }
    }

    fn keys_of(&self, r: &Record) -> Vec<String> {
        self.index_keys(
            &r.id,
            &r.route,
            r.state.as_str(),
            &r.fingerprint,
            r.class.as_deref(),
        )
    }

    /// The record key, then every index of a record with these fields.
    fn index_keys(
        &self,
        id: &str,
        route: &str,
        state: &str,
        fingerprint: &str,
        class: Option<&str>,
    ) -> Vec<String> {
        let mut keys = vec![
            self.rec(id),
            self.key(&["idx", "all"]),
            self.key(&["idx", "route", route]),
            self.key(&["idx", "state", state]),
            self.key(&["idx", "fp", fingerprint]),
        ];
        if let Some(class) = class {
            keys.push(self.class_key(Some(class)));
        }
        keys
    }

    async fn run_script<C: ConnectionLike + Send>(
        c: &mut C,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<i64, StoreError> {
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(k);
        }
        for a in args {
            invocation.arg(a);
        }
        Ok(invocation.invoke_async(c).await?)
    }

    async fn fetch(&self, ids: &[String]) -> Result<Vec<Record>, StoreError> {
        Ok(self
            .fetch_raw(ids)
            .await?
            .into_iter()
            .map(|(record, _)| record)
            .collect())
    }

    /// The records of `ids` that exist, each with its JSON as stored.
    async fn fetch_raw(&self, ids: &[String]) -> Result<Vec<(Record, String)>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.rec(id)).collect();
        // One GET per key: in a cluster MGET would need one slot (it has one, but a plain
        // pipeline keeps this independent of the prefix).
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.get(k);
        }
        let values: Vec<Option<String>> = with_conn!(self, c => pipe.query_async(&mut c).await?);
        let mut out = Vec::new();
        for (id, v) in ids.iter().zip(values) {
            if let Some(json) = v {
                let record = serde_json::from_str(&json).map_err(|source| StoreError::Corrupt {
                    id: id.clone(),
                    source,
                })?;
                out.push((record, json));
            }
        }
        Ok(out)
    }

    /// The records of `ids` that exist, each with its JSON as stored, read only for what
    /// deleting them needs ([`Stored`]); `None` for a value not even that can be read.
    async fn fetch_stored(
        &self,
        ids: &[String],
    ) -> Result<Vec<(String, Option<Stored>, String)>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.get(self.rec(id));
        }
        let values: Vec<Option<String>> = with_conn!(self, c => pipe.query_async(&mut c).await?);
        let mut out = Vec::new();
        for (id, v) in ids.iter().zip(values) {
            if let Some(json) = v {
                let stored = match serde_json::from_str::<Stored>(&json) {
                    Ok(stored) => Some(stored),
                    Err(e) => {
                        warn!(id = %id, error = %e, "a stored record cannot be read, not even its indexes: retention leaves it");
                        None
                    }
                };
                out.push((id.clone(), stored, json));
            }
        }
        Ok(out)
    }

    /// Deletes a record with its index entries: those of the record as stored when the
    /// script runs (read again if another replica changed it since `json` was read), if
    /// `doomed` still selects it as stored then. Whether it was deleted.
    async fn delete_record(
        &self,
        mut record: Stored,
        mut json: String,
        doomed: fn(&Stored) -> bool,
    ) -> Result<bool, StoreError> {
        for _ in 0..UPDATE_ATTEMPTS {
            if !doomed(&record) {
                return Ok(false);
            }
            let keys = self.index_keys(
                &record.id,
                &record.route,
                &record.state,
                &record.fingerprint,
                record.class.as_deref(),
            );
            let args = [record.id.clone(), json];
            let done =
                with_conn!(self, c => Self::run_script(&mut c, &self.delete, &keys, &args).await)?;
            if done >= 0 {
                return Ok(true);
            }
            match self
                .fetch_stored(std::slice::from_ref(&record.id))
                .await?
                .pop()
            {
                Some((_, Some(fresh), fresh_json)) => (record, json) = (fresh, fresh_json),
                _ => return Ok(false),
            }
        }
        Err(StoreError::Task(format!(
            "record {} kept changing during its deletion",
            record.id
        )))
    }

    /// Deletes the records of `ids` that `doomed` selects; how many went.
    async fn delete_ids(
        &self,
        ids: &[String],
        doomed: fn(&Stored) -> bool,
    ) -> Result<u64, StoreError> {
        let records = self.fetch_stored(ids).await?;
        let found: std::collections::HashSet<String> =
            records.iter().map(|(id, _, _)| id.clone()).collect();
        let mut n = 0;
        for (_, record, json) in records {
            let Some(record) = record else { continue };
            if self.delete_record(record, json, doomed).await? {
                n += 1;
            }
        }
        // Index entries without a record (should not exist) are removed too.
        let orphans: Vec<&String> = ids.iter().filter(|id| !found.contains(*id)).collect();
        if !orphans.is_empty() {
            let all = self.key(&["idx", "all"]);
            let _: i64 = with_conn!(self, c => c.zrem(&all, &orphans).await?);
        }
        Ok(n)
    }

    /// Deletes what `doomed` selects among the ids of `index` from `from` (a lex bound) to
    /// `to`, in batches; how many went. Each batch starts after the last id of the one
    /// before, since records `doomed` spares stay in the index.
    async fn delete_range(
        &self,
        index: &str,
        to: &str,
        doomed: fn(&Stored) -> bool,
    ) -> Result<u64, StoreError> {
        let mut from = "-".to_string();
        let mut gone = 0;
        loop {
            let ids: Vec<String> =
                with_conn!(self, c => c.zrangebylex_limit(index, &from, to, 0, 500).await?);
            let Some(last) = ids.last() else {
                return Ok(gone);
            };
            from = format!("({last}");
            gone += self.delete_ids(&ids, doomed).await?;
        }
    }
}

/// The first 13 characters of the UUIDv7 of `ms` (`xxxxxxxx-xxxx`): every id of that
/// millisecond starts with it, so it bounds lexicographic ranges.
/// Past the 48 bits of a UUIDv7 time (the year 10889: a bound given in µs, say), the
/// prefix is the highest one, so a bound that far out means "any time", as in SQLite, instead
/// of wrapping around to some other time.
fn id_prefix(ms: u64) -> String {
    let hex = format!("{:012x}", ms.min(0xffff_ffff_ffff));
    format!("{}-{}", &hex[..8], &hex[8..])
}

/// The Unix ms in a UUIDv7 id (the inverse of [`id_prefix`]); 0 for anything else.
fn id_time_ms(id: &str) -> u64 {
    let hex: String = id.chars().filter(|c| *c != '-').take(12).collect();
    u64::from_str_radix(&hex, 16).unwrap_or(0)
}

impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn put<'a>(&'a self, records: &'a [Record]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if records.is_empty() {
                return Ok(());
            }
            // One round trip per batch: the scripts are pipelined (EVAL; Redis caches them).
            let routes = self.key(&["routes"]);
            let mut pipe = redis::pipe();
            for r in records {
                let json = serde_json::to_string(r).unwrap_or_default();
                let mut keys = self.keys_of(r);
                keys.push(routes.clone());
                pipe.cmd("EVAL")
                    .arg(PUT)
                    .arg(keys.len())
                    .arg(&keys)
                    .arg(json)
                    .arg(&r.id)
                    .arg(&r.route)
                    .ignore();
            }
            let () = with_conn!(self, c => pipe.query_async(&mut c).await?);
            Ok(())
        })
    }

    fn modify<'a>(
        &'a self,
        id: &'a str,
        change: RecordChange,
    ) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(async move {
            // Compare and set: the change is applied to the record as read, and written only
            // if it is still stored so; otherwise it is read and applied again. The indexes to
            // leave are those of the record as read.
            let key = self.rec(id);
            for _ in 0..UPDATE_ATTEMPTS {
                let current: Option<String> = with_conn!(self, c => c.get(&key).await?);
                let Some(current) = current else {
                    return Ok(None);
                };
                let old: Record =
                    serde_json::from_str(&current).map_err(|source| StoreError::Corrupt {
                        id: id.to_string(),
                        source,
                    })?;
                let mut record = old.clone();
                change(&mut record);
                let keys = [
                    key.clone(),
                    self.state_key(old.state),
                    self.state_key(record.state),
                    self.class_key(old.class.as_deref()),
                    self.class_key(record.class.as_deref()),
                ];
                let args = [
                    serde_json::to_string(&record).unwrap_or_default(),
                    record.id.clone(),
                    self.no_class_key(),
                    current,
                ];
                let done = with_conn!(self, c => Self::run_script(&mut c, &self.update, &keys, &args).await)?;
                match done {
                    1 => return Ok(Some(record)),
                    0 => return Ok(None),
                    _ => {}
                }
            }
            Err(StoreError::Task(format!(
                "record {id} kept changing during its update"
            )))
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(async move { Ok(self.fetch(&[id.to_string()]).await?.pop()) })
    }

    fn list<'a>(&'a self, f: &'a Filter) -> BoxFuture<'a, Result<Page, StoreError>> {
        Box::pin(async move {
            // The most selective index the filter names; other conditions are checked here.
            let index = if let Some(fp) = &f.fingerprint {
                self.key(&["idx", "fp", fp])
            } else if let Some(class) = &f.class {
                self.key(&["idx", "class", class])
            } else if let Some(route) = &f.route {
                self.key(&["idx", "route", route])
            } else if let Some(state) = f.state {
                self.state_key(state)
            } else {
                self.key(&["idx", "all"])
            };
            let limit = f.limit();
            let mut upper = match (&f.cursor, f.until_ms) {
                (Some(cursor), Some(until)) => {
                    format!("({}", cursor.as_str().min(&id_prefix(until)))
                }
                (Some(cursor), None) => format!("({cursor}"),
                (None, Some(until)) => format!("({}", id_prefix(until)),
                (None, None) => "+".to_string(),
            };
            let lower = f
                .since_ms
                .map_or("-".to_string(), |s| format!("[{}", id_prefix(s)));
            let mut items = Vec::new();
            // Bounded scan: at most 20 batches per page; the cursor lets the caller go on.
            for _ in 0..20 {
                let batch = (limit + 1).max(100);
                let ids: Vec<String> = with_conn!(self, c => c
                    .zrevrangebylex_limit(&index, &upper, &lower, 0, batch as isize)
                    .await?);
                let exhausted = ids.len() < batch;
                if let Some(last) = ids.last() {
                    upper = format!("({last}");
                }
                for r in self.fetch(&ids).await? {
                    if f.accepts(&r) {
                        items.push(r);
                    }
                }
                if items.len() > limit {
                    items.truncate(limit);
                    let next = items.last().map(|r| r.id.clone());
                    return Ok(Page { items, next });
                }
                if exhausted {
                    return Ok(Page { items, next: None });
                }
            }
            let next = upper.strip_prefix('(').map(str::to_string);
            Ok(Page { items, next })
        })
    }

    fn count<'a>(&'a self, f: &'a Filter) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            // Exact, from the indexes the filter names (no record is read): every index holds
            // the ids of its records, and ids sort by time (UUIDv7), so a time bound is a
            // range of ids.
            let mut keys = Vec::new();
            if let Some(route) = &f.route {
                keys.push(self.key(&["idx", "route", route]));
            }
            if let Some(state) = f.state {
                keys.push(self.state_key(state));
            }
            if let Some(class) = &f.class {
                keys.push(self.key(&["idx", "class", class]));
            }
            if let Some(fp) = &f.fingerprint {
                keys.push(self.key(&["idx", "fp", fp]));
            }
            if keys.is_empty() {
                keys.push(self.key(&["idx", "all"]));
            }
            if f.since_ms.is_none() && f.until_ms.is_none() {
                let n: u64 = match keys.as_slice() {
                    [one] => with_conn!(self, c => c.zcard(one).await?),
                    many => with_conn!(self, c => redis::cmd("ZINTERCARD")
                        .arg(many.len())
                        .arg(many)
                        .query_async(&mut c)
                        .await?),
                };
                return Ok(n);
            }
            let lower = f
                .since_ms
                .map_or("-".to_string(), |s| format!("[{}", id_prefix(s)));
            let upper = f
                .until_ms
                .map_or("+".to_string(), |u| format!("({}", id_prefix(u)));
            self.count_range(&keys, lower, &upper).await
        })
    }

    fn add_counts<'a>(
        &'a self,
        writer: &'a str,
        seq: u64,
        deltas: &'a [CountDelta],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if deltas.is_empty() {
                return Ok(());
            }
            let mut keys = vec![self.key(&["flush", writer]), self.key(&["routes"])];
            let mut args = vec![
                seq.to_string(),
                FLUSH_MARKER_TTL_SECS.to_string(),
                HOUR_COUNTER_TTL_SECS.to_string(),
            ];
            for d in deltas {
                keys.push(self.key(&["cnt", &d.route]));
                keys.push(self.key(&["cnt", &d.route, &d.hour.to_string()]));
                args.push(d.counts.comparisons.to_string());
                args.push(d.counts.divergences.to_string());
                args.push(d.route.clone());
            }
            let script = Script::new(ADD_COUNTS_ONCE);
            with_conn!(self, c => Self::run_script(&mut c, &script, &keys, &args).await)?;
            Ok(())
        })
    }

    fn counts<'a>(
        &'a self,
        route: &'a str,
        since_hour: u64,
    ) -> BoxFuture<'a, Result<(Counts, Counts), StoreError>> {
        Box::pin(async move {
            let (total, hours) = self.count_rows(route, since_hour).await?;
            let window = hours
                .into_iter()
                .fold(Counts::default(), |a, (_, b)| Counts {
                    comparisons: a.comparisons + b.comparisons,
                    divergences: a.divergences + b.divergences,
                });
            Ok((total, window))
        })
    }

    fn record_times<'a>(
        &'a self,
        route: &'a str,
        state: State,
        since_ms: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<(Vec<u64>, bool), StoreError>> {
        Box::pin(async move {
            // Ids are UUIDv7: their order is their time, and their time is in them. Walk the
            // smaller of the two indexes by id, newest first down to `since_ms`, a page at a
            // time, and keep the ids the other index holds too (one ZMSCORE per page): no record
            // is read, and at most MAX_PAGES pages are.
            const PAGE: isize = 1000;
            const MAX_PAGES: usize = 100;
            let (by_state, by_route) = (self.state_key(state), self.key(&["idx", "route", route]));
            let (n_state, n_route): (u64, u64) = with_conn!(self, c => {
                let n_state: u64 = c.zcard(&by_state).await?;
                let n_route: u64 = c.zcard(&by_route).await?;
                (n_state, n_route)
            });
            let (walk, other) = if n_route <= n_state {
                (by_route, by_state)
            } else {
                (by_state, by_route)
            };
            let floor = format!("[{}", id_prefix(since_ms));
            let mut from = "+".to_string();
            let mut times = Vec::new();
            for _ in 0..MAX_PAGES {
                let ids: Vec<String> = with_conn!(self, c => c.zrevrangebylex_limit(&walk, &from, &floor, 0, PAGE).await?);
                let Some(last) = ids.last() else {
                    return Ok((times, false));
                };
                from = format!("({last}");
                let scores: Vec<Option<f64>> = with_conn!(self, c => redis::cmd("ZMSCORE")
                    .arg(&other)
                    .arg(&ids)
                    .query_async(&mut c)
                    .await?);
                for (id, score) in ids.iter().zip(scores) {
                    if score.is_none() {
                        continue;
                    }
                    if times.len() == limit {
                        return Ok((times, true));
                    }
                    times.push(id_time_ms(id));
                }
                if ids.len() < PAGE as usize {
                    return Ok((times, false));
                }
            }
            Ok((times, true))
        })
    }

    fn hourly<'a>(
        &'a self,
        route: &'a str,
        since_hour: u64,
    ) -> BoxFuture<'a, Result<Vec<(u64, Counts)>, StoreError>> {
        Box::pin(async move {
            let (_, hours) = self.count_rows(route, since_hour).await?;
            Ok(hours
                .into_iter()
                .filter(|(_, c)| c.comparisons > 0)
                .collect())
        })
    }

    fn expire(&self, retention: Retention, now_ms: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            // Every replica sweeps the records all of them share, each with its own clock: one
            // whose clock runs ahead (days, on a VM whose clock nobody keeps) would delete
            // everyone's records before their time. Redis's clock, one for all, bounds it; a
            // replica whose clock is behind only keeps records a little longer.
            let (secs, micros): (u64, u64) =
                with_conn!(self, c => redis::cmd("TIME").query_async(&mut c).await?);
            let now_ms = now_ms.min(secs.saturating_mul(1000) + micros / 1000);
            let all = self.key(&["idx", "all"]);
            let cutoff = format!(
                "({}",
                id_prefix(now_ms.saturating_sub(retention.records_ms))
            );
            // Unresolved defects stay (see `blocks_verdict`).
            let mut gone = self
                .delete_range(&all, &cutoff, |r| !r.blocks_verdict())
                .await?;
            let routes: Vec<String> =
                with_conn!(self, c => c.smembers(self.key(&["routes"])).await?);
            let cap = isize::try_from(retention.per_route_cap).unwrap_or(isize::MAX);
            for route in routes {
                let index = self.key(&["idx", "route", &route]);
                // The oldest record the cap keeps: what is older goes. Taken from the newest
                // end, so that sweeps of several replicas at once agree on it (counting, then
                // taking "the oldest excess" after another sweep has deleted it, would take
                // records the cap keeps). A cap of 0 keeps nothing, as in SQLite.
                let below = if cap == 0 {
                    "+".to_string()
                } else {
                    let kept: Vec<String> =
                        with_conn!(self, c => c.zrange(&index, -cap, -cap).await?);
                    match kept.into_iter().next() {
                        Some(oldest_kept) => format!("({oldest_kept}"),
                        None => continue,
                    }
                };
                gone += self.delete_range(&index, &below, |_| true).await?;
            }
            Ok(gone)
        })
    }

    fn put_override<'a>(&'a self, o: &'a Override) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let json = serde_json::to_string(o).unwrap_or_default();
            let _: i64 =
                with_conn!(self, c => c.hset(self.key(&["overrides"]), &o.route, json).await?);
            Ok(())
        })
    }

    fn delete_override<'a>(&'a self, route: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let n: i64 = with_conn!(self, c => c.hdel(self.key(&["overrides"]), route).await?);
            Ok(n > 0)
        })
    }

    fn put_group_mark<'a>(&'a self, m: &'a GroupMark) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let json = serde_json::to_string(m).unwrap_or_default();
            let _: i64 = with_conn!(self, c => c.hset(self.key(&["group_marks"]), &m.fingerprint, json).await?);
            Ok(())
        })
    }

    fn delete_group_mark<'a>(
        &'a self,
        fingerprint: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let n: i64 =
                with_conn!(self, c => c.hdel(self.key(&["group_marks"]), fingerprint).await?);
            Ok(n > 0)
        })
    }

    fn group_marks(&self) -> BoxFuture<'_, Result<Vec<GroupMark>, StoreError>> {
        Box::pin(async move {
            let all: std::collections::HashMap<String, String> =
                with_conn!(self, c => c.hgetall(self.key(&["group_marks"])).await?);
            all.into_iter()
                .map(|(fingerprint, json)| {
                    serde_json::from_str(&json).map_err(|source| StoreError::Corrupt {
                        id: fingerprint,
                        source,
                    })
                })
                .collect()
        })
    }

    fn overrides(&self) -> BoxFuture<'_, Result<Vec<Override>, StoreError>> {
        Box::pin(async move {
            let all: std::collections::HashMap<String, String> =
                with_conn!(self, c => c.hgetall(self.key(&["overrides"])).await?);
            all.into_iter()
                .map(|(route, json)| {
                    serde_json::from_str(&json)
                        .map_err(|source| StoreError::Corrupt { id: route, source })
                })
                .collect()
        })
    }

    fn append_audit<'a>(
        &'a self,
        entry: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let key = self.key(&["audit"]);
            let mut pipe = redis::pipe();
            pipe.lpush(&key, entry.to_string()).ignore();
            pipe.ltrim(&key, 0, super::AUDIT_KEPT as isize - 1).ignore();
            let () = with_conn!(self, c => pipe.query_async(&mut c).await?);
            Ok(())
        })
    }

    fn audit(&self, limit: usize) -> BoxFuture<'_, Result<Vec<serde_json::Value>, StoreError>> {
        Box::pin(async move {
            let entries: Vec<String> = with_conn!(self, c => c
                .lrange(self.key(&["audit"]), 0, limit.max(1) as isize - 1)
                .await?);
            Ok(entries
                .iter()
                .map(|e| serde_json::from_str(e).unwrap_or(serde_json::Value::Null))
                .collect())
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let _: String = with_conn!(self, c => redis::cmd("PING").query_async(&mut c).await?);
            Ok(())
        })
    }

    fn claim<'a>(
        &'a self,
        name: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move {
            // SET NX PX: taken by one replica at a time, and expiring on Redis's clock, so
            // replicas' clocks do not matter.
            let token = crate::record::new_id(std::time::SystemTime::now());
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let set: Option<String> = with_conn!(self, c => redis::cmd("SET")
                .arg(self.key(&["claim", name]))
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(ms)
                .query_async(&mut c)
                .await?);
            Ok(set.map(|_| token))
        })
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let keys = [self.key(&["claim", name])];
            let args = [token.to_string()];
            let script = Script::new(RELEASE);
            with_conn!(self, c => Self::run_script(&mut c, &script, &keys, &args).await)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_prefix_bounds_uuid_v7_ids() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_790_000_000_123);
        let id = crate::record::new_id(t);
        let p = id_prefix(1_790_000_000_123);
        assert!(id.starts_with(&p), "{id} {p}");
        assert!(id_prefix(1_790_000_000_122) < id);
        assert!(id_prefix(1_790_000_000_124).as_str() > id.as_str());
        // A bound past the 48-bit range (micro- instead of milliseconds) saturates.
        assert!(id_prefix(1_790_000_000_123_000).as_str() > id.as_str());
        assert_eq!(id_prefix(u64::MAX), "ffffffff-ffff");
    }
}
