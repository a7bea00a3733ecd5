//! Endpoint connections: connecting (TCP within the connect timeout, then mTLS to
//! meshed peers within the same deadline, refusing to connect to the proxy's own
//! listeners), and the pools requests reuse: idle HTTP/1 connections per endpoint, one
//! multiplexed HTTP/2 connection per endpoint, plaintext or over mTLS.

use crate::addrs::{Direction, EndpointAddr};
use crate::http::body::RequestBody;
use crate::io::AsTcp;
use crate::metrics::Metrics;
use crate::socket::{SocketFactory, is_local_ip};
use gofe_identity::SpiffeId;
use gofe_identity::tls::{ALPN_H2, ALPN_HTTP1, MeshTls};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::debug;

/// How long a pooled HTTP/1 connection may take to become ready before another is used.
const POOLED_READY_TIMEOUT: Duration = Duration::from_millis(500);

/// A connection between proxies is replaced after this long, so that both ends present
/// (and check) current certificates and identities at least this often.
const MESH_CONNECTION_MAX_AGE: Duration = Duration::from_secs(300);

/// HTTP/2 pings on an idle pooled connection find a dead peer before a request does.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection to {addr} refused")]
    Refused { addr: EndpointAddr },
    #[error("connection to {addr} timed out after {timeout:?}")]
    Timeout {
        addr: EndpointAddr,
        timeout: Duration,
    },
    #[error("{addr} is one of this proxy's own listeners; refusing to connect to itself")]
    Loop { addr: EndpointAddr },
    #[error("connection to {addr} failed: {source}")]
    Io {
        addr: EndpointAddr,
        source: io::Error,
    },
    /// The peer does not speak mesh TLS at all: it answered with something that is not
    /// TLS, closed on the ClientHello, refused the mesh's ALPN, or presented a
    /// certificate that is not a mesh certificate. In auto mode, a peer to reach in
    /// plaintext.
    #[error("{addr} does not answer mTLS: {reason}")]
    NotMeshed { addr: EndpointAddr, reason: String },
    /// A mesh TLS handshake that failed otherwise (an alert about certificates, an
    /// expired certificate, no answer in time): never a reason to fall back to
    /// plaintext.
    #[error("mTLS handshake with {addr} failed: {reason}")]
    Tls { addr: EndpointAddr, reason: String },
    #[error("{addr} presented identity {presented}, expected {expected}")]
    Identity {
        addr: EndpointAddr,
        presented: String,
        expected: String,
    },
    /// Another request's connection attempt failed while this one waited for it.
    #[error("{message}")]
    Recent {
        reason: &'static str,
        message: String,
        not_meshed: bool,
    },
}

impl ConnectError {
    /// The `reason` label of `gofe_tcp_connect_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Refused { .. } => "refused",
            ConnectError::Timeout { .. } => "timeout",
            ConnectError::Loop { .. } => "loop",
            ConnectError::Io { .. } => "error",
            ConnectError::NotMeshed { .. } => "not_meshed",
            ConnectError::Tls { .. } => "tls",
            ConnectError::Identity { .. } => "identity",
            ConnectError::Recent { reason, .. } => reason,
        }
    }

    /// The TCP connection worked but mesh TLS did not: in auto mode, a peer to reach
    /// in plaintext.
    pub fn not_meshed(&self) -> bool {
        match self {
            ConnectError::NotMeshed { .. } => true,
            ConnectError::Recent { not_meshed, .. } => *not_meshed,
            _ => false,
        }
    }
}

/// The addresses the proxy's own listeners are bound to.
#[derive(Clone, Debug, Default)]
pub struct OwnListeners(Arc<Vec<SocketAddr>>);

impl OwnListeners {
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        Self(Arc::new(addrs))
    }

    /// Whether a connection to `addr` would reach one of the proxy's own listeners.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.0.iter().any(|l| {
            l.port() == addr.port()
                && (l.ip() == addr.ip()
                    || (l.ip().is_unspecified()
                        && l.is_ipv4() == addr.is_ipv4()
                        && is_local_ip(addr.ip())))
        })
    }
}

