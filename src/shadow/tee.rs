//! Body tees: pass a body through untouched while copying it, up to a limit, for the shadow
//! and the comparison. The copy is a memcpy inside `poll_frame`; nothing here waits, so the
//! stream to the authority or to the client is never delayed.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

/// A global cap on the bytes held by all shadows at once.
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicUsize,
    max: usize,
}

impl MemoryBudget {
    pub fn new(max: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            max,
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_reserve(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.max)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Bytes reserved from the budget by one shadow; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    held: AtomicUsize,
}

impl Reservation {
    pub fn new(budget: Arc<MemoryBudget>) -> Arc<Self> {
        Arc::new(Self {
            budget,
            held: AtomicUsize::new(0),
        })
    }

    /// Gives back `n` bytes this reservation holds (a tee dropping its copy).
    fn shrink(&self, n: usize) {
        if n > 0 {
            self.held.fetch_sub(n, Ordering::AcqRel);
            self.budget.release(n);
        }
    }

    pub fn try_grow(&self, n: usize) -> bool {
        let ok = self.budget.try_reserve(n);
        if ok {
            self.held.fetch_add(n, Ordering::AcqRel);
        }
        ok
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(*self.held.get_mut());
    }
}

/// What a tee delivers once its body has ended (or could not be kept).
#[derive(Debug)]
pub enum Teed {
    Complete(Bytes),
    /// The body is larger than the limit.
    OverLimit,
    /// The global memory budget is exhausted.
    OverBudget,
    /// The body failed mid-stream.
    Failed,
}

/// Passes `inner` through and delivers a copy (up to `limit` bytes) on `done`. When the tee is
/// dropped before the end (a client that went away), `done` is dropped unsent.
pub struct Tee<B> {
    inner: B,
    buf: BytesMut,
    limit: usize,
    reservation: Arc<Reservation>,
    done: Option<oneshot::Sender<Teed>>,
}

impl<B: Body<Data = Bytes> + Unpin> Tee<B> {
    pub fn new(
        inner: B,
        limit: usize,
        reservation: Arc<Reservation>,
    ) -> (Self, oneshot::Receiver<Teed>) {
        let (tx, rx) = oneshot::channel();
        let mut tee = Self {
            inner,
            buf: BytesMut::new(),
            limit,
            reservation,
            done: Some(tx),
        };
        // A body that is already complete (no body at all) may never be polled.
        if tee.inner.is_end_stream() {
            tee.finish();
        } else if tee
            .inner
            .size_hint()
            .upper()
            .is_some_and(|upper| upper > limit as u64)
        {
            tee.give_up(Teed::OverLimit);
        }
        (tee, rx)
    }

    fn finish(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(Teed::Complete(std::mem::take(&mut self.buf).freeze()));
        }
    }

    fn give_up(&mut self, why: Teed) {
        // The copy is dropped: so are the bytes it held in the budget.
        self.reservation.shrink(self.buf.len());
        self.buf = BytesMut::new();
        if let Some(tx) = self.done.take() {
            let _ = tx.send(why);
        }
    }

    fn copy(&mut self, data: &Bytes) {
        if self.done.is_none() {
            return;
        }
        // Nobody waits for the copy any more (the shadow ended): stop keeping it.
        if self.done.as_ref().is_some_and(oneshot::Sender::is_closed) {
            return self.give_up(Teed::Failed);
        }
        if self.buf.len() + data.len() > self.limit {
            return self.give_up(Teed::OverLimit);
        }
        if !self.reservation.try_grow(data.len()) {
            return self.give_up(Teed::OverBudget);
        }
        self.buf.extend_from_slice(data);
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tee<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.copy(data);
                }
                // Hyper stops polling once `is_end_stream` says so, without a final `None`.
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => this.give_up(Teed::Failed),
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn reservation(max: usize) -> (Arc<MemoryBudget>, Arc<Reservation>) {
        let budget = Arc::new(MemoryBudget::new(max));
        (budget.clone(), Reservation::new(budget))
    }

    type Frames = std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>;

    fn chunks(parts: &[&'static str]) -> StreamBody<futures_util::stream::Iter<Frames>> {
        let frames: Vec<_> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn passes_through_and_copies() {
        let (budget, r) = reservation(1024);
        let (tee, rx) = Tee::new(chunks(&["ab", "cd", "ef"]), 100, r);
        let out = tee.collect().await.unwrap().to_bytes();
        assert_eq!(out, "abcdef");
        match rx.await.unwrap() {
            Teed::Complete(b) => assert_eq!(b, "abcdef"),
            other => panic!("{other:?}"),
        }
        assert_eq!(budget.used(), 0, "released with the reservation");
    }

    #[tokio::test]
    async fn over_limit_still_passes_everything_through() {
        let (_, r) = reservation(1024);
        let (tee, rx) = Tee::new(chunks(&["abcd", "efgh"]), 6, r);
        assert_eq!(tee.collect().await.unwrap().to_bytes(), "abcdefgh");
        assert!(matches!(rx.await.unwrap(), Teed::OverLimit));
    }

    #[tokio::test]
    async fn known_size_over_limit_gives_up_at_once() {
        let (_, r) = reservation(1024);
        let (_tee, rx) = Tee::new(Full::new(Bytes::from_static(b"0123456789")), 4, r);
        assert!(matches!(rx.await.unwrap(), Teed::OverLimit));
    }

    #[tokio::test]
    async fn empty_body_completes_without_polling() {
        let (_, r) = reservation(1024);
        let (_tee, rx) = Tee::new(http_body_util::Empty::<Bytes>::new(), 4, r);
        assert!(matches!(rx.await.unwrap(), Teed::Complete(b) if b.is_empty()));
    }

    #[tokio::test]
    async fn budget_exhaustion_is_reported() {
        let (budget, r) = reservation(5);
        let (tee, rx) = Tee::new(chunks(&["abc", "def"]), 100, r);
        assert_eq!(tee.collect().await.unwrap().to_bytes(), "abcdef");
        assert!(matches!(rx.await.unwrap(), Teed::OverBudget));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn dropped_tee_reports_nothing() {
        let (_, r) = reservation(1024);
        let (tee, rx) = Tee::new(chunks(&["abc"]), 100, r);
        drop(tee);
        assert!(rx.await.is_err());
    }
}
