//! Leaf: why a request did not get a response from an endpoint, and the request itself
//! when it was never sent.

use crate::addrs::EndpointAddr;
use crate::body::request::RequestBody;
use crate::body::source::BoxError;
use crate::connect::error::ConnectError;
use http::Request;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: EndpointAddr,
        source: BoxError,
    },
    #[error("request to {addr} failed: {source}")]
    Http {
        addr: EndpointAddr,
        source: hyper::Error,
    },
    /// A failure of an HTTP/2 stream or connection (this side speaks `h2` directly).
    #[error("request to {addr} failed: {source}")]
    H2 {
        addr: EndpointAddr,
        source: h2::Error,
    },
    /// Every connection the pool may have to `addr` is at the stream limit.
    #[error(
        "every connection to {addr} carries {streams} streams (GOFE_HTTP2_MAX_CONCURRENT_STREAMS)"
    )]
    Busy { addr: EndpointAddr, streams: u32 },
}

impl SendError {
    /// Whether the failure came from the client's side: its request body failed (the
    /// client went away, or sent a broken body) while it was being sent.
    pub fn is_client_side(&self) -> bool {
        matches!(self, SendError::Http { source, .. } if source.is_user())
    }

    /// Whether the peer refused the stream, so that it was not processed: HTTP/2
    /// REFUSED_STREAM, or a stream cut by the peer's graceful GOAWAY (NO_ERROR) — h2
    /// fails that way only streams above the GOAWAY's last stream id and streams opened
    /// after it arrived, which the peer never processed (RFC 9113 §6.8). Found by the
    /// chaos case that stops a server's sidecar under load.
    pub fn is_refused_stream(&self) -> bool {
        // Only HTTP/2 refuses streams, and this side's HTTP/2 errors are h2's own.
        let SendError::H2 { source: h2, .. } = self else {
            return false;
        };
        h2.reason() == Some(h2::Reason::REFUSED_STREAM)
            || (h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR))
    }
}

/// A send that failed; the request comes back when it was never sent.
#[derive(Debug)]
pub struct SendFailure {
    pub error: SendError,
    pub unsent: Option<Box<Request<RequestBody>>>,
}

impl SendFailure {
    pub fn unsent(error: impl Into<SendError>, req: Box<Request<RequestBody>>) -> Self {
        Self {
            error: error.into(),
            unsent: Some(req),
        }
    }

    pub fn sent(error: SendError) -> Self {
        Self {
            error,
            unsent: None,
        }
    }
}
