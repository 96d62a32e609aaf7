//! End to end: live reload of the rules, under load, and what happens with bad files.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use support::{Backend, TestProxy, backend_of, client, eventually, metric_value};

fn rules_to(side: &str) -> String {
    format!(
        "[[route]]\nname = \"items\"\nauthority = \"{side}\"\n[route.match]\npath_prefix = \"/items/\"\n"
    )
}

async fn side_of(proxy: &TestProxy) -> String {
    let resp = client().get(proxy.url("/items/1")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    backend_of(&resp)
}

async fn wait_for_side(proxy: &TestProxy, side: &str) -> bool {
    eventually(Duration::from_secs(10), || async {
        side_of(proxy).await == side
    })
    .await
}

async fn wait_for_failed_reloads(proxy: &TestProxy, n: u64) -> bool {
    eventually(Duration::from_secs(10), || async {
        proxy.ficus.reload_stats().failed.load(Ordering::Relaxed) >= n
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_fails_no_request() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(&rules_to("legacy"), legacy.url(), new.url()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let url = proxy.url("/items/1");
        workers.push(tokio::spawn(async move {
            let c = client();
            // Bounded: stops when told, or after 20,000 requests, whichever comes first.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for round in 0..6 {
        let side = if round % 2 == 0 { "new" } else { "legacy" };
        proxy.replace_rules(&rules_to(side));
        assert!(
            wait_for_side(&proxy, side).await,
            "round {round}: rules never switched to {side}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "load ran: {}",
        ok.load(Ordering::Relaxed)
    );
    assert!(proxy.ficus.reload_stats().succeeded.load(Ordering::Relaxed) >= 6);
}

#[tokio::test]
async fn invalid_rules_are_rejected_and_the_old_rules_stay() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(&rules_to("new"), legacy.url(), new.url()).await;
    assert_eq!(side_of(&proxy).await, "new");

    // Garbage.
    proxy.replace_rules("this is [not toml");
    assert!(wait_for_failed_reloads(&proxy, 1).await);
    assert_eq!(side_of(&proxy).await, "new");

    // Valid TOML, invalid rules: the whole set is rejected, not just the bad route.
    proxy.replace_rules(&format!(
        "{}\n[[route]]\nname = \"items\"\n",
        rules_to("legacy")
    ));
    assert!(wait_for_failed_reloads(&proxy, 2).await);
    assert_eq!(side_of(&proxy).await, "new");

    // The file is deleted: nothing to load, the rules in force stay.
    std::fs::remove_file(proxy.rules_file()).unwrap();
    assert!(wait_for_failed_reloads(&proxy, 3).await);
    assert_eq!(side_of(&proxy).await, "new");

    // A valid file is picked up again.
    proxy.replace_rules(&rules_to("legacy"));
    assert!(wait_for_side(&proxy, "legacy").await);
}

#[tokio::test]
async fn half_written_file_is_rejected_then_the_finished_file_loads() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(&rules_to("legacy"), legacy.url(), new.url()).await;
    let full = rules_to("new");
    let (first, second) = full.split_at(full.len() / 2);
    // Written in place in two steps, as a slow writer or a crashed editor would.
    std::fs::write(proxy.rules_file(), first).unwrap();
    assert!(wait_for_failed_reloads(&proxy, 1).await);
    assert_eq!(side_of(&proxy).await, "legacy");
    std::fs::write(proxy.rules_file(), format!("{first}{second}")).unwrap();
    assert!(wait_for_side(&proxy, "new").await);
}

#[tokio::test]
async fn new_files_in_the_rules_directory_are_picked_up() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(&rules_to("legacy"), legacy.url(), new.url()).await;
    let team_dir = proxy.dir.path().join("team-b");
    std::fs::create_dir(&team_dir).unwrap();
    support::replace_file(
        &team_dir.join("other.toml"),
        "[[route]]\nname = \"other\"\npriority = 5\nauthority = \"new\"\n[route.match]\npath = \"/items/{id}\"\n",
    );
    assert!(wait_for_side(&proxy, "new").await);
}

#[tokio::test]
async fn explicit_reload_reports_errors_with_locations() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start_with(&rules_to("legacy"), legacy.url(), new.url(), |c| {
        c.watch_rules = false;
    })
    .await;
    std::fs::write(
        proxy.rules_file(),
        "[[route]]\nname = \"x\"\nauthority = \"both\"\n",
    )
    .unwrap();
    let errors = proxy.ficus.reload().unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].to_string().ends_with(
        "rules.toml:3:13: error: unknown authority `both`; hint: authority is \"legacy\" or \"new\""
    ), "{}", errors[0]);
    assert_eq!(side_of(&proxy).await, "legacy");
    std::fs::write(proxy.rules_file(), rules_to("new")).unwrap();
    assert_eq!(proxy.ficus.reload().unwrap(), 1);
    assert_eq!(side_of(&proxy).await, "new");
}

/// Lays out `dir` as the kubelet does for a ConfigMap volume: the data in a timestamped
/// directory, `..data` pointing at it, and each key a symlink through `..data`.
#[cfg(unix)]
fn configmap_publish(dir: &std::path::Path, version: &str, key: &str, text: &str) {
    use std::os::unix::fs::symlink;
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join(key), text).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(format!("..{version}"), &tmp).unwrap();
    // The atomic step: `..data` is swapped by a rename.
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join(key);
    if std::fs::symlink_metadata(&link).is_err() {
        symlink(format!("..data/{key}"), &link).unwrap();
    }
}

