//! Sending a request to an endpoint: the outbound-TLS decision picks the pool (mesh
//! HTTP/2 over mTLS, or the application's own protocol in plaintext), the pool gives a
//! connection, and the response comes back with its body. A request that auto mode
//! finds to be going to a peer without a sidecar goes again, in plaintext, as the
//! application sent it.

use super::body::UpstreamBody;
use super::error::{SendError, SendFailure};
use super::h2::H2Settings;
use super::pool::{Kind, Peer, Pools};
use super::{h1, h2};
use crate::addrs::{Direction, EndpointAddr};
use crate::body::request::RequestBody;
use crate::connect::connector::{Connected, Connector};
use crate::connect::tls::Decision;
use crate::metrics::{Limit, Metrics};
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
    h2: H2Settings,
    metrics: Arc<Metrics>,
}

impl Client {
    pub fn new(
        connector: Arc<Connector>,
        idle_timeout: Duration,
        h2: H2Settings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            connector,
            pools: Pools::new(idle_timeout),
            h2,
            metrics,
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
        mut req: Box<Request<RequestBody>>,
    ) -> Result<(Response<UpstreamBody>, Peer), SendFailure> {
        let mut decided_again = false;
        loop {
            let decision = self.connector.decide(direction, addr, expected);
            let result = match decision {
                Decision::Refuse(reason) => Err(SendFailure::unsent(
                    self.connector.refuse(direction, addr, reason),
                    req,
                )),
                Decision::Plaintext => self.send_plain(direction, addr, req).await,
                Decision::Mtls { .. } => self.send_mesh(direction, addr, decision, req).await,
            };
            match result {
                Err(SendFailure {
                    error: SendError::Connect(e),
                    unsent: Some(unsent),
                }) if e.decide_again() && !decided_again => {
                    decided_again = true;
                    req = unsent;
                }
                other => return other,
            }
        }
    }

    async fn send_plain(
        &self,
        direction: Direction,
        addr: EndpointAddr,
        req: Box<Request<RequestBody>>,
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
            let (rsp, peer, slot) = h2::send(&pool, self.h2, req, None, plain)
                .await
                .inspect_err(|f| self.count_busy(f))?;
            return Ok((rsp.map(|b| UpstreamBody::new(b, None).holding(slot)), peer));
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
        mut req: Box<Request<RequestBody>>,
    ) -> Result<(Response<UpstreamBody>, Peer), SendFailure> {
        let Decision::Mtls { expected, .. } = decision else {
            unreachable!("the mesh pool is for mTLS decisions");
        };
        let connector = &self.connector;
        let connect = || connector.open(direction, addr, decision, ALPN_H2);
        mesh::to_mesh(&mut req, addr);
        let pool = self.pools.get(addr, Kind::Mesh);
        match h2::send(&pool, self.h2, req, expected, connect).await {
            Ok((rsp, peer, slot)) => {
                Ok((rsp.map(|b| UpstreamBody::new(b, None).holding(slot)), peer))
            }
            Err(mut f) => {
                self.count_busy(&f);
                // Back to the application's form: for plaintext, or another endpoint.
                if let Some(unsent) = f.unsent.as_mut() {
                    back_from_mesh(unsent);
                }
                Err(f)
            }
        }
    }

    fn count_busy(&self, f: &SendFailure) {
        if matches!(f.error, SendError::Busy { .. }) {
            self.metrics.limit_tripped(Limit::Http2Streams, "upstream");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OutboundMtls;
    use crate::connect::error::ConnectError;
    use crate::connect::tcp::{OwnListeners, TcpConnector};
    use crate::connect::tls::OutboundTls;
    use crate::socket::HostSockets;
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn origin() -> (EndpointAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    TokioIo::new(s),
                    hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        )))
                    }),
                ));
            }
        });
        (EndpointAddr::new(addr), conns)
    }

    fn client(idle: Duration) -> Client {
        let metrics = Arc::new(Metrics::new());
        let connector = Connector::new(
            TcpConnector::new(
                Arc::new(HostSockets),
                Duration::from_secs(1),
                OwnListeners::default(),
            ),
            OutboundTls::new(None, OutboundMtls::Off, metrics.clone()),
            metrics,
        );
        let settings = H2Settings {
            max_streams: 1024,
            max_header_list: 64 * 1024,
            keepalive: Duration::from_secs(30),
        };
        Client::new(
            Arc::new(connector),
            idle,
            settings,
            Arc::new(Metrics::new()),
        )
    }

    fn get() -> Request<RequestBody> {
        Request::builder()
            .uri("/")
            .header("host", "x")
            .body(RequestBody::empty())
            .unwrap()
    }

    async fn send(c: &Client, addr: EndpointAddr) -> Result<String, SendFailure> {
        let (rsp, _) = c
            .send(Direction::Outbound, addr, None, Box::new(get()))
            .await?;
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn http1_connections_are_reused_once_their_response_is_read() {
        let (addr, conns) = origin().await;
        let c = client(Duration::from_secs(60));
        for _ in 0..5 {
            assert_eq!(send(&c, addr).await.unwrap(), "ok");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(c.pools().idle_count(addr), 1);
    }

    #[tokio::test]
    async fn a_refused_connect_gives_the_request_back() {
        let closed: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let c = client(Duration::from_secs(60));
        let err = send(&c, EndpointAddr::new(closed)).await.unwrap_err();
        assert!(
            matches!(err.error, SendError::Connect(ConnectError::Refused { .. })),
            "{}",
            err.error
        );
        assert!(err.unsent.is_some(), "a request that never left comes back");
    }

    #[tokio::test]
    async fn idle_connections_past_the_idle_timeout_are_swept() {
        let (addr, _) = origin().await;
        let c = client(Duration::from_millis(100));
        send(&c, addr).await.unwrap();
        assert_eq!(c.pools().idle_count(addr), 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while c.pools().idle_count(addr) > 0 {
            c.pools().sweep();
            assert!(
                tokio::time::Instant::now() < deadline,
                "the idle connection was never swept"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
