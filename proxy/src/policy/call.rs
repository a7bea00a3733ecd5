//! What passes through the policy layers: a `Call` (one attempt's request, and the
//! endpoint picked for it) goes down; an `Answer` (the endpoint's response) or a
//! `Failure` comes back up.

use super::limit::Permit;
use crate::addrs::EndpointAddr;
use crate::balance::EndpointState;
use crate::endpoint::{Checkin, Peer, SendError};
use crate::http::body::RequestBody;
use http::{Request, Response};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Duration;

pub struct Call {
    pub req: Request<RequestBody>,
    /// The endpoint for this attempt, once the balancer has picked it.
    pub endpoint: Option<Arc<EndpointState>>,
    /// The endpoints earlier attempts of the request went to.
    pub tried: Vec<EndpointAddr>,
    /// Where the application was sending the request (its original destination), used
    /// while discovery knows no endpoint.
    pub fallback: Option<EndpointAddr>,
}

impl Call {
    pub fn new(req: Request<RequestBody>) -> Call {
        Call {
            req,
            endpoint: None,
            tried: Vec::new(),
            fallback: None,
        }
    }

    pub fn with_fallback(mut self, fallback: Option<EndpointAddr>) -> Call {
        self.fallback = fallback;
        self
    }

    pub fn endpoint_addr(&self) -> Option<EndpointAddr> {
        self.endpoint.as_ref().map(|e| e.addr)
    }
}

/// An endpoint's response. `B` is the response body (hyper's, except in tests).
pub struct Answer<B = Incoming> {
    pub rsp: Response<B>,
    /// The HTTP/1 connection it came on, to pool again once its body is read.
    pub checkin: Option<Checkin>,
    /// The proxy that answered, over mTLS.
    pub peer: Peer,
    pub endpoint: Option<EndpointAddr>,
    /// The destination's concurrency slot, held until the response body ends.
    pub permit: Option<Permit>,
    /// How many times the request was retried.
    pub retries: u32,
    /// When the request timeout ends: the response body must be done by then.
    pub deadline: Option<tokio::time::Instant>,
}

impl<B> Answer<B> {
    pub fn new(rsp: Response<B>, endpoint: Option<EndpointAddr>) -> Self {
        Answer {
            rsp,
            checkin: None,
            peer: None,
            endpoint,
            permit: None,
            retries: 0,
            deadline: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Nothing reached the endpoint (the connection failed, or closed before the
    /// request went out): the request comes back, to try elsewhere.
    #[error("{error}")]
    Unsent {
        error: SendError,
        req: Box<Request<RequestBody>>,
        endpoint: Option<EndpointAddr>,
    },
    /// The request went out and no response came back: the stream was reset or
    /// refused, or the connection broke.
    #[error("{error}")]
    Lost {
        error: SendError,
        /// The peer refused the stream (HTTP/2 REFUSED_STREAM): it did not process it.
        refused: bool,
        endpoint: Option<EndpointAddr>,
    },
    /// The client's side failed (its request body broke off): nothing to retry, and
    /// not the endpoint's doing.
    #[error("the client's request failed: {error}")]
    Client { error: SendError },
    #[error("attempt on {} timed out after {after:?} (GOFE_PER_TRY_TIMEOUT)", endpoint.map(|e| e.to_string()).unwrap_or_default())]
    TryTimeout {
        after: Duration,
        endpoint: Option<EndpointAddr>,
    },
    #[error("request timed out after {after:?} (GOFE_REQUEST_TIMEOUT)")]
    Timeout { after: Duration },
    #[error("{destination} has {limit} requests in flight (GOFE_MAX_CONCURRENT_REQUESTS)")]
    Overloaded { destination: Arc<str>, limit: usize },
    #[error("no endpoints for {destination}")]
    NoEndpoints { destination: Arc<str> },
}

impl Failure {
    /// The endpoint the failed attempt went to, if one was picked.
    pub fn endpoint(&self) -> Option<EndpointAddr> {
        match self {
            Failure::Unsent { endpoint, .. }
            | Failure::Lost { endpoint, .. }
            | Failure::TryTimeout { endpoint, .. } => *endpoint,
            _ => None,
        }
    }
}

/// A boxed layer future.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;
