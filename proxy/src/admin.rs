//! The admin server: liveness and readiness for the kubelet, the application's own
//! probes run for it (`/app-health/`), metrics for Prometheus, the effective
//! configuration, and `/shutdown` so that a Job's last container can end the proxy.

use crate::ctx::Ctx;
use crate::metrics::Limit;
use bytes::Bytes;
use gofe_telemetry::prom::Exposition;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{debug, info, trace, warn};

/// Connections the admin server holds at once. A flood cannot lock the kubelet out: at
/// the cap, a new connection from the client address that holds the most is refused at
/// once (a reset, next to no work, so that the accept loop keeps ahead of the flood and
/// the kernel's accept queue never fills and drops the next SYN), and one from any
/// other address takes the place of the oldest connection not being answered (a slow
/// or idle one) of the address holding the most. A flood from one address only ever
/// displaces its own connections, and a probe from elsewhere, sent at once on a fresh
/// connection, is answered.
const MAX_CONNECTIONS: usize = 1024;
/// A request head must arrive within this (admin requests are one line and a few
/// headers), and a connection with none coming is closed after it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections the kernel may hold for the admin server before it accepts them.
const ACCEPT_BACKLOG: i32 = 4096;
/// The admin server's requests are small; so is what a connection may buffer.
const MAX_BUF: usize = 16 * 1024;

/// The admin server's connections, oldest first, and how many each address holds.
#[derive(Default)]
struct Held {
    table: parking_lot::Mutex<Table>,
    next: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Table {
    conns: std::collections::VecDeque<AdminConn>,
    per_source: std::collections::HashMap<IpAddr, usize>,
}

struct AdminConn {
    id: u64,
    source: IpAddr,
    stop: tokio_util::sync::CancellationToken,
    /// A request on it is being answered.
    busy: Arc<AtomicBool>,
}

/// A connection let in: its id, its stop token and busy flag, and whether an idle one
/// was closed to make room for it.
struct Admitted {
    id: u64,
    stop: tokio_util::sync::CancellationToken,
    busy: Arc<AtomicBool>,
    evicted: bool,
}

impl Table {
    fn remove(&mut self, at: usize) -> Option<AdminConn> {
        let c = self.conns.remove(at)?;
        if let Some(n) = self.per_source.get_mut(&c.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&c.source);
            }
        }
        Some(c)
    }

    /// The oldest connection not being answered of the address that holds the most.
    fn victim(&self) -> Option<usize> {
        let (&greediest, _) = self.per_source.iter().max_by_key(|(_, n)| **n)?;
        self.conns
            .iter()
            .position(|c| c.source == greediest && !c.busy.load(Ordering::Acquire))
            .or_else(|| {
                self.conns
                    .iter()
                    .position(|c| !c.busy.load(Ordering::Acquire))
            })
    }
}

