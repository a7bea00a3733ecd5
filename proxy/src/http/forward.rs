//! Forwarding one request: find its endpoint, make the request fit for the next hop
//! (hop-by-hop headers off, the target in the right form), send it on a pooled
//! connection and pass the response back, streaming both bodies.

use super::body::{OnEnd, RequestBody, ResponseBody};
use super::errors::{ProxyError, error_response};
use super::{HttpConn, headers, upgrade};
use crate::destination::ConnTarget;
use crate::endpoint::{HttpVersion, SendError};
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
    let stats = conn.stats(authority.as_ref());

    let endpoint = match conn.target {
        ConnTarget::Endpoint { endpoint, .. } => endpoint,
        ConnTarget::Explicit if req.method() == Method::CONNECT => {
            return upgrade::connect_explicit(&conn, req, stats, grpc).await;
        }
        ConnTarget::Explicit => {
            let Some(authority) = authority.as_ref() else {
                return error_response(&ProxyError::NoAuthority, grpc, stats);
            };
            match conn.state.resolver.resolve(authority, HTTP_PORT).await {
                Ok(ep) => ep,
                Err(e) => return error_response(&e.into(), grpc, stats),
            }
        }
    };

    if req.method() == Method::CONNECT || headers::is_upgrade(&req) {
        return upgrade::forward(&conn, req, endpoint, stats, grpc).await;
    }

    let version = match req.version() {
        Version::HTTP_2 => HttpVersion::Http2,
        _ => HttpVersion::Http1,
    };
    // A body of unknown length still to come; hyper would send one on a GET as empty
    // unless the framing is spelled out.
    let streaming_body = !req.body().is_end_stream() && req.body().size_hint().exact().is_none();
    headers::strip_hop_by_hop(req.headers_mut(), false);
    match version {
        HttpVersion::Http1 => {
            if conn.target == ConnTarget::Explicit {
                // The proxy is the target: the URI's authority names the origin and
                // replaces any Host header (RFC 9112 §3.2.2). A redirected connection
                // keeps its request-target, which may be meant for a forward proxy.
                if let Some(host) = req
                    .uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                {
                    req.headers_mut().insert(header::HOST, host);
                }
                *req.uri_mut() = headers::origin_form(req.uri(), req.method());
            }
            // An intermediary speaks its own version upstream (RFC 9110 §6.2), so an
            // HTTP/1.0 client's requests reuse pooled HTTP/1.1 connections too; such a
            // request needs the Host header HTTP/1.1 requires.
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
        HttpVersion::Http2 => {
            *req.uri_mut() = headers::absolute_form(req.uri(), authority.as_ref());
        }
    }

    match conn
        .state
        .http
        .send(endpoint, version, req.map(RequestBody::from))
        .await
    {
        Ok((mut rsp, checkin)) => {
            headers::strip_hop_by_hop(rsp.headers_mut(), false);
            let on_end = OnEnd::new(stats, rsp.status(), grpc, rsp.headers()).with_checkin(checkin);
            rsp.map(|body| ResponseBody::upstream(body, on_end))
        }
        Err(error) => {
            if let SendError::Connect(e) = &error {
                conn.state.metrics.connect_error(conn.direction, e.reason());
            }
            debug!(client = %conn.client, %endpoint, %error, "request failed");
            error_response(&error.into(), grpc, stats)
        }
    }
}
