//! Retries. A request that fails in a way its destination's policy names
//! (GOFE_RETRY_ON) is tried again, on an endpoint picked again, up to
//! GOFE_RETRY_LIMIT times, after an exponential backoff with full jitter, and only
//! while the destination's retry budget allows (a share of its requests plus a few a
//! second, so that retries never multiply the load on a failing destination).
//!
//! Only what is safe is replayed. A request that never left (connect failure) or that
//! the peer refused unprocessed (HTTP/2 REFUSED_STREAM) is always safe; after a
//! response (5xx, a gRPC status), a reset or a per-try timeout the endpoint may have
//! acted on it, so only idempotent methods, or destinations whose routes are marked
//! retryable, are tried again. Bodies are replayed from a bounded copy kept while they
//! stream (GOFE_RETRY_MAX_BODY); a larger body is never retried once it has been sent.
//! Each attempt carries `gofe-attempt: N`.
//!
//! A connection of its own (opaque TCP, a tunnel, an upgrade) is retried on another
//! endpoint when it could not be made, under the same limit, budget and backoff
//! (`RetryConnect`).

use super::budget::RetryBudget;
use crate::body::replay::Replay;
use crate::body::request::RequestBody;
use crate::call::{
    Answer, BoxFuture, Call, ConnectCall, ConnectFailure, Failure, HttpCall, HttpFailure,
};
use crate::config::policy::{Policy, RetryPolicy, RouteRetry};
use crate::metrics::Metrics;
use crate::proto::{grpc, headers};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Request, Response};
use http_body::Body;
use std::borrow::Cow;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::retry::budget::Budget;
use tower::{Layer, Service, ServiceExt};

/// Parsed once: a name given as text is parsed (and checked) at every insert, about
/// 800 instructions a request.
pub const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("gofe-attempt");

/// A destination's retry budget.
pub fn budget(p: &RetryPolicy) -> RetryBudget {
    RetryBudget::new(p.budget_ratio, p.budget_min_per_sec)
}

/// Where retries are counted: `gofe_retries_total` and
/// `gofe_retry_budget_exhausted_total` under the destination's name.
#[derive(Clone)]
pub struct RetryStats {
    pub destination: Arc<str>,
    pub metrics: Arc<Metrics>,
}

/// What every retry is measured against: the policy's limit, the destination's
/// budget, and the backoff; and where retries are counted.
#[derive(Clone)]
pub struct RetryLayer {
    policy: Arc<Policy>,
    budget: Arc<RetryBudget>,
    stats: RetryStats,
}

impl RetryLayer {
    pub fn new(policy: Arc<Policy>, budget: Arc<RetryBudget>, stats: RetryStats) -> Self {
        Self {
            policy,
            budget,
            stats,
        }
    }

    /// Whether retry `attempt` (1 for the first) may go, for `reason`: within the limit
    /// and the budget, counted either way.
    fn allow(&self, attempt: u32, reason: &str) -> bool {
        if attempt > self.policy.retry.limit {
            return false;
        }
        if !self.budget.withdraw() {
            self.stats
                .metrics
                .retry_budget_exhausted(&self.stats.destination);
            return false;
        }
        self.stats.metrics.retry(&self.stats.destination, reason);
        true
    }

    /// The wait before retry `attempt`.
    async fn back_off(&self, attempt: u32) {
        let p = &self.policy.retry;
        tokio::time::sleep(backoff(p.backoff_min, p.backoff_max, attempt)).await;
    }

    /// The layer for connections of their own.
    pub fn for_connections(&self) -> RetryConnectLayer {
        RetryConnectLayer(self.clone())
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            cfg: Arc::new(self.clone()),
        }
    }
}

/// One `Arc` of settings, cloned for every request (an atomic increment and decrement,
/// where the fields apart were four).
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    cfg: Arc<RetryLayer>,
}

