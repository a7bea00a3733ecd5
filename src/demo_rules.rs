//! `gofe demo`, traffic rules: three stories, each with a sidecar of its own on
//! loopback (ephemeral ports, no root).
//!
//! 1. A canary rollout: api v2 takes 10% of users, then 50%, while 200 sticky users
//!    (each with the cookie the sidecar set) keep calling; each user stays on one
//!    version while the weights hold, and raising the canary moves only users from v1
//!    to v2.
//! 2. A rate limit per client: an inbound port allows each client 20 requests a second
//!    (burst 20); a greedy client (from 127.0.0.2) sending 100 a second gets 429s with
//!    Retry-After, a polite one (127.0.0.3) sending 10 a second gets none.
//! 3. A health check: two replicas; replica b's /healthz starts failing, its sidecar
//!    takes it out within two checks, and only then does b start failing its
//!    requests: not one of the client's requests fails on it.

use bytes::Bytes;
use gofe_proxy::Proxy;
use gofe_proxy::config::Config;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpSocket};

/// A server answering with its name; `/healthz` answers `health`, other paths
/// `status` (both settable while it runs).
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    health: Arc<AtomicU16>,
    status: Arc<AtomicU16>,
}

pub(crate) async fn server(name: &'static str) -> anyhow::Result<Server> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let health = Arc::new(AtomicU16::new(200));
    let status = Arc::new(AtomicU16::new(200));
    let (h, s) = (health.clone(), status.clone());
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = l.accept().await else {
                return;
            };
            let (h, s) = (h.clone(), s.clone());
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let code = if req.uri().path() == "/healthz" {
                    h.load(Ordering::Relaxed)
                } else {
                    s.load(Ordering::Relaxed)
                };
                let mut rsp = Response::new(Full::new(Bytes::from(name)));
                *rsp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
                std::future::ready(Ok::<_, std::convert::Infallible>(rsp))
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(conn), svc)
                    .await;
            });
        }
    });
    Ok(Server {
        addr,
        health,
        status,
    })
}

