//! Responses the proxy writes itself when it cannot forward a request: a status that
//! says what failed (400 no destination, 502 unreachable, 504 timed out), the reason in
//! `gofe-proxy-error`, and for gRPC clients a gRPC status they understand.

use super::body::{OnEnd, ResponseBody};
use super::observe::Observe;
use crate::endpoint::{ConnectError, SendError};
use crate::metrics::RequestStats;
use crate::policy::call::Failure;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use std::sync::Arc;

pub const PROXY_ERROR_HEADER: &str = "gofe-proxy-error";
/// On a 503 the proxy answered itself because the destination had too many requests
/// in flight.
pub const OVERLOADED_HEADER: &str = "gofe-overloaded";

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("{0}")]
    Forbidden(String),
    #[error(
        "the request names no destination: an explicit proxy request needs an absolute URI or a Host header"
    )]
    NoAuthority,
    #[error(transparent)]
    Send(#[from] SendError),
    #[error(transparent)]
    Call(#[from] Failure),
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::NoAuthority => StatusCode::BAD_REQUEST,
            ProxyError::Send(e)
            | ProxyError::Call(Failure::Unsent { error: e, .. } | Failure::Lost { error: e, .. }) => {
                match e {
                    SendError::Connect(ConnectError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
                    _ => StatusCode::BAD_GATEWAY,
                }
            }
            ProxyError::Call(Failure::Client { .. }) => StatusCode::BAD_REQUEST,
            ProxyError::Call(Failure::TryTimeout { .. } | Failure::Timeout { .. }) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Call(Failure::Overloaded { .. } | Failure::NoEndpoints { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The endpoint that failed, when one was tried.
    fn endpoint(&self) -> Option<crate::addrs::EndpointAddr> {
        match self {
            ProxyError::Call(f) => f.endpoint(),
            _ => None,
        }
    }

    /// The gRPC status a gRPC client gets instead of the HTTP status.
    fn grpc_status(&self) -> u16 {
        const INVALID_ARGUMENT: u16 = 3;
        const DEADLINE_EXCEEDED: u16 = 4;
        const PERMISSION_DENIED: u16 = 7;
        const UNAVAILABLE: u16 = 14;
        match self.status() {
            StatusCode::FORBIDDEN => PERMISSION_DENIED,
            StatusCode::BAD_REQUEST => INVALID_ARGUMENT,
            StatusCode::GATEWAY_TIMEOUT => DEADLINE_EXCEEDED,
            _ => UNAVAILABLE,
        }
    }
}

/// The response for `err`, counted in `stats` (and observed) when it has been written.
pub(crate) fn error_response(
    err: &ProxyError,
    grpc: bool,
    stats: Arc<RequestStats>,
    mut observe: Observe,
) -> Response<ResponseBody> {
    observe.failed(err, err.endpoint());
    let message = err.to_string();
    let reason =
        HeaderValue::from_str(&message).unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
    let mut headers = HeaderMap::new();
    headers.insert(PROXY_ERROR_HEADER, reason.clone());
    if matches!(err, ProxyError::Call(Failure::Overloaded { .. })) {
        headers.insert(OVERLOADED_HEADER, HeaderValue::from_static("true"));
    }
    let (status, body) = if grpc {
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(err.grpc_status()));
        headers.insert("grpc-message", reason);
        (StatusCode::OK, String::new())
    } else {
        headers.insert(
            "content-type",
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        (err.status(), format!("{message}\n"))
    };
    let on_end = OnEnd::new(stats, status, grpc, &headers).with_observe(observe);
    let mut rsp = Response::new(ResponseBody::full(body, Some(on_end)));
    *rsp.status_mut() = status;
    *rsp.headers_mut() = headers;
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addrs::EndpointAddr;
    use std::time::Duration;

    fn timeout() -> ProxyError {
        ProxyError::Send(SendError::Connect(ConnectError::Timeout {
            addr: EndpointAddr("10.0.0.1:80".parse().unwrap()),
            timeout: Duration::from_secs(1),
        }))
    }

    #[test]
    fn connect_timeout_is_504_and_names_the_endpoint() {
        let stats = Arc::new(RequestStats::default());
        let rsp = error_response(&timeout(), false, stats.clone(), Observe::now());
        assert_eq!(rsp.status(), StatusCode::GATEWAY_TIMEOUT);
        let why = rsp.headers()[PROXY_ERROR_HEADER].to_str().unwrap();
        assert!(why.contains("10.0.0.1:80"), "{why}");
        drop(rsp);
        assert_eq!(stats.counts(), vec![(504, None, 1)]);
    }

    #[test]
    fn grpc_clients_get_a_grpc_status() {
        let stats = Arc::new(RequestStats::default());
        let rsp = error_response(&timeout(), true, stats.clone(), Observe::now());
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()["grpc-status"], "4");
        drop(rsp);
        assert_eq!(stats.counts(), vec![(200, Some(4), 1)]);
    }
}
