//! The storage contract, run against every store: embedded SQLite, a real `redis-server`, and
//! a real 3-node Redis Cluster, all on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ficus::compare::{BodyDiff, Comparator, Difference, PatchOp};
use ficus::record::{CapturedRef, Exchange, Policy, Record, State};
use ficus::rules::Side;
use ficus::store::{self, CountDelta, Counts, Filter, Retention, Store};
use http::{HeaderMap, Method, Uri};
use serde_json::json;
use support::{RedisServer, free_port};

fn record(route: &str, at: SystemTime, path: &str) -> Record {
    let c = Comparator::default();
    let h = HeaderMap::new();
    let uri: Uri = "/api/x".parse().unwrap();
    let captured = || CapturedRef {
        status: 200,
        headers: &h,
        body: b"{}",
        latency: Duration::from_millis(1),
    };
    Record::build(
        Exchange {
            route,
            authority: Side::Legacy,
            request_id: "rid",
            method: &Method::GET,
            uri: &uri,
            request_headers: &h,
            request_body: b"",
            legacy: captured(),
            new: captured(),
            diffs: vec![Difference::Body(BodyDiff::Op(PatchOp::Replace {
                path: path.into(),
                old: json!(1),
                value: json!(2),
            }))],
            noisy_diffs: Vec::new(),
            comparator: &c,
        },
        &Policy::default(),
        at,
    )
}

fn ms(at: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(at)
}

async fn list(store: &dyn Store, f: Filter) -> Vec<String> {
    store
        .list(&f)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|r| r.id)
        .collect()
}

