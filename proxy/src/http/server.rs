//! Serving HTTP on an accepted connection with hyper (HTTP/1.x with upgrades, or
//! HTTP/2), each request observed and forwarded, within the limits every listener
//! holds to (README, Limits): a head within GOFE_HTTP_HEADER_READ_TIMEOUT and
//! GOFE_MAX_REQUEST_HEADERS, HTTP/2 settings pinned, an idle connection closed; and the
//! connection drained gracefully when the proxy shuts down.

use super::activity::{Activity, Watched};
use super::conn::{HttpConn, HttpVersion};
use super::observe::Observed;
use crate::config::Limits;
use crate::io::Io;
use crate::metrics::{Limit, Metrics};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// HTTP/2 streams whose reset by the client is not yet accepted, at most (rapid reset:
/// h2's own default, pinned).
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the proxy may reset for a client's errors before it is told to go away.
const H2_MAX_LOCAL_ERROR_RESETS: usize = 256;
/// What a stream may have waiting to be sent to a client that does not read: 16 KiB a
/// stream (x 1024 streams: 16 MiB for a connection that reads nothing at all).
const H2_MAX_SEND_BUF: usize = 16 * 1024;
/// What a client may send before the proxy has read it: a stream's share, and the
/// whole connection's.
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// A PING must be answered within this.
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves HTTP on `io` until the client closes it, it idles out, or the proxy drains.
pub async fn serve<I: Io>(io: I, version: HttpVersion, conn: Arc<HttpConn>) {
    let ctx = conn.ctx.clone();
    let drain = ctx.drain.clone();
    let client = conn.client;
    let at = conn.direction.as_str();
    let limits = ctx.config.limits;
    let activity = conn.activity.clone();
    let svc = Observed::new(conn);
    let io = TokioIo::new(Watched::new(io, activity.clone()));
    let timers = Timers {
        activity,
        limits,
        metrics: &ctx.metrics,
        at,
    };
    let result = match version {
        HttpVersion::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // A proxy passes the origin's Date on; it does not invent one.
                .auto_date_header(false)
                // Heads are timed from their first byte (activity.rs), not while a
                // keep-alive connection waits.
                .header_read_timeout(None)
                .max_header_size(limits.max_request_headers)
                .max_buf_size(limits.max_request_headers + 16 * 1024)
                .serve_connection(io, svc)
                .with_upgrades();
            drive(pin!(conn), &drain, timers, |c| c.graceful_shutdown()).await
        }
        HttpVersion::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .auto_date_header(false)
                .max_concurrent_streams(limits.h2_max_concurrent_streams)
                .max_header_list_size(limits.max_request_headers as u32)
                .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
                .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
                .max_send_buf_size(H2_MAX_SEND_BUF)
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .keep_alive_interval(limits.h2_keepalive)
                .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
                .serve_connection(io, svc);
            drive(pin!(conn), &drain, timers, |c| c.graceful_shutdown()).await
        }
    };
    if let Err(error) = result {
        if error.is_parse_too_large() {
            ctx.metrics.limit_tripped(Limit::HeaderSize, at);
        } else if is_h2_protocol_error(&error) {
            ctx.metrics.limit_tripped(Limit::Http2Protocol, at);
        }
        debug!(%client, %error, "HTTP connection ended with an error");
    }
}

/// Whether a connection ended because the peer broke or flooded HTTP/2 (GOAWAY with a
/// protocol error, ENHANCE_YOUR_CALM...).
fn is_h2_protocol_error(error: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return h2.is_go_away() || h2.reason().is_some_and(|r| r != h2::Reason::NO_ERROR);
        }
        cause = c.source();
    }
    false
}

/// The timers a served connection runs under.
struct Timers<'a> {
    activity: Arc<Activity>,
    limits: Limits,
    metrics: &'a Metrics,
    at: &'static str,
}

/// Runs a hyper connection: when the proxy drains, or the connection idles out, asks it
/// to finish what is in flight and stop (HTTP/1: close after the current response;
/// HTTP/2: GOAWAY); a head that does not arrive in time ends it at once.
async fn drive<F: Future<Output = hyper::Result<()>>>(
    mut conn: Pin<&mut F>,
    drain: &CancellationToken,
    timers: Timers<'_>,
    graceful: impl FnOnce(Pin<&mut F>),
) -> hyper::Result<()> {
    let l = timers.limits;
    let every = (l.header_read_timeout.min(l.http_idle_timeout) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            res = conn.as_mut() => return res,
            _ = drain.cancelled() => break,
            _ = tick.tick() => match timers.activity.check(l.header_read_timeout, l.http_idle_timeout) {
                None => {}
                Some(Limit::HeaderReadTimeout) => {
                    timers.metrics.limit_tripped(Limit::HeaderReadTimeout, timers.at);
                    return Ok(());
                }
                Some(limit) => {
                    timers.metrics.limit_tripped(limit, timers.at);
                    break;
                }
            },
        }
    }
    graceful(conn.as_mut());
    conn.await
}
