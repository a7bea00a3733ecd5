//! The body of a response from an endpoint. An HTTP/1 connection it came on goes back
//! to its pool once the body has been read to its end (and the request's body was sent
//! to its end); a body dropped half-way closes its connection instead. An HTTP/2 body
//! gives its stream's window back as it is read, and holds the stream's place on its
//! connection until it goes.

use super::pool::{Checkin, StreamSlot};
use crate::body::h2::RecvBody;
use crate::body::source::BoxError;
use bytes::Bytes;
use h2::{Reason, RecvStream};
use http::Response;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

pub struct UpstreamBody {
    inner: Inner,
    checkin: Option<Checkin>,
    /// An HTTP/2 stream counted against its connection's limit while the body lasts.
    _slot: Option<StreamSlot>,
}

enum Inner {
    Done,
    Http1(Incoming),
    Http2(RecvBody),
}

impl UpstreamBody {
    pub fn new(inner: Incoming, checkin: Option<Checkin>) -> Self {
        let mut b = Self {
            inner: Inner::Http1(inner),
            checkin,
            _slot: None,
        };
        b.release_if_ended();
        b
    }

    /// An HTTP/2 response, its body holding `slot` (its stream's place on its
    /// connection) until the body goes.
    pub fn http2(rsp: Response<RecvStream>, slot: StreamSlot) -> Response<UpstreamBody> {
        let (head, stream) = rsp.into_parts();
        let body = RecvBody::new(stream, &head.headers);
        Response::from_parts(
            head,
            Self {
                inner: Inner::Http2(body),
                checkin: None,
                _slot: Some(slot),
            },
        )
    }

    /// No body (a CONNECT tunnel's 200).
    pub fn empty() -> Self {
        Self {
            inner: Inner::Done,
            checkin: None,
            _slot: None,
        }
    }

    fn release_if_ended(&mut self) {
        if self.is_end_stream()
            && let Some(c) = self.checkin.take()
        {
            c.release();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.inner {
            Inner::Done => Poll::Ready(None),
            Inner::Http1(inner) => {
                let frame = ready!(Pin::new(inner).poll_frame(cx));
                match &frame {
                    // (A chunked body's end is only known from here: hyper's
                    // `is_end_stream` stays false.)
                    None => {
                        this.inner = Inner::Done;
                        this.release_if_ended();
                    }
                    Some(Ok(_)) => this.release_if_ended(),
                    Some(Err(_)) => this.checkin = None,
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Inner::Http2(body) => match ready!(Pin::new(body).poll_frame(cx)) {
                // RST_STREAM NO_ERROR: the endpoint answered in full and needs no more
                // of the request (RFC 9113 §8.1); the body ends here.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => {
                    this.inner = Inner::Done;
                    Poll::Ready(None)
                }
                frame => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Done => true,
            Inner::Http1(b) => b.is_end_stream(),
            Inner::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Done => SizeHint::with_exact(0),
            Inner::Http1(b) => b.size_hint(),
            Inner::Http2(b) => b.size_hint(),
        }
    }
}
