//! Serving HTTP/2 on an accepted connection with the `h2` crate directly: each stream's
//! request observed and forwarded, its response sent back within the client's window,
//! a CONNECT's stream handed over as its tunnel.
//!
//! hyper's HTTP/2 server spawned a task per stream and, for each response, removed the
//! connection fields the proxy had already removed. Here a connection's streams run in
//! the connection's own task (`FuturesUnordered`): a stream costs no task, no wake-up
//! across tasks to have its frames written, and goes with its connection. The settings
//! hyper pinned for us are pinned here (`settings`); PINGs keep an idle connection
//! honest; a graceful shutdown is a GOAWAY, and the streams already taken finish.

use super::errors::RefuseStream;
use super::h2_tunnel::{H2Io, H2Tunnel};
use super::observe::{HttpBody, Observed, ObservedFuture};
use super::request::Forwarding;
use crate::body::h2::{Pipe, RecvBody};
use crate::body::source::ClientBody;
use crate::config::Limits;
use crate::proto::headers;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use h2::server::{Builder, SendResponse};
use h2::{Ping, PingPong, Reason, RecvStream};
use http::{HeaderValue, Method, Request, Response, header};
use http_body::Body;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// HTTP/2 streams whose reset by the client is not yet accepted, at most (rapid reset:
/// h2's own default, pinned).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the proxy may reset for a client's errors before it is told to go away.
const MAX_LOCAL_ERROR_RESETS: usize = 256;
/// What a stream may have waiting to be sent to a client that does not read: 16 KiB a
/// stream (x 1024 streams: 16 MiB for a connection that reads nothing at all).
const MAX_SEND_BUF: usize = 16 * 1024;
/// What a client may send before the proxy has read it: a stream's share, and the
/// whole connection's.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Frames at most this big (the protocol's default, as hyper pinned it).
const MAX_FRAME: u32 = 16 * 1024;
/// A PING must be answered within this, or within the PING interval if shorter.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How a served HTTP/2 connection ended, when not by the client's close or a drain.
#[derive(Debug)]
pub enum Ended {
    /// The connection failed, or the client broke or flooded HTTP/2.
    H2(h2::Error),
    /// A PING went unanswered.
    Unanswered,
}

impl Ended {
    /// Whether the client broke or flooded HTTP/2 (GOAWAY with a protocol error,
    /// ENHANCE_YOUR_CALM...).
    pub fn is_protocol_error(&self) -> bool {
        match self {
            Ended::H2(e) => e.is_go_away() || e.reason().is_some_and(|r| r != Reason::NO_ERROR),
            Ended::Unanswered => false,
        }
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::H2(e) => e.fmt(f),
            Ended::Unanswered => f.write_str("a PING went unanswered"),
        }
    }
}

/// The server's side of HTTP/2 as the proxy pins it.
fn settings(limits: &Limits) -> Builder {
    let mut b = Builder::new();
    b.max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_request_headers as u32)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_send_buffer_size(MAX_SEND_BUF)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME);
    b
}

/// Serves HTTP/2 on `io` until the client closes it or the connection fails; once
/// `graceful` is cancelled, takes no new streams (GOAWAY) and ends when those taken
/// have.
pub async fn serve<I>(
    io: I,
    svc: Observed,
    limits: &Limits,
    graceful: &CancellationToken,
) -> Result<(), Ended>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut shutdown = pin!(graceful.cancelled());
    let mut conn = tokio::select! {
        conn = settings(limits).handshake::<_, Bytes>(io) => conn.map_err(Ended::H2)?,
        () = &mut shutdown => return Ok(()),
    };
    let mut keepalive = Keepalive::new(
        conn.ping_pong()
            .expect("a connection's PINGs are taken once"),
        limits.h2_keepalive,
    );
    let mut streams = FuturesUnordered::new();
    let mut closing = false;
    loop {
        // The streams first: frames they queue are written by the connection's poll
        // below, in the same turn.
        tokio::select! {
            biased;
            Some(()) = streams.next(), if !streams.is_empty() => {}
            () = &mut shutdown, if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            () = poll_fn(|cx| keepalive.poll_unanswered(cx)) => {
                conn.abrupt_shutdown(Reason::NO_ERROR);
                // The GOAWAY, if the peer still reads; it is gone either way.
                let flushed = poll_fn(|cx| conn.poll_closed(cx));
                let _ = tokio::time::timeout(Duration::from_secs(1), flushed).await;
                return Err(Ended::Unanswered);
            }
            accepted = poll_fn(|cx| conn.poll_accept(cx)) => match accepted {
                Some(Ok((req, reply))) => {
                    if let Some(stream) = Stream::new(&svc, req, reply) {
                        streams.push(stream);
                    }
                }
                Some(Err(e)) => return Err(Ended::H2(e)),
                None => return Ok(()),
            },
        }
    }
}

/// One stream: its request forwarded, its answer sent. A client that resets the stream
/// before its answer gives the request up, and its forwarding is dropped.
///
/// A state machine rather than an `async fn`: a stream's future is allocated for every
/// request, and the compiler's layout of the `async fn` kept the waiting and the sending
/// apart (1.5 KB in a debug build); here they share their place.
struct Stream {
    reply: SendResponse<Bytes>,
    state: State,
}

