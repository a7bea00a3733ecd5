//! HTTP/2 to endpoints: one multiplexed connection per pool, made once for all the
//! requests that wait for it; a failed attempt fails those that waited for it too.

use super::error::{SendError, SendFailure};
use super::pool::{Peer, Pool};
use crate::addrs::EndpointAddr;
use crate::body::request::RequestBody;
use crate::connect::connector::Connected;
use crate::connect::error::ConnectError;
use gofe_identity::SpiffeId;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::time::{Duration, Instant};
use tracing::debug;

/// HTTP/2 pings on an idle pooled connection find a dead peer before a request does.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends `req` on `pool`'s connection, made by `connect` when there is none (or none
/// to a peer presenting `expected`).
pub async fn send<C, F>(
    pool: &Pool,
    mut req: Request<RequestBody>,
    expected: Option<&SpiffeId>,
    connect: C,
) -> Result<(Response<Incoming>, Peer), SendFailure>
where
    C: Fn() -> F,
    F: Future<Output = Result<Connected, ConnectError>>,
{
    let mut fresh = false;
    loop {
        let (mut tx, peer) = match pool.cached_h2(expected) {
            Some(c) => c,
            None => {
                fresh = true;
                match Box::pin(connect_shared(pool, expected, &connect)).await {
                    Ok(c) => c,
                    Err(e) => return Err(SendFailure::unsent(e, req)),
                }
            }
        };
        match tx.try_send_request(req).await {
            Ok(rsp) => return Ok((rsp, peer)),
            Err(mut e) => match e.take_message() {
                // The connection went away (GOAWAY, closed) before the stream opened:
                // the request was not sent.
                Some(unsent) if !fresh => {
                    pool.drop_closed_h2();
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

/// Makes the pool's connection, once for every request waiting on it.
async fn connect_shared<C, F>(
    pool: &Pool,
    expected: Option<&SpiffeId>,
    connect: &C,
) -> Result<(http2::SendRequest<RequestBody>, Peer), SendError>
where
    C: Fn() -> F,
    F: Future<Output = Result<Connected, ConnectError>>,
{
    let waiting_since = Instant::now();
    let _connecting = pool.h2_connecting.lock().await;
    if let Some(c) = pool.cached_h2(expected) {
        return Ok(c);
    }
    if let Some((at, e)) = pool.h2_failed.lock().as_ref()
        && *at >= waiting_since
    {
        return Err(e.recent().into());
    }
    let connected = match connect().await {
        Ok(c) => c,
        Err(e) => {
            *pool.h2_failed.lock() = Some((Instant::now(), e.recent()));
            return Err(e.into());
        }
    };
    let tx = handshake(pool.addr, TokioIo::new(connected.io)).await?;
    pool.set_h2(tx.clone(), connected.peer.clone());
    Ok((tx, connected.peer))
}

async fn handshake<I>(
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
