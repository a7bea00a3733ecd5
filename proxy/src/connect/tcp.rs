//! TCP connections to endpoints, within the connect timeout, never to the proxy's own
//! listeners; and the stream an endpoint connection is, in plaintext or inside mesh
//! TLS.

use super::error::ConnectError;
use crate::addrs::EndpointAddr;
use crate::io::AsTcp;
use crate::socket::{SocketFactory, is_local_ip};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

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

/// Opens TCP connections to endpoints.
#[derive(Clone)]
pub struct TcpConnector {
    sockets: Arc<dyn SocketFactory>,
    timeout: Duration,
    own: OwnListeners,
}

impl TcpConnector {
    pub fn new(sockets: Arc<dyn SocketFactory>, timeout: Duration, own: OwnListeners) -> Self {
        Self {
            sockets,
            timeout,
            own,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether `addr` is one of the proxy's own listeners.
    pub fn is_own(&self, addr: SocketAddr) -> bool {
        self.own.contains(addr)
    }

    /// Connects to `addr` by `deadline`.
    pub async fn connect(
        &self,
        addr: EndpointAddr,
        deadline: Instant,
    ) -> Result<TcpStream, ConnectError> {
        if self.is_own(addr.addr()) {
            return Err(ConnectError::Loop { addr });
        }
        match tokio::time::timeout_at(deadline, self.sockets.connect(addr.addr())).await {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
