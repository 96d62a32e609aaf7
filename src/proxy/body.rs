//! Body wrappers on the request path.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, SizeHint};

/// The time of the last request-body progress, shared between the body and the exchange.
#[derive(Debug, Clone)]
pub struct ProgressClock {
    origin: Instant,
    last_ms: Arc<AtomicU64>,
}

impl ProgressClock {
    pub fn start() -> Self {
        Self {
            origin: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the request last made progress (its start, or the last body frame sent).
    pub fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
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
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
