//! What is observed of one request, as a layer around everything the proxy does with
//! it: from its start to the end of its response body, its latency and status in the
//! request metrics (always), its span (with a trace collector) and its access log
//! entry (with `GOFE_ACCESS_LOG=json`). The layer also writes the response the client
//! gets when the proxy could not forward the request. Without tracing or the access
//! log, a request's observation is one `Instant`.

use super::activity::InFlight;
use super::conn::HttpConn;
use super::errors::{ProxyError, RefuseStream};
use super::request::{Forwarding, forward};
use crate::addrs::{Direction, EndpointAddr};
use crate::body::response::{EndHook, Ended, OnEnd, ResponseBody};
use crate::body::source::ClientBody;
use crate::call::{Answer, HttpAnswer, Permit, Routed};
use crate::client::body::UpstreamBody;
use crate::config::TraceTrust;
use crate::metrics::RequestStats;
use crate::proto::grpc;
use gofe_identity::SpiffeId;
use gofe_telemetry::trace::{RequestInfo, RequestSpan, ResponseInfo, SpanKind};
use http::uri::Authority;
use http::{HeaderMap, Request, Response, Version};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Instant, SystemTime};
use tracing::debug;

/// The body of every response the proxy gives a client.
pub type HttpBody = ResponseBody<UpstreamBody, Finish>;

/// Observes each request of a connection and forwards it (`request::forward`): the
/// connection's service (hyper's for HTTP/1, `h2_server`'s for HTTP/2), called by
/// reference, so a request costs no clone of a service and no readiness check of a
/// stack.
pub struct Observed {
    conn: Arc<HttpConn>,
}

impl Observed {
    pub fn new(conn: Arc<HttpConn>) -> Self {
        Self { conn }
    }

    /// Starts observing `req` and forwards it.
    pub fn observe(&self, mut req: Request<ClientBody>) -> ObservedFuture<Forwarding> {
        let grpc = grpc::is_grpc(&req);
        let authority = self.conn.authority(&req);
        let observe = Observe::start(&self.conn, &req, authority.as_ref());
        observe.inject(req.headers_mut());
        let in_flight = self.conn.activity.request_started();
        ObservedFuture {
            inner: forward(self.conn.clone(), req, authority.clone()),
            request: Some(Observing {
                conn: self.conn.clone(),
                grpc,
                authority,
                observe,
                in_flight,
            }),
        }
    }
}

/// HTTP/1, served by hyper.
impl hyper::service::Service<Request<Incoming>> for Observed {
    type Response = Response<HttpBody>;
    type Error = Infallible;
    type Future = ObservedFuture<Forwarding>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.observe(req.map(ClientBody::http1))
    }
}

struct Observing {
    conn: Arc<HttpConn>,
    grpc: bool,
    authority: Option<Authority>,
    observe: Observe,
    /// The request is in flight on its connection until its response ends.
    in_flight: InFlight,
}

pin_project_lite::pin_project! {
    pub struct ObservedFuture<F> {
        #[pin]
        inner: F,
        request: Option<Observing>,
    }
}

impl<F> Future for ObservedFuture<F>
where
    F: Future<Output = Result<HttpAnswer, ProxyError>>,
{
    type Output = Result<Response<HttpBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let r = this
            .request
            .take()
            .expect("an observed future is not polled after it is done");
        Poll::Ready(Ok(match result {
            Ok(answer) => respond(r, answer),
            Err(error) => fail(r, error),
        }))
    }
}

/// The upstream's response, on its way back; counted when its body ends.
fn respond(r: Observing, answer: HttpAnswer) -> Response<HttpBody> {
    let Answer {
        value: rsp,
        peer,
        endpoint,
        permit,
        retries,
        deadline,
        routed,
    } = answer;
    let mut observe = r.observe;
    observe.answered(endpoint, peer.as_ref(), retries, routed.as_ref());
    let stats = r
        .conn
        .stats(r.authority.as_ref(), peer.as_ref(), routed.as_ref());
    let (parts, body) = rsp.into_parts();
    let finish = Finish {
        stats,
        observe,
        _permit: permit,
        _in_flight: r.in_flight,
    };
    let on_end = OnEnd::new(finish, parts.status, r.grpc, &parts.headers);
    Response::from_parts(
        parts,
        ResponseBody::upstream(body, on_end).with_deadline(deadline),
    )
}

