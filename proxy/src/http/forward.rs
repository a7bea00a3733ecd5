//! Forwarding one request: find its endpoint, make the request fit for the next hop
//! (hop-by-hop headers off, the target in the right form, HTTP/2 with its original
//! version noted when the next hop is another proxy), send it on a pooled connection
//! (mTLS to meshed peers) and pass the response back, streaming both bodies.

use super::body::{OnEnd, RequestBody, ResponseBody};
use super::errors::{ProxyError, error_response};
use super::mesh::{self, CLIENT_ID, CLIENT_ID_UNDERSCORED, ORIG_PROTO};
use super::{HttpConn, headers, upgrade};
use crate::addrs::{Direction, EndpointAddr};
use crate::destination::ConnTarget;
use crate::endpoint::{Checkin, HttpVersion, MeshSendError, SendError};
use crate::metrics::RequestStats;
use gofe_identity::SpiffeId;
use http::{HeaderValue, Method, Request, Response, Version, header};
use http_body::Body;
use hyper::body::Incoming;
use std::sync::Arc;
use tracing::debug;

/// The port an authority without one means, for plain HTTP.
const HTTP_PORT: u16 = 80;

pub(crate) async fn forward(
    conn: Arc<HttpConn>,
    mut req: Request<Incoming>,
) -> Response<ResponseBody> {
    let grpc = headers::is_grpc(&req);
    let authority = headers::authority(&req);
    if let Some(reason) = &conn.refused {
        let stats = conn.stats(authority.as_ref(), conn.peer.as_ref());
        return error_response(&ProxyError::Forbidden(reason.clone()), grpc, stats);
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

    let endpoint = match conn.target {
        ConnTarget::Endpoint { endpoint, .. } => endpoint,
        // Rare, heavy branches are boxed: hyper moves this future into a task for every
        // HTTP/2 stream, so its size is paid per request.
        ConnTarget::Explicit if req.method() == Method::CONNECT => {
            return Box::pin(upgrade::connect_explicit(&conn, req, grpc)).await;
        }
        ConnTarget::Explicit => {
            let Some(authority) = authority.as_ref() else {
                let stats = conn.stats(None, None);
                return error_response(&ProxyError::NoAuthority, grpc, stats);
            };
            match Box::pin(conn.state.resolver.resolve(authority, HTTP_PORT)).await {
                Ok(ep) => ep,
                Err(e) => {
                    return error_response(&e.into(), grpc, conn.stats(Some(authority), None));
                }
            }
        }
    };

    // An h2c upgrade would turn the connection into HTTP/2 the proxies never see: the
    // request goes on as a plain HTTP/1.1 request instead.
    if headers::is_upgrade_to(&req, "h2c") {
        headers::drop_upgrade(req.headers_mut());
    }
    if req.method() == Method::CONNECT || headers::is_upgrade(&req) {
        return Box::pin(upgrade::forward(&conn, req, endpoint, grpc)).await;
    }

    let version = match req.version() {
        Version::HTTP_2 => HttpVersion::Http2,
        _ => HttpVersion::Http1,
    };
    // A body of unknown length still to come; hyper would send one on a GET as empty
    // unless the framing is spelled out.
    let streaming_body = !req.body().is_end_stream() && req.body().size_hint().exact().is_none();
    headers::strip_hop_by_hop(req.headers_mut(), false);
    identify_client(&conn, req.headers_mut());
    let mut req = req.map(RequestBody::from);
    match version {
        HttpVersion::Http1 => prepare_http1(&conn, &mut req, endpoint, streaming_body),
        HttpVersion::Http2 => {
            *req.uri_mut() = headers::absolute_form(req.uri(), authority.as_ref());
        }
    }

    if let (Some(tls), may_fall_back) = conn.state.outbound_tls(conn.direction, endpoint) {
        mesh::to_mesh(&mut req, &endpoint.to_string());
        match conn.state.http.send_mesh(endpoint, req, tls).await {
            Ok((rsp, peer)) => {
                return respond(&conn, rsp, None, grpc, authority.as_ref(), Some(peer));
            }
            Err(MeshSendError::NotMeshed { error, req: unsent }) if may_fall_back => {
                conn.state.plaintext_from_now(endpoint, &error);
                req = *unsent;
                if mesh::from_mesh(&mut req) {
                    prepare_http1(&conn, &mut req, endpoint, streaming_body);
                }
            }
            Err(MeshSendError::NotMeshed { error, .. }) => {
                return fail(&conn, SendError::Connect(error), grpc, authority.as_ref());
            }
            Err(MeshSendError::Failed(error)) => {
                return fail(&conn, error, grpc, authority.as_ref());
            }
        }
    }

    let version = match req.version() {
        Version::HTTP_2 => HttpVersion::Http2,
        _ => HttpVersion::Http1,
    };
    match conn.state.http.send(endpoint, version, req).await {
        Ok((rsp, checkin)) => respond(&conn, rsp, checkin, grpc, authority.as_ref(), None),
        Err(error) => fail(&conn, error, grpc, authority.as_ref()),
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

/// An HTTP/1 request as an HTTP/1 upstream should get it.
fn prepare_http1(
    conn: &HttpConn,
    req: &mut Request<RequestBody>,
    endpoint: EndpointAddr,
    streaming_body: bool,
) {
    if conn.target == ConnTarget::Explicit {
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
            && let Ok(host) = HeaderValue::from_str(&endpoint.to_string())
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

/// The upstream's response, on its way back; counted when its body ends. `upstream_peer`
/// is the proxy it came from over mTLS (outbound).
fn respond(
    conn: &HttpConn,
    mut rsp: Response<Incoming>,
    checkin: Option<Checkin>,
    grpc: bool,
    authority: Option<&http::uri::Authority>,
    upstream_peer: Option<Arc<SpiffeId>>,
) -> Response<ResponseBody> {
    headers::strip_hop_by_hop(rsp.headers_mut(), false);
    let stats = stats_for(conn, authority, upstream_peer.as_ref());
    let on_end = OnEnd::new(stats, rsp.status(), grpc, rsp.headers()).with_checkin(checkin);
    rsp.map(|body| ResponseBody::upstream(body, on_end))
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
    error: SendError,
    grpc: bool,
    authority: Option<&http::uri::Authority>,
) -> Response<ResponseBody> {
    if let SendError::Connect(e) = &error {
        conn.state.metrics.connect_error(conn.direction, e.reason());
    }
    debug!(client = %conn.client, %error, "request failed");
    error_response(&error.into(), grpc, stats_for(conn, authority, None))
}
