//! Timeouts around a request (GOFE_REQUEST_TIMEOUT, over all its attempts and the
//! waits between them) and around each attempt (GOFE_PER_TRY_TIMEOUT). Before the
//! response's headers, either ends the request with a 504 (gRPC: DEADLINE_EXCEEDED);
//! the request timeout then goes on running while the response body streams, and
//! cuts it off when it fires (as Envoy's route timeout does). A per-try timeout ends
//! with the attempt's headers.

use crate::call::{Answer, BoxFuture, Call, Failure};
use crate::config::policy::RouteTryTimeout;
use futures_util::future::Either;
use std::fmt::Debug;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The whole request.
    Request,
    /// One attempt.
    Attempt,
}

#[derive(Clone, Copy)]
pub struct TimeoutLayer {
    after: Option<Duration>,
    scope: Scope,
}

impl TimeoutLayer {
    pub fn request(after: Option<Duration>) -> Self {
        Self {
            after,
            scope: Scope::Request,
        }
    }

    pub fn attempt(after: Option<Duration>) -> Self {
        Self {
            after,
            scope: Scope::Attempt,
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout { inner, cfg: *self }
    }
}

#[derive(Clone)]
pub struct Timeout<S> {
    inner: S,
    cfg: TimeoutLayer,
}

/// What a request says of its own attempt timeout: a route's `per_try_timeout`, over
/// the backend's.
pub trait AttemptTimeout {
    fn attempt_timeout(&self) -> Option<Duration>;
}

impl<B> AttemptTimeout for http::Request<B> {
    fn attempt_timeout(&self) -> Option<Duration> {
        self.extensions().get::<RouteTryTimeout>().map(|t| t.0)
    }
}

impl<R: AttemptTimeout> AttemptTimeout for Box<R> {
    fn attempt_timeout(&self) -> Option<Duration> {
        (**self).attempt_timeout()
    }
}

impl<S, R, T> Service<Call<R>> for Timeout<S>
where
    S: Service<Call<R>, Response = Answer<T>, Error = Failure<R>>,
    S::Future: Send + 'static,
    R: AttemptTimeout + Debug + Send + 'static,
    T: Send + 'static,
{
    type Response = Answer<T>;
    type Error = Failure<R>;
    /// Without a timeout, the inner future as it is.
    type Future = Either<S::Future, BoxFuture<Result<Answer<T>, Failure<R>>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure<R>>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call<R>) -> Self::Future {
        let endpoint = call.endpoint_addr();
        let TimeoutLayer { after, scope } = self.cfg;
        let after = match scope {
            Scope::Attempt => call.req.attempt_timeout().or(after),
            Scope::Request => after,
        };
        let answer = self.inner.call(call);
        let Some(after) = after else {
            return Either::Left(answer);
        };
        Either::Right(Box::pin(async move {
            let deadline = tokio::time::Instant::now() + after;
            match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(mut a)) if scope == Scope::Request => {
                    a.deadline = Some(deadline);
                    Ok(a)
                }
                Ok(result) => result,
                Err(_) => Err(match scope {
                    Scope::Request => Failure::Timeout { after },
                    Scope::Attempt => Failure::TryTimeout { after, endpoint },
                }),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::request::RequestBody;
    use crate::call::{HttpCall, HttpFailure};
    use http::{Request, Response};
    use tower::ServiceExt;

    fn slow(
        delay: Duration,
    ) -> impl Service<
        HttpCall,
        Response = Answer<Response<()>>,
        Error = HttpFailure,
        Future: Send + 'static,
    > + Clone {
        tower::service_fn(move |_c: HttpCall| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, HttpFailure>(Answer::new(Response::new(()), None))
        })
    }

    fn get() -> HttpCall {
        Call::new(Box::new(Request::new(RequestBody::empty())))
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_its_time_with_its_scope() {
        let started = tokio::time::Instant::now();
        let svc = TimeoutLayer::request(Some(Duration::from_millis(300)))
            .layer(slow(Duration::from_secs(10)));
        match svc.oneshot(get()).await {
            Err(Failure::Timeout { after }) => assert_eq!(after, Duration::from_millis(300)),
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        let svc = TimeoutLayer::attempt(Some(Duration::from_millis(50)))
            .layer(slow(Duration::from_secs(10)));
        assert!(matches!(
            svc.oneshot(get()).await,
            Err(Failure::TryTimeout { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_answer_and_no_timeout_pass() {
        let svc = TimeoutLayer::request(Some(Duration::from_millis(300)))
            .layer(slow(Duration::from_millis(100)));
        assert!(svc.oneshot(get()).await.is_ok());
        let svc = TimeoutLayer::request(None).layer(slow(Duration::from_secs(3600)));
        assert!(svc.oneshot(get()).await.is_ok());
    }

    /// A route's `per_try_timeout` (in the request's extensions) bounds each attempt,
    /// over the backend's own or none; the whole request's timeout is not its business.
    #[tokio::test(start_paused = true)]
    async fn a_route_s_attempt_timeout_overrides_the_backend_s() {
        let route = |after: u64| {
            let mut call = get();
            call.req
                .extensions_mut()
                .insert(RouteTryTimeout(Duration::from_millis(after)));
            call
        };
        for backend in [None, Some(Duration::from_secs(10))] {
            let svc = TimeoutLayer::attempt(backend).layer(slow(Duration::from_secs(1)));
            let started = tokio::time::Instant::now();
            match svc.oneshot(route(50)).await {
                Err(Failure::TryTimeout { after, .. }) => {
                    assert_eq!(after, Duration::from_millis(50));
                    assert_eq!(started.elapsed(), Duration::from_millis(50));
                }
                _ => panic!("the route's 50 ms, not {backend:?}"),
            }
        }
        let svc = TimeoutLayer::request(Some(Duration::from_secs(10)))
            .layer(slow(Duration::from_secs(1)));
        assert!(svc.oneshot(route(50)).await.is_ok());
    }
}
