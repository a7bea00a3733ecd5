//! Wrappers around an accepted connection: `Counted` adds its bytes to the TCP byte
//! counters as they pass, `Prefixed` replays the bytes protocol detection already read.
//! Both reach the underlying `TcpStream` through `AsTcp`, which a failed connection
//! needs to be reset.

use bytes::{Buf, Bytes};
use gofe_telemetry::metrics::{Counter, Gauge};
use pin_project_lite::pin_project;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A connection the proxy reads and writes.
pub trait Io: AsyncRead + AsyncWrite + AsTcp + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + AsTcp + Send + Unpin + 'static> Io for T {}

/// Reaches the TCP socket beneath any wrappers.
pub trait AsTcp {
    fn as_tcp(&self) -> &TcpStream;
}

impl AsTcp for TcpStream {
    fn as_tcp(&self) -> &TcpStream {
        self
    }
}

impl<T: AsTcp> AsTcp for tokio_rustls::server::TlsStream<T> {
    fn as_tcp(&self) -> &TcpStream {
        self.get_ref().0.as_tcp()
    }
}

pin_project! {
    /// Counts the bytes read from and written to the inner stream, and holds the
    /// connection's place in the open-connections gauge for as long as the stream
    /// lives (through an upgrade, the tunnel owns it).
    pub struct Counted<T> {
        #[pin]
        inner: T,
        read: Arc<Counter>,
        written: Arc<Counter>,
        _open: OpenGuard,
    }
}

/// One open connection in a gauge.
struct OpenGuard(Arc<Gauge>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl<T> Counted<T> {
    pub fn new(inner: T, read: Arc<Counter>, written: Arc<Counter>, open: Arc<Gauge>) -> Self {
        open.inc();
        Self {
            inner,
            read,
            written,
            _open: OpenGuard(open),
        }
    }
}

impl<T: AsTcp> AsTcp for Counted<T> {
    fn as_tcp(&self) -> &TcpStream {
        self.inner.as_tcp()
    }
}

impl<T: AsyncRead> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read.add(n as u64);
        }
        res
    }
}

impl<T: AsyncWrite> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            this.written.add(n as u64);
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            this.written.add(n as u64);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

pin_project! {
    /// Reads `prefix` before the inner stream: the bytes protocol detection consumed.
    pub struct Prefixed<T> {
        prefix: Bytes,
        #[pin]
        inner: T,
    }
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsTcp> AsTcp for Prefixed<T> {
    fn as_tcp(&self) -> &TcpStream {
        self.inner.as_tcp()
    }
}

impl<T: AsyncRead> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // Free the detection buffer rather than keep it for the connection's life.
                *this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefix_is_read_first_and_bytes_are_counted() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let (read, written) = (Arc::new(Counter::default()), Arc::new(Counter::default()));
        let open = Arc::new(Gauge::default());
        let mut io = Prefixed::new(
            Bytes::from_static(b"GET "),
            Counted::new(server, read.clone(), written.clone(), open.clone()),
        );
        assert_eq!(open.get(), 1);
        client.write_all(b"/ HTTP/1.1\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n");
        // The prefix was counted when detection read it, through the same counter.
        assert_eq!(read.get(), 12);
        io.write_all(b"hello").await.unwrap();
        assert_eq!(written.get(), 5);
        drop(io);
        assert_eq!(open.get(), 0);
    }
}
