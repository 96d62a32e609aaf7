use std::time::SystemTime;

use http::{HeaderMap, Method, Uri};

use super::*;
use crate::compare::Comparator;
use crate::record::{CapturedRef, Exchange, Policy};
use crate::rules::Side;

fn records(n: usize) -> Vec<Record> {
    let c = Comparator::default();
    let h = HeaderMap::new();
    let uri: Uri = "/x".parse().unwrap();
    (0..n)
        .map(|i| {
            let captured = || CapturedRef {
                status: 200,
                headers: &h,
                body: b"{}",
                latency: std::time::Duration::ZERO,
            };
            let rid = format!("r{i}");
            Record::build(
                Exchange {
                    route: "orders",
                    authority: Side::Legacy,
                    request_id: &rid,
                    method: &Method::GET,
                    uri: &uri,
                    request_headers: &h,
                    request_body: b"",
                    legacy: captured(),
                    new: captured(),
                    diffs: Vec::new(),
                    noisy_diffs: Vec::new(),
                    comparator: &c,
                },
                &Policy::default(),
                SystemTime::now(),
            )
        })
        .collect()
}

#[test]
fn delivers_in_order_and_empties_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
    assert!(!spool.pending());
    let recs = records(5);
    assert_eq!(spool.append(&recs).unwrap(), 5);
    assert_eq!(spool.pending_records(), 5);
    let Batch {
        records: first,
        offset,
        ..
    } = spool.read_batch(3).unwrap();
    assert_eq!(first, recs[..3]);
    spool.commit(offset).unwrap();
    assert_eq!(spool.pending_records(), 2);
    let Batch {
        records: rest,
        offset,
        ..
    } = spool.read_batch(10).unwrap();
    assert_eq!(rest, recs[3..]);
    spool.commit(offset).unwrap();
    assert!(!spool.pending());
    assert_eq!(
        std::fs::metadata(dir.path().join("records.jsonl"))
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn a_restart_delivers_what_was_left() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records(4);
    {
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&recs).unwrap();
        let Batch { offset, .. } = spool.read_batch(1).unwrap();
        spool.commit(offset).unwrap();
        // The process dies here.
    }
    let spool = Spool::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(spool.pending_records(), 3);
    let Batch { records: left, .. } = spool.read_batch(10).unwrap();
    assert_eq!(left, recs[1..]);
}

#[test]
fn size_bound_refuses_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records(10);
    let one = serde_json::to_vec(&recs[0]).unwrap().len() as u64 + 1;
    let mut spool = Spool::open(dir.path(), one * 3 + one / 2).unwrap();
    assert_eq!(spool.append(&recs).unwrap(), 3);
    assert_eq!(spool.append(&recs[3..]).unwrap(), 0);
}

/// A store that comes and goes: some records are delivered while new ones are appended behind
/// the rest, so the file is never emptied. The bound holds the records still to deliver, not
/// those delivered long ago, and nothing is lost or reordered across the cut, nor after a
/// restart.
#[test]
fn delivered_records_do_not_count_against_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records(200);
    let one = serde_json::to_vec(&recs[0]).unwrap().len() as u64 + 1;
    let max = one * 8;
    let mut spool = Spool::open(dir.path(), max).unwrap();
    let mut delivered = Vec::new();
    let mut next = 0;
    // Two pending at all times; three appended and three delivered per round.
    assert_eq!(spool.append(&recs[..2]).unwrap(), 2);
    next += 2;
    while next + 3 <= recs.len() {
        assert_eq!(
            spool.append(&recs[next..next + 3]).unwrap(),
            3,
            "five pending records fit a bound of eight (round at {next})"
        );
        next += 3;
        let batch = spool.read_batch(3).unwrap();
        delivered.extend(batch.records);
        spool.commit(batch.offset).unwrap();
        let len = std::fs::metadata(dir.path().join("records.jsonl"))
            .unwrap()
            .len();
        assert!(len <= max, "the file ({len} bytes) stays under its bound");
    }
    drop(spool);
    let spool = Spool::open(dir.path(), max).unwrap();
    assert_eq!(spool.pending_records(), 2);
    delivered.extend(spool.read_batch(10).unwrap().records);
    assert_eq!(delivered, recs[..next]);
}

#[test]
fn a_torn_last_line_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records(2);
    {
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&recs).unwrap();
    }
    // A crash in the middle of an append leaves half a line.
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.path().join("records.jsonl"))
        .unwrap();
    f.write_all(b"{\"id\":\"half").unwrap();
    let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
    let Batch {
        records: read,
        offset,
        ..
    } = spool.read_batch(10).unwrap();
    assert_eq!(read, recs);
    spool.commit(offset).unwrap();
    assert!(!spool.pending());
}

#[test]
fn a_corrupt_line_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records(2);
    {
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&recs[..1]).unwrap();
    }
    // A whole line that is not a record (a disk error, a hand edit).
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.path().join("records.jsonl"))
        .unwrap();
    f.write_all(b"{\"id\":\"not a record\"}\n").unwrap();
    let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
    spool.append(&recs[1..]).unwrap();
    let Batch {
        records: read,
        offset,
        corrupt,
    } = spool.read_batch(10).unwrap();
    assert_eq!(read, recs);
    assert_eq!(corrupt, 1);
    spool.commit(offset).unwrap();
    assert!(!spool.pending());
}

