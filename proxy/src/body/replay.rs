//! Request bodies a retry can send again. The body streams to the first attempt as it
//! arrives and is kept, chunk by chunk (`Bytes` are shared, not copied), up to a cap;
//! a later attempt reads the kept chunks and then goes on pulling from the client. A
//! body that outgrows the cap stops being kept, and from then on only the attempt
//! that outgrew it may read on: the request can no longer be retried.
//!
//! Only the latest attempt reads: an upstream that answered early (a 503 before the
//! body was read), or an attempt that timed out, can leave its connection still
//! reading the old attempt's body when the next attempt starts. The old body then
//! fails at its next read, so that its upstream sees an aborted request (a reset, or a
//! connection closed mid-message), never a complete-looking one to act on.

use super::source::{BoxError, Source};
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

struct Shared {
    source: Option<Source>,
    /// What the client has sent so far, while it is kept.
    chunks: Vec<Bytes>,
    kept: usize,
    max: usize,
    trailers: Option<HeaderMap>,
    /// The client's body has ended (after its trailers, if any).
    ended: bool,
    /// Reading the client's body failed: every attempt fails with it.
    failed: Option<String>,
    /// Chunks are no longer kept (the cap was passed, or the request will not be
    /// retried): only this attempt may read past the kept chunks.
    owner: Option<u64>,
    /// The size the client announced, if it did.
    exact: Option<u64>,
    next_id: u64,
    /// Attempts waiting for the client, woken when a newer attempt supersedes them or
    /// one of them goes away (so that none waits on a waker another replaced).
    waiting: Vec<(u64, Waker)>,
}

impl Shared {
    fn wake_all(&mut self) {
        for (_, w) in self.waiting.drain(..) {
            w.wake();
        }
    }
}

/// A request body that can be read again by later attempts.
#[derive(Clone)]
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
}

impl Replay {
    /// Keeps up to `max` bytes of `source` for replays.
    pub fn new(source: Source, max: usize) -> Replay {
        let exact = source.size_hint().exact();
        Replay {
            shared: Arc::new(Mutex::new(Shared {
                source: Some(source),
                chunks: Vec::new(),
                kept: 0,
                max,
                trailers: None,
                ended: false,
                failed: None,
                owner: None,
                exact,
                next_id: 0,
                waiting: Vec::new(),
            })),
        }
    }

    /// A body for the next attempt, reading from the start; None once the body can no
    /// longer be replayed.
    pub fn body(&self) -> Option<ReplayBody> {
        let mut s = self.shared.lock();
        if s.owner.is_some() {
            return None;
        }
        let id = s.next_id;
        s.next_id += 1;
        // The attempts before this one fail at their next read.
        s.wake_all();
        Some(ReplayBody {
            shared: self.shared.clone(),
            id,
            pos: 0,
            sent: 0,
            trailers_sent: false,
        })
    }

    /// Whether another attempt could still read the whole body.
    pub fn replayable(&self) -> bool {
        self.shared.lock().owner.is_none()
    }

    /// No attempt will follow `body`'s: stop keeping chunks.
    pub fn commit(&self, body_id: u64) {
        let mut s = self.shared.lock();
        if s.owner.is_none() {
            s.owner = Some(body_id);
        }
    }
}

/// One attempt's view of a replayable body.
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    id: u64,
    /// The next kept chunk to read.
    pos: usize,
    /// Bytes this attempt has read.
    sent: u64,
    trailers_sent: bool,
}