/// A connection to an endpoint, in plaintext or inside mesh TLS.
pub enum Upstream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsTcp for Upstream {
    fn as_tcp(&self) -> &TcpStream {
        match self {
            Upstream::Plain(s) => s,
            Upstream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Upstream::Plain(s) => s.is_write_vectored(),
            Upstream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens connections to endpoints.
#[derive(Clone)]
pub struct Connector {
    sockets: SocketFactory,
    timeout: Duration,
    own: OwnListeners,
    metrics: Arc<Metrics>,
}

impl Connector {
    pub fn new(
        sockets: SocketFactory,
        timeout: Duration,
        own: OwnListeners,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            sockets,
            timeout,
            own,
            metrics,
        }
    }

    pub async fn connect(&self, addr: EndpointAddr) -> Result<TcpStream, ConnectError> {
        self.connect_by(addr, Instant::now() + self.timeout).await
    }

    async fn connect_by(
        &self,
        addr: EndpointAddr,
        deadline: Instant,
    ) -> Result<TcpStream, ConnectError> {
        if self.own.contains(addr.0) {
            return Err(ConnectError::Loop { addr });
        }
        match tokio::time::timeout_at(deadline.into(), self.sockets.connect(addr.0)).await {
            Err(_) => Err(ConnectError::Timeout {
                addr,
                timeout: self.timeout,
            }),
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                Err(ConnectError::Refused { addr })
            }
            Ok(Err(source)) => Err(ConnectError::Io { addr, source }),
        }
    }

    /// TCP then mesh TLS asking for `alpn`, both within the connect timeout; returns
    /// the stream and the identity the peer presented.
    pub async fn connect_tls(
        &self,
        addr: EndpointAddr,
        tls: &MeshTls,
        alpn: &[u8],
    ) -> Result<(TlsStream<TcpStream>, SpiffeId), ConnectError> {
        let deadline = Instant::now() + self.timeout;
        let tcp = self.connect_by(addr, deadline).await?;
        let connector = tokio_rustls::TlsConnector::from(tls.client_config(alpn));
        // Mesh certificates name identities, not hosts: the name only fills the
        // handshake; the verifier checks the chain and the caller the identity.
        let name = rustls::pki_types::ServerName::IpAddress(addr.0.ip().into());
        let result =
            match tokio::time::timeout_at(deadline.into(), connector.connect(name, tcp)).await {
                Err(_) => Err(ConnectError::Tls {
                    addr,
                    reason: format!("no handshake within {:?}", self.timeout),
                }),
                Ok(Err(e)) if speaks_no_mesh_tls(&e) => Err(ConnectError::NotMeshed {
                    addr,
                    reason: e.to_string(),
                }),
                Ok(Err(e)) => Err(ConnectError::Tls {
                    addr,
                    reason: e.to_string(),
                }),
                Ok(Ok(stream)) => match gofe_identity::tls::peer_identity(stream.get_ref().1) {
                    Some(id) => Ok((stream, id)),
                    None => Err(ConnectError::Tls {
                        addr,
                        reason: "the peer presented no SPIFFE ID".into(),
                    }),
                },
            };
        self.metrics.tls_handshake(
            Direction::Outbound,
            if result.is_ok() { "ok" } else { "error" },
        );
        result
    }

    /// An opaque stream to `addr`, inside mesh TLS when `tls` is given.
    pub async fn connect_stream(
        &self,
        addr: EndpointAddr,
        tls: Option<&MeshTls>,
    ) -> Result<(Upstream, Option<SpiffeId>), ConnectError> {
        match tls {
            None => Ok((Upstream::Plain(self.connect(addr).await?), None)),
            Some(tls) => {
                let (s, id) = self
                    .connect_tls(addr, tls, gofe_identity::tls::ALPN_TCP)
                    .await?;
                Ok((Upstream::Tls(Box::new(s)), Some(id)))
            }
        }
    }
}

/// Whether a failed handshake shows a peer that does not speak the mesh's TLS, as
/// opposed to a mesh peer with a problem (which must not be answered by dropping to
/// plaintext). Auto mode is opportunistic all the same: a peer that presents a
/// certificate not of this mesh is taken for one without a sidecar; where discovery
/// names the identity to expect, or with GOFE_OUTBOUND_MTLS=strict, there is no
/// fallback at all.
fn speaks_no_mesh_tls(e: &io::Error) -> bool {
    use rustls::{AlertDescription, CertificateError, Error as Tls};
    if matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    ) {
        return true;
    }
    matches!(
        e.get_ref().and_then(|inner| inner.downcast_ref::<Tls>()),
        Some(
            Tls::InvalidMessage(_)
                | Tls::AlertReceived(AlertDescription::NoApplicationProtocol)
                | Tls::InvalidCertificate(
                    CertificateError::UnknownIssuer
                        | CertificateError::BadSignature
                        | CertificateError::Other(_),
                )
        )
    )
}

