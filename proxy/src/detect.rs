//! Protocol detection: reads a connection's first bytes, within a deadline, until they
//! say HTTP/1.x, HTTP/2 (prior knowledge), TLS (its SNI read for metrics) or none of
//! these. The bytes read are handed on, to be replayed to whatever serves the
//! connection.

use bytes::{Bytes, BytesMut};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Enough for any HTTP/1 request line we accept and for a TLS ClientHello in one
/// maximum-size record (16 KiB plus its header).
const MAX_DETECT_BYTES: usize = 18 * 1024;

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
/// `timeout`), or `MAX_DETECT_BYTES` are read; the last two mean opaque.
pub async fn detect<I: AsyncRead + Unpin>(io: &mut I, timeout: Duration) -> io::Result<Detected> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if let Some(protocol) = classify(&buf) {
            return Ok(Detected {
                protocol,
                prefix: buf.freeze(),
                timed_out: false,
            });
        }
        if buf.len() >= MAX_DETECT_BYTES {
            return Ok(undecided(buf, false));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().min(MAX_DETECT_BYTES - buf.len()));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_elapsed) => return Ok(undecided(buf, true)),
            Ok(Ok(0)) => return Ok(undecided(buf, false)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// No decision from the bytes read: the client stopped sending (EOF, the deadline) or
/// sent more than detection reads. Bytes that begin like HTTP are HTTP even so: hyper
/// then answers a slow or oversized request properly, and a client cannot pass HTTP to
/// the application unexamined (headers such as gofe-client-id unstripped) by stalling
/// or padding. Anything else is opaque; a TLS record cut short goes through as TLS
/// would, opaquely.
fn undecided(buf: BytesMut, timed_out: bool) -> Detected {
    let protocol =
        if !buf.is_empty() && H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
            Protocol::Http2
        } else if begins_like_http1(&buf) {
            Protocol::Http1
        } else {
            Protocol::Opaque
        };
    Detected {
        protocol,
        prefix: buf.freeze(),
        timed_out,
    }
}

/// A method token (upper-case letters, as every standard method) and, once there is
/// more, a space: the start of an HTTP/1 request line.
fn begins_like_http1(buf: &[u8]) -> bool {
    let method = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    method > 0 && (method == buf.len() || (method <= 20 && buf[method] == b' '))
}

/// Decides from the bytes so far; `None` means more bytes are needed.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() {
            Some(Protocol::Http2)
        } else {
            None
        };
    }
    if buf[0] == 0x16 {
        return classify_tls(buf);
    }
    classify_http1(buf)
}

/// A TLS handshake record (type 22, version 3.x) is TLS; its SNI is read if the whole
/// ClientHello has arrived.
fn classify_tls(buf: &[u8]) -> Option<Protocol> {
    if buf.len() < 3 {
        return None;
    }
    if buf[1] != 0x03 {
        return classify_http1(buf);
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = buf;
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
                mesh: hello
                    .alpn()
                    .is_some_and(|mut protocols| protocols.any(gofe_identity::tls::is_mesh_alpn)),
            })
        }
        Ok(None) if buf.len() < MAX_DETECT_BYTES => None,
        Ok(None) | Err(_) => Some(Protocol::Tls {
            server_name: None,
            mesh: false,
        }),
    }
}

/// An HTTP/1 request line: `METHOD SP target SP HTTP/1.x CRLF`.
fn classify_http1(buf: &[u8]) -> Option<Protocol> {
    // No room for headers: a request line that parses and is followed by a header
    // reports TooManyHeaders, which is enough to know it is HTTP/1.
    let mut headers: [httparse::Header<'_>; 0] = [];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Some(Protocol::Http1),
        Ok(httparse::Status::Partial) if req.version.is_some() => Some(Protocol::Http1),
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => Some(Protocol::Http1),
        Err(_) => Some(Protocol::Opaque),
    }
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
        assert_eq!(classify(b"GET / HTTP/1."), None);
    }

    #[test]
    fn h2_preface_whole_and_partial() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
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
