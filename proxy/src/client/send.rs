//! Sending a request to an endpoint: the outbound-TLS decision picks the pool (mesh
//! HTTP/2 over mTLS, or the application's own protocol in plaintext), the pool gives a
//! connection, and the response comes back with its body. A request that auto mode
//! finds to be going to a peer without a sidecar goes again, in plaintext, as the
//! application sent it.

use super::body::UpstreamBody;
use super::error::{SendError, SendFailure};
use super::pool::{Kind, Peer, Pools};
use super::{h1, h2};
use crate::addrs::{Direction, EndpointAddr};
use crate::body::request::RequestBody;
use crate::connect::connector::{Connected, Connector};
use crate::connect::tls::Decision;
use crate::proto::mesh;
use gofe_identity::SpiffeId;
use gofe_identity::tls::{ALPN_H2, ALPN_HTTP1};
use http::{HeaderValue, Request, Response, Version, header};
use hyper::client::conn::http1;
use std::sync::Arc;
use std::time::Duration;

pub struct Client {
    connector: Arc<Connector>,
    pools: Pools,
}

impl Client {
    pub fn new(connector: Arc<Connector>, idle_timeout: Duration) -> Self {
        Self {
            connector,
            pools: Pools::new(idle_timeout),
        }
    }

    pub fn connector(&self) -> &Arc<Connector> {
        &self.connector
    }

    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// Sends `req` to `addr`, whose proxy must present `expected` if discovery named an
    /// identity. An unsent request comes back with the failure.
    pub async fn send(
        &self,
        direction: Direction,
        addr: EndpointAddr,
        expected: Option<&SpiffeId>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Peer), SendFailure> {
        let mut decided_again = false;
        loop {
            let decision = self.connector.decide(direction, addr, expected);
            let result = match decision {
                Decision::Plaintext => self.send_plain(direction, addr, req).await,
                Decision::Mtls { .. } => self.send_mesh(direction, addr, decision, req).await,
            };
            match result {
                Err(SendFailure {
                    error: SendError::Connect(e),
                    unsent: Some(unsent),
                }) if e.decide_again() && !decided_again => {
                    decided_again = true;
                    req = *unsent;
                }
                other => return other,
            }
        }
    }

    async fn send_plain(
        &self,
        direction: Direction,
        addr: EndpointAddr,
        req: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Peer), SendFailure> {
        let connector = &self.connector;
        let connect = || async move {
            connector
                .open(direction, addr, Decision::Plaintext, ALPN_HTTP1)
                .await
                .map(|c| c.io)
                .map_err(SendError::from)
        };
        if req.version() == Version::HTTP_2 {
            let pool = self.pools.get(addr, Kind::Http2);
            let plain = || async move {
                connector
                    .open(direction, addr, Decision::Plaintext, ALPN_H2)
                    .await
            };
            let (rsp, peer) = h2::send(&pool, req, None, plain).await?;
            return Ok((rsp.map(|b| UpstreamBody::new(b, None)), peer));
        }
        let pool = self.pools.get(addr, Kind::Http1);
        let (rsp, checkin) = h1::send(pool, self.pools.idle_timeout(), req, connect).await?;
        Ok((rsp.map(|b| UpstreamBody::new(b, Some(checkin))), None))
    }

    /// HTTP between proxies travels as HTTP/2 over one mTLS connection per endpoint.
    async fn send_mesh(
        &self,
        direction: Direction,
        addr: EndpointAddr,
        decision: Decision<'_>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Peer), SendFailure> {
        let Decision::Mtls { expected, .. } = decision else {
            unreachable!("the mesh pool is for mTLS decisions");
        };
        let connector = &self.connector;
        let connect = || connector.open(direction, addr, decision, ALPN_H2);
        mesh::to_mesh(&mut req, &addr.to_string());
        let pool = self.pools.get(addr, Kind::Mesh);
        match h2::send(&pool, req, expected, connect).await {
            Ok((rsp, peer)) => Ok((rsp.map(|b| UpstreamBody::new(b, None)), peer)),
            Err(mut f) => {
                // Back to the application's form: for plaintext, or another endpoint.
                if let Some(unsent) = f.unsent.as_mut() {
                    back_from_mesh(unsent);
                }
                Err(f)
            }
        }
    }

    /// A connection of its own to `addr` for a request that takes it over (an upgrade
    /// or CONNECT), HTTP/1.1 inside mTLS to a meshed peer.
    pub async fn dedicated(
        &self,
        direction: Direction,
        addr: EndpointAddr,
        expected: Option<&SpiffeId>,
    ) -> Result<(http1::SendRequest<RequestBody>, Peer), SendError> {
        let Connected { io, peer } = self
            .connector
            .connect(direction, addr, expected, ALPN_HTTP1)
            .await?;
        Ok((h1::handshake(addr, io).await?, peer))
    }
}

/// A request that was made fit for the mesh hop and did not go, as the application
/// sent it again (HTTP/1 framing a body of unknown length as chunked).
fn back_from_mesh(req: &mut Request<RequestBody>) {
    if mesh::from_mesh(req) && req.body().is_streaming() {
        req.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
}
