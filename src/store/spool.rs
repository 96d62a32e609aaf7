//! The local spool: where records go while the store is slow or down. An append-only file of
//! JSON lines, fsync'd once per batch and bounded in size, and a small offset file saying how
//! far delivery got. Records are delivered in order; after a crash the remainder is delivered
//! on the next start. Redelivery is harmless: stores write idempotently by record id. One
//! process at a time: the directory is locked while the spool is open.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::record::Record;

/// Records read from the spool for delivery.
pub struct Batch {
    pub records: Vec<Record>,
    /// The offset just after them, for [`Spool::commit`] once they are stored.
    pub offset: u64,
    /// Lines that could not be read back as records (lost, and counted as dropped).
    pub corrupt: u64,
}

pub struct Spool {
    path: PathBuf,
    offset_path: PathBuf,
    file: File,
    len: u64,
    offset: u64,
    max_bytes: u64,
    /// Records waiting for delivery.
    records: u64,
    /// Holds the directory's lock for as long as the spool is open (see [`lock`]).
    _lock: File,
    lock_path: PathBuf,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, picking up what a previous run left.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        let lock = lock(dir)?;
        let path = dir.join("records.jsonl");
        let offset_path = dir.join("delivered.offset");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        // A crash in the middle of an append leaves a torn last line. Cut it off now: new
        // records are appended at the end of the file, and glued to it they would be read
        // back as one corrupt line and lost.
        let len = complete_len(&path)?;
        if len < file.metadata()?.len() {
            warn!("cutting off a torn last line of the spool (a crash mid-append)");
            file.set_len(len)?;
            file.sync_all()?;
        }
        let offset = std::fs::read_to_string(&offset_path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
            .min(len);
        let records = count_lines(&path, offset)?;
        Ok(Spool {
            path,
            offset_path,
            file,
            len,
            offset,
            max_bytes,
            records,
            _lock: lock,
            lock_path: dir.join(LOCK_FILE),
        })
    }

    /// Records waiting for delivery.
    pub fn pending_records(&self) -> u64 {
        self.records
    }

    /// Whether records wait for delivery.
    pub fn pending(&self) -> bool {
        self.len > self.offset
    }

    /// Bytes waiting for delivery.
    pub fn pending_bytes(&self) -> u64 {
        self.len - self.offset
    }

    /// Appends as many records as fit under the size bound, with one fsync; returns how many
    /// were appended (the rest are the caller's to count as dropped).
    pub fn append(&mut self, records: &[Record]) -> io::Result<usize> {
        self.restore_file()?;
        let mut lines = Vec::with_capacity(records.len());
        for r in records {
            let mut line = serde_json::to_vec(r).map_err(io::Error::other)?;
            line.push(b'\n');
            lines.push(line);
        }
        let needed: u64 = lines.iter().map(|l| l.len() as u64).sum();
        // Records delivered while others were appended behind them (a store that comes and
        // goes) stay in front of the file until it is emptied. When they take a quarter of
        // the bound or more and the batch would not fit, they are cut away, so the bound
        // holds what is still to deliver; each cut frees at least a quarter of it, so the
        // copying stays in proportion to the records delivered.
        if self.len + needed > self.max_bytes
            && self.offset >= self.max_bytes / 4
            && let Err(e) = self.compact()
        {
            // Nothing is lost: the spool is as it was, and what fits is still appended.
            warn!(error = %e, "cannot cut delivered records out of the spool");
            let _ = std::fs::remove_file(self.path.with_extension("jsonl.tmp"));
        }
        let mut buf = Vec::new();
        let mut appended = 0;
        for line in &lines {
            if self.len + (buf.len() + line.len()) as u64 > self.max_bytes {
                break;
            }
            buf.extend_from_slice(line);
            appended += 1;
        }
        if !buf.is_empty() {
            let written = self
                .file
                .write_all(&buf)
                .and_then(|()| self.file.sync_data());
            if let Err(e) = written {
                // A partial write (disk full) must not stay in front of the next append.
                let _ = self.file.set_len(self.len);
                return Err(e);
            }
            self.len += buf.len() as u64;
            self.records += appended as u64;
        }
        Ok(appended)
    }

