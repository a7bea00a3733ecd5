//! A request body on its way upstream: the client's own streaming body, one attempt's
//! view of a body kept for retries, or nothing. It records when it has been sent to the
//! end: an HTTP/1 connection may only be reused once both its request and its response
//! are complete.

use super::replay::ReplayBody;
use super::source::{BoxError, ClientBody, Source};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

enum Inner {
    Empty,
    Stream(Source),
    /// One attempt's copy of a body kept for retries.
    Replay(ReplayBody),
}

pub struct RequestBody {
    inner: Inner,
    ended: Arc<AtomicBool>,
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.inner {
            Inner::Empty => "empty",
            Inner::Stream(_) => "stream",
            Inner::Replay(_) => "replay",
        };
        f.debug_struct("RequestBody").field("kind", &kind).finish()
    }
}

impl RequestBody {
    pub fn empty() -> Self {
        Self {
            inner: Inner::Empty,
            ended: Arc::new(AtomicBool::new(true)),
        }
    }

    pub fn new(source: Source) -> Self {
        let ended = Arc::new(AtomicBool::new(source.is_end_stream()));
        Self {
            inner: Inner::Stream(source),
            ended,
        }
    }

    pub fn replay(body: ReplayBody) -> Self {
        let ended = Arc::new(AtomicBool::new(body.is_end_stream()));
        Self {
            inner: Inner::Replay(body),
            ended,
        }
    }

    /// The client's body, to be kept for replays; the body itself back if it is empty or
    /// is already a replay.
    pub fn into_source(self) -> Result<Source, RequestBody> {
        match self.inner {
            Inner::Stream(s) => Ok(s),
            inner => Err(RequestBody {
                inner,
                ended: self.ended,
            }),
        }
    }

    /// The replay this body reads from, if it is one: its attempt id.
    pub fn replay_id(&self) -> Option<u64> {
        match &self.inner {
            Inner::Replay(r) => Some(r.id()),
            _ => None,
        }
    }

    /// Set once the whole body has been read from the client.
    pub fn ended(&self) -> Arc<AtomicBool> {
        self.ended.clone()
    }

    /// A body still to come whose length was not announced: HTTP/1 must frame it as
    /// chunked.
    pub fn is_streaming(&self) -> bool {
        !self.is_end_stream() && self.size_hint().exact().is_none()
    }
}

/// A client's body: an HTTP/2 one is read to its end if the proxy drops it early
/// (`ClientBody`).
impl From<ClientBody> for RequestBody {
    fn from(b: ClientBody) -> Self {
        Self::new(Source::Client(b))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = match &mut this.inner {
            Inner::Empty => return Poll::Ready(None),
            Inner::Stream(b) => ready!(Pin::new(&mut *b).poll_frame(cx)),
            Inner::Replay(b) => ready!(Pin::new(&mut *b).poll_frame(cx)),
        };
        if frame.is_none() || this.is_end_stream() {
            this.ended.store(true, Ordering::Release);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Empty => true,
            Inner::Stream(b) => b.is_end_stream(),
            Inner::Replay(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Empty => SizeHint::with_exact(0),
            Inner::Stream(b) => b.size_hint(),
            Inner::Replay(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn ended_is_set_once_the_body_is_read_through() {
        let full = http_body_util::Full::new(Bytes::from_static(b"abc"));
        let body = RequestBody::new(Source::boxed(full.map_err(|e| match e {})));
        let ended = body.ended();
        assert!(!ended.load(Ordering::Acquire));
        assert!(!body.is_streaming(), "a known length is not chunked");
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"abc");
        assert!(ended.load(Ordering::Acquire));
        assert!(RequestBody::empty().ended().load(Ordering::Acquire));
    }
}
