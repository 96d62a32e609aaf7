//! Spool write throughput: how many divergence records per second the local spool absorbs
//! while the store is down (JSON lines, one fsync per batch of 256, as the writer does).
//! Target: >= 20,000 records/s. The records are realistic: ~1 KiB bodies on both sides and a
//! few differences, so the figure includes serialisation, not only the disk.

use std::time::{Duration, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ficus::compare::{BodyDiff, Comparator, Difference, PatchOp};
use ficus::record::{CapturedRef, Exchange, Policy, Record};
use ficus::rules::Side;
use ficus::store::spool::Spool;
use http::{HeaderMap, HeaderValue, Method, Uri};
use serde_json::json;

fn batch(n: usize) -> Vec<Record> {
    let c = Comparator::default();
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert(
        "x-request-id",
        HeaderValue::from_static("0b1e4c9e-8d2f-4a51-9a7e-1c2d3e4f5a6b"),
    );
    let uri: Uri = "/api/orders/42?expand=items".parse().unwrap_or_default();
    let body = json!({"id": 42, "items": (0..12).map(|i| json!({"sku": format!("SKU-{i}"), "qty": i, "price": 9.99})).collect::<Vec<_>>()}).to_string();
    (0..n)
        .map(|i| {
            let captured = || CapturedRef {
                status: 200,
                headers: &h,
                body: body.as_bytes(),
                latency: Duration::from_micros(1500),
            };
            Record::build(
                Exchange {
                    route: "orders-read",
                    authority: Side::Legacy,
                    request_id: "0b1e4c9e-8d2f-4a51-9a7e-1c2d3e4f5a6b",
                    method: &Method::GET,
                    uri: &uri,
                    request_headers: &h,
                    request_body: b"",
                    legacy: captured(),
                    new: captured(),
                    diffs: vec![Difference::Body(BodyDiff::Op(PatchOp::Replace {
                        path: format!("/items/{}/price", i % 12),
                        old: json!(9.99),
                        value: json!(10.0),
                    }))],
                    noisy_diffs: Vec::new(),
                    comparator: &c,
                },
                &Policy::default(),
                SystemTime::now(),
            )
        })
        .collect()
}

fn spool(c: &mut Criterion) {
    let records = batch(256);
    let dir = std::env::temp_dir().join(format!("ficus-bench-spool-{}", std::process::id()));
    let mut group = c.benchmark_group("spool");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.bench_function("append 256 records + fsync", |b| {
        b.iter_batched_ref(
            || {
                let _ = std::fs::remove_dir_all(&dir);
                Spool::open(&dir, 1 << 30).ok()
            },
            |spool| {
                if let Some(spool) = spool {
                    let _ = std::hint::black_box(spool.append(&records));
                }
            },
            criterion::BatchSize::PerIteration,
        );
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, spool);
criterion_main!(benches);