/// `--rules /etc/ficus/rules/rules.toml` with the file from a ConfigMap volume: an update
/// swaps `..data` and removes the old data directory; the `rules.toml` link itself never
/// changes. The watcher only passes events whose path starts with the rules file's path, so
/// the swap is never seen and the new rules never load (until someone sends SIGHUP).
#[cfg(unix)]
#[tokio::test]
async fn single_rules_file_from_a_configmap_volume_is_reloaded() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start_with(&rules_to("legacy"), legacy.url(), new.url(), |c| {
        let cm = c.rules.join("configmap");
        configmap_publish(
            &cm,
            "2026_01_01_00_00_00.1",
            "rules.toml",
            &rules_to("legacy"),
        );
        c.rules = cm.join("rules.toml");
    })
    .await;
    assert_eq!(side_of(&proxy).await, "legacy");
    let cm = proxy.dir.path().join("configmap");
    configmap_publish(&cm, "2026_01_01_00_05_00.2", "rules.toml", &rules_to("new"));
    std::fs::remove_dir_all(cm.join("..2026_01_01_00_00_00.1")).unwrap();
    assert!(
        wait_for_side(&proxy, "new").await,
        "the ConfigMap update was not picked up (reloads: {} ok, {} failed)",
        proxy.ficus.reload_stats().succeeded.load(Ordering::Relaxed),
        proxy.ficus.reload_stats().failed.load(Ordering::Relaxed),
    );
}

