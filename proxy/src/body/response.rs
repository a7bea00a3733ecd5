//! A response body on its way to the client: the upstream's streaming body, or one the
//! proxy wrote itself. When it ends (read through, broken off, or dropped) its end hook
//! runs once with the final status, the gRPC status read from the trailers, and whether
//! it was read to the end: that is where a request is counted and its span ended. The
//! request timeout can still be running while the body streams: the body is then cut
//! off (gRPC clients get DEADLINE_EXCEEDED in trailers).

use super::source::BoxError;
use crate::proto::grpc;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

/// What runs when a response ends.
pub trait EndHook: Send + Unpin + 'static {
    fn ended(self, end: Ended);
}

/// How a response ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ended {
    pub status: StatusCode,
    /// From the trailers, or from the headers of a trailers-only gRPC response.
    pub grpc_status: Option<u16>,
    /// The body was read to its end (not broken off, not dropped half-way).
    pub completed: bool,
}

/// No hook: nothing runs.
impl EndHook for () {
    fn ended(self, _: Ended) {}
}

/// A hook and what it will be told.
pub struct OnEnd<H> {
    hook: H,
    status: StatusCode,
    grpc: bool,
    grpc_status: Option<u16>,
}

impl<H: EndHook> OnEnd<H> {
    /// A response with `status` and `headers`; `grpc` when the request was gRPC, whose
    /// status is then read from the trailers (or these headers).
    pub fn new(hook: H, status: StatusCode, grpc: bool, headers: &HeaderMap) -> Self {
        Self {
            hook,
            status,
            grpc,
            grpc_status: if grpc { grpc::status(headers) } else { None },
        }
    }

    fn trailers(&mut self, trailers: &HeaderMap) {
        if self.grpc
            && let Some(s) = grpc::status(trailers)
        {
            self.grpc_status = Some(s);
        }
    }

    fn run(self, completed: bool) {
        self.hook.ended(Ended {
            status: self.status,
            grpc_status: self.grpc_status,
            completed,
        });
    }
}

enum Inner<B> {
    Upstream(B),
    /// A response the proxy wrote itself.
    Full(Option<Bytes>),
}

pub struct ResponseBody<B, H>
where
    B: Body<Data = Bytes> + Unpin,
    H: EndHook,
{
    inner: Inner<B>,
    on_end: Option<OnEnd<H>>,
    /// The request timeout, still running while the body streams.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B, H> ResponseBody<B, H>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    H: EndHook,
{
    pub fn upstream(body: B, on_end: OnEnd<H>) -> Self {
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

    pub fn full(bytes: impl Into<Bytes>, on_end: Option<OnEnd<H>>) -> Self {
        let bytes = bytes.into();
        Self {
            inner: Inner::Full((!bytes.is_empty()).then_some(bytes)),
            on_end,
            deadline: None,
        }
    }

    /// Cuts the body off at `deadline` (the request timeout), if it has not ended.
    pub fn with_deadline(mut self, deadline: Option<tokio::time::Instant>) -> Self {
        if !self.inner_is_end() {
            self.deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        }
        self
    }
}

impl<B, H> ResponseBody<B, H>
where
    B: Body<Data = Bytes> + Unpin,
    H: EndHook,
{
    fn inner_is_end(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Full(b) => b.is_none(),
        }
    }

    fn finish(&mut self, completed: bool) {
        if let Some(on_end) = self.on_end.take() {
            on_end.run(completed);
        }
    }
}

impl<B, H> Drop for ResponseBody<B, H>
where
    B: Body<Data = Bytes> + Unpin,
    H: EndHook,
{
    fn drop(&mut self) {
        let ended = self.inner_is_end();
        self.finish(ended);
    }
}

const TIMED_OUT: &str = "the request timed out (GOFE_REQUEST_TIMEOUT) while its response streamed";

impl<B, H> Body for ResponseBody<B, H>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    H: EndHook,
{
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
            let grpc = this.on_end.as_ref().is_some_and(|o| o.grpc);
            if grpc {
                // A gRPC client is told so in the trailers: DEADLINE_EXCEEDED.
                if let Some(o) = this.on_end.as_mut() {
                    o.grpc_status = Some(grpc::DEADLINE_EXCEEDED);
                }
                this.finish(false);
                let mut t = HeaderMap::new();
                t.insert("grpc-status", grpc::DEADLINE_EXCEEDED.into());
                t.insert("grpc-message", HeaderValue::from_static(TIMED_OUT));
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            // Anyone else sees the response cut off (a reset, or the connection closed).
            this.finish(false);
            return Poll::Ready(Some(Err(TIMED_OUT.into())));
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
    use http_body_util::{BodyExt, Empty};
    use std::sync::{Arc, Mutex};

    /// Records how the response ended.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<Ended>>>);

    impl EndHook for Seen {
        fn ended(self, end: Ended) {
            self.0.lock().unwrap().push(end);
        }
    }

    type Full = ResponseBody<Empty<Bytes>, Seen>;

    #[tokio::test]
    async fn a_full_body_ends_once_at_its_end() {
        let seen = Seen::default();
        let on_end = OnEnd::new(
            seen.clone(),
            StatusCode::BAD_GATEWAY,
            false,
            &HeaderMap::new(),
        );
        let body = Full::full("oops", Some(on_end));
        assert!(seen.0.lock().unwrap().is_empty());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"oops");
        let ended = seen.0.lock().unwrap().clone();
        assert_eq!(
            ended,
            vec![Ended {
                status: StatusCode::BAD_GATEWAY,
                grpc_status: None,
                completed: true
            }]
        );
    }

    #[test]
    fn a_trailers_only_grpc_status_comes_from_the_headers() {
        let seen = Seen::default();
        let mut h = HeaderMap::new();
        h.insert("grpc-status", "14".parse().unwrap());
        drop(Full::full(
            Bytes::new(),
            Some(OnEnd::new(seen.clone(), StatusCode::OK, true, &h)),
        ));
        assert_eq!(seen.0.lock().unwrap()[0].grpc_status, Some(14));
    }

    #[tokio::test(start_paused = true)]
    async fn the_request_timeout_cuts_a_streaming_body_with_grpc_trailers() {
        let seen = Seen::default();
        let (_tx, body) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = http_body_util::StreamBody::new(tokio_stream_from(body));
        let on_end = OnEnd::new(seen.clone(), StatusCode::OK, true, &HeaderMap::new());
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(100);
        let mut b = ResponseBody::upstream(stream, on_end).with_deadline(Some(deadline));
        let frame = b.frame().await.unwrap().unwrap();
        let trailers = frame.into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "4");
        let ended = seen.0.lock().unwrap()[0];
        assert_eq!(ended.grpc_status, Some(grpc::DEADLINE_EXCEEDED));
        assert!(!ended.completed);
    }

    /// A stream of frames from a channel, without another dependency.
    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
