//! The body of a response from an endpoint. An HTTP/1 connection it came on goes back
//! to its pool once the body has been read to its end (and the request's body was sent
//! to its end); a body dropped half-way closes its connection instead.

use super::pool::{Checkin, StreamSlot};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

pub struct UpstreamBody {
    inner: Option<Incoming>,
    checkin: Option<Checkin>,
    /// An HTTP/2 stream counted against its connection's limit while the body lasts.
    _slot: Option<StreamSlot>,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, checkin: Option<Checkin>) -> Self {
        let mut b = Self {
            inner: Some(inner),
            checkin,
            _slot: None,
        };
        b.release_if_ended();
        b
    }

    /// No body (a CONNECT tunnel's 200).
    pub fn empty() -> Self {
        Self {
            inner: None,
            checkin: None,
            _slot: None,
        }
    }

    /// Holds `slot` (its stream's place on its connection) until the body goes.
    pub fn holding(mut self, slot: StreamSlot) -> Self {
        self._slot = Some(slot);
        self
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        match &frame {
            // (A chunked body's end is only known from here: hyper's `is_end_stream`
            // stays false.)
            None => {
                this.inner = None;
                this.release_if_ended();
            }
            Some(Ok(_)) => this.release_if_ended(),
            Some(Err(_)) => this.checkin = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}
