//! The admin listener, on its own port: liveness and readiness now; the reconciliation API and
//! metrics join it in later stages.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::{Value, json};

use crate::proxy::Proxy;

/// What the admin handlers read.
pub struct AdminState {
    pub proxy: Arc<Proxy>,
    /// Set once the rules are loaded and the proxy listener accepts connections.
    pub ready: AtomicBool,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<Arc<AdminState>>) -> (StatusCode, Json<Value>) {
    if !state.ready.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "starting" })),
        );
    }
    let live = state.proxy.live();
    (
        StatusCode::OK,
        Json(json!({ "status": "ready", "routes": live.rules.routes.len() })),
    )
}
