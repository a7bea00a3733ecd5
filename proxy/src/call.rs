//! Leaf: what passes through the stacks of layers. A `Call` (one attempt's request, and
//! the endpoint picked for it) goes down; an `Answer` (the endpoint's response, or a
//! connection) or a `Failure` comes back up. HTTP requests and connections of their
//! own (opaque TCP, tunnels, upgrades) travel the same layers as `Call<Request>` and
//! `Call<ConnectTo>`.

use crate::addrs::{ClientKey, EndpointAddr, OrigDstAddr};
use crate::body::request::RequestBody;
use crate::client::body::UpstreamBody;
use crate::client::error::SendError;
use crate::client::pool::Peer;
use crate::config::rules::Bucket;
use crate::endpoint::Endpoint;
use http::{Request, Response};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub struct Call<R> {
    pub req: R,
    /// The endpoint for this attempt, once the balancer has picked it (or, without a
    /// balancer, the one endpoint there is).
    pub endpoint: Option<Arc<Endpoint>>,
    /// The endpoints earlier attempts of the request went to.
    pub tried: Vec<EndpointAddr>,
    /// Where the application was sending the request, used while discovery knows no
    /// endpoint.
    pub orig_dst: Option<OrigDstAddr>,
    /// Who sent it, for rate limits per client (inbound).
    pub client: Option<ClientKey>,
    /// Set by the retry layer when only a refused stream could send this bodiless
    /// request again: the send path keeps a copy of its head while it goes over HTTP/2
    /// (nothing else refuses a stream) and gives the request back, unsent, if the
    /// stream is refused. Requests over HTTP/1 then carry no copy at all.
    pub resend_refused: bool,
}

impl<R> Call<R> {
    pub fn new(req: R) -> Call<R> {
        Call {
            req,
            endpoint: None,
            tried: Vec::new(),
            orig_dst: None,
            client: None,
            resend_refused: false,
        }
    }

    pub fn from_client(mut self, client: Option<ClientKey>) -> Call<R> {
        self.client = client;
        self
    }

    pub fn with_orig_dst(mut self, orig_dst: Option<OrigDstAddr>) -> Call<R> {
        self.orig_dst = orig_dst;
        self
    }

    pub fn to(mut self, endpoint: Arc<Endpoint>) -> Call<R> {
        self.endpoint = Some(endpoint);
        self
    }

    pub fn endpoint_addr(&self) -> Option<EndpointAddr> {
        self.endpoint.as_ref().map(|e| e.addr)
    }
}

/// The request is boxed once, so that every layer moves a pointer, not a `Request`.
pub type HttpCall = Call<Box<Request<RequestBody>>>;

/// A connection of its own to an endpoint, to carry what `alpn` names over mTLS.
#[derive(Clone, Copy, Debug)]
pub struct ConnectTo {
    pub alpn: &'static [u8],
}

pub type ConnectCall = Call<ConnectTo>;

/// An endpoint's answer: `T` is its response (or the connection made).
pub struct Answer<T> {
    pub value: T,
    /// The proxy that answered, over mTLS.
    pub peer: Peer,
    pub endpoint: Option<EndpointAddr>,
    /// The destination's concurrency slot, held until the response body ends.
    pub permit: Option<Permit>,
    /// How many times the request was retried.
    pub retries: u32,
    /// When the request timeout ends: the response body must be done by then.
    pub deadline: Option<tokio::time::Instant>,
    /// The route that took the request and the backend it went to, when a traffic
    /// rule applied.
    pub routed: Option<Routed>,
}

/// The names a routed request is counted under.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Routed {
    pub route: Arc<str>,
    pub backend: Arc<str>,
}

impl<T> Answer<T> {
    pub fn new(value: T, endpoint: Option<EndpointAddr>) -> Self {
        Answer {
            value,
            peer: None,
            endpoint,
            permit: None,
            retries: 0,
            deadline: None,
            routed: None,
        }
    }
}

pub type HttpAnswer = Answer<Response<UpstreamBody>>;

