//! What traffic rules cost per request: a route match, a weighted split (sticky and
//! not), a rate-limit check (everyone's bucket, and a client's own), each alone in a
//! tight loop; then, in the same run, whole requests through a `gofe proxy` in this
//! process (explicit proxy mode, HTTP/1.1 keep-alive, one at a time) to a destination
//! without rules (the plain path) and to destinations with a route, a split and a rate
//! limit, so the differences show what each adds to a request.
//!
//! `cargo bench --bench rules [-- --quick]`

use bytes::Bytes;
use gofe_proxy::config::file::Table;
use gofe_proxy::metrics::Metrics;
use gofe_proxy::policy::rate::{ClientKey, Limiter, now_nanos};
use gofe_proxy::route::routes::Routes;
use gofe_proxy::route::split::{self, Choice};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const ROUTES: &str = r#"
destinations:
  - name: api.bench:80
    policy:
      routes:
        - {name: root, match: {path: {prefix: /}}}
        - {name: shop, match: {path: {prefix: /shop}}}
        - {name: cart, match: {path: {prefix: /shop/cart}}}
        - {name: cart-exact, match: {path: {exact: /shop/cart}}}
        - {name: items, match: {path: {regex: "/shop/items/[0-9]+"}}}
        - {name: cart-post, match: {path: {prefix: /shop/cart}, method: POST}}
        - {name: gold, match: {path: {prefix: /shop/cart}, headers: {x-tier: {exact: gold}}}}
        - {name: beta, match: {path: {prefix: /shop/cart}, headers: {x-tier: {regex: "gold|silver"}, x-beta: {present: true}}}}
        - {name: debug, match: {path: {prefix: /shop/cart}, headers: {x-tier: {exact: gold}}, query: {debug: {exact: "1"}}}}
        - {name: api, match: {path: {prefix: /api}, headers: {x-user: {present: true}}}}
"#;

/// Nanoseconds per call of `f`, the best of three runs of `n` calls.
fn per_call(n: u64, mut f: impl FnMut(u64)) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            for i in 0..n {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .fold(f64::MAX, f64::min)
}

fn micro(n: u64) -> Vec<(&'static str, f64)> {
    let table = Table::parse(ROUTES, &HashMap::new()).expect("the routes parse");
    let policy = &table.destinations.values().next().expect("one").policy;
    let routes = Routes::new(&"api.bench:80".into(), &policy.rules, &Metrics::new());
    let req = http::Request::get("/shop/cart/1?debug=1")
        .header("x-tier", "gold")
        .header("user-agent", "bench")
        .header("accept", "*/*")
        .body(())
        .expect("a request");
    let miss = http::Request::get("/nothing/here")
        .body(())
        .expect("a request");
    let mut out = vec![
        (
            "route match (10 routes, the 1st in precedence matches)",
            per_call(n, |_| {
                black_box(routes.pick(black_box(&req)));
            }),
        ),
        (
            "route match (10 routes, only the last, `/`, matches)",
            per_call(n, |_| {
                black_box(routes.pick(black_box(&miss)));
            }),
        ),
    ];
    let backends = [
        Choice {
            name: "api-v1.bench:80",
            weight: 90,
            ready: true,
        },
        Choice {
            name: "api-v2.bench:80",
            weight: 10,
            ready: true,
        },
    ];
    out.push((
        "split, weighted draw (2 backends)",
        per_call(n, |_| {
            black_box(split::pick(black_box(&backends), None));
        }),
    ));
    out.push((
        "split, sticky: hash the cookie + rendezvous (2 backends)",
        per_call(n, |i| {
            let key = split::hash(&[&i.to_be_bytes()]);
            black_box(split::pick(black_box(&backends), Some(key)));
        }),
    ));
    let limit: gofe_proxy::config::rules::RateLimit =
        serde_yaml::from_str("{requests_per_second: 1e9, burst: 1000000}").expect("a limit");
    let total = Limiter::new(&limit);
    out.push((
        "rate-limit check, one bucket for everyone",
        per_call(n, |_| {
            black_box(total.check(None, now_nanos()).is_ok());
        }),
    ));
    let per_client: gofe_proxy::config::rules::RateLimit = serde_yaml::from_str(
        "{requests_per_second: 1e9, burst: 1000000, per_client: {requests_per_second: 1e9, burst: 1000000}}",
    )
    .expect("a limit");
    let clients = Limiter::new(&per_client);
    let keys: Vec<ClientKey> = (0..1000u32)
        .map(|i| ClientKey::Ip(std::net::IpAddr::from(i.to_be_bytes())))
        .collect();
    out.push((
        "rate-limit check, client's bucket (1,000 clients) + everyone's",
        per_call(n, |i| {
            let k = &keys[(i % 1000) as usize];
            black_box(clients.check(Some(k), now_nanos()).is_ok());
        }),
    ));
    out
}

