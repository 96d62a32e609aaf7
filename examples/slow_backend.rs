//! A slow HTTP/1.1 backend for `scripts/bench-load --mirror`: answers `GET /api/item/{id}`
//! with a fixed JSON body after a delay, and `/_status` at once with its request count laid
//! out like nginx's `stub_status` (third line: `accepts handled requests`).
//!
//! It stands in for a shadow side that takes seconds to answer. It is written on the same
//! runtime as the proxy under test so that the rig itself costs little CPU on a shared
//! 2-core machine: what the benchmark measures is what a slow shadow costs the client path
//! through ficus, not the CPU of the slow server next to it.
//!
//! `cargo run --release --example slow_backend -- PORT DELAY_MS BODY_FILE` (binds 127.0.0.1).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

struct Backend {
    delay: Duration,
    /// The body template; `$id` is replaced by the item id.
    template: String,
    requests: AtomicU64,
}

impl Backend {
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let path = req.uri().path();
        if path == "/_status" {
            let text = format!(
                "Active connections: 0 \nserver accepts handled requests\n 0 0 {n} \nReading: 0 Writing: 0 Waiting: 0 \n"
            );
            return respond(StatusCode::OK, "text/plain", text.into());
        }
        match path.strip_prefix("/api/item/") {
            Some(id) if !id.is_empty() && !id.contains('/') => {
                let body = self.template.replace("$id", id);
                tokio::time::sleep(self.delay).await;
                respond(StatusCode::OK, "application/json", body.into())
            }
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

fn usage() -> ! {
    eprintln!("usage: slow_backend PORT DELAY_MS BODY_FILE");
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, delay_ms, body_file] = args.as_slice() else {
        usage()
    };
    let (Ok(port), Ok(delay_ms)) = (port.parse::<u16>(), delay_ms.parse::<u64>()) else {
        usage()
    };
    let backend = Arc::new(Backend {
        delay: Duration::from_millis(delay_ms),
        template: std::fs::read_to_string(body_file)?,
        requests: AtomicU64::new(0),
    });
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let shutdown = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                // Out of descriptors or a reset before accept: back off a little rather than
                // spin on a listener that stays ready.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
            _ = term.recv() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let backend = backend.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let backend = backend.clone();
                async move { Ok::<_, Infallible>(backend.answer(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
