//! The concurrency limit: a destination takes at most GOFE_MAX_CONCURRENT_REQUESTS
//! requests at once; beyond that a request fails at once (503 with
//! `gofe-overloaded: true`) instead of queueing behind the others. A request holds its
//! slot until its response body has ended. With priorities, a request whose priority
//! header names a class listed in `shed_first` may use only part of the limit (the
//! first listed the smallest part), so that those are refused first and unlisted
//! (critical) requests keep the rest; each refusal counts in `gofe_shed_total`.

use crate::addrs::Direction;
use crate::call::{Answer, Failure, HttpCall, HttpFailure, Permit};
use crate::config::rules::Priority;
use crate::metrics::Metrics;
use futures_util::future::Either;
use std::future::{Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll};
use tower::{Layer, Service};

#[derive(Clone)]
pub struct LimitLayer {
    in_flight: Arc<AtomicUsize>,
    max: usize,
    destination: Arc<str>,
    priority: Option<Arc<Priority>>,
    shed: Option<(Arc<Metrics>, Direction)>,
}

impl LimitLayer {
    /// `in_flight` is the destination's count, shared by all its requests.
    pub fn new(in_flight: Arc<AtomicUsize>, max: usize, destination: Arc<str>) -> Self {
        Self {
            in_flight,
            max,
            destination,
            priority: None,
            shed: None,
        }
    }

    /// Refuses the classes `priority` lists first; counts refusals in `metrics`.
    pub fn with_priority(
        mut self,
        priority: Option<Priority>,
        metrics: Arc<Metrics>,
        direction: Direction,
    ) -> Self {
        self.priority = priority.map(Arc::new);
        self.shed = Some((metrics, direction));
        self
    }

    /// The most requests in flight a request with this priority may join, and its
    /// class's name for the metric.
    fn room(&self, call: &HttpCall) -> (usize, Arc<str>) {
        let Some(p) = &self.priority else {
            return (self.max, "".into());
        };
        let value = call.req.headers().get(&p.header).map(|v| v.as_bytes());
        let (part, parts) = p.share(value);
        let class = match value.and_then(|v| p.shed_first.iter().find(|s| s.as_bytes() == v)) {
            Some(s) => s.as_str().into(),
            None => "other".into(),
        };
        ((self.max * part / parts).max(1), class)
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limit<S>;

    fn layer(&self, inner: S) -> Limit<S> {
        Limit {
            inner,
            cfg: Arc::new(self.clone()),
        }
    }
}

/// The settings in one `Arc`: the stack is cloned for every request.
#[derive(Clone)]
pub struct Limit<S> {
    inner: S,
    cfg: Arc<LimitLayer>,
}

impl<S, T> Service<HttpCall> for Limit<S>
where
    S: Service<HttpCall, Response = Answer<T>, Error = HttpFailure>,
    S::Future: Send + 'static,
    T: Send + 'static,
{
    type Response = Answer<T>;
    type Error = HttpFailure;
    type Future = Either<Ready<Result<Answer<T>, HttpFailure>>, Held<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HttpFailure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: HttpCall) -> Self::Future {
        let (room, class) = self.cfg.room(&call);
        let Some(permit) = Permit::take(&self.cfg.in_flight, room) else {
            if let Some((metrics, direction)) = &self.cfg.shed {
                metrics
                    .shed(*direction, &self.cfg.destination, &class)
                    .inc();
            }
            let failure = Failure::Overloaded {
                destination: self.cfg.destination.clone(),
                limit: self.cfg.max,
            };
            return Either::Left(std::future::ready(Err(failure)));
        };
        Either::Right(Held {
            answer: self.inner.call(call),
            permit: Some(permit),
        })
    }
}

pin_project_lite::pin_project! {
    /// An answer on its way, holding its slot; the slot goes with the answer.
    pub struct Held<F> {
        #[pin]
        answer: F,
        permit: Option<Permit>,
    }
}