/// `--rules rules.toml` in a directory where other files change: the database and spool of
/// the default `sqlite:ficus.db` store in the working directory, logs, an editor's swap file.
/// Any change in the file's directory wakes the watch (a ConfigMap swaps `..data` there), but
/// rules that did not change must not be reloaded: every such reload logged `rules reloaded`
/// (or, with a broken file on disk, all its errors again) and counted in
/// `ficus_rules_reloads_total`, so the log and the dashboard showed pushes nobody made.
#[tokio::test]
async fn changes_beside_the_rules_that_leave_them_unchanged_do_not_reload() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start_with(&rules_to("legacy"), legacy.url(), new.url(), |c| {
        c.rules = c.rules.join("rules.toml");
    })
    .await;
    let stats = proxy.ficus.reload_stats();
    let reloads = || stats.succeeded.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed);
    // Bounded: five writes, 100 ms apart, then at most 3 s of watching the counters.
    let other = proxy.dir.path().join("ficus.log");
    for i in 0..5 {
        std::fs::write(&other, format!("line {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reloaded = eventually(Duration::from_secs(3), || async { reloads() > 0 }).await;
    assert!(!reloaded, "{} reloads of unchanged rules", reloads());

    // The same holds for a broken file on disk: its errors are reported once, not again on
    // every change beside it.
    std::fs::write(proxy.rules_file(), "this is [not toml").unwrap();
    assert!(wait_for_failed_reloads(&proxy, 1).await);
    for i in 0..5 {
        std::fs::write(&other, format!("line {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = eventually(Duration::from_secs(3), || async { reloads() > 1 }).await;
    assert!(!again, "{} reloads of an unchanged broken file", reloads());
    assert_eq!(side_of(&proxy).await, "legacy");

    // A real change still loads.
    proxy.replace_rules(&rules_to("new"));
    assert!(wait_for_side(&proxy, "new").await);
}

/// `--rules /etc/ficus/rules.toml`, a link to the file in a git checkout elsewhere
/// (`/srv/rules-repo/rules.toml`): a pull replaces the file there, in a directory the watch
/// does not watch, and no event ever comes from the link's directory. The same holds for a
/// link in a rules directory to a shared file, and for filesystems without inotify (NFS, some
/// container bind mounts). The new rules never loaded until a SIGHUP.
#[cfg(unix)]
#[tokio::test]
async fn a_rules_file_linked_from_another_directory_is_reloaded() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start_with(&rules_to("legacy"), legacy.url(), new.url(), |c| {
        let repo = c.rules.join("repo");
        let etc = c.rules.join("etc");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(repo.join("rules.toml"), rules_to("legacy")).unwrap();
        std::os::unix::fs::symlink("../repo/rules.toml", etc.join("rules.toml")).unwrap();
        c.rules = etc.join("rules.toml");
        c.rules_poll_interval = Duration::from_millis(500);
    })
    .await;
    assert_eq!(side_of(&proxy).await, "legacy");
    support::replace_file(
        &proxy.dir.path().join("repo").join("rules.toml"),
        &rules_to("new"),
    );
    assert!(
        wait_for_side(&proxy, "new").await,
        "the linked file's change was not picked up"
    );
    assert_eq!(
        proxy.ficus.reload_stats().succeeded.load(Ordering::Relaxed),
        1,
        "polling reloads only what changed"
    );
}

/// A reload that removes or renames a route takes that route's series off `/metrics` at once:
/// a dashboard must not keep drawing a route that no longer exists (nor a `by (route)` panel
/// keep a row for it), and an override gauge of a removed route must not read "in force".
/// The routes that stay keep their series, and a renamed route starts its own. (Here, not in
/// tests/metrics.rs: a reload moves the process-wide reload counters that test expects at 0.)
#[tokio::test]
async fn series_of_a_route_removed_by_a_reload_leave_metrics() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let both = "[[route]]\nname = \"m-stays\"\n[route.match]\npath_prefix = \"/stays/\"\n[route.shadow]\n\n[[route]]\nname = \"m-goes\"\n[route.match]\npath_prefix = \"/goes/\"\n[route.shadow]\n";
    let proxy = TestProxy::start(both, legacy.url(), new.url()).await;
    let c = client();
    for path in ["/stays/1", "/goes/1"] {
        assert_eq!(c.get(proxy.url(path)).send().await.unwrap().status(), 200);
    }
    let series_of = |text: &str, route: &str| -> Vec<String> {
        let label = format!("route=\"{route}\"");
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&label))
            .map(str::to_string)
            .collect()
    };
    let text = proxy.metrics().await;
    assert!(!series_of(&text, "m-goes").is_empty(), "{text}");
    assert!(!series_of(&text, "m-stays").is_empty(), "{text}");

    // `m-goes` is renamed `m-renamed`.
    proxy.replace_rules(&both.replace("m-goes", "m-renamed"));
    proxy.ficus.reload().unwrap();
    let text = proxy.metrics().await;
    assert_eq!(series_of(&text, "m-goes"), Vec::<String>::new(), "{text}");
    assert!(
        metric_value(
            &text,
            r#"ficus_requests_total{route="m-stays",authority="legacy",status="2xx"}"#
        ) == Some(1.0),
        "{text}"
    );
    assert_eq!(
        c.get(proxy.url("/goes/2")).send().await.unwrap().status(),
        200
    );
    let text = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            r#"ficus_requests_total{route="m-renamed",authority="legacy",status="2xx"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(series_of(&text, "m-goes"), Vec::<String>::new(), "{text}");
    // The exposition stays well formed for Prometheus: no sample line was cut.
    assert!(
        text.lines()
            .all(|l| l.is_empty() || l.starts_with('#') || l.split(' ').count() == 2),
        "{text}"
    );
}
