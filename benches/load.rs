//! Load benchmark: one hop on loopback, direct vs through `gofe proxy` vs through
//! HAProxy and nginx (when installed), for HTTP/1.1 keep-alive and HTTP/2.
//!
//! `cargo bench --bench load [-- --quick] [-- --out FILE]`
//!
//! With two or more CPUs the proxy under test runs on CPU 0, and the load generator
//! (h2load), the origin and the latency client on CPU 1. "Requests per proxy core" is
//! requests divided by the proxy's own CPU time (utime + stime from /proc), so the
//! figure does not depend on which side saturates first.
//!
//! Per target and protocol it measures:
//! - throughput: h2load at fixed concurrency (HTTP/1.1: 32 connections; HTTP/2: 4
//!   connections x 32 streams), and the proxy's CPU time and memory over that run;
//! - latency: an open-loop client sending at a fixed rate over keep-alive connections
//!   (HTTP/1.1: 16 connections; HTTP/2: one), percentiles from an HdrHistogram of each
//!   request's time from send to the end of the response.

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Direct,
    /// gofe's inbound listener forwarding to the origin (GOFE_INBOUND_DIRECT_TARGET):
    /// the reverse-proxy shape HAProxy and nginx are configured in.
    GofeInbound,
    /// gofe's outbound listener as an explicit proxy, routing by authority.
    GofeOutbound,
    Haproxy,
    Nginx,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::GofeInbound => "gofe (inbound)",
            Target::GofeOutbound => "gofe (outbound, explicit)",
            Target::Haproxy => "HAProxy 1 thread",
            Target::Nginx => "nginx 1 worker",
        }
    }
}

struct Settings {
    requests: u64,
    rate: u64,
    latency_secs: u64,
}

struct Row {
    target: Target,
    proto: Proto,
    rps: f64,
    cpu_us_per_req: Option<f64>,
    rss_kib: Option<u64>,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    note: String,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        // `cargo bench --list` / `cargo test --benches`: nothing to enumerate.
        return Ok(());
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let settings = if quick {
        Settings {
            requests: 40_000,
            rate: 1000,
            latency_secs: 3,
        }
    } else {
        Settings {
            requests: 300_000,
            rate: 2000,
            latency_secs: 10,
        }
    };
    if which("h2load").is_none() {
        bail!("h2load is not installed (Debian: nghttp2-client)");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = cpus >= 2;
    if pinned {
        let mut set = nix::sched::CpuSet::new();
        set.set(1)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    }
    let dir = std::env::temp_dir().join(format!("gofe-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let origin = start_origin()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    let mut targets = vec![Target::Direct, Target::GofeInbound, Target::GofeOutbound];
    if which("haproxy").is_some() {
        targets.push(Target::Haproxy);
    }
    if which("nginx").is_some() {
        targets.push(Target::Nginx);
    }
    for proto in [Proto::H1, Proto::H2] {
        for &target in &targets {
            eprintln!("== {} {}", target.name(), proto.name());
            match rt.block_on(measure(target, proto, origin, &dir, &settings, pinned)) {
                Ok(row) => rows.push(row),
                Err(e) => eprintln!("!! {} {} not measured: {e:#}", target.name(), proto.name()),
            }
        }
    }
    let report = report(&rows, &settings, pinned, quick);
    println!("{report}");
    if let Some(out) = out {
        std::fs::write(&out, &report)?;
        eprintln!("wrote {}", out.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The origin: answers every request with a small body, HTTP/1.1 or HTTP/2, on a
/// thread and runtime of its own (the benchmark blocks its main thread on h2load).
fn start_origin() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("origin listener");
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"hello from the benchmark origin\n",
                        ))))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        })
    });
    Ok(addr)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A proxy process under test, killed when dropped.
struct Proxy {
    child: Child,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pinned_command(program: &str, pinned: bool) -> Command {
    if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", program]);
        c
    } else {
        Command::new(program)
    }
}

