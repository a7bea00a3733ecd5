//! Leaf: the application's own probes, run the way the kubelet would run them, for the
//! admin server to answer `/app-health/<container>/<kind>` with their result. Under
//! strict inbound mTLS the kubelet's plaintext probes cannot reach the application;
//! the injector points them at the admin port instead, and this module sends the
//! original probe from inside the pod: HTTP with the kubelet's redirect rules and a new
//! connection each time, a TCP connect, or a gRPC `grpc.health.v1.Health/Check`.
//!
//! gRPC is spoken by hand over hyper's HTTP/2 client rather than through tonic: it is
//! one unary call whose request and response are one field each, and the proxy already
//! carries hyper's HTTP/2 client; tonic and prost would add two dependency trees and
//! generated code to the proxy for ten lines of framing.

use crate::config::{AppProbe, HttpScheme, ProbeAction};
use crate::socket::SocketFactory;
use bytes::{Buf, Bytes};
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// The kubelet follows at most this many requests of a redirect chain.
const MAX_REQUESTS: usize = 10;
/// The kubelet reads at most this much of a probe's response body.
const MAX_BODY: usize = 10 * 1024;

/// Why a probe failed: what the kubelet shows in the pod's events.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("GET {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("GET {url} answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("GET {url}: stopped after {MAX_REQUESTS} redirects")]
    TooManyRedirects { url: String },
    #[error("gRPC health check of service {service:?} on port {port}: {reason}")]
    Grpc {
        port: u16,
        service: String,
        reason: String,
    },
}

/// A probe that passed, and what it saw.
#[derive(Debug)]
pub struct Passed {
    pub detail: String,
}

/// Runs `probe` against the application at `host` (the pod's address: the one the
/// kubelet's probe arrived on), within the probe's timeout. `user_agent` is the
/// kubelet's, passed on so the application sees the probe it expects.
pub async fn run(
    probe: &AppProbe,
    host: IpAddr,
    user_agent: Option<&HeaderValue>,
    sockets: &dyn SocketFactory,
) -> Result<Passed, ProbeError> {
    let work = async {
        match &probe.action {
            ProbeAction::Tcp { port } => {
                let addr = SocketAddr::new(host, *port);
                connect(sockets, addr).await?;
                Ok(Passed {
                    detail: format!("TCP connection to {addr} opened"),
                })
            }
            ProbeAction::Http {
                scheme,
                port,
                path,
                headers,
            } => http_probe(sockets, host, *scheme, *port, path, headers, user_agent).await,
            ProbeAction::Grpc { port, service } => {
                grpc_probe(sockets, SocketAddr::new(host, *port), service, user_agent).await
            }
        }
    };
    tokio::time::timeout(probe.timeout, work)
        .await
        .unwrap_or(Err(ProbeError::Timeout(probe.timeout)))
}

async fn connect(
    sockets: &dyn SocketFactory,
    addr: SocketAddr,
) -> Result<tokio::net::TcpStream, ProbeError> {
    sockets
        .connect(addr)
        .await
        .map_err(|source| ProbeError::Connect { addr, source })
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The kubelet's HTTP probe: GET with its headers on a new connection each time
/// (`Connection: close`), 200-399 passes; redirects are followed while they stay on
/// the probe's host, up to ten requests; a redirect elsewhere is not followed and
/// passes (the kubelet logs a warning), as does any other 3xx.
async fn http_probe(
    sockets: &dyn SocketFactory,
    host: IpAddr,
    scheme: HttpScheme,
    port: u16,
    path: &str,
    headers: &[(http::HeaderName, HeaderValue)],
    user_agent: Option<&HeaderValue>,
) -> Result<Passed, ProbeError> {
    let mut target = Target {
        scheme,
        host: host.to_string(),
        port,
        path: path.to_string(),
    };
    let first_host = target.host.clone();
    for request in 1..=MAX_REQUESTS {
        let url = target.url();
        let status_and_location = http_get(sockets, host, &target, headers, user_agent).await?;
        let (status, location) = status_and_location;
        let redirect = matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308);
        match location.filter(|_| redirect) {
            Some(location) => {
                let next = target.follow(&location).ok_or_else(|| ProbeError::Http {
                    url: url.clone(),
                    reason: format!("redirect to {location:?}, which is not a URL"),
                })?;
                if next.host != first_host {
                    return Ok(Passed {
                        detail: format!(
                            "GET {url} answered {status}; the redirect to another host ({location}) is not followed"
                        ),
                    });
                }
                if request == MAX_REQUESTS {
                    return Err(ProbeError::TooManyRedirects { url });
                }
                debug!(%url, %location, "probe follows a redirect");
                target = next;
            }
            None if (200..400).contains(&status.as_u16()) => {
                return Ok(Passed {
                    detail: format!("GET {url} answered {status}"),
                });
            }
            None => return Err(ProbeError::Status { url, status }),
        }
    }
    unreachable!("the loop returns by its last request")
}

