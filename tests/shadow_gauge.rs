//! `ficus_shadow_inflight` follows the shadows in flight, up and back to 0. A test binary of
//! its own: the gauge is process-wide, and any other test shadowing at the same time would
//! move it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::Response;
use support::{Backend, TestProxy, client, eventually, full};
use tokio::sync::Semaphore;

async fn inflight(proxy: &TestProxy) -> Option<f64> {
    let text = proxy.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix("ficus_shadow_inflight "))
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn the_in_flight_gauge_goes_up_with_held_shadows_and_back_to_zero() {
    // The shadow side holds every request until released.
    let release = Arc::new(Semaphore::new(0));
    let gate = release.clone();
    let legacy = Backend::start("legacy").await;
    let new = Backend::with_handler("new", move |_req| {
        let gate = gate.clone();
        async move {
            let _permit = gate.acquire().await.unwrap();
            Response::new(full("late"))
        }
    })
    .await;
    let rules = "[[route]]\nname = \"g-orders\"\n[route.match]\npath_prefix = \"/api/\"\n[route.shadow]\ntimeout = \"20s\"\n";
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    let c = client();
    for i in 0..4 {
        let resp = c.get(proxy.url(&format!("/api/{i}"))).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            inflight(&proxy).await == Some(4.0)
        })
        .await,
        "four shadows held: {:?}",
        inflight(&proxy).await
    );
    release.add_permits(4);
    assert!(
        eventually(Duration::from_secs(10), || async {
            inflight(&proxy).await == Some(0.0)
        })
        .await,
        "every shadow ended: {:?}",
        inflight(&proxy).await
    );
    assert_eq!(proxy.ficus.proxy().shadow().inflight(), 0);
}
