//! Watches the rules path and triggers a reload after changes settle. Editors and `git
//! checkout` write files in several steps, so events are debounced; a half-written file that
//! slips through is rejected by validation and the next event loads the finished one. The
//! rules are also read again every few seconds, for the changes no event tells of.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Quiet time after the last change before reloading.
const SETTLE: Duration = Duration::from_millis(200);
/// Longest a stream of changes can postpone a reload.
const MAX_DELAY: Duration = Duration::from_secs(2);
/// How often the rules are read again without any change seen.
pub const POLL_INTERVAL: Duration = Duration::from_secs(10);

/// Keeps the watch alive; dropping it stops watching.
pub struct RulesWatch {
    _watcher: Arc<Mutex<notify::RecommendedWatcher>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RulesWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The changed path, when `event` may have changed the rules at `watched`: a change to a path
/// under it, or, for a single rules file, anywhere in `file_dir`, the file's directory.
pub(crate) fn wakes(
    event: &notify::Event,
    watched: &Path,
    file_dir: Option<&Path>,
) -> Option<PathBuf> {
    // The kernel's queue overflowed and events were lost: one of them may have been a change
    // to the rules. The notice names no path. The reload that follows also renews the
    // recursive watch, which may have missed new subdirectories in the overflow.
    if event.need_rescan() {
        return Some(watched.to_path_buf());
    }
    if matches!(event.kind, EventKind::Access(_)) {
        return None;
    }
    event
        .paths
        .iter()
        .find(|p| p.starts_with(watched) || file_dir.is_some_and(|d| p.parent() == Some(d)))
        .cloned()
}

/// Starts watching `path` (a file or a directory) and calls `reload` after each settled change,
/// and also every `poll_every` (and once at the start) without one: inotify sees nothing of a
/// symlink's target in another directory, nor of changes on NFS and some container mounts,
/// and a queue overflow or a change before the watch was in place goes unseen too. `reload`
/// must therefore be cheap when nothing changed: ficus's compares what it reads with what the
/// last load read, and stops there.
pub fn spawn(
    path: &Path,
    poll_every: Duration,
    reload: impl Fn() + Send + Sync + 'static,
) -> Result<RulesWatch, notify::Error> {
    let reload = Arc::new(reload);
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let (tx, mut rx) = mpsc::channel::<PathBuf>(64);
    let watched = path.clone();
    // A single rules file may be a symlink whose target changes without the link changing
    // (a Kubernetes ConfigMap swaps `..data` next to it): any change in its directory counts.
    let file_dir = (!path.is_dir())
        .then(|| path.parent().map(Path::to_path_buf))
        .flatten();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let event = match event {
            Ok(event) => event,
            // An inotify watch limit or queue overflow: say so, as changes may go unseen.
            Err(e) => {
                warn!(error = %e, "watching the rules failed; changes may be missed");
                return;
            }
        };
        if let Some(changed) = wakes(&event, &watched, file_dir.as_deref()) {
            // A full channel already holds a pending reload: dropping is fine, as nothing
            // but the reload itself depends on which paths changed.
            let _ = tx.try_send(changed);
        }
    })?;
    // The parent is watched too, so that replacing or recreating the rules path is seen.
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    watcher.watch(&parent, RecursiveMode::NonRecursive)?;
    if path.is_dir() {
        watcher.watch(&path, RecursiveMode::Recursive)?;
    }

    let watcher = Arc::new(Mutex::new(watcher));
    let rewatcher = watcher.clone();
    let task = tokio::spawn(async move {
        // The first poll comes right away: a change between the first load and the watch
        // being in place raised no event.
        // (`interval` panics on a zero period.)
        let mut poll = tokio::time::interval(poll_every.max(SETTLE));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                changed = rx.recv() => match changed {
                    Some(first) => Some(first),
                    None => return,
                },
                _ = poll.tick() => None,
            };
            if let Some(first) = first {
                debug!(path = %first.display(), "rules changed");
                let deadline = tokio::time::Instant::now() + MAX_DELAY;
                loop {
                    let settle = tokio::time::Instant::now() + SETTLE;
                    match tokio::time::timeout_at(settle.min(deadline), rx.recv()).await {
                        Ok(Some(_)) => {}
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                // A reload just ran: the next poll can wait its full interval.
                poll.reset();
            }
            // A directory deleted and created again, or a subdirectory that is a symlink
            // swapped to a new target, needs a new recursive watch. Renewing it on every
            // change costs a walk of the rules directory, and does not depend on seeing the
            // one event that told of the swap (a full channel drops events).
            if path.is_dir() {
                let mut w = rewatcher.lock().unwrap_or_else(PoisonError::into_inner);
                if let Err(e) = w.watch(&path, RecursiveMode::Recursive) {
                    warn!(error = %e, "cannot watch the rules directory again");
                }
            }
            // Reading and compiling thousands of routes is blocking work.
            let reload = reload.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || reload()).await {
                warn!(error = %e, "rules reload task failed");
            }
        }
    });
    Ok(RulesWatch {
        _watcher: watcher,
        task,
    })
}