/// Where one request of a redirect chain goes.
struct Target {
    scheme: HttpScheme,
    host: String,
    port: u16,
    /// Path and query.
    path: String,
}

impl Target {
    fn url(&self) -> String {
        let scheme = match self.scheme {
            HttpScheme::Http => "http",
            HttpScheme::Https => "https",
        };
        let host = match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => self.host.clone(),
        };
        format!("{scheme}://{host}:{}{}", self.port, self.path)
    }

    /// The target a `Location` names, resolved against this one.
    fn follow(&self, location: &str) -> Option<Target> {
        if location.starts_with('/') && !location.starts_with("//") {
            let path = location.parse::<http::uri::PathAndQuery>().ok()?;
            return Some(Target {
                path: path.to_string(),
                host: self.host.clone(),
                ..*self
            });
        }
        if !location.contains("://") {
            // Relative to the current path's directory.
            let dir = match self.path.split('?').next().unwrap_or("/").rfind('/') {
                Some(i) => &self.path[..=i],
                None => "/",
            };
            let path = format!("{dir}{location}")
                .parse::<http::uri::PathAndQuery>()
                .ok()?;
            return Some(Target {
                path: path.to_string(),
                host: self.host.clone(),
                ..*self
            });
        }
        let uri: http::Uri = location.parse().ok()?;
        let (scheme, authority) = (uri.scheme_str()?, uri.authority()?);
        let scheme = match scheme {
            "http" => HttpScheme::Http,
            "https" => HttpScheme::Https,
            _ => return None,
        };
        let default = if scheme == HttpScheme::Http { 80 } else { 443 };
        Some(Target {
            scheme,
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: authority.port_u16().unwrap_or(default),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.to_string()),
        })
    }
}

/// One GET on a connection of its own; the response's status and `Location`.
async fn http_get(
    sockets: &dyn SocketFactory,
    host: IpAddr,
    target: &Target,
    headers: &[(http::HeaderName, HeaderValue)],
    user_agent: Option<&HeaderValue>,
) -> Result<(StatusCode, Option<String>), ProbeError> {
    let url = target.url();
    let failed = |reason: String| ProbeError::Http {
        url: url.clone(),
        reason,
    };
    let addr = SocketAddr::new(host, target.port);
    let tcp = connect(sockets, addr).await?;
    let io: Box<dyn Io> = match target.scheme {
        HttpScheme::Http => Box::new(tcp),
        HttpScheme::Https => Box::new(tls(addr, tcp).await?),
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| failed(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            debug!(%error, "probe connection ended with an error");
        }
    });
    let host_header = url
        .split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or(rest).to_string())
        .unwrap_or_default();
    let mut req = Request::get(target.path.as_str())
        .header(header::HOST, host_header)
        .header(header::ACCEPT, "*/*")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(e.to_string()))?;
    let h = req.headers_mut();
    h.insert(
        header::USER_AGENT,
        user_agent
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("kube-probe/gofe")),
    );
    // The probe's own headers win, Host and User-Agent included, as with the kubelet.
    let mut replaced = Vec::new();
    for (name, value) in headers {
        if !replaced.contains(name) {
            h.remove(name);
            replaced.push(name.clone());
        }
        h.append(name.clone(), value.clone());
    }
    let rsp = send
        .send_request(req)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let status = rsp.status();
    let location = rsp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // Read what the kubelet would read, then let the connection close.
    let _ = Limited::new(rsp.into_body(), MAX_BODY).collect().await;
    Ok((status, location))
}

/// TLS as the kubelet speaks it to an HTTPS probe: the certificate is not verified
/// (the kubelet skips verification; the application's certificate names whatever it
/// likes).
async fn tls(
    addr: SocketAddr,
    tcp: tokio::net::TcpStream,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ProbeError> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    });
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|source| ProbeError::Tls { addr, source })
}

/// Accepts any certificate, checking only that the handshake's signatures are made
/// with its key (what `InsecureSkipVerify` leaves of TLS in the kubelet).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// grpc.health.v1's ServingStatus values the kubelet cares about.
const SERVING: u64 = 1;