/// The behaviour every store must have.
async fn contract(store: Arc<dyn Store>) {
    let now = store::writer::now_ms();
    let base = now - 3_600_000;
    let a: Vec<Record> = (0..5)
        .map(|i| record("orders", ms(base + i * 1000), "/total"))
        .collect();
    let b: Vec<Record> = (0..3)
        .map(|i| record("users", ms(base + 500 + i * 1000), "/items/0/name"))
        .collect();
    store.put(&a).await.unwrap();
    store.put(&b).await.unwrap();

    // get, and idempotent put: a redelivered record does not overwrite a changed one.
    let first = store.get(&a[0].id).await.unwrap().unwrap();
    assert_eq!(first, a[0]);
    let first = store
        .modify(
            &a[0].id,
            Arc::new(|r: &mut Record| {
                r.state = State::Acknowledged;
                r.class = Some("defect".into());
            }),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.state, State::Acknowledged);
    assert!(
        store
            .modify("no-such-id", Arc::new(|r: &mut Record| r.note = None))
            .await
            .unwrap()
            .is_none()
    );
    // Changes made at once to one record each keep the other's: none is lost.
    let note = Arc::new(|r: &mut Record| r.note = Some("rounding".into()));
    let history = Arc::new(|r: &mut Record| {
        r.history.push(ficus::record::Change {
            who: "bob".into(),
            at: "2026-12-01T00:00:00Z".into(),
            what: serde_json::json!({"replay": "still diverges"}),
        })
    });
    let (x, y) = tokio::join!(
        store.modify(&a[0].id, note),
        store.modify(&a[0].id, history)
    );
    x.unwrap().unwrap();
    y.unwrap().unwrap();
    let first = store.get(&a[0].id).await.unwrap().unwrap();
    assert_eq!(
        (first.state, first.class.as_deref(), first.note.as_deref()),
        (State::Acknowledged, Some("defect"), Some("rounding"))
    );
    assert_eq!(first.history.len(), 1);
    store.put(&a[..1]).await.unwrap();
    assert_eq!(store.get(&a[0].id).await.unwrap().unwrap(), first);
    assert!(store.get("no-such-id").await.unwrap().is_none());

    // Newest first, with pagination.
    let all: Vec<String> = {
        let mut v: Vec<&Record> = a.iter().chain(&b).collect();
        v.sort_by(|x, y| y.id.cmp(&x.id));
        v.into_iter().map(|r| r.id.clone()).collect()
    };
    assert_eq!(list(&*store, Filter::default()).await, all);
    let page1 = store
        .list(&Filter {
            limit: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page1.items.len(), 3);
    let page2 = store
        .list(&Filter {
            limit: 3,
            cursor: page1.next.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let page3 = store
        .list(&Filter {
            limit: 3,
            cursor: page2.next.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page3.next, None);
    let paged: Vec<String> = [page1, page2, page3]
        .into_iter()
        .flat_map(|p| p.items)
        .map(|r| r.id)
        .collect();
    assert_eq!(paged, all);

    // Filters.
    let route = list(
        &*store,
        Filter {
            route: Some("users".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(route.len(), 3);
    let acknowledged = list(
        &*store,
        Filter {
            state: Some(State::Acknowledged),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(acknowledged, [a[0].id.clone()]);
    let open = list(
        &*store,
        Filter {
            state: Some(State::Open),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(open.len(), 7, "the update moved the record out of `open`");
    let defects = list(
        &*store,
        Filter {
            class: Some("defect".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(defects, [a[0].id.clone()]);
    let group = list(
        &*store,
        Filter {
            fingerprint: Some(b[1].fingerprint.clone()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(group.len(), 3);
    let window = list(
        &*store,
        Filter {
            since_ms: Some(base + 1000),
            until_ms: Some(base + 3000),
            ..Default::default()
        },
    )
    .await;
    // orders at +1000, +2000; users at +1500, +2500.
    assert_eq!(window.len(), 4, "{window:?}");
    let combined = list(
        &*store,
        Filter {
            route: Some("orders".into()),
            state: Some(State::Open),
            limit: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(combined, [a[4].id.clone(), a[3].id.clone()]);

    // Counting, with and without time bounds.
    assert_eq!(store.count(&Filter::default()).await.unwrap(), 8);
    assert_eq!(
        store
            .count(&Filter {
                route: Some("orders".into()),
                state: Some(State::Open),
                ..Default::default()
            })
            .await
            .unwrap(),
        4
    );
    assert_eq!(
        store
            .count(&Filter {
                route: Some("orders".into()),
                class: Some("defect".into()),
                state: Some(State::Acknowledged),
                ..Default::default()
            })
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .count(&Filter {
                since_ms: Some(base + 1000),
                until_ms: Some(base + 3000),
                ..Default::default()
            })
            .await
            .unwrap(),
        4
    );

    // Time bounds with any other condition: one index (a route, a class), several (route,
    // state and class; a fingerprint), an upper bound alone. users' records lie between
    // orders' ones, so a count that ignored the route would be off.
    let count = |f: Filter| {
        let store = store.clone();
        async move { store.count(&f).await.unwrap() }
    };
    let orders = || Some("orders".to_string());
    let between = |since, until| Filter {
        since_ms: Some(since),
        until_ms: Some(until),
        ..Default::default()
    };
    assert_eq!(
        count(Filter {
            route: orders(),
            ..between(base + 1000, base + 3000)
        })
        .await,
        2
    );
    assert_eq!(
        count(Filter {
            class: Some("defect".into()),
            since_ms: Some(base),
            ..Default::default()
        })
        .await,
        1
    );
    assert_eq!(
        count(Filter {
            class: Some("defect".into()),
            since_ms: Some(base + 1),
            ..Default::default()
        })
        .await,
        0
    );
    assert_eq!(
        count(Filter {
            route: orders(),
            state: Some(State::Open),
            until_ms: Some(base + 2500),
            ..Default::default()
        })
        .await,
        2
    );
    assert_eq!(
        count(Filter {
            route: orders(),
            state: Some(State::Acknowledged),
            class: Some("defect".into()),
            ..between(base, base + 1)
        })
        .await,
        1
    );
    assert_eq!(
        count(Filter {
            route: Some("users".into()),
            state: Some(State::Open),
            ..between(base + 1000, base + 3000)
        })
        .await,
        2
    );
    assert_eq!(
        count(Filter {
            fingerprint: Some(b[0].fingerprint.clone()),
            until_ms: Some(base + 2000),
            ..Default::default()
        })
        .await,
        2
    );

    // Times of a route's records in one state, from the indexes: newest first, the newest kept
    // when bounded, only that route (users' records lie between orders' ones), only that state.
    let times = |route: &'static str, state, since, limit| {
        let store = store.clone();
        async move {
            store
                .record_times(route, state, since, limit)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        times("orders", State::Open, base + 1500, 10).await,
        (vec![base + 4000, base + 3000, base + 2000], false)
    );
    assert_eq!(
        times("orders", State::Open, base + 1500, 2).await,
        (vec![base + 4000, base + 3000], true)
    );
    assert_eq!(
        times("orders", State::Acknowledged, base, 10).await,
        (vec![base], false)
    );
    assert_eq!(times("users", State::Open, 0, 10).await.0.len(), 3);
    assert_eq!(
        times("users", State::Expected, 0, 10).await,
        (vec![], false)
    );
    assert_eq!(
        store
            .count(&Filter {
                route: Some("orders".into()),
                state: Some(State::Open),
                since_ms: Some(base + 1500),
                ..Default::default()
            })
            .await
            .unwrap(),
        3
    );

    // Counters add up, in total and per hour.
    let hour = store::hour_of(now);
    let delta = |h, c, d| CountDelta {
        route: "orders".into(),
        hour: h,
        counts: Counts {
            comparisons: c,
            divergences: d,
        },
    };
    store
        .add_counts("w0", 1, &[delta(hour - 30, 100, 1), delta(hour, 10, 2)])
        .await
        .unwrap();
    store
        .add_counts("w0", 2, &[delta(hour, 5, 0)])
        .await
        .unwrap();
    let (total, recent) = store.counts("orders", hour - 24).await.unwrap();
    assert_eq!(
        total,
        Counts {
            comparisons: 115,
            divergences: 3
        }
    );
    assert_eq!(
        recent,
        Counts {
            comparisons: 15,
            divergences: 2
        }
    );
    assert_eq!(
        store.counts("nobody", 0).await.unwrap().0,
        Counts::default()
    );
    // Per hour, oldest first, empty hours left out: what the workbench charts.
    assert_eq!(
        store.hourly("orders", hour - 24).await.unwrap(),
        vec![(
            hour,
            Counts {
                comparisons: 15,
                divergences: 2
            }
        )]
    );
    let all = store.hourly("orders", 0).await.unwrap();
    assert_eq!(all.first().map(|h| h.0), Some(hour - 30));
    assert_eq!(all.len(), 2);
    assert!(store.hourly("nobody", 0).await.unwrap().is_empty());

    // Retention: older records go, with their index entries; the per-route cap keeps the newest.
    let old = record("orders", ms(now - 10 * 24 * 3_600_000), "/total");
    store.put(std::slice::from_ref(&old)).await.unwrap();
    let retention = Retention {
        records_ms: 7 * 24 * 3_600_000,
        per_route_cap: 4,
    };
    let gone = store.expire(retention, now).await.unwrap();
    assert_eq!(
        gone, 2,
        "the old record and the oldest `orders` record over the cap"
    );
    assert!(store.get(&old.id).await.unwrap().is_none());
    assert!(store.get(&a[0].id).await.unwrap().is_none());
    let orders = list(
        &*store,
        Filter {
            route: Some("orders".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(orders.len(), 4);
    assert!(
        list(
            &*store,
            Filter {
                class: Some("defect".into()),
                ..Default::default()
            }
        )
        .await
        .is_empty()
    );
    assert_eq!(list(&*store, Filter::default()).await.len(), 7);
    // Counters outlive records.
    assert_eq!(store.counts("orders", 0).await.unwrap().0.comparisons, 115);
    // A flush sent twice (its first attempt timed out on the writer's side) counts once.
    let flush = [CountDelta {
        route: "flushed".into(),
        hour: store::hour_of(now),
        counts: Counts {
            comparisons: 7,
            divergences: 2,
        },
    }];
    store.add_counts("w1", 1, &flush).await.unwrap();
    store.add_counts("w1", 1, &flush).await.unwrap();
    let once = Counts {
        comparisons: 7,
        divergences: 2,
    };
    assert_eq!(store.counts("flushed", 0).await.unwrap().0, once);
    // The writer's next flush, and another writer's first, do count.
    store.add_counts("w1", 2, &flush).await.unwrap();
    store.add_counts("w2", 1, &flush).await.unwrap();
    assert_eq!(
        store.counts("flushed", 0).await.unwrap(),
        (
            Counts {
                comparisons: 21,
                divergences: 6
            },
            Counts {
                comparisons: 21,
                divergences: 6
            }
        )
    );
    // Age-based retention keeps unresolved defects: the block they put on the verdict lifts
    // when someone resolves, marks expected or reclassifies them, not when they grow old.
    let aged = |path: &str| record("gate", ms(now - 10 * 24 * 3_600_000), path);
    let (defect, fixed, plain) = (aged("/a"), aged("/b"), aged("/c"));
    store
        .put(&[defect.clone(), fixed.clone(), plain.clone()])
        .await
        .unwrap();
    for (r, state) in [(&defect, State::Acknowledged), (&fixed, State::Resolved)] {
        let classify = Arc::new(move |x: &mut Record| {
            x.class = Some("defect".into());
            x.state = state;
        });
        store.modify(&r.id, classify).await.unwrap().unwrap();
    }
    store.expire(retention, now).await.unwrap();
    assert!(store.get(&defect.id).await.unwrap().is_some());
    assert!(store.get(&fixed.id).await.unwrap().is_none());
    assert!(store.get(&plain.id).await.unwrap().is_none());

    // Group marks: set, replaced, read back, lifted once.
    let mark = |class: Option<&str>| store::GroupMark {
        fingerprint: "00ff".into(),
        route: "orders".into(),
        class: class.map(str::to_string),
        note: Some("intended: the new side rounds".into()),
        who: "ann".into(),
        at: "2026-12-01T10:00:00.000Z".into(),
    };
    assert!(store.group_marks().await.unwrap().is_empty());
    store.put_group_mark(&mark(None)).await.unwrap();
    store.put_group_mark(&mark(Some("rounding"))).await.unwrap();
    assert_eq!(
        store.group_marks().await.unwrap(),
        vec![mark(Some("rounding"))]
    );
    assert!(store.delete_group_mark("00ff").await.unwrap());
    assert!(!store.delete_group_mark("00ff").await.unwrap());
    assert!(store.group_marks().await.unwrap().is_empty());
    store.ping().await.unwrap();
}

#[tokio::test]
async fn sqlite_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("r.db").display());
    contract(store::open(&url, "ficus:").await.unwrap()).await;
}

#[tokio::test]
async fn redis_store_keeps_the_contract_and_leaves_no_dangling_index_entries() {
    let redis = RedisServer::start().await;
    let store = store::open(&redis.url(), "ficus:").await.unwrap();
    contract(store).await;
    // Every index entry points at a stored record.
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--scan",
            "--pattern",
            "ficus:idx:*",
        ])
        .output()
        .unwrap();
    let keys = String::from_utf8(out.stdout).unwrap();
    let mut members = 0;
    for key in keys.lines() {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "ZRANGE", key, "0", "-1"])
            .output()
            .unwrap();
        for id in String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
        {
            members += 1;
            let exists = std::process::Command::new("redis-cli")
                .args([
                    "-p",
                    &redis.port.to_string(),
                    "EXISTS",
                    &format!("ficus:rec:{id}"),
                ])
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8(exists.stdout).unwrap().trim(),
                "1",
                "{key} -> {id}"
            );
        }
    }
    // 7 records, each in idx:all, idx:route, idx:state and idx:fp, and the unresolved defect
    // retention kept, in those and idx:class.
    assert_eq!(members, 7 * 4 + 5);
}

/// Replicas share the records, and each sweeps them with its own clock: one whose clock runs
/// days ahead (a VM whose clock nobody keeps) deleted everyone's records before their time.
/// Past retention by the store's clock, a record goes; within it, it stays.
#[tokio::test]
async fn a_replica_with_its_clock_ahead_expires_no_record_early() {
    let redis = RedisServer::start().await;
    let store = store::open(&redis.url(), "ficus:").await.unwrap();
    let now = store::writer::now_ms();
    let day = 24 * 3_600_000;
    let young = record("orders", ms(now - 6 * day), "/total");
    let old = record("orders", ms(now - 8 * day), "/total");
    store.put(&[young.clone(), old.clone()]).await.unwrap();
    let retention = Retention {
        records_ms: 7 * day,
        per_route_cap: 1000,
    };
    // This replica's clock is two days ahead.
    assert_eq!(store.expire(retention, now + 2 * day).await.unwrap(), 1);
    assert!(
        store.get(&young.id).await.unwrap().is_some(),
        "a record 6 days old was expired with a retention of 7 days"
    );
    assert!(store.get(&old.id).await.unwrap().is_none());
}

/// A record this version cannot read (written by a newer ficus during a rolling upgrade: a
/// state it does not know) made every retention sweep fail: the sweep read each record to
/// find its index entries, and one it could not decode stopped the sweep, every minute, for
/// good, so no record was ever expired again. Such a record is now deleted in its time, with
/// the index entries it names, and the others with it.
#[tokio::test]
async fn a_record_this_version_cannot_read_does_not_stop_retention() {
    let redis = RedisServer::start().await;
    let store = store::open(&redis.url(), "ficus:").await.unwrap();
    let now = store::writer::now_ms();
    let day = 24 * 3_600_000;
    let old = record("orders", ms(now - 9 * day), "/total");
    let newer = record("orders", ms(now - 8 * day), "/total");
    store.put(&[old.clone(), newer.clone()]).await.unwrap();
    let port = redis.port.to_string();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // As a newer version would store it: a state this one has no name for.
    let key = format!("ficus:rec:{}", newer.id);
    let mut json: serde_json::Value = serde_json::from_str(&cli(&["GET", &key])).unwrap();
    json["state"] = json!("snoozed");
    cli(&["SET", &key, &json.to_string()]);
    cli(&["ZREM", "ficus:idx:state:open", &newer.id]);
    cli(&["ZADD", "ficus:idx:state:snoozed", "0", &newer.id]);
    assert!(
        store.get(&newer.id).await.is_err(),
        "the record is readable"
    );

    let retention = Retention {
        records_ms: 7 * day,
        per_route_cap: 1000,
    };
    let gone = store
        .expire(retention, now)
        .await
        .expect("a record this version cannot read stopped the sweep");
    assert_eq!(gone, 2);
    assert_eq!(cli(&["EXISTS", &key]), "0");
    for index in [
        "ficus:idx:all",
        "ficus:idx:route:orders",
        "ficus:idx:state:snoozed",
        "ficus:idx:state:open",
    ] {
        assert_eq!(cli(&["ZCARD", index]), "0", "{index} keeps an entry");
    }
}

/// A claim (a replay in progress) is held by one replica at a time, released only by its own
/// token, and expires by itself should its holder die.
#[tokio::test]
async fn redis_claims_are_exclusive_released_by_their_holder_and_expire() {
    let redis = RedisServer::start().await;
    let a = store::open(&redis.url(), "ficus:").await.unwrap();
    let b = store::open(&redis.url(), "ficus:").await.unwrap();
    let long = Duration::from_secs(60);
    let token = a
        .claim("replay:x", long)
        .await
        .unwrap()
        .expect("a free claim");
    assert_eq!(b.claim("replay:x", long).await.unwrap(), None);
    // Another claim is another name.
    assert!(b.claim("replay:y", long).await.unwrap().is_some());
    // Only the holder's token releases it.
    b.release("replay:x", "not-the-token").await.unwrap();
    assert_eq!(b.claim("replay:x", long).await.unwrap(), None);
    a.release("replay:x", &token).await.unwrap();
    let taken = b
        .claim("replay:x", Duration::from_millis(200))
        .await
        .unwrap();
    assert!(taken.is_some(), "a released claim cannot be taken");
    // A holder that never releases (it died) holds it no longer than its time.
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            a.claim("replay:x", long).await.unwrap().is_some()
        })
        .await,
        "an abandoned claim never expired"
    );
}

/// Counts with a time bound stay exact past one page of index entries (the Redis store walks
/// its indexes a thousand ids at a time): 2,400 records of one route, 600 of another between
/// them, and a third of the first route's acknowledged.
async fn time_bounded_counts_past_a_page(store: Arc<dyn Store>) {
    let base = store::writer::now_ms() - 7_200_000;
    let mut records: Vec<Record> = (0..3000)
        .map(|i| {
            let route = if i % 5 == 4 { "users" } else { "orders" };
            record(route, ms(base + i), "/total")
        })
        .collect();
    for (i, r) in records.iter_mut().enumerate() {
        if i % 5 != 4 && i % 3 == 0 {
            r.state = State::Acknowledged;
        }
    }
    store.put(&records).await.unwrap();
    for (since, until) in [
        (None, None),
        (Some(base + 100), None),
        (Some(base + 100), Some(base + 2900)),
    ] {
        let f = Filter {
            route: Some("orders".into()),
            state: Some(State::Open),
            since_ms: since,
            until_ms: until,
            ..Default::default()
        };
        let expected = records.iter().filter(|r| f.accepts(r)).count() as u64;
        assert!(expected > 1000, "{expected}");
        assert_eq!(
            store.count(&f).await.unwrap(),
            expected,
            "{since:?}..{until:?}"
        );
        let route_only = Filter {
            state: None,
            ..f.clone()
        };
        let expected = records.iter().filter(|r| route_only.accepts(r)).count() as u64;
        assert_eq!(
            store.count(&route_only).await.unwrap(),
            expected,
            "{since:?}..{until:?}"
        );
    }
}

#[tokio::test]
async fn sqlite_time_bounded_counts_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("ficus.db").display());
    time_bounded_counts_past_a_page(store::open(&url, "ficus:").await.unwrap()).await;
}

/// Retention on one replica while another changes a record's state: the record the sweep
/// deletes must leave the state index it is in when it goes, not the one it was in when the
/// sweep read it. An id left behind in `idx:state:acknowledged` is counted forever (by_state,
/// open defects) for a record nobody can open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_retention_racing_a_state_change_leaves_no_index_entry_behind() {
    let redis = RedisServer::start().await;
    let sweeper = store::open(&redis.url(), "ficus:").await.unwrap();
    let other = store::open(&redis.url(), "ficus:").await.unwrap();
    let old = store::writer::now_ms() - 10 * 24 * 3_600_000;
    let records: Vec<Record> = (0..1000)
        .map(|i| record("race", ms(old + i), "/total"))
        .collect();
    sweeper.put(&records).await.unwrap();
    let route = || Filter {
        route: Some("race".into()),
        ..Default::default()
    };
    let sweep = tokio::spawn({
        let sweeper = sweeper.clone();
        async move {
            let retention = Retention {
                records_ms: 7 * 24 * 3_600_000,
                per_route_cap: 100_000,
            };
            sweeper
                .expire(retention, store::writer::now_ms())
                .await
                .unwrap()
        }
    });
    // Once the sweep deletes, the last record of its first batch of 500 is read but not yet
    // deleted: the other replica acknowledges it then.
    while other.count(&route()).await.unwrap() == 1000 {
        tokio::task::yield_now().await;
    }
    let acknowledge = Arc::new(|r: &mut Record| r.state = State::Acknowledged);
    other.modify(&records[499].id, acknowledge).await.unwrap();
    assert_eq!(sweep.await.unwrap(), 1000);
    let acknowledged = Filter {
        state: Some(State::Acknowledged),
        ..Default::default()
    };
    assert_eq!(other.count(&acknowledged).await.unwrap(), 0);
    assert_eq!(other.count(&route()).await.unwrap(), 0);
}

/// Every replica sweeps every minute. Two that enforce the per-route cap at once must keep the
/// newest `cap` records, not delete the excess once each: a sweep that counted before the
/// other deleted, then took "the oldest excess" after, removed records the cap keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sweeps_of_two_replicas_at_once_keep_the_per_route_cap() {
    let redis = RedisServer::start().await;
    let a = store::open(&redis.url(), "ficus:").await.unwrap();
    let b = store::open(&redis.url(), "ficus:").await.unwrap();
    let now = store::writer::now_ms();
    let route = || Filter {
        route: Some("capped".into()),
        ..Default::default()
    };
    let retention = Retention {
        records_ms: 7 * 24 * 3_600_000,
        per_route_cap: 50,
    };
    for round in 0..30u64 {
        let records: Vec<Record> = (0..150)
            .map(|i| record("capped", ms(now - 3_600_000 + round * 1000 + i), "/total"))
            .collect();
        a.put(&records).await.unwrap();
        let (x, y) = tokio::join!(
            tokio::spawn({
                let a = a.clone();
                async move { a.expire(retention, now).await.unwrap() }
            }),
            tokio::spawn({
                let b = b.clone();
                async move { b.expire(retention, now).await.unwrap() }
            })
        );
        x.unwrap();
        y.unwrap();
        assert_eq!(
            a.count(&route()).await.unwrap(),
            50,
            "round {round}: two sweeps kept fewer than the cap"
        );
    }
}

#[tokio::test]
async fn redis_time_bounded_counts_are_exact_and_read_no_record() {
    let redis = RedisServer::start().await;
    let store = store::open(&redis.url(), "ficus:").await.unwrap();
    time_bounded_counts_past_a_page(store.clone()).await;
    // Records are read with GET; counting, whatever the filter, uses the indexes only.
    let gets = || {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "INFO", "commandstats"])
            .output()
            .unwrap();
        let stats = String::from_utf8(out.stdout).unwrap();
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
            .map_or(0, |rest| {
                rest.split(',').next().unwrap().parse::<u64>().unwrap()
            })
    };
    let before = gets();
    let since = store::writer::now_ms() - 7_200_000 + 100;
    for f in [
        Filter {
            class: Some("defect".into()),
            since_ms: Some(since),
            ..Default::default()
        },
        Filter {
            route: Some("orders".into()),
            state: Some(State::Acknowledged),
            since_ms: Some(since),
            until_ms: Some(since + 1000),
            ..Default::default()
        },
    ] {
        store.count(&f).await.unwrap();
    }
    assert_eq!(gets(), before, "a count read records");
}

/// A 3-node Redis Cluster (no replicas) on `ports`, once every node reports it ok.
async fn start_cluster(ports: &[u16]) -> Vec<RedisServer> {
    let mut nodes = Vec::new();
    for &port in ports {
        nodes.push(
            RedisServer::start_on_with(
                port,
                &["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
            )
            .await,
        );
    }
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let status = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "redis-cli --cluster create failed");
    // Wait until the cluster reports ok on every node.
    for addr in &addrs {
        let port = addr.rsplit(':').next().unwrap().to_string();
        let ok = support::eventually(Duration::from_secs(20), || {
            let port = port.clone();
            async move {
                let out = std::process::Command::new("redis-cli")
                    .args(["-p", &port, "CLUSTER", "INFO"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok")
            }
        })
        .await;
        assert!(ok, "cluster never became ok on {addr}");
    }
    nodes
}

#[tokio::test]
async fn redis_cluster_store_keeps_the_contract() {
    let ports = [free_port(), free_port(), free_port()];
    let _nodes = start_cluster(&ports).await;
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let url = format!("redis+cluster://{}", addrs.join(","));
    contract(store::open(&url, "ficus:").await.unwrap()).await;
}

/// A Redis Cluster that is down when ficus starts: ficus must start anyway, spool, and
/// deliver once the cluster is up, as with a single Redis. Opening the cluster store
/// connected at once, so ficus refused to start at all (no request served) until the
/// cluster was back.
#[tokio::test]
async fn a_redis_cluster_down_at_start_is_connected_to_once_it_is_up() {
    let ports = [free_port(), free_port(), free_port()];
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let url = format!("redis+cluster://{}", addrs.join(","));
    let store = store::open(&url, "ficus:")
        .await
        .expect("the store of a Redis Cluster that is down could not be opened");
    assert!(store.ping().await.is_err());
    let _nodes = start_cluster(&ports).await;
    let r = record("orders", SystemTime::now(), "/total");
    let stored = support::eventually(Duration::from_secs(20), || async {
        store.put(std::slice::from_ref(&r)).await.is_ok()
    })
    .await;
    assert!(
        stored,
        "the cluster store never connected once the cluster was up"
    );
    assert_eq!(store.get(&r.id).await.unwrap().as_ref(), Some(&r));
}

// ---------------------------------------------------------------------------------------------
// The record pipeline's edges: torn spool lines, stalled stores, restarts, concurrent updates.

mod pipeline_edges {
    use std::io::Write;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use ficus::record::Recorder;
    use ficus::store::spool::{Batch, Spool};
    use ficus::store::writer::{Writer, WriterConfig};
    use ficus::store::{self, Store};

    use super::record;
    use super::support::{RedisServer, eventually, free_port, redis_ping};

    /// ficus is killed in the middle of a spool append (the spool's own doc: "a torn last
    /// line"). The next run opens the spool and appends new records: the first of them must
    /// not be glued onto the torn half-line and thrown away as "corrupt" at delivery.
    #[test]
    fn a_record_spooled_after_a_crash_mid_append_is_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let before = record("orders", now, "/a");
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(spool.append(std::slice::from_ref(&before)).unwrap(), 1);
        }
        // The crash: half a line, never completed.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("records.jsonl"))
            .unwrap();
        f.write_all(b"{\"id\":\"019a8f3c-half").unwrap();
        drop(f);
        // The next run: the store is still down, a new record is spooled.
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let after = record("orders", now, "/b");
        assert_eq!(spool.append(std::slice::from_ref(&after)).unwrap(), 1);
        assert_eq!(spool.pending_records(), 2);
        let Batch {
            records: read,
            offset,
            ..
        } = spool.read_batch(10).unwrap();
        let ids: Vec<&str> = read.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [before.id.as_str(), after.id.as_str()],
            "the record appended after the torn line was lost"
        );
        spool.commit(offset).unwrap();
        assert!(!spool.pending());
    }

    /// The retention sweep ran on the writer's own loop, with no time limit: on a stalled
    /// store, a sweep that had started kept every new record waiting in the queue (and,
    /// past 10,000, dropped) instead of letting it fall back to the spool after the store
    /// timeout, as records do when the sweep is not running.
    #[tokio::test]
    async fn a_sweep_on_a_stalled_store_does_not_hold_records_back_from_the_spool() {
        use std::sync::atomic::Ordering;
        let redis = RedisServer::start_with(&["--enable-debug-command", "local"]).await;
        let store = store::open(&redis.url(), "ficus:").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let writer = Writer::start(
            store,
            WriterConfig {
                // A sweep always about to run, so that one meets the stall.
                sweep_every: Duration::from_millis(20),
                ..writer_config(dir.path())
            },
        )
        .unwrap();
        let port = redis.port.to_string();
        let mut sleeper = std::process::Command::new("redis-cli")
            .args(["-p", &port, "DEBUG", "SLEEP", "4"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{port}");
        assert!(
            eventually(Duration::from_secs(5), || async {
                !redis_ping(&addr).await
            })
            .await,
            "Redis never stalled"
        );
        for i in 0..5 {
            writer.record(record("orders", SystemTime::now(), &format!("/{i}")));
        }
        // Well within the stall, and before a store command's own response timeout (2 s)
        // would free a writer held by the sweep: the store timeout is 300 ms.
        let spooled = eventually(Duration::from_millis(1100), || async {
            writer.stats().spooled.load(Ordering::Relaxed) == 5
        })
        .await;
        let stalled = sleeper.try_wait().unwrap().is_none();
        while sleeper.try_wait().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        writer.close().await;
        assert!(
            stalled,
            "the stall ended before the check; the test proves nothing"
        );
        assert!(
            spooled,
            "records waited behind the sweep instead of going to the spool"
        );
    }

    /// A spool line that cannot be read back is a record lost, counted as dropped
    /// (`spool_corrupt`). When the delivery offset could not be written (a full disk) just as
    /// the batch holding such a line was delivered, the loss went uncounted: the batch was
    /// behind the offset in memory, so it was never read again in that run.
    #[tokio::test]
    async fn a_corrupt_spool_line_is_counted_when_the_delivery_offset_cannot_be_written() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let (a, b) = (
            record("orders", SystemTime::now(), "/a"),
            record("orders", SystemTime::now(), "/b"),
        );
        {
            let mut spool = Spool::open(&spool_dir, 1 << 20).unwrap();
            spool.append(std::slice::from_ref(&a)).unwrap();
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(spool_dir.join("records.jsonl"))
            .unwrap()
            .write_all(b"{\"not\": \"a record\"}\n")
            .unwrap();
        {
            let mut spool = Spool::open(&spool_dir, 1 << 20).unwrap();
            spool.append(std::slice::from_ref(&b)).unwrap();
        }
        // The offset file cannot be replaced (its temporary name is taken), as on a full disk.
        std::fs::create_dir(spool_dir.join("delivered.tmp")).unwrap();
        let url = format!("sqlite:{}", dir.path().join("r.db").display());
        let store = store::open(&url, "ficus:").await.unwrap();
        let writer = Writer::start(store.clone(), writer_config(dir.path())).unwrap();
        let delivered = eventually(Duration::from_secs(10), || async {
            store.get(&a.id).await.unwrap().is_some() && store.get(&b.id).await.unwrap().is_some()
        })
        .await;
        assert!(delivered, "the spool was not delivered");
        let counted = eventually(Duration::from_secs(3), || async {
            writer.stats().dropped.load(Ordering::Relaxed) == 1
        })
        .await;
        let dropped = writer.stats().dropped.load(Ordering::Relaxed);
        writer.close().await;
        assert!(
            counted,
            "the corrupt line was counted {dropped} times, not once"
        );
    }

    /// The log lines of this thread, for tests on a current-thread runtime.
    #[derive(Clone, Default)]
    struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
            let logs = Logs::default();
            let sink = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || sink.clone())
                .with_ansi(false)
                .finish();
            (logs, tracing::subscriber::set_default(subscriber))
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    /// Counts kept next to the spool while the store was down (`counts.json`) that the next
    /// start cannot read (left empty by a power cut: the file was renamed into place without
    /// being synced) were dropped without a word: a whole outage's comparisons gone from
    /// the readiness evidence, and nothing in the log to say so.
    #[tokio::test]
    async fn unreadable_counts_kept_next_to_the_spool_are_reported() {
        let (logs, _guard) = Logs::capture();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("spool")).unwrap();
        std::fs::write(dir.path().join("spool").join("counts.json"), "").unwrap();
        let url = format!("sqlite:{}", dir.path().join("r.db").display());
        let store = store::open(&url, "ficus:").await.unwrap();
        let writer = Writer::start(store, writer_config(dir.path())).unwrap();
        writer.close().await;
        let text = logs.text();
        assert!(
            text.lines()
                .any(|l| l.contains("WARN") && l.contains("counts.json")),
            "nothing said: {text}"
        );
    }

    /// Records the writer's queue cannot take are dropped from the comparison task, on a
    /// proxy worker: a warning per record there was a flood of synchronous writes to stderr
    /// (thousands a second, just when the writer cannot keep up), on the request path. Every
    /// drop is still logged, with how many, at most one line a second.
    #[tokio::test]
    async fn records_dropped_at_a_full_queue_are_logged_in_few_lines_that_add_up() {
        use std::sync::atomic::Ordering;
        // This test's runtime runs on this thread only, the writer task included.
        let (logs, _guard) = Logs::capture();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("r.db").display());
        let store = store::open(&url, "ficus:").await.unwrap();
        let writer = Writer::start(
            store,
            WriterConfig {
                queue: 1,
                ..writer_config(dir.path())
            },
        )
        .unwrap();
        // Without a yield, the writer task cannot take any: one waits, 49 are dropped.
        for i in 0..50 {
            writer.record(record("orders", SystemTime::now(), &format!("/{i}")));
        }
        assert_eq!(writer.stats().dropped.load(Ordering::Relaxed), 49);
        let logged = |logs: &Logs| -> Vec<u64> {
            logs.text()
                .lines()
                .filter(|l| l.contains("record queue full"))
                .map(|l| {
                    l.split("dropped=")
                        .nth(1)
                        .and_then(|n| n.split_whitespace().next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(1)
                })
                .collect()
        };
        assert!(
            logged(&logs).len() <= 2,
            "{} warning lines for 49 drops",
            logged(&logs).len()
        );
        // The rest is said within a second or two, by the writer.
        let all_said = eventually(Duration::from_secs(5), || async {
            logged(&logs).iter().sum::<u64>() == 49
        })
        .await;
        writer.close().await;
        assert!(all_said, "the drops logged: {:?}", logged(&logs));
    }

    fn writer_config(dir: &std::path::Path) -> WriterConfig {
        WriterConfig {
            spool_dir: dir.join("spool"),
            store_timeout: Duration::from_millis(300),
            ..Default::default()
        }
    }

    async fn total(store: &Arc<dyn Store>) -> Option<u64> {
        store
            .counts("orders", 0)
            .await
            .ok()
            .map(|(t, _)| t.comparisons)
    }

    /// Redis stalls (DEBUG SLEEP) while the writer flushes its counts: the flush times out on
    /// ficus's side, but the HINCRBYs were sent and Redis runs them when it wakes up. The
    /// writer keeps the counts "for the next flush" and adds them again: every comparison
    /// made before the stall is counted two or more times, inflating the readiness evidence.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_flushed_into_a_stalled_redis_are_counted_once() {
        // Redis 7 refuses DEBUG unless told otherwise.
        let redis = RedisServer::start_with(&["--enable-debug-command", "local"]).await;
        let store = store::open(&redis.url(), "ficus:").await.unwrap();
        store.ping().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let writer = Writer::start(store.clone(), writer_config(dir.path())).unwrap();
        let mut sleeper = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "DEBUG", "SLEEP", "4"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{}", redis.port);
        assert!(
            eventually(Duration::from_secs(5), || async {
                !redis_ping(&addr).await
            })
            .await,
            "redis never stalled"
        );
        let route: Arc<str> = Arc::from("orders");
        for _ in 0..10 {
            writer.count(&route, false);
        }
        // Waited for off the runtime: the writer task must keep running meanwhile.
        tokio::task::spawn_blocking(move || sleeper.wait().unwrap())
            .await
            .unwrap();
        assert!(
            eventually(Duration::from_secs(10), || async {
                total(&store).await.is_some_and(|n| n >= 10)
            })
            .await,
            "the counts never arrived"
        );
        // A few more flush ticks, so that every re-added count has been written too.
        tokio::time::sleep(Duration::from_secs(3)).await;
        writer.close().await;
        assert_eq!(
            total(&store).await,
            Some(10),
            "10 comparisons were counted, the store holds a different number"
        );
    }

    /// Two people change the state of one record at about the same time (two replicas' admin
    /// APIs, a bulk action and a click). Each Redis update reads the old state with a GET, then
    /// moves the id from that state's index in a script: both read `open`, so the id ends up in
    /// both new state indexes, and per-state counts (ZCARD, used by the report) count it twice.
    #[tokio::test]
    async fn concurrent_state_changes_leave_a_record_in_exactly_one_state_index() {
        use ficus::record::State;
        use ficus::store::Filter;
        let redis = RedisServer::start().await;
        let store = store::open(&redis.url(), "ficus:").await.unwrap();
        let r = record("orders", SystemTime::now(), "/a");
        store.put(std::slice::from_ref(&r)).await.unwrap();
        let acknowledged = Arc::new(|r: &mut ficus::record::Record| r.state = State::Acknowledged);
        let resolved = Arc::new(|r: &mut ficus::record::Record| r.state = State::Resolved);
        let (a, b) = tokio::join!(
            store.modify(&r.id, acknowledged),
            store.modify(&r.id, resolved)
        );
        a.unwrap();
        b.unwrap();
        let stored = store.get(&r.id).await.unwrap().unwrap();
        let mut in_indexes = Vec::new();
        for state in State::ALL {
            let filter = Filter {
                state: Some(state),
                ..Default::default()
            };
            for _ in 0..store.count(&filter).await.unwrap() {
                in_indexes.push(state);
            }
        }
        assert_eq!(
            in_indexes,
            [stored.state],
            "one record (now {:?}) is counted in these states",
            stored.state
        );
    }

    /// While the store is down, counts "keep accumulating in memory; a crash loses at most the
    /// last second". A graceful shutdown (SIGTERM, a deploy) during the outage loses all of
    /// them: close() tries one flush, fails, and the counts die with the process.
    #[tokio::test]
    async fn counts_kept_while_the_store_is_down_survive_a_graceful_restart() {
        let port = free_port();
        let url = format!("redis://127.0.0.1:{port}/0");
        let dir = tempfile::tempdir().unwrap();
        {
            let store = store::open(&url, "ficus:").await.unwrap();
            let writer = Writer::start(store, writer_config(dir.path())).unwrap();
            let route: Arc<str> = Arc::from("orders");
            for _ in 0..5 {
                writer.count(&route, true);
            }
            // At least one flush fails while the store is down.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            writer.close().await;
        }
        // The store comes back; ficus starts again with the same spool directory.
        let _redis = RedisServer::start_on(port).await;
        let store = store::open(&url, "ficus:").await.unwrap();
        let writer = Writer::start(store.clone(), writer_config(dir.path())).unwrap();
        let arrived = eventually(Duration::from_secs(8), || async {
            total(&store).await == Some(5)
        })
        .await;
        writer.close().await;
        assert!(
            arrived,
            "5 comparisons counted before a graceful shutdown during a store outage never reached the store (store holds {:?})",
            total(&store).await
        );
    }
}
