//! Leaf: the retry settings (`GOFE_RETRY_*`, and a route's own), apart from the rest of
//! the policy so that the traffic rules can hold a route's without the policy and the
//! rules importing each other.

use std::time::Duration;

/// The conditions GOFE_RETRY_ON names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub status_5xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub retriable_status_codes: bool,
    pub grpc_unavailable: bool,
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_resource_exhausted: bool,
}

impl RetryOn {
    pub fn parse(s: &str) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        for c in s.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let flag = match c {
                "connect-failure" => &mut on.connect_failure,
                "refused-stream" => &mut on.refused_stream,
                "5xx" => &mut on.status_5xx,
                "gateway-error" => &mut on.gateway_error,
                "reset" => &mut on.reset,
                "retriable-status-codes" => &mut on.retriable_status_codes,
                "unavailable" => &mut on.grpc_unavailable,
                "cancelled" => &mut on.grpc_cancelled,
                "deadline-exceeded" => &mut on.grpc_deadline_exceeded,
                "resource-exhausted" => &mut on.grpc_resource_exhausted,
                _ => {
                    return Err(format!(
                        "{c:?} is not a retry condition: expected connect-failure, refused-stream, 5xx, gateway-error, reset, retriable-status-codes, unavailable, cancelled, deadline-exceeded, resource-exhausted"
                    ));
                }
            };
            *flag = true;
        }
        Ok(on)
    }

    /// Whether any gRPC status is retried (when none is, a response's `grpc-status`
    /// is not looked up).
    pub fn any_grpc(&self) -> bool {
        self.grpc_unavailable
            || self.grpc_cancelled
            || self.grpc_deadline_exceeded
            || self.grpc_resource_exhausted
    }

    /// Whether a gRPC status code (from a trailers-only response) is retried.
    pub fn grpc(&self, status: u16) -> bool {
        match status {
            1 => self.grpc_cancelled,
            4 => self.grpc_deadline_exceeded,
            8 => self.grpc_resource_exhausted,
            14 => self.grpc_unavailable,
            _ => false,
        }
    }
}

/// A route's own retry settings, over its destination's: carried in the extensions of
/// the requests the route takes, to the retry layer of whichever backend they go to.
#[derive(Clone, Debug)]
pub struct RouteRetry(pub std::sync::Arc<RetryPolicy>);

/// A route's own `per_try_timeout`, carried the same way to the attempt timeout of
/// whichever backend its requests go to.
#[derive(Clone, Copy, Debug)]
pub struct RouteTryTimeout(pub Duration);

#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    pub on: RetryOn,
    pub limit: u32,
    pub budget_ratio: f32,
    pub budget_min_per_sec: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub max_body: usize,
    pub status_codes: Vec<u16>,
    pub retryable: bool,
}