async fn origin() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"0123456789abcdef0123456789abcdef"),
                    )))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Microseconds per request through the proxy to `host`, the best of three runs of
/// `n` requests one at a time on one keep-alive connection.
async fn through(proxy: SocketAddr, host: &str, path: &str, n: u32) -> f64 {
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..n {
            let req = http::Request::get(path)
                .header("host", host)
                .header("cookie", "gofe-sticky=user-42")
                .body(Empty::<Bytes>::new())
                .expect("a request");
            tx.ready().await.expect("ready");
            let rsp = tx.send_request(req).await.expect("a response");
            assert_eq!(rsp.status(), 200, "{host}");
            rsp.into_body().collect().await.expect("a body");
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e6 / f64::from(n));
    }
    best
}

async fn whole(n: u32) -> Vec<(&'static str, f64)> {
    let origin = origin().await;
    let dir = std::env::temp_dir().join(format!("gofe-bench-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let file = dir.join("destinations.yaml");
    std::fs::write(
        &file,
        format!(
            r#"destinations:
  - name: plain.bench:80
    endpoints: [{{address: "{origin}"}}]
  - name: v1.bench:80
    endpoints: [{{address: "{origin}"}}]
  - name: v2.bench:80
    endpoints: [{{address: "{origin}"}}]
  - name: routed.bench:80
    endpoints: [{{address: "{origin}"}}]
    policy:
      routes:
{routes}        - {{name: last, match: {{path: {{prefix: /}}}}}}
  - name: split.bench:80
    endpoints: [{{address: "{origin}"}}]
    policy:
      routes:
        - name: canary
          backends: [{{destination: v1.bench:80, weight: 90}}, {{destination: v2.bench:80, weight: 10}}]
          sticky: {{cookie: gofe-sticky}}
  - name: limited.bench:80
    endpoints: [{{address: "{origin}"}}]
    policy:
      rate_limit: {{requests_per_second: 1e9, burst: 1000000}}
"#,
            routes = (0..9)
                .map(|i| format!(
                    "        - {{name: r{i}, match: {{path: {{prefix: /r{i}}}, headers: {{x-r{i}: {{present: true}}}}}}}}\n"
                ))
                .collect::<String>()
        ),
    )
    .expect("the file");
    let vars: HashMap<String, String> = [
        ("GOFE_OUTBOUND_LISTEN", "127.0.0.1:0".to_string()),
        ("GOFE_INBOUND_LISTEN", "127.0.0.1:0".to_string()),
        ("GOFE_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
        ("GOFE_IDENTITY_DISABLED", "true".to_string()),
        ("GOFE_LOG", "warn".to_string()),
        ("GOFE_DISCOVERY", format!("file:{}", file.display())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = gofe_proxy::config::Config::from_map(&vars).expect("a configuration");
    let proxy = gofe_proxy::Proxy::bind(config).expect("the proxy binds");
    let addr = proxy.addrs().outbound;
    let shutdown = proxy.shutdown();
    tokio::spawn(proxy.run());
    // Warm up every destination (discovery, pools).
    for host in [
        "plain.bench",
        "routed.bench",
        "split.bench",
        "limited.bench",
    ] {
        through(addr, host, "/", 200).await;
    }
    let mut out = Vec::new();
    // Interleaved, three rounds, the best of each.
    let mut best = [f64::MAX; 4];
    for _ in 0..3 {
        for (i, host) in [
            "plain.bench",
            "routed.bench",
            "split.bench",
            "limited.bench",
        ]
        .into_iter()
        .enumerate()
        {
            best[i] = best[i].min(through(addr, host, "/", n).await);
        }
    }
    out.push(("plain path (no rules)", best[0]));
    out.push(("10 routes, the last matches", best[1]));
    out.push(("a sticky split over 2 backends", best[2]));
    out.push(("a rate limit (never reached)", best[3]));
    shutdown.trigger();
    let _ = std::fs::remove_dir_all(&dir);
    tokio::time::sleep(Duration::from_millis(100)).await;
    out
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 100_000 } else { 2_000_000 };
    println!("| check alone | ns per call |");
    println!("| --- | ---: |");
    for (what, ns) in micro(n) {
        println!("| {what} | {ns:.0} |");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let reqs = if quick { 2_000 } else { 20_000 };
    let rows = rt.block_on(whole(reqs));
    let plain = rows[0].1;
    println!();
    println!(
        "| whole request through the proxy (same run) | µs per request | over the plain path |"
    );
    println!("| --- | ---: | ---: |");
    for (what, us) in rows {
        println!("| {what} | {us:.1} | {:+.1} µs |", us - plain);
    }
}
