//! The bodies the proxy passes on. Requests go upstream as the client's own streaming
//! body. Responses come back wrapped so that, when the body ends (or is dropped), the
//! request is counted with its final status, a gRPC status read from the trailers, and
//! the HTTP/1 connection goes back to its pool if the body was read to the end.

use super::observe::Observe;
use crate::endpoint::Checkin;
use crate::metrics::RequestStats;
use crate::policy::limit::Permit;
use crate::policy::replay::ReplayBody;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a request body comes from: the client's connection, or (tests, replays of
/// other kinds) any body.
pub enum Source {
    Incoming(Incoming),
    Boxed(BoxBody<Bytes, BoxError>),
}

impl Source {
    pub fn boxed<B>(body: B) -> Source
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        Source::Boxed(BoxBody::new(body.map_err(Into::into)))
    }
}

impl Body for Source {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Source::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Source::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Source::Incoming(b) => b.is_end_stream(),
            Source::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Source::Incoming(b) => b.size_hint(),
            Source::Boxed(b) => b.size_hint(),
        }
    }
}

enum RequestInner {
    Empty,
    Stream(Source),
    /// One attempt's copy of a body kept for retries.
    Replay(ReplayBody),
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.inner {
            RequestInner::Empty => "empty",
            RequestInner::Stream(_) => "stream",
            RequestInner::Replay(_) => "replay",
        };
        f.debug_struct("RequestBody").field("kind", &kind).finish()
    }
}

/// A request body on its way upstream. It records when it has been sent to the end:
/// an HTTP/1 connection may only be reused once both its request and its response are
/// complete.
pub struct RequestBody {
    inner: RequestInner,
    ended: Arc<AtomicBool>,
}

impl RequestBody {
    pub fn empty() -> Self {
        Self {
            inner: RequestInner::Empty,
            ended: Arc::new(AtomicBool::new(true)),
        }
    }

    pub fn new(source: Source) -> Self {
        let ended = Arc::new(AtomicBool::new(source.is_end_stream()));
        Self {
            inner: RequestInner::Stream(source),
            ended,
        }
    }

    pub fn replay(body: ReplayBody) -> Self {
        let ended = Arc::new(AtomicBool::new(body.is_end_stream()));
        Self {
            inner: RequestInner::Replay(body),
            ended,
        }
    }

    /// The client's body, to be kept for replays; None if this body is empty or is
    /// already a replay.
    pub fn into_source(self) -> Result<Source, RequestBody> {
        match self.inner {
            RequestInner::Stream(s) => Ok(s),
            inner => Err(RequestBody {
                inner,
                ended: self.ended,
            }),
        }
    }

    /// The replay this body reads from, if it is one: its attempt id.
    pub fn replay_id(&self) -> Option<u64> {
        match &self.inner {
            RequestInner::Replay(r) => Some(r.id()),
            _ => None,
        }
    }

    /// Set once the whole body has been read from the client.
    pub fn ended(&self) -> Arc<AtomicBool> {
        self.ended.clone()
    }
}

impl From<Incoming> for RequestBody {
    fn from(b: Incoming) -> Self {
        Self::new(Source::Incoming(b))
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
            RequestInner::Empty => return Poll::Ready(None),
            RequestInner::Stream(b) => ready!(Pin::new(&mut *b).poll_frame(cx)),
            RequestInner::Replay(b) => ready!(Pin::new(&mut *b).poll_frame(cx)),
        };
        if frame.is_none() || this.is_end_stream() {
            this.ended.store(true, Ordering::Release);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            RequestInner::Empty => true,
            RequestInner::Stream(b) => b.is_end_stream(),
            RequestInner::Replay(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            RequestInner::Empty => SizeHint::with_exact(0),
            RequestInner::Stream(b) => b.size_hint(),
            RequestInner::Replay(b) => b.size_hint(),
        }
    }
}

/// What happens when a response body ends: the request is counted, and the connection
/// it came on is released.
pub struct OnEnd {
    stats: Arc<RequestStats>,
    status: StatusCode,
    grpc: bool,
    grpc_status: Option<u16>,
    checkin: Option<Checkin>,
    /// The destination's concurrency slot, free once the response has ended.
    _permit: Option<Permit>,
    /// The request's start (for its latency), span and access log entry.
    observe: Option<Observe>,
}

impl OnEnd {
    pub fn new(
        stats: Arc<RequestStats>,
        status: StatusCode,
        grpc: bool,
        headers: &HeaderMap,
    ) -> Self {
        Self {
            stats,
            status,
            grpc,
            // A trailers-only gRPC response carries its status in the headers.
            grpc_status: if grpc { grpc_status(headers) } else { None },
            checkin: None,
            _permit: None,
            observe: None,
        }
    }

    /// The request's start, span and access log entry, finished with the response.
    pub(crate) fn with_observe(mut self, observe: Observe) -> Self {
        self.observe = Some(observe);
        self
    }

