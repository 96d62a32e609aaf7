//! The record writer: the only way records reach a store. The comparison stage hands records
//! over with a non-blocking `try_send`; one task writes them in batches. When the store is
//! slow or down, batches go to the local spool instead and are delivered, in order, once the
//! store answers again. Only when the spool is full (or the queue, if even the spool cannot
//! keep up) is a record dropped, and every drop is counted and logged.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::spool::{Batch, Spool};
use super::{CountDelta, Counts, Retention, Store, hour_of};
use crate::record::{Record, Recorder};
use crate::telemetry;

/// Settings of the writer.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    /// Records waiting for the writer task; beyond it records are dropped and counted.
    pub queue: usize,
    pub retention: Retention,
    /// Longest a store call may take before the writer falls back to the spool.
    pub store_timeout: Duration,
    /// How often the retention sweep runs.
    pub sweep_every: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            spool_dir: PathBuf::from("ficus-spool"),
            spool_max_bytes: 256 << 20,
            queue: 10_000,
            retention: Retention {
                records_ms: 7 * 24 * 3_600_000,
                per_route_cap: 100_000,
            },
            store_timeout: Duration::from_secs(2),
            sweep_every: Duration::from_secs(60),
        }
    }
}

/// Counters of the writer, readable at any time.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Records written to the store directly.
    pub written: AtomicU64,
    /// Records appended to the spool.
    pub spooled: AtomicU64,
    /// Records delivered from the spool to the store.
    pub delivered: AtomicU64,
    /// Records lost: queue or spool full.
    pub dropped: AtomicU64,
    /// Records in the queue now.
    pub queued: AtomicU64,
    /// Bytes in the spool waiting for delivery.
    pub spool_pending_bytes: AtomicU64,
    /// Records in the spool waiting for delivery.
    pub spool_pending_records: AtomicU64,
    /// Records removed by retention.
    pub expired: AtomicU64,
}

/// Per-route, per-hour comparison counts not yet flushed to the store.
type Pending = Mutex<HashMap<(Arc<str>, u64), Counts>>;

/// One flush of counts, sent (at most once, see [`Store::add_counts`]) until the store
/// takes it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Flush {
    writer: String,
    seq: u64,
    /// (route, hour, comparisons, divergences)
    deltas: Vec<(String, u64, u64, u64)>,
}

impl Flush {
    fn deltas(&self) -> Vec<CountDelta> {
        self.deltas
            .iter()
            .map(|(route, hour, comparisons, divergences)| CountDelta {
                route: route.clone(),
                hour: *hour,
                counts: Counts {
                    comparisons: *comparisons,
                    divergences: *divergences,
                },
            })
            .collect()
    }
}

/// Counts the store has not taken yet, kept next to the spool while the store is down, so
/// that neither a restart nor a crash loses more than the last second of them.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct UnflushedCounts {
    retry: Option<Flush>,
    /// (route, hour, comparisons, divergences), never sent.
    pending: Vec<(String, u64, u64, u64)>,
}

const COUNTS_FILE: &str = "counts.json";

/// Records dropped at a full queue, said in the log at most about once a second with how
/// many: they are dropped from the comparison task, on a proxy worker, and a line per record
/// there would be a flood of synchronous writes to stderr (thousands a second, just when the
/// writer cannot keep up) on the request path.
#[derive(Debug, Default)]
struct QueueDrops {
    unlogged: AtomicU64,
    logged_at_ms: AtomicU64,
}

impl QueueDrops {
    fn add(&self) {
        self.unlogged.fetch_add(1, Ordering::Relaxed);
        let (now, last) = (now_ms(), self.logged_at_ms.load(Ordering::Relaxed));
        if now.saturating_sub(last) >= 1000
            && self
                .logged_at_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.log();
        }
    }

    /// Says how many records were dropped since the last line, if any (the writer calls it
    /// every second, so that the last of a burst is said too).
    fn log(&self) {
        let n = self.unlogged.swap(0, Ordering::Relaxed);
        if n > 0 {
            warn!(dropped = n, "record queue full: divergence records dropped");
        }
    }
}