    /// Reads up to `max` records from the delivery offset.
    pub fn read_batch(&self, max: usize) -> io::Result<Batch> {
        let mut reader = BufReader::new(File::open(&self.path)?);
        reader.seek(SeekFrom::Start(self.offset))?;
        let mut records = Vec::new();
        let mut offset = self.offset;
        let mut corrupt = 0;
        let mut line = Vec::new();
        while records.len() < max && offset < self.len {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                // A torn last line (crash mid-append, never fsync'd): nothing more to read.
                break;
            }
            offset += n as u64;
            match serde_json::from_slice::<Record>(&line) {
                Ok(r) => records.push(r),
                Err(e) => {
                    warn!(error = %e, "skipping a corrupt spool line: one record lost");
                    corrupt += 1;
                }
            }
        }
        Ok(Batch {
            records,
            offset,
            corrupt,
        })
    }

    /// Marks everything before `offset` as delivered; empties the spool once all is. In this
    /// run the records before `offset` are delivered even when this fails (it then failed to
    /// make that durable: a restart delivers them again, which is harmless), so the caller
    /// counts them either way.
    pub fn commit(&mut self, offset: u64) -> io::Result<()> {
        let offset = offset.min(self.len);
        let delivered = count_lines_between(&self.path, self.offset, offset);
        self.offset = offset;
        self.records = self.records.saturating_sub(delivered?);
        if self.offset == self.len || self.offset_is_torn_tail()? {
            // The offset file goes back to 0 before the file is emptied: a crash (or a failed
            // write) between the two then redelivers what was delivered, which is harmless,
            // instead of skipping as many bytes of the records appended afterwards.
            write_offset(&self.offset_path, 0)?;
            self.file.set_len(0)?;
            self.file.sync_all()?;
            self.len = 0;
            self.offset = 0;
            self.records = 0;
            return Ok(());
        }
        write_offset(&self.offset_path, self.offset)
    }

    /// Puts the spool file back if it is no longer where it is read from: a cleaner of old
    /// files (systemd-tmpfiles ages `/tmp`, and the spool of a store up for days is that old)
    /// removed it, or the whole directory, while the file stayed open. Appends would go on
    /// into the removed file, which delivery and the next start cannot see: records never
    /// delivered, and lost at the next start. What waits for delivery is written again
    /// under the spool's name (from the open file), and the directory locked again.
    pub fn restore_file(&mut self) -> io::Result<()> {
        if same_file(&self.path, &self.file)? && same_file(&self.lock_path, &self._lock)? {
            return Ok(());
        }
        warn!(
            path = %self.path.display(),
            "the spool was removed while in use (a cleaner of old files?); writing it again"
        );
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
            if !same_file(&self.lock_path, &self._lock)? {
                self._lock = lock(dir)?;
            }
        }
        self.compact()
    }

    /// Rewrites the spool without its delivered records.
    fn compact(&mut self) -> io::Result<()> {
        let tmp = self.path.with_extension("jsonl.tmp");
        {
            // From the open file, not its name: the name may be gone (see `restore_file`).
            let mut from = self.file.try_clone()?;
            from.seek(SeekFrom::Start(self.offset))?;
            let mut to = File::create(&tmp)?;
            io::copy(&mut from.take(self.len - self.offset), &mut to)?;
            to.sync_all()?;
        }
        // The offset goes back to 0 before the new file takes the old one's place: a crash
        // between the two redelivers the old file's delivered records (harmless: stores write
        // idempotently) instead of skipping as many bytes of the new one.
        write_offset(&self.offset_path, 0)?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new()
            .append(true)
            .read(true)
            .open(&self.path)?;
        self.len -= self.offset;
        self.offset = 0;
        Ok(())
    }

    /// Whether only a torn (never completed) line remains after the offset.
    fn offset_is_torn_tail(&self) -> io::Result<bool> {
        let mut reader = BufReader::new(File::open(&self.path)?);
        reader.seek(SeekFrom::Start(self.offset))?;
        let mut rest = Vec::new();
        reader.read_until(b'\n', &mut rest)?;
        Ok(!rest.is_empty() && rest.last() != Some(&b'\n'))
    }
}

