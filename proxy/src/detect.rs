//! Stage 3: protocol detection. Reads a connection's first bytes, within a deadline,
//! until they say HTTP/1.x, HTTP/2 (prior knowledge), TLS (its SNI read for metrics)
//! or none of these. The bytes read are handed on, to be replayed to whatever serves
//! the connection.
//!
//! Detection is incremental: each read is looked at once (the TLS ClientHello is fed
//! to one acceptor as it arrives; the request line is scanned from where the last read
//! left off), so a client trickling its bytes one at a time costs linear time.

use bytes::{Bytes, BytesMut};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Enough for any HTTP/1 request line we accept and for a TLS ClientHello in one
/// maximum-size record (16 KiB plus its header).
pub const MAX_DETECT_BYTES: usize = 18 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// `mesh`: the ClientHello asks for one of the mesh's ALPN protocols, so it is
    /// another proxy's mTLS rather than the application's own TLS.
    Tls {
        server_name: Option<String>,
        mesh: bool,
    },
    Opaque,
}

impl Protocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "h2",
            Protocol::Tls { mesh: true, .. } => "mtls",
            Protocol::Tls { .. } => "tls",
            Protocol::Opaque => "opaque",
        }
    }
}

#[derive(Debug)]
pub struct Detected {
    pub protocol: Protocol,
    /// The bytes consumed while detecting, to be replayed.
    pub prefix: Bytes,
    /// Detection gave up waiting: the client sent too little within the deadline.
    pub timed_out: bool,
}

/// Reads from `io` until the protocol is known, the client stops sending (EOF or
/// `timeout`), or `MAX_DETECT_BYTES` are read.
pub async fn detect<I: AsyncRead + Unpin>(io: &mut I, timeout: Duration) -> io::Result<Detected> {
    let deadline = tokio::time::Instant::now() + timeout;
    // Small to begin with (most first reads are a request head or a ClientHello):
    // a flood of connections that send nothing holds little.
    let mut buf = BytesMut::with_capacity(1024);
    let mut detector = Detector::default();
    loop {
        if let Some(protocol) = detector.feed(&buf) {
            return Ok(Detected {
                protocol,
                prefix: buf.freeze(),
                timed_out: false,
            });
        }
        if buf.len() >= MAX_DETECT_BYTES {
            return Ok(undecided(buf, Stopped::Full));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().min(MAX_DETECT_BYTES - buf.len()));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_elapsed) => return Ok(undecided(buf, Stopped::Timeout)),
            Ok(Ok(0)) => return Ok(undecided(buf, Stopped::Eof)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Why detection stopped without a decision.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// The client half-closed: what it sent is all it will send.
    Eof,
    /// The deadline passed: more may come later.
    Timeout,
    /// More than detection reads.
    Full,
}

/// No decision from the bytes read. Bytes that begin like HTTP are HTTP even so: hyper
/// then answers a slow, cut-off or oversized request properly, and a client cannot pass
/// HTTP to the application unexamined (headers such as gofe-client-id unstripped) by
/// stalling or padding. While more may come (a stall, a buffer full), any method-like
/// token counts, whatever its case; after an end of stream, nothing can follow, and
/// only an upper-case method (a request cut short) does. Anything else is opaque; a TLS
/// record cut short goes through as TLS would, opaquely.
fn undecided(buf: BytesMut, stopped: Stopped) -> Detected {
    let protocol =
        if !buf.is_empty() && H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
            Protocol::Http2
        } else if begins_like_http1(&buf, stopped != Stopped::Eof) {
            Protocol::Http1
        } else {
            Protocol::Opaque
        };
    Detected {
        protocol,
        prefix: buf.freeze(),
        timed_out: stopped == Stopped::Timeout,
    }
}

/// A method-like token (upper-case letters; with `any_case`, any letters) and, once
/// there is more, a space or a tab: the start of an HTTP/1 request line, well formed or
/// not.
fn begins_like_http1(buf: &[u8], any_case: bool) -> bool {
    let letter = |b: &u8| {
        if any_case {
            b.is_ascii_alphabetic()
        } else {
            b.is_ascii_uppercase()
        }
    };
    let method = buf.iter().take_while(|b| letter(b)).count();
    method > 0 && (method == buf.len() || (method <= 20 && matches!(buf[method], b' ' | b'\t')))
}

/// Decides from `buf` alone (as `Detector::feed` would from its first read).
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    Detector::default().feed(buf)
}

/// What is known so far about a connection's first bytes.
#[derive(Default)]
pub struct Detector {
    /// Bytes of the buffer already looked at.
    seen: usize,
    /// The ClientHello so far, once the bytes look like TLS.
    tls: Option<Box<rustls::server::Acceptor>>,
}