impl ReplayBody {
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut guard = this.shared.lock();
        let s = &mut *guard;
        if this.id + 1 != s.next_id {
            return Poll::Ready(Some(Err(
                "the request was sent again: this attempt is abandoned".into(),
            )));
        }
        if let Some(chunk) = s.chunks.get(this.pos) {
            let chunk = chunk.clone();
            this.pos += 1;
            this.sent += chunk.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(why) = &s.failed {
            return Poll::Ready(Some(Err(why.clone().into())));
        }
        if s.ended {
            if !this.trailers_sent
                && let Some(t) = &s.trailers
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => {
                s.waiting.retain(|(id, _)| *id != this.id);
                s.waiting.push((this.id, cx.waker().clone()));
                Poll::Pending
            }
            Poll::Ready(None) => {
                s.ended = true;
                s.source = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.failed = Some(format!("reading the request body failed: {e}"));
                s.source = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        this.sent += data.len() as u64;
                        if s.owner.is_none() && s.kept + data.len() <= s.max {
                            s.kept += data.len();
                            s.chunks.push(data.clone());
                            this.pos += 1;
                        } else if s.owner.is_none() {
                            // Too big to keep: this attempt reads on alone.
                            s.owner = Some(this.id);
                            s.chunks = Vec::new();
                            this.pos = 0;
                        }
                        Frame::data(data)
                    }
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            s.trailers = Some(t.clone());
                            s.ended = true;
                            s.source = None;
                            this.trailers_sent = true;
                        }
                        frame
                    }
                };
                if s.source.as_ref().is_some_and(|b| b.is_end_stream()) {
                    s.ended = true;
                    s.source = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock();
        s.ended && self.pos >= s.chunks.len() && (s.trailers.is_none() || self.trailers_sent)
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.shared.lock();
        if let Some(exact) = s.exact {
            return SizeHint::with_exact(exact.saturating_sub(self.sent));
        }
        let buffered: u64 = s.chunks.iter().skip(self.pos).map(|c| c.len() as u64).sum();
        if s.ended {
            SizeHint::with_exact(buffered)
        } else {
            let mut h = SizeHint::new();
            h.set_lower(buffered);
            h
        }
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.waiting.retain(|(id, _)| *id != self.id);
        // Whoever still waits registers with the client's body again.
        s.wake_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A client body fed by hand.
    pub(crate) struct ChannelBody(pub mpsc::Receiver<Result<Frame<Bytes>, BoxError>>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx)
        }
    }

    fn client() -> (mpsc::Sender<Result<Frame<Bytes>, BoxError>>, Source) {
        let (tx, rx) = mpsc::channel(16);
        (tx, Source::boxed(ChannelBody(rx)))
    }

    async fn collect(b: ReplayBody) -> Result<(Vec<u8>, Option<HeaderMap>), BoxError> {
        let c = b.collect().await?;
        let trailers = c.trailers().cloned();
        Ok((c.to_bytes().to_vec(), trailers))
    }

    #[tokio::test]
    async fn a_second_attempt_reads_what_the_first_read_then_the_rest() {
        let (tx, source) = client();
        let replay = Replay::new(source, 1024);
        let mut first = replay.body().unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"hello "))))
            .await
            .unwrap();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "hello ");
        // The first attempt failed; the second starts over.
        drop(first);
        let second = replay.body().unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"world"))))
            .await
            .unwrap();
        let mut t = HeaderMap::new();
        t.insert("x-sum", "1".parse().unwrap());
        tx.send(Ok(Frame::trailers(t))).await.unwrap();
        drop(tx);
        let (bytes, trailers) = collect(second).await.unwrap();
        assert_eq!(bytes, b"hello world");
        assert_eq!(trailers.unwrap()["x-sum"], "1");
        // And a third, after the client is done, from the kept copy alone.
        let (bytes, trailers) = collect(replay.body().unwrap()).await.unwrap();
        assert_eq!(bytes, b"hello world");
        assert!(trailers.is_some());
    }

    #[tokio::test]
    async fn an_abandoned_attempt_fails_instead_of_ending_early() {
        let (tx, source) = client();
        let replay = Replay::new(source, 1024);
        let mut old = replay.body().unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"half"))))
            .await
            .unwrap();
        assert_eq!(
            old.frame().await.unwrap().unwrap().into_data().unwrap(),
            "half"
        );
        // The old attempt waits for more; a retry starts.
        let old_reader = tokio::spawn(async move { old.frame().await.map(|f| f.is_err()) });
        tokio::task::yield_now().await;
        let new = replay.body().unwrap();
        let abandoned = tokio::time::timeout(std::time::Duration::from_secs(5), old_reader)
            .await
            .expect("the waiting attempt is woken")
            .unwrap();
        assert_eq!(
            abandoned,
            Some(true),
            "it fails, so its upstream never sees a whole body"
        );
        tx.send(Ok(Frame::data(Bytes::from_static(b" and the rest"))))
            .await
            .unwrap();
        drop(tx);
        assert_eq!(collect(new).await.unwrap().0, b"half and the rest");
    }

    #[tokio::test]
    async fn a_dropped_attempt_wakes_the_one_still_waiting() {
        let (tx, source) = client();
        let replay = Replay::new(source, 1024);
        let mut older = replay.body().unwrap();
        let mut newer = replay.body().unwrap();
        // The newer attempt waits on the client's body.
        let mut waiting = std::pin::pin!(newer.frame());
        assert!(waiting.as_mut().now_or_never().is_none());
        // The older one polls last (and fails: it is abandoned), then goes away.
        assert!(older.frame().await.unwrap().is_err());
        drop(older);
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the waiting attempt is woken");
        assert_eq!(got.unwrap().unwrap().into_data().unwrap(), "x");
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_never_replayed() {
        let (tx, source) = client();
        let replay = Replay::new(source, 8);
        let mut first = replay.body().unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"12345"))))
            .await
            .unwrap();
        first.frame().await.unwrap().unwrap();
        assert!(replay.replayable());
        tx.send(Ok(Frame::data(Bytes::from_static(b"67890"))))
            .await
            .unwrap();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(
            f.into_data().unwrap(),
            "67890",
            "the first attempt still gets every byte"
        );
        assert!(!replay.replayable());
        assert!(replay.body().is_none());
        drop(tx);
        assert!(first.frame().await.is_none());
    }

    #[tokio::test]
    async fn the_announced_size_is_kept_for_each_attempt() {
        let body = http_body_util::Full::new(Bytes::from_static(b"0123456789"));
        let replay = Replay::new(Source::boxed(body.map_err(|e| match e {})), 64);
        let first = replay.body().unwrap();
        assert_eq!(first.size_hint().exact(), Some(10));
        assert_eq!(collect(first).await.unwrap().0, b"0123456789");
        let second = replay.body().unwrap();
        assert_eq!(second.size_hint().exact(), Some(10));
        assert_eq!(collect(second).await.unwrap().0, b"0123456789");
    }

    #[tokio::test]
    async fn committing_stops_other_attempts() {
        let (tx, source) = client();
        let replay = Replay::new(source, 1024);
        let a = replay.body().unwrap();
        replay.commit(a.id());
        assert!(replay.body().is_none());
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        drop(tx);
        assert_eq!(collect(a).await.unwrap().0, b"x");
    }
}
