//! Requests that take their connection over: an HTTP/1.1 upgrade (WebSocket) or a
//! CONNECT. Each gets a connection of its own (outbound through its destination's
//! connection stack, HTTP/1.1 inside mTLS to a meshed peer); once both sides have
//! switched, the two connections are joined byte for byte, half-closes included. An
//! explicit proxy client's CONNECT is answered by the proxy itself, which opens the
//! tunnel.

use super::conn::HttpConn;
use super::errors::ProxyError;
use super::h2_tunnel::H2Tunnel;
use crate::addrs::{DestKey, Direction};
use crate::body::request::RequestBody;
use crate::body::source::ClientBody;
use crate::call::{Answer, Call, ConnectTo, HttpAnswer};
use crate::client::body::UpstreamBody;
use crate::client::error::SendError;
use crate::client::h1;
use crate::client::pool::Peer;
use crate::forward::tunnel;
use crate::proto::headers;
use crate::route::destination::Destination;
use crate::route::target::ConnTarget;
use futures_util::TryFutureExt;
use gofe_identity::tls::{ALPN_HTTP1, ALPN_TCP};
use http::{Method, Request, Response, StatusCode};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt;
use tracing::debug;

const HTTPS_PORT: u16 = 443;

/// Where a request that takes its connection over goes.
pub enum Via {
    /// Inbound: the application.
    App,
    /// An endpoint of an outbound destination, picked by its balancer (or the original
    /// destination while discovery knows nothing better).
    Destination(Arc<Destination>),
}

/// Forwards an upgrade or CONNECT request to its endpoint (the application, or the
/// proxy an application was talking to) and, if it agrees to switch, tunnels.
pub async fn forward(
    conn: &HttpConn,
    mut req: Request<ClientBody>,
    via: Via,
) -> Result<HttpAnswer, ProxyError> {
    let client_side = ClientSide::of(&mut req);
    let connect = req.method() == Method::CONNECT;
    headers::strip_hop_by_hop(req.headers_mut(), !connect);
    conn.identify_client(req.headers_mut());
    if conn.target == ConnTarget::Explicit {
        *req.uri_mut() = headers::origin_form(req.uri(), req.method());
    }
    let (mut tx, peer, endpoint) = dedicated(conn, via).await?;
    let mut rsp = tx
        .send_request(req.map(RequestBody::from))
        .await
        .map_err(|source| SendError::Http {
            addr: endpoint,
            source,
        })?;
    let switched = if connect {
        rsp.status().is_success()
    } else {
        rsp.status() == StatusCode::SWITCHING_PROTOCOLS
    };
    headers::strip_hop_by_hop(rsp.headers_mut(), switched && !connect);
    if switched {
        let server_side = hyper::upgrade::on(&mut rsp);
        let client = conn.client;
        let tunnel = Tunnel::of(conn);
        conn.ctx.tasks.spawn(async move {
            match tokio::try_join!(client_side.opened(), server_side.map_err(io::Error::other)) {
                Ok((c, s)) => tunnel.run(c, TokioIo::new(s)).await,
                Err(error) => debug!(%client, %error, "upgrade did not complete"),
            }
        });
    }
    let mut a = Answer::new(rsp.map(|b| UpstreamBody::new(b, None)), Some(endpoint));
    a.peer = peer;
    Ok(a)
}

/// A connection of its own for a request that takes it over, and its HTTP/1 client.
async fn dedicated(
    conn: &HttpConn,
    via: Via,
) -> Result<
    (
        http1::SendRequest<RequestBody>,
        Peer,
        crate::addrs::EndpointAddr,
    ),
    ProxyError,
> {
    match via {
        Via::App => {
            let app = conn
                .app
                .as_ref()
                .expect("an inbound connection has an application");
            let (tx, peer) = conn
                .ctx
                .client
                .dedicated(Direction::Inbound, app.addr, None)
                .await?;
            Ok((tx, peer, app.addr))
        }
        Via::Destination(d) => {
            let call =
                Call::new(ConnectTo { alpn: ALPN_HTTP1 }).with_orig_dst(conn.target.orig_dst());
            let a = d.connect_stack().oneshot(call).await?;
            let addr = a.endpoint.expect("a connection is made to an endpoint");
            let tx = h1::handshake(addr, a.value.io).await?;
            Ok((tx, a.peer, addr))
        }
    }
}

/// An explicit proxy client's CONNECT: the proxy itself opens the tunnel to the
/// authority and answers 200.
pub async fn connect_explicit(
    conn: &HttpConn,
    mut req: Request<ClientBody>,
) -> Result<HttpAnswer, ProxyError> {
    let Some(authority) = req.uri().authority().cloned() else {
        return Err(ProxyError::NoAuthority);
    };
    let dest = conn
        .ctx
        .destinations
        .get(DestKey::from_authority(&authority, HTTPS_PORT));
    let connected = dest
        .connect_stack()
        .oneshot(Call::new(ConnectTo { alpn: ALPN_TCP }))
        .await?;
    let client_side = ClientSide::of(&mut req);
    let client = conn.client;
    let server = connected.value.io;
    let tunnel = Tunnel::of(conn);
    conn.ctx.tasks.spawn(async move {
        match client_side.opened().await {
            Ok(c) => tunnel.run(c, server).await,
            Err(error) => debug!(%client, %error, "CONNECT tunnel did not open"),
        }
    });
    let mut a = Answer::new(Response::new(UpstreamBody::empty()), connected.endpoint);
    a.peer = connected.peer;
    Ok(a)
}

/// The client's side of a tunnel, once the answer has gone: its HTTP/1.1 connection
/// (hyper's upgrade), or its HTTP/2 CONNECT stream.
enum ClientSide {
    Http1(hyper::upgrade::OnUpgrade),
    Http2(H2Tunnel),
}

/// Either side's bytes, whichever the client spoke.
trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

impl ClientSide {
    fn of(req: &mut Request<ClientBody>) -> ClientSide {
        match req.extensions_mut().remove::<H2Tunnel>() {
            Some(t) => ClientSide::Http2(t),
            None => ClientSide::Http1(hyper::upgrade::on(req)),
        }
    }

    async fn opened(self) -> io::Result<Box<dyn Duplex>> {
        Ok(match self {
            ClientSide::Http1(up) => Box::new(TokioIo::new(up.await.map_err(io::Error::other)?)),
            ClientSide::Http2(t) => Box::new(t.opened().await?),
        })
    }
}

/// What a tunnel needs once its connection has switched: its idle timeout, and where
/// to count it when that ends it.
struct Tunnel {
    idle: std::time::Duration,
    metrics: Arc<crate::metrics::Metrics>,
    at: &'static str,
}

impl Tunnel {
    fn of(conn: &HttpConn) -> Tunnel {
        Tunnel {
            idle: conn.ctx.config.limits.tcp_idle_timeout,
            metrics: conn.ctx.metrics.clone(),
            at: conn.direction.as_str(),
        }
    }

    async fn run<A, B>(self, a: A, b: B)
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        if let tunnel::Ended::Idle = tunnel::join(a, b, self.idle).await {
            self.metrics
                .limit_tripped(crate::metrics::Limit::TcpIdle, self.at);
        }
    }
}
