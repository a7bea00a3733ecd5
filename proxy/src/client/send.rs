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
    /// identity. An unsent request comes back with the failure; so does a bodiless one
    /// whose HTTP/2 stream was refused, when `resend_refused` (`Call::resend_refused`).
    pub async fn send(
        &self,
        direction: Direction,
        addr: EndpointAddr,
        expected: Option<&SpiffeId>,
        mut req: Box<Request<RequestBody>>,
        resend_refused: bool,
    ) -> Result<(Response<UpstreamBody>, Peer), SendFailure> {
        let mut decided_again = false;
        loop {
            let decision = self.connector.decide(direction, addr, expected);
            let result = match decision {
                Decision::Refuse(reason) => Err(SendFailure::unsent(
                    self.connector.refuse(direction, addr, reason),
                    req,
                )),
                Decision::Plaintext => self.send_plain(direction, addr, req, resend_refused).await,
                Decision::Mtls { .. } => {
                    self.send_mesh(direction, addr, decision, req, resend_refused)
                        .await
                }
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
        resend_refused: bool,
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
            let (rsp, peer, slot) = h2::send(&pool, self.h2, req, None, plain, resend_refused)
                .await
                .inspect_err(|f| self.count_busy(f))?;
            return Ok((UpstreamBody::http2(rsp, slot), peer));
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
        resend_refused: bool,
    ) -> Result<(Response<UpstreamBody>, Peer), SendFailure> {
        let Decision::Mtls { expected, .. } = decision else {
            unreachable!("the mesh pool is for mTLS decisions");
        };
        let connector = &self.connector;
        let connect = || connector.open(direction, addr, decision, ALPN_H2);
        mesh::to_mesh(&mut req, addr);
        let pool = self.pools.get(addr, Kind::Mesh);
        match h2::send(&pool, self.h2, req, expected, connect, resend_refused).await {
            Ok((rsp, peer, slot)) => Ok((UpstreamBody::http2(rsp, slot), peer)),
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
        client_pinging(idle, Duration::from_secs(30))
    }

    fn client_pinging(idle: Duration, keepalive: Duration) -> Client {
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
            keepalive,
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
            .send(Direction::Outbound, addr, None, Box::new(get()), false)
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

    /// An HTTP/2 origin (the h2 crate's server, a 64 KiB stream window) on a port of its
    /// own: each connection it accepts goes to `serve`, with the connection's number.
    async fn h2_origin<F, Fut>(serve: F) -> EndpointAddr
    where
        F: Fn(usize, ::h2::server::Connection<tokio::net::TcpStream, bytes::Bytes>) -> Fut
            + Send
            + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for n in 1.. {
                let (s, _) = l.accept().await.unwrap();
                let conn = ::h2::server::Builder::new()
                    .initial_window_size(65_535)
                    .handshake(s)
                    .await
                    .unwrap();
                tokio::spawn(serve(n, conn));
            }
        });
        EndpointAddr::new(addr)
    }

    fn h2_post(body: RequestBody) -> Box<Request<RequestBody>> {
        Box::new(
            Request::builder()
                .method("POST")
                .version(Version::HTTP_2)
                .uri("http://origin/upload")
                .body(body)
                .unwrap(),
        )
    }

    fn streamed<S>(frames: S) -> RequestBody
    where
        S: futures_util::Stream<Item = Result<http_body::Frame<bytes::Bytes>, Infallible>>
            + Send
            + Sync
            + 'static,
    {
        use crate::body::source::Source;
        RequestBody::new(Source::boxed(http_body_util::StreamBody::new(frames)))
    }

    /// A request body fed chunk by chunk through the sender; it ends when the sender
    /// goes.
    fn fed_body() -> (tokio::sync::mpsc::Sender<&'static [u8]>, RequestBody) {
        let (more, rx) = tokio::sync::mpsc::channel::<&'static [u8]>(1);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((
                Ok(http_body::Frame::data(bytes::Bytes::from_static(chunk))),
                rx,
            ))
        });
        (more, streamed(frames))
    }

    /// Reads an origin's request body to its end, giving its window back: the bytes read.
    async fn read_to_end(body: &mut ::h2::RecvStream) -> usize {
        let mut read = 0;
        while let Some(data) = body.data().await {
            let data = data.unwrap();
            read += data.len();
            body.flow_control().release_capacity(data.len()).unwrap();
        }
        read
    }

    /// What an origin's connections report to the test: the first report counts.
    type Report<T> = Arc<parking_lot::Mutex<Option<tokio::sync::oneshot::Sender<T>>>>;

    fn first_report<T>() -> (Report<T>, tokio::sync::oneshot::Receiver<T>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Arc::new(parking_lot::Mutex::new(Some(tx))), rx)
    }

    fn report<T>(to: &Report<T>, value: T) {
        if let Some(tx) = to.lock().take() {
            let _ = tx.send(value);
        }
    }

    #[tokio::test]
    async fn http2_bodies_larger_than_the_peers_window_go_in_full_with_their_trailers() {
        let addr = h2_origin(|_, mut conn| async move {
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let read = read_to_end(&mut body).await;
                    let trailers = body.trailers().await.unwrap().unwrap_or_default();
                    let rsp = Response::builder()
                        .header("x-read", read)
                        .header("x-trailer", trailers.get("x-sum").cloned().unwrap())
                        .body(())
                        .unwrap();
                    respond.send_response(rsp, true).unwrap();
                });
            }
        })
        .await;
        // 48 chunks of 64 KiB: 48 times the stream's window.
        let chunk = bytes::Bytes::from(vec![7u8; 64 * 1024]);
        let mut frames: Vec<_> = (0..48)
            .map(|_| Ok(http_body::Frame::data(chunk.clone())))
            .collect();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("48"));
        frames.push(Ok(http_body::Frame::trailers(trailers)));
        let body = streamed(futures_util::stream::iter(frames));

        let c = client(Duration::from_secs(60));
        let (rsp, _) = c
            .send(Direction::Outbound, addr, None, h2_post(body), false)
            .await
            .unwrap();
        assert_eq!(
            rsp.headers()["x-read"],
            (48 * 64 * 1024).to_string().as_str()
        );
        assert_eq!(rsp.headers()["x-trailer"], "48");
    }

    #[tokio::test]
    async fn an_http2_request_given_up_before_its_answer_resets_its_stream() {
        let (reset_tx, reset_rx) = first_report();
        let addr = h2_origin(move |_, mut conn| {
            let reset_tx = reset_tx.clone();
            async move {
                let Some(Ok((req, mut respond))) = conn.accept().await else {
                    return;
                };
                // The request's first chunk, then no answer: wait for the reset, while
                // the connection goes on being driven.
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    body.data().await.unwrap().unwrap();
                    let reason = std::future::poll_fn(|cx| respond.poll_reset(cx))
                        .await
                        .unwrap();
                    report(&reset_tx, reason);
                });
                while conn.accept().await.is_some() {}
            }
        })
        .await;
        // One chunk, then a body that never ends.
        let first = futures_util::stream::iter([Ok(http_body::Frame::data(
            bytes::Bytes::from_static(b"first"),
        ))]);
        let body = streamed(futures_util::StreamExt::chain(
            first,
            futures_util::stream::pending(),
        ));
        let c = client(Duration::from_secs(60));
        let gave_up = tokio::time::timeout(
            Duration::from_millis(300),
            c.send(Direction::Outbound, addr, None, h2_post(body), false),
        )
        .await;
        assert!(gave_up.is_err(), "the origin never answers");
        let reason = tokio::time::timeout(Duration::from_secs(5), reset_rx)
            .await
            .expect("the stream is reset once the request is given up")
            .unwrap();
        assert_eq!(reason, ::h2::Reason::CANCEL);
    }

    #[tokio::test]
    async fn an_http2_connection_whose_peer_stops_answering_pings_is_closed_and_replaced() {
        // The first connection answers one request, then is no longer read (PINGs go
        // unanswered); later ones answer everything.
        let addr = h2_origin(|n, mut conn| async move {
            while let Some(Ok((_, mut respond))) = conn.accept().await {
                respond
                    .send_response(
                        Response::builder().header("x-conn", n).body(()).unwrap(),
                        true,
                    )
                    .unwrap();
                if n == 1 {
                    // Flush the answer, then hold the connection unread.
                    let _ = tokio::time::timeout(Duration::from_millis(50), conn.accept()).await;
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        let c = client_pinging(Duration::from_secs(60), Duration::from_millis(100));
        let get = || {
            let mut req = get();
            *req.version_mut() = Version::HTTP_2;
            *req.uri_mut() = "http://origin/".parse().unwrap();
            Box::new(req)
        };
        let (rsp, _) = c
            .send(Direction::Outbound, addr, None, get(), false)
            .await
            .unwrap();
        assert_eq!(rsp.headers()["x-conn"], "1");
        // Without the PING check every later request would go to the silent connection
        // and wait forever.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let sent = c.send(Direction::Outbound, addr, None, get(), false);
            if let Ok(Ok((rsp, _))) = tokio::time::timeout(Duration::from_millis(500), sent).await {
                assert_eq!(rsp.headers()["x-conn"], "2");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "requests still go to the connection that stopped answering PINGs"
            );
        }
    }

    #[tokio::test]
    async fn an_http2_body_still_being_sent_when_the_answer_comes_goes_on_to_its_end() {
        // The origin answers at once (headers), then reads the body to its end and
        // says how much it read: a bidirectional stream, as gRPC's.
        let addr = h2_origin(|_, mut conn| async move {
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let mut out = respond.send_response(Response::new(()), false).unwrap();
                    let mut body = req.into_body();
                    let read = read_to_end(&mut body).await;
                    out.send_data(bytes::Bytes::from(format!("read {read}")), true)
                        .unwrap();
                });
            }
        })
        .await;
        let (more, body) = fed_body();
        more.send(b"first").await.unwrap();
        let c = client(Duration::from_secs(60));
        let (rsp, _) = tokio::time::timeout(
            Duration::from_secs(5),
            c.send(Direction::Outbound, addr, None, h2_post(body), false),
        )
        .await
        .expect("the answer comes before the body ends")
        .unwrap();
        // The answer is in; the rest of the body follows, then its end.
        more.send(b"second").await.unwrap();
        drop(more);
        let body = tokio::time::timeout(Duration::from_secs(5), rsp.into_body().collect())
            .await
            .expect("the body was sent to its end and the origin answered in full")
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"read 11");
    }

    #[tokio::test]
    async fn an_http2_endpoint_may_not_push() {
        let (pushed_tx, pushed_rx) = first_report();
        let addr = h2_origin(move |_, mut conn| {
            let pushed_tx = pushed_tx.clone();
            async move {
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    let promise = Request::builder()
                        .uri("http://origin/pushed")
                        .body(())
                        .unwrap();
                    let pushed = respond.push_request(promise).is_ok();
                    report(&pushed_tx, pushed);
                    respond.send_response(Response::new(()), true).unwrap();
                }
            }
        })
        .await;
        let c = client(Duration::from_secs(60));
        let mut req = get();
        *req.version_mut() = Version::HTTP_2;
        *req.uri_mut() = "http://origin/".parse().unwrap();
        c.send(Direction::Outbound, addr, None, Box::new(req), false)
            .await
            .unwrap();
        assert!(
            !pushed_rx.await.unwrap(),
            "the client's SETTINGS disable server push"
        );
    }

    #[tokio::test]
    async fn a_refused_http2_stream_gives_a_bodiless_request_back_when_asked() {
        let addr = h2_origin(|_, mut conn| async move {
            while let Some(Ok((_, mut respond))) = conn.accept().await {
                respond.send_reset(::h2::Reason::REFUSED_STREAM);
            }
        })
        .await;
        let c = client(Duration::from_secs(60));
        let h2_get = || {
            let mut req = get();
            *req.version_mut() = Version::HTTP_2;
            *req.uri_mut() = "http://origin/again".parse().unwrap();
            Box::new(req)
        };
        let Err(f) = c
            .send(Direction::Outbound, addr, None, h2_get(), true)
            .await
        else {
            panic!("the origin refuses every stream");
        };
        assert!(f.error.is_refused_stream(), "{}", f.error);
        let back = f.unsent.expect("the refused request comes back");
        assert_eq!(back.uri().path(), "/again");
        assert_eq!(back.headers()["host"], "x");

        let Err(f) = c
            .send(Direction::Outbound, addr, None, h2_get(), false)
            .await
        else {
            panic!("the origin refuses every stream");
        };
        assert!(f.error.is_refused_stream(), "{}", f.error);
        assert!(
            f.unsent.is_none(),
            "unasked, a request that went out is not copied"
        );
    }

    #[tokio::test]
    async fn an_http2_answer_that_ends_the_stream_early_arrives_whole_and_stops_the_body() {
        // The origin reads one chunk and answers; once the client has the answer's
        // data, the origin resets the rest of the exchange with NO_ERROR (RFC 9113
        // §8.1: it needs no more of the request).
        let (go_reset, reset_now) = tokio::sync::oneshot::channel::<()>();
        let reset_now = Arc::new(parking_lot::Mutex::new(Some(reset_now)));
        let addr = h2_origin(move |_, mut conn| {
            let reset_now = reset_now.clone();
            async move {
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let reset_now = reset_now.lock().take().unwrap();
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        body.data().await.unwrap().unwrap();
                        let mut out = respond.send_response(Response::new(()), false).unwrap();
                        out.send_data(bytes::Bytes::from_static(b"early"), false)
                            .unwrap();
                        reset_now.await.unwrap();
                        out.send_reset(::h2::Reason::NO_ERROR);
                    });
                }
            }
        })
        .await;
        // One chunk, then a body that would go on for ever.
        let (more, body) = fed_body();
        more.send(b"first").await.unwrap();
        let c = client(Duration::from_secs(60));
        let (rsp, _) = c
            .send(Direction::Outbound, addr, None, h2_post(body), false)
            .await
            .unwrap();
        let mut body = rsp.into_body();
        let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the answer's data comes")
            .unwrap()
            .unwrap();
        assert_eq!(first.into_data().unwrap(), "early");
        go_reset.send(()).unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the answer ends");
        assert!(
            end.is_none(),
            "a reset with NO_ERROR ends the answer, it is no error: {:?}",
            end.map(|f| f.map(|_| ()))
        );
        tokio::time::timeout(Duration::from_secs(5), more.closed())
            .await
            .expect("the pipe stops reading the request body once the stream is reset");
    }
}
