//! Forwarding one request: find where it goes, make it fit for the next hop (hop-by-hop
//! headers off, the target in the right form), send it (outbound, through its
//! destination's policy to an endpoint picked by the balancer, mTLS to meshed peers;
//! inbound, straight to the application) and pass the response back, streaming both
//! bodies.

use super::body::{OnEnd, RequestBody, ResponseBody};
use super::errors::{ProxyError, error_response};
use super::mesh::{self, CLIENT_ID, CLIENT_ID_UNDERSCORED, ORIG_PROTO};
use super::observe::Observe;
use super::upstream::Upstream;
use super::{HttpConn, headers, upgrade};
use crate::addrs::{Direction, EndpointAddr};
use crate::balance::BalanceLayer;
use crate::destination::{ConnTarget, Destination};
use crate::endpoint::{HttpVersion, SendError};
use crate::metrics::RequestStats;
use crate::policy::call::{Answer, Call, Failure};
use crate::policy::limit::LimitLayer;
use crate::policy::retry::{RetryLayer, RetryStats};
use crate::policy::timeout::TimeoutLayer;
use gofe_identity::SpiffeId;
use http::{HeaderValue, Method, Request, Response, Version, header};
use http_body::Body;
use hyper::body::Incoming;
use std::sync::Arc;
use tower::{ServiceBuilder, ServiceExt};
use tracing::debug;

/// Where a request goes: straight to one endpoint (inbound, to the application), or
/// to an outbound destination through its policy.
enum Target {
    Direct(EndpointAddr),
    /// The destination, and the request's original destination (redirected
    /// connections), where it goes while discovery knows nothing better.
    Destination(Arc<Destination>, Option<EndpointAddr>),
}

pub(crate) async fn forward(
    conn: Arc<HttpConn>,
    mut req: Request<Incoming>,
) -> Response<ResponseBody> {
    let grpc = headers::is_grpc(&req);
    let authority = headers::authority(&req);
    let mut observe = Observe::start(&conn, &req, authority.as_ref());
    if let Some(reason) = &conn.refused {
        let stats = conn.stats(authority.as_ref(), conn.peer.as_ref());
        return error_response(&ProxyError::Forbidden(reason.clone()), grpc, stats, observe);
    }
    match conn.direction {
        Direction::Inbound => {
            // Only this proxy says who the client is (set once the hop-by-hop headers,
            // which a client could use to name it, are gone).
            req.headers_mut().remove(CLIENT_ID);
            req.headers_mut().remove(CLIENT_ID_UNDERSCORED);
            if conn.peer.is_some() {
                mesh::from_mesh(&mut req);
            } else {
                req.headers_mut().remove(ORIG_PROTO);
            }
        }
        Direction::Outbound => {
            req.headers_mut().remove(ORIG_PROTO);
        }
    }

    let target = match (conn.direction, conn.target) {
        (Direction::Inbound, ConnTarget::Endpoint { endpoint, .. }) => Target::Direct(endpoint),
        (Direction::Outbound, ConnTarget::Endpoint { endpoint, .. }) => Target::Destination(
            conn.destination(authority.as_ref(), Some(endpoint)),
            Some(endpoint),
        ),
        // Rare, heavy branches are boxed: hyper moves this future into a task for every
        // HTTP/2 stream, so its size is paid per request.
        (_, ConnTarget::Explicit) if req.method() == Method::CONNECT => {
            return Box::pin(upgrade::connect_explicit(&conn, req, grpc, observe)).await;
        }
        (_, ConnTarget::Explicit) => {
            let Some(authority) = authority.as_ref() else {
                let stats = conn.stats(None, None);
                return error_response(&ProxyError::NoAuthority, grpc, stats, observe);
            };
            Target::Destination(conn.destination(Some(authority), None), None)
        }
    };

    // An h2c upgrade would turn the connection into HTTP/2 the proxies never see: the
    // request goes on as a plain HTTP/1.1 request instead.
    if headers::is_upgrade_to(&req, "h2c") {
        headers::drop_upgrade(req.headers_mut());
    }
    if req.method() == Method::CONNECT || headers::is_upgrade(&req) {
        return Box::pin(upgrade::forward(
            &conn,
            req,
            target_endpoints(target),
            grpc,
            observe,
        ))
        .await;
    }

    // A body of unknown length still to come; hyper would send one on a GET as empty
    // unless the framing is spelled out.
    let streaming_body = !req.body().is_end_stream() && req.body().size_hint().exact().is_none();
    headers::strip_hop_by_hop(req.headers_mut(), false);
    identify_client(&conn, req.headers_mut());
    observe.inject(req.headers_mut());
    let mut req = req.map(RequestBody::from);
    let explicit = conn.target == ConnTarget::Explicit;
    let default_host = match &target {
        Target::Direct(endpoint) => endpoint.to_string(),
        Target::Destination(d, _) => d.name.to_string(),
    };
    match req.version() {
        Version::HTTP_2 => {
            *req.uri_mut() = headers::absolute_form(req.uri(), authority.as_ref());
        }
        _ => prepare_http1(explicit, &mut req, &default_host, streaming_body),
    }

    match target {
        Target::Direct(endpoint) => {
            let version = match req.version() {
                Version::HTTP_2 => HttpVersion::Http2,
                _ => HttpVersion::Http1,
            };
            match conn.state.http.send(endpoint, version, req).await {
                Ok((rsp, checkin)) => {
                    let mut a = Answer::new(rsp, Some(endpoint));
                    a.checkin = checkin;
                    respond(&conn, a, grpc, authority.as_ref(), observe)
                }
                Err(f) => {
                    if let SendError::Connect(e) = &f.error {
                        conn.state.metrics.connect_error(conn.direction, e.reason());
                    }
                    observe.answered(Some(endpoint), None, 0);
                    let error = ProxyError::Send(f.error);
                    fail(&conn, error, grpc, authority.as_ref(), observe)
                }
            }
        }
        Target::Destination(dest, fallback) => {
            let upstream = Upstream {
                state: conn.state.clone(),
                explicit,
                streaming_body,
            };
            let call = Call::new(req).with_fallback(fallback);
            match through_policy(&conn, &dest, upstream, call).await {
                Ok(a) => respond(&conn, a, grpc, authority.as_ref(), observe),
                Err(f) => fail(
                    &conn,
                    ProxyError::Call(f),
                    grpc,
                    authority.as_ref(),
                    observe,
                ),
            }
        }
    }
}