    pub fn with_permit(mut self, permit: Option<Permit>) -> Self {
        self._permit = permit;
        self
    }

    pub fn with_checkin(mut self, checkin: Option<Checkin>) -> Self {
        self.checkin = checkin;
        self
    }

    fn trailers(&mut self, trailers: &HeaderMap) {
        if self.grpc
            && let Some(s) = grpc_status(trailers)
        {
            self.grpc_status = Some(s);
        }
    }

    fn finish(self, read_to_end: bool) {
        self.stats.record(self.status, self.grpc_status);
        if let Some(observe) = self.observe {
            self.stats.latency.record(observe.started.elapsed());
            observe.finish(self.status.as_u16(), self.grpc_status, read_to_end);
        }
        if read_to_end && let Some(c) = self.checkin {
            c.release();
        }
    }
}

const GRPC_DEADLINE_EXCEEDED: u16 = 4;

pub fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

enum Inner {
    Upstream(Incoming),
    /// A response the proxy wrote itself.
    Full(Option<Bytes>),
}

/// A response body on its way to the client.
pub struct ResponseBody {
    inner: Inner,
    on_end: Option<OnEnd>,
    /// The request timeout, still running while the body streams: the body is cut
    /// off (the stream reset, or the connection closed) when it fires.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ResponseBody {
    pub fn upstream(body: Incoming, on_end: OnEnd) -> Self {
        let mut b = Self {
            inner: Inner::Upstream(body),
            on_end: Some(on_end),
            deadline: None,
        };
        // An empty body (204, HEAD, Content-Length: 0) may never be polled.
        if b.inner_is_end() {
            b.finish(true);
        }
        b
    }

    /// Cuts the body off at `deadline` (the request timeout), if it has not ended.
    pub fn with_deadline(mut self, deadline: Option<tokio::time::Instant>) -> Self {
        if !self.inner_is_end() {
            self.deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        }
        self
    }

    pub fn full(bytes: impl Into<Bytes>, on_end: Option<OnEnd>) -> Self {
        let bytes = bytes.into();
        Self {
            inner: Inner::Full((!bytes.is_empty()).then_some(bytes)),
            on_end,
            deadline: None,
        }
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new(), None)
    }

    fn inner_is_end(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Full(b) => b.is_none(),
        }
    }

    fn finish(&mut self, read_to_end: bool) {
        if let Some(on_end) = self.on_end.take() {
            on_end.finish(read_to_end);
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let ended = self.inner_is_end();
        self.finish(ended);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.deadline = None;
            // Nothing more comes from upstream (its connection is not reused).
            this.inner = Inner::Full(None);
            const WHY: &str =
                "the request timed out (GOFE_REQUEST_TIMEOUT) while its response streamed";
            let grpc = this.on_end.as_ref().is_some_and(|o| o.grpc);
            if grpc {
                // A gRPC client is told so in the trailers: DEADLINE_EXCEEDED.
                if let Some(o) = this.on_end.as_mut() {
                    o.grpc_status = Some(GRPC_DEADLINE_EXCEEDED);
                }
                this.finish(false);
                let mut t = HeaderMap::new();
                t.insert("grpc-status", GRPC_DEADLINE_EXCEEDED.into());
                t.insert("grpc-message", http::HeaderValue::from_static(WHY));
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            // Anyone else sees the response cut off (a reset, or the connection closed).
            this.finish(false);
            return Poll::Ready(Some(Err(WHY.into())));
        }
        let frame = match &mut this.inner {
            Inner::Full(b) => b.take().map(|b| Ok(Frame::data(b))),
            Inner::Upstream(b) => ready!(Pin::new(b).poll_frame(cx)).map(|f| f.map_err(Into::into)),
        };
        match &frame {
            Some(Ok(f)) => {
                if let (Some(t), Some(on_end)) = (f.trailers_ref(), this.on_end.as_mut()) {
                    on_end.trailers(t);
                }
                if this.inner_is_end() {
                    this.finish(true);
                }
            }
            Some(Err(_)) => this.finish(false),
            None => this.finish(true),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner_is_end()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn full_body_is_counted_once_at_its_end() {
        let stats = Arc::new(RequestStats::default());
        let on_end = OnEnd::new(
            stats.clone(),
            StatusCode::BAD_GATEWAY,
            false,
            &HeaderMap::new(),
        );
        let body = ResponseBody::full("oops", Some(on_end));
        assert_eq!(stats.total(), 0);
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"oops");
        assert_eq!(stats.counts(), vec![(502, None, 1)]);
    }

    #[test]
    fn trailers_only_grpc_status_comes_from_headers() {
        let stats = Arc::new(RequestStats::default());
        let mut h = HeaderMap::new();
        h.insert("grpc-status", "14".parse().unwrap());
        drop(ResponseBody::full(
            Bytes::new(),
            Some(OnEnd::new(stats.clone(), StatusCode::OK, true, &h)),
        ));
        assert_eq!(stats.counts(), vec![(200, Some(14), 1)]);
    }
}