impl Detector {
    /// Looks at what `buf` holds beyond the bytes already seen (`buf` only grows
    /// between calls); `None` means more bytes are needed.
    pub fn feed(&mut self, buf: &[u8]) -> Option<Protocol> {
        if buf.is_empty() {
            return None;
        }
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] == H2_PREFACE[..n] {
            // Bytes that are the preface so far are not yet seen as a request line:
            // `PRI * HTTP/1.1` leaves the preface after its "HTTP/", which the HTTP/1
            // scan must still find however the bytes were cut.
            return (buf.len() >= H2_PREFACE.len()).then_some(Protocol::Http2);
        }
        let from = std::mem::replace(&mut self.seen, buf.len());
        if buf[0] == 0x16 && (buf.len() < 2 || buf[1] == 0x03) {
            return self.tls(buf, from);
        }
        http1(buf, from)
    }

    /// A TLS handshake record (type 22, version 3.x) is TLS; its SNI and ALPN are read
    /// once the whole ClientHello has arrived.
    fn tls(&mut self, buf: &[u8], from: usize) -> Option<Protocol> {
        let acceptor = self.tls.get_or_insert_with(Default::default);
        let mut rest = &buf[from..];
        while !rest.is_empty() {
            match acceptor.read_tls(&mut rest) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                Some(Protocol::Tls {
                    server_name: hello.server_name().map(str::to_owned),
                    mesh: hello.alpn().is_some_and(|mut protocols| {
                        protocols.any(gofe_identity::tls::is_mesh_alpn)
                    }),
                })
            }
            Ok(None) if buf.len() < MAX_DETECT_BYTES => None,
            Ok(None) | Err(_) => Some(Protocol::Tls {
                server_name: None,
                mesh: false,
            }),
        }
    }
}

