//! The balancing layer: picks the endpoint for each attempt (of a request, or of a
//! connection of its own), and learns from how the attempt went: latency, and outlier
//! detection, which may eject the endpoint.

use super::balancer::{Balancer, Chosen};
use super::outlier::Outcome;
use crate::call::{Answer, BoxFuture, Call, Failure, Reply};
use crate::client::error::SendError;
use crate::config::policy::{Lb, OutlierPolicy};
use crate::connect::error::ConnectError;
use crate::metrics::Metrics;
use std::fmt::Debug;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};
use tracing::info;

/// How long a request waits for discovery's first answer about a destination it has
/// no original destination for (explicit proxy requests).
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct BalanceLayer {
    balancer: Arc<Balancer>,
    lb: Lb,
    outlier: OutlierPolicy,
    destination: Arc<str>,
    metrics: Arc<Metrics>,
    /// Whether an attempt's time counts in the endpoint's latency estimate: a
    /// request's does; a connect is no measure of an endpoint's request latency.
    latency: bool,
}

impl BalanceLayer {
    pub fn new(
        balancer: Arc<Balancer>,
        lb: Lb,
        outlier: OutlierPolicy,
        destination: Arc<str>,
        metrics: Arc<Metrics>,
        latency: bool,
    ) -> Self {
        Self {
            balancer,
            lb,
            outlier,
            destination,
            metrics,
            latency,
        }
    }
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;

    fn layer(&self, inner: S) -> Balance<S> {
        Balance {
            inner,
            cfg: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Balance<S> {
    inner: S,
    cfg: BalanceLayer,
}

impl<S, R, T> Service<Call<R>> for Balance<S>
where
    S: Service<Call<R>, Response = Answer<T>, Error = Failure<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    R: Debug + Send + 'static,
    T: Reply,
{
    type Response = Answer<T>;
    type Error = Failure<R>;
    type Future = BoxFuture<Result<Answer<T>, Failure<R>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure<R>>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call<R>) -> Self::Future {
        let cfg = self.cfg.clone();
        // The inner service was made ready for this call; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let Some(Chosen { endpoint, balanced }) = cfg
                .balancer
                .next(DISCOVERY_WAIT, call.orig_dst, cfg.lb, &call.tried)
                .await
            else {
                return Err(Failure::NoEndpoints {
                    destination: cfg.destination,
                });
            };
            let flight = endpoint.start();
            call.endpoint = Some(endpoint.endpoint.clone());
            let result = inner.call(call).await;
            if !balanced {
                // The request's own original destination: nothing to balance or eject.
                return result;
            }
            let outcome = match &result {
                Ok(a) => match a.value.server_error() {
                    Some(status) => Outcome::Status(status),
                    None => Outcome::Success,
                },
                // Another request's connect failed while this one waited for it: that
                // request counts it.
                Err(Failure::Unsent {
                    error: SendError::Connect(ConnectError::Recent { .. }),
                    ..
                }) => return result,
                Err(Failure::Unsent { .. } | Failure::Lost { .. }) => Outcome::ConnectFailure,
                Err(Failure::TryTimeout { .. }) => Outcome::Status(504),
                // Not the endpoint's doing.
                Err(_) => return result,
            };
            let observed = if cfg.latency {
                cfg.balancer.observe(&flight, outcome, &cfg.outlier)
            } else {
                cfg.balancer.observe_connect(&flight, outcome, &cfg.outlier)
            };
            if let Some(time) = observed.ejected {
                let addr = endpoint.endpoint.addr.to_string();
                info!(destination = %cfg.destination, endpoint = %addr, ?outcome, ejected_for = ?time, "endpoint ejected");
                cfg.metrics.ejection(&cfg.destination, &addr);
            }
            result
        })
    }
}
