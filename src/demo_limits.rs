//! `gofe demo`, limits: a flood held off while traffic flows. A sidecar on loopback
//! (its inbound listener in front of an application, at most 200 connections, request
//! heads within 2 s) meets 400 slowloris connections, each sending half a request head
//! and then a byte every half second, while a polite client keeps calling over its four
//! keep-alive connections. The flood takes every free connection slot and holds each
//! only until its head is late; the polite client's requests all succeed, and the
//! sidecar's metrics say which bounds held and how often.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The cap and the head timeout the story's sidecar runs with.
const MAX_CONNECTIONS: usize = 200;
const HEAD_TIMEOUT: &str = "2s";
const FLOOD: usize = 400;
/// The polite client: this many keep-alive connections, a request on each every
/// `POLITE_EVERY`, for `RUN`.
const POLITE_CONNECTIONS: usize = 4;
const POLITE_EVERY: Duration = Duration::from_millis(40);
const RUN: Duration = Duration::from_secs(5);

pub async fn story() -> anyhow::Result<()> {
    let app = crate::demo_rules::server("app").await?;
    let (proxy, addrs) = crate::demo_rules::sidecar(&[
        ("GOFE_INBOUND_DIRECT_TARGET", app.addr.to_string()),
        ("GOFE_MAX_CONNECTIONS", MAX_CONNECTIONS.to_string()),
        ("GOFE_HTTP_HEADER_READ_TIMEOUT", HEAD_TIMEOUT.to_string()),
    ])?;
    let shutdown = proxy.shutdown();
    let running = tokio::spawn(proxy.run());
    println!();
    println!("limits: a flood held off while traffic flows");
    println!(
        "  {FLOOD} slowloris connections (half a head, then a byte every 500 ms) against a sidecar \
         capped at {MAX_CONNECTIONS} connections, heads due within {HEAD_TIMEOUT}"
    );
    let result = flood_and_serve(addrs.inbound, addrs.admin).await;
    shutdown.trigger();
    let _ = running.await;
    result
}

async fn flood_and_serve(inbound: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
    // The polite client's connections are open before the flood, as a pod's are.
    let mut polite = Vec::new();
    for _ in 0..POLITE_CONNECTIONS {
        polite.push(crate::demo_rules::connect(inbound, None).await?);
    }
    let started = Instant::now();
    let flood: Vec<_> = (0..FLOOD)
        .map(|_| tokio::spawn(slowloris(inbound, started + RUN)))
        .collect();
    let calls = polite.into_iter().map(|mut conn| {
        tokio::spawn(async move {
            let (mut ok, mut failed, mut slowest) = (0u32, 0u32, Duration::ZERO);
            let mut tick = tokio::time::interval(POLITE_EVERY);
            while started.elapsed() < RUN {
                tick.tick().await;
                let sent = Instant::now();
                match crate::demo_rules::get(&mut conn, "app.demo", &[]).await {
                    Ok((200, ..)) => ok += 1,
                    _ => failed += 1,
                }
                slowest = slowest.max(sent.elapsed());
            }
            (ok, failed, slowest)
        })
    });
    let (mut ok, mut failed, mut slowest) = (0, 0, Duration::ZERO);
    for c in calls {
        let (o, f, s) = c.await?;
        (ok, failed, slowest) = (ok + o, failed + f, slowest.max(s));
    }
    let mut refused = 0;
    for f in flood {
        refused += usize::from(!f.await?);
    }
    let metrics = scrape(admin).await?;
    let tripped = |limit: &str| {
        sample(
            &metrics,
            &format!("gofe_limits_tripped_total{{limit=\"{limit}\",at=\"inbound\"}}"),
        )
    };
    println!(
        "  polite client: {ok} of {} requests OK during the flood, slowest {:.1} ms",
        ok + failed,
        slowest.as_secs_f64() * 1e3
    );
    println!(
        "  sidecar: {} flood connections closed at once at the cap (limit=\"connections\"), {} \
         closed for a late head (limit=\"header_read_timeout\"); {refused} of {FLOOD} attackers \
         saw their connection closed",
        tripped("connections"),
        tripped("header_read_timeout"),
    );
    println!(
        "  open inbound connections after the flood: {}",
        sample(&metrics, "gofe_tcp_connections_open{direction=\"inbound\"}")
    );
    Ok(())
}

/// One slowloris connection: half a request head, then a byte every half second until
/// the sidecar closes it (true) or `until` (false).
async fn slowloris(to: SocketAddr, until: Instant) -> bool {
    let Ok(mut s) = TcpStream::connect(to).await else {
        return true;
    };
    if s.write_all(b"GET / HTTP/1.1\r\nHost: app.demo\r\nX-a: ")
        .await
        .is_err()
    {
        return true;
    }
    let mut buf = [0u8; 512];
    while Instant::now() < until {
        tokio::select! {
            r = s.read(&mut buf) => {
                // Closed, or answered (408) and then closed.
                if matches!(r, Ok(0) | Err(_)) {
                    return true;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if s.write_all(b"a").await.is_err() {
                    return true;
                }
            }
        }
    }
    false
}

/// The admin server's metrics, as Prometheus reads them.
async fn scrape(admin: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: admin\r\n\r\n")
        .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    Ok(text)
}

/// The value of one sample (`name{labels}` as written), 0 when absent.
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
