//! HTTP/2 streams as bodies, on either side of the proxy. `RecvBody` reads one (a
//! client's request on the serving side, an endpoint's response on the client side)
//! and gives its window back as it goes; `Pipe` sends a body out on one, within the
//! peer's window.

use super::BoxError;
use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, header};
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::sync::oneshot;
use tracing::debug;

/// A received stream's DATA and trailers as a body.
pub struct RecvBody {
    stream: RecvStream,
    /// The DATA frames have ended; trailers may follow.
    data_done: bool,
    /// Trailers read too (or the stream failed): nothing more comes.
    done: bool,
    /// What is left of a declared content-length (h2 itself holds the peer to it).
    left: Option<u64>,
}

impl RecvBody {
    /// The body of the message whose head is `headers`.
    pub fn new(stream: RecvStream, headers: &HeaderMap) -> Self {
        // A stream that ended with its HEADERS has an empty body, whatever its head
        // says (as hyper's body said); no lookup then, the common case of a GET.
        let left = if stream.is_end_stream() {
            Some(0)
        } else {
            headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
        };
        Self {
            stream,
            data_done: false,
            done: false,
            left,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    if let Some(left) = &mut this.left {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.stream.poll_trailers(cx));
        this.done = true;
        match trailers {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}

/// A body going out on its stream, within the peer's window: one chunk at a time is
/// held while the window is closed, and the body is read again only when it has gone.
/// Ends when the body has all gone, or the peer reset the stream (it answered without
/// the rest of a request, or gave up on a response); a body that fails resets the
/// stream.
pub struct Pipe<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// A chunk read from the body, waiting for window; whether it was the last.
    waiting: Option<(Bytes, bool)>,
    /// When set, the stream is reset (CANCEL) if its sender goes armed; a dropped
    /// sender that was disarmed lets the body go on.
    cancel: Option<oneshot::Receiver<()>>,
    /// What a failed body resets the stream with, unless its error carries an HTTP/2
    /// reason of its own.
    fails_with: Reason,
}

impl<B> Pipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(body: B, stream: SendStream<Bytes>, fails_with: Reason) -> Self {
        Self {
            body,
            stream,
            waiting: None,
            cancel: None,
            fails_with,
        }
    }

    /// Resets the stream (CANCEL) when `cancel` fires.
    pub fn cancelled_by(&mut self, cancel: oneshot::Receiver<()>) {
        self.cancel = Some(cancel);
    }

    /// Ok once the body has all gone; the reason to reset the stream with if it cannot.
    fn run(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Reason>> {
        loop {
            if let Some(cancel) = self.cancel.as_mut() {
                match Pin::new(cancel).poll(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Err(Reason::CANCEL)),
                    // Disarmed: the body goes on.
                    Poll::Ready(Err(_)) => self.cancel = None,
                    Poll::Pending => {}
                }
            }
            // The peer reset the stream: nothing more goes.
            if let Poll::Ready(reset) = self.stream.poll_reset(cx) {
                debug!(?reset, "the peer reset a stream whose body was being sent");
                return Poll::Ready(Ok(()));
            }
            if let Some((_, last)) = self.waiting {
                while self.stream.capacity() == 0 {
                    match ready!(self.stream.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(_)) | None => return Poll::Ready(Ok(())),
                    }
                }
                let (data, _) = self.waiting.take().expect("checked above");
                if self.stream.send_data(data, last).is_err() || last {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let frame = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    let error = error.into();
                    debug!(%error, "a body failed while it was being sent");
                    return Poll::Ready(Err(reset_reason(&*error).unwrap_or(self.fails_with)));
                }
                None => {
                    self.stream.reserve_capacity(0);
                    let _ = self.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(Ok(()));
                }
            };
            let frame = match frame.into_data() {
                Ok(data) => {
                    let last = self.body.is_end_stream();
                    if data.is_empty() {
                        if self.stream.send_data(data, last).is_err() || last {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    // A claim on the window of one byte, not the chunk's length: h2
                    // raises it to what is buffered as it sends, and a stream that
                    // waits does not pin the connection's window (hyper #4003).
                    self.stream.reserve_capacity(1);
                    self.waiting = Some((data, last));
                    continue;
                }
                Err(frame) => frame,
            };
            if let Ok(trailers) = frame.into_trailers() {
                self.stream.reserve_capacity(0);
                let _ = self.stream.send_trailers(trailers);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<B> Future for Pipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match this.run(cx) {
            Poll::Ready(Err(reason)) => {
                this.stream.send_reset(reason);
                Poll::Ready(())
            }
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The HTTP/2 reason an error carries, if it came from a reset stream.
pub fn reset_reason(error: &(dyn std::error::Error + 'static)) -> Option<Reason> {
    let mut cause = Some(error);
    while let Some(c) = cause {
        if let Some(reason) = c.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return Some(reason);
        }
        cause = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_stream_ended_with_its_headers_is_empty_and_a_declared_length_counts_down() {
        let (c, s) = tokio::io::duplex(1 << 16);
        let client = async move {
            let (mut tx, conn) = h2::client::handshake(c).await.unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let post = |len: Option<&str>| {
                let mut r = http::Request::post("http://test/");
                if let Some(len) = len {
                    r = r.header(header::CONTENT_LENGTH, len);
                }
                r.body(()).unwrap()
            };
            // No body, no content-length; then five bytes declared and sent.
            let (a, _) = tx.send_request(post(None), true).unwrap();
            let (b, mut send) = tx.send_request(post(Some("5")), false).unwrap();
            send.send_data(Bytes::from_static(b"hello"), true).unwrap();
            (a, b, tx)
        };
        let server = async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            let mut bodies = Vec::new();
            for _ in 0..2 {
                let (req, reply) = conn.accept().await.unwrap().unwrap();
                let (head, stream) = req.into_parts();
                bodies.push((RecvBody::new(stream, &head.headers), reply));
            }
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            bodies
        };
        let (_kept, mut bodies) = tokio::join!(client, server);
        let (empty, _) = &bodies[0];
        assert!(empty.is_end_stream());
        assert_eq!(
            empty.size_hint().exact(),
            Some(0),
            "an ended stream's body is empty"
        );
        let (declared, _) = &mut bodies[1];
        assert_eq!(declared.size_hint().exact(), Some(5));
        let data = declared
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap();
        assert_eq!(&data[..], b"hello");
        assert_eq!(declared.size_hint().exact(), Some(0), "what is left of it");
        assert!(declared.frame().await.is_none());
    }

    #[test]
    fn a_failed_body_resets_with_its_own_reason_if_it_has_one() {
        let own: Box<dyn std::error::Error + Send + Sync> = "broken".into();
        assert_eq!(reset_reason(&*own), None);
        let h2: h2::Error = Reason::STREAM_CLOSED.into();
        assert_eq!(reset_reason(&h2), Some(Reason::STREAM_CLOSED));
    }
}