impl Held {
    /// Makes room for one more from `source` (closing an idle connection if need be),
    /// or None when it is refused: at the cap, when `source` holds the most, or when
    /// every connection is busy.
    fn admit(&self, source: IpAddr) -> Option<Admitted> {
        let mut table = self.table.lock();
        let mut evicted = false;
        if table.conns.len() >= MAX_CONNECTIONS {
            let mine = table.per_source.get(&source).copied().unwrap_or(0);
            let most = table.per_source.values().copied().max().unwrap_or(0);
            if mine >= most {
                return None;
            }
            let at = table.victim()?;
            if let Some(c) = table.remove(at) {
                c.stop.cancel();
                evicted = true;
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let stop = tokio_util::sync::CancellationToken::new();
        let busy = Arc::new(AtomicBool::new(false));
        table.conns.push_back(AdminConn {
            id,
            source,
            stop: stop.clone(),
            busy: busy.clone(),
        });
        *table.per_source.entry(source).or_default() += 1;
        Some(Admitted {
            id,
            stop,
            busy,
            evicted,
        })
    }

    fn release(&self, id: u64) {
        let mut table = self.table.lock();
        // Ids only grow and connections join at the back: the table is sorted by id.
        // (A connection closed to make room is no longer in it.)
        if let Ok(at) = table.conns.binary_search_by_key(&id, |c| c.id) {
            table.remove(at);
        }
    }
}

/// The admin server on a thread of its own, with a single-threaded runtime of its own:
/// the data plane's load cannot delay the kubelet's probes, and a flood of admin
/// connections costs the data plane nothing (linkerd2-proxy and Envoy keep their admin
/// servers off the request threads too). Serves until the returned guard is dropped.
pub fn start(listeners: Vec<TcpListener>, ctx: Arc<Ctx>) -> std::io::Result<AdminThread> {
    let stop = tokio_util::sync::CancellationToken::new();
    // Listeners move between runtimes as std sockets (registered with no runtime).
    let listeners = listeners
        .into_iter()
        .map(|l| {
            // A deeper accept queue than the data plane's, so that a flood outrunning
            // the accept loop for a moment does not fill it: a full queue drops the
            // next SYN, the kubelet's too, and its retry comes a second later, past the
            // probe's timeout. (Linux takes a second listen() as the new backlog,
            // capped at net.core.somaxconn.)
            let _ = socket2::SockRef::from(&l).listen(ACCEPT_BACKLOG);
            l.into_std()
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let stopped = stop.clone();
    // The runtime is made on its thread: a runtime may not be dropped inside another,
    // which is where this runs, had the spawn failed with it.
    std::thread::Builder::new()
        .name("gofe-admin".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(error) => {
                    tracing::error!(%error, "cannot start the admin server's runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                let mut serving = tokio::task::JoinSet::new();
                for l in listeners {
                    match TcpListener::from_std(l) {
                        Ok(l) => {
                            serving.spawn(serve(l, ctx.clone()));
                        }
                        Err(error) => warn!(%error, "admin listener lost"),
                    }
                }
                stopped.cancelled().await;
            });
        })?;
    Ok(AdminThread {
        _stop: stop.drop_guard(),
    })
}

/// Stops the admin thread when dropped.
pub struct AdminThread {
    _stop: tokio_util::sync::DropGuard,
}

async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    let held = Arc::new(Held::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(error) => {
                ctx.metrics.limit_tripped(Limit::AcceptErrors, "admin");
                warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(Admitted {
            id,
            stop,
            busy,
            evicted,
        }) = held.admit(peer.ip())
        else {
            ctx.metrics.limit_tripped(Limit::AdminConnections, "admin");
            crate::socket::reset(&stream);
            continue;
        };
        if evicted {
            ctx.metrics.limit_tripped(Limit::AdminConnections, "admin");
        }
        let ctx = ctx.clone();
        let held = held.clone();
        // The kubelet probes the pod's address; the application's probes go there too.
        let local = stream.local_addr().ok();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let ctx = ctx.clone();
                let busy = busy.clone();
                async move {
                    busy.store(true, Ordering::Release);
                    let rsp = if req.uri().path() == "/log-level" {
                        log_level(&ctx, peer, req).await
                    } else if let Some(rest) = req.uri().path().strip_prefix(APP_HEALTH) {
                        let rest = rest.to_string();
                        app_health(&ctx, local, &rest, req).await
                    } else {
                        route(&ctx, peer, req)
                    };
                    busy.store(false, Ordering::Release);
                    Ok::<_, Infallible>(rsp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_BUF)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                // What a flood's connections end with (a head never finished, or
                // closed to make room) is counted, not logged one by one: a line per
                // connection would cost the admin thread more than the connection.
                result = conn => match result {
                    Err(error) if error.is_incomplete_message() || error.is_timeout() => {
                        trace!(%peer, %error, "admin connection ended with an error");
                    }
                    Err(error) => debug!(%peer, %error, "admin connection ended with an error"),
                    Ok(()) => {}
                },
                _ = stop.cancelled() => trace!(%peer, "admin connection closed to make room"),
            }
            held.release(id);
        });
    }
}

fn route(ctx: &Ctx, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match (req.uri().path(), get) {
        ("/live", true) => text(StatusCode::OK, "live\n"),
        ("/ready", true) => {
            if ctx.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else if ctx.shutdown.is_triggered() {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
            } else if ctx.listening.load(Ordering::Acquire) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no identity certificate yet\n",
                )
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: starting\n")
            }
        }
        ("/metrics", true) => {
            let mut e = Exposition::new();
            ctx.metrics.render(&mut e);
            ctx.destinations.render(&mut e);
            if let Some(m) = &ctx.identity {
                render_identity(m, &mut e);
            }
            if let Some(t) = &ctx.tracer {
                render_spans(t.counts(), &mut e);
            }
            if ctx.config.access_log {
                e.family(
                    "gofe_access_log_dropped_total",
                    "Access log lines dropped because stdout did not keep up.",
                    gofe_telemetry::prom::Kind::Counter,
                );
                e.sample(
                    "gofe_access_log_dropped_total",
                    &[],
                    gofe_telemetry::access::dropped(),
                );
            }
            gofe_telemetry::process::render(&mut e);
            let mut rsp = Response::new(Full::new(Bytes::from(e.finish())));
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            rsp
        }
        ("/identity", true) => identity(ctx),
        ("/endpoints", true) => json(&ctx.destinations.to_json()),
        ("/config", true) => {
            let mut map: serde_json::Map<String, serde_json::Value> = ctx
                .config
                .effective()
                .into_iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
                .collect();
            // Beside the variables (all GOFE_*): the traffic rules the files and the
            // registry put in force.
            map.insert(
                "traffic_rules".into(),
                ctx.destinations.policies().rules_json(),
            );
            let mut body = serde_json::to_vec_pretty(&map).unwrap_or_default();
            body.push(b'\n');
            let mut rsp = Response::new(Full::new(Bytes::from(body)));
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            rsp
        }
        ("/shutdown", _) if req.method() == Method::POST => {
            if !is_loopback(peer) {
                return text(
                    StatusCode::FORBIDDEN,
                    "shutdown is only accepted from loopback\n",
                );
            }
            info!(%peer, "shutdown requested through the admin server");
            ctx.shutdown.trigger();
            text(StatusCode::OK, "shutting down\n")
        }
        ("/live" | "/ready" | "/metrics" | "/config" | "/identity" | "/endpoints", false)
        | ("/shutdown", _) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

const APP_HEALTH: &str = "/app-health/";

/// `/app-health/<container>/<livez|readyz|startupz>`: runs the application's original
/// probe (GOFE_APP_PROBES) and answers 200 when it passes, 503 with the reason when it
/// fails, so that the kubelet sees the application's health through strict mTLS.
async fn app_health(
    ctx: &Ctx,
    local: Option<SocketAddr>,
    rest: &str,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    use crate::config::ProbeKind;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let probe = rest
        .split_once('/')
        .and_then(|(container, kind)| Some((container, ProbeKind::from_segment(kind)?)))
        .and_then(|(container, kind)| {
            Some((container, kind, ctx.config.app_probes.get(container, kind)?))
        });
    let Some((container, kind, probe)) = probe else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no probe {rest:?} in GOFE_APP_PROBES\n"),
        );
    };
    let host = local.map_or(std::net::IpAddr::from([127, 0, 0, 1]), |a| {
        a.ip().to_canonical()
    });
    let user_agent = req.headers().get(header::USER_AGENT);
    match crate::probes::run(probe, host, user_agent, &*ctx.sockets).await {
        Ok(passed) => {
            debug!(container, probe = %kind, detail = %passed.detail, "application probe passed");
            text(StatusCode::OK, format!("{}\n", passed.detail))
        }
        Err(error) => {
            info!(container, probe = %kind, %error, "application probe failed");
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n"))
        }
    }
}

