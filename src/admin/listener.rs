//! The admin port's listener: a bounded number of connections, each closed once it has done
//! no I/O for a while. `axum::serve` has neither, and the admin port shares the process's
//! file descriptors with the proxy listener: clients that open connections and leave them
//! (or send a request head byte by byte) would hold descriptors the proxy needs, and
//! `/readyz` and the metrics scrape with them.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

/// Admin connections open at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 256;
/// How long an admin connection may go without reading or writing a byte.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AdminListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    idle: Duration,
}

impl AdminListener {
    pub fn new(inner: TcpListener, max: usize, idle: Duration) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(max.max(1))),
            idle,
        }
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = AdminConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (AdminConn, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((io, peer)) => match self.slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let conn = AdminConn {
                            io,
                            _slot: slot,
                            busy: Arc::default(),
                            idle: self.idle,
                            deadline: Box::pin(tokio::time::sleep(self.idle)),
                        };
                        return (conn, peer);
                    }
                    Err(_) => {
                        ::metrics::counter!(crate::telemetry::REQUESTS_REJECTED_TOTAL, "reason" => "admin_max_connections")
                            .increment(1);
                        debug!(%peer, "admin connection limit reached; closing");
                    }
                },
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// The peer of an admin connection, as handlers and middleware see it
/// (`ConnectInfo<Peer>`), and the count of its requests being answered, which [`busy`]
/// keeps: hyper reads the connection while a handler runs, and a slow answer is not
/// idleness.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    busy: Arc<AtomicUsize>,
}

impl Connected<IncomingStream<'_, AdminListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, AdminListener>) -> Self {
        Peer {
            addr: *stream.remote_addr(),
            busy: stream.io().busy.clone(),
        }
    }
}

/// Middleware: the connection is not idle while one of its requests is being answered.
pub async fn busy(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map(|c| c.0.busy.clone());
    let Some(busy) = peer else {
        return next.run(req).await;
    };
    struct Answering(Arc<AtomicUsize>);
    impl Drop for Answering {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    busy.fetch_add(1, Ordering::AcqRel);
    let _answering = Answering(busy);
    next.run(req).await
}

/// An admin connection: holds its slot, and fails its reads once it has been idle (no byte
/// read or written) for the idle timeout, which ends the connection.
pub struct AdminConn {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
    busy: Arc<AtomicUsize>,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl AdminConn {
    fn active(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }
}

impl AsyncRead for AdminConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending => loop {
                match this.deadline.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    // A request is being answered: not idle; look again one period later.
                    Poll::Ready(()) if this.busy.load(Ordering::Acquire) > 0 => this.active(),
                    Poll::Ready(()) => {
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "admin connection idle",
                        )));
                    }
                }
            },
            ready => {
                this.active();
                ready
            }
        }
    }
}

impl AsyncWrite for AdminConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if polled.is_ready() {
            this.active();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if polled.is_ready() {
            this.active();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
