//! The balancing layer: picks the endpoint for each attempt (of a request, or of a
//! connection of its own), and learns from how the attempt went: latency, and outlier
//! detection, which may eject the endpoint.

use super::balancer::{Balancer, Chosen, Next};
use super::outlier::Outcome;
use super::state::{EndpointState, InFlight};
use crate::call::{Answer, BoxFuture, Call, Failure, Reply};
use crate::client::error::SendError;
use crate::config::policy::{Lb, OutlierPolicy};
use crate::connect::error::ConnectError;
use crate::metrics::Metrics;
use futures_util::future::Either;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
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
            cfg: Arc::new(self.clone()),
        }
    }
}

/// One `Arc` of settings, cloned for every attempt (an atomic increment and decrement
/// each, where the fields apart were three).
#[derive(Clone)]
pub struct Balance<S> {
    inner: S,
    cfg: Arc<BalanceLayer>,
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
    /// Once discovery has answered, the endpoint is picked in `call` and the attempt
    /// needs no future of its own (`Balanced`, inline in the caller's); before, the
    /// wait for discovery's first answer is boxed.
    type Future = Either<Balanced<S::Future, R>, BoxFuture<Result<Answer<T>, Failure<R>>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure<R>>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call<R>) -> Self::Future {
        // The inner service was made ready for this call; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let cfg = &self.cfg;
        let chosen = match cfg.balancer.next_now(call.orig_dst, cfg.lb, &call.tried) {
            Next::Now(chosen) => chosen,
            Next::Wait => {
                let cfg = cfg.clone();
                return Either::Right(Box::pin(async move {
                    let chosen = cfg
                        .balancer
                        .next(DISCOVERY_WAIT, call.orig_dst, cfg.lb, &call.tried)
                        .await;
                    match start(&cfg, chosen, &mut call) {
                        Ok(attempt) => {
                            let result = inner.call(call).await;
                            attempt.settle(result)
                        }
                        Err(e) => Err(e),
                    }
                }));
            }
        };
        match start(cfg, chosen, &mut call) {
            Ok(attempt) => Either::Left(Balanced {
                answer: Some(inner.call(call)),
                attempt: Some(attempt),
                failed: None,
            }),
            Err(e) => Either::Left(Balanced {
                answer: None,
                attempt: None,
                failed: Some(e),
            }),
        }
    }
}

/// An attempt on the endpoint picked for it: what its outcome is recorded with.
pub struct Attempt {
    cfg: Arc<BalanceLayer>,
    endpoint: Arc<EndpointState>,
    flight: InFlight,
    balanced: bool,
}

/// The attempt for `chosen`, its endpoint set in `call`; no endpoint is a failure.
fn start<R: Debug>(
    cfg: &Arc<BalanceLayer>,
    chosen: Option<Chosen>,
    call: &mut Call<R>,
) -> Result<Attempt, Failure<R>> {
    let Some(Chosen { endpoint, balanced }) = chosen else {
        return Err(Failure::NoEndpoints {
            destination: cfg.destination.clone(),
        });
    };
    let flight = endpoint.start();
    call.endpoint = Some(endpoint.endpoint.clone());
    Ok(Attempt {
        cfg: cfg.clone(),
        endpoint,
        flight,
        balanced,
    })
}

impl Attempt {
    /// Records how the attempt went (latency, outlier detection, which may eject the
    /// endpoint), and passes its result on.
    fn settle<T: Reply, R: Debug>(
        self,
        result: Result<Answer<T>, Failure<R>>,
    ) -> Result<Answer<T>, Failure<R>> {
        let Attempt {
            cfg,
            endpoint,
            flight,
            balanced,
        } = self;
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
    }
}

pin_project_lite::pin_project! {
    /// An attempt's answer on its way, then recorded (`Attempt::settle`); or the
    /// failure to pick an endpoint for it. The failure is held as itself rather than
    /// as the limit layer's `Either<Ready<Result>, _>`: a `Ready` holds room for a
    /// whole answer inline, and this future lives inside the retry layer's, which is
    /// moved for every request (tried: +345 instructions a request on HTTP/1.1, +1,165
    /// on HTTP/2, outbound, callgrind).
    pub struct Balanced<F, R: Debug> {
        #[pin]
        answer: Option<F>,
        attempt: Option<Attempt>,
        failed: Option<Failure<R>>,
    }
}

