//! Scale benchmark: how `gofe proxy` (as a child process, identity disabled, loopback
//! listeners) grows with worker threads, open connections and known destinations.
//!
//! `cargo bench --bench scale [-- --quick] [-- --binary PATH] [-- --only workers|memory|destinations] [-- --rounds N]`
//!
//! a. Worker threads: requests/s and the proxy's CPU µs per request with
//!    GOFE_WORKER_THREADS=1 and =2, one hop through the inbound listener
//!    (GOFE_INBOUND_DIRECT_TARGET to the origin), h2load HTTP/1.1 (`--h1 -c 32`) and
//!    HTTP/2 (`-c 4 -m 32`). Nothing is pinned: two workers need both CPUs, which h2load
//!    and the origin share with them, so the 2-worker req/s is a lower bound. Both
//!    proxies run at once and the rounds alternate between them (1w, 2w, 1w, 2w, ...);
//!    the medians count.
//! b. Memory per open connection: the proxy's RSS idle, then with 1,000 client
//!    connections open (HTTP/1.1 keep-alive; then, on a fresh proxy, HTTP/2), each
//!    having completed one request and now idle. ΔRSS / 1,000.
//! c. 1,000 destinations × 10 endpoints known to one sidecar (GOFE_DISCOVERY=file:PATH)
//!    against 1 destination × 1 endpoint: RSS, and the proxy's CPU µs per request when a
//!    client (HTTP/1.1 keep-alive, explicit proxy on the outbound listener) cycles its
//!    requests over every destination, or sends them all to the one.
//!
//! In b and c the proxy runs one worker thread pinned to CPU 0, and the benchmark (its
//! clients and the origin) on CPU 1, as in `benches/load.rs`. CPU times are utime +
//! stime from /proc/<pid>/stat (all threads), RSS is VmRSS.

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

struct Settings {
    /// Throughput rounds per configuration, interleaved; the median counts.
    rounds: usize,
    /// h2load requests per round (worker threads).
    requests: u64,
    /// Open connections for the memory figures.
    connections: usize,
    /// Destinations and endpoints per destination of the large discovery file.
    destinations: usize,
    endpoints: usize,
    /// Requests per round of the destinations client, and its connections.
    cycle_requests: u64,
    cycle_connections: usize,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        // `cargo bench --list` / `cargo test --benches`: nothing to enumerate.
        return Ok(());
    }
    let quick = args.iter().any(|a| a == "--quick");
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let binary = arg("--binary").unwrap_or_else(|| env!("CARGO_BIN_EXE_gofe").to_string());
    let only = arg("--only");
    let s = Settings {
        rounds: match arg("--rounds") {
            Some(n) => n
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .context("--rounds N, N > 0")?,
            None if quick => 3,
            None => 5,
        },
        requests: if quick { 50_000 } else { 200_000 },
        connections: 1_000,
        destinations: 1_000,
        endpoints: 10,
        cycle_requests: if quick { 40_000 } else { 100_000 },
        cycle_connections: 16,
    };
    if which("h2load").is_none() {
        bail!("h2load is not installed (Debian: nghttp2-client)");
    }
    raise_fd_limit()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = cpus >= 2;
    let dir = std::env::temp_dir().join(format!("gofe-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let want = |what: &str| only.as_deref().is_none_or(|o| o == what);

    let mut out = header(&args, &binary, quick, cpus);
    let mut failures = Vec::new();
    if want("workers") {
        match workers(&binary, &s) {
            Ok(t) => out.push_str(&t),
            Err(e) => failures.push(format!("worker threads: {e:#}")),
        }
    }
    // From here on the benchmark (its clients, the origin it starts) keeps to CPU 1 and
    // each proxy to CPU 0.
    if pinned {
        let mut set = nix::sched::CpuSet::new();
        set.set(1)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if want("memory") {
        match rt.block_on(memory(&binary, &s, pinned)) {
            Ok(t) => out.push_str(&t),
            Err(e) => failures.push(format!("memory per connection: {e:#}")),
        }
    }
    if want("destinations") {
        match rt.block_on(destinations(&binary, &s, &dir, pinned)) {
            Ok(t) => out.push_str(&t),
            Err(e) => failures.push(format!("destinations: {e:#}")),
        }
    }
    for f in &failures {
        let _ = writeln!(out, "**Not measured**: {f}\n");
    }
    let _ = writeln!(
        out,
        "(the whole run took {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    println!("{out}");
    let _ = std::fs::remove_dir_all(&dir);
    if !failures.is_empty() {
        bail!("{} part(s) not measured", failures.len());
    }
    Ok(())
}

/// The soft limit of open files up to the hard one: 1,000 client connections and the
/// origin's side of the proxy's live in this process.
fn raise_fd_limit() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(())
}

fn header(args: &[String], binary: &str, quick: bool, cpus: usize) -> String {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned))
        })
        .unwrap_or_default();
    // `cargo bench` passes `--bench` to the binary; the rest is what the user gave.
    let given: Vec<&str> = args
        .iter()
        .skip(1)
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    let command = if given.is_empty() {
        "cargo bench --bench scale".to_string()
    } else {
        format!("cargo bench --bench scale -- {}", given.join(" "))
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Scale: {date}, commit {commit}{}\n",
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "`{command}`{} — binary `{binary}`, {cpus} CPUs ({cpu})\n",
        if quick { " (quick)" } else { "" }
    );
    out
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The origin: answers every request with a small body, HTTP/1.1 or HTTP/2, on a
/// thread and runtime of its own (the benchmark blocks its main thread on h2load).
/// The thread inherits the caller's CPU affinity. Bound to `ip` (0.0.0.0 reaches it
/// on every loopback address).
fn start_origin(ip: IpAddr) -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0))?;
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