/// The response for a request the proxy could not forward, counted when written.
fn fail(r: Observing, error: ProxyError) -> Response<HttpBody> {
    debug!(client = %r.conn.client, %error, "request failed");
    let mut observe = r.observe;
    observe.failed(&error, error.endpoint(), error.routed());
    // The local application may know everything; a remote client learns nothing of
    // the pod's insides (addresses, identities, settings) from an error.
    let detail = r.conn.direction == Direction::Outbound;
    let (status, headers, body) = error.response(r.grpc, detail);
    let finish = Finish {
        stats: r.conn.stats(r.authority.as_ref(), None, error.routed()),
        observe,
        _permit: None,
        _in_flight: r.in_flight,
    };
    let on_end = OnEnd::new(finish, status, r.grpc, &headers);
    let mut rsp = Response::new(ResponseBody::full(body, Some(on_end)));
    *rsp.status_mut() = status;
    *rsp.headers_mut() = headers;
    if error.is_refused_stream() {
        rsp.extensions_mut().insert(RefuseStream);
    }
    rsp
}

/// What happens when a response ends: the request is counted, its span ended and its
/// log entry written, and its destination's concurrency slot freed.
pub struct Finish {
    stats: Arc<RequestStats>,
    observe: Observe,
    _permit: Option<Permit>,
    _in_flight: InFlight,
}

impl EndHook for Finish {
    fn ended(self, end: Ended) {
        self.stats.record(end.status, end.grpc_status);
        // One reading of the clock for the latency and its window.
        let now = Instant::now();
        let latency = now.saturating_duration_since(self.observe.started);
        self.stats.latency.record_at(latency, now);
        self.observe
            .finish(end.status.as_u16(), end.grpc_status, end.completed);
    }
}

pub struct Observe {
    pub started: Instant,
    extra: Option<Box<Extra>>,
}

struct Extra {
    span: Option<RequestSpan>,
    access: Option<Access>,
    retries: u32,
    endpoint: Option<EndpointAddr>,
    peer: Option<Arc<SpiffeId>>,
    error: Option<String>,
    routed: Option<Routed>,
}

struct Access {
    at: SystemTime,
    direction: Direction,
    client: std::net::SocketAddr,
    method: http::Method,
    authority: String,
    path: String,
    version: &'static str,
}

fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

impl Observe {
    /// Starts observing `req`, which came on `conn`: its span is a child of the context
    /// its headers carry.
    pub fn start<B>(conn: &HttpConn, req: &Request<B>, authority: Option<&Authority>) -> Observe {
        let started = Instant::now();
        let tracer = conn.ctx.tracer.as_ref();
        let access_log = conn.ctx.config.access_log;
        if tracer.is_none() && !access_log {
            return Observe {
                started,
                extra: None,
            };
        }
        let at = SystemTime::now();
        let client = conn.client.addr();
        let span = tracer.map(|t| {
            t.start(
                &RequestInfo {
                    kind: match conn.direction {
                        Direction::Inbound => SpanKind::Server,
                        Direction::Outbound => SpanKind::Client,
                    },
                    start: at,
                    method: req.method(),
                    path: req.uri().path(),
                    server_host: authority.map(|a| a.host()),
                    server_port: authority.and_then(|a| a.port_u16()),
                    client: Some(client),
                    protocol_version: version(req.version()),
                    trust_sampling: trusts_sampling(conn),
                    user_agent: req
                        .headers()
                        .get(http::header::USER_AGENT)
                        .and_then(|v| v.to_str().ok()),
                },
                req.headers(),
            )
        });
        let access = access_log.then(|| Access {
            at,
            direction: conn.direction,
            client,
            method: req.method().clone(),
            authority: authority.map(|a| a.to_string()).unwrap_or_default(),
            path: req.uri().path().to_string(),
            version: version(req.version()),
        });
        Observe {
            started,
            extra: Some(Box::new(Extra {
                span,
                access,
                retries: 0,
                endpoint: None,
                // Inbound, the peer is the client's proxy.
                peer: match conn.direction {
                    Direction::Inbound => conn.peer.clone(),
                    Direction::Outbound => None,
                },
                error: None,
                routed: None,
            })),
        }
    }

