//! Body wrappers on the request path.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, SizeHint};

/// The time of the last request-body progress, shared between the body and the exchange.
#[derive(Debug, Clone)]
pub struct ProgressClock {
    origin: Instant,
    state: Arc<ProgressState>,
}

#[derive(Debug, Default)]
struct ProgressState {
    last_ms: AtomicU64,
    /// The body's last poll found nothing from the client: the upload, not the upstream, is
    /// what the exchange waits on.
    waiting_on_client: AtomicBool,
}

impl ProgressClock {
    pub fn start() -> Self {
        Self {
            origin: Instant::now(),
            state: Arc::default(),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.state.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the request last made progress (its start, or the last body frame sent).
    pub fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.state.last_ms.load(Ordering::Relaxed))
    }

    /// Whether the upstream call is waiting for request-body bytes the client has not sent.
    /// An upstream that stops reading the body stops the body being polled, so this stays
    /// false then, and the silence is the upstream's.
    pub fn waiting_on_client(&self) -> bool {
        self.state.waiting_on_client.load(Ordering::Relaxed)
    }
}

/// A request body that records its progress on a [`ProgressClock`], so that the upstream
/// timeout counts from the last byte sent rather than from the start of a long upload.
pub struct Progress<B> {
    inner: B,
    clock: ProgressClock,
}

impl<B> Progress<B> {
    pub fn new(inner: B, clock: ProgressClock) -> Self {
        Self { inner, clock }
    }
}

impl<B: Body + Unpin> Body for Progress<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_)) | None) = &polled {
            self.clock.touch();
        }
        self.clock
            .state
            .waiting_on_client
            .store(polled.is_pending(), Ordering::Relaxed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error a [`Capped`] body ends with once it passes its limit.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than {limit} bytes")]
pub struct TooLarge {
    pub limit: u64,
}

/// The error of a client's request body that failed mid-stream: the client went away, reset
/// its HTTP/2 stream, or sent a malformed chunked body. The exchange fails because of the
/// client, and is not counted against the upstream.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub struct ClientBodyFailed(#[source] pub crate::upstream::BoxError);

/// A request body that fails with [`TooLarge`] past `limit` bytes: the upstream request is
/// aborted and the client gets 413. The client's own body errors come out as
/// [`ClientBodyFailed`]. Bodies with a `Content-Length` over the limit are refused
/// before this; it catches chunked and HTTP/2 bodies of unannounced size.
pub struct Capped<B> {
    inner: B,
    left: u64,
    limit: u64,
}

impl<B> Capped<B> {
    pub fn new(inner: B, limit: Option<u64>) -> Self {
        let limit = limit.unwrap_or(u64::MAX);
        Self {
            inner,
            left: limit,
            limit,
        }
    }
}

impl<B> Body for Capped<B>
where
    B: Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<crate::upstream::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = crate::upstream::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > self.left {
                        let limit = self.limit;
                        return Poll::Ready(Some(Err(Box::new(TooLarge { limit }))));
                    }
                    self.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                Poll::Ready(Some(Err(Box::new(ClientBodyFailed(e.into())))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error a [`Stalled`] body ends with.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {0:?} in the middle of its response body")]
pub struct BodyStalled(pub Duration);

/// A response body that fails with [`BodyStalled`] once the upstream sends nothing for
/// `timeout` in the middle of it, as nginx's `proxy_read_timeout` does: otherwise an upstream
/// that sends its head and then hangs holds the client's connection and its own for as long
/// as the client waits. The timer starts only when a read would wait, so a body that arrives
/// with its head (most small answers) never sets one.
pub struct Stalled<B> {
    inner: B,
    timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the timer runs for the current wait (it is re-armed after each frame).
    armed: bool,
}

impl<B> Stalled<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            timer: None,
            armed: false,
        }
    }
}

impl<B> Body for Stalled<B>
where
    B: Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<crate::upstream::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = crate::upstream::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if !this.armed {
                    this.armed = true;
                    let deadline = tokio::time::Instant::now() + this.timeout;
                    match &mut this.timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                match this.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => {
                        Poll::Ready(Some(Err(Box::new(BodyStalled(this.timeout)))))
                    }
                    _ => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
