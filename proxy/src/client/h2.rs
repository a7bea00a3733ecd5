//! HTTP/2 to endpoints: multiplexed connections per pool, each made once for all the
//! requests that wait for it (a failed attempt fails those that waited for it too),
//! each carrying at most the peer's stream limit; past it another connection is made,
//! and past the pool's few connections a request fails at once (503, gofe-overloaded)
//! rather than queue without bound.
//!
//! This side speaks the `h2` crate directly rather than through hyper's HTTP/2 client.
//! hyper hands every request through a channel to the connection's task and spawns a
//! task per request to wait for its response; here the request's own future opens the
//! stream and waits for the answer, and only a request body still to come gets a task
//! of its own (`pipe`), as in hyper.

use super::error::{SendError, SendFailure};
use super::pool::{H2Pick, H2Sender, Peer, Pool, StreamSlot};
use crate::addrs::EndpointAddr;
use crate::body::h2::Pipe;
use crate::body::request::RequestBody;
use crate::connect::connector::Connected;
use crate::connect::error::ConnectError;
use crate::proto::headers;
use bytes::Bytes;
use gofe_identity::SpiffeId;
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderValue, Method, Request, Response, header};
use http_body::Body;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Context;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
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

/// A PING must be answered within this, or within the PING interval if shorter.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Windows fixed rather than adaptive: what one peer can make this side buffer is
/// bounded (a stream's window, the connection's), and no estimator runs per frame.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Request data waiting for the peer's window, per stream.
const MAX_SEND_BUF: usize = 64 * 1024;
/// Streams the peer may reset before this side's bookkeeping of them is capped.
const MAX_CONCURRENT_RESETS: usize = 20;
/// Streams this side may reset for the peer's errors before it sends the peer away.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Streams opened on a new connection before the peer's SETTINGS have come.
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// Sends `req` on a connection of `pool` with room for it, made by `connect` when there
/// is none (or none to a peer presenting `expected`). The stream's slot comes back with
/// the response, to be held until its body ends. With `resend_refused`, a bodiless
/// request's head is copied first and, if the peer refuses the stream, comes back as
/// unsent.
pub async fn send<C, F>(
    pool: &Pool,
    settings: H2Settings,
    req: Box<Request<RequestBody>>,
    expected: Option<&SpiffeId>,
    connect: C,
    resend_refused: bool,
) -> Result<(Response<RecvStream>, Peer, StreamSlot), SendFailure>
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
        // Ready when the peer's stream limit has room; an error when the connection is
        // gone or going (GOAWAY): the request has not left, so it goes on another.
        if let Err(source) = poll_fn(|cx| tx.tx.poll_ready(cx)).await {
            tx.closed.store(true, Ordering::Release);
            if fresh {
                let error = SendError::H2 {
                    addr: pool.addr,
                    source,
                };
                return Err(SendFailure::unsent(error, req));
            }
            pool.drop_closed_h2();
            continue;
        }
        let kept = (resend_refused && req.body().is_end_stream()).then(|| headers::copy_head(&req));
        let (rsp, body) = match open(&mut tx.tx, *req) {
            Ok(opened) => opened,
            Err(source) => {
                let error = SendError::H2 {
                    addr: pool.addr,
                    source,
                };
                return Err(SendFailure::sent(error));
            }
        };
        let cancel = body.map(|(body, stream)| pipe(body, stream));
        let rsp = rsp.await.map_err(|source| {
            let error = SendError::H2 {
                addr: pool.addr,
                source,
            };
            match kept {
                Some(head) if error.is_refused_stream() => {
                    let req = Request::from_parts(head, RequestBody::empty());
                    SendFailure::unsent(error, Box::new(req))
                }
                _ => SendFailure::sent(error),
            }
        });
        // The answer came (or the stream failed): a body still being sent goes on, as
        // far as the peer reads it.
        if let Some(mut cancel) = cancel {
            cancel.disarm();
        }
        return rsp.map(|rsp| (rsp, peer, slot));
    }
}

/// An opened stream: its answer to come, and the request's body with the stream to
/// send it on, unless the request had none.
type Opened = (ResponseFuture, Option<(RequestBody, SendStream<Bytes>)>);

