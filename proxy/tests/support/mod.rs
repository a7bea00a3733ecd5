//! The rootless test tier's world: proxies bound on loopback in this process, whose
//! socket factory hands out the original destination a test gives each listener (what
//! iptables and conntrack would say in a pod), an issuer in this process for the mesh's
//! certificates, and applications that tell what they received. Nothing here needs
//! root or a network namespace.

#![allow(dead_code)]

use bytes::Bytes;
use gofe_proxy::config::Config;
use gofe_proxy::socket::{Connecting, HostSockets, SocketFactory};
use gofe_proxy::{Proxy, ProxyAddrs, Shutdown};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Host sockets, except that a connection accepted on a listener the test mapped was
/// "redirected" from the address the test gave it.
#[derive(Default)]
pub struct RedirectedSockets {
    orig: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

impl RedirectedSockets {
    /// Connections accepted on `listener` came for `orig_dst`.
    pub fn redirect(&self, listener: SocketAddr, orig_dst: SocketAddr) {
        self.orig.lock().unwrap().insert(listener, orig_dst);
    }
}

impl SocketFactory for RedirectedSockets {
    fn bind(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        HostSockets.bind(addr)
    }

    fn accepted(&self, stream: &TcpStream) {
        HostSockets.accepted(stream)
    }

    fn connect(&self, addr: SocketAddr) -> Connecting<'_> {
        HostSockets.connect(addr)
    }

    fn original_dst(&self, stream: &TcpStream) -> io::Result<Option<SocketAddr>> {
        let local = stream.local_addr()?;
        Ok(self.orig.lock().unwrap().get(&local).copied())
    }
}

/// A proxy running in this process.
pub struct TestProxy {
    pub addrs: ProxyAddrs,
    pub sockets: Arc<RedirectedSockets>,
    shutdown: Shutdown,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    /// A proxy with `vars` (listeners on loopback, any port, unless given).
    pub fn start(vars: &[(&str, &str)]) -> TestProxy {
        let mut map: HashMap<String, String> = [
            ("GOFE_OUTBOUND_LISTEN", "127.0.0.1:0"),
            ("GOFE_INBOUND_LISTEN", "127.0.0.1:0"),
            ("GOFE_ADMIN_LISTEN", "127.0.0.1:0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        map.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Config::from_map(&map).expect("a valid test configuration");
        let sockets = Arc::new(RedirectedSockets::default());
        let proxy = Proxy::bind_with(config, None, sockets.clone()).expect("the proxy binds");
        let addrs = proxy.addrs();
        let shutdown = proxy.shutdown();
        let done = tokio::spawn(proxy.run());
        TestProxy {
            addrs,
            sockets,
            shutdown,
            done: Some(done),
        }
    }

    /// Outbound connections to this proxy were going to `orig_dst`.
    pub fn outbound_to(&self, orig_dst: SocketAddr) {
        self.sockets.redirect(self.addrs.outbound, orig_dst);
    }

    /// Inbound connections to this proxy were going to `orig_dst` (the application is
    /// on loopback at its port).
    pub fn inbound_for(&self, orig_dst: SocketAddr) {
        self.sockets.redirect(self.addrs.inbound, orig_dst);
    }

    /// Waits until `/ready` says 200.
    pub async fn ready(&self) {
        eventually(Duration::from_secs(20), || async {
            admin(self.addrs.admin, "/ready").await.0 == 200
        })
        .await;
    }

    pub async fn metrics(&self) -> String {
        admin(self.addrs.admin, "/metrics").await.1
    }

    pub async fn stop(mut self) {
        self.shutdown.trigger();
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), done).await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// A GET to the admin server: status and body.
pub async fn admin(addr: SocketAddr, path: &str) -> (u16, String) {
    match get(addr, &format!("http://{addr}{path}"), &[]).await {
        Ok(r) => (r.status, r.body),
        Err(_) => (0, String::new()),
    }
}

pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

/// One HTTP/1.1 request on a new connection to `via`, for `uri`, with `headers`.
pub async fn get(via: SocketAddr, uri: &str, headers: &[(&str, &str)]) -> anyhow::Result<Answer> {
    let stream = TcpStream::connect(via).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let uri: http::Uri = uri.parse()?;
    let mut req = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()));
    if let Some(a) = uri.authority() {
        req = req.header("host", a.as_str());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let rsp = tx.send_request(req.body(Full::new(Bytes::new()))?).await?;
    let status = rsp.status().as_u16();
    let headers = rsp.headers().clone();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// An application that answers every request with the request's headers as JSON
/// (names to values), and counts the connections it accepted.
pub struct App {
    pub addr: SocketAddr,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl App {
    pub async fn start() -> App {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let headers: serde_json::Map<String, serde_json::Value> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.to_string(),
                                    v.to_str().unwrap_or_default().to_string().into(),
                                )
                            })
                            .collect();
                        let body = serde_json::to_vec(&headers).unwrap();
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            body,
                        ))))
                    });
                tokio::spawn(async move {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                });
            }
        });
        App { addr, connections }
    }
}

/// The headers an `App` reported.
pub fn seen(body: &str) -> serde_json::Map<String, serde_json::Value> {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not the app's answer ({e}): {body}"))
}

/// A TCP server that echoes what it reads.
pub async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// An address nothing listens on.
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Waits until `check` holds, failing after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < until,
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the first sample of `metric` whose labels include every pair.
pub fn sample(metrics: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(metric)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        if !all {
            return None;
        }
        l.rsplit(' ').next()?.parse().ok()
    })
}

/// An issuer (the mesh's CA) in this process, development mode: any token is accepted.
pub struct Issuer {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Issuer {
    pub async fn start() -> Issuer {
        let dir = tempfile::tempdir().unwrap();
        let issuer_dir = dir.path().join("issuer");
        gofe_identity::issuer::material::bootstrap(&issuer_dir, "cluster.local").unwrap();
        std::fs::write(dir.path().join("token"), "any token: development mode\n").unwrap();
        let bound = gofe_identity::issuer::Bound::bind(gofe_identity::issuer::IssuerConfig {
            dir: issuer_dir,
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            cert_lifetime: Duration::from_secs(3600),
            jwks: None,
            insecure_dev: true,
            trust_domain: "cluster.local".into(),
            audience: gofe_identity::api::TOKEN_AUDIENCE.into(),
            token_issuer: None,
        })
        .await
        .unwrap();
        let addr = bound.addr();
        let task = tokio::spawn(bound.run(std::future::pending()));
        Issuer { dir, addr, task }
    }

    pub fn anchors(&self) -> PathBuf {
        self.dir.path().join("issuer/ca.crt")
    }

    /// The variables of a proxy with identity `spiffe://cluster.local/ns/default/sa/<sa>`.
    pub fn vars(&self, sa: &str) -> Vec<(String, String)> {
        vec![
            ("GOFE_IDENTITY_ADDR".into(), self.addr.to_string()),
            (
                "GOFE_IDENTITY_NAME".into(),
                format!("spiffe://cluster.local/ns/default/sa/{sa}"),
            ),
            (
                "GOFE_IDENTITY_TRUST_ANCHORS".into(),
                self.anchors().display().to_string(),
            ),
            (
                "GOFE_IDENTITY_TOKEN_FILE".into(),
                self.dir.path().join("token").display().to_string(),
            ),
        ]
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `vars` as the borrowed pairs `TestProxy::start` takes.
pub fn pairs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}