/// The HTTP version spoken to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// Which pool a connection lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Http1,
    Http2,
    /// HTTP/2 over mesh TLS to another proxy.
    Mesh,
}

/// The identity of the peer proxy a connection reaches, when it is meshed.
pub type Peer = Option<Arc<SpiffeId>>;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    Handshake {
        addr: EndpointAddr,
        source: hyper::Error,
    },
    #[error("request to {addr} failed: {source}")]
    Http {
        addr: EndpointAddr,
        source: hyper::Error,
    },
}

/// A send that failed; the request comes back when it was never sent.
#[derive(Debug)]
pub struct SendFailure {
    pub error: SendError,
    pub unsent: Option<Box<Request<RequestBody>>>,
}

impl SendFailure {
    fn unsent(error: impl Into<SendError>, req: Request<RequestBody>) -> Self {
        Self {
            error: error.into(),
            unsent: Some(Box::new(req)),
        }
    }

    fn sent(error: SendError) -> Self {
        Self {
            error,
            unsent: None,
        }
    }
}

impl SendError {
    /// Whether the failure came from the client's side: its request body failed
    /// (the client went away, or sent a broken body) while it was being sent.
    pub fn is_client_side(&self) -> bool {
        matches!(self, SendError::Http { source, .. } if source.is_user())
    }

    /// Whether the peer refused the stream (HTTP/2 REFUSED_STREAM), so that it was not
    /// processed.
    pub fn is_refused_stream(&self) -> bool {
        let SendError::Http { source, .. } = self else {
            return false;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> =
            std::error::Error::source(source);
        while let Some(c) = cause {
            if let Some(h2) = c.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            cause = c.source();
        }
        false
    }
}

/// An HTTP/1 connection lent to one request; `release` gives it back to its pool once
/// the response body has been read to the end, if the request body was sent to the end
/// too (otherwise the connection is mid-message and is closed instead).
pub struct Checkin {
    pool: Arc<Pool>,
    tx: http1::SendRequest<RequestBody>,
    request_ended: Arc<AtomicBool>,
}

impl Checkin {
    pub fn release(self) {
        if self.request_ended.load(Ordering::Acquire) && !self.tx.is_closed() {
            self.pool.h1_idle.lock().push(IdleH1 {
                tx: self.tx,
                since: Instant::now(),
            });
        }
    }
}

struct IdleH1 {
    tx: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// The connections to one endpoint of one kind.
struct Pool {
    addr: EndpointAddr,
    h1_idle: Mutex<Vec<IdleH1>>,
    /// The HTTP/2 connection, its peer, and when it was made.
    h2: Mutex<Option<(http2::SendRequest<RequestBody>, Peer, Instant)>>,
    /// Connections older than this are not used for new requests.
    max_age: Option<Duration>,
    /// Held while an HTTP/2 connection is being made, so concurrent requests share it.
    h2_connecting: tokio::sync::Mutex<()>,
    /// When the last HTTP/2 connect failed, and why: requests that waited for it fail
    /// with it rather than each trying again for a whole connect timeout.
    h2_failed: Mutex<Option<(Instant, &'static str, String, bool)>>,
    /// Milliseconds since `EPOCH` of the last request: an atomic, as every request
    /// stores it.
    last_used: AtomicU64,
}

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

impl Pool {
    fn new(addr: EndpointAddr, max_age: Option<Duration>) -> Self {
        Self {
            addr,
            h1_idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            max_age,
            h2_connecting: tokio::sync::Mutex::new(()),
            h2_failed: Mutex::new(None),
            last_used: AtomicU64::new(now_ms()),
        }
    }

    /// The most recently used idle connection that is still open and fresh. LIFO keeps
    /// a few connections hot and lets the rest age out.
    fn take_idle(&self, idle_timeout: Duration) -> Option<http1::SendRequest<RequestBody>> {
        let mut idle = self.h1_idle.lock();
        while let Some(conn) = idle.pop() {
            if !conn.tx.is_closed() && conn.since.elapsed() < idle_timeout {
                return Some(conn.tx);
            }
        }
        None
    }