#[test]
fn a_failed_offset_write_while_emptying_never_skips_later_records() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records(4);
    let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
    spool.append(&recs[..3]).unwrap();
    let Batch { offset, .. } = spool.read_batch(1).unwrap();
    spool.commit(offset).unwrap();
    // The offset file cannot be replaced now (its temporary name is taken by a directory),
    // as on a full disk, just as the last delivery empties the spool.
    std::fs::create_dir(dir.path().join("delivered.tmp")).unwrap();
    let Batch { offset, .. } = spool.read_batch(10).unwrap();
    assert!(spool.commit(offset).is_err());
    // A record arrives, then the process dies.
    spool.append(&recs[3..]).unwrap();
    drop(spool);
    let spool = Spool::open(dir.path(), 1 << 20).unwrap();
    let Batch { records: left, .. } = spool.read_batch(10).unwrap();
    assert!(
        left.contains(&recs[3]),
        "the record appended after the failed commit was skipped: {} left",
        left.len()
    );
}

/// Two ficus processes on one host share the default spool directory (`ficus-spool` in the
/// working directory): a restart that starts the new process before the old one has exited,
/// both on the same port through SO_REUSEPORT. Each would track the file's length and the
/// delivery offset on its own, and the first to empty the spool would truncate the records
/// the other had appended behind its own. The second open must be refused, loudly, instead.
#[test]
fn a_spool_in_use_by_another_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records(4);
    let mut first = Spool::open(dir.path(), 1 << 20).unwrap();
    first.append(&recs[..2]).unwrap();
    match Spool::open(dir.path(), 1 << 20) {
        Ok(mut second) => {
            // What followed: the second appends, the first delivers what it knows of and
            // empties the file, and the second's records are gone.
            second.append(&recs[2..]).unwrap();
            let Batch { offset, .. } = first.read_batch(10).unwrap();
            first.commit(offset).unwrap();
            panic!(
                "a spool in use was opened a second time; the second's records left: {}",
                second.read_batch(10).map_or(0, |b| b.records.len())
            );
        }
        Err(e) => {
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
            assert!(e.to_string().contains("--spool-dir"), "{e}");
        }
    }
    // Once the first is gone (exited, or killed), the next one takes the spool over.
    drop(first);
    let spool = Spool::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(spool.read_batch(10).unwrap().records, recs[..2]);
}

/// A cleaner of old files removes the spool while ficus runs: systemd-tmpfiles ages `/tmp`
/// (10 days on many distributions), and the spool of a store that has been up that long is
/// that old. Records appended afterwards went to the removed file, which nothing could read:
/// never delivered, every later record queued behind them until the bound dropped it, and
/// all of them gone at the next start. They must be written where delivery and the next
/// start look.
#[test]
fn a_spool_removed_while_in_use_is_written_again_and_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let recs = records(4);
    let mut spool = Spool::open(&spool_dir, 1 << 20).unwrap();
    spool.append(&recs[..2]).unwrap();
    let Batch { offset, .. } = spool.read_batch(1).unwrap();
    spool.commit(offset).unwrap();
    std::fs::remove_dir_all(&spool_dir).unwrap();
    // The store is down: more records are spooled.
    assert_eq!(spool.append(&recs[2..]).unwrap(), 2);
    let Batch { records: left, .. } = spool
        .read_batch(10)
        .expect("the spool cannot be read any more");
    assert_eq!(left, recs[1..]);
    // And they are on disk for the next start, should ficus be killed now.
    drop(spool);
    let spool = Spool::open(&spool_dir, 1 << 20).unwrap();
    assert_eq!(spool.read_batch(10).unwrap().records, recs[1..]);
    assert_eq!(spool.pending_records(), 3);
}

/// The same with only deliveries to make (the store is back, nothing new is spooled): the
/// writer puts the file back before reading.
#[test]
fn a_spool_removed_before_delivery_is_still_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records(3);
    let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
    spool.append(&recs).unwrap();
    std::fs::remove_file(dir.path().join("records.jsonl")).unwrap();
    spool.restore_file().unwrap();
    let Batch {
        records: read,
        offset,
        ..
    } = spool.read_batch(10).unwrap();
    assert_eq!(read, recs);
    spool.commit(offset).unwrap();
    assert!(!spool.pending());
}

/// The lock is on the open file, which every copy of its descriptor shares: a process that
/// is exiting, or a child this process is spawning (it holds a copy of every descriptor from
/// its fork to its exec), keeps it a moment after the spool is closed. A start right then
/// must wait for that moment, not fail.
#[test]
fn a_lock_held_for_a_moment_after_the_spool_closed_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 20).unwrap();
    let copy = spool._lock.try_clone().unwrap();
    drop(spool);
    let holder = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(copy);
    });
    let reopened = Spool::open(dir.path(), 1 << 20);
    holder.join().unwrap();
    reopened.expect("the spool was refused while its lock was being let go");
}