fn start_proxy(
    target: Target,
    proto: Proto,
    origin: SocketAddr,
    dir: &Path,
    pinned: bool,
) -> anyhow::Result<Option<(Proxy, SocketAddr)>> {
    let port = free_port()?;
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = match target {
        Target::Direct => return Ok(None),
        Target::GofeInbound | Target::GofeOutbound => {
            let mut c = pinned_command(env!("CARGO_BIN_EXE_gofe"), pinned);
            let (inbound, outbound) = if target == Target::GofeInbound {
                (port, free_port()?)
            } else {
                (free_port()?, port)
            };
            c.arg("proxy")
                .env("GOFE_INBOUND_LISTEN", format!("127.0.0.1:{inbound}"))
                .env("GOFE_OUTBOUND_LISTEN", format!("127.0.0.1:{outbound}"))
                .env("GOFE_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()?))
                .env("GOFE_INBOUND_DIRECT_TARGET", origin.to_string())
                .env("GOFE_LOG", "warn");
            c
        }
        Target::Haproxy => {
            let (bind_proto, server_proto) = match proto {
                Proto::H1 => ("", ""),
                Proto::H2 => (" proto h2", " proto h2"),
            };
            let cfg = format!(
                "global\n  nbthread 1\n  maxconn 4000\n\
                 defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n\
                 frontend fe\n  bind {listen}{bind_proto}\n  default_backend be\n\
                 backend be\n  server origin {origin}{server_proto}\n"
            );
            let path = dir.join("haproxy.cfg");
            std::fs::write(&path, cfg)?;
            let mut c = pinned_command("haproxy", pinned);
            c.args(["-db", "-f"]).arg(&path);
            c
        }
        Target::Nginx => {
            let http2 = if proto == Proto::H2 { " http2" } else { "" };
            let d = dir.display();
            let cfg = format!(
                "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
                 events {{ worker_connections 20000; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                   fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                   upstream origin {{ server {origin}; keepalive 256; keepalive_requests 100000000; }}\n\
                   server {{\n    listen {listen}{http2};\n    location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n"
            );
            let path = dir.join("nginx.conf");
            std::fs::write(&path, cfg)?;
            let mut c = pinned_command("nginx", pinned);
            c.args(["-e", &format!("{d}/nginx-error.log"), "-c"])
                .arg(&path);
            c
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", target.name()))?;
    let proxy = Proxy { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).is_err() {
        if Instant::now() > deadline {
            bail!("{} did not listen on {listen}", target.name());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some((proxy, listen)))
}

/// CPU seconds (user + system) of `pid`, all threads, from /proc.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

/// The proxy's own PID: through `taskset`, the child is exec'd in place.
fn pid_of(proxy: &Proxy) -> u32 {
    proxy.child.id()
}

async fn measure(
    target: Target,
    proto: Proto,
    origin: SocketAddr,
    dir: &Path,
    s: &Settings,
    pinned: bool,
) -> anyhow::Result<Row> {
    let started = start_proxy(target, proto, origin, dir, pinned)?;
    let (proxy, addr) = match &started {
        Some((p, a)) => (Some(p), *a),
        None => (None, origin),
    };
    let authority = origin.to_string();
    // Warm up: connections, pools, caches.
    h2load(proto, addr, &authority, 5_000, pinned)?;

    let cpu_before = proxy.map(|p| cpu_seconds(pid_of(p))).transpose()?;
    let (rps, done) = h2load(proto, addr, &authority, s.requests, pinned)?;
    let cpu_after = proxy.map(|p| cpu_seconds(pid_of(p))).transpose()?;
    let cpu_us_per_req = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) => Some((a - b) * 1e6 / done as f64),
        _ => None,
    };
    let rss = proxy.map(|p| rss_kib(pid_of(p))).transpose()?;

    let hist = latency(
        proto,
        addr,
        &authority,
        s.rate,
        Duration::from_secs(s.latency_secs),
    )
    .await?;
    let q = |v: f64| hist.value_at_quantile(v) as f64;
    let note = if done < s.requests {
        format!("{} of {} requests failed", s.requests - done, s.requests)
    } else {
        String::new()
    };
    Ok(Row {
        target,
        proto,
        rps,
        cpu_us_per_req,
        rss_kib: rss,
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        p999: q(0.999),
        note,
    })
}

/// Runs h2load; returns requests per second and how many succeeded.
fn h2load(
    proto: Proto,
    addr: SocketAddr,
    authority: &str,
    n: u64,
    pinned: bool,
) -> anyhow::Result<(f64, u64)> {
    let mut cmd = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "1", "h2load"]);
        c
    } else {
        Command::new("h2load")
    };
    let n = n.to_string();
    match proto {
        Proto::H1 => cmd.args(["--h1", "-c", "32", "-m", "1"]),
        Proto::H2 => cmd.args(["-c", "4", "-m", "32"]),
    };
    // `:authority` becomes the Host header in HTTP/1.1 (a `host:` header would be sent
    // besides h2load's own).
    cmd.args(["-H", &format!(":authority: {authority}")]);
    cmd.args(["-n", &n, "-T", "60"])
        .arg(format!("http://{addr}/"));
    let out = cmd.output().context("h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.trim_end_matches(" req/s").parse::<f64>().ok())
        .with_context(|| format!("h2load output: {text}"))?;
    let succeeded = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(", ").find(|p| p.ends_with(" succeeded")))
        .and_then(|p| p.trim_end_matches(" succeeded").parse::<u64>().ok())
        .with_context(|| format!("h2load output: {text}"))?;
    Ok((rps, succeeded))
}

enum Sender {
    H1(
        Arc<tokio::sync::Mutex<Vec<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>>>,
        Arc<tokio::sync::Semaphore>,
    ),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TokioIo<tokio::net::TcpStream>> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(TokioIo::new(s))
}

/// Sends `rate` requests a second for `duration`, each timed from its send to the end
/// of its response, in microseconds.
async fn latency(
    proto: Proto,
    addr: SocketAddr,
    authority: &str,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Histogram<u64>> {
    const H1_CONNECTIONS: usize = 16;
    let sender = match proto {
        Proto::H1 => {
            let mut conns = Vec::new();
            for _ in 0..H1_CONNECTIONS {
                let (tx, conn) =
                    hyper::client::conn::http1::handshake(connect(addr).await?).await?;
                tokio::spawn(conn);
                conns.push(tx);
            }
            Sender::H1(
                Arc::new(tokio::sync::Mutex::new(conns)),
                Arc::new(tokio::sync::Semaphore::new(H1_CONNECTIONS)),
            )
        }
        Proto::H2 => {
            let (tx, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), connect(addr).await?)
                    .await?;
            tokio::spawn(conn);
            Sender::H2(tx)
        }
    };
    let sender = Arc::new(sender);
    let hist = Arc::new(parking_lot::Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let total = rate * duration.as_secs();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..total {
        tick.tick().await;
        let (sender, hist, errors) = (sender.clone(), hist.clone(), errors.clone());
        let uri = format!("http://{authority}/");
        tasks.spawn(async move {
            let result = async {
                let start;
                match &*sender {
                    Sender::H1(conns, sem) => {
                        let _permit = sem.acquire().await?;
                        let mut tx = conns.lock().await.pop().context("a free connection")?;
                        let host = uri["http://".len()..].trim_end_matches('/');
                        let req = Request::get("/").header("host", host).body(Empty::new())?;
                        start = Instant::now();
                        tx.ready().await?;
                        let rsp = tx.send_request(req).await?;
                        rsp.into_body().collect().await?;
                        let elapsed = start.elapsed();
                        conns.lock().await.push(tx);
                        anyhow::Ok(elapsed)
                    }
                    Sender::H2(tx) => {
                        let mut tx = tx.clone();
                        let req = Request::get(&uri).body(Empty::new())?;
                        start = Instant::now();
                        let rsp = tx.send_request(req).await?;
                        rsp.into_body().collect().await?;
                        Ok(start.elapsed())
                    }
                }
            }
            .await;
            match result {
                Ok(d) => hist.lock().saturating_record((d.as_micros() as u64).max(1)),
                Err(_) => {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let errors = errors.load(std::sync::atomic::Ordering::Relaxed);
    if errors > 0 {
        bail!("{errors} of {total} latency requests failed");
    }
    let h = hist.lock().clone();
    Ok(h)
}

fn report(rows: &[Row], s: &Settings, pinned: bool, quick: bool) -> String {
    let mut out = String::new();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned))
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "Run {date}: `cargo bench --bench load{}` on {cpu}",
        if quick { " -- --quick" } else { "" }
    );
    let _ = writeln!(
        out,
        "({}; {} requests per throughput run; latency at {} req/s for {}s)\n",
        if pinned {
            "proxy pinned to CPU 0, h2load + origin + latency client to CPU 1"
        } else {
            "one CPU: nothing pinned, CPU figures are still the proxy's own"
        },
        s.requests,
        s.rate,
        s.latency_secs
    );
    for proto in [Proto::H1, Proto::H2] {
        let set: Vec<&Row> = rows.iter().filter(|r| r.proto == proto).collect();
        let direct = set.iter().find(|r| r.target == Target::Direct);
        let haproxy = set.iter().find(|r| r.target == Target::Haproxy);
        let _ = writeln!(out, "**{}**\n", proto.name());
        let _ = writeln!(
            out,
            "| target | req/s | × direct | proxy CPU µs/req | req/s per proxy core | × HAProxy per core | p50 µs | p90 µs | p99 µs | p99.9 µs | RSS MiB | note |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for r in &set {
            let per_core = r.cpu_us_per_req.map(|us| 1e6 / us);
            let vs_direct = direct.map(|d| r.rps / d.rps);
            let vs_haproxy = match (per_core, haproxy.and_then(|h| h.cpu_us_per_req)) {
                (Some(p), Some(h)) => Some(p / (1e6 / h)),
                _ => None,
            };
            let f = |v: Option<f64>, prec: usize| {
                v.map_or("–".to_string(), |v| format!("{v:.prec$}"))
            };
            let _ = writeln!(
                out,
                "| {} | {:.0} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
                r.target.name(),
                r.rps,
                f(vs_direct, 2),
                f(r.cpu_us_per_req, 1),
                f(per_core, 0),
                f(vs_haproxy, 2),
                r.p50,
                r.p90,
                r.p99,
                r.p999,
                r.rss_kib
                    .map_or("–".to_string(), |k| format!("{:.1}", k as f64 / 1024.0)),
                r.note
            );
        }
        let _ = writeln!(out);
    }
    out
}