/// The kubelet's gRPC probe: `grpc.health.v1.Health/Check` over plaintext HTTP/2; it
/// passes when the answer is SERVING.
async fn grpc_probe(
    sockets: &dyn SocketFactory,
    addr: SocketAddr,
    service: &str,
    user_agent: Option<&HeaderValue>,
) -> Result<Passed, ProbeError> {
    let failed = |reason: String| ProbeError::Grpc {
        port: addr.port(),
        service: service.to_string(),
        reason,
    };
    let tcp = connect(sockets, addr).await?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| failed(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            debug!(%error, "gRPC probe connection ended with an error");
        }
    });
    let req = Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(
            header::USER_AGENT,
            user_agent
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("kube-probe/gofe")),
        )
        .body(Full::new(health_check_request(service)))
        .map_err(|e| failed(e.to_string()))?;
    let rsp = send
        .send_request(req)
        .await
        .map_err(|e| failed(e.to_string()))?;
    if rsp.status() != StatusCode::OK {
        return Err(failed(format!("HTTP status {}", rsp.status())));
    }
    // A trailers-only answer carries its status in the headers.
    let head_status = grpc_status(rsp.headers());
    let collected = Limited::new(rsp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let trailers = collected.trailers().cloned();
    let status = head_status.or_else(|| trailers.as_ref().and_then(grpc_status));
    match status {
        Some((0, _)) => {}
        Some((code, message)) => {
            return Err(failed(format!("grpc-status {code} {message}")));
        }
        None => return Err(failed("no grpc-status in the answer".into())),
    }
    match serving_status(collected.to_bytes()) {
        Some(SERVING) => Ok(Passed {
            detail: format!("gRPC health check of {service:?} on {addr}: SERVING"),
        }),
        Some(other) => Err(failed(format!(
            "responded with {}",
            match other {
                0 => "UNKNOWN".to_string(),
                2 => "NOT_SERVING".to_string(),
                3 => "SERVICE_UNKNOWN".to_string(),
                n => format!("status {n}"),
            }
        ))),
        None => Err(failed("the answer is not a HealthCheckResponse".into())),
    }
}

fn grpc_status(h: &http::HeaderMap) -> Option<(u32, String)> {
    let code = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Some((code, message))
}

