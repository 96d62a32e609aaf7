//! Comparisons of large bodies run on threads of their own, never on a proxy worker.
//!
//! ficus runs one single-threaded runtime per core, and a shadow's comparison runs in the
//! task of its exchange. Comparing two 1 KiB answers takes microseconds, but two 1 MiB JSON
//! documents take tens of milliseconds of CPU (parsing both is most of it), and all that time
//! every other client of that worker would wait. Past [`INLINE_BYTES`] (or when a body is
//! compressed, as its decoded size is unknown) the comparison is handed to a small pool of
//! threads, and the shadow task waits for its result without holding the worker. Building the
//! record of such an exchange, which reads the bodies again (and parses them to redact), runs
//! there too.
//!
//! The queue needs no bound of its own: every job belongs to a mirrored exchange, which holds
//! one of the shadow in-flight permits until it ends, so at most `max_inflight` jobs wait.
//! When the pool is busy, permits run out and new shadows are dropped and counted
//! (`dropped_overload`) instead of taking CPU from clients.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use http::HeaderMap;
use tokio::sync::oneshot;
use tracing::warn;

/// Bodies of at most this many bytes together are compared inline: about a quarter of a
/// millisecond of CPU for ordinary documents at the diff benchmark's rate, and the work budget,
/// in proportion to the bodies' size (`compare::json::budget_for`), bounds any shape of
/// document to about a millisecond. Handing that over would cost more than it saves.
pub const INLINE_BYTES: usize = 16 << 10;

type Job = Box<dyn FnOnce() + Send>;

/// The comparison threads. Dropping the pool lets them finish their queue and exit.
pub struct Pool {
    jobs: mpsc::Sender<Job>,
}

impl Pool {
    /// Starts `threads` (at least one) threads named `ficus-compare`.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name("ficus-compare".into())
                .spawn(move || {
                    lower_priority();
                    loop {
                        // The lock is held only to take the next job, not to run it.
                        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok(job) = job else { return };
                        // A panic would be a bug in the diff engine, which promises never to
                        // panic on input; it costs that one comparison, not the thread.
                        if catch_unwind(AssertUnwindSafe(job)).is_err() {
                            warn!(
                                "a job on a comparison thread panicked; its exchange ends aborted"
                            );
                        }
                    }
                })?;
        }
        Ok(Pool { jobs: tx })
    }

    /// Runs `f` on a comparison thread and waits for its result without blocking the
    /// caller's thread; `None` if it could not run (the pool is gone, or `f` panicked).
    pub async fn run<T, F>(&self, f: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.send(job).ok()?;
        rx.await.ok()
    }
}

/// How much less CPU priority comparison threads take than the rest of ficus (nice steps).
pub const NICE: i32 = 10;

/// Lowers this thread's CPU priority by [`NICE`] steps, so that on a busy machine the
/// scheduler gives the workers that serve clients the cores first, and comparisons what is
/// left. On Linux, `setpriority(PRIO_PROCESS, tid)` applies to that one thread. A failure
/// (a platform or sandbox that refuses it) only costs the priority, never the comparison.
fn lower_priority() {
    use rustix::process::{getpriority_process, setpriority_process};
    let tid = rustix::thread::gettid();
    let now = getpriority_process(Some(tid)).unwrap_or(0);
    if let Err(e) = setpriority_process(Some(tid), (now + NICE).min(19)) {
        tracing::debug!(error = %e, "comparison thread keeps its priority");
    }
}

/// Whether comparing these bodies belongs on the pool: large, or compressed (its decoded
/// size is known only once decoded, up to the comparator's cap).
pub fn worth_offloading(legacy: (&HeaderMap, usize), new: (&HeaderMap, usize)) -> bool {
    // The same reading of Content-Encoding (every line, every coding) as the decoding's.
    let encoded = |h: &HeaderMap| {
        h.contains_key(http::header::CONTENT_ENCODING) && crate::compare::Comparator::is_encoded(h)
    };
    legacy.1 + new.1 > INLINE_BYTES || encoded(legacy.0) || encoded(new.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_off_the_caller_thread_and_survives_a_panic() {
        let pool = Pool::new(1).unwrap();
        let caller = std::thread::current().id();
        let (name, id) = pool
            .run(|| {
                let t = std::thread::current();
                (t.name().map(str::to_string), t.id())
            })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("ficus-compare"));
        assert_ne!(id, caller);
        // It runs NICE steps below the caller (at most at 19, the lowest priority).
        let prio = |tid| rustix::process::getpriority_process(Some(tid)).unwrap();
        let mine = prio(rustix::thread::gettid());
        let theirs = pool
            .run(move || prio(rustix::thread::gettid()))
            .await
            .unwrap();
        assert_eq!(theirs, (mine + NICE).min(19));
        assert_eq!(pool.run(|| -> u32 { panic!("boom") }).await, None);
        // The one thread is still there.
        assert_eq!(pool.run(|| 7).await, Some(7));
    }

    #[test]
    fn small_plain_bodies_stay_inline() {
        let plain = HeaderMap::new();
        let mut gzip = HeaderMap::new();
        gzip.insert(http::header::CONTENT_ENCODING, "gzip".parse().unwrap());
        let mut identity = HeaderMap::new();
        identity.insert(http::header::CONTENT_ENCODING, "identity".parse().unwrap());
        assert!(!worth_offloading((&plain, 1024), (&plain, 1024)));
        assert!(!worth_offloading((&identity, 1024), (&plain, 1024)));
        assert!(!worth_offloading(
            (&plain, INLINE_BYTES / 2),
            (&plain, INLINE_BYTES / 2)
        ));
        assert!(worth_offloading(
            (&plain, INLINE_BYTES / 2),
            (&plain, INLINE_BYTES / 2 + 1)
        ));
        assert!(worth_offloading((&plain, 10), (&gzip, 10)));
        // Two lines, as decoding reads them: identity, then gzip, is a gzip body.
        let mut two = HeaderMap::new();
        two.append(http::header::CONTENT_ENCODING, "identity".parse().unwrap());
        two.append(http::header::CONTENT_ENCODING, "gzip".parse().unwrap());
        assert!(worth_offloading((&two, 10), (&plain, 10)));
        let mut listed = HeaderMap::new();
        listed.insert(
            http::header::CONTENT_ENCODING,
            "identity, br".parse().unwrap(),
        );
        assert!(worth_offloading((&plain, 10), (&listed, 10)));
    }
}
