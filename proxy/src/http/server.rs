//! Serving HTTP on an accepted connection with hyper (HTTP/1.x with upgrades, or
//! HTTP/2), each request observed and forwarded, and the connection drained gracefully
//! when the proxy shuts down.

use super::conn::HttpConn;
use super::observe::Observed;
use super::request::Forwarder;
use crate::io::Io;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// The HTTP version a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// Serves HTTP on `io` until the client closes it or the proxy drains.
pub async fn serve<I: Io>(io: I, version: HttpVersion, conn: Arc<HttpConn>) {
    let drain = conn.ctx.drain.clone();
    let client = conn.client;
    let svc = TowerToHyperService::new(Observed::new(Forwarder::new(conn.clone()), conn));
    let io = TokioIo::new(io);
    let result = match version {
        HttpVersion::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // A proxy passes the origin's Date on; it does not invent one.
                .auto_date_header(false)
                .serve_connection(io, svc)
                .with_upgrades();
            drive(pin!(conn), &drain, |c| c.graceful_shutdown()).await
        }
        HttpVersion::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .auto_date_header(false)
                .serve_connection(io, svc);
            drive(pin!(conn), &drain, |c| c.graceful_shutdown()).await
        }
    };
    if let Err(error) = result {
        debug!(%client, %error, "HTTP connection ended with an error");
    }
}

/// Runs a hyper connection; when the proxy drains, asks it to finish what is in flight
/// and stop (HTTP/1: close after the current response; HTTP/2: GOAWAY).
async fn drive<F: Future<Output = hyper::Result<()>>>(
    mut conn: Pin<&mut F>,
    drain: &CancellationToken,
    graceful: impl FnOnce(Pin<&mut F>),
) -> hyper::Result<()> {
    tokio::select! {
        res = conn.as_mut() => res,
        _ = drain.cancelled() => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}
