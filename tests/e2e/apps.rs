//! The applications the end-to-end tests run inside pods, as their own processes under
//! an application UID. The test binary re-executes itself with `GOFE_TESTAPP` set to
//! one of these kinds; each prints `READY` once it listens.
//!
//! - `http`: HTTP/1.1 and HTTP/2 (prior knowledge) with WebSocket and gRPC echo routes
//!   and grpc.health.v1 (NOT_SERVING while it misbehaves);
//!   it misbehaves on command (`/control/status/503`, `/control/delay/50`, or
//!   GOFE_TESTAPP_STATUS / GOFE_TESTAPP_DELAY_MS from the start; GOFE_TESTAPP_EARLY=1
//!   fails without reading the request body) and counts what it served
//!   (`/control/served`, and of those the copies a mirror sent, `/control/shadow`);
//!   `/healthz` answers 200 until `/control/health/503` (grpc.health.v1 says
//!   NOT_SERVING too), without the other routes failing
//! - `banner`: speaks first (a greeting), then echoes lines
//! - `halfclose`: reads to EOF, then answers with what it got and closes
//! - `speakfirst`: writes, half-closes, then reads to EOF and prints what it read
//! - `tls`: HTTPS with a self-signed certificate for `app.test`
//! - `record`: reads each connection for a second and prints every byte it got
//!   (`received <hex>`), then answers a minimal 200: a lenient server that trusts
//!   anything, to see what reaches an application
//! - `reset`: reads a little of each connection, then resets it (what a peer cutting a
//!   TLS handshake midway looks like)
//!
//! GOFE_TESTAPP_BIND binds one address (`127.0.0.1`, the pod's IP) instead of every
//! address.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn main(kind: &str) -> ExitCode {
    let port: u16 = std::env::var("GOFE_TESTAPP_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("GOFE_TESTAPP_PORT");
    let name = std::env::var("GOFE_TESTAPP_NAME").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // Dual-stack by default: one listener takes IPv4 and IPv6.
        let bind = match std::env::var("GOFE_TESTAPP_BIND") {
            Ok(ip) => SocketAddr::new(ip.parse().expect("GOFE_TESTAPP_BIND"), port),
            Err(_) => SocketAddr::from(([0u16; 8], port)),
        };
        let listener = TcpListener::bind(bind).await.expect("bind");
        println!("READY");
        let result = match kind {
            "http" => http(listener, name).await,
            "banner" => banner(listener, name).await,
            "halfclose" => halfclose(listener).await,
            "speakfirst" => speakfirst(listener).await,
            "tls" => tls(listener).await,
            "record" => record(listener).await,
            "reset" => reset(listener).await,
            other => panic!("unknown test app {other}"),
        };
        result.expect("app failed");
    });
    ExitCode::SUCCESS
}

/// The byte at offset `i` of a generated body: cheap to produce, not compressible into
/// a pattern the proxy could special-case, and checkable by hash.
pub fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8
}

pub fn pattern_sha256(len: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        for (j, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern_byte(off + j as u64);
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct HttpState {
    name: String,
    held: AtomicU64,
    release: tokio::sync::Notify,
    released: std::sync::atomic::AtomicBool,
    /// Requests served, control requests aside.
    served: AtomicU64,
    /// How the app misbehaves: every answer this status...
    fail_status: AtomicU64,
    /// ...after this many milliseconds...
    delay_ms: AtomicU64,
    /// ...without reading the request body first (GOFE_TESTAPP_EARLY=1).
    early: bool,
    /// What `/healthz` answers (0: 200).
    health_status: AtomicU64,
    /// Requests served whose Host ends in `-shadow` (a mirror's copies).
    shadow: AtomicU64,
}

fn env_u64(name: &str) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn http(listener: TcpListener, name: String) -> std::io::Result<()> {
    let state = Arc::new(HttpState {
        name,
        held: AtomicU64::new(0),
        release: tokio::sync::Notify::new(),
        released: false.into(),
        served: AtomicU64::new(0),
        fail_status: AtomicU64::new(env_u64("GOFE_TESTAPP_STATUS")),
        delay_ms: AtomicU64::new(env_u64("GOFE_TESTAPP_DELAY_MS")),
        early: env_u64("GOFE_TESTAPP_EARLY") == 1,
        health_status: AtomicU64::new(0),
        shadow: AtomicU64::new(0),
    });
    let conn_ids = AtomicU64::new(0);
    loop {
        let (stream, peer) = listener.accept().await?;
        let conn_id = conn_ids.fetch_add(1, Ordering::Relaxed);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, &state, peer, conn_id).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|e| match e {}).boxed_unsync()
}

fn text(status: StatusCode, s: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(s));
    *r.status_mut() = status;
    r
}