impl<S, B> Service<HttpCall> for Retry<S>
where
    S: Service<HttpCall, Response = Answer<Response<B>>, Error = HttpFailure>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Answer<Response<B>>;
    type Error = HttpFailure;
    type Future = BoxFuture<Result<Answer<Response<B>>, HttpFailure>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), HttpFailure>> {
        // Each attempt waits for the inner service itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: HttpCall) -> Self::Future {
        Box::pin(run(self.inner.clone(), self.cfg.clone(), call))
    }
}

/// Retries connections of their own that could not be made, on another endpoint.
#[derive(Clone)]
pub struct RetryConnectLayer(RetryLayer);

impl<S> Layer<S> for RetryConnectLayer {
    type Service = RetryConnect<S>;

    fn layer(&self, inner: S) -> RetryConnect<S> {
        RetryConnect {
            inner,
            cfg: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RetryConnect<S> {
    inner: S,
    cfg: RetryLayer,
}

impl<S, T> Service<ConnectCall> for RetryConnect<S>
where
    S: Service<ConnectCall, Response = Answer<T>, Error = ConnectFailure> + Clone + Send + 'static,
    S::Future: Send + 'static,
    T: Send + 'static,
{
    type Response = Answer<T>;
    type Error = ConnectFailure;
    type Future = BoxFuture<Result<Answer<T>, ConnectFailure>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectFailure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: ConnectCall) -> Self::Future {
        let mut inner = self.inner.clone();
        let cfg = self.cfg.clone();
        Box::pin(async move {
            cfg.budget.deposit();
            let on = &cfg.policy.retry.on;
            let retries_connects = on.connect_failure || on.status_5xx || on.gateway_error;
            let orig_dst = call.orig_dst;
            let mut req = call.req;
            let mut tried = Vec::new();
            let mut attempt = 1;
            loop {
                let call = Call {
                    req,
                    endpoint: None,
                    tried: tried.clone(),
                    orig_dst,
                    client: None,
                    resend_refused: false,
                };
                match inner.ready().await?.call(call).await {
                    Ok(mut a) => {
                        a.retries = attempt - 1;
                        return Ok(a);
                    }
                    Err(Failure::Unsent {
                        req: unsent,
                        endpoint,
                        error,
                    }) if retries_connects => {
                        if !cfg.allow(attempt, "connect-failure") {
                            return Err(Failure::Unsent {
                                req: unsent,
                                endpoint,
                                error,
                            });
                        }
                        tried.extend(endpoint);
                        cfg.back_off(attempt).await;
                        req = unsent;
                        attempt += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }
}

/// `gofe-attempt`'s value: static for the attempts a retry limit allows.
fn attempt_value(n: u32) -> HeaderValue {
    const STATIC: [&str; 12] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"];
    match STATIC.get(n as usize) {
        Some(s) => HeaderValue::from_static(s),
        None => HeaderValue::from(n),
    }
}

/// Methods whose repetition has the effect of doing them once (RFC 9110 §9.2.2).
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Why a result may be tried again, and whether that needs the request sent again
/// (rather than handed back unsent).
struct Verdict {
    reason: Cow<'static, str>,
    replay: bool,
}

fn grpc_name(code: u16) -> &'static str {
    match code {
        1 => "grpc-cancelled",
        4 => "grpc-deadline-exceeded",
        8 => "grpc-resource-exhausted",
        14 => "grpc-unavailable",
        _ => "grpc",
    }
}

fn judge<B>(
    result: &Result<Answer<Response<B>>, HttpFailure>,
    p: &RetryPolicy,
    safe: bool,
) -> Option<Verdict> {
    let on = &p.on;
    let verdict = |reason: Cow<'static, str>, replay| Some(Verdict { reason, replay });
    match result {
        Ok(a) => {
            if !safe {
                return None;
            }
            let status = a.value.status().as_u16();
            // A trailers-only gRPC response has its status in the headers.
            if on.any_grpc()
                && let Some(g) = grpc::status(a.value.headers())
                && on.grpc(g)
            {
                return verdict(grpc_name(g).into(), true);
            }
            let by_status = (on.status_5xx && status >= 500)
                || (on.gateway_error && (502..=504).contains(&status))
                || (on.retriable_status_codes && p.status_codes.contains(&status));
            if by_status {
                return verdict(status.to_string().into(), true);
            }
            None
        }
        // A refused stream whose request came back unsent (`Call::resend_refused`).
        Err(Failure::Unsent { error, .. }) if error.is_refused_stream() => {
            (on.refused_stream || on.status_5xx).then(|| Verdict {
                reason: "refused-stream".into(),
                replay: false,
            })
        }
        Err(Failure::Unsent { .. }) => (on.connect_failure || on.status_5xx || on.gateway_error)
            .then(|| Verdict {
                reason: "connect-failure".into(),
                replay: false,
            }),
        Err(Failure::Lost { refused: true, .. }) => {
            (on.refused_stream || on.status_5xx).then(|| Verdict {
                reason: "refused-stream".into(),
                replay: true,
            })
        }
        Err(Failure::Lost { refused: false, .. }) => {
            (safe && (on.reset || on.status_5xx || on.gateway_error)).then(|| Verdict {
                reason: "reset".into(),
                replay: true,
            })
        }
        Err(Failure::TryTimeout { .. }) => {
            (safe && (on.status_5xx || on.gateway_error || on.reset)).then(|| Verdict {
                reason: "per-try-timeout".into(),
                replay: true,
            })
        }
        Err(_) => None,
    }
}

/// The wait before retry `n` (1 for the first): a random time up to
/// min(max, min x 2^(n-1)).
pub fn backoff(min: Duration, max: Duration, n: u32) -> Duration {
    let ceiling = min
        .saturating_mul(1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX))
        .min(max);
    Duration::from_nanos(fastrand::u64(0..=ceiling.as_nanos() as u64))
}

/// Another copy of a head `headers::copy_head` made.
fn copy_head(p: &Parts) -> Parts {
    let mut r = Request::new(());
    *r.method_mut() = p.method.clone();
    *r.uri_mut() = p.uri.clone();
    *r.version_mut() = p.version;
    *r.headers_mut() = p.headers.clone();
    *r.extensions_mut() = p.extensions.clone();
    r.into_parts().0
}

/// One request through its attempts. A plain fn returning an async block rather than an
/// `async fn`: an `async fn` keeps every by-value argument twice in its state (the
/// argument and the local it is moved to), and this future is boxed for every request,
/// where over 1 KiB takes malloc's slow path.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice"
)]
fn run<S, B>(
    mut inner: S,
    cfg: Arc<RetryLayer>,
    call: HttpCall,
) -> impl Future<Output = Result<Answer<Response<B>>, HttpFailure>>
where
    S: Service<HttpCall, Response = Answer<Response<B>>, Error = HttpFailure>,
{
    async move {
        // A route's own settings, when its rule gives them, over the destination's.
        let route = call
            .req
            .extensions()
            .get::<RouteRetry>()
            .map(|r| r.0.clone());
        let p = route.as_deref().unwrap_or(&cfg.policy.retry);
        cfg.budget.deposit();
        let safe = p.retryable || is_idempotent(call.req.method());
        let orig_dst = call.orig_dst;
        let on = &p.on;
        // Whether any condition could send the request again after it went out (as
        // `judge` decides: a refused stream whatever the method, the rest when safe).
        let sent_again_by_answer = on.status_5xx
            || (safe
                && (on.gateway_error || on.reset || on.retriable_status_codes || on.any_grpc()));
        let sent_again_possible = p.limit > 0 && (on.refused_stream || sent_again_by_answer);
        // The request stays in its box.
        let mut req = call.req;
        // What a later attempt needs when the first one went out: a copy of the head, and
        // of the body while it stays small enough (taken out and put back as a replay).
        let empty = req.body().is_end_stream();
        let mut replay = None;
        if sent_again_possible && !empty && req.body().size_hint().lower() <= p.max_body as u64 {
            let body = std::mem::replace(req.body_mut(), RequestBody::empty());
            *req.body_mut() = match body.into_source() {
                Ok(source) => {
                    let r = Replay::new(source, p.max_body);
                    let b = r.body().expect("a new replay has a body");
                    replay = Some(r);
                    RequestBody::replay(b)
                }
                Err(body) => body,
            };
        }
        // A bodiless request that only a refused stream could send again is given back by
        // the send path (`Call::resend_refused`), which copies its head only when it goes
        // over HTTP/2; the default GOFE_RETRY_ON is that case.
        let resend_refused = empty && p.limit > 0 && on.refused_stream && !sent_again_by_answer;
        let head = (sent_again_possible && !resend_refused && (empty || replay.is_some()))
            .then(|| headers::copy_head(&req));
        let mut tried = Vec::new();
        let mut attempt: u32 = 1;
        loop {
            req.headers_mut()
                .insert(ATTEMPT_HEADER, attempt_value(attempt));
            let body_id = req.body().replay_id();
            let svc = inner.ready().await?;
            let result = svc
                .call(Call {
                    req,
                    endpoint: None,
                    tried: tried.clone(),
                    orig_dst,
                    client: None,
                    resend_refused,
                })
                .await;
            let endpoint = match &result {
                Ok(a) => a.endpoint,
                Err(f) => f.endpoint(),
            };
            tried.extend(endpoint);
            let finish = |mut result: Result<Answer<Response<B>>, HttpFailure>| {
                if let (Some(r), Some(id)) = (&replay, body_id) {
                    r.commit(id);
                }
                if let Ok(a) = &mut result {
                    a.retries = attempt - 1;
                }
                result
            };
            let Some(verdict) = judge(&result, p, safe) else {
                return finish(result);
            };
            if attempt > p.limit {
                return finish(result);
            }
            // A request that went out is sent again from the copies, if they are whole; one
            // that did not comes back with the failure.
            let can_replay =
                head.is_some() && (empty || replay.as_ref().is_some_and(|r| r.replayable()));
            if verdict.replay && !can_replay {
                return finish(result);
            }
            if !cfg.budget.withdraw() {
                cfg.stats
                    .metrics
                    .retry_budget_exhausted(&cfg.stats.destination);
                return finish(result);
            }
            let next = if verdict.replay {
                // Only now is the attempt given up: its body fails from here on.
                let body = if empty {
                    Some(RequestBody::empty())
                } else {
                    replay
                        .as_ref()
                        .and_then(|r| r.body())
                        .map(RequestBody::replay)
                };
                match (head.as_ref(), body) {
                    (Some(head), Some(body)) => {
                        // The failed attempt's response goes (its connection with it) now.
                        drop(result);
                        Box::new(Request::from_parts(copy_head(head), body))
                    }
                    // The body outgrew the copy between the check and now.
                    _ => return finish(result),
                }
            } else {
                match result {
                    Err(Failure::Unsent { req, .. }) => req,
                    _ => unreachable!("only an unsent request comes back"),
                }
            };
            cfg.stats
                .metrics
                .retry(&cfg.stats.destination, &verdict.reason);
            // Boxed: a timer is 112 bytes every request's future would carry for the
            // rare one that waits.
            Box::pin(tokio::time::sleep(backoff(
                p.backoff_min,
                p.backoff_max,
                attempt,
            )))
            .await;
            req = next;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addrs::EndpointAddr;
    use crate::body::source::Source;
    use crate::client::error::SendError;
    use crate::connect::error::ConnectError;
    use bytes::Bytes;
    use http::{Response, StatusCode};
    use http_body_util::BodyExt;
    use parking_lot::Mutex;
    use std::collections::HashMap;

    /// What the fake endpoint saw: (attempt header, method, body) per attempt.
    type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

    #[derive(Clone, Copy)]
    enum Behaviour {
        Status(u16),
        /// A trailers-only gRPC response: 200, its `grpc-status` in the headers.
        Grpc(u16),
        Refuse,
        Reset,
        /// An HTTP/2 stream refused, as the send path reports it: the request back,
        /// unsent, when the call asked for it (`resend_refused`), else lost.
        RefusedStream,
    }

    /// An endpoint that behaves as told for the first `n` attempts, then answers 200.
    fn endpoint(
        bad: Behaviour,
        n: usize,
        seen: Seen,
    ) -> impl Service<
        HttpCall,
        Response = Answer<Response<()>>,
        Error = HttpFailure,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |call: HttpCall| {
            let seen = seen.clone();
            async move {
                let addr = EndpointAddr::new("10.0.0.1:80".parse().unwrap());
                let attempt = call.req.headers()[ATTEMPT_HEADER]
                    .to_str()
                    .unwrap()
                    .to_string();
                let method = call.req.method().to_string();
                let behaviour = if seen.lock().len() < n {
                    Some(bad)
                } else {
                    None
                };
                if let Some(Behaviour::RefusedStream) = behaviour {
                    let method = format!("{method} resend_refused={}", call.resend_refused);
                    seen.lock().push((attempt, method, Vec::new()));
                    let error = SendError::H2 {
                        addr,
                        source: h2::Reason::REFUSED_STREAM.into(),
                    };
                    return Err(if call.resend_refused {
                        Failure::Unsent {
                            error,
                            req: call.req,
                            endpoint: Some(addr),
                        }
                    } else {
                        Failure::Lost {
                            error,
                            refused: true,
                            endpoint: Some(addr),
                        }
                    });
                }
                if let Some(Behaviour::Refuse) = behaviour {
                    seen.lock().push((attempt, method, Vec::new()));
                    return Err(Failure::Unsent {
                        error: SendError::Connect(ConnectError::Refused { addr }),
                        req: call.req,
                        endpoint: Some(addr),
                    });
                }
                let body = call
                    .req
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes().to_vec())
                    .unwrap_or_default();
                seen.lock().push((attempt, method, body));
                match behaviour {
                    Some(Behaviour::Status(s)) => {
                        let mut rsp = Response::new(());
                        *rsp.status_mut() = StatusCode::from_u16(s).unwrap();
                        Ok(Answer::new(rsp, Some(addr)))
                    }
                    Some(Behaviour::Grpc(g)) => {
                        let mut rsp = Response::new(());
                        rsp.headers_mut()
                            .insert("grpc-status", HeaderValue::from(g));
                        Ok(Answer::new(rsp, Some(addr)))
                    }
                    Some(Behaviour::Reset) => Err(Failure::Lost {
                        error: SendError::Connect(ConnectError::Refused { addr }),
                        refused: false,
                        endpoint: Some(addr),
                    }),
                    _ => Ok(Answer::new(Response::new(()), Some(addr))),
                }
            }
        })
    }

    fn policy(vars: &[(&str, &str)]) -> Arc<Policy> {
        let base: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // (The tests run on tokio's paused clock: backoffs take no real time.)
        Arc::new(Policy::with_overrides(&base, &HashMap::new()).unwrap())
    }

    fn layer(p: &Arc<Policy>) -> (RetryLayer, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let stats = RetryStats {
            destination: "api:80".into(),
            metrics: metrics.clone(),
        };
        (
            RetryLayer::new(p.clone(), Arc::new(budget(&p.retry)), stats),
            metrics,
        )
    }

    fn request(method: Method, body: &'static [u8]) -> HttpCall {
        let body = if body.is_empty() {
            RequestBody::empty()
        } else {
            RequestBody::new(Source::boxed(http_body_util::Full::new(
                Bytes::from_static(body),
            )))
        };
        let mut req = Request::new(body);
        *req.method_mut() = method;
        Call::new(Box::new(req))
    }

    async fn status(
        svc: Retry<
            impl Service<
                HttpCall,
                Response = Answer<Response<()>>,
                Error = HttpFailure,
                Future: Send + 'static,
            > + Clone
            + Send
            + 'static,
        >,
        call: HttpCall,
    ) -> Result<u16, String> {
        svc.oneshot(call)
            .await
            .map(|a| a.value.status().as_u16())
            .map_err(|e| e.to_string())
    }

    #[tokio::test(start_paused = true)]
    async fn a_get_is_retried_on_503_with_the_attempt_numbered() {
        let p = policy(&[("GOFE_RETRY_ON", "5xx")]);
        let seen = Seen::default();
        let svc = layer(&p)
            .0
            .layer(endpoint(Behaviour::Status(503), 2, seen.clone()));
        assert_eq!(status(svc, request(Method::GET, b"")).await.unwrap(), 200);
        let attempts: Vec<String> = seen.lock().iter().map(|s| s.0.clone()).collect();
        assert_eq!(attempts, ["1", "2", "3"]);
    }

    /// A trailers-only gRPC answer is retried when GOFE_RETRY_ON names its status, and
    /// only then: not for another status, nor when no gRPC condition is on (then
    /// `grpc-status` is not even looked up). gRPC calls are POSTs: retried after an
    /// answer only when the destination is marked retryable.
    #[tokio::test(start_paused = true)]
    async fn a_grpc_status_is_retried_when_its_condition_is_on() {
        let attempts = |on: &'static str, g: u16| async move {
            let p = policy(&[("GOFE_RETRY_ON", on), ("GOFE_RETRYABLE", "true")]);
            let seen = Seen::default();
            let svc = layer(&p)
                .0
                .layer(endpoint(Behaviour::Grpc(g), 1, seen.clone()));
            assert_eq!(status(svc, request(Method::POST, b"")).await.unwrap(), 200);
            seen.lock().len()
        };
        assert_eq!(attempts("unavailable", 14).await, 2, "UNAVAILABLE retried");
        assert_eq!(attempts("cancelled,resource-exhausted", 8).await, 2);
        assert_eq!(
            attempts("unavailable", 8).await,
            1,
            "RESOURCE_EXHAUSTED is not named"
        );
        assert_eq!(attempts("5xx", 14).await, 1, "no gRPC condition is on");
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_holds_and_the_last_answer_is_returned() {
        let p = policy(&[("GOFE_RETRY_ON", "5xx"), ("GOFE_RETRY_LIMIT", "1")]);
        let seen = Seen::default();
        let svc = layer(&p)
            .0
            .layer(endpoint(Behaviour::Status(503), 100, seen.clone()));
        assert_eq!(status(svc, request(Method::GET, b"")).await.unwrap(), 503);
        assert_eq!(seen.lock().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_is_not_retried_on_503_unless_retryable_and_then_its_body_is_replayed() {
        let p = policy(&[("GOFE_RETRY_ON", "5xx")]);
        let seen = Seen::default();
        let svc = layer(&p)
            .0
            .layer(endpoint(Behaviour::Status(503), 1, seen.clone()));
        assert_eq!(
            status(svc, request(Method::POST, b"order 66"))
                .await
                .unwrap(),
            503
        );
        assert_eq!(seen.lock().len(), 1);

        let p = policy(&[("GOFE_RETRY_ON", "5xx"), ("GOFE_RETRYABLE", "true")]);
        let seen = Seen::default();
        let svc = layer(&p)
            .0
            .layer(endpoint(Behaviour::Status(503), 1, seen.clone()));
        assert_eq!(
            status(svc, request(Method::POST, b"order 66"))
                .await
                .unwrap(),
            200
        );
        let seen = seen.lock();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].2, b"order 66");
        assert_eq!(
            seen[1].2, b"order 66",
            "the second attempt gets the same body"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_failure_is_retried_even_for_a_post_with_its_body_intact() {
        let p = policy(&[]);
        let seen = Seen::default();
        let svc = layer(&p)
            .0
            .layer(endpoint(Behaviour::Refuse, 1, seen.clone()));
        assert_eq!(
            status(svc, request(Method::POST, b"payload"))
                .await
                .unwrap(),
            200
        );
        let seen = seen.lock();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].2, b"payload");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_stream_is_retried_from_the_request_the_send_path_gives_back() {
        // The default GOFE_RETRY_ON (connect-failure, refused-stream): a bodiless
        // request is not copied here; the send path is asked to give it back.
        let p = policy(&[]);
        let (retry, metrics) = layer(&p);
        let seen = Seen::default();
        let svc = retry.layer(endpoint(Behaviour::RefusedStream, 1, seen.clone()));
        assert_eq!(status(svc, request(Method::GET, b"")).await.unwrap(), 200);
        assert_eq!(seen.lock()[0].1, "GET resend_refused=true");
        assert_eq!(seen.lock().len(), 2);
        assert_eq!(
            metrics.retries_by_reason("api:80"),
            [(Arc::from("refused-stream"), 1)]
        );

        // A non-idempotent one too: a refused stream was never processed.
        let seen = Seen::default();
        let svc = retry.layer(endpoint(Behaviour::RefusedStream, 1, seen.clone()));
        assert_eq!(status(svc, request(Method::POST, b"")).await.unwrap(), 200);
        assert_eq!(seen.lock().len(), 2);

        // When an answer could also send it again (5xx), the layer keeps its own copy
        // and a refused stream is retried from it.
        let p = policy(&[("GOFE_RETRY_ON", "refused-stream,5xx")]);
        let seen = Seen::default();
        let svc = layer(&p)
            .0
            .layer(endpoint(Behaviour::RefusedStream, 1, seen.clone()));
        assert_eq!(status(svc, request(Method::GET, b"")).await.unwrap(), 200);
        assert_eq!(seen.lock()[0].1, "GET resend_refused=false");
        assert_eq!(seen.lock().len(), 2);

        // A body is the replay's to keep, whatever the policy.
        let p = policy(&[]);
        let seen = Seen::default();
        let svc = layer(&p)
            .0
            .layer(endpoint(Behaviour::RefusedStream, 1, seen.clone()));
        assert_eq!(
            status(svc, request(Method::PUT, b"payload")).await.unwrap(),
            200
        );
        assert_eq!(seen.lock()[0].1, "PUT resend_refused=false");
        assert_eq!(seen.lock()[1].2, b"payload");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_over_the_cap_is_not_replayed() {
        let p = policy(&[("GOFE_RETRY_ON", "5xx"), ("GOFE_RETRY_MAX_BODY", "4")]);
        let seen = Seen::default();
        let svc = layer(&p)
            .0
            .layer(endpoint(Behaviour::Status(503), 1, seen.clone()));
        assert_eq!(
            status(svc, request(Method::PUT, b"more than four"))
                .await
                .unwrap(),
            503
        );
        assert_eq!(seen.lock().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn resets_retry_idempotent_requests_only() {
        let p = policy(&[("GOFE_RETRY_ON", "reset")]);
        let seen = Seen::default();
        let svc = layer(&p)
            .0
            .layer(endpoint(Behaviour::Reset, 1, seen.clone()));
        assert_eq!(
            status(svc, request(Method::DELETE, b"")).await.unwrap(),
            200
        );
        let seen = Seen::default();
        let svc = layer(&p)
            .0
            .layer(endpoint(Behaviour::Reset, 1, seen.clone()));
        assert!(status(svc, request(Method::POST, b"")).await.is_err());
        assert_eq!(seen.lock().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_at_its_share_of_requests() {
        let p = policy(&[
            ("GOFE_RETRY_ON", "5xx"),
            ("GOFE_RETRY_BUDGET_RATIO", "0.2"),
            ("GOFE_RETRY_BUDGET_MIN_PER_SEC", "0"),
        ]);
        let (layer, metrics) = layer(&p);
        let seen = Seen::default();
        let svc = layer.layer(endpoint(Behaviour::Status(503), usize::MAX, seen.clone()));
        for _ in 0..100 {
            assert_eq!(
                status(svc.clone(), request(Method::GET, b""))
                    .await
                    .unwrap(),
                503
            );
        }
        assert_eq!(
            seen.lock().len(),
            120,
            "100 requests and one retry per five of them"
        );
        assert_eq!(metrics.retries_total("api:80"), 20);
        // Every request ended wanting one more retry than the budget allowed.
        assert_eq!(metrics.budget_exhausted_total("api:80"), 100);
    }

    #[test]
    fn backoff_is_exponential_with_full_jitter() {
        let (min, max) = (Duration::from_millis(25), Duration::from_millis(250));
        for n in 1..8 {
            let ceiling = (min * 2u32.pow(n - 1)).min(max);
            let waits: Vec<Duration> = (0..200).map(|_| backoff(min, max, n)).collect();
            assert!(waits.iter().all(|w| *w <= ceiling), "retry {n}");
            assert!(
                waits.iter().any(|w| *w < ceiling / 2),
                "jitter reaches down"
            );
        }
        assert!(backoff(min, max, 40) <= max);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_not_made_is_tried_again_avoiding_the_endpoints_tried() {
        let p = policy(&[("GOFE_RETRY_LIMIT", "2")]);
        let (layer, metrics) = layer(&p);
        let seen: Arc<Mutex<Vec<Vec<EndpointAddr>>>> = Default::default();
        let record = seen.clone();
        let inner = tower::service_fn(move |call: ConnectCall| {
            let seen = record.clone();
            async move {
                let n = seen.lock().len();
                seen.lock().push(call.tried.clone());
                let addr = EndpointAddr::new(format!("10.0.0.{}:80", n + 1).parse().unwrap());
                if n < 3 {
                    Err(Failure::Unsent {
                        error: SendError::Connect(ConnectError::Refused { addr }),
                        req: call.req,
                        endpoint: Some(addr),
                    })
                } else {
                    Ok(Answer::new((), Some(addr)))
                }
            }
        });
        let svc = layer.for_connections().layer(inner);
        let call = || Call::new(crate::call::ConnectTo { alpn: b"gofe/tcp" });
        let failed = svc.clone().oneshot(call()).await;
        assert!(
            matches!(failed, Err(Failure::Unsent { .. })),
            "two retries, then the failure"
        );
        let tried = seen.lock().clone();
        let addr = |i: u8| EndpointAddr::new(format!("10.0.0.{i}:80").parse().unwrap());
        assert_eq!(tried, vec![vec![], vec![addr(1)], vec![addr(1), addr(2)]]);
        assert_eq!(metrics.retries_total("api:80"), 2);
        let ok = svc.oneshot(call()).await.unwrap();
        assert_eq!(ok.retries, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_waits_for_its_backoff_on_the_clock() {
        let p = policy(&[("GOFE_RETRY_ON", "5xx"), ("GOFE_RETRY_BACKOFF", "1s..1s")]);
        let seen = Seen::default();
        let svc = layer(&p)
            .0
            .layer(endpoint(Behaviour::Status(503), 1, seen.clone()));
        let started = tokio::time::Instant::now();
        assert_eq!(status(svc, request(Method::GET, b"")).await.unwrap(), 200);
        assert_eq!(seen.lock().len(), 2);
        assert!(
            started.elapsed() <= Duration::from_secs(1),
            "full jitter: at most the ceiling, {:?}",
            started.elapsed()
        );
    }
}
