//! Where a request body comes from: the client's connection (hyper's `Incoming` for
//! HTTP/1, the stream itself for HTTP/2), or, in tests and replays of other kinds, any
//! body. A client's HTTP/2 body left unread (the proxy answered without it) is read to
//! its end in the background, briefly, so that its stream closes cleanly instead of
//! being reset.

use super::h2::RecvBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

pub use super::BoxError;

/// How long an unread HTTP/2 request body is still read after it was dropped: the rest
/// of a small body (a gRPC message, a form) is on the wire by then, and h2 itself
/// remembers a reset stream for no longer (its `reset_stream_duration`).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// What is read of it at most: the stream's window on the serving side, all a peer may
/// have sent before learning of the answer. A bigger body is reset, as before.
const DRAIN_MAX: usize = 256 * 1024;

pub enum Source {
    Client(ClientBody),
    Boxed(BoxBody<Bytes, BoxError>),
}

/// The body of a client's request.
///
/// An HTTP/2 body dropped before its end (the request was answered without it: a rate
/// limit, a shed, a fault, an upstream that answered early) would make h2 reset the
/// stream (RST_STREAM NO_ERROR, RFC 9113 8.1). The client's DATA already in flight
/// then lands on a stream h2 may have forgotten (it remembers 50 resets for a second),
/// and each such frame counts as a protocol error of the client's: past the server's
/// budget (`max_local_error_reset_streams`) the whole connection is sent away with
/// ENHANCE_YOUR_CALM — on the mesh hop, every request in flight from that client's
/// proxy fails with it. So the rest of the body is read in the background instead,
/// within `DRAIN_TIMEOUT` and `DRAIN_MAX`, and the stream ends as the client ends it.
pub struct ClientBody(Client);

enum Client {
    Empty,
    Http1(Incoming),
    Http2(RecvBody),
}

impl ClientBody {
    pub fn http1(body: Incoming) -> Self {
        Self(Client::Http1(body))
    }

    /// An HTTP/2 stream's body, read to its end when dropped early.
    pub fn http2(body: RecvBody) -> Self {
        Self(Client::Http2(body))
    }

    /// None (a CONNECT's: its stream becomes the tunnel).
    pub fn empty() -> Self {
        Self(Client::Empty)
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        let Client::Http2(mut body) = std::mem::replace(&mut self.0, Client::Empty) else {
            return;
        };
        if body.is_end_stream() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let drained = async {
                let mut read = 0;
                while let Some(Ok(frame)) = body.frame().await {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > DRAIN_MAX {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, drained).await;
        });
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Client::Empty => Poll::Ready(None),
            Client::Http1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Client::Http2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Client::Empty => true,
            Client::Http1(b) => b.is_end_stream(),
            Client::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Client::Empty => SizeHint::with_exact(0),
            Client::Http1(b) => b.size_hint(),
            Client::Http2(b) => b.size_hint(),
        }
    }
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
            Source::Client(b) => Pin::new(b).poll_frame(cx),
            Source::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Source::Client(b) => b.is_end_stream(),
            Source::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Source::Client(b) => b.size_hint(),
            Source::Boxed(b) => b.size_hint(),
        }
    }
}