/// What outlier detection reads from an answer: a server error status, if it is one.
pub trait Reply: Send + 'static {
    fn server_error(&self) -> Option<u16>;
}

impl<B: Send + 'static> Reply for Response<B> {
    fn server_error(&self) -> Option<u16> {
        self.status()
            .is_server_error()
            .then(|| self.status().as_u16())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Failure<R: std::fmt::Debug> {
    /// Nothing reached the endpoint (the connection failed, or closed before the
    /// request went out): the request comes back, to try elsewhere.
    #[error("{error}")]
    Unsent {
        error: SendError,
        req: R,
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
    #[error("{what} is over its rate limit ({} requests a second, burst {}); retry after {:?}", refused.bucket.requests_per_second, refused.bucket.burst, refused.retry_after)]
    RateLimited { what: Arc<str>, refused: Refused },
}

/// Which bucket refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Total,
    Client,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Total => "total",
            Scope::Client => "client",
        }
    }
}

/// A request refused by a rate limit.
#[derive(Clone, Debug, PartialEq)]
pub struct Refused {
    pub scope: Scope,
    pub bucket: Bucket,
    pub retry_after: Duration,
}

impl<R: std::fmt::Debug> Failure<R> {
    /// The endpoint the failed attempt went to, if one was picked.
    pub fn endpoint(&self) -> Option<EndpointAddr> {
        match self {
            Failure::Unsent { endpoint, .. }
            | Failure::Lost { endpoint, .. }
            | Failure::TryTimeout { endpoint, .. } => *endpoint,
            _ => None,
        }
    }

    /// A send that failed, as the failure of the attempt it was.
    pub fn from_send(error: SendError, unsent: Option<R>, endpoint: EndpointAddr) -> Failure<R> {
        if error.is_client_side() {
            return Failure::Client { error };
        }
        if let SendError::Busy { addr, streams } = error {
            return Failure::Overloaded {
                destination: addr.to_string().into(),
                limit: streams as usize,
            };
        }
        match unsent {
            Some(req) => Failure::Unsent {
                error,
                req,
                endpoint: Some(endpoint),
            },
            None => Failure::Lost {
                refused: error.is_refused_stream(),
                error,
                endpoint: Some(endpoint),
            },
        }
    }
}

/// The version of the IETF httpapi draft whose `RateLimit` and `RateLimit-Policy`
/// fields a refusal carries.
pub const RATELIMIT_DRAFT: &str = "draft-ietf-httpapi-ratelimit-headers-08";

impl Refused {
    /// Whole seconds to wait, rounded up (at least 1): `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        (self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0)).max(1)
    }

    /// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-08 §4): the quota
    /// as requests per one-second window, the burst as an extension parameter.
    pub fn policy_field(&self) -> String {
        format!(
            "\"{}\";q={};w=1;burst={}",
            self.scope.as_str(),
            self.bucket.requests_per_second.ceil() as u64,
            self.bucket.burst
        )
    }

    /// `RateLimit` (draft-ietf-httpapi-ratelimit-headers-08 §5): nothing remains,
    /// and when it resets.
    pub fn limit_field(&self) -> String {
        format!(
            "\"{}\";r=0;t={}",
            self.scope.as_str(),
            self.retry_after_secs()
        )
    }
}

pub type HttpFailure = Failure<Box<Request<RequestBody>>>;
pub type ConnectFailure = Failure<ConnectTo>;

/// A slot in a count of requests in flight, given back when dropped (with any slots
/// joined to it: a request may hold its destination's and its client's).
#[derive(Debug)]
pub struct Permit {
    count: Arc<AtomicUsize>,
    joined: Option<Box<Permit>>,
}

impl Permit {
    /// Takes a slot if fewer than `max` are taken.
    pub fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Permit> {
        let before = count.fetch_add(1, Ordering::AcqRel);
        let permit = Permit {
            count: count.clone(),
            joined: None,
        };
        (before < max).then_some(permit)
    }

    /// Holds `other` as long as this one.
    pub fn join(&mut self, mut other: Permit) {
        other.joined = self.joined.take();
        self.joined = Some(Box::new(other));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A boxed layer future.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;
