//! A CONNECT over HTTP/2 (RFC 9113 §8.5): once answered 2xx, its stream carries the
//! tunnel's bytes as DATA frames both ways. The serving side puts an `H2Tunnel` in the
//! request's extensions and hands the stream over through it when the answer has gone;
//! `upgrade` joins it to the other side as it joins an HTTP/1.1 upgrade.

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use parking_lot::Mutex;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// The stream of a CONNECT, to come once its 2xx answer has gone (never, if the answer
/// was not a success). In the request's extensions, which must be `Clone`.
#[derive(Clone)]
pub struct H2Tunnel(Arc<Mutex<Option<oneshot::Receiver<H2Io>>>>);

impl H2Tunnel {
    pub fn new(rx: oneshot::Receiver<H2Io>) -> Self {
        Self(Arc::new(Mutex::new(Some(rx))))
    }

    /// The stream, once the answer has gone.
    pub async fn opened(self) -> io::Result<H2Io> {
        let rx = self.0.lock().take();
        match rx {
            Some(rx) => rx
                .await
                .map_err(|_| io::Error::other("the CONNECT was not answered")),
            None => Err(io::Error::other("the CONNECT's stream was taken already")),
        }
    }
}

/// A CONNECT's stream as a byte stream.
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What was received and not yet read.
    buf: Bytes,
}

impl H2Io {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            buf: Bytes::new(),
        }
    }

    /// The error a write gets once the peer has reset the stream.
    fn poll_reset_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => {
                io::ErrorKind::BrokenPipe.into()
            }
            Ok(reason) => io::Error::other(h2::Error::from(reason)),
            Err(e) => io::Error::other(e),
        })
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.buf.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.buf = data;
                }
                // The peer's end of the tunnel.
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(()),
                        Some(Reason::STREAM_CLOSED) => Err(io::ErrorKind::BrokenPipe.into()),
                        _ => Err(io::Error::other(e)),
                    });
                }
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len());
        loop {
            // Window already assigned is used at once: h2 reports only increases.
            let n = this.send.capacity().min(buf.len());
            if n > 0 {
                if this
                    .send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .is_ok()
                {
                    return Poll::Ready(Ok(n));
                }
                break;
            }
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
        this.poll_reset_error(cx).map(Err)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.send.send_data(Bytes::new(), true).is_ok() {
            return Poll::Ready(Ok(()));
        }
        this.poll_reset_error(cx).map(Err)
    }
}
