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
        if n > 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

/// Bytes held by one shadow (its copy of the request body, the authority's answer once its
/// tee hands it over, the shadow side's answers), given back when the shadow ends
/// ([`Reservation::close`], which its ticket calls), not when the last tee pointing at it is
/// dropped: the client's answer can stream on long after the shadow has ended (an answer over
/// the body limit, a slow client, a stream that never ends), and bytes nobody holds any more
/// would keep other requests from being mirrored all that time. A tee counts the copy it is
/// still making itself, in the budget, until it hands it over or drops it.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    /// Bytes held, or [`CLOSED`] once the shadow has ended.
    held: AtomicUsize,
}

/// [`Reservation::held`] once the shadow has ended: it takes no more bytes.
const CLOSED: usize = usize::MAX;

impl Reservation {
    pub fn new(budget: Arc<MemoryBudget>) -> Arc<Self> {
        Arc::new(Self {
            budget,
            held: AtomicUsize::new(0),
        })
    }

    /// Reserves `n` more bytes for the shadow; false when the budget is exhausted or the
    /// shadow has ended.
    pub fn try_grow(&self, n: usize) -> bool {
        self.budget.try_reserve(n) && self.adopt(n)
    }

    /// Takes over `n` bytes already reserved in the budget (a tee's finished copy). Once the
    /// shadow has ended, nobody will hold them: they go back at once, and the answer is false.
    fn adopt(&self, n: usize) -> bool {
        let adopted = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                if held == CLOSED {
                    return None;
                }
                held.checked_add(n).filter(|&total| total != CLOSED)
            })
            .is_ok();
        if !adopted {
            self.budget.release(n);
        }
        adopted
    }

    /// The shadow has ended: its bytes go back to the budget now, and it takes no more.
    pub fn close(&self) {
        let held = self.held.swap(CLOSED, Ordering::AcqRel);
        if held != CLOSED {
            self.budget.release(held);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.close();
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
            let copy = std::mem::take(&mut self.buf).freeze();
            // The copy's bytes are the shadow's from now on (given back when it ends).
            self.reservation.adopt(copy.len());
            let _ = tx.send(Teed::Complete(copy));
        }
    }

    fn give_up(&mut self, why: Teed) {
        // The copy is dropped: so are the bytes it held in the budget.
        self.release_copy();
        if let Some(tx) = self.done.take() {
            let _ = tx.send(why);
        }
    }

    /// Drops the copy made so far and gives its bytes back.
    fn release_copy(&mut self) {
        self.reservation.budget.release(self.buf.len());
        self.buf = BytesMut::new();
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
        if !self.reservation.budget.try_reserve(data.len()) {
            return self.give_up(Teed::OverBudget);
        }
        self.buf.extend_from_slice(data);
    }
}

impl<B> Drop for Tee<B> {
    /// A tee dropped before its body ended (a client that went away) gives its copy back.
    fn drop(&mut self) {
        self.reservation.budget.release(self.buf.len());
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

    /// The shadow ends while the body it was teeing streams on (the client's answer): what the
    /// shadow held goes back at once, the tee's own copy when the tee gives it up.
    #[tokio::test]
    async fn a_closed_reservation_gives_its_bytes_back_while_its_tee_lives_on() {
        let (budget, r) = reservation(1024);
        assert!(r.try_grow(100), "the shadow side's answer");
        let (mut tee, rx) = Tee::new(chunks(&["abc", "def"]), 100, r.clone());
        assert_eq!(
            tee.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
        assert_eq!(budget.used(), 103);
        drop(rx);
        r.close();
        assert_eq!(budget.used(), 3, "only the tee's copy is still held");
        assert!(!r.try_grow(1), "an ended shadow takes no more");
        assert_eq!(budget.used(), 3);
        assert_eq!(
            tee.frame().await.unwrap().unwrap().into_data().unwrap(),
            "def"
        );
        assert_eq!(budget.used(), 0, "the tee stopped copying for nobody");
        drop(tee);
        assert_eq!(budget.used(), 0);

        // A copy completed after the shadow ended is not kept either.
        let (budget, r) = reservation(1024);
        let (tee, _rx) = Tee::new(chunks(&["abc"]), 100, r.clone());
        r.close();
        assert_eq!(tee.collect().await.unwrap().to_bytes(), "abc");
        assert_eq!(budget.used(), 0);
        drop(r);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_tee_dropped_midway_gives_its_copy_back() {
        let (budget, r) = reservation(1024);
        let (mut tee, _rx) = Tee::new(chunks(&["abc", "def"]), 100, r.clone());
        tee.frame().await.unwrap().unwrap();
        assert_eq!(budget.used(), 3);
        drop(tee);
        assert_eq!(budget.used(), 0, "while the reservation lives on");
        drop(r);
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