impl<F, T, R> Future for Held<F>
where
    F: Future<Output = Result<Answer<T>, Failure<R>>>,
    R: std::fmt::Debug,
{
    type Output = Result<Answer<T>, Failure<R>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut a = std::task::ready!(this.answer.poll(cx))?;
        a.permit = this.permit.take();
        Poll::Ready(Ok(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::request::RequestBody;
    use crate::call::{Call, HttpCall};
    use http::{Request, Response};
    use std::sync::atomic::Ordering;
    use tokio::sync::oneshot;
    use tower::ServiceExt;

    fn get() -> HttpCall {
        Call::new(Box::new(Request::new(RequestBody::empty())))
    }

    #[tokio::test]
    async fn beyond_the_limit_fails_at_once_and_a_slot_frees_when_the_answer_goes() {
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let release = Arc::new(parking_lot::Mutex::new(Some(release_rx)));
        let inner = tower::service_fn(move |_c: HttpCall| {
            let release = release.clone();
            async move {
                // The first call waits for the test; the others answer at once.
                let wait = release.lock().take();
                if let Some(rx) = wait {
                    let _ = rx.await;
                }
                Ok::<_, Failure<_>>(Answer::new(Response::new(()), None))
            }
        });
        let in_flight = Arc::new(AtomicUsize::new(0));
        let layer = LimitLayer::new(in_flight.clone(), 1, "api:80".into());
        let svc = layer.layer(inner);
        let first = tokio::spawn(svc.clone().oneshot(get()));
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while in_flight.load(Ordering::Acquire) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        match svc.clone().oneshot(get()).await {
            Err(Failure::Overloaded { limit: 1, .. }) => {}
            other => panic!("expected overloaded, got {:?}", other.map(|_| ())),
        }
        release_tx.send(()).unwrap();
        let answer = first.await.unwrap().unwrap();
        assert_eq!(in_flight.load(Ordering::Acquire), 1, "held by the answer");
        drop(answer);
        assert_eq!(in_flight.load(Ordering::Acquire), 0);
        assert!(svc.oneshot(get()).await.is_ok());
    }

    #[tokio::test]
    async fn listed_priorities_are_shed_first_and_counted() {
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let inner = tower::service_fn(move |_c: HttpCall| {
            let mut rx = release_rx.clone();
            async move {
                let _ = rx.wait_for(|r| *r).await;
                Ok::<_, Failure<_>>(Answer::new(Response::new(()), None))
            }
        });
        let metrics = Arc::new(Metrics::new());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let priority: Priority =
            serde_yaml::from_str("{header: gofe-priority, shed_first: [background]}").unwrap();
        let svc = LimitLayer::new(in_flight.clone(), 4, "api:80".into())
            .with_priority(Some(priority), metrics.clone(), Direction::Outbound)
            .layer(inner);
        let with = |p: &'static str| {
            let mut c = get();
            c.req
                .headers_mut()
                .insert("gofe-priority", http::HeaderValue::from_static(p));
            c
        };
        // Background may fill half the limit...
        let held: Vec<_> = (0..2)
            .map(|_| tokio::spawn(svc.clone().oneshot(with("background"))))
            .collect();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while in_flight.load(Ordering::Acquire) < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert!(matches!(
            svc.clone().oneshot(with("background")).await,
            Err(Failure::Overloaded { .. })
        ));
        // ...and critical requests keep the rest.
        let critical: Vec<_> = (0..2)
            .map(|_| tokio::spawn(svc.clone().oneshot(with("critical"))))
            .collect();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while in_flight.load(Ordering::Acquire) < 4 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert!(matches!(
            svc.clone().oneshot(with("critical")).await,
            Err(Failure::Overloaded { .. })
        ));
        release_tx.send(true).unwrap();
        for h in held.into_iter().chain(critical) {
            assert!(h.await.unwrap().is_ok());
        }
        let mut e = gofe_telemetry::prom::Exposition::new();
        metrics.render(&mut e);
        let text = e.finish();
        for line in [
            "gofe_shed_total{direction=\"outbound\",authority=\"api:80\",priority=\"background\"} 1",
            "gofe_shed_total{direction=\"outbound\",authority=\"api:80\",priority=\"other\"} 1",
        ] {
            assert!(text.contains(line), "{text}");
        }
    }
}
