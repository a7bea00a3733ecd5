//! Why the proxy could not forward a request, and the response it writes itself then:
//! a status that says what failed (400 no destination, 403 refused, 502 unreachable,
//! 503 overloaded or no endpoints, 504 timed out), the reason in `gofe-proxy-error`,
//! and for gRPC clients a gRPC status they understand. The local application
//! (outbound) is told everything (addresses, identities); a remote client (inbound) is
//! told what kind of failure it was, in words that name nothing inside the pod.

use crate::addrs::EndpointAddr;
use crate::call::{ConnectFailure, Failure, HttpFailure, Routed};
use crate::client::error::SendError;
use crate::connect::error::ConnectError;
use crate::proto::grpc;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use std::sync::Arc;

pub const PROXY_ERROR_HEADER: &str = "gofe-proxy-error";
/// On a 503 the proxy answered itself because the destination had too many requests
/// in flight.
pub const OVERLOADED_HEADER: &str = "gofe-overloaded";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    Forbidden(String),
    #[error(
        "the request names no destination: an explicit proxy request needs an absolute URI or a Host header"
    )]
    NoAuthority,
    /// A request that took its connection over failed once the connection was made.
    #[error(transparent)]
    Send(#[from] SendError),
    #[error(transparent)]
    Call(#[from] HttpFailure),
    #[error(transparent)]
    Connect(#[from] ConnectFailure),
    /// A fault injected on purpose by a route's `fault: {abort}`.
    #[error("fault injected by route {route}: abort with {status}")]
    Fault { route: Arc<str>, status: StatusCode },
    /// A failure of a request a traffic rule's route took: the route, and the backend
    /// once drawn, label its metrics as they label proxied answers.
    #[error("{error}")]
    Routed {
        error: Box<ProxyError>,
        routed: Routed,
    },
}

/// Marks the answer to a request its upstream refused unprocessed
/// (`ProxyError::is_refused_stream`): an HTTP/2 client's stream is reset with
/// REFUSED_STREAM instead (RFC 9113 §8.7), which tells it (a meshed client's sidecar,
/// a gRPC client) that sending it again is safe; an HTTP/1 client, which has no such
/// word, gets the answer (502).
#[derive(Clone, Copy, Debug)]
pub struct RefuseStream;

/// A failure's status, whatever was attempted.
fn failure_status<R: std::fmt::Debug>(f: &Failure<R>) -> StatusCode {
    match f {
        Failure::Unsent { error, .. } | Failure::Lost { error, .. } => send_status(error),
        Failure::Client { .. } => StatusCode::BAD_REQUEST,
        Failure::TryTimeout { .. } | Failure::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        Failure::Overloaded { .. } | Failure::NoEndpoints { .. } => StatusCode::SERVICE_UNAVAILABLE,
        Failure::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
    }
}

fn send_status(e: &SendError) -> StatusCode {
    match e {
        SendError::Connect(ConnectError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
        SendError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    }
}

impl ProxyError {
    /// This failure, on `routed`'s route and backend.
    pub fn on_route(self, routed: Routed) -> ProxyError {
        ProxyError::Routed {
            error: Box::new(self.unrouted_owned()),
            routed,
        }
    }

    fn unrouted_owned(self) -> ProxyError {
        match self {
            ProxyError::Routed { error, .. } => error.unrouted_owned(),
            e => e,
        }
    }

    /// The failure itself, whatever route it was on.
    fn unrouted(&self) -> &ProxyError {
        match self {
            ProxyError::Routed { error, .. } => error.unrouted(),
            e => e,
        }
    }

    /// The route (and backend) the request had been given, if a rule took it.
    pub fn routed(&self) -> Option<&Routed> {
        match self {
            ProxyError::Routed { routed, .. } => Some(routed),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self.unrouted() {
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::NoAuthority => StatusCode::BAD_REQUEST,
            ProxyError::Send(e) => send_status(e),
            ProxyError::Call(f) => failure_status(f),
            ProxyError::Connect(f) => failure_status(f),
            ProxyError::Fault { status, .. } => *status,
            ProxyError::Routed { .. } => unreachable!("unrouted"),
        }
    }

    /// Whether the upstream refused the request unprocessed (an HTTP/2 stream refused,
    /// or cut by a graceful GOAWAY past its last stream id): whoever sent it may send
    /// it again, and an HTTP/2 client is told so (`RefuseStream`).
    pub fn is_refused_stream(&self) -> bool {
        match self.unrouted() {
            ProxyError::Send(e) => e.is_refused_stream(),
            ProxyError::Call(Failure::Lost { refused, .. }) => *refused,
            ProxyError::Call(Failure::Unsent { error, .. }) => error.is_refused_stream(),
            _ => false,
        }
    }

    /// The endpoint that failed, when one was tried.
    pub fn endpoint(&self) -> Option<EndpointAddr> {
        match self.unrouted() {
            ProxyError::Call(f) => f.endpoint(),
            ProxyError::Connect(f) => f.endpoint(),
            _ => None,
        }
    }

    fn overloaded(&self) -> bool {
        matches!(
            self.unrouted(),
            ProxyError::Call(Failure::Overloaded { .. })
                | ProxyError::Connect(Failure::Overloaded { .. })
        )
    }

    /// The gRPC status a gRPC client gets instead of the HTTP status.
    fn grpc_status(&self) -> u16 {
        match self.status() {
            StatusCode::FORBIDDEN => grpc::PERMISSION_DENIED,
            StatusCode::BAD_REQUEST => grpc::INVALID_ARGUMENT,
            StatusCode::GATEWAY_TIMEOUT => grpc::DEADLINE_EXCEEDED,
            StatusCode::TOO_MANY_REQUESTS => grpc::RESOURCE_EXHAUSTED,
            _ => grpc::UNAVAILABLE,
        }
    }

    /// What a remote client is told: the kind of failure, naming no address, identity
    /// or setting of this pod.
    pub fn summary(&self) -> String {
        fn of_send(e: &SendError) -> String {
            match e {
                SendError::Connect(c) => {
                    format!("the destination could not be reached ({})", c.reason())
                }
                SendError::Handshake { .. } | SendError::Http { .. } | SendError::H2 { .. } => {
                    "the destination's connection failed".into()
                }
                SendError::Busy { .. } => "the destination is overloaded".into(),
            }
        }
        fn of_failure<R: std::fmt::Debug>(f: &Failure<R>) -> String {
            match f {
                Failure::Unsent { error, .. } | Failure::Lost { error, .. } => of_send(error),
                Failure::Client { .. } => "the request body broke off".into(),
                Failure::TryTimeout { .. } | Failure::Timeout { .. } => {
                    "the request timed out".into()
                }
                Failure::Overloaded { .. } => "the destination is overloaded".into(),
                Failure::NoEndpoints { .. } => "the destination has no endpoints".into(),
                Failure::RateLimited { refused, .. } => format!(
                    "over the rate limit ({} requests a second)",
                    refused.bucket.requests_per_second
                ),
            }
        }
        match self.unrouted() {
            ProxyError::Forbidden(_) => "refused by the destination's inbound policy".into(),
            ProxyError::NoAuthority => self.to_string(),
            ProxyError::Send(e) => of_send(e),
            ProxyError::Call(f) => of_failure(f),
            ProxyError::Connect(f) => of_failure(f),
            ProxyError::Fault { .. } => "fault injected".into(),
            ProxyError::Routed { .. } => unreachable!("unrouted"),
        }
    }

    /// The status, headers and body of the response that tells the client; with
    /// `detail`, the whole reason (for the local application), else the summary.
    pub fn response(&self, grpc: bool, detail: bool) -> (StatusCode, HeaderMap, String) {
        let message = if detail {
            self.to_string()
        } else {
            self.summary()
        };
        let reason = HeaderValue::from_str(&message)
            .unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
        let mut headers = HeaderMap::new();
        headers.insert(PROXY_ERROR_HEADER, reason.clone());
        if self.overloaded() {
            headers.insert(OVERLOADED_HEADER, HeaderValue::from_static("true"));
        }
        if let ProxyError::Call(Failure::RateLimited { refused, .. }) = self.unrouted() {
            // The fields of draft-ietf-httpapi-ratelimit-headers-08 (RATELIMIT_DRAFT).
            let value = |s: String| HeaderValue::from_str(&s).expect("digits and quotes");
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(refused.retry_after_secs()),
            );
            headers.insert("ratelimit-policy", value(refused.policy_field()));
            headers.insert("ratelimit", value(refused.limit_field()));
        }
        if grpc {
            headers.insert("content-type", HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from(self.grpc_status()));
            headers.insert("grpc-message", reason);
            (StatusCode::OK, headers, String::new())
        } else {
            headers.insert(
                "content-type",
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            (self.status(), headers, format!("{message}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn timeout() -> ProxyError {
        ProxyError::Send(SendError::Connect(ConnectError::Timeout {
            addr: EndpointAddr::new("10.0.0.1:80".parse().unwrap()),
            timeout: Duration::from_secs(1),
        }))
    }

    #[test]
    fn connect_timeout_is_504_and_names_the_endpoint() {
        let (status, headers, body) = timeout().response(false, true);
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        let why = headers[PROXY_ERROR_HEADER].to_str().unwrap();
        assert!(why.contains("10.0.0.1:80"), "{why}");
        assert!(body.contains("10.0.0.1:80"), "{body}");
    }

    #[test]
    fn grpc_clients_get_a_grpc_status() {
        let (status, headers, body) = timeout().response(true, true);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["grpc-status"], "4");
        assert!(body.is_empty());
    }

    #[test]
    fn a_remote_client_learns_the_kind_of_failure_and_nothing_inside_the_pod() {
        let (status, headers, body) = timeout().response(false, false);
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        let why = headers[PROXY_ERROR_HEADER].to_str().unwrap();
        assert_eq!(why, "the destination could not be reached (timeout)");
        assert!(!body.contains("10.0.0.1"), "{body}");
        let refused = ProxyError::Forbidden(
            "identity spiffe://cluster.local/ns/a/sa/b is not in GOFE_INBOUND_AUTHORIZE".into(),
        );
        let (_, headers, _) = refused.response(false, false);
        let why = headers[PROXY_ERROR_HEADER].to_str().unwrap();
        assert!(!why.contains("spiffe") && !why.contains("GOFE_"), "{why}");
    }

    #[test]
    fn over_the_rate_limit_is_429_with_the_drafts_fields_or_resource_exhausted() {
        use crate::call::{Refused, Scope};
        use crate::config::rules::Bucket;
        let e = ProxyError::Call(Failure::RateLimited {
            what: "api:80".into(),
            refused: Refused {
                scope: Scope::Total,
                bucket: Bucket {
                    requests_per_second: 200.0,
                    burst: 50,
                },
                retry_after: Duration::from_millis(1500),
            },
        });
        let (status, headers, _) = e.response(false, false);
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["retry-after"], "2");
        assert_eq!(headers["ratelimit-policy"], "\"total\";q=200;w=1;burst=50");
        assert_eq!(headers["ratelimit"], "\"total\";r=0;t=2");
        let (status, headers, body) = e.response(true, false);
        assert_eq!(status, StatusCode::OK, "trailers-only");
        assert_eq!(headers["grpc-status"], "8");
        assert!(body.is_empty());
    }

    #[test]
    fn an_overloaded_destination_says_so() {
        let e = ProxyError::Call(Failure::Overloaded {
            destination: "api:80".into(),
            limit: 3,
        });
        let (status, headers, _) = e.response(false, true);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[OVERLOADED_HEADER], "true");
    }
}
