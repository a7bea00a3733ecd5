//! The concurrency limit: a destination takes at most GOFE_MAX_CONCURRENT_REQUESTS
//! requests at once; beyond that a request fails at once (503 with
//! `gofe-overloaded: true`) instead of queueing behind the others. A request holds its
//! slot until its response body has ended.

use crate::call::{Answer, Call, Failure, Permit};
use futures_util::future::Either;
use std::fmt::Debug;
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

impl<S, R, T> Service<Call<R>> for Limit<S>
where
    S: Service<Call<R>, Response = Answer<T>, Error = Failure<R>>,
    S::Future: Send + 'static,
    R: Debug,
    T: Send + 'static,
{
    type Response = Answer<T>;
    type Error = Failure<R>;
    type Future = Either<Ready<Result<Answer<T>, Failure<R>>>, Held<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure<R>>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call<R>) -> Self::Future {
        let Some(permit) = Permit::take(&self.cfg.in_flight, self.cfg.max) else {
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
    R: Debug,
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
    use crate::call::HttpCall;
    use http::{Request, Response};
    use std::sync::atomic::Ordering;
    use tokio::sync::oneshot;
    use tower::ServiceExt;

    fn get() -> HttpCall {
        Call::new(Request::new(RequestBody::empty()))
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
}
