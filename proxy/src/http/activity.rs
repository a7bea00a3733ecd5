//! What a served HTTP connection is doing, for its two timers: the head now being read
//! must arrive within GOFE_HTTP_HEADER_READ_TIMEOUT of its first byte (slowloris), and
//! a connection with no request in flight is closed after GOFE_HTTP_IDLE_TIMEOUT. The
//! connection's bytes (`Watched`) and its requests (`InFlight`) report here; hyper's own
//! header timer is not used, since it also runs while a keep-alive connection merely
//! waits for its next request.

use crate::io::AsTcp;
use crate::metrics::Limit;
use pin_project_lite::pin_project;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub struct Activity {
    /// Time is counted in milliseconds from here (0 means "not set" below).
    epoch: Instant,
    /// Whether heads are timed: HTTP/1 (HTTP/2 frames its headers, bounded by the
    /// HTTP/2 settings instead).
    heads: bool,
    in_flight: AtomicUsize,
    /// When the first byte of the head now being read arrived (+1), or 0.
    head_started: AtomicU64,
    /// When a request last ended (or the connection began) (+1).
    idle_since: AtomicU64,
}

impl Activity {
    pub fn new(heads: bool) -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            heads,
            in_flight: AtomicUsize::new(0),
            head_started: AtomicU64::new(0),
            idle_since: AtomicU64::new(1),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Bytes arrived: with nothing in flight, they begin a new head.
    fn read(&self) {
        if self.heads
            && self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started.store(self.now(), Ordering::Relaxed);
        }
    }

    /// A request's head arrived: it is in flight until the returned guard goes (its
    /// response body ended, or it was abandoned).
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The limit that now says this connection must go, if one does.
    pub fn check(&self, header_read_timeout: Duration, idle_timeout: Duration) -> Option<Limit> {
        let now = self.now();
        let started = self.head_started.load(Ordering::Relaxed);
        if started != 0 && now - started > header_read_timeout.as_millis() as u64 {
            return Some(Limit::HeaderReadTimeout);
        }
        let idle = self.in_flight.load(Ordering::Acquire) == 0 && started == 0;
        let since = self.idle_since.load(Ordering::Relaxed);
        (idle && now.saturating_sub(since) > idle_timeout.as_millis() as u64)
            .then_some(Limit::HttpIdle)
    }
}

/// A request in flight on a connection.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.now(), Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project! {
    /// A served connection's stream, reporting the bytes that arrive.
    pub struct Watched<I> {
        #[pin]
        inner: I,
        activity: Arc<Activity>,
    }
}

impl<I> Watched<I> {
    pub fn new(inner: I, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<I: AsTcp> AsTcp for Watched<I> {
    fn as_tcp(&self) -> &TcpStream {
        self.inner.as_tcp()
    }
}

impl<I: AsyncRead> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        r
    }
}

impl<I: AsyncWrite> AsyncWrite for Watched<I> {
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

    const HEAD: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(300);

    #[tokio::test(start_paused = true)]
    async fn a_head_must_arrive_within_its_timeout_of_its_first_byte() {
        let a = Activity::new(true);
        // Waiting for a request is not reading one.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(a.check(HEAD, IDLE), None);
        a.read();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(a.check(HEAD, IDLE), None);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(a.check(HEAD, IDLE), Some(Limit::HeaderReadTimeout));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_with_nothing_in_flight() {
        let a = Activity::new(true);
        a.read();
        let request = a.request_started();
        // A long request is not idleness, nor a slow head.
        tokio::time::advance(Duration::from_secs(600)).await;
        a.read();
        assert_eq!(a.check(HEAD, IDLE), None);
        drop(request);
        tokio::time::advance(Duration::from_secs(299)).await;
        assert_eq!(a.check(HEAD, IDLE), None);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(a.check(HEAD, IDLE), Some(Limit::HttpIdle));
    }

    #[tokio::test(start_paused = true)]
    async fn http2_frames_are_not_heads() {
        let a = Activity::new(false);
        a.read();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(a.check(HEAD, IDLE), None, "a PING is not a slow head");
    }
}