/// Sends an outbound request through its destination's policy: the concurrency limit,
/// the request timeout, retries, balancing and the per-try timeout, around the
/// endpoint service.
async fn through_policy(
    conn: &HttpConn,
    dest: &Destination,
    upstream: Upstream,
    call: Call,
) -> Result<Answer, Failure> {
    let policy = dest.policy();
    let metrics = conn.state.metrics.clone();
    let stack = ServiceBuilder::new()
        .layer(LimitLayer::new(
            dest.in_flight.clone(),
            policy.max_concurrent_requests,
            dest.name.clone(),
        ))
        .layer(TimeoutLayer::request(policy.request_timeout))
        .layer(RetryLayer::new(
            policy.clone(),
            dest.budget(&policy),
            RetryStats {
                destination: dest.name.clone(),
                metrics: metrics.clone(),
            },
        ))
        .layer(BalanceLayer::new(
            dest.balancer.clone(),
            policy.lb,
            policy.outlier,
            dest.name.clone(),
            metrics,
        ))
        .layer(TimeoutLayer::attempt(policy.per_try_timeout))
        .service(upstream);
    stack.oneshot(call).await
}

/// For requests that take their connection over: the endpoint, or the destination
/// whose endpoints to try.
fn target_endpoints(target: Target) -> upgrade::Via {
    match target {
        Target::Direct(e) => upgrade::Via::Endpoint(e),
        Target::Destination(d, fallback) => upgrade::Via::Destination(d, fallback),
    }
}

/// Tells the application who the client is: the identity the client's proxy presented
/// over mTLS. Inbound only; called after the hop-by-hop headers are gone.
pub(super) fn identify_client(conn: &HttpConn, headers: &mut http::HeaderMap) {
    if conn.direction == Direction::Inbound
        && let Some(peer) = &conn.peer
        && let Ok(v) = HeaderValue::from_str(&peer.to_string())
    {
        headers.insert(CLIENT_ID, v);
    }
}

/// An HTTP/1 request as an HTTP/1 upstream should get it. `default_host` is the Host
/// an HTTP/1.0 request without one is given.
pub(super) fn prepare_http1(
    explicit: bool,
    req: &mut Request<RequestBody>,
    default_host: &str,
    streaming_body: bool,
) {
    if explicit {
        // The proxy is the target: the URI's authority names the origin and replaces
        // any Host header (RFC 9112 §3.2.2). A redirected connection keeps its
        // request-target, which may be meant for a forward proxy.
        if let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        *req.uri_mut() = headers::origin_form(req.uri(), req.method());
    }
    // An intermediary speaks its own version upstream (RFC 9110 §6.2), so an HTTP/1.0
    // client's requests reuse pooled HTTP/1.1 connections too; such a request needs
    // the Host header HTTP/1.1 requires.
    if req.version() == Version::HTTP_10 {
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(default_host)
        {
            req.headers_mut().insert(header::HOST, host);
        }
    }
    if streaming_body {
        req.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
}

/// The upstream's response, on its way back; counted when its body ends.
fn respond(
    conn: &HttpConn,
    answer: Answer,
    grpc: bool,
    authority: Option<&http::uri::Authority>,
    mut observe: Observe,
) -> Response<ResponseBody> {
    let Answer {
        mut rsp,
        checkin,
        peer,
        permit,
        deadline,
        endpoint,
        retries,
    } = answer;
    observe.answered(endpoint, peer.as_ref(), retries);
    headers::strip_hop_by_hop(rsp.headers_mut(), false);
    let stats = stats_for(conn, authority, peer.as_ref());
    let on_end = OnEnd::new(stats, rsp.status(), grpc, rsp.headers())
        .with_checkin(checkin)
        .with_permit(permit)
        .with_observe(observe);
    rsp.map(|body| ResponseBody::upstream(body, on_end).with_deadline(deadline))
}

/// Inbound requests count under their client's identity, outbound under the server's.
pub(super) fn stats_for(
    conn: &HttpConn,
    authority: Option<&http::uri::Authority>,
    upstream_peer: Option<&Arc<SpiffeId>>,
) -> Arc<RequestStats> {
    match conn.direction {
        Direction::Inbound => conn.stats(authority, conn.peer.as_ref()),
        Direction::Outbound => conn.stats(authority, upstream_peer),
    }
}

fn fail(
    conn: &HttpConn,
    error: ProxyError,
    grpc: bool,
    authority: Option<&http::uri::Authority>,
    observe: Observe,
) -> Response<ResponseBody> {
    debug!(client = %conn.client, %error, "request failed");
    error_response(&error, grpc, stats_for(conn, authority, None), observe)
}
