//! A request a traffic rule's route took: faults injected first (as the rule asks),
//! then its backend drawn (by the user's sticky key when the route has one, the
//! cookie set on the response when the client had none), a copy sent to the mirror
//! (its body too, within GOFE_RETRY_MAX_BODY, copied as it streams to the backend),
//! and the request sent through the route's rate limit and timeout to the backend's
//! own stack. Counted under the route and backend.

use super::conn::HttpConn;
use super::errors::ProxyError;
use crate::body::request::RequestBody;
use crate::body::source::{BoxError, Source};
use crate::call::{Call, Failure, HttpAnswer, HttpCall, Routed};
use crate::config::policy::{RouteRetry, RouteTryTimeout};
use crate::config::rules::{MirrorSpec, Sticky};
use crate::route::destination::Destination;
use crate::route::routes::Routes;
use crate::route::split::{self, Choice};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, header};
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::sync::oneshot;
use tower::{Layer, ServiceExt};

/// How long a mirrored copy may take before it is given up.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

fn chance(percent: f64) -> bool {
    percent > 0.0 && fastrand::f64() * 100.0 < percent
}

/// The value of cookie `name` in `headers`.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Forwards `call` along route `index` of `routes`, a route of `d`.
pub async fn forward(
    conn: &HttpConn,
    d: &Arc<Destination>,
    routes: Arc<Routes>,
    index: usize,
    mut call: HttpCall,
) -> Result<HttpAnswer, ProxyError> {
    let route = &routes.list[index];
    let spec = &route.spec;
    if let Some(f) = &spec.fault {
        if let Some(a) = &f.abort
            && chance(a.percent)
        {
            // Before any backend is drawn: the route alone labels it.
            let routed = Routed {
                route: spec.name.clone(),
                backend: "".into(),
            };
            return Err(ProxyError::Fault {
                route: spec.name.clone(),
                status: a.status,
            }
            .on_route(routed));
        }
        if let Some(delay) = &f.delay
            && chance(delay.percent)
        {
            tokio::time::sleep(delay.duration).await;
        }
    }

    let mut set_cookie = None;
    let key = match &spec.sticky {
        None => None,
        Some(Sticky::Header(h)) => call
            .req
            .headers()
            .get(h)
            .map(|v| split::hash(&[v.as_bytes()])),
        Some(Sticky::Cookie { name, ttl }) => match cookie(call.req.headers(), name) {
            Some(v) => Some(split::hash(&[v.as_bytes()])),
            None => {
                let user = format!("{:016x}", fastrand::u64(..));
                set_cookie = HeaderValue::from_str(&format!(
                    "{name}={user}; Path=/; Max-Age={}; HttpOnly",
                    ttl.as_secs()
                ))
                .ok();
                Some(split::hash(&[user.as_bytes()]))
            }
        },
    };

    let backend = if spec.backends.is_empty() {
        d.clone()
    } else {
        let candidates: Vec<Arc<Destination>> = spec
            .backends
            .iter()
            .map(|b| conn.ctx.destinations.get(b.destination.clone()))
            .collect();
        let choices: Vec<Choice<'_>> = candidates
            .iter()
            .zip(&spec.backends)
            .map(|(c, b)| Choice {
                name: &c.name,
                weight: b.weight,
                ready: c.balancer.might_serve(),
            })
            .collect();
        match split::pick(&choices, key) {
            Some(i) => candidates[i].clone(),
            None => d.clone(),
        }
    };

    if let Some(m) = &spec.mirror
        && chance(m.percent)
    {
        mirror(conn, m, &mut call.req, d.policy().retry.max_body);
    }

    let routed = Routed {
        route: spec.name.clone(),
        backend: backend.name.clone(),
    };
    if let Some(retry) = &spec.retry {
        call.req.extensions_mut().insert(RouteRetry(retry.clone()));
    }
    if let Some(after) = spec.per_try_timeout {
        call.req.extensions_mut().insert(RouteTryTimeout(after));
    }
    let stack = route.limit.layer(backend.http_stack());
    let answer = match spec.timeout {
        Some(after) => tokio::time::timeout(after, stack.oneshot(call))
            .await
            .unwrap_or(Err(Failure::Timeout { after })),
        None => stack.oneshot(call).await,
    };
    // Refused by the route's or the backend's limits, shed, timed out...: the answer
    // the proxy writes is counted under the route and backend too.
    let mut answer = answer.map_err(|f| ProxyError::from(f).on_route(routed.clone()))?;
    answer.routed = Some(routed);
    if let Some(c) = set_cookie {
        answer.value.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(answer)
}

/// `host-shadow[:port]`: the authority a mirrored copy carries, so that the mirror
/// (and its logs) can tell copies from real requests.
fn shadow(authority: &str) -> Option<HeaderValue> {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (authority, None),
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (authority, None),
    };
    let value = match port {
        Some(p) => format!("{host}-shadow:{p}"),
        None => format!("{host}-shadow"),
    };
    HeaderValue::from_str(&value).ok()
}