impl<F, R, T> Future for Balanced<F, R>
where
    F: Future<Output = Result<Answer<T>, Failure<R>>>,
    R: Debug,
    T: Reply,
{
    type Output = Result<Answer<T>, Failure<R>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(answer) = this.answer.as_pin_mut() else {
            let failed = this
                .failed
                .take()
                .expect("a Balanced polled after it finished");
            return Poll::Ready(Err(failed));
        };
        let result = std::task::ready!(answer.poll(cx));
        let attempt = this
            .attempt
            .take()
            .expect("a Balanced polled after it finished");
        Poll::Ready(attempt.settle(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addrs::EndpointAddr;
    use crate::body::request::RequestBody;
    use crate::call::{HttpCall, HttpFailure};
    use crate::endpoint::{Endpoint, EndpointSet, Source};
    use http::{Request, Response, StatusCode};
    use tokio::sync::watch;
    use tower::ServiceExt;

    const A: &str = "10.0.0.1:80";
    const B: &str = "10.0.0.2:80";

    fn set(addrs: &[&str]) -> Arc<EndpointSet> {
        Arc::new(EndpointSet {
            endpoints: addrs
                .iter()
                .map(|a| Endpoint {
                    addr: EndpointAddr::new(a.parse().unwrap()),
                    weight: 1,
                    identity: None,
                    metadata: Default::default(),
                })
                .collect(),
            source: Source::File,
        })
    }

    /// A balancing layer over what `feed` says, ejecting an endpoint at its first 5xx
    /// (for as long as the test runs, however many are out), and the metrics it counts
    /// ejections in.
    fn layer(feed: watch::Receiver<Arc<EndpointSet>>) -> (BalanceLayer, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let outlier = OutlierPolicy {
            consecutive_5xx: 1,
            consecutive_gateway: 1,
            base_ejection: Duration::from_secs(300),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 100,
        };
        let layer = BalanceLayer::new(
            Arc::new(Balancer::new(feed)),
            Lb::RoundRobin,
            outlier,
            "api:80".into(),
            metrics.clone(),
            true,
        );
        (layer, metrics)
    }

    /// An endpoint service answering 503 from `A` and 200 from anything else, with the
    /// endpoint the layer picked in a header.
    fn endpoint() -> impl Service<
        HttpCall,
        Response = Answer<Response<()>>,
        Error = HttpFailure,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(|call: HttpCall| async move {
            let addr = call
                .endpoint
                .expect("picked before the endpoint is called")
                .addr;
            let status = if addr.to_string() == A {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            let mut rsp = Response::new(());
            *rsp.status_mut() = status;
            rsp.headers_mut()
                .insert("picked", addr.to_string().parse().unwrap());
            Ok::<_, HttpFailure>(Answer::new(rsp, Some(addr)))
        })
    }

    fn get() -> HttpCall {
        Call::new(Box::new(Request::new(RequestBody::empty())))
    }

    async fn picked<S>(svc: &S) -> String
    where
        S: Service<HttpCall, Response = Answer<Response<()>>, Error = HttpFailure> + Clone,
    {
        let a = svc.clone().oneshot(get()).await.expect("an answer");
        a.value.headers()["picked"].to_str().unwrap().to_string()
    }

    /// Once discovery has answered, the endpoint is picked as the call is made (no
    /// future of the layer's own), and the attempt's outcome still reaches outlier
    /// detection: `A`'s 503 ejects it, and every request after goes to `B`.
    #[tokio::test]
    async fn an_answered_discovery_picks_at_once_and_outcomes_still_eject() {
        let (_tx, rx) = watch::channel(set(&[A, B]));
        let (layer, metrics) = layer(rx);
        let svc = layer.layer(endpoint());
        let first: Vec<String> = [picked(&svc).await, picked(&svc).await].into();
        assert!(
            first.contains(&A.to_string()),
            "round robin reaches A: {first:?}"
        );
        assert_eq!(
            metrics.ejections_total("api:80", A),
            1,
            "A's 503 ejected it"
        );
        for _ in 0..6 {
            assert_eq!(picked(&svc).await, B, "A is ejected");
        }
    }

    /// A request before discovery's first answer (and with no original destination to
    /// go to) waits for it, then goes to an endpoint it names, its outcome recorded the
    /// same way; discovery naming none fails the request.
    #[tokio::test]
    async fn a_request_before_discovery_answers_waits_for_it() {
        let (tx, rx) = watch::channel(Arc::new(EndpointSet::pending()));
        let (layer, metrics) = layer(rx);
        let svc = layer.layer(endpoint());
        let waiting = tokio::spawn({
            let svc = svc.clone();
            async move { picked(&svc).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "waits while discovery is pending");
        tx.send(set(&[A])).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("answered once discovery is")
            .unwrap();
        assert_eq!(got, A);
        assert_eq!(metrics.ejections_total("api:80", A), 1, "its 503 counted");

        tx.send(set(&[])).unwrap();
        match svc.oneshot(get()).await {
            Err(Failure::NoEndpoints { destination }) => assert_eq!(&*destination, "api:80"),
            other => panic!("no endpoints, not {:?}", other.map(|a| a.value.status())),
        }
    }
}
