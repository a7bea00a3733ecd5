//! Serving HTTP on an accepted connection: HTTP/1.x with upgrades through hyper, HTTP/2
//! through `h2_server`; each request observed and forwarded, within the limits every listener
//! holds to (README, Limits): a head within GOFE_HTTP_HEADER_READ_TIMEOUT and
//! GOFE_MAX_REQUEST_HEADERS, HTTP/2 settings pinned, an idle connection closed; and the
//! connection drained gracefully when the proxy shuts down.

use super::activity::{Activity, Watched};
use super::conn::{HttpConn, HttpVersion};
use super::h2_server;
use super::observe::Observed;
use crate::config::Limits;
use crate::io::Io;
use crate::metrics::{Limit, Metrics};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Serves HTTP on `io` until the client closes it, it idles out, or the proxy drains.
pub async fn serve<I: Io>(io: I, version: HttpVersion, conn: Arc<HttpConn>) {
    let ctx = conn.ctx.clone();
    let drain = ctx.drain.clone();
    let client = conn.client;
    let at = conn.direction.as_str();
    let limits = ctx.config.limits;
    let activity = conn.activity.clone();
    let svc = Observed::new(conn);
    let io = Watched::new(io, activity.clone());
    let timers = Timers {
        activity,
        limits,
        metrics: &ctx.metrics,
        at,
    };
    match version {
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
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            let result = drive(pin!(conn), &drain, timers, |c| c.graceful_shutdown()).await;
            if let Err(error) = result {
                if error.is_parse_too_large() {
                    ctx.metrics.limit_tripped(Limit::HeaderSize, at);
                }
                debug!(%client, %error, "HTTP/1 connection ended with an error");
            }
        }
        HttpVersion::Http2 => {
            let graceful = CancellationToken::new();
            // Boxed: an HTTP/1 connection's task would otherwise have room for it too.
            let mut conn = Box::pin(h2_server::serve(io, svc, &limits, &graceful));
            let result = drive(conn.as_mut(), &drain, timers, |_| graceful.cancel()).await;
            if let Err(error) = result {
                if error.is_protocol_error() {
                    ctx.metrics.limit_tripped(Limit::Http2Protocol, at);
                }
                debug!(%client, %error, "HTTP/2 connection ended with an error");
            }
        }
    }
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
async fn drive<F: Future<Output = Result<(), E>>, E>(
    mut conn: Pin<&mut F>,
    drain: &CancellationToken,
    timers: Timers<'_>,
    graceful: impl FnOnce(Pin<&mut F>),
) -> Result<(), E> {
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
