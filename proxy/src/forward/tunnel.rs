//! Two connections joined byte for byte until each side has closed, a half-close passed
//! on as a half-close (inside mesh TLS, as close_notify plus FIN), and closed when no
//! byte has crossed either way for GOFE_TCP_IDLE_TIMEOUT. A failure is passed on as a
//! failure: both peers see a reset, not an orderly end.

use crate::io::AsTcp;
use crate::socket;
use pin_project_lite::pin_project;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

/// Per-direction copy buffer: large enough for bulk transfers, small enough that many
/// idle connections stay cheap.
const COPY_BUFFER: usize = 16 * 1024;

/// How a joined pair ended.
#[derive(Debug)]
pub enum Ended {
    /// Both sides closed: the bytes each way.
    Closed(u64, u64),
    /// No byte either way for the idle timeout.
    Idle,
    Failed(io::Error),
}

/// Copies between `client` and `server` until both have closed, one fails, or nothing
/// crosses for `idle`.
pub async fn copy<A, B>(client: &mut A, server: &mut B, idle: Duration) -> Ended
where
    A: AsyncRead + AsyncWrite + AsTcp + Unpin,
    B: AsyncRead + AsyncWrite + AsTcp + Unpin,
{
    let clock = Clock::new();
    let ended = {
        let mut a = Timed::new(&mut *client, clock.clone());
        let mut b = Timed::new(&mut *server, clock.clone());
        tokio::select! {
            r = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUFFER, COPY_BUFFER) => match r {
                Ok((sent, received)) => Ended::Closed(sent, received),
                Err(e) => Ended::Failed(e),
            },
            _ = clock.idle_for(idle) => Ended::Idle,
        }
    };
    if !matches!(ended, Ended::Closed(..)) {
        socket::reset(client.as_tcp());
        socket::reset(server.as_tcp());
    }
    ended
}

/// Joins two streams whose sockets are hyper's (an upgrade's two sides), where a reset
/// cannot be asked for.
pub async fn join<A, B>(a: A, b: B, idle: Duration) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Clock::new();
    let mut a = Timed::new(a, clock.clone());
    let mut b = Timed::new(b, clock.clone());
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => match r {
            Ok((x, y)) => Ended::Closed(x, y),
            Err(error) => {
                debug!(%error, "tunnel ended with an error");
                Ended::Failed(error)
            }
        },
        _ = clock.idle_for(idle) => Ended::Idle,
    }
}

/// When a byte last crossed, in milliseconds since the clock began.
#[derive(Clone)]
struct Clock {
    start: Instant,
    last: Arc<AtomicU64>,
}

impl Clock {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing has crossed for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

pin_project! {
    /// A stream that marks the clock when bytes cross it.
    struct Timed<T> {
        #[pin]
        inner: T,
        clock: Clock,
    }
}

impl<T> Timed<T> {
    fn new(inner: T, clock: Clock) -> Self {
        Self { inner, clock }
    }
}

impl<T: AsTcp> AsTcp for Timed<T> {
    fn as_tcp(&self) -> &TcpStream {
        self.inner.as_tcp()
    }
}

impl<T: AsyncRead> AsyncRead for Timed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.touch();
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for Timed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        r
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

    #[tokio::test(start_paused = true)]
    async fn a_silent_tunnel_ends_after_its_idle_timeout_and_a_busy_one_does_not() {
        let (a, mut a_far) = tokio::io::duplex(64);
        let (b, mut b_far) = tokio::io::duplex(64);
        let joined = tokio::spawn(join(a, b, Duration::from_secs(60)));
        // Bytes every 30 s keep it open past the timeout.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(30)).await;
            a_far.write_all(b"x").await.unwrap();
            let mut got = [0u8; 1];
            b_far.read_exact(&mut got).await.unwrap();
        }
        assert!(!joined.is_finished(), "two minutes of traffic");
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(matches!(joined.await.unwrap(), Ended::Idle));
    }
}