/// A sidecar with `vars` over loopback defaults.
pub(crate) fn sidecar(vars: &[(&str, String)]) -> anyhow::Result<(Proxy, gofe_proxy::ProxyAddrs)> {
    let mut map: HashMap<String, String> = [
        ("GOFE_OUTBOUND_LISTEN", "127.0.0.1:0"),
        ("GOFE_INBOUND_LISTEN", "127.0.0.1:0"),
        ("GOFE_ADMIN_LISTEN", "127.0.0.1:0"),
        ("GOFE_IDENTITY_DISABLED", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    map.extend(vars.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let proxy = Proxy::bind(Config::from_map(&map)?)?;
    let addrs = proxy.addrs();
    Ok((proxy, addrs))
}

pub(crate) type Conn = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

pub(crate) async fn connect(to: SocketAddr, from: Option<&str>) -> anyhow::Result<Conn> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = from {
        socket.bind(SocketAddr::new(ip.parse()?, 0))?;
    }
    let stream = socket.connect(to).await?;
    let (tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(c);
    Ok(tx)
}

/// One GET: status, body, and the cookie set, if any.
pub(crate) async fn get(
    conn: &mut Conn,
    host: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String, Option<String>, Option<String>)> {
    let mut b = Request::get("/").header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    conn.ready().await?;
    let rsp = conn.send_request(b.body(Empty::new())?).await?;
    let status = rsp.status().as_u16();
    let header = |n: &str| {
        rsp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (cookie, retry_after) = (header("set-cookie"), header("retry-after"));
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok((
        status,
        String::from_utf8_lossy(&body).into_owned(),
        cookie,
        retry_after,
    ))
}

fn write(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Runs the three stories.
pub async fn stories() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("gofe-demo-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = async {
        println!();
        println!("traffic rules");
        canary(&dir).await?;
        rate_limit(&dir).await?;
        health(&dir).await
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn canary_file(v1: SocketAddr, v2: SocketAddr, canary: u32) -> String {
    format!(
        r#"destinations:
  - name: api-v1.demo:80
    endpoints: [{{address: "{v1}"}}]
  - name: api-v2.demo:80
    endpoints: [{{address: "{v2}"}}]
  - name: api.demo:80
    policy:
      routes:
        - name: canary
          backends:
            - {{destination: api-v1.demo:80, weight: {}}}
            - {{destination: api-v2.demo:80, weight: {canary}}}
          sticky: {{cookie: gofe-sticky, ttl: 1h}}
"#,
        100 - canary
    )
}

async fn canary(dir: &std::path::Path) -> anyhow::Result<()> {
    let (v1, v2) = (server("v1").await?, server("v2").await?);
    let file = dir.join("canary.yaml");
    write(&file, &canary_file(v1.addr, v2.addr, 10))?;
    let (proxy, addrs) = sidecar(&[("GOFE_DISCOVERY", format!("file:{}", file.display()))])?;
    let shutdown = proxy.shutdown();
    tokio::spawn(proxy.run());
    let mut conn = connect(addrs.outbound, None).await?;
    // 200 users arrive; each gets a cookie and a version.
    let mut users = Vec::new();
    for _ in 0..200 {
        let (status, version, cookie, _) = get(&mut conn, "api.demo", &[]).await?;
        anyhow::ensure!(status == 200, "{status}");
        let cookie = cookie.unwrap_or_default();
        let pair = cookie.split(';').next().unwrap_or_default().to_string();
        users.push((pair, version));
    }
    // Each calls ten more times: nobody changes version.
    let mut switched = 0;
    for (cookie, version) in &users {
        for _ in 0..10 {
            let (_, v, _, _) = get(&mut conn, "api.demo", &[("cookie", cookie)]).await?;
            switched += usize::from(&v != version);
        }
    }
    let on_v2 = users.iter().filter(|(_, v)| v == "v2").count();
    println!(
        "  1. canary at 10%: {on_v2} of 200 users on api v2; 2,000 more calls, {switched} of them on another version than the user's first"
    );
    write(&file, &canary_file(v1.addr, v2.addr, 50))?;
    let until = Instant::now() + Duration::from_secs(5);
    let mut moved;
    let mut seen_change = false;
    loop {
        moved = Vec::new();
        for (cookie, version) in &users {
            let (_, v, _, _) = get(&mut conn, "api.demo", &[("cookie", cookie)]).await?;
            if &v != version {
                moved.push(v);
            }
        }
        // A pass that began before the reload sees part of the users on the old
        // weights: once any has moved, one more pass sees them all on the new.
        if (!moved.is_empty() && seen_change) || Instant::now() > until {
            break;
        }
        seen_change = !moved.is_empty();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let to_v2 = moved.iter().filter(|v| *v == "v2").count();
    println!(
        "     canary raised to 50% while running: {} users moved, {to_v2} of them to v2 (and {} back to v1); now {} of 200 on v2",
        moved.len(),
        moved.len() - to_v2,
        on_v2 + to_v2
    );
    shutdown.trigger();
    Ok(())
}

async fn rate_limit(dir: &std::path::Path) -> anyhow::Result<()> {
    let app = server("api").await?;
    let file = dir.join("limits.yaml");
    write(
        &file,
        &format!(
            "inbound:\n  - port: {}\n    rate_limit:\n      per_client: {{requests_per_second: 20, burst: 20}}\n",
            app.addr.port()
        ),
    )?;
    let (proxy, addrs) = sidecar(&[
        ("GOFE_POLICY_FILE", file.display().to_string()),
        ("GOFE_INBOUND_DIRECT_TARGET", app.addr.to_string()),
    ])?;
    let shutdown = proxy.shutdown();
    tokio::spawn(proxy.run());
    // Two clients for three seconds: a greedy one at 100/s, a polite one at 10/s.
    let run = |from: &'static str, per_second: u64| async move {
        let mut conn = connect(addrs.inbound, Some(from)).await?;
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / per_second));
        let (mut ok, mut limited, mut retry_after) = (0, 0, None);
        for _ in 0..per_second * 3 {
            tick.tick().await;
            let (status, _, _, retry) = get(&mut conn, "api.demo", &[]).await?;
            match status {
                200 => ok += 1,
                429 => {
                    limited += 1;
                    retry_after = retry_after.or(retry);
                }
                _ => {}
            }
        }
        anyhow::Ok((ok, limited, retry_after))
    };
    let (greedy, polite) = tokio::join!(run("127.0.0.2", 100), run("127.0.0.3", 10));
    let (g_ok, g_limited, g_retry) = greedy?;
    let (p_ok, p_limited, _) = polite?;
    println!(
        "  2. rate limit 20/s per client: greedy client (127.0.0.2, 100/s) {g_ok} ok, {g_limited} got 429 (Retry-After: {}s); polite client (127.0.0.3, 10/s) {p_ok} ok, {p_limited} got 429",
        g_retry.unwrap_or_default()
    );
    shutdown.trigger();
    Ok(())
}

async fn health(dir: &std::path::Path) -> anyhow::Result<()> {
    let (a, b) = (server("a").await?, server("b").await?);
    let file = dir.join("health.yaml");
    write(
        &file,
        &format!(
            r#"destinations:
  - name: api.demo:80
    endpoints: [{{address: "{}"}}, {{address: "{}"}}]
    policy:
      lb: round-robin
      retry_limit: 0
      health_check: {{protocol: http, path: /healthz, interval: 200ms, unhealthy_threshold: 2, healthy_threshold: 2}}
"#,
            a.addr, b.addr
        ),
    )?;
    let (proxy, addrs) = sidecar(&[("GOFE_DISCOVERY", format!("file:{}", file.display()))])?;
    let shutdown = proxy.shutdown();
    tokio::spawn(proxy.run());
    let mut conn = connect(addrs.outbound, None).await?;
    let started = Instant::now();
    let (mut failed, mut on_b_after) = (0, 0);
    let mut left_at = None;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while started.elapsed() < Duration::from_secs(4) {
        tick.tick().await;
        let t = started.elapsed();
        if t >= Duration::from_secs(1) && b.health.load(Ordering::Relaxed) == 200 {
            // b's health check starts failing...
            b.health.store(503, Ordering::Relaxed);
        }
        if t >= Duration::from_secs(2) {
            // ...and a second later b fails everything.
            b.status.store(503, Ordering::Relaxed);
        }
        let (status, by, _, _) = get(&mut conn, "api.demo", &[]).await?;
        failed += usize::from(status != 200);
        if by == "b" && t >= Duration::from_secs(1) {
            on_b_after += 1;
            left_at = None;
        } else if t >= Duration::from_secs(1) && left_at.is_none() {
            left_at = Some(t);
        }
    }
    let left = left_at.map_or("never".to_string(), |t| {
        format!("{} ms", (t - Duration::from_secs(1)).as_millis())
    });
    println!(
        "  3. health check every 200 ms: replica b's /healthz failed at 1.0 s; b left the balancer after {left} ({on_b_after} requests reached it meanwhile); b failed everything from 2.0 s; requests failed: {failed}"
    );
    shutdown.trigger();
    Ok(())
}