/// An HTTP/1 request line: `METHOD SP target SP HTTP/1.x CRLF`. A first line that
/// names an HTTP version is HTTP whether or not it parses: a malformed one (two spaces,
/// a tab, `HTTP/1.2`, a NUL) is answered 400 by the HTTP server and closed, never
/// passed on as opaque bytes, which a lenient application would read as a request with
/// whatever headers the client wrote (a forged gofe-client-id among them). Bytes that
/// cannot begin a request line (binary protocols) are opaque at once; a first line
/// without a version (memcached's `get key`, Redis' `PING`) is opaque once it ends.
fn http1(buf: &[u8], from: usize) -> Option<Protocol> {
    if !buf[0].is_ascii_alphabetic() {
        return Some(Protocol::Opaque);
    }
    // The first line so far, and whether it names a version ("HTTP/" in any case),
    // looked for in the new bytes and the four before them.
    let line_end = buf
        .iter()
        .skip(from)
        .position(|b| *b == b'\n')
        .map(|i| i + from);
    let line = &buf[..line_end.unwrap_or(buf.len())];
    let look_from = from.saturating_sub(4).min(line.len());
    if line[look_from..]
        .windows(5)
        .any(|w| w.eq_ignore_ascii_case(b"HTTP/"))
    {
        return Some(Protocol::Http1);
    }
    line_end.map(|_| Protocol::Opaque)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_request_lines() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"POST /x HTTP/1.0\r\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"GET http://a.b/c HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(
            classify(b"CONNECT a.b:443 HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"GET / HTTP/1.1\r\n\r\n"), Some(Protocol::Http1));
    }

    #[test]
    fn partial_request_line_needs_more() {
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET /some/pa"), None);
        assert_eq!(
            classify(b"GET / HTTP/1."),
            Some(Protocol::Http1),
            "a version named is enough"
        );
    }

    #[test]
    fn h2_preface_whole_and_partial() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
    }

    #[test]
    fn malformed_request_lines_that_name_a_version_are_http() {
        for line in [
            &b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET\t/ HTTP/1.1\r\n",
            b"GET / HTTP/1.2\r\n",
            b"get / http/1.1\r\n",
            b"FOO /x HTTP/1.1\r\n",
            b"GET /\x00 HTTP/1.1\r\n",
            b"GET / HTTP/1.1\nHost: a\n\n",
        ] {
            assert_eq!(
                classify(line),
                Some(Protocol::Http1),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[tokio::test]
    async fn a_stalled_lower_case_request_is_http_but_words_then_an_end_are_not() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"get / ")
            .await
            .unwrap();
        let d = detect(&mut b, Duration::from_millis(50)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Http1, "more could follow: HTTP");
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"client data")
            .await
            .unwrap();
        drop(a);
        let d = detect(&mut b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Opaque, "nothing can follow an end");
    }

    #[test]
    fn a_first_line_without_a_version_is_opaque_once_it_ends() {
        assert_eq!(classify(b"get key"), None);
        assert_eq!(classify(b"get key\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"PING\r\n"), Some(Protocol::Opaque));
    }

    #[test]
    fn a_request_trickled_byte_by_byte_is_looked_at_once() {
        let request = b"GET /trickled HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut d = Detector::default();
        let mut decided = None;
        for n in 1..=request.len() {
            if let Some(p) = d.feed(&request[..n]) {
                decided = Some((n, p));
                break;
            }
        }
        assert_eq!(
            decided,
            Some((19, Protocol::Http1)),
            "as soon as HTTP/ arrives"
        );
        let hello = client_hello("trickle.example");
        let mut d = Detector::default();
        let mut decided = None;
        for n in 1..=hello.len() {
            if let Some(p) = d.feed(&hello[..n]) {
                decided = Some((n, p));
                break;
            }
        }
        assert_eq!(
            decided,
            Some((
                hello.len(),
                Protocol::Tls {
                    server_name: Some("trickle.example".into()),
                    mesh: false
                }
            ))
        );
    }

    /// Found by fuzzing: cut after "PRI * HTTP/", the line was judged without its
    /// version and passed on as opaque bytes.
    #[test]
    fn a_request_line_that_begins_like_the_h2_preface_is_http_however_it_is_cut() {
        let line = b"PRI * HTTP/1.1\r\nHost: a\r\n\r\n";
        for cut in 1..line.len() {
            let mut d = Detector::default();
            let decided = d.feed(&line[..cut]).or_else(|| d.feed(line));
            assert_eq!(decided, Some(Protocol::Http1), "cut at {cut}");
        }
    }

    #[test]
    fn binary_and_banner_protocols_are_opaque() {
        assert_eq!(classify(b"\x00\x01\x02\x03"), Some(Protocol::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Protocol::Opaque));
    }

    #[test]
    fn tls_client_hello_yields_sni() {
        let hello = client_hello("api.example.com");
        assert_eq!(
            classify(&hello),
            Some(Protocol::Tls {
                server_name: Some("api.example.com".into()),
                mesh: false,
            })
        );
        let mesh = client_hello_with_alpn("10.0.0.1", b"gofe/h2");
        assert!(matches!(
            classify(&mesh),
            Some(Protocol::Tls { mesh: true, .. })
        ));
        // Cut short: wait for the rest of the record.
        assert_eq!(classify(&hello[..hello.len() / 2]), None);
    }

    #[tokio::test]
    async fn detect_times_out_to_opaque_with_what_was_read() {
        let (mut a, mut b) = tokio::io::duplex(64);
        // A TLS record header, cut short.
        tokio::io::AsyncWriteExt::write_all(&mut a, b"\x16\x03\x01")
            .await
            .unwrap();
        let d = detect(&mut b, Duration::from_millis(50)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Opaque);
        assert!(d.timed_out);
        assert_eq!(&d.prefix[..], b"\x16\x03\x01");
    }

    /// Stalling or padding the request line does not turn HTTP into opaque bytes.
    #[tokio::test]
    async fn a_stalled_or_oversized_request_line_is_still_http() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"G")
            .await
            .unwrap();
        let d = detect(&mut b, Duration::from_millis(50)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Http1);
        assert!(d.timed_out);
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let mut long = b"GET /?pad=".to_vec();
        long.resize(20 * 1024, b'x');
        tokio::io::AsyncWriteExt::write_all(&mut a, &long)
            .await
            .unwrap();
        let d = detect(&mut b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Http1);
        assert!(!d.timed_out);
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &H2_PREFACE[..5])
            .await
            .unwrap();
        drop(a);
        let d = detect(&mut b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Http2);
    }

    #[tokio::test]
    async fn detect_reads_across_several_writes() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let t = tokio::spawn(async move {
            for part in [&b"GET /a"[..], b" HTTP/1.1\r\n", b"Host: x\r\n\r\n"] {
                tokio::io::AsyncWriteExt::write_all(&mut a, part)
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
            a
        });
        let d = detect(&mut b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Http1);
        assert!(d.prefix.starts_with(b"GET /a"));
        t.await.unwrap();
    }

    fn client_hello(name: &str) -> Vec<u8> {
        client_hello_with_alpn(name, b"http/1.1")
    }

    /// The first flight of a real rustls client connecting to `name`.
    fn client_hello_with_alpn(name: &str, alpn: &[u8]) -> Vec<u8> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut config = config;
        config.alpn_protocols = vec![alpn.to_vec()];
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            name.to_string().try_into().unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }
}