async fn route(
    req: Request<Incoming>,
    state: &HttpState,
    peer: SocketAddr,
    conn_id: u64,
) -> Response<Body> {
    let proto = format!("{:?}", req.version());
    let target = req.uri().to_string();
    let is_grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let path = req.uri().path().to_string();
    // Misbehaving on command: /control/status/503, /control/delay/50, /control/ok;
    // /control/served counts the other requests.
    if let Some(cmd) = path.strip_prefix("/control/") {
        let (what, arg) = cmd.split_once('/').unwrap_or((cmd, ""));
        let n: u64 = arg.parse().unwrap_or(0);
        match what {
            "status" => state.fail_status.store(n, Ordering::SeqCst),
            "delay" => state.delay_ms.store(n, Ordering::SeqCst),
            "ok" => {
                state.fail_status.store(0, Ordering::SeqCst);
                state.delay_ms.store(0, Ordering::SeqCst);
                state.health_status.store(0, Ordering::SeqCst);
            }
            "health" => state.health_status.store(n, Ordering::SeqCst),
            "shadow" => {
                return text(
                    StatusCode::OK,
                    state.shadow.load(Ordering::SeqCst).to_string(),
                );
            }
            "served" => {
                return text(
                    StatusCode::OK,
                    state.served.load(Ordering::SeqCst).to_string(),
                );
            }
            _ => return text(StatusCode::NOT_FOUND, "no such control\n"),
        }
        return text(StatusCode::OK, "ok\n");
    }
    if is_grpc && path.starts_with(crate::grpc::HEALTH_PREFIX) {
        let serving = state.fail_status.load(Ordering::SeqCst) == 0
            && state.health_status.load(Ordering::SeqCst) == 0;
        return crate::grpc::health(req, serving)
            .await
            .map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
    }
    if path == "/healthz" {
        let code = state.health_status.load(Ordering::SeqCst) as u16;
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
        return text(status, "health\n");
    }
    state.served.fetch_add(1, Ordering::SeqCst);
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    if host
        .split(':')
        .next()
        .is_some_and(|h| h.ends_with("-shadow"))
    {
        state.shadow.fetch_add(1, Ordering::SeqCst);
    }
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let fail = state.fail_status.load(Ordering::SeqCst) as u16;
    let mut rsp = if let Some(code) = StatusCode::from_u16(fail).ok().filter(|_| fail != 0) {
        // Drain what the client sends, as most servers answering an error would; or
        // answer before reading it, as a server refusing a request at once does.
        if !state.early {
            let _ = req.into_body().collect().await;
        }
        text(code, format!("{} misbehaves\n", state.name))
    } else if req.method() == http::Method::CONNECT {
        connect_tunnel(req)
    } else if is_grpc {
        crate::grpc::serve(req)
            .await
            .map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync())
    } else {
        match path.as_str() {
            "/" => text(StatusCode::OK, format!("hello from {}\n", state.name)),
            "/echo" => Response::new(
                req.into_body()
                    .map_err(|e| Box::new(e) as BoxError)
                    .boxed_unsync(),
            ),
            "/sink" => {
                let mut body = req.into_body();
                let mut h = Sha256::new();
                let mut n = 0u64;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) => {
                            if let Some(d) = f.data_ref() {
                                n += d.len() as u64;
                                h.update(d);
                            }
                        }
                        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
                    }
                }
                text(StatusCode::OK, format!("{n} {}\n", hex(&h.finalize())))
            }
            // Headers and a first chunk, then nothing until the client goes away.
            "/stall" => {
                let first = futures_util::stream::once(async {
                    Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"partial")))
                });
                let stream = first.chain(futures_util::stream::pending());
                Response::new(StreamBody::new(stream).boxed_unsync())
            }
            "/chunked" => {
                let chunks = (0..5)
                    .map(|i| Ok::<_, BoxError>(Frame::data(Bytes::from(format!("chunk-{i};")))));
                Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync())
            }
            "/headers" => {
                let map: serde_json::Map<String, serde_json::Value> = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                    .collect();
                text(StatusCode::OK, serde_json::to_string(&map).unwrap())
            }
            "/hold" => {
                state.held.fetch_add(1, Ordering::SeqCst);
                while !state.released.load(Ordering::SeqCst) {
                    let notified = state.release.notified();
                    if state.released.load(Ordering::SeqCst) {
                        break;
                    }
                    notified.await;
                }
                text(StatusCode::OK, "released\n")
            }
            "/held" => text(
                StatusCode::OK,
                state.held.load(Ordering::SeqCst).to_string(),
            ),
            "/release" => {
                state.released.store(true, Ordering::SeqCst);
                state.release.notify_waiters();
                text(StatusCode::OK, "ok\n")
            }
            "/ws" => websocket(req),
            p if p.starts_with("/bytes/") => {
                let len: u64 = p["/bytes/".len()..].parse().unwrap_or(0);
                let chunks = futures_util::stream::unfold(0u64, move |off| async move {
                    if off >= len {
                        return None;
                    }
                    let n = (len - off).min(64 * 1024);
                    let chunk: Vec<u8> = (off..off + n).map(pattern_byte).collect();
                    Some((Ok::<_, BoxError>(Frame::data(Bytes::from(chunk))), off + n))
                });
                let mut r = Response::new(StreamBody::new(chunks).boxed_unsync());
                r.headers_mut().insert("content-length", len.into());
                r
            }
            p if p.starts_with("/status/") => {
                let code = p["/status/".len()..]
                    .parse()
                    .ok()
                    .and_then(|c| StatusCode::from_u16(c).ok());
                text(code.unwrap_or(StatusCode::BAD_REQUEST), "status\n")
            }
            _ => text(StatusCode::NOT_FOUND, "no such route\n"),
        }
    };
    let h = rsp.headers_mut();
    h.insert("x-request-proto", proto.parse().unwrap());
    if let Ok(v) = target.parse() {
        h.insert("x-request-uri", v);
    }
    h.insert("x-conn-id", conn_id.into());
    if let Ok(v) = state.name.parse() {
        h.insert("x-served-by", v);
    }
    // The listener is dual-stack: show IPv4 peers as IPv4.
    let peer = match peer {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => peer,
        },
        v4 => v4,
    };
    h.insert("x-peer", peer.to_string().parse().unwrap());
    rsp
}