/// Takes the spool directory for this process. Two processes on one spool (a restart that
/// starts the new ficus before the old one has exited, both on one port through SO_REUSEPORT,
/// and both with the default `ficus-spool`) would each keep their own idea of the file's
/// length and delivery offset, and the first to empty it would cut off the records the other
/// had appended: lost without a trace. The lock (`flock`) is the kernel's, so it goes with
/// the process however that ends, SIGKILL included, and the next start takes the spool over.
fn lock(dir: &Path) -> io::Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)?;
    // A lock let go of a moment from now is waited for: it is on the open file, which every
    // copy of its descriptor shares, so a process that is exiting, or a child being spawned
    // (it holds a copy of every descriptor from its fork to its exec), keeps it a little
    // after the spool is closed. Only a holder that stays past the wait is refused.
    let mut attempts = 0;
    loop {
        match file.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if attempts < LOCK_ATTEMPTS => {
                attempts += 1;
                std::thread::sleep(LOCK_WAIT);
            }
            other => break lock_result(other, dir, &path)?,
        }
    }
    // For the message below, when a second process tries.
    let _ = file
        .set_len(0)
        .and_then(|()| (&file).write_all(std::process::id().to_string().as_bytes()));
    Ok(file)
}

/// Attempts at the lock before the spool is refused, [`LOCK_WAIT`] apart.
const LOCK_ATTEMPTS: u32 = 40;
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

fn lock_result(
    result: Result<(), std::fs::TryLockError>,
    dir: &Path,
    path: &Path,
) -> io::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                String::new()
            } else {
                format!(" (pid {holder})")
            };
            Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} is in use by another ficus process{holder}; give each process its own --spool-dir",
                    dir.display()
                ),
            ))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

const LOCK_FILE: &str = "lock";

/// Whether `path` names the open `file` (false when nothing has that name any more).
fn same_file(path: &Path, file: &File) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let named = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let open = file.metadata()?;
    Ok(named.dev() == open.dev() && named.ino() == open.ino())
}

/// Replaces the offset file durably: written aside, synced, renamed over.
fn write_offset(path: &Path, offset: u64) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, offset.to_string())?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The length of `path` up to and including its last newline (0 if it has none).
fn complete_len(path: &Path) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let mut end = file.metadata()?.len();
    let mut chunk = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let n = usize::try_from(end - start).unwrap_or(chunk.len());
        file.seek(SeekFrom::Start(start))?;
        std::io::Read::read_exact(&mut file, &mut chunk[..n])?;
        if let Some(i) = chunk[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Complete lines from `from` to the end of the file.
fn count_lines(path: &Path, from: u64) -> io::Result<u64> {
    let end = std::fs::metadata(path)?.len();
    count_lines_between(path, from, end)
}

fn count_lines_between(path: &Path, from: u64, to: u64) -> io::Result<u64> {
    if to <= from {
        return Ok(0);
    }
    let mut reader = BufReader::new(File::open(path)?);
    reader.seek(SeekFrom::Start(from))?;
    let mut remaining = to - from;
    let mut lines = 0;
    while remaining > 0 {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let take = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        lines += buf[..take].iter().filter(|&&b| b == b'\n').count() as u64;
        reader.consume(take);
        remaining -= take as u64;
    }
    Ok(lines)
}

#[cfg(test)]
mod tests;