    fn cached_h2(&self) -> Option<(http2::SendRequest<RequestBody>, Peer)> {
        let mut h2 = self.h2.lock();
        match h2.as_ref() {
            Some((tx, peer, made))
                if !tx.is_closed() && self.max_age.is_none_or(|max| made.elapsed() < max) =>
            {
                Some((tx.clone(), peer.clone()))
            }
            // Closed, or too old: requests in flight finish on it; new ones get a new
            // connection.
            Some(_) => {
                *h2 = None;
                None
            }
            None => None,
        }
    }
}

/// Every endpoint's connection pools.
pub struct HttpEndpoints {
    connector: Connector,
    idle_timeout: Duration,
    pools: RwLock<HashMap<(EndpointAddr, Kind), Arc<Pool>>>,
}

impl HttpEndpoints {
    pub fn new(connector: Connector, idle_timeout: Duration) -> Self {
        Self {
            connector,
            idle_timeout,
            pools: RwLock::new(HashMap::new()),
        }
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    fn pool(&self, addr: EndpointAddr, kind: Kind) -> Arc<Pool> {
        // The read guard must be gone before the write lock is taken.
        let found = self.pools.read().get(&(addr, kind)).cloned();
        let pool = match found {
            Some(p) => p,
            None => self
                .pools
                .write()
                .entry((addr, kind))
                .or_insert_with(|| {
                    Arc::new(Pool::new(
                        addr,
                        (kind == Kind::Mesh).then_some(MESH_CONNECTION_MAX_AGE),
                    ))
                })
                .clone(),
        };
        pool.last_used.store(now_ms(), Ordering::Relaxed);
        pool
    }

    /// Sends `req` to `addr` in plaintext on a pooled connection. For HTTP/1 the
    /// connection comes back with the response, to be released when its body is done.
    pub async fn send(
        &self,
        addr: EndpointAddr,
        version: HttpVersion,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Checkin>), SendFailure> {
        match version {
            HttpVersion::Http1 => self.send_h1(self.pool(addr, Kind::Http1), req).await,
            HttpVersion::Http2 => self
                .send_h2(&self.pool(addr, Kind::Http2), req, None, None)
                .await
                .map(|(rsp, _)| (rsp, None)),
        }
    }

    /// Sends `req` (HTTP/2, as the mesh speaks) to the proxy at `addr` over mesh TLS;
    /// with `expected`, only if the peer presents that identity. When the peer does not
    /// answer mesh TLS (or is not who was expected) the request comes back unsent.
    pub async fn send_mesh(
        &self,
        addr: EndpointAddr,
        req: Request<RequestBody>,
        tls: &MeshTls,
        expected: Option<&SpiffeId>,
    ) -> Result<(Response<Incoming>, Arc<SpiffeId>), SendFailure> {
        match self
            .send_h2(&self.pool(addr, Kind::Mesh), req, Some(tls), expected)
            .await?
        {
            (rsp, Some(peer)) => Ok((rsp, peer)),
            (_, None) => unreachable!("mesh connections always have a peer identity"),
        }
    }

    async fn send_h1(
        &self,
        pool: Arc<Pool>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Checkin>), SendFailure> {
        loop {
            let (mut tx, reused) = match pool.take_idle(self.idle_timeout) {
                Some(tx) => (tx, true),
                // Connecting is rare next to reusing: boxed, it does not bloat every
                // request's future.
                None => match Box::pin(self.connect_h1(pool.addr, None)).await {
                    Ok((tx, _)) => (tx, false),
                    Err(e) => return Err(SendFailure::unsent(e, req)),
                },
            };
            // A released connection is ready at once, or after hyper has read the end
            // of the last response; one that takes longer is not worth waiting for.
            if reused
                && !matches!(
                    tokio::time::timeout(POOLED_READY_TIMEOUT, tx.ready()).await,
                    Ok(Ok(()))
                )
            {
                continue;
            }
            let request_ended = req.body().ended();
            match tx.try_send_request(req).await {
                Ok(rsp) => {
                    return Ok((
                        rsp,
                        Some(Checkin {
                            pool,
                            tx,
                            request_ended,
                        }),
                    ));
                }
                Err(mut e) => match e.take_message() {
                    // A pooled connection the server closed while it sat idle: the
                    // request was never written, so it goes out on another.
                    Some(unsent) if reused => {
                        debug!(endpoint = %pool.addr, "pooled connection closed; sending on another");
                        req = unsent;
                    }
                    Some(unsent) => {
                        let error = SendError::Http {
                            addr: pool.addr,
                            source: e.into_error(),
                        };
                        return Err(SendFailure::unsent(error, unsent));
                    }
                    None => {
                        return Err(SendFailure::sent(SendError::Http {
                            addr: pool.addr,
                            source: e.into_error(),
                        }));
                    }
                },
            }
        }
    }

    async fn send_h2(
        &self,
        pool: &Pool,
        mut req: Request<RequestBody>,
        tls: Option<&MeshTls>,
        expected: Option<&SpiffeId>,
    ) -> Result<(Response<Incoming>, Peer), SendFailure> {
        let mut fresh = false;
        loop {
            let (mut tx, peer) = match pool.cached_h2() {
                Some(c) => c,
                None => {
                    fresh = true;
                    match Box::pin(self.connect_h2(pool, tls)).await {
                        Ok(c) => c,
                        Err(e) => return Err(SendFailure::unsent(e, req)),
                    }
                }
            };
            if let Some(expected) = expected
                && peer.as_deref() != Some(expected)
            {
                let error = ConnectError::Identity {
                    addr: pool.addr,
                    presented: peer.map(|p| p.to_string()).unwrap_or_default(),
                    expected: expected.to_string(),
                };
                return Err(SendFailure::unsent(error, req));
            }
            match tx.try_send_request(req).await {
                Ok(rsp) => return Ok((rsp, peer)),
                Err(mut e) => match e.take_message() {
                    // The connection went away (GOAWAY, closed) before the stream
                    // opened: the request was not sent.
                    Some(unsent) if !fresh => {
                        let mut h2 = pool.h2.lock();
                        if h2.as_ref().is_some_and(|(cur, _, _)| cur.is_closed()) {
                            *h2 = None;
                        }
                        req = unsent;
                    }
                    Some(unsent) => {
                        let error = SendError::Http {
                            addr: pool.addr,
                            source: e.into_error(),
                        };
                        return Err(SendFailure::unsent(error, unsent));
                    }
                    None => {
                        return Err(SendFailure::sent(SendError::Http {
                            addr: pool.addr,
                            source: e.into_error(),
                        }));
                    }
                },
            }
        }
    }

    async fn connect_h2(
        &self,
        pool: &Pool,
        tls: Option<&MeshTls>,
    ) -> Result<(http2::SendRequest<RequestBody>, Peer), SendError> {
        let waiting_since = Instant::now();
        let _connecting = pool.h2_connecting.lock().await;
        if let Some(c) = pool.cached_h2() {
            return Ok(c);
        }
        if let Some((at, reason, message, not_meshed)) = pool.h2_failed.lock().clone()
            && at >= waiting_since
        {
            return Err(ConnectError::Recent {
                reason,
                message,
                not_meshed,
            }
            .into());
        }
        let fail = |e: ConnectError| {
            *pool.h2_failed.lock() =
                Some((Instant::now(), e.reason(), e.to_string(), e.not_meshed()));
            SendError::Connect(e)
        };
        let (tx, peer) = match tls {
            None => {
                let stream = self.connector.connect(pool.addr).await.map_err(fail)?;
                (h2_handshake(pool.addr, TokioIo::new(stream)).await?, None)
            }
            Some(tls) => {
                let (stream, id) = self
                    .connector
                    .connect_tls(pool.addr, tls, ALPN_H2)
                    .await
                    .map_err(fail)?;
                (
                    h2_handshake(pool.addr, TokioIo::new(stream)).await?,
                    Some(Arc::new(id)),
                )
            }
        };
        *pool.h2.lock() = Some((tx.clone(), peer.clone(), Instant::now()));
        Ok((tx, peer))
    }

    async fn connect_h1(
        &self,
        addr: EndpointAddr,
        tls: Option<&MeshTls>,
    ) -> Result<(http1::SendRequest<RequestBody>, Peer), SendError> {
        match tls {
            None => {
                let stream = self.connector.connect(addr).await?;
                Ok((h1_handshake(addr, TokioIo::new(stream)).await?, None))
            }
            Some(tls) => {
                let (stream, id) = self.connector.connect_tls(addr, tls, ALPN_HTTP1).await?;
                Ok((
                    h1_handshake(addr, TokioIo::new(stream)).await?,
                    Some(Arc::new(id)),
                ))
            }
        }
    }

    /// A new HTTP/1 connection of its own (inside mesh TLS when `tls` is given), for a
    /// request that will take the connection over (an upgrade or CONNECT).
    pub async fn connect_dedicated(
        &self,
        addr: EndpointAddr,
        tls: Option<&MeshTls>,
    ) -> Result<(http1::SendRequest<RequestBody>, Peer), SendError> {
        self.connect_h1(addr, tls).await
    }

    /// Closes idle connections past the idle timeout and forgets pools unused for as
    /// long.
    pub fn sweep(&self) {
        let now = Instant::now();
        let idle_ms = self.idle_timeout.as_millis() as u64;
        self.pools.write().retain(|_, pool| {
            pool.h1_idle
                .lock()
                .retain(|c| !c.tx.is_closed() && now.duration_since(c.since) < self.idle_timeout);
            let unused = now_ms().saturating_sub(pool.last_used.load(Ordering::Relaxed)) >= idle_ms;
            if unused {
                // Requests still streaming keep their connection; no new ones will come.
                pool.h2.lock().take();
            }
            !(unused && pool.h1_idle.lock().is_empty())
        });
    }

    /// How often `sweep` should run.
    pub fn sweep_interval(&self) -> Duration {
        (self.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(15))
    }

    #[cfg(test)]
    fn idle_count(&self, addr: EndpointAddr) -> usize {
        self.pools
            .read()
            .get(&(addr, Kind::Http1))
            .map(|p| p.h1_idle.lock().len())
            .unwrap_or(0)
    }
}

async fn h1_handshake<I>(
    addr: EndpointAddr,
    io: I,
) -> Result<http1::SendRequest<RequestBody>, SendError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (tx, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|source| SendError::Http { addr, source })?;
    tokio::spawn(async move {
        if let Err(error) = conn.with_upgrades().await {
            debug!(endpoint = %addr, %error, "HTTP/1 connection ended");
        }
    });
    Ok(tx)
}

async fn h2_handshake<I>(
    addr: EndpointAddr,
    io: I,
) -> Result<http2::SendRequest<RequestBody>, SendError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (tx, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .adaptive_window(true)
        .handshake(io)
        .await
        .map_err(|source| SendError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            debug!(endpoint = %addr, %error, "HTTP/2 connection ended");
        }
    });
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::convert::Infallible;

