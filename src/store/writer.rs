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

use super::spool::Spool;
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

/// Hands records and counts to the writer task. Cheap to call from any task.
pub struct Writer {
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
        let task = tokio::spawn(
            Task {
                store: store.clone(),
                spool: Arc::new(Mutex::new(spool)),
                counts: counts.clone(),
                stats: stats.clone(),
                config,
                healthy: true,
            }
            .run(rx, closed),
        );
        Ok(Arc::new(Writer {
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
        match self.tx.try_send(record) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(telemetry::STORE_DROPPED_TOTAL, "reason" => "queue_full")
                    .increment(1);
                warn!("record queue full: a divergence record was dropped");
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
    store: Arc<dyn Store>,
    spool: Arc<Mutex<Spool>>,
    counts: Arc<Pending>,
    stats: Arc<WriterStats>,
    config: WriterConfig,
    healthy: bool,
}

/// Records per store call and per spool read.
const BATCH: usize = 256;
/// Spool batches delivered per tick, so that new records keep flowing meanwhile.
const DELIVERY_BATCHES_PER_TICK: usize = 40;

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Record>, mut closed: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(Duration::from_secs(60));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                    self.flush_counts().await;
                    self.deliver_spool().await;
                    self.publish_gauges();
                }
                _ = sweep.tick() => self.expire().await,
                _ = closing(&mut closed) => break,
            }
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
        let (appended, pending) = match appended {
            Ok((Ok(a), pending)) => (a as u64, pending),
            Ok((Err(e), pending)) => {
                warn!(error = %e, "cannot write the spool");
                (0, pending)
            }
            Err(e) => {
                warn!(error = %e, "spool task failed");
                (0, 0)
            }
        };
        self.stats.spooled.fetch_add(appended, Ordering::Relaxed);
        self.stats
            .spool_pending_bytes
            .store(pending, Ordering::Relaxed);
        if appended < n {
            let lost = n - appended;
            self.stats.dropped.fetch_add(lost, Ordering::Relaxed);
            metrics::counter!(telemetry::STORE_DROPPED_TOTAL, "reason" => "spool_full")
                .increment(lost);
            warn!(dropped = lost, "spool full: divergence records dropped");
        }
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
                spool
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read_batch(BATCH)
            })
            .await;
            let Ok(Ok((records, offset))) = read else {
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
                spool.commit(offset).map(|()| spool.pending_bytes())
            })
            .await;
            match committed {
                Ok(Ok(pending)) => {
                    self.stats
                        .delivered
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                    self.stats
                        .spool_pending_bytes
                        .store(pending, Ordering::Relaxed);
                    if pending == 0 {
                        info!(
                            delivered = self.stats.delivered.load(Ordering::Relaxed),
                            "spool delivered; writing to the store again"
                        );
                        self.healthy = true;
                        return;
                    }
                }
                _ => {
                    warn!("cannot record spool delivery progress");
                    return;
                }
            }
        }
    }

    async fn flush_counts(&self) {
        let deltas: Vec<CountDelta> = {
            let mut pending = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
            pending
                .drain()
                .map(|((route, hour), counts)| CountDelta {
                    route: route.to_string(),
                    hour,
                    counts,
                })
                .collect()
        };
        if deltas.is_empty() {
            return;
        }
        let result =
            tokio::time::timeout(self.config.store_timeout, self.store.add_counts(&deltas)).await;
        if !matches!(result, Ok(Ok(()))) {
            // Keep them for the next flush: counts add up, so nothing is lost while the store
            // is down (only a crash loses the last unflushed second).
            let mut pending = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
            for d in deltas {
                let c = pending.entry((Arc::from(d.route), d.hour)).or_default();
                c.comparisons += d.counts.comparisons;
                c.divergences += d.counts.divergences;
            }
        }
    }

    async fn expire(&self) {
        match self.store.expire(self.config.retention, now_ms()).await {
            Ok(n) => {
                self.stats.expired.fetch_add(n, Ordering::Relaxed);
                if n > 0 {
                    info!(records = n, "expired divergence records");
                }
            }
            Err(e) => warn!(error = %e, "retention sweep failed"),
        }
    }
}