fn json(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    rsp
}

/// The certificate held: name, validity, next renewal.
fn identity(ctx: &Ctx) -> Response<Full<Bytes>> {
    use gofe_identity::cert::rfc3339;
    let Some(m) = &ctx.identity else {
        return text(
            StatusCode::NOT_FOUND,
            "identity is disabled (GOFE_IDENTITY_DISABLED=true)\n",
        );
    };
    let held = m.store.current();
    let body = serde_json::json!({
        "name": m.name().to_string(),
        "certificate": held.as_ref().map(|h| serde_json::json!({
            "serial": h.info.serial,
            "not_before": rfc3339(h.info.not_before),
            "not_after": rfc3339(h.info.not_after),
        })),
        "next_renewal": m.store.next_renewal().map(rfc3339),
        "trust_anchors": m.anchors.count(),
    });
    let mut rsp = Response::new(Full::new(Bytes::from(format!("{body:#}\n"))));
    if held.is_none() {
        *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    rsp
}

/// `GET /log-level` shows the log filter; `PUT /log-level` with a filter as the body
/// sets it (`info,gofe_proxy=debug`).
async fn log_level(ctx: &Ctx, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    const MAX_FILTER: usize = 4096;
    let Some(handle) = ctx.log.get() else {
        return text(
            StatusCode::NOT_FOUND,
            "this process's log filter cannot be changed from here\n",
        );
    };
    match *req.method() {
        Method::GET | Method::HEAD => text(StatusCode::OK, format!("{}\n", handle.current())),
        Method::PUT if !is_loopback(peer) => text(
            StatusCode::FORBIDDEN,
            "the log filter is only changed from loopback\n",
        ),
        Method::PUT => {
            let body = http_body_util::Limited::new(req.into_body(), MAX_FILTER);
            let filter = match body.collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return text(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "a log filter is at most 4096 bytes\n",
                    );
                }
            };
            let Ok(filter) = std::str::from_utf8(&filter) else {
                return text(StatusCode::BAD_REQUEST, "the log filter is not UTF-8\n");
            };
            match handle.set(filter.trim()) {
                Ok(()) => {
                    info!(
                        filter = filter.trim(),
                        "log filter changed through the admin server"
                    );
                    text(StatusCode::OK, format!("{}\n", filter.trim()))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
    }
}

fn render_spans(c: &gofe_telemetry::trace::SpanCounts, e: &mut Exposition) {
    use gofe_telemetry::prom::Kind;
    e.family(
        "gofe_trace_spans_total",
        "Spans for GOFE_TRACE_COLLECTOR by kind (request: a proxied request's; operation: the proxy's own work, such as a certificate request) and by what became of them: queued for export, dropped (the export queue was full), exported, or failed (the collector refused them or did not answer).",
        Kind::Counter,
    );
    for (result, all, ops) in [
        ("queued", &c.all.queued, &c.operations.queued),
        ("dropped", &c.all.dropped, &c.operations.dropped),
        ("exported", &c.all.exported, &c.operations.exported),
        ("failed", &c.all.failed, &c.operations.failed),
    ] {
        let (all, ops) = (all.get(), ops.get());
        e.sample(
            "gofe_trace_spans_total",
            &[("kind", "request"), ("result", result)],
            all.saturating_sub(ops),
        );
        e.sample(
            "gofe_trace_spans_total",
            &[("kind", "operation"), ("result", result)],
            ops,
        );
    }
}

fn render_identity(m: &crate::identity::ProxyIdentity, e: &mut Exposition) {
    use gofe_telemetry::prom::Kind;
    if let Some(h) = m.store.current() {
        let expiry = h
            .info
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        e.family(
            "gofe_identity_cert_expiry_timestamp_seconds",
            "When the certificate in use expires, in seconds since the epoch.",
            Kind::Gauge,
        );
        e.sample("gofe_identity_cert_expiry_timestamp_seconds", &[], expiry);
    }
    e.family(
        "gofe_identity_renewals_total",
        "Certificate requests to the issuer, by result.",
        Kind::Counter,
    );
    e.sample(
        "gofe_identity_renewals_total",
        &[("result", "ok")],
        m.store.renewals_ok.get(),
    );
    e.sample(
        "gofe_identity_renewals_total",
        &[("result", "error")],
        m.store.renewals_failed.get(),
    );
}

fn is_loopback(peer: SocketAddr) -> bool {
    match peer {
        SocketAddr::V4(a) => a.ip().is_loopback(),
        SocketAddr::V6(a) => {
            a.ip().is_loopback() || a.ip().to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(body.into()));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_greediest_address_is_refused_and_others_displace_it() {
        let held = Held::default();
        let (flood, kubelet): (IpAddr, IpAddr) =
            ("10.0.0.9".parse().unwrap(), "10.0.0.1".parse().unwrap());
        let first: Vec<Admitted> = (0..MAX_CONNECTIONS)
            .map(|_| held.admit(flood).expect("room below the cap"))
            .collect();
        assert!(first.iter().all(|a| !a.evicted));
        // The flood's next one is refused, at once.
        assert!(held.admit(flood).is_none());
        // The kubelet's takes the place of the flood's oldest idle one.
        let probe = held.admit(kubelet).expect("room for another address");
        assert!(probe.evicted);
        assert!(first[0].stop.is_cancelled(), "the oldest made room");
        assert!(!first[1].stop.is_cancelled());
        // Busy connections are not displaced: the next idle one is.
        first[1].busy.store(true, Ordering::Release);
        let again = held.admit(kubelet).expect("room for another address");
        assert!(again.evicted);
        assert!(!first[1].stop.is_cancelled(), "busy: kept");
        assert!(first[2].stop.is_cancelled());
        // A connection that ends leaves the table (found by id, in id order).
        held.release(first[5].id);
        held.release(first[0].id); // already gone: nothing happens
        let table = held.table.lock();
        assert_eq!(table.conns.len(), MAX_CONNECTIONS - 1);
        assert!(table.conns.iter().all(|c| c.id != first[5].id));
        assert_eq!(table.per_source[&kubelet], 2);
        assert_eq!(table.per_source[&flood], MAX_CONNECTIONS - 3);
    }
}
