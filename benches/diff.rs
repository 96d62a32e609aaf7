//! Diff engine cost: `Comparator::compare` on two JSON responses of ~10 KiB (3 differences) and
//! of ~1 MiB (5 differences, one of them an element inserted in the middle of a long array),
//! next to the cost of only parsing both bodies with `serde_json::from_slice::<Value>`.
//!
//! Every shadowed request is compared, so the diff must cost about what reading the two bodies
//! costs anyway: the target is diff <= 1.5x parse (the diff includes its own parsing). After the
//! criterion groups, the bench times parse and diff in alternating batches (which cancels most
//! of the noise from other work on the machine) and prints the median ratio.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use serde_json::{Value, json};

use ficus::compare::{Comparator, CompareSpec, Response};

/// A catalogue page with `items` products, about 160 bytes each.
fn document(items: usize) -> Value {
    let items: Vec<Value> = (0..items)
        .map(|i| {
            json!({
                "id": i,
                "sku": format!("SKU-{i:06}"),
                "name": format!("Product number {i}"),
                "price": 10.5 + (i % 97) as f64,
                "currency": "EUR",
                "tags": ["catalogue", if i % 2 == 0 { "even" } else { "odd" }],
                "stock": {"warehouse": format!("w{}", i % 5), "qty": i * 3 % 101},
                "active": i % 7 != 0,
            })
        })
        .collect();
    json!({
        "page": 1,
        "total": items.len(),
        "generated_by": "catalogue-service",
        "items": items,
    })
}

/// The same document as the new backend would return it, with `edits` differences.
fn edited(doc: &Value, big: bool) -> Value {
    let mut new = doc.clone();
    new["generated_by"] = json!("catalogue-service-v2");
    new["items"][10]["price"] = json!(99.99);
    new["items"][40]["stock"]["reserved"] = json!(2);
    if big {
        new["items"][3000]["tags"] = json!(["catalogue"]);
        if let Some(items) = new["items"].as_array_mut() {
            items.insert(
                2500,
                json!({"id": -1, "sku": "SKU-NEW", "name": "Inserted", "price": 1.0}),
            );
        }
    }
    new
}

struct Case {
    name: &'static str,
    legacy: Vec<u8>,
    new: Vec<u8>,
}

fn cases() -> Vec<Case> {
    let small = document(64);
    let large = document(6_400);
    vec![
        Case {
            name: "10KiB",
            legacy: small.to_string().into_bytes(),
            new: edited(&small, false).to_string().into_bytes(),
        },
        Case {
            name: "1MiB",
            legacy: large.to_string().into_bytes(),
            new: edited(&large, true).to_string().into_bytes(),
        },
    ]
}

fn parse(case: &Case) -> (Option<Value>, Option<Value>) {
    (
        serde_json::from_slice(black_box(&case.legacy)).ok(),
        serde_json::from_slice(black_box(&case.new)).ok(),
    )
}

fn diff(cmp: &Comparator, headers: &HeaderMap, case: &Case) -> usize {
    let legacy = Response {
        status: 200,
        headers,
        body: black_box(&case.legacy),
    };
    let new = Response {
        status: 200,
        headers,
        body: black_box(&case.new),
    };
    cmp.compare(&legacy, &new).diffs.len()
}

/// Median over alternating batches of `diff time / parse time`.
fn ratio(cmp: &Comparator, headers: &HeaderMap, case: &Case) -> (f64, Duration, Duration) {
    let start = Instant::now();
    black_box(parse(case));
    let once = start.elapsed().max(Duration::from_micros(1));
    let batch = (Duration::from_millis(40).as_nanos() / once.as_nanos()).max(1) as usize;
    let mut ratios = Vec::new();
    let (mut parse_total, mut diff_total) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..21 {
        let t = Instant::now();
        for _ in 0..batch {
            black_box(parse(case));
        }
        let p = t.elapsed();
        let t = Instant::now();
        for _ in 0..batch {
            black_box(diff(cmp, headers, case));
        }
        let d = t.elapsed();
        ratios.push(d.as_secs_f64() / p.as_secs_f64());
        parse_total += p / batch as u32;
        diff_total += d / batch as u32;
    }
    ratios.sort_by(f64::total_cmp);
    (ratios[ratios.len() / 2], parse_total / 21, diff_total / 21)
}

fn main() {
    let cmp = CompareSpec::default().compile().unwrap_or_default();
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let cases = cases();

    let mut c = Criterion::default().configure_from_args();
    for case in &cases {
        let mut group = c.benchmark_group(format!("compare/{}", case.name));
        group.throughput(Throughput::Bytes(
            (case.legacy.len() + case.new.len()) as u64,
        ));
        group.bench_function("parse_both", |b| b.iter(|| parse(case)));
        group.bench_function("diff", |b| b.iter(|| diff(&cmp, &headers, case)));
        group.finish();
    }
    c.final_summary();

    // Only `cargo bench` passes `--bench`; `cargo test --all-targets` runs each bench once as
    // a smoke test, and the ratio has nothing to say there.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    println!("\ndiff cost relative to parsing both bodies (median of 21 alternating batches):");
    for case in &cases {
        let n = diff(&cmp, &headers, case);
        let (r, p, d) = ratio(&cmp, &headers, case);
        println!(
            "  {:>6}: {} + {} bytes, {n} differences: parse {:?}, diff {:?}, ratio {r:.2}x (target <= 1.5x)",
            case.name,
            case.legacy.len(),
            case.new.len(),
            p,
            d,
        );
    }
}