enum State {
    /// The request forwarded, its answer awaited. A CONNECT's stream is kept aside for
    /// its tunnel.
    Answering {
        answer: ObservedFuture<Forwarding>,
        connect: Option<(oneshot::Sender<H2Io>, RecvStream)>,
    },
    /// The answer's body on its way.
    Sending(Pipe<HttpBody>),
}

impl Stream {
    fn new(
        svc: &Observed,
        req: Request<RecvStream>,
        mut reply: SendResponse<Bytes>,
    ) -> Option<Stream> {
        let (mut head, recv) = req.into_parts();
        let mut connect = None;
        let body = if head.method == Method::CONNECT {
            // A CONNECT's stream becomes its tunnel (RFC 9113 §8.5): it has no body.
            if head
                .headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v != "0")
            {
                reply.send_reset(Reason::PROTOCOL_ERROR);
                return None;
            }
            let (tx, rx) = oneshot::channel();
            head.extensions.insert(H2Tunnel::new(rx));
            connect = Some((tx, recv));
            ClientBody::empty()
        } else {
            ClientBody::http2(RecvBody::new(recv, &head.headers))
        };
        let answer = svc.observe(Request::from_parts(head, body));
        Some(Stream {
            reply,
            state: State::Answering { answer, connect },
        })
    }

    /// Sends the answer's head; its body, unless it has none, comes back to be sent.
    fn respond(
        &mut self,
        rsp: Response<HttpBody>,
        connect: Option<(oneshot::Sender<H2Io>, RecvStream)>,
    ) -> Option<Pipe<HttpBody>> {
        let (mut head, body) = rsp.into_parts();
        if head.extensions.get::<RefuseStream>().is_some() {
            // Refused upstream, unprocessed: the client may send it again. The answer's
            // body goes unsent, and the request is counted as its status says.
            self.reply.send_reset(Reason::REFUSED_STREAM);
            return None;
        }
        // Taken off already on the way in (`request::hop_by_hop_off`); h2 refuses to
        // send a response that has any, so one scan of the names makes sure.
        headers::strip_hop_by_hop(&mut head.headers, false);
        if let Some((tx, recv)) = connect
            && head.status.is_success()
        {
            head.headers.remove(header::CONTENT_LENGTH);
            match self
                .reply
                .send_response(Response::from_parts(head, ()), false)
            {
                Ok(send) => {
                    let _ = tx.send(H2Io::new(send, recv));
                }
                Err(error) => {
                    debug!(%error, "a CONNECT's answer could not be sent");
                    self.reply.send_reset(Reason::INTERNAL_ERROR);
                }
            }
            return None;
        }
        let end = body.is_end_stream();
        if !end
            && let Some(len) = body.size_hint().exact()
            && !head.headers.contains_key(header::CONTENT_LENGTH)
        {
            head.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        match self
            .reply
            .send_response(Response::from_parts(head, ()), end)
        {
            Ok(send) if !end => Some(Pipe::new(body, send, Reason::INTERNAL_ERROR)),
            Ok(_) => None,
            Err(error) => {
                debug!(%error, "an answer could not be sent");
                self.reply.send_reset(Reason::INTERNAL_ERROR);
                None
            }
        }
    }
}

impl Future for Stream {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Answering { answer, connect } => {
                    let rsp = match Pin::new(answer).poll(cx) {
                        Poll::Ready(Ok(rsp)) => rsp,
                        Poll::Ready(Err(never)) => match never {},
                        Poll::Pending => {
                            if this.reply.poll_reset(cx).is_ready() {
                                debug!("the client reset a stream before its answer");
                                return Poll::Ready(());
                            }
                            return Poll::Pending;
                        }
                    };
                    let connect = connect.take();
                    match this.respond(rsp, connect) {
                        Some(pipe) => this.state = State::Sending(pipe),
                        None => return Poll::Ready(()),
                    }
                }
                State::Sending(pipe) => return Pin::new(pipe).poll(cx),
            }
        }
    }
}

/// A PING every `interval`, which must be answered within the interval
/// (KEEPALIVE_TIMEOUT at most): a client that has gone without closing its connection
/// does not hold it.
struct Keepalive {
    ping: PingPong,
    interval: Duration,
    /// When the next PING goes, or when the one sent is overdue.
    timer: Pin<Box<Sleep>>,
    sent: bool,
}

impl Keepalive {
    fn new(ping: PingPong, interval: Duration) -> Self {
        Self {
            ping,
            interval,
            timer: Box::pin(tokio::time::sleep(interval)),
            sent: false,
        }
    }

    /// Ready when a PING has gone unanswered.
    fn poll_unanswered(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.sent {
                match self.ping.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.sent = false;
                        let next = Instant::now() + self.interval;
                        self.timer.as_mut().reset(next);
                        continue;
                    }
                    // The connection is gone, and says so to whoever accepts.
                    Poll::Ready(Err(_)) => return Poll::Pending,
                    Poll::Pending => {}
                }
                ready!(self.timer.as_mut().poll(cx));
                return Poll::Ready(());
            }
            ready!(self.timer.as_mut().poll(cx));
            if self.ping.send_ping(Ping::opaque()).is_err() {
                return Poll::Pending;
            }
            self.sent = true;
            let due = Instant::now() + KEEPALIVE_TIMEOUT.min(self.interval);
            self.timer.as_mut().reset(due);
        }
    }
}