/// Hands records and counts to the writer task. Cheap to call from any task.
pub struct Writer {
    queue_drops: Arc<QueueDrops>,
    tx: mpsc::Sender<Record>,
    counts: Arc<Pending>,
    stats: Arc<WriterStats>,
    store: Arc<dyn Store>,
    close: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Unix time in ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Writer {
    /// Opens the spool (delivering what a previous run left) and starts the writer task.
    pub fn start(store: Arc<dyn Store>, config: WriterConfig) -> std::io::Result<Arc<Writer>> {
        let spool = Spool::open(&config.spool_dir, config.spool_max_bytes)?;
        if spool.pending() {
            info!(
                bytes = spool.pending_bytes(),
                "a spool from an earlier run waits for delivery"
            );
        }
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let (close, closed) = watch::channel(false);
        let stats = Arc::new(WriterStats::default());
        let counts: Arc<Pending> = Arc::default();
        // Counts an earlier run could not flush: the unsent ones join this run's, the one
        // flush that may or may not have reached the store is sent again as it was.
        let counts_path = config.spool_dir.join(COUNTS_FILE);
        // One that cannot be read is said: those counts are lost from the evidence.
        let unflushed: Option<UnflushedCounts> = match std::fs::read(&counts_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            read => match read
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
            {
                Ok(u) => Some(u),
                Err(e) => {
                    warn!(
                        path = %counts_path.display(),
                        error = %e,
                        "cannot read the counts an earlier run kept (counts.json): they are lost"
                    );
                    None
                }
            },
        };
        let (retry, counts_persisted) = match unflushed {
            Some(u) => {
                let mut pending = counts.lock().unwrap_or_else(PoisonError::into_inner);
                for (route, hour, comparisons, divergences) in u.pending {
                    let c = pending.entry((Arc::from(route), hour)).or_default();
                    c.comparisons += comparisons;
                    c.divergences += divergences;
                }
                (u.retry, true)
            }
            None => (None, false),
        };
        let queue_drops: Arc<QueueDrops> = Arc::default();
        let task = tokio::spawn(
            Task {
                queue_drops: queue_drops.clone(),
                store: store.clone(),
                spool: Arc::new(Mutex::new(spool)),
                counts: counts.clone(),
                stats: stats.clone(),
                config,
                healthy: true,
                writer_id: crate::record::new_id(SystemTime::now()),
                seq: 0,
                retry,
                counts_path,
                counts_persisted,
            }
            .run(rx, closed),
        );
        Ok(Arc::new(Writer {
            queue_drops,
            tx,
            counts,
            stats,
            store,
            close,
            task: Mutex::new(Some(task)),
        }))
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Writes what is queued (to the store or the spool), flushes counts, stops the task.
    pub async fn close(&self) {
        let _ = self.close.send(true);
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Recorder for Writer {
    fn record(&self, record: Record) {
        // Counted before it is sent, so that the writer, which subtracts what it takes, never
        // takes the count below zero (the queue-depth gauge would read 1.8e19).
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(_) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(telemetry::STORE_DROPPED_TOTAL, "reason" => "queue_full")
                    .increment(1);
                self.queue_drops.add();
            }
        }
    }

    fn count(&self, route: &Arc<str>, diverged: bool) {
        let hour = hour_of(now_ms());
        let mut pending = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let c = pending.entry((route.clone(), hour)).or_default();
        c.comparisons += 1;
        c.divergences += u64::from(diverged);
    }
}

async fn closing(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|c| *c).await;
}

struct Task {
    queue_drops: Arc<QueueDrops>,
    store: Arc<dyn Store>,
    spool: Arc<Mutex<Spool>>,
    counts: Arc<Pending>,
    stats: Arc<WriterStats>,
    config: WriterConfig,
    healthy: bool,
    /// This writer's name in the store's flush markers: unique per run.
    writer_id: String,
    /// The number of this writer's last flush.
    seq: u64,
    /// A flush the store has not confirmed: sent again, unchanged, before any new one.
    retry: Option<Flush>,
    counts_path: PathBuf,
    /// Whether `counts_path` holds counts (to be removed once they are flushed).
    counts_persisted: bool,
}

/// Records per store call and per spool read.
const BATCH: usize = 256;
/// Spool batches delivered per tick, so that new records keep flowing meanwhile.
const DELIVERY_BATCHES_PER_TICK: usize = 40;

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Record>, mut closed: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(self.config.sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The sweep runs beside the writer: it has no time limit (deleting many records takes
        // long), and on a stalled store it would otherwise hold every record in the queue
        // instead of letting them fall back to the spool.
        let mut sweeping: Option<tokio::task::JoinHandle<()>> = None;
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.stats.queued.fetch_sub(n as u64, Ordering::Relaxed);
                    self.write(std::mem::take(&mut batch)).await;
                }
                _ = tick.tick() => {
                    self.queue_drops.log();
                    self.flush_counts().await;
                    self.deliver_spool().await;
                    self.publish_gauges();
                }
                _ = sweep.tick() => {
                    if sweeping.as_ref().is_none_or(|s| s.is_finished()) {
                        sweeping = Some(tokio::spawn(expire(
                            self.store.clone(),
                            self.config.retention,
                            self.stats.clone(),
                        )));
                    }
                }
                _ = closing(&mut closed) => break,
            }
        }
        // Idempotent: the next start sweeps again.
        if let Some(s) = sweeping {
            s.abort();
        }
        // Closing: what is queued still goes somewhere durable.
        rx.close();
        while let Some(r) = rx.recv().await {
            batch.push(r);
            if batch.len() == BATCH {
                self.write(std::mem::take(&mut batch)).await;
            }
        }
        self.stats.queued.store(0, Ordering::Relaxed);
        self.write(batch).await;
        self.flush_counts().await;
        self.queue_drops.log();
    }

    fn publish_gauges(&self) {
        let records = self
            .spool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending_records();
        self.stats
            .spool_pending_records
            .store(records, Ordering::Relaxed);
        metrics::gauge!(telemetry::STORE_SPOOLED_RECORDS).set(records as f64);
        metrics::gauge!(telemetry::STORE_QUEUE_DEPTH)
            .set(self.stats.queued.load(Ordering::Relaxed) as f64);
    }

    fn spool_pending(&self) -> bool {
        self.spool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending()
    }

    async fn write(&mut self, batch: Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        // Order matters: while the spool holds records, new ones queue up behind them.
        if self.healthy && !self.spool_pending() {
            match tokio::time::timeout(self.config.store_timeout, self.store.put(&batch)).await {
                Ok(Ok(())) => {
                    self.stats
                        .written
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    return;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, store = self.store.kind(), "store write failed; spooling records")
                }
                Err(_) => warn!(
                    store = self.store.kind(),
                    "store write timed out; spooling records"
                ),
            }
            self.healthy = false;
        }
        self.spool(batch).await;
    }

    async fn spool(&self, batch: Vec<Record>) {
        let n = batch.len() as u64;
        let spool = self.spool.clone();
        let appended = tokio::task::spawn_blocking(move || {
            let mut spool = spool.lock().unwrap_or_else(PoisonError::into_inner);
            let appended = spool.append(&batch);
            (appended, spool.pending_bytes())
        })
        .await;
        let (appended, pending, reason) = match appended {
            Ok((Ok(a), pending)) => (a as u64, pending, "spool_full"),
            Ok((Err(e), pending)) => {
                warn!(error = %e, "cannot write the spool");
                (0, pending, "spool_error")
            }
            Err(e) => {
                warn!(error = %e, "spool task failed");
                (0, 0, "spool_error")
            }
        };
        self.stats.spooled.fetch_add(appended, Ordering::Relaxed);
        self.stats
            .spool_pending_bytes
            .store(pending, Ordering::Relaxed);
        self.drop_records(n - appended, reason);
    }

    /// Counts `n` divergence records lost, by reason, and says so.
    fn drop_records(&self, n: u64, reason: &'static str) {
        if n == 0 {
            return;
        }
        self.stats.dropped.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(telemetry::STORE_DROPPED_TOTAL, "reason" => reason).increment(n);
        warn!(dropped = n, reason, "divergence records dropped");
    }

    /// Delivers spooled records, oldest first, while the store answers.
    async fn deliver_spool(&mut self) {
        if !self.spool_pending() {
            self.healthy = true;
            return;
        }
        let ping = tokio::time::timeout(self.config.store_timeout, self.store.ping()).await;
        if !matches!(ping, Ok(Ok(()))) {
            return;
        }
        for _ in 0..DELIVERY_BATCHES_PER_TICK {
            let spool = self.spool.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mut spool = spool.lock().unwrap_or_else(PoisonError::into_inner);
                // A spool removed from under ficus is read from where it is put back.
                spool.restore_file()?;
                spool.read_batch(BATCH)
            })
            .await;
            let Ok(Ok(Batch {
                records,
                offset,
                corrupt,
            })) = read
            else {
                warn!("cannot read the spool");
                return;
            };
            if !records.is_empty() {
                match tokio::time::timeout(self.config.store_timeout, self.store.put(&records))
                    .await
                {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
            let spool = self.spool.clone();
            let committed = tokio::task::spawn_blocking(move || {
                let mut spool = spool.lock().unwrap_or_else(PoisonError::into_inner);
                let committed = spool.commit(offset);
                (committed, spool.pending_bytes())
            })
            .await;
            let Ok((committed, pending)) = committed else {
                warn!("spool task failed");
                return;
            };
            // Counted once they are behind the delivery offset, so never twice in a run. They
            // are behind it in memory even when the offset file could not be written (a full
            // disk): this run never reads them again, so they are counted now, or never (a
            // restart then reads them again, and counts a lost line once more).
            self.drop_records(corrupt, "spool_corrupt");
            self.stats
                .delivered
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            self.stats
                .spool_pending_bytes
                .store(pending, Ordering::Relaxed);
            if let Err(e) = committed {
                warn!(error = %e, "cannot record spool delivery progress");
                return;
            }
            if pending == 0 {
                info!(
                    delivered = self.stats.delivered.load(Ordering::Relaxed),
                    "spool delivered; writing to the store again"
                );
                self.healthy = true;
                return;
            }
        }
    }

    async fn flush_counts(&mut self) {
        // A flush that failed goes again as it was (same writer, same number), so that one
        // whose first attempt reached the store after all is not added twice; then the counts
        // made since, as a new flush.
        for _ in 0..2 {
            if self.retry.is_none() {
                let deltas: Vec<(String, u64, u64, u64)> = {
                    let mut pending = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
                    pending
                        .drain()
                        .map(|((route, hour), c)| {
                            (route.to_string(), hour, c.comparisons, c.divergences)
                        })
                        .collect()
                };
                if deltas.is_empty() {
                    break;
                }
                self.seq += 1;
                self.retry = Some(Flush {
                    writer: self.writer_id.clone(),
                    seq: self.seq,
                    deltas,
                });
                // The file may still list these counts as never sent (an outage's). It must
                // say they go in this flush before the flush is sent: a crash after the store
                // took it would otherwise add them again on the next start, while the flush
                // itself, sent again, is taken once.
                if self.counts_persisted {
                    self.persist_counts();
                }
            }
            let Some(flush) = &self.retry else { break };
            let deltas = flush.deltas();
            let sent = self.store.add_counts(&flush.writer, flush.seq, &deltas);
            let result = tokio::time::timeout(self.config.store_timeout, sent).await;
            if !matches!(result, Ok(Ok(()))) {
                break;
            }
            self.retry = None;
        }
        self.persist_counts();
    }

    /// While a flush is unconfirmed, keeps it and the counts made since in the spool
    /// directory (written aside, then renamed); removes the file once all is flushed.
    fn persist_counts(&mut self) {
        if self.retry.is_none() {
            if self.counts_persisted && std::fs::remove_file(&self.counts_path).is_ok() {
                self.counts_persisted = false;
            }
            return;
        }
        let unflushed = UnflushedCounts {
            retry: self.retry.clone(),
            pending: self
                .counts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|((route, hour), c)| (route.to_string(), *hour, c.comparisons, c.divergences))
                .collect(),
        };
        let tmp = self.counts_path.with_extension("tmp");
        // Synced before it is renamed into place, as the spool is: after a power cut the
        // file would otherwise be there, but empty.
        let written = serde_json::to_vec(&unflushed)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let mut file = std::fs::File::create(&tmp)?;
                std::io::Write::write_all(&mut file, &bytes)?;
                file.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &self.counts_path));
        match written {
            Ok(()) => self.counts_persisted = true,
            Err(e) => warn!(error = %e, "cannot keep unflushed counts next to the spool"),
        }
    }
}

/// One retention sweep.
async fn expire(store: Arc<dyn Store>, retention: Retention, stats: Arc<WriterStats>) {
    match store.expire(retention, now_ms()).await {
        Ok(n) => {
            stats.expired.fetch_add(n, Ordering::Relaxed);
            if n > 0 {
                info!(records = n, "expired divergence records");
            }
        }
        Err(e) => warn!(error = %e, "retention sweep failed"),
    }
}