    async fn origin() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
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
        (addr, conns)
    }

    fn endpoints(idle: Duration) -> HttpEndpoints {
        HttpEndpoints::new(
            Connector::new(
                SocketFactory::new(),
                Duration::from_secs(1),
                OwnListeners::default(),
                Arc::new(Metrics::new()),
            ),
            idle,
        )
    }

    fn get() -> Request<RequestBody> {
        Request::builder()
            .uri("/")
            .header("host", "x")
            .body(RequestBody::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn http1_connections_are_reused_after_release() {
        let (addr, conns) = origin().await;
        let eps = endpoints(Duration::from_secs(60));
        for _ in 0..5 {
            let (rsp, checkin) = eps
                .send(EndpointAddr(addr), HttpVersion::Http1, get())
                .await
                .unwrap();
            let body = rsp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            checkin.unwrap().release();
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(eps.idle_count(EndpointAddr(addr)), 1);
    }

    #[tokio::test]
    async fn refused_connect_is_reported_as_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let eps = endpoints(Duration::from_secs(60));
        let err = eps
            .send(EndpointAddr(addr), HttpVersion::Http1, get())
            .await
            .err()
            .unwrap();
        assert!(
            matches!(err.error, SendError::Connect(ConnectError::Refused { .. })),
            "{}",
            err.error
        );
        assert!(err.unsent.is_some(), "a request that never left comes back");
    }

    #[test]
    fn own_listeners_match_unspecified_binds() {
        let own = OwnListeners::new(vec![
            "0.0.0.0:4143".parse().unwrap(),
            "127.0.0.1:4140".parse().unwrap(),
        ]);
        assert!(own.contains("127.0.0.1:4143".parse().unwrap()));
        assert!(own.contains("127.0.0.1:4140".parse().unwrap()));
        assert!(!own.contains("127.0.0.1:8080".parse().unwrap()));
        // Somebody else's inbound port is not ours.
        assert!(!own.contains("192.0.2.10:4143".parse().unwrap()));
    }

    #[tokio::test]
    async fn expired_idle_connections_are_swept() {
        let (addr, _) = origin().await;
        let eps = endpoints(Duration::from_millis(100));
        let (rsp, checkin) = eps
            .send(EndpointAddr(addr), HttpVersion::Http1, get())
            .await
            .unwrap();
        rsp.into_body().collect().await.unwrap();
        checkin.unwrap().release();
        assert_eq!(eps.idle_count(EndpointAddr(addr)), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            eps.sweep();
            if eps.idle_count(EndpointAddr(addr)) == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "idle connection was never swept");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
