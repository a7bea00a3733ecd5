//! HTTP/1 to endpoints: a pooled connection per request at a time, and connections of
//! their own for requests that take them over (upgrades, CONNECT).

use super::error::{SendError, SendFailure};
use super::pool::{Checkin, Pool};
use crate::addrs::EndpointAddr;
use crate::body::request::RequestBody;
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// How long a pooled HTTP/1 connection may take to become ready before another is used.
const POOLED_READY_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether a pooled connection is ready to send: at once, without a timer (nearly
/// always), or within POOLED_READY_TIMEOUT.
async fn ready_soon(tx: &mut http1::SendRequest<RequestBody>) -> bool {
    match tx.ready().now_or_never() {
        Some(ready) => ready.is_ok(),
        None => matches!(
            tokio::time::timeout(POOLED_READY_TIMEOUT, tx.ready()).await,
            Ok(Ok(()))
        ),
    }
}

/// Sends `req` on an idle connection of `pool`, or on a new one from `connect`. The
/// connection comes back with the response, to be released when its body is done.
pub async fn send<C, F, I>(
    pool: Arc<Pool>,
    idle_timeout: Duration,
    mut req: Box<Request<RequestBody>>,
    connect: C,
) -> Result<(Response<Incoming>, Checkin), SendFailure>
where
    C: Fn() -> F,
    F: Future<Output = Result<I, SendError>>,
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    loop {
        let (mut tx, reused) = match pool.take_idle(idle_timeout) {
            Some(tx) => (tx, true),
            // Connecting is rare next to reusing: boxed, it does not bloat every
            // request's future.
            None => match Box::pin(async { handshake(pool.addr, connect().await?).await }).await {
                Ok(tx) => (tx, false),
                Err(e) => return Err(SendFailure::unsent(e, req)),
            },
        };
        // A released connection is ready at once, or after hyper has read the end of
        // the last response; one that takes longer is not worth waiting for.
        if reused && !ready_soon(&mut tx).await {
            continue;
        }
        let request_ended = req.body().ended();
        match tx.try_send_request(*req).await {
            Ok(rsp) => return Ok((rsp, Checkin::new(pool, tx, request_ended))),
            Err(mut e) => match e.take_message() {
                // A pooled connection the server closed while it sat idle: the request
                // was never written, so it goes out on another.
                Some(unsent) if reused => {
                    debug!(endpoint = %pool.addr, "pooled connection closed; sending on another");
                    req = Box::new(unsent);
                }
                Some(unsent) => {
                    let error = SendError::Http {
                        addr: pool.addr,
                        source: e.into_error(),
                    };
                    return Err(SendFailure::unsent(error, Box::new(unsent)));
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

/// An HTTP/1 client connection over `io`, driven by a task of its own (upgrades
/// allowed, for connections taken over by one request).
pub async fn handshake<I>(
    addr: EndpointAddr,
    io: I,
) -> Result<http1::SendRequest<RequestBody>, SendError>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (tx, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| SendError::Handshake {
            addr,
            source: source.into(),
        })?;
    tokio::spawn(async move {
        if let Err(error) = conn.with_upgrades().await {
            debug!(endpoint = %addr, %error, "HTTP/1 connection ended");
        }
    });
    Ok(tx)
}
