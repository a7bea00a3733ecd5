//! HTTP/2 to endpoints: multiplexed connections per pool, each made once for all the
//! requests that wait for it (a failed attempt fails those that waited for it too),
//! each carrying at most the peer's stream limit; past it another connection is made,
//! and past the pool's few connections a request fails at once (503, gofe-overloaded)
//! rather than queue without bound.

use super::error::{SendError, SendFailure};
use super::pool::{H2Pick, Peer, Pool, StreamSlot};
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

/// What the client side of HTTP/2 holds to (the same limits the server side pins).
#[derive(Clone, Copy, Debug)]
pub struct H2Settings {
    /// Streams per connection: the peer's limit on the mesh hop.
    pub max_streams: u32,
    /// Response header lists at most.
    pub max_header_list: u32,
    pub keepalive: Duration,
}

/// A PING must be answered within this.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Windows fixed rather than adaptive: what one peer can make this side buffer is
/// bounded (a stream's window, the connection's), and no estimator runs per frame.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Request data waiting for the peer's window, per stream.
const MAX_SEND_BUF: usize = 64 * 1024;
/// Streams the peer may reset before this side's bookkeeping of them is capped.
const MAX_CONCURRENT_RESETS: usize = 20;

/// Sends `req` on a connection of `pool` with room for it, made by `connect` when there
/// is none (or none to a peer presenting `expected`). The stream's slot comes back with
/// the response, to be held until its body ends.
pub async fn send<C, F>(
    pool: &Pool,
    settings: H2Settings,
    mut req: Box<Request<RequestBody>>,
    expected: Option<&SpiffeId>,
    connect: C,
) -> Result<(Response<Incoming>, Peer, StreamSlot), SendFailure>
where
    C: Fn() -> F,
    F: Future<Output = Result<Connected, ConnectError>>,
{
    let mut fresh = false;
    loop {
        let (mut tx, peer, slot) = match pool.pick_h2(expected, settings.max_streams) {
            H2Pick::Ready(tx, peer, slot) => (tx, peer, slot),
            H2Pick::Full => {
                let error = SendError::Busy {
                    addr: pool.addr,
                    streams: settings.max_streams,
                };
                return Err(SendFailure::unsent(error, req));
            }
            H2Pick::Connect => {
                fresh = true;
                match Box::pin(connect_shared(pool, settings, expected, &connect)).await {
                    Ok(c) => c,
                    Err(e) => return Err(SendFailure::unsent(e, req)),
                }
            }
        };
        match tx.try_send_request(*req).await {
            Ok(rsp) => return Ok((rsp, peer, slot)),
            Err(mut e) => match e.take_message() {
                // The connection went away (GOAWAY, closed) before the stream opened:
                // the request was not sent.
                Some(unsent) if !fresh => {
                    pool.drop_closed_h2();
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

/// Makes a connection for the pool, once for every request waiting on it.
async fn connect_shared<C, F>(
    pool: &Pool,
    settings: H2Settings,
    expected: Option<&SpiffeId>,
    connect: &C,
) -> Result<(http2::SendRequest<RequestBody>, Peer, StreamSlot), SendError>
where
    C: Fn() -> F,
    F: Future<Output = Result<Connected, ConnectError>>,
{
    let waiting_since = Instant::now();
    let _connecting = pool.h2_connecting.lock().await;
    match pool.pick_h2(expected, settings.max_streams) {
        H2Pick::Ready(tx, peer, slot) => return Ok((tx, peer, slot)),
        H2Pick::Full => {
            return Err(SendError::Busy {
                addr: pool.addr,
                streams: settings.max_streams,
            });
        }
        H2Pick::Connect => {}
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
    let tx = handshake(pool.addr, settings, TokioIo::new(connected.io)).await?;
    Ok(pool.add_h2(tx, connected.peer))
}

async fn handshake<I>(
    addr: EndpointAddr,
    settings: H2Settings,
    io: I,
) -> Result<http2::SendRequest<RequestBody>, SendError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (tx, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.keepalive)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(settings.max_header_list)
        .max_send_buf_size(MAX_SEND_BUF)
        .max_concurrent_reset_streams(MAX_CONCURRENT_RESETS)
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
