//! Divergence records: what a diverged comparison leaves behind for people to inspect,
//! classify and replay, and the recorder interface the comparison stage hands them to.
//! The durable store comes with the storage stage; until then a bounded in-memory recorder
//! keeps the most recent records.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::compare::Difference;

/// A request as recorded (body up to the shadow body limit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    /// The body when it is UTF-8 text; other bodies are left out and described by `body_len`.
    pub body: Option<String>,
    pub body_len: usize,
}

/// One side's response as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
    pub body_len: usize,
    pub latency_ms: f64,
}

/// One diverged comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    pub route: String,
    /// RFC 3339, UTC.
    pub at: String,
    pub request_id: String,
    /// "legacy" | "new": whose response the client got.
    pub authority: String,
    pub request: RecordedRequest,
    pub legacy: RecordedResponse,
    pub new: RecordedResponse,
    /// Differences from legacy to new, outside ignored and noisy paths.
    pub diffs: Vec<Difference>,
    /// Differences on paths learned as noise for the route (not counted as divergence).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub noisy_diffs: Vec<Difference>,
}

/// Where diverged comparisons go. Implementations must not block: they are called from the
/// comparison task, off the request path, but still on the runtime.
pub trait Recorder: Send + Sync {
    fn record(&self, divergence: Divergence);
}

/// Keeps the most recent `capacity` records in memory; older ones are evicted and counted.
pub struct MemoryRecorder {
    capacity: usize,
    records: Mutex<VecDeque<Divergence>>,
    evicted: AtomicU64,
}

impl MemoryRecorder {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            records: Mutex::new(VecDeque::new()),
            evicted: AtomicU64::new(0),
        }
    }

    /// The records held, oldest first.
    pub fn records(&self) -> Vec<Divergence> {
        self.lock().iter().cloned().collect()
    }

    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Divergence>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Recorder for MemoryRecorder {
    fn record(&self, divergence: Divergence) {
        let mut records = self.lock();
        if records.len() == self.capacity {
            records.pop_front();
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        records.push_back(divergence);
    }
}