/// A GET to a local admin endpoint: status and body.
fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .context("status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A proxy process under test, killed when dropped.
struct Proxy {
    child: Child,
    admin: SocketAddr,
    inbound: SocketAddr,
    outbound: SocketAddr,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// The proxy's own PID: through `taskset`, the child is exec'd in place.
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cpu(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.pid())
    }

    fn rss(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid())
    }
}

/// `gofe proxy` with identity disabled, its listeners on free loopback ports, the
/// inbound listener forwarding to `origin`, and `extra` variables; on CPU `cpu` if given.
/// Returns once /ready answers 200.
fn gofe_proxy(
    bin: &str,
    origin: SocketAddr,
    cpu: Option<usize>,
    extra: &[(&str, String)],
) -> anyhow::Result<Proxy> {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let outbound = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut c = match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string(), bin]);
            c
        }
        None => Command::new(bin),
    };
    c.arg("proxy")
        .env("GOFE_INBOUND_LISTEN", inbound.to_string())
        .env("GOFE_OUTBOUND_LISTEN", outbound.to_string())
        .env("GOFE_ADMIN_LISTEN", admin.to_string())
        .env("GOFE_INBOUND_DIRECT_TARGET", origin.to_string())
        // No iptables here: the proxy's own UID does not matter.
        .env("GOFE_PROXY_UID", nix::unistd::getuid().as_raw().to_string())
        .env("GOFE_IDENTITY_DISABLED", "true")
        .env("GOFE_LOG", "warn");
    for (k, v) in extra {
        c.env(k, v);
    }
    let child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("gofe proxy")?;
    let proxy = Proxy {
        child,
        admin,
        inbound,
        outbound,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(admin_get(admin, "/ready"), Ok((200, _))) {
        if Instant::now() > deadline {
            bail!("gofe proxy did not become ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(proxy)
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs h2load (unpinned); returns requests per second and how many succeeded.
fn h2load(proto: Proto, addr: SocketAddr, authority: &str, n: u64) -> anyhow::Result<(f64, u64)> {
    let mut cmd = Command::new("h2load");
    let n = n.to_string();
    match proto {
        Proto::H1 => cmd.args(["--h1", "-c", "32", "-m", "1"]),
        Proto::H2 => cmd.args(["-c", "4", "-m", "32"]),
    };
    // `:authority` becomes the Host header in HTTP/1.1.
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
    // h2load counts any complete response as succeeded: the status codes too.
    let ok_2xx = text
        .lines()
        .find_map(|l| l.strip_prefix("status codes: "))
        .and_then(|l| l.split(", ").next())
        .and_then(|p| p.trim_end_matches(" 2xx").parse::<u64>().ok())
        .unwrap_or(succeeded);
    Ok((rps, succeeded.min(ok_2xx)))
}

/// a. One and two worker threads, one hop (inbound listener), unpinned.
fn workers(bin: &str, s: &Settings) -> anyhow::Result<String> {
    let origin = start_origin(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    let mut proxies = Vec::new();
    for threads in [1usize, 2] {
        let p = gofe_proxy(
            bin,
            origin,
            None,
            &[("GOFE_WORKER_THREADS", threads.to_string())],
        )?;
        proxies.push((threads, p));
    }
    let authority = origin.to_string();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### a. Worker threads (one hop: h2load → gofe inbound → origin)\n\n\
         Nothing pinned: the proxy, h2load and the origin share the same 2 CPUs, so the \
         2-worker req/s is a lower bound. Median of {} interleaved rounds (1w, 2w, 1w, \
         2w, ...) of {} requests after a 5,000-request warm-up; HTTP/1.1: h2load --h1 \
         -c 32; HTTP/2: h2load -c 4 -m 32. *Cores used* = req/s × CPU µs/req.\n",
        s.rounds, s.requests
    );
    let _ = writeln!(
        out,
        "| protocol | GOFE_WORKER_THREADS | req/s | proxy CPU µs/req | proxy cores used | failed | RSS after, MiB |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for proto in [Proto::H1, Proto::H2] {
        let mut rps = vec![Vec::new(); proxies.len()];
        let mut cpu = vec![Vec::new(); proxies.len()];
        let mut failed = vec![0u64; proxies.len()];
        for (_, p) in &proxies {
            h2load(proto, p.inbound, &authority, 5_000)?;
        }
        for round in 0..s.rounds {
            for (i, (threads, p)) in proxies.iter().enumerate() {
                eprintln!("== workers {} {threads}w round {}", proto.name(), round + 1);
                let before = p.cpu()?;
                let (r, done) = h2load(proto, p.inbound, &authority, s.requests)?;
                let after = p.cpu()?;
                rps[i].push(r);
                cpu[i].push((after - before) * 1e6 / done.max(1) as f64);
                failed[i] += s.requests - done;
            }
        }
        for (i, (threads, p)) in proxies.iter().enumerate() {
            let r = median(rps[i].clone());
            let c = median(cpu[i].clone());
            let _ = writeln!(
                out,
                "| {} | {threads} | {r:.0} | {c:.1} | {:.2} | {} | {:.1} |",
                proto.name(),
                r * c / 1e6,
                failed[i],
                p.rss()? as f64 / 1024.0
            );
        }
    }
    let _ = writeln!(out);
    Ok(out)
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TokioIo<tokio::net::TcpStream>> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(TokioIo::new(s))
}

/// A client connection kept open (its sender; the connection task runs on its own).
enum Open {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// Opens a connection to `addr`, sends one GET naming `authority`, reads the response
/// to the end and returns the connection, idle.
async fn open_one(proto: Proto, addr: SocketAddr, authority: &str) -> anyhow::Result<Open> {
    match proto {
        Proto::H1 => {
            let (mut tx, conn) =
                hyper::client::conn::http1::handshake(connect(addr).await?).await?;
            tokio::spawn(conn);
            let req = Request::get("/")
                .header("host", authority)
                .body(Empty::new())?;
            let rsp = tx.send_request(req).await?;
            let status = rsp.status();
            rsp.into_body().collect().await?;
            if status != StatusCode::OK {
                bail!("status {status}");
            }
            Ok(Open::H1(tx))
        }
        Proto::H2 => {
            let (mut tx, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), connect(addr).await?)
                    .await?;
            tokio::spawn(conn);
            let req = Request::get(format!("http://{authority}/")).body(Empty::new())?;
            let rsp = tx.send_request(req).await?;
            let status = rsp.status();
            rsp.into_body().collect().await?;
            if status != StatusCode::OK {
                bail!("status {status}");
            }
            Ok(Open::H2(tx))
        }
    }
}

/// b. RSS idle and with 1,000 idle client connections open, per protocol, each on a
/// fresh proxy (one worker thread, pinned).
async fn memory(bin: &str, s: &Settings, pinned: bool) -> anyhow::Result<String> {
    let origin = start_origin(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    let authority = origin.to_string();
    let n = s.connections;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### b. Memory per open client connection (gofe inbound → origin)\n\n\
         A fresh proxy per protocol (GOFE_WORKER_THREADS=1{}); 20 warm-up connections of one \
         request each, closed; *idle* RSS; then {n} client connections opened one after the \
         other, each completing one GET (200) and left open and idle (the proxy's \
         upstream pool to the origin stays at one connection: the requests do not \
         overlap); RSS 1 s later. KiB per connection = ΔRSS / {n}.\n",
        if pinned { ", on CPU 0" } else { "" }
    );
    let _ = writeln!(
        out,
        "| protocol | idle RSS, KiB | RSS with {n} open, KiB | ΔRSS, KiB | KiB per connection |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for proto in [Proto::H1, Proto::H2] {
        eprintln!("== memory {}", proto.name());
        let p = gofe_proxy(
            bin,
            origin,
            pinned.then_some(0),
            &[("GOFE_WORKER_THREADS", "1".into())],
        )?;
        for _ in 0..20 {
            drop(open_one(proto, p.inbound, &authority).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = p.rss()?;
        let mut open = Vec::with_capacity(n);
        for i in 0..n {
            open.push(
                open_one(proto, p.inbound, &authority)
                    .await
                    .with_context(|| format!("connection {i}"))?,
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let full = p.rss()?;
        // Still open, all of them: the proxy has not closed any meanwhile.
        let live = open
            .iter()
            .filter(|o| match o {
                Open::H1(tx) => !tx.is_closed(),
                Open::H2(tx) => !tx.is_closed(),
            })
            .count();
        if live != n {
            bail!("{} of {n} connections closed before measuring", n - live);
        }
        let delta = full as i64 - idle as i64;
        let _ = writeln!(
            out,
            "| {} | {idle} | {full} | {delta} | {:.1} |",
            proto.name(),
            delta as f64 / n as f64
        );
        drop(open);
        drop(p);
    }
    let _ = writeln!(out);
    Ok(out)
}

/// A discovery file of `dests` destinations `svc-N.bench:80`, each with `endpoints`
/// endpoints 127.0.0.1..127.0.0.`endpoints` on `port`.
fn discovery_file(path: &Path, dests: usize, endpoints: usize, port: u16) -> anyhow::Result<()> {
    let mut y = String::from("destinations:\n");
    for d in 0..dests {
        let _ = writeln!(y, "  - name: svc-{d}.bench:80\n    endpoints:");
        for e in 1..=endpoints {
            let _ = writeln!(y, "      - address: 127.0.0.{e}:{port}");
        }
    }
    std::fs::write(path, y)?;
    Ok(())
}

/// Sends `n` GETs over `conns` HTTP/1.1 keep-alive connections to the outbound
/// listener at `addr`, the i-th naming `svc-(i mod dests).bench:80`. Fails unless
/// every response is a 200. Returns requests per second.
async fn cycle(addr: SocketAddr, dests: usize, conns: usize, n: u64) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(connect(addr).await?).await?;
        tokio::spawn(conn);
        let next = next.clone();
        tasks.spawn(async move {
            let mut bad = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let host = format!("svc-{}.bench:80", i % dests as u64);
                let req = Request::get("/").header("host", host).body(Empty::new())?;
                tx.ready().await?;
                let rsp = tx.send_request(req).await?;
                if rsp.status() != StatusCode::OK {
                    bad += 1;
                }
                rsp.into_body().collect().await?;
            }
            anyhow::Ok(bad)
        });
    }
    let mut bad = 0;
    while let Some(r) = tasks.join_next().await {
        bad += r??;
    }
    let rps = n as f64 / start.elapsed().as_secs_f64();
    if bad > 0 {
        bail!("{bad} of {n} responses were not 200");
    }
    Ok(rps)
}

/// What /endpoints says: destinations from the file, and their endpoints in all.
fn known(p: &Proxy) -> anyhow::Result<(usize, usize)> {
    let (status, body) = admin_get(p.admin, "/endpoints")?;
    if status != 200 {
        bail!("/endpoints: {status}");
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("/endpoints JSON")?;
    let dests = v["destinations"].as_array().context("destinations")?;
    let from_file: Vec<&serde_json::Value> = dests
        .iter()
        .filter(|d| d["source"].as_str().is_some_and(|s| s.starts_with("file")))
        .collect();
    let endpoints = from_file
        .iter()
        .map(|d| d["endpoints"].as_array().map_or(0, |e| e.len()))
        .sum();
    Ok((from_file.len(), endpoints))
}

/// c. A sidecar knowing 1,000 destinations × 10 endpoints against one knowing 1 × 1.
async fn destinations(bin: &str, s: &Settings, dir: &Path, pinned: bool) -> anyhow::Result<String> {
    // On every address: the endpoints are 127.0.0.1..127.0.0.10.
    let origin = start_origin(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let port = origin.port();
    let local_origin = SocketAddr::from(([127, 0, 0, 1], port));
    let (nd, ne) = (s.destinations, s.endpoints);
    let big = dir.join("destinations-big.yaml");
    let small = dir.join("destinations-small.yaml");
    discovery_file(&big, nd, ne, port)?;
    discovery_file(&small, 1, 1, port)?;
    let cases = [
        (format!("{nd} × {ne}"), big, nd, nd * ne),
        ("1 × 1".to_string(), small, 1, 1),
    ];
    let mut live = Vec::new();
    for (name, path, dests, endpoints) in &cases {
        eprintln!("== destinations: starting {name}");
        let p = gofe_proxy(
            bin,
            local_origin,
            pinned.then_some(0),
            &[
                ("GOFE_WORKER_THREADS", "1".into()),
                ("GOFE_DISCOVERY", format!("file:{}", path.display())),
            ],
        )?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ready_rss = p.rss()?;
        live.push((name, p, *dests, *endpoints, ready_rss));
    }
    // Warm-up: every destination 10 times over, then check they are all known with
    // every endpoint, from the file.
    for (name, p, dests, endpoints, _) in &live {
        eprintln!("== destinations: warm-up {name}");
        cycle(
            p.outbound,
            *dests,
            s.cycle_connections,
            (10 * nd).max(5_000) as u64,
        )
        .await
        .with_context(|| format!("{name} warm-up"))?;
        let (d, e) = known(p)?;
        if d != *dests || e != *endpoints {
            bail!(
                "{name}: /endpoints shows {d} destinations from the file with {e} endpoints, \
                 expected {dests} with {endpoints}"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut warm_rss = Vec::new();
    for (_, p, ..) in &live {
        warm_rss.push(p.rss()?);
    }
    let mut rps = vec![Vec::new(); live.len()];
    let mut cpu = vec![Vec::new(); live.len()];
    // RSS after each round: does it level off, or grow with the requests served?
    let mut rss = vec![Vec::new(); live.len()];
    for round in 0..s.rounds {
        for (i, (name, p, dests, ..)) in live.iter().enumerate() {
            eprintln!("== destinations {name} round {}", round + 1);
            let before = p.cpu()?;
            let r = cycle(p.outbound, *dests, s.cycle_connections, s.cycle_requests)
                .await
                .with_context(|| format!("{name} round {}", round + 1))?;
            let after = p.cpu()?;
            rps[i].push(r);
            cpu[i].push((after - before) * 1e6 / s.cycle_requests as f64);
            rss[i].push(p.rss()? as f64 / 1024.0);
        }
    }
    // Still every destination known after the runs.
    for (name, p, dests, endpoints, _) in &live {
        let (d, e) = known(p)?;
        if d != *dests || e != *endpoints {
            bail!("{name}: after the runs /endpoints shows {d} destinations, {e} endpoints");
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### c. {nd} destinations × {ne} endpoints known to one sidecar\n\n\
         GOFE_DISCOVERY=file:PATH with {nd} destinations `svc-N.bench:80` × {ne} static \
         endpoints (127.0.0.1..127.0.0.{ne}, one origin port on 0.0.0.0; the addresses \
         repeat across destinations, so the proxy's connection pools, which are per \
         endpoint address, number {ne}, not {}) against 1 × 1; \
         GOFE_WORKER_THREADS=1{}. A client of this benchmark sends GETs over {} \
         HTTP/1.1 keep-alive connections to the outbound listener (explicit proxy, Host \
         `svc-N.bench:80`), the i-th request to destination i mod {nd} (or all to the \
         one); every response is checked to be 200. Warm-up: {} requests, then \
         `/endpoints` is checked to list every destination from the file with all its \
         endpoints (it does: {} and {} endpoints in all, and 1 with 1). Median of {} \
         interleaved rounds of {} requests. RSS *at ready*: the file read, no destination \
         used yet; *after use*: every destination used (its balancer and state made).\n",
        nd * ne,
        if pinned {
            ", proxy on CPU 0, client and origin on CPU 1"
        } else {
            ""
        },
        s.cycle_connections,
        (10 * nd).max(5_000),
        nd,
        nd * ne,
        s.rounds,
        s.cycle_requests
    );
    let _ = writeln!(
        out,
        "| discovery file | RSS at ready, MiB | RSS after use, MiB | RSS at end, MiB | req/s | proxy CPU µs/req |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for (i, (name, p, _, _, ready)) in live.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {name} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} |",
            *ready as f64 / 1024.0,
            warm_rss[i] as f64 / 1024.0,
            p.rss()? as f64 / 1024.0,
            median(rps[i].clone()),
            median(cpu[i].clone())
        );
    }
    let _ = writeln!(out);
    for (i, (name, ..)) in live.iter().enumerate() {
        let each: Vec<String> = rss[i].iter().map(|m| format!("{m:.1}")).collect();
        let _ = writeln!(
            out,
            "RSS after each round ({name}), MiB: {}  ",
            each.join(", ")
        );
    }
    let _ = writeln!(out);
    Ok(out)
}
