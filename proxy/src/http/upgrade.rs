//! Requests that take their connection over: an HTTP/1.1 upgrade (WebSocket) or a
//! CONNECT. Each gets a connection of its own (inside mesh TLS, as HTTP/1.1, to a
//! meshed peer); once both sides have switched, the two connections are joined byte
//! for byte, half-closes included.

use super::body::{OnEnd, RequestBody, ResponseBody};
use super::errors::{ProxyError, error_response};
use super::forward::stats_for;
use super::{HttpConn, headers};
use crate::addrs::EndpointAddr;
use crate::destination::ConnTarget;
use crate::endpoint::{ConnectError, Peer, SendError, Upstream};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

const HTTPS_PORT: u16 = 443;

/// Forwards an upgrade or CONNECT request to `endpoint` (the application, or the
/// proxy an application was talking to) and, if it agrees to switch, tunnels.
pub(crate) async fn forward(
    conn: &HttpConn,
    mut req: Request<Incoming>,
    endpoint: EndpointAddr,
    grpc: bool,
) -> Response<ResponseBody> {
    let authority = headers::authority(&req);
    let client_side = hyper::upgrade::on(&mut req);
    let connect = req.method() == Method::CONNECT;
    headers::strip_hop_by_hop(req.headers_mut(), !connect);
    super::forward::identify_client(conn, req.headers_mut());
    if conn.target == ConnTarget::Explicit {
        *req.uri_mut() = headers::origin_form(req.uri(), req.method());
    }
    let (mut tx, peer) = match dedicated(conn, endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(conn, e, grpc, authority.as_ref()),
    };
    let mut rsp = match tx.send_request(req.map(RequestBody::from)).await {
        Ok(rsp) => rsp,
        Err(source) => {
            let e = SendError::Http {
                addr: endpoint,
                source,
            };
            return fail(conn, e, grpc, authority.as_ref());
        }
    };
    let switched = if connect {
        rsp.status().is_success()
    } else {
        rsp.status() == StatusCode::SWITCHING_PROTOCOLS
    };
    headers::strip_hop_by_hop(rsp.headers_mut(), switched && !connect);
    if switched {
        let server_side = hyper::upgrade::on(&mut rsp);
        let client = conn.client;
        conn.state.tasks.spawn(async move {
            match tokio::try_join!(client_side, server_side) {
                Ok((c, s)) => join(TokioIo::new(c), TokioIo::new(s)).await,
                Err(error) => debug!(%client, %error, "upgrade did not complete"),
            }
        });
    }
    let stats = stats_for(conn, authority.as_ref(), peer.as_ref());
    let on_end = OnEnd::new(stats, rsp.status(), grpc, rsp.headers());
    rsp.map(|body| ResponseBody::upstream(body, on_end))
}

/// A connection of its own to `endpoint`: mTLS to a meshed peer (plaintext if auto mode
/// finds it is not one).
async fn dedicated(
    conn: &HttpConn,
    endpoint: EndpointAddr,
) -> Result<(http1::SendRequest<RequestBody>, Peer), SendError> {
    let http = &conn.state.http;
    match conn.state.outbound_tls(conn.direction, endpoint) {
        (None, _) => http.connect_dedicated(endpoint, None).await,
        (Some(tls), may_fall_back) => match http.connect_dedicated(endpoint, Some(tls)).await {
            Err(SendError::Connect(e)) if may_fall_back && e.not_meshed() => {
                conn.state.plaintext_from_now(endpoint, &e);
                http.connect_dedicated(endpoint, None).await
            }
            other => other,
        },
    }
}

/// An opaque stream to `endpoint`, by the same rule.
pub(crate) async fn stream(
    conn: &HttpConn,
    endpoint: EndpointAddr,
) -> Result<(Upstream, Peer), ConnectError> {
    conn.state.connect_stream(conn.direction, endpoint).await
}

/// An explicit proxy client's CONNECT: the proxy itself opens the tunnel to the
/// authority and answers 200.
pub(crate) async fn connect_explicit(
    conn: &HttpConn,
    mut req: Request<Incoming>,
    grpc: bool,
) -> Response<ResponseBody> {
    let Some(authority) = req.uri().authority().cloned() else {
        return error_response(&ProxyError::NoAuthority, grpc, stats_for(conn, None, None));
    };
    let endpoint = match conn.state.resolver.resolve(&authority, HTTPS_PORT).await {
        Ok(ep) => ep,
        Err(e) => return error_response(&e.into(), grpc, stats_for(conn, Some(&authority), None)),
    };
    let (server, peer) = match stream(conn, endpoint).await {
        Ok(s) => s,
        Err(e) => return fail(conn, SendError::Connect(e), grpc, Some(&authority)),
    };
    let client_side = hyper::upgrade::on(&mut req);
    let client = conn.client;
    conn.state.tasks.spawn(async move {
        match client_side.await {
            Ok(c) => join(TokioIo::new(c), server).await,
            Err(error) => debug!(%client, %error, "CONNECT tunnel did not open"),
        }
    });
    let stats = stats_for(conn, Some(&authority), peer.as_ref());
    let on_end = OnEnd::new(stats, StatusCode::OK, grpc, &Default::default());
    Response::new(ResponseBody::full(bytes::Bytes::new(), Some(on_end)))
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
    debug!(client = %conn.client, %error, "upgrade request failed");
    error_response(
        &ProxyError::Send(error),
        grpc,
        stats_for(conn, authority, None),
    )
}

async fn join<A, B>(mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(error) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
        debug!(%error, "tunnel ended with an error");
    }
}
