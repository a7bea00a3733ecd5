//! The concurrency limit: a destination takes at most GOFE_MAX_CONCURRENT_REQUESTS
//! requests at once; beyond that a request fails at once (503 with
//! `gofe-overloaded: true`) instead of queueing behind the others. A request holds
//! its slot until its response body has ended.

use super::call::{Answer, Call, Failure};
use futures_util::future::Either;
use std::future::{Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// A slot, released when dropped.
#[derive(Debug)]
pub struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Clone)]
pub struct LimitLayer {
    in_flight: Arc<AtomicUsize>,
    max: usize,
    destination: Arc<str>,
}

impl LimitLayer {
    /// `in_flight` is the destination's count, shared by all its requests.
    pub fn new(in_flight: Arc<AtomicUsize>, max: usize, destination: Arc<str>) -> Self {
        Self {
            in_flight,
            max,
            destination,
        }
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limit<S>;

    fn layer(&self, inner: S) -> Limit<S> {
        Limit {
            inner,
            cfg: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Limit<S> {
    inner: S,
    cfg: LimitLayer,
}

impl<S, B> Service<Call> for Limit<S>
where
    S: Service<Call, Response = Answer<B>, Error = Failure>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Answer<B>;
    type Error = Failure;
    type Future = Either<Ready<Result<Answer<B>, Failure>>, Held<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let before = self.cfg.in_flight.fetch_add(1, Ordering::AcqRel);
        let permit = Permit(self.cfg.in_flight.clone());
        if before >= self.cfg.max {
            drop(permit);
            let failure = Failure::Overloaded {
                destination: self.cfg.destination.clone(),
                limit: self.cfg.max,
            };
            return Either::Left(std::future::ready(Err(failure)));
        }
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

impl<F, B> Future for Held<F>
where
    F: Future<Output = Result<Answer<B>, Failure>>,
{
    type Output = Result<Answer<B>, Failure>;

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
    use crate::http::body::RequestBody;
    use http::{Request, Response};
    use tokio::sync::oneshot;
    use tower::ServiceExt;

    fn get() -> Call {
        Call::new(Request::new(RequestBody::empty()))
    }

    #[tokio::test]
    async fn beyond_the_limit_fails_at_once_and_a_slot_frees_when_the_answer_goes() {
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let release = Arc::new(parking_lot::Mutex::new(Some(release_rx)));
        let inner = tower::service_fn(move |_c: Call| {
            let release = release.clone();
            async move {
                // The first call waits for the test; the others answer at once.
                let wait = release.lock().take();
                if let Some(rx) = wait {
                    let _ = rx.await;
                }
                Ok::<_, Failure>(Answer::new(Response::new(()), None))
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
}