/// The app as an HTTP proxy: CONNECT host:port opens a tunnel there.
fn connect_tunnel(mut req: Request<Incoming>) -> Response<Body> {
    let Some(target) = req.uri().authority().map(|a| a.to_string()) else {
        return text(StatusCode::BAD_REQUEST, "CONNECT needs host:port\n");
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let (Ok(client), Ok(mut server)) =
            (upgrade.await, tokio::net::TcpStream::connect(&target).await)
        else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut server).await;
    });
    text(StatusCode::OK, Bytes::new())
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return text(StatusCode::BAD_REQUEST, "not a websocket request\n");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() || ((msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err())
            {
                break;
            }
        }
    });
    let mut r = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let h = r.headers_mut();
    h.insert("upgrade", "websocket".parse().unwrap());
    h.insert("connection", "upgrade".parse().unwrap());
    h.insert("sec-websocket-accept", accept.parse().unwrap());
    r
}

async fn record(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
            println!("received {hex}");
            let _ = s
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nrecorded\n",
                )
                .await;
        });
    }
}

async fn reset(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (mut s, _) = listener.accept().await?;
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await;
        let _ = socket2::SockRef::from(&s).set_linger(Some(std::time::Duration::ZERO));
        drop(s);
    }
}

async fn banner(listener: TcpListener, name: String) -> std::io::Result<()> {
    loop {
        let (mut s, _) = listener.accept().await?;
        let greeting = format!("220 banner from {name}\r\n");
        tokio::spawn(async move {
            if s.write_all(greeting.as_bytes()).await.is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn halfclose(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut all = Vec::new();
            if s.read_to_end(&mut all).await.is_err() {
                return;
            }
            let reply = format!(
                "got {} bytes: {}\n",
                all.len(),
                String::from_utf8_lossy(&all)
            );
            let _ = s.write_all(reply.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

async fn speakfirst(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = s.write_all(b"hello, then silence\n").await;
            let _ = s.shutdown().await;
            let mut all = Vec::new();
            if s.read_to_end(&mut all).await.is_ok() {
                println!("received: {}", String::from_utf8_lossy(&all).trim());
            }
        });
    }
}

async fn tls(listener: TcpListener) -> std::io::Result<()> {
    let cert = rcgen::generate_simple_self_signed(vec!["app.test".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let (s, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(s).await else {
                return;
            };
            let sni = tls.get_ref().1.server_name().unwrap_or("").to_string();
            let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let body = format!("tls ok, sni {sni}\n");
                async move {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}
