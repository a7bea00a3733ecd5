//! Where a request body comes from: the client's connection (hyper's `Incoming`), or,
//! in tests and replays of other kinds, any body. A client's HTTP/2 body left unread
//! (the proxy answered without it) is read to its end in the background, briefly, so
//! that its stream closes cleanly instead of being reset.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long an unread HTTP/2 request body is still read after it was dropped: the rest
/// of a small body (a gRPC message, a form) is on the wire by then, and h2 itself
/// remembers a reset stream for no longer (its `reset_stream_duration`).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// What is read of it at most: the stream's window on the serving side, all a peer may
/// have sent before learning of the answer. A bigger body is reset, as before.
const DRAIN_MAX: usize = 256 * 1024;

pub enum Source {
    Incoming(ClientBody),
    Boxed(BoxBody<Bytes, BoxError>),
}

/// The body of a client's request, as hyper hands it over.
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
pub struct ClientBody {
    body: Option<Incoming>,
    drain: bool,
}

impl ClientBody {
    /// `http2`: the body of an HTTP/2 stream, read to its end when dropped early.
    pub fn new(body: Incoming, http2: bool) -> Self {
        Self {
            body: Some(body),
            drain: http2,
        }
    }

    fn get(&mut self) -> &mut Incoming {
        self.body.as_mut().expect("a body until dropped")
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        let Some(mut body) = self.body.take() else {
            return;
        };
        if !self.drain || body.is_end_stream() {
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
            Source::Incoming(b) => Pin::new(b.get()).poll_frame(cx).map_err(Into::into),
            Source::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Source::Incoming(b) => b.body.as_ref().is_none_or(Body::is_end_stream),
            Source::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Source::Incoming(b) => b
                .body
                .as_ref()
                .map_or_else(SizeHint::default, Body::size_hint),
            Source::Boxed(b) => b.size_hint(),
        }
    }
}
