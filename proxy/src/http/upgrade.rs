//! Requests that take their connection over: an HTTP/1.1 upgrade (WebSocket) or a
//! CONNECT. Each gets a connection of its own (inside mesh TLS, as HTTP/1.1, to a
//! meshed peer); once both sides have switched, the two connections are joined byte
//! for byte, half-closes included.

use super::body::{OnEnd, RequestBody, ResponseBody};
use super::errors::{ProxyError, error_response};
use super::forward::stats_for;
use super::observe::Observe;
use super::{HttpConn, headers};
use crate::addrs::EndpointAddr;
use crate::destination::{ConnTarget, Destination, PickError};
use crate::discovery::DestKey;
use crate::endpoint::{ConnectError, Peer, SendError};
use crate::policy::call::Failure;
use gofe_identity::SpiffeId;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

const HTTPS_PORT: u16 = 443;

/// Where a request that takes its connection over goes.
pub(crate) enum Via {
    /// One endpoint (inbound: the application).
    Endpoint(EndpointAddr),
    /// An endpoint of an outbound destination, picked by its balancer (or the original
    /// destination while discovery knows nothing better).
    Destination(Arc<Destination>, Option<EndpointAddr>),
}

/// Forwards an upgrade or CONNECT request to its endpoint (the application, or the
/// proxy an application was talking to) and, if it agrees to switch, tunnels.
pub(crate) async fn forward(
    conn: &HttpConn,
    mut req: Request<Incoming>,
    via: Via,
    grpc: bool,
    observe: Observe,
) -> Response<ResponseBody> {
    let authority = headers::authority(&req);
    let client_side = hyper::upgrade::on(&mut req);
    let connect = req.method() == Method::CONNECT;
    headers::strip_hop_by_hop(req.headers_mut(), !connect);
    super::forward::identify_client(conn, req.headers_mut());
    if conn.target == ConnTarget::Explicit {
        *req.uri_mut() = headers::origin_form(req.uri(), req.method());
    }
    let connected = match &via {
        Via::Endpoint(endpoint) => dedicated(conn, *endpoint, None)
            .await
            .map(|(tx, peer)| (tx, peer, *endpoint))
            .map_err(ProxyError::Send),
        Via::Destination(d, fallback) => d
            .connect(
                &conn.state.metrics,
                *fallback,
                |e: &SendError| matches!(e, SendError::Connect(_)),
                |ep| async move {
                    let (tx, peer) = dedicated(conn, ep.addr, ep.identity.as_ref()).await?;
                    Ok((tx, peer, ep.addr))
                },
            )
            .await
            .map_err(picked),
    };
    let (mut tx, peer, endpoint) = match connected {
        Ok(c) => c,
        Err(e) => return fail(conn, e, grpc, authority.as_ref(), observe),
    };
    let mut rsp = match tx.send_request(req.map(RequestBody::from)).await {
        Ok(rsp) => rsp,
        Err(source) => {
            let e = SendError::Http {
                addr: endpoint,
                source,
            };
            return fail(conn, ProxyError::Send(e), grpc, authority.as_ref(), observe);
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
    let mut observe = observe;
    observe.answered(None, peer.as_ref(), 0);
    let on_end = OnEnd::new(stats, rsp.status(), grpc, rsp.headers()).with_observe(observe);
    rsp.map(|body| ResponseBody::upstream(body, on_end))
}

fn picked<E: Into<ProxyError>>(e: PickError<E>) -> ProxyError {
    match e {
        PickError::NoEndpoints(destination) => {
            ProxyError::Call(Failure::NoEndpoints { destination })
        }
        PickError::Failed(e) => e.into(),
    }
}

/// A connection of its own to `endpoint`: mTLS to a meshed peer (plaintext if auto mode
/// finds it is not one); with `expected`, mTLS to a peer with that identity only.
async fn dedicated(
    conn: &HttpConn,
    endpoint: EndpointAddr,
    expected: Option<&SpiffeId>,
) -> Result<(http1::SendRequest<RequestBody>, Peer), SendError> {
    let http = &conn.state.http;
    let tls = match expected {
        Some(_) => conn.state.required_tls(),
        None => conn.state.outbound_tls(conn.direction, endpoint),
    };
    let result = match tls {
        (None, _) => http.connect_dedicated(endpoint, None).await,
        (Some(tls), may_fall_back) => match http.connect_dedicated(endpoint, Some(tls)).await {
            Err(SendError::Connect(e)) if may_fall_back && e.not_meshed() => {
                conn.state.plaintext_from_now(endpoint, &e);
                http.connect_dedicated(endpoint, None).await
            }
            other => other,
        },
    };
    let result = match (result, expected) {
        (Ok((_, peer)), Some(expected)) if peer.as_deref() != Some(expected) => {
            Err(SendError::Connect(ConnectError::Identity {
                addr: endpoint,
                presented: peer.map(|p| p.to_string()).unwrap_or_default(),
                expected: expected.to_string(),
            }))
        }
        (result, _) => result,
    };
    if let Err(SendError::Connect(e)) = &result {
        conn.state.metrics.connect_error(conn.direction, e.reason());
    }
    result
}

/// An explicit proxy client's CONNECT: the proxy itself opens the tunnel to the
/// authority and answers 200.
pub(crate) async fn connect_explicit(
    conn: &HttpConn,
    mut req: Request<Incoming>,
    grpc: bool,
    observe: Observe,
) -> Response<ResponseBody> {
    let Some(authority) = req.uri().authority().cloned() else {
        return error_response(
            &ProxyError::NoAuthority,
            grpc,
            stats_for(conn, None, None),
            observe,
        );
    };
    let dest = conn
        .state
        .destinations
        .get(DestKey::from_authority(&authority, HTTPS_PORT));
    let connected = dest
        .connect(
            &conn.state.metrics,
            None,
            |_: &ConnectError| true,
            |ep| async move {
                let r = conn
                    .state
                    .connect_stream(conn.direction, ep.addr, ep.identity.as_ref())
                    .await;
                if let Err(e) = &r {
                    conn.state.metrics.connect_error(conn.direction, e.reason());
                }
                r
            },
        )
        .await
        .map_err(|e| picked(e.map_failed(SendError::Connect)));
    let (server, peer) = match connected {
        Ok(s) => s,
        Err(e) => return fail(conn, e, grpc, Some(&authority), observe),
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
    let mut observe = observe;
    observe.answered(None, peer.as_ref(), 0);
    let on_end = OnEnd::new(stats, StatusCode::OK, grpc, &Default::default()).with_observe(observe);
    Response::new(ResponseBody::full(bytes::Bytes::new(), Some(on_end)))
}

fn fail(
    conn: &HttpConn,
    error: ProxyError,
    grpc: bool,
    authority: Option<&http::uri::Authority>,
    observe: Observe,
) -> Response<ResponseBody> {
    debug!(client = %conn.client, %error, "upgrade request failed");
    error_response(&error, grpc, stats_for(conn, authority, None), observe)
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