/// The real request's body on its way to the backend, a copy of which goes to the
/// mirror once all of it has passed (nothing is waited for: the copy keeps the chunks,
/// which share their bytes). Past `max` bytes the mirror is told to go without.
struct Tee {
    inner: RequestBody,
    chunks: Vec<Bytes>,
    len: usize,
    max: usize,
    /// The whole body (Some), or None when it outgrew `max`; dropped unsent when the
    /// body broke off.
    done: Option<oneshot::Sender<Option<Bytes>>>,
}

impl Tee {
    fn finish(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(Some(Bytes::from(self.chunks.concat())));
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(data), Some(_)) = (f.data_ref(), &this.done) {
                    this.len += data.len();
                    if this.len > this.max {
                        this.chunks = Vec::new();
                        if let Some(tx) = this.done.take() {
                            let _ = tx.send(None);
                        }
                    } else {
                        this.chunks.push(data.clone());
                    }
                }
            }
            Some(Err(_)) => this.done = None,
            None => {}
        }
        if frame.is_none() || this.inner.is_end_stream() {
            this.finish();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Sends a copy of `req` to the mirror, in a task of its own: its response is
/// dropped, and nothing it does reaches the real request. A body goes too when it is
/// within `max_body` (GOFE_RETRY_MAX_BODY), copied as the real request streams it; a
/// bigger one is not mirrored (`skipped_body`).
fn mirror(conn: &HttpConn, m: &MirrorSpec, req: &mut Request<RequestBody>, max_body: usize) {
    let mirror_name: Arc<str> = m.destination.to_string().into();
    let metrics = conn.ctx.metrics.clone();
    if req.body().size_hint().lower() > max_body as u64 {
        metrics.mirrored(&mirror_name, "skipped_body");
        return;
    }
    let mut copy = Request::new(RequestBody::empty());
    *copy.method_mut() = req.method().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    let authority = crate::proto::headers::authority(req)
        .map(|a| a.as_str().to_string())
        .unwrap_or_else(|| mirror_name.to_string());
    let Some(shadowed) = shadow(&authority) else {
        metrics.mirrored(&mirror_name, "skipped");
        return;
    };
    let mut uri = req.uri().clone().into_parts();
    if uri.authority.is_some() {
        uri.authority = shadowed.to_str().ok().and_then(|s| s.parse().ok());
    }
    match http::Uri::from_parts(uri) {
        Ok(u) => *copy.uri_mut() = u,
        Err(_) => {
            metrics.mirrored(&mirror_name, "skipped");
            return;
        }
    }
    copy.headers_mut().insert(header::HOST, shadowed);
    let body = (!req.body().is_end_stream()).then(|| {
        let (tx, rx) = oneshot::channel();
        let inner = std::mem::replace(req.body_mut(), RequestBody::empty());
        *req.body_mut() = RequestBody::new(Source::boxed(Tee {
            inner,
            chunks: Vec::new(),
            len: 0,
            max: max_body,
            done: Some(tx),
        }));
        rx
    });
    let destination = conn.ctx.destinations.get(m.destination.clone());
    tokio::spawn(async move {
        if let Some(rx) = body {
            let whole = match tokio::time::timeout(MIRROR_TIMEOUT, rx).await {
                Ok(Ok(Some(b))) => b,
                Ok(Ok(None)) => {
                    metrics.mirrored(&mirror_name, "skipped_body");
                    return;
                }
                // The real request's body broke off, or never ended.
                _ => {
                    metrics.mirrored(&mirror_name, "error");
                    return;
                }
            };
            let full = http_body_util::Full::new(whole);
            *copy.body_mut() = RequestBody::new(Source::boxed(full));
        }
        let sent = tokio::time::timeout(
            MIRROR_TIMEOUT,
            destination.http_stack().oneshot(Call::new(Box::new(copy))),
        )
        .await;
        let result = match sent {
            Ok(Ok(a)) if !a.value.status().is_server_error() => "ok",
            _ => "error",
        };
        metrics.mirrored(&mirror_name, result);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shadow_authority_keeps_the_port() {
        assert_eq!(shadow("api.demo:80").unwrap(), "api.demo-shadow:80");
        assert_eq!(shadow("api.demo").unwrap(), "api.demo-shadow");
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; gofe-sticky=u42"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, "gofe-sticky"), Some("u42"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