    /// Writes this request's trace context into the request going on.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if let Some(span) = self.extra.as_ref().and_then(|e| e.span.as_ref()) {
            span.inject(headers);
        }
    }

    /// The answer came from `endpoint` (whose proxy is `peer`, over mTLS) after
    /// `retries` retries.
    pub fn answered(
        &mut self,
        endpoint: Option<EndpointAddr>,
        peer: Option<&Arc<SpiffeId>>,
        retries: u32,
        routed: Option<&Routed>,
    ) {
        if let Some(e) = &mut self.extra {
            e.routed = routed.cloned();
            e.endpoint = endpoint.or(e.endpoint);
            if let Some(p) = peer {
                e.peer = Some(p.clone());
            }
            e.retries = retries;
        }
    }

    /// The proxy failed the request, and why.
    pub fn failed(
        &mut self,
        error: &dyn std::fmt::Display,
        endpoint: Option<EndpointAddr>,
        routed: Option<&Routed>,
    ) {
        if let Some(e) = &mut self.extra {
            e.error = Some(error.to_string());
            if routed.is_some() {
                e.routed = routed.cloned();
            }
            e.endpoint = endpoint.or(e.endpoint);
        }
    }

    /// The response ended (`completed`: its body was read to the end).
    pub fn finish(mut self, status: u16, grpc_status: Option<u16>, completed: bool) {
        self.end(Some(status), grpc_status, completed);
    }

    /// Ends the span and writes the access log entry, once. `status` is None when no
    /// response was made (the client went away first).
    fn end(&mut self, status: Option<u16>, grpc_status: Option<u16>, completed: bool) {
        let Some(extra) = self.extra.take() else {
            return;
        };
        let Extra {
            span,
            access,
            retries,
            endpoint,
            peer,
            error,
            routed,
        } = *extra;
        let peer = peer.map(|p| p.to_string());
        let error = error.or_else(|| match (status, completed) {
            (None, _) => Some("the client went away before the response".to_string()),
            (Some(_), false) => Some("the response broke off".to_string()),
            _ => None,
        });
        let trace_id = span
            .as_ref()
            .map(|s| s.span_context().trace_id().to_string());
        if let Some(span) = span {
            span.end(&ResponseInfo {
                status,
                grpc_status,
                peer_identity: peer.as_deref(),
                retries,
                endpoint: endpoint.map(|e| e.addr()),
                error: error.as_deref(),
                route: routed.as_ref().map(|r| (&*r.route, &*r.backend)),
            });
        }
        if let Some(a) = access {
            let mut entry = serde_json::json!({
                "timestamp": gofe_telemetry::access::timestamp(a.at),
                "direction": a.direction.as_str(),
                "client": a.client.to_string(),
                "method": a.method.as_str(),
                "authority": a.authority,
                "path": a.path,
                "version": a.version,
                "status": status,
                "duration_ms": self.started.elapsed().as_secs_f64() * 1e3,
                "retries": retries,
            });
            let fields = entry.as_object_mut().expect("an object");
            if let Some(g) = grpc_status {
                fields.insert("grpc_status".into(), g.into());
            }
            if let Some(e) = endpoint {
                fields.insert("endpoint".into(), e.to_string().into());
            }
            if let Some(p) = peer {
                fields.insert("peer_identity".into(), p.into());
            }
            if let Some(r) = &routed {
                fields.insert("route".into(), r.route.to_string().into());
                fields.insert("backend".into(), r.backend.to_string().into());
            }
            if let Some(t) = trace_id {
                fields.insert("trace_id".into(), t.into());
            }
            if let Some(e) = error {
                fields.insert("error".into(), e.into());
            }
            gofe_telemetry::access::write(&entry);
        }
    }
}

impl Drop for Observe {
    /// A request dropped before its response (the client reset the stream or closed
    /// the connection while the proxy waited) still ends its span and its log entry.
    fn drop(&mut self) {
        self.end(None, None, false);
    }
}

/// Whether the sender of requests on `conn` may decide their sampling.
fn trusts_sampling(conn: &HttpConn) -> bool {
    match conn.ctx.config.trace_trust {
        TraceTrust::All => true,
        TraceTrust::None => false,
        // The local application, or a peer that proved its identity over mTLS.
        TraceTrust::Mesh => conn.direction == Direction::Outbound || conn.peer.is_some(),
    }
}
