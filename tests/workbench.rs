//! End to end in a real browser: Debian's chromium, driven through chromedriver (WebDriver),
//! opens the workbench served by a real ficus in front of real loopback backends, and works
//! through a divergence the way a person would: routes, groups, the highlighted field,
//! classification, replay after the backend is fixed, filters by time, a group replayed in
//! bulk, and the keyboard alone. Each main view is saved as a screenshot
//! (under `target/workbench-screenshots/`, or `docs/screenshots/` with
//! `FICUS_UPDATE_SCREENSHOTS=1`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use http::Response;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use support::{Backend, TestProxy, client, eventually, free_port, full};

const RULES: &str = r#"
[[route]]
name = "orders"
[route.match]
path_prefix = "/api/orders/"
[route.shadow]

[[route]]
name = "payments"
[route.match]
path_prefix = "/api/payments"
methods = ["POST"]
[route.shadow]
writes = true
"#;

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
    profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> (Driver, Client) {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is missing: apt-get install -y chromium chromium-driver (scripts/test does)");
        let profile = tempfile::tempdir().unwrap();
        let driver = Driver {
            child,
            port,
            profile,
        };
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                    "--disable-background-networking", "--disable-sync", "--lang=en-GB",
                    format!("--user-data-dir={}", driver.profile.path().display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{}", driver.port);
        // chromedriver takes a moment to listen; the session takes a moment to start chromium.
        let mut last = String::new();
        for _ in 0..100 {
            match ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => return (driver, c),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no WebDriver session from chromedriver: {last}");
    }
}

fn chromium() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("/usr/bin/chromium")
}

