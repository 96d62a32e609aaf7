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
    let (first, offset) = spool.read_batch(3).unwrap();
    assert_eq!(first, recs[..3]);
    spool.commit(offset).unwrap();
    assert_eq!(spool.pending_records(), 2);
    let (rest, offset) = spool.read_batch(10).unwrap();
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
        let (_, offset) = spool.read_batch(1).unwrap();
        spool.commit(offset).unwrap();
        // The process dies here.
    }
    let spool = Spool::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(spool.pending_records(), 3);
    let (left, _) = spool.read_batch(10).unwrap();
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
    let (read, offset) = spool.read_batch(10).unwrap();
    assert_eq!(read, recs);
    spool.commit(offset).unwrap();
    assert!(!spool.pending());
}
