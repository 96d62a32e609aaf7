//! `ficus demo`: two small example backends that differ a little (a legacy and a new version
//! of a shop API), with ficus in front of them using the example rules.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::debug;

use crate::rules::Side;

/// The example rules shipped in `routing-rules/`, for when the demo runs outside the repository.
const EXAMPLE_RULES: &[(&str, &str)] = &[
    (
        "10-orders.toml",
        include_str!("../routing-rules/10-orders.toml"),
    ),
    (
        "20-customers.toml",
        include_str!("../routing-rules/20-customers.toml"),
    ),
    (
        "30-catalog.toml",
        include_str!("../routing-rules/30-catalog.toml"),
    ),
    (
        "90-examples.toml",
        include_str!("../routing-rules/90-examples.toml"),
    ),
];

/// `routing-rules/` when it exists here, else the built-in examples written to a temp dir.
pub fn rules_dir() -> std::io::Result<PathBuf> {
    let local = Path::new("routing-rules");
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    let dir = std::env::temp_dir().join(format!("ficus-demo-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (name, text) in EXAMPLE_RULES {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(dir)
}

/// Starts one example backend on a free loopback port and returns its address.
pub async fn start_backend(side: Side) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc =
                    service_fn(move |req| async move { Ok::<_, Infallible>(respond(side, &req)) });
                if let Err(e) = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(error = %e, "demo backend connection closed");
                }
            });
        }
    });
    Ok(addr)
}

fn respond(side: Side, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let new = side == Side::New;
    let (status, body) = match segs.as_slice() {
        ["api", "orders", id] => (StatusCode::OK, order(id, new, now)),
        ["api", "customers", id] => (StatusCode::OK, customer(id, new)),
        ["api", "catalog", rest @ ..] => (
            StatusCode::OK,
            json!({
                "product": rest.join("/"),
                // The new catalog reports prices in cents.
                "price": if new { json!(1999) } else { json!(19.99) },
                "in_stock": true,
            }),
        ),
        _ => (
            StatusCode::OK,
            json!({ "service": side.as_str(), "method": req.method().as_str(), "path": path }),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    h.insert("x-backend", header::HeaderValue::from_static(side.as_str()));
    resp
}

fn order(id: &str, new: bool, now: u128) -> Value {
    let mut order = json!({
        "id": id,
        "status": "shipped",
        "total": 42.5,
        "currency": "EUR",
        "items": [
            { "sku": "A-1", "qty": 2, "etag": format!("{now:x}") },
            { "sku": "B-7", "qty": 1, "etag": format!("{:x}", now + 1) },
        ],
        "meta": { "generated_at": now },
    });
    if new {
        // The new service adds a field and, for odd ids, rounds the total differently.
        order["tracking"] = json!(null);
        if id.bytes().last().is_some_and(|b| b % 2 == 1) {
            order["total"] = json!(42.49);
        }
    }
    order
}

fn customer(id: &str, new: bool) -> Value {
    json!({
        "id": id,
        "name": "Ada Lovelace",
        "email": if new { "ada@example.com" } else { "ADA@EXAMPLE.COM" },
        "tier": "gold",
    })
}