/// Waits until the element matching `css` shows text containing `want`; returns its text.
async fn wait_text(c: &Client, css: &str, want: &str) -> String {
    let mut seen = String::new();
    for _ in 0..150 {
        if let Ok(el) = c.find(Locator::Css(css)).await
            && let Ok(text) = el.text().await
        {
            if text.contains(want) {
                return text;
            }
            seen = text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("`{css}` never showed `{want}`; last text: {seen:?}");
}

async fn wait_for(c: &Client, css: &str) -> fantoccini::elements::Element {
    match c
        .wait()
        .at_most(Duration::from_secs(15))
        .for_element(Locator::Css(css))
        .await
    {
        Ok(el) => el,
        Err(e) => {
            let page = c.source().await.unwrap_or_default();
            panic!("`{css}` never appeared ({e}); the page:\n{page}")
        }
    }
}

/// Clicks the element matching `css`, which must be on the page now.
async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let dir = if std::env::var_os("FICUS_UPDATE_SCREENSHOTS").is_some() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots")
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/workbench-screenshots")
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Legacy answers `total: 10.5`; new answers `total: 11` until `fixed` is set.
async fn backends(fixed: Arc<AtomicBool>) -> (Backend, Backend) {
    let answer = |side: &'static str, fixed: Arc<AtomicBool>| {
        move |req: hyper::Request<hyper::body::Incoming>| {
            let path = req.uri().path().to_string();
            let fixed = fixed.clone();
            async move {
                let total = if side == "new" && !fixed.load(Ordering::SeqCst) {
                    json!(11)
                } else {
                    json!(10.5)
                };
                Response::builder()
                    .header("content-type", "application/json")
                    .body(full(
                        json!({"path": path, "total": total, "items": [{"sku": "A-1", "qty": 2}]})
                            .to_string(),
                    ))
                    .unwrap()
            }
        }
    };
    let legacy = Backend::with_handler("legacy", answer("legacy", fixed.clone())).await;
    let new = Backend::with_handler("new", answer("new", fixed)).await;
    (legacy, new)
}

async fn record(proxy: &TestProxy, id: &str) -> Value {
    proxy.admin_json(&format!("/api/divergences/{id}")).await
}

/// The page's curl command, for a request full of shell syntax, run by `sh` with a `curl` that
/// prints its arguments: each one arrives exactly as recorded, and nothing is expanded or run.
async fn hostile_values_reach_curl_literally(c: &Client) {
    let method = "GET;echo${IFS}injected|$(echo injected)`echo injected`&";
    let host = "127.0.0.1:1'$(echo injected)";
    let path = "/a b/'$(echo injected)'/[1-2]";
    let query = "q=`echo injected`&r={a,b}";
    let header = "it's $(echo injected) `echo injected` | & ; \"x\" \\ '' $HOME";
    let body = "{\"a\": \"'; $(echo injected) '\\''\"}";
    let request = json!({
        "method": method, "path": path, "query": query, "body": body,
        "headers": [["Host", host], ["X-Note", header]],
    });
    let command: Value = c
        .execute(
            "return curlCommand({request: arguments[0]});",
            vec![request],
        )
        .await
        .unwrap();
    let script = format!(
        "curl() {{ printf '%s\\n' \"$@\"; }}\n{}",
        command.as_str().unwrap()
    );
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(out.status.success(), "{command}: {out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let url = format!("http://{host}{path}?{query}");
    let note = format!("X-Note: {header}");
    assert_eq!(
        printed.lines().collect::<Vec<_>>(),
        [
            "-sS",
            "--globoff",
            "-X",
            method,
            &url,
            "-H",
            &note,
            "--data-raw",
            body
        ],
        "{command}"
    );
}

/// Presses Tab, from where the focus is, until `css` has it (a bounded number of times); the
/// focus ring must show. Returns nothing: the caller presses Enter.
async fn tab_to(c: &Client, css: &str) {
    for _ in 0..60 {
        let focused: Value = c
            .execute(
                "const a = document.activeElement;
                 return [a.matches(arguments[0]), a.matches(':focus-visible')];",
                vec![json!(css)],
            )
            .await
            .unwrap();
        if focused[0] == json!(true) {
            assert_eq!(focused[1], json!(true), "the focus ring shows on `{css}`");
            return;
        }
        c.active_element()
            .await
            .unwrap()
            .send_keys(TAB)
            .await
            .unwrap();
    }
    panic!("Tab never reached `{css}`");
}

const TAB: &str = "\u{e004}";
const ENTER: &str = "\u{e007}";

/// Stores a copy of `r`, `hours` old: a record's time is read from its (UUIDv7) id.
async fn put_old_copy(proxy: &TestProxy, r: &ficus::record::Record, hours: u64) -> String {
    let now = std::time::SystemTime::now();
    let at = now - Duration::from_secs(hours * 3600);
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let t = format!("{ms:012x}");
    let mut copy = r.clone();
    copy.id = format!("{}-{}-7000-8000-000000000001", &t[..8], &t[8..]);
    copy.at = humantime::format_rfc3339_millis(at).to_string();
    proxy.ficus.store().put(&[copy.clone()]).await.unwrap();
    copy.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_works_through_a_divergence_in_the_browser() {
    let fixed = Arc::new(AtomicBool::new(false));
    let (legacy, new) = backends(fixed.clone()).await;
    let proxy = TestProxy::start(RULES, legacy.url(), new.url()).await;
    let http = client();
    for i in 0..4 {
        let resp = http
            .get(proxy.url(&format!("/api/orders/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(proxy.wait_records(4).await.len(), 4);
    // Counters reach the store in the writer's next batch.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let report: Value = proxy.report().await;
            report["routes"][0]["comparisons"]["window"] == 4
        })
        .await
    );
    let (_driver, c) = Driver::start().await;

    // Routes: the orders route with its comparisons, rate and verdict.
    c.goto(&proxy.admin_url("/ui/")).await.unwrap();
    let row = wait_text(&c, "#routes tr[data-route=\"orders\"]", "orders").await;
    assert!(row.contains("insufficient-data"), "verdict shown: {row}");
    wait_text(&c, "#routes tr[data-route=\"orders\"] td.rate", "100.00%").await;
    wait_for(&c, "#routes tr[data-route=\"orders\"] svg.spark rect").await;
    screenshot(&c, "routes").await;

    // Groups, reached by the route's link: one group of four, differing at /total.
    c.find(Locator::Css("#routes tr[data-route=\"orders\"] th a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let group = wait_text(&c, "#groups tbody tr", "/total").await;
    assert!(
        group.contains("orders") && group.contains("open 4"),
        "{group}"
    );
    // The filters are in the address: the view can be shared as a link.
    let url = c.current_url().await.unwrap();
    assert_eq!(url.fragment(), Some("/groups?route=orders&state=open"));
    screenshot(&c, "groups").await;

    // One divergence: the differing field is highlighted in place on both sides.
    click(&c, "#groups tbody tr a").await;
    let mark = wait_text(
        &c,
        "[data-side=\"new\"] mark.changed[data-path=\"/total\"]",
        "11",
    )
    .await;
    assert!(mark.contains("\"total\": 11"), "{mark}");
    let old = wait_text(
        &c,
        "[data-side=\"legacy\"] mark.changed[data-path=\"/total\"]",
        "10.5",
    )
    .await;
    assert!(old.contains("\"total\": 10.5"), "{old}");
    wait_text(&c, "#diffs-title", "Differences (1)").await;
    let id = c
        .find(Locator::Css("article[data-id]"))
        .await
        .unwrap()
        .attr("data-id")
        .await
        .unwrap()
        .unwrap();
    c.set_window_size(1400, 1250).await.unwrap();
    screenshot(&c, "divergence").await;
    c.set_window_size(1400, 1000).await.unwrap();

    // The copied curl command reproduces the request, through ficus.
    let curl = c
        .find(Locator::Css("#curl pre"))
        .await
        .unwrap()
        .prop("textContent")
        .await
        .unwrap()
        .unwrap();
    assert!(
        curl.starts_with("curl -sS --globoff -X 'GET' 'http://127.0.0.1:"),
        "{curl}"
    );
    let out = Command::new("sh").arg("-c").arg(&curl).output().unwrap();
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["total"], json!(10.5), "the authority answered");
    hostile_values_reach_curl_literally(&c).await;

    // Classify it, with a note.
    c.find(Locator::Css("#edit-class"))
        .await
        .unwrap()
        .send_keys("defect")
        .await
        .unwrap();
    c.find(Locator::Css("#edit-note"))
        .await
        .unwrap()
        .send_keys("rounding in the new pricing service")
        .await
        .unwrap();
    click(&c, "#save").await;
    wait_text(&c, "#rec-class", "defect").await;
    wait_text(&c, "#status", "Saved.").await;
    let stored = record(&proxy, &id).await;
    assert_eq!(stored["class"], "defect");
    assert_eq!(stored["note"], "rounding in the new pricing service");
    // A defect blocks the route: the routes view says so.
    c.goto(&proxy.admin_url("/ui/#/routes")).await.unwrap();
    wait_text(
        &c,
        "#routes tr[data-route=\"orders\"]",
        "classified as defect",
    )
    .await;

    // The new side is fixed; replaying from the page resolves the divergence.
    fixed.store(true, Ordering::SeqCst);
    c.goto(&proxy.admin_url(&format!("/ui/#/divergence/{id}")))
        .await
        .unwrap();
    wait_for(&c, "#replay").await.click().await.unwrap();
    wait_text(&c, "#status", "Replay matched").await;
    wait_text(&c, "#rec-state", "resolved").await;
    let stored = record(&proxy, &id).await;
    assert_eq!(stored["state"], "resolved");
    let history = wait_text(&c, "ol.history", "replay matched").await;
    assert!(history.contains("defect"), "{history}");

    // Bulk: the rest of the group (three left open, and the curl run's) marked expected from
    // the groups view; the resolved one stays resolved.
    c.goto(&proxy.admin_url("/ui/#/groups?route=orders&state=open"))
        .await
        .unwrap();
    wait_text(&c, "#groups tbody tr", "open 4").await;
    wait_for(&c, "#groups tbody input.pick")
        .await
        .click()
        .await
        .unwrap();
    click(&c, "#bulk-expected").await;
    wait_text(&c, "#status", "Marked expected (their later records too, until another state is set): 4 record(s) in 1 group(s)").await;
    wait_text(&c, "main", "No divergences match these filters.").await;
    assert_eq!(record(&proxy, &id).await["state"], "resolved");

    // The rate and the chart agree: of five comparisons (four, and the curl run's), the four
    // marked expected count in neither; the resolved one still does.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let report: Value = proxy.report().await;
            report["routes"][0]["comparisons"]["window"] == 5
        })
        .await
    );
    c.goto(&proxy.admin_url("/ui/#/routes")).await.unwrap();
    wait_text(&c, "#routes tr[data-route=\"orders\"] td.rate", "20.00%").await;
    let chart: Value = c
        .execute(
            "const svg = document.querySelector('#routes tr[data-route=\"orders\"] svg.spark');
             const sum = (a) => [...svg.querySelectorAll('rect')]
               .reduce((n, r) => n + Number(r.getAttribute(a)), 0);
             return [sum('data-counted'), sum('data-comparisons'), svg.getAttribute('aria-label')];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(chart[0], json!(1), "{chart}");
    assert_eq!(chart[1], json!(5), "{chart}");
    assert!(
        chart[2]
            .as_str()
            .unwrap()
            .contains("not counting those marked expected"),
        "{chart}"
    );

    // Narrow screens: the two sides stack instead of squeezing.
    c.set_window_size(420, 900).await.unwrap();
    c.goto(&proxy.admin_url(&format!("/ui/#/divergence/{id}")))
        .await
        .unwrap();
    wait_for(&c, "[data-side=\"new\"] mark.changed").await;
    let stacked: Value = c
        .execute(
            "const [a, b] = document.querySelectorAll('[data-side]');
             return b.getBoundingClientRect().top >= a.getBoundingClientRect().bottom;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(stacked, json!(true));
    let fits: Value = c
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        fits,
        json!(true),
        "nothing scrolls sideways on a narrow screen"
    );
    screenshot(&c, "divergence-narrow").await;
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_stays_out_of_the_address_and_writes_need_a_confirmation() {
    let fixed = Arc::new(AtomicBool::new(false));
    let (legacy, new) = backends(fixed).await;
    let proxy = TestProxy::start_with(RULES, legacy.url(), new.url(), |c| {
        c.admin_tokens = vec![("alice".into(), "s3cret-token".into())];
    })
    .await;
    let resp = client()
        .post(proxy.url("/api/payments"))
        .header("content-type", "application/json")
        .body(r#"{"amount": 5}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(proxy.wait_records(1).await.len(), 1);
    // The page itself needs no token (it holds no data) and allows only its own scripts.
    let page = client().get(proxy.admin_url("/ui/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let api = client()
        .get(proxy.admin_url("/api/report"))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 401);
    let (_driver, c) = Driver::start().await;

    // No token yet: the page asks for one, and shows nothing from the API.
    c.goto(&proxy.admin_url("/ui/")).await.unwrap();
    let dialog = wait_for(&c, "#token-dialog[open]").await;
    assert!(dialog.is_displayed().await.unwrap());
    wait_text(&c, "#status", "needs a token").await;
    c.find(Locator::Css("#token-input"))
        .await
        .unwrap()
        .send_keys("s3cret-token")
        .await
        .unwrap();
    c.find(Locator::Css("#token-form button[value=\"save\"]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "#routes tr[data-route=\"payments\"]", "payments").await;
    let url = c.current_url().await.unwrap();
    assert!(!url.as_str().contains("s3cret"), "{url}");
    let kept: Value = c
        .execute("return sessionStorage.getItem('ficus.token')", vec![])
        .await
        .unwrap();
    assert_eq!(kept, json!("s3cret-token"));

    // A POST divergence: replay asks for an explicit confirmation; cancelling sends nothing.
    c.goto(&proxy.admin_url("/ui/#/divergences?route=payments"))
        .await
        .unwrap();
    wait_for(&c, "#divergences tbody tr a")
        .await
        .click()
        .await
        .unwrap();
    let before = (legacy.count(), new.count());
    wait_text(&c, "#replay", "Replay (write)").await;
    click(&c, "#replay").await;
    wait_for(&c, "#confirm-dialog[open]").await;
    click(&c, "#confirm-no").await;
    wait_text(&c, "#status", "Replay cancelled.").await;
    assert_eq!(
        (legacy.count(), new.count()),
        before,
        "nothing was replayed"
    );

    // Confirmed: the write goes to both sides again.
    click(&c, "#replay").await;
    wait_for(&c, "#confirm-dialog[open]").await;
    click(&c, "#confirm-check").await;
    click(&c, "#confirm-yes").await;
    wait_text(&c, "#status", "Replay still diverges").await;
    assert_eq!((legacy.count(), new.count()), (before.0 + 1, before.1 + 1));
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_filters_bulk_replay_and_the_keyboard() {
    let fixed = Arc::new(AtomicBool::new(false));
    let (legacy, new) = backends(fixed.clone()).await;
    let proxy = TestProxy::start(RULES, legacy.url(), new.url()).await;
    let http = client();
    for i in 0..3 {
        let resp = http
            .get(proxy.url(&format!("/api/orders/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    for _ in 0..2 {
        let resp = http
            .post(proxy.url("/api/payments"))
            .header("content-type", "application/json")
            .body(r#"{"amount": 5}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let records = proxy.wait_records(5).await;
    assert_eq!(records.len(), 5);
    let order = records.iter().find(|r| r.route == "orders").unwrap();
    let old = put_old_copy(&proxy, order, 3).await;
    let (_driver, c) = Driver::start().await;

    // Keyboard only: Tab to the route's link, Enter opens its groups.
    c.goto(&proxy.admin_url("/ui/")).await.unwrap();
    wait_text(&c, "#routes tr[data-route=\"orders\"]", "orders").await;
    tab_to(&c, "#routes tr[data-route=\"orders\"] th a").await;
    c.active_element()
        .await
        .unwrap()
        .send_keys(ENTER)
        .await
        .unwrap();
    wait_text(&c, "#groups tbody tr", "open 4").await;
    assert_eq!(
        c.current_url().await.unwrap().fragment(),
        Some("/groups?route=orders&state=open")
    );

    // `since` narrows the groups: the three-hour-old record leaves the count.
    c.find(Locator::Css("select#since"))
        .await
        .unwrap()
        .select_by_value("1h")
        .await
        .unwrap();
    wait_text(&c, "#groups tbody tr td.num", "3").await;
    assert_eq!(
        c.current_url().await.unwrap().fragment(),
        Some("/groups?route=orders&state=open&since=1h")
    );

    // Keyboard again: Tab to the group's newest divergence, Enter opens it.
    tab_to(&c, "#groups tbody a[aria-label^=\"Open the newest\"]").await;
    c.active_element()
        .await
        .unwrap()
        .send_keys(ENTER)
        .await
        .unwrap();
    wait_text(&c, "#diffs-title", "Differences (1)").await;
    let opened = c
        .find(Locator::Css("article[data-id]"))
        .await
        .unwrap()
        .attr("data-id")
        .await
        .unwrap()
        .unwrap();
    // The newest is the highest id (the store's order), whichever comparison ended last.
    let newest = records
        .iter()
        .filter(|r| r.route == "orders")
        .map(|r| &r.id)
        .max()
        .unwrap();
    assert_eq!(&opened, newest, "the newest of the orders group");

    // `until` narrows the list to what came before it: only the old record.
    c.goto(&proxy.admin_url("/ui/#/divergences?route=orders"))
        .await
        .unwrap();
    wait_for(&c, "#divergences tbody tr").await;
    let rows = c
        .find_all(Locator::Css("#divergences tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    c.execute(
        "const input = document.getElementById('until');
         const d = new Date(Date.now() - 3600e3);
         input.value = new Date(d - d.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
         input.dispatchEvent(new Event('change', {bubbles: true}));",
        vec![],
    )
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let ids: Value = c
                .execute(
                    "return [...document.querySelectorAll('#divergences tbody tr')].map((r) => r.dataset.id);",
                    vec![],
                )
                .await
                .unwrap();
            ids == json!([old])
        })
        .await,
        "the list narrows to the old record"
    );
    let fragment = c
        .current_url()
        .await
        .unwrap()
        .fragment()
        .unwrap()
        .to_string();
    assert!(
        fragment.contains("until=20"),
        "an RFC 3339 instant in the address: {fragment}"
    );

    // Bulk replay of a group of POSTs asks first; cancelled, nothing is sent.
    c.goto(&proxy.admin_url("/ui/#/groups?route=payments&state=open"))
        .await
        .unwrap();
    wait_text(&c, "#groups tbody tr", "open 2").await;
    wait_for(&c, "#groups tbody input.pick")
        .await
        .click()
        .await
        .unwrap();
    let before = (legacy.count(), new.count());
    click(&c, "#bulk-replay").await;
    let text = wait_text(&c, "#confirm-dialog[open] #confirm-text", "POST").await;
    assert!(text.contains("not safe"), "{text}");
    click(&c, "#confirm-no").await;
    wait_text(&c, "#status", "Replay cancelled.").await;
    assert_eq!(
        (legacy.count(), new.count()),
        before,
        "nothing was replayed"
    );

    // Confirmed: both writes go to both sides again, and the page says what happened to each.
    let confirm_replay = || async {
        click(&c, "#bulk-replay").await;
        wait_for(&c, "#confirm-dialog[open]").await;
        click(&c, "#confirm-check").await;
        click(&c, "#confirm-yes").await;
    };
    confirm_replay().await;
    wait_text(
        &c,
        "#status",
        "Replayed 2 record(s) in 1 group(s): 0 matched, 2 still diverge.",
    )
    .await;
    assert_eq!((legacy.count(), new.count()), (before.0 + 2, before.1 + 2));
    screenshot(&c, "groups-replay").await;

    // The new side fixed: the replay matches both, which resolves them and empties the view.
    fixed.store(true, Ordering::SeqCst);
    wait_for(&c, "#groups tbody input.pick")
        .await
        .click()
        .await
        .unwrap();
    confirm_replay().await;
    wait_text(
        &c,
        "#status",
        "Replayed 2 record(s) in 1 group(s): 2 matched, 0 still diverge.",
    )
    .await;
    wait_text(&c, "main", "No divergences match these filters.").await;
    c.close().await.unwrap();
}

/// On Redis a page of the listing reads a bounded number of index entries, so a selective
/// filter (open records of a route, behind 2,100 newer acknowledged ones) answers empty pages
/// with a cursor before its matches. The list follows the cursor instead of saying that
/// nothing matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_finds_records_past_short_redis_pages() {
    let redis = support::RedisServer::start().await;
    let fixed = Arc::new(AtomicBool::new(false));
    let (legacy, new) = backends(fixed).await;
    let url = redis.url();
    let proxy = TestProxy::start_with(RULES, legacy.url(), new.url(), |c| c.store = url).await;
    for i in 0..3 {
        client()
            .get(proxy.url(&format!("/api/orders/{i}")))
            .send()
            .await
            .unwrap();
    }
    let open = proxy.wait_records(3).await;
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let newer: Vec<ficus::record::Record> = (0..2_100u64)
        .map(|i| {
            let mut r = open[0].clone();
            let t = format!("{:012x}", now + 60_000 + i);
            r.id = format!("{}-{}-7000-8000-{:012x}", &t[..8], &t[8..], 1);
            r.state = ficus::record::State::Acknowledged;
            r
        })
        .collect();
    proxy.ficus.store().put(&newer).await.unwrap();
    let first: Value = proxy
        .admin_json("/api/divergences?route=orders&state=open&limit=50")
        .await;
    assert_eq!(
        first["items"].as_array().map(Vec::len),
        Some(0),
        "the first page is empty with a cursor, or this test proves nothing: {first}"
    );
    let (_driver, c) = Driver::start().await;
    c.goto(&proxy.admin_url("/ui/#/divergences?route=orders&state=open"))
        .await
        .unwrap();
    wait_for(&c, "table#divergences").await;
    let rows = c
        .find_all(Locator::Css("table#divergences tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "the three open records are listed");
    c.close().await.unwrap();
}