/// `HealthCheckRequest { string service = 1; }` in a gRPC frame (uncompressed).
fn health_check_request(service: &str) -> Bytes {
    let mut message = Vec::new();
    if !service.is_empty() {
        message.push(0x0a); // field 1, length-delimited
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    Bytes::from(frame)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &mut Bytes) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        if !b.has_remaining() {
            return None;
        }
        let byte = b.get_u8();
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// `HealthCheckResponse { ServingStatus status = 1; }` out of a gRPC frame; unknown
/// fields are skipped, as protobuf requires; an absent status is UNKNOWN (0).
fn serving_status(mut frame: Bytes) -> Option<u64> {
    if frame.remaining() < 5 || frame.get_u8() != 0 {
        return None;
    }
    let len = frame.get_u32() as usize;
    if frame.remaining() < len {
        return None;
    }
    let mut message = frame.split_to(len);
    let mut status = 0;
    while message.has_remaining() {
        let key = get_varint(&mut message)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = get_varint(&mut message)?,
            (_, 0) => {
                get_varint(&mut message)?;
            }
            (_, 1) if message.remaining() >= 8 => message.advance(8),
            (_, 2) => {
                let n = usize::try_from(get_varint(&mut message)?).ok()?;
                if message.remaining() < n {
                    return None;
                }
                message.advance(n);
            }
            (_, 5) if message.remaining() >= 4 => message.advance(4),
            _ => return None,
        }
    }
    Some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_check_frames_round_trip() {
        assert_eq!(&health_check_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &health_check_request("web")[..],
            &[0, 0, 0, 0, 5, 0x0a, 3, b'w', b'e', b'b']
        );
        assert_eq!(
            serving_status(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 1])),
            Some(1)
        );
        assert_eq!(
            serving_status(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 2])),
            Some(2)
        );
        // An empty message is UNKNOWN; an unknown field is skipped.
        assert_eq!(
            serving_status(Bytes::from_static(&[0, 0, 0, 0, 0])),
            Some(0)
        );
        assert_eq!(
            serving_status(Bytes::from_static(&[0, 0, 0, 0, 5, 0x12, 1, b'x', 0x08, 1])),
            Some(1)
        );
        assert_eq!(serving_status(Bytes::from_static(&[1, 0, 0, 0, 0])), None);
        assert_eq!(
            serving_status(Bytes::from_static(&[0, 0, 0, 0, 9, 0x08])),
            None
        );
    }

    fn target(path: &str) -> Target {
        Target {
            scheme: HttpScheme::Http,
            host: "10.0.0.5".into(),
            port: 8080,
            path: path.into(),
        }
    }

    #[test]
    fn redirect_locations_resolve_as_a_browser_would() {
        let t = target("/a/b?x=1");
        let n = t.follow("/c").unwrap();
        assert_eq!(n.url(), "http://10.0.0.5:8080/c");
        let n = t.follow("d?y=2").unwrap();
        assert_eq!(n.url(), "http://10.0.0.5:8080/a/d?y=2");
        let n = t.follow("https://10.0.0.5:8443/z").unwrap();
        assert_eq!(n.url(), "https://10.0.0.5:8443/z");
        let n = t.follow("http://example.com/").unwrap();
        assert_eq!(n.host, "example.com");
        assert_eq!(n.port, 80);
        assert!(t.follow("ftp://x/").is_none());
    }

    /// A server of canned answers by path, counting connections: the probe must open
    /// one for each request.
    async fn canned() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    assert!(head.contains("connection: close"), "{head}");
                    assert!(head.contains("user-agent: kube-probe/1.37"), "{head}");
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let answer = match path.as_str() {
                        "/ok" => "200 OK\r\n".to_string(),
                        "/hop" => "302 Found\r\nLocation: /ok\r\n".into(),
                        "/loop" => "302 Found\r\nLocation: /loop\r\n".into(),
                        "/away" => "302 Found\r\nLocation: http://example.com/\r\n".into(),
                        "/to-fail" => "307 Temporary Redirect\r\nLocation: fail\r\n".into(),
                        _ => "500 Internal Server Error\r\n".into(),
                    };
                    let _ = s
                        .write_all(format!("HTTP/1.1 {answer}content-length: 0\r\n\r\n").as_bytes())
                        .await;
                });
            }
        });
        (addr, connections)
    }

    fn http(port: u16, path: &str) -> AppProbe {
        AppProbe {
            action: ProbeAction::Http {
                scheme: HttpScheme::Http,
                port,
                path: path.into(),
                headers: vec![],
            },
            timeout: Duration::from_secs(2),
        }
    }

    #[tokio::test]
    async fn http_probes_follow_the_kubelets_redirect_rules() {
        let (addr, connections) = canned().await;
        let ua = HeaderValue::from_static("kube-probe/1.37");
        let run = |path: &'static str| {
            let probe = http(addr.port(), path);
            let ua = ua.clone();
            async move { run(&probe, addr.ip(), Some(&ua), &crate::socket::HostSockets).await }
        };
        assert!(run("/ok").await.is_ok());
        let hop = run("/hop").await.unwrap();
        assert!(hop.detail.contains("/ok answered 200"), "{hop:?}");
        // A redirect to another host is not followed, and passes.
        let away = run("/away").await.unwrap();
        assert!(away.detail.contains("not followed"), "{away:?}");
        let err = run("/loop").await.unwrap_err();
        assert!(matches!(err, ProbeError::TooManyRedirects { .. }), "{err}");
        let err = run("/to-fail").await.unwrap_err();
        assert!(err.to_string().contains("/fail answered 500"), "{err}");
        // ok, hop 2, away, loop 10, to-fail 2: one connection each.
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 16);
    }

    #[tokio::test]
    async fn tcp_probe_fails_on_a_closed_port_and_passes_on_an_open_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tcp = |port| AppProbe {
            action: ProbeAction::Tcp { port },
            timeout: Duration::from_secs(1),
        };
        let host = IpAddr::from([127, 0, 0, 1]);
        let sockets = crate::socket::HostSockets;
        assert!(run(&tcp(port), host, None, &sockets).await.is_ok());
        drop(listener);
        let err = run(&tcp(port), host, None, &sockets).await.unwrap_err();
        assert!(matches!(err, ProbeError::Connect { .. }), "{err}");
    }

    #[tokio::test]
    async fn https_probe_accepts_any_certificate_as_the_kubelet_does() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A self-signed certificate for a name the probe never asks for.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["app.internal".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut buf = vec![0; 4096];
            let n = tls.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"GET /secure HTTP/1.1"));
            tls.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            tls.shutdown().await.unwrap();
        });
        let probe = AppProbe {
            action: ProbeAction::Http {
                scheme: HttpScheme::Https,
                port: addr.port(),
                path: "/secure".into(),
                headers: vec![],
            },
            timeout: Duration::from_secs(2),
        };
        let passed = run(&probe, addr.ip(), None, &crate::socket::HostSockets)
            .await
            .unwrap();
        assert!(
            passed.detail.contains("https://127.0.0.1:") && passed.detail.contains("204"),
            "{passed:?}"
        );
    }

    #[tokio::test]
    async fn an_app_that_never_answers_fails_the_probe_at_its_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepted and held, never answered.
        let held = tokio::spawn(async move {
            let conn = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(conn);
        });
        let mut probe = http(addr.port(), "/");
        probe.timeout = Duration::from_millis(200);
        let started = std::time::Instant::now();
        let err = run(&probe, addr.ip(), None, &crate::socket::HostSockets)
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Timeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        held.abort();
    }
}