/// Opens the stream for `req`: its head goes at once, and its body, unless the request
/// has none, comes back to be sent. The fields HTTP/2 forbids (RFC 9113 §8.2.2:
/// connection options, TE other than "trailers") go first, as they go on every hop;
/// `forward` has removed them already from a client's request, so this is one scan of
/// the names that finds none.
fn open(tx: &mut SendRequest<Bytes>, req: Request<RequestBody>) -> Result<Opened, h2::Error> {
    let (head, body) = req.into_parts();
    let mut head = Request::from_parts(head, ());
    headers::strip_hop_by_hop(head.headers_mut(), false);
    if let Some(len) = body.size_hint().exact()
        && (len != 0 || !matches!(*head.method(), Method::GET | Method::HEAD | Method::DELETE))
        && !head.headers().contains_key(header::CONTENT_LENGTH)
    {
        head.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    let eos = body.is_end_stream();
    let (rsp, stream) = tx.send_request(head, eos)?;
    Ok((rsp, (!eos).then_some((body, stream))))
}

/// Sends what remains of a request body on its stream: at once if it is all there (a
/// small body already read), else from a task of its own. The guard that comes back
/// resets the stream if it is dropped armed (the request was given up before its
/// answer came).
fn pipe(body: RequestBody, stream: SendStream<Bytes>) -> CancelGuard {
    // A body that fails resets its stream with the client's own reason, else CANCEL.
    let mut pipe = Pipe::new(body, stream, Reason::CANCEL);
    let waker = std::task::Waker::noop();
    if Pin::new(&mut pipe)
        .poll(&mut Context::from_waker(waker))
        .is_ready()
    {
        return CancelGuard(None);
    }
    let (tx, rx) = oneshot::channel();
    pipe.cancelled_by(rx);
    tokio::spawn(pipe);
    CancelGuard(Some(tx))
}

struct CancelGuard(Option<oneshot::Sender<()>>);

impl CancelGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Makes a connection for the pool, once for every request waiting on it.
async fn connect_shared<C, F>(
    pool: &Pool,
    settings: H2Settings,
    expected: Option<&SpiffeId>,
    connect: &C,
) -> Result<(H2Sender, Peer, StreamSlot), SendError>
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
    let tx = handshake(pool.addr, settings, connected.io).await?;
    Ok(pool.add_h2(tx, connected.peer))
}

async fn handshake<I>(
    addr: EndpointAddr,
    settings: H2Settings,
    io: I,
) -> Result<H2Sender, SendError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut conn) = h2::client::Builder::new()
        // No server push: nothing here would read a pushed stream (hyper's setting).
        .enable_push(false)
        // Streams opened before the peer's SETTINGS say its limit (hyper's default).
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(settings.max_header_list)
        .max_send_buffer_size(MAX_SEND_BUF)
        .max_concurrent_reset_streams(MAX_CONCURRENT_RESETS)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|source| SendError::Handshake {
            addr,
            source: source.into(),
        })?;
    let closed = Arc::new(AtomicBool::new(false));
    let (dead, mut unanswered) = oneshot::channel();
    if let Some(ping) = conn.ping_pong() {
        tokio::spawn(keepalive(ping, settings.keepalive, dead));
    }
    let ended = closed.clone();
    tokio::spawn(async move {
        tokio::select! {
            biased;
            result = &mut conn => {
                if let Err(error) = result {
                    debug!(endpoint = %addr, %error, "HTTP/2 connection ended");
                }
            }
            Ok(()) = &mut unanswered => {
                debug!(endpoint = %addr, "HTTP/2 connection closed: a PING went unanswered");
            }
        }
        ended.store(true, Ordering::Release);
    });
    Ok(H2Sender { tx, closed })
}

/// Sends a PING every `interval` and, when one is not answered within the interval
/// (KEEPALIVE_TIMEOUT at most), tells the connection's task to close it (its streams fail). Ends
/// with the connection.
async fn keepalive(mut ping: h2::PingPong, interval: Duration, mut dead: oneshot::Sender<()>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = dead.closed() => return,
        }
        if ping.send_ping(h2::Ping::opaque()).is_err() {
            return;
        }
        let answer_within = KEEPALIVE_TIMEOUT.min(interval);
        match tokio::time::timeout(answer_within, poll_fn(|cx| ping.poll_pong(cx))).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                let _ = dead.send(());
                return;
            }
        }
    }
}
