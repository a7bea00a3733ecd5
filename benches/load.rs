//! Load benchmark: one hop on loopback, direct vs through `gofe proxy` vs through
//! HAProxy and nginx (when installed), for HTTP/1.1 keep-alive and HTTP/2.
//!
//! `cargo bench --bench load [-- --quick] [-- --out FILE] [-- --baseline GOFE_BINARY]
//! [-- --binary GOFE_BINARY]`
//!
//! With `--baseline`, an earlier build of gofe is measured beside this one, on the
//! same targets and interleaved with them: a before/after in one run.
//!
//! With two or more CPUs the proxy under test runs on CPU 0, and the load generator
//! (h2load), the origin and the latency client on CPU 1. "Requests per proxy core" is
//! requests divided by the proxy's own CPU time (utime + stime from /proc), so the
//! figure does not depend on which side saturates first.
//!
//! Two hops: a client sidecar and a server sidecar, as in a mesh. gofe over mTLS
//! (issued by a real `gofe identity`) and in plaintext, against two HAProxy instances
//! with mutual TLS between them; the CPU and memory are both proxies' together.
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
    /// Client sidecar (outbound, explicit) to server sidecar (inbound) over mTLS.
    GofeTwoHopMtls,
    /// The same with identity disabled: plaintext between the sidecars.
    GofeTwoHopPlain,
    /// Two HAProxy instances (1 thread each), mutual TLS between them.
    HaproxyTwoHopMtls,
    /// The same gofe targets with the binary `--baseline` names (an earlier build),
    /// measured in the same run: before and after.
    BaselineInbound,
    BaselineOutbound,
    BaselineTwoHopMtls,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::GofeInbound => "gofe (inbound)",
            Target::GofeOutbound => "gofe (outbound, explicit)",
            Target::Haproxy => "HAProxy 1 thread",
            Target::Nginx => "nginx 1 worker",
            Target::GofeTwoHopMtls => "gofe → gofe, mTLS",
            Target::GofeTwoHopPlain => "gofe → gofe, plaintext",
            Target::HaproxyTwoHopMtls => "HAProxy → HAProxy, mTLS",
            Target::BaselineInbound => "baseline gofe (inbound)",
            Target::BaselineOutbound => "baseline gofe (outbound, explicit)",
            Target::BaselineTwoHopMtls => "baseline gofe → gofe, mTLS",
        }
    }

    fn two_hop(self) -> bool {
        matches!(
            self,
            Target::GofeTwoHopMtls
                | Target::GofeTwoHopPlain
                | Target::HaproxyTwoHopMtls
                | Target::BaselineTwoHopMtls
        )
    }
}

struct Settings {
    /// Throughput runs per target, interleaved across targets; the median counts.
    rounds: usize,
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
            rounds: 1,
            requests: 40_000,
            rate: 1000,
            latency_secs: 3,
        }
    } else {
        Settings {
            rounds: 3,
            requests: 200_000,
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
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let baseline = args
        .iter()
        .position(|a| a == "--baseline")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    // `--binary`: another build measured as "gofe" (a PGO build: benches/pgo.sh).
    let binary = args
        .iter()
        .position(|a| a == "--binary")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_gofe")), PathBuf::from);
    let env = Env {
        binary,
        baseline: baseline.clone(),
        origin,
        dir: dir.clone(),
        pinned,
        issuer: start_issuer(&dir, pinned)?,
    };
    let mut rows = Vec::new();
    let mut targets = vec![Target::Direct];
    if only.as_deref() != Some("two-hop") {
        targets.extend([Target::GofeInbound, Target::GofeOutbound]);
        if baseline.is_some() {
            targets.extend([Target::BaselineInbound, Target::BaselineOutbound]);
        }
        if which("haproxy").is_some() {
            targets.push(Target::Haproxy);
        }
        if which("nginx").is_some() {
            targets.push(Target::Nginx);
        }
    }
    if only.as_deref() != Some("one-hop") {
        targets.extend([Target::GofeTwoHopMtls, Target::GofeTwoHopPlain]);
        if baseline.is_some() {
            targets.push(Target::BaselineTwoHopMtls);
        }
        if which("haproxy").is_some() {
            targets.push(Target::HaproxyTwoHopMtls);
        }
    }
    for proto in [Proto::H1, Proto::H2] {
        match rt.block_on(measure(&targets, proto, &env, &settings)) {
            Ok(r) => rows.extend(r),
            Err(e) => eprintln!("!! {} not measured: {e:#}", proto.name()),
        }
    }
    // The command as given (cargo adds `--bench` to a bench's arguments).
    let given: Vec<&str> = args[1..]
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    let report = report(&rows, &settings, pinned, &given.join(" "));
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

/// What every measurement shares.
struct Env {
    /// The gofe under test: this build's, or `--binary`'s.
    binary: PathBuf,
    /// An earlier gofe binary, measured beside this one.
    baseline: Option<PathBuf>,
    origin: SocketAddr,
    dir: PathBuf,
    pinned: bool,
    issuer: Issuer,
}

/// A `gofe identity` for the gofe sidecars' certificates (on the load generator's CPU).
struct Issuer {
    addr: SocketAddr,
    _process: Proxy,
}

fn start_issuer(dir: &Path, pinned: bool) -> anyhow::Result<Issuer> {
    let gofe = env!("CARGO_BIN_EXE_gofe");
    let issuer_dir = dir.join("issuer");
    let out = Command::new(gofe)
        .args(["identity", "--bootstrap"])
        .arg(&issuer_dir)
        .output()?;
    if !out.status.success() {
        bail!(
            "gofe identity --bootstrap: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write(dir.join("token"), "bench")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut cmd = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "1", gofe]);
        c
    } else {
        Command::new(gofe)
    };
    cmd.arg("identity")
        .arg("--issuer-dir")
        .arg(&issuer_dir)
        .args(["--insecure-dev", "--listen", &addr.to_string()])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port()?)])
        .env("GOFE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let process = Proxy {
        child: cmd.spawn().context("gofe identity")?,
    };
    wait_listening(addr, "gofe identity")?;
    Ok(Issuer {
        addr,
        _process: process,
    })
}

fn wait_listening(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A GET to a local admin endpoint: status and body.
fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
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

/// What a target is while it runs: its processes, where clients connect, and the
/// authority requests carry.
struct Running {
    processes: Vec<Proxy>,
    entry: SocketAddr,
    authority: String,
    /// gofe sidecars' admin servers, to check afterwards how traffic went.
    admins: Vec<SocketAddr>,
}

/// A gofe sidecar: its env and where its listeners are.
fn gofe_sidecar(
    env: &Env,
    bin: &str,
    outbound: u16,
    inbound: u16,
    name: Option<&str>,
) -> anyhow::Result<(Proxy, SocketAddr)> {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut c = pinned_command(bin, env.pinned);
    c.arg("proxy")
        .env("GOFE_INBOUND_LISTEN", format!("127.0.0.1:{inbound}"))
        .env("GOFE_OUTBOUND_LISTEN", format!("127.0.0.1:{outbound}"))
        .env("GOFE_ADMIN_LISTEN", admin.to_string())
        .env("GOFE_INBOUND_DIRECT_TARGET", env.origin.to_string())
        // No iptables here: the proxy's own UID does not matter.
        .env("GOFE_PROXY_UID", nix::unistd::getuid().as_raw().to_string())
        .env("GOFE_LOG", "warn");
    match name {
        Some(name) => {
            c.env("GOFE_IDENTITY_ADDR", env.issuer.addr.to_string())
                .env(
                    "GOFE_IDENTITY_NAME",
                    format!("spiffe://cluster.local/ns/bench/sa/{name}"),
                )
                .env("GOFE_IDENTITY_TRUST_ANCHORS", env.dir.join("issuer/ca.crt"))
                .env("GOFE_IDENTITY_TOKEN_FILE", env.dir.join("token"));
        }
        None => {
            c.env("GOFE_IDENTITY_DISABLED", "true");
        }
    }
    let proxy = Proxy {
        child: c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("gofe proxy")?,
    };
    // Ready means listening and, with identity, holding a certificate: traffic sent
    // before that would find no mTLS.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(admin_get(admin, "/ready"), Ok((200, _))) {
        if Instant::now() > deadline {
            bail!("gofe proxy did not become ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((proxy, admin))
}

/// Certificates for two HAProxy instances with mutual TLS: a CA, a server certificate
/// for the second and a client certificate for the first, each PEM with its key.
fn haproxy_certs(dir: &Path) -> anyhow::Result<()> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "gofe bench HAProxy CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    std::fs::write(dir.join("haproxy-ca.pem"), ca_cert.pem())?;
    for (name, eku) in [
        ("haproxy-b", rcgen::ExtendedKeyUsagePurpose::ServerAuth),
        ("haproxy-a", rcgen::ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()])?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &issuer)?;
        std::fs::write(
            dir.join(format!("{name}.pem")),
            format!("{}{}", cert.pem(), key.serialize_pem()),
        )?;
    }
    Ok(())
}

fn start_target(target: Target, proto: Proto, env: &Env) -> anyhow::Result<Option<Running>> {
    let origin = env.origin;
    let dir = env.dir.as_path();
    let pinned = env.pinned;
    let port = free_port()?;
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let single = |processes: Vec<Proxy>, admins: Vec<SocketAddr>| Running {
        processes,
        entry: listen,
        authority: origin.to_string(),
        admins,
    };
    let this = env
        .binary
        .to_str()
        .context("a gofe binary's path in UTF-8")?;
    let baseline = env
        .baseline
        .as_ref()
        .and_then(|b| b.to_str())
        .unwrap_or(this);
    let mut cmd = match target {
        Target::Direct => return Ok(None),
        Target::GofeInbound | Target::BaselineInbound => {
            let bin = if target == Target::GofeInbound {
                this
            } else {
                baseline
            };
            let (p, admin) = gofe_sidecar(env, bin, free_port()?, port, None)?;
            return Ok(Some(single(vec![p], vec![admin])));
        }
        Target::GofeOutbound | Target::BaselineOutbound => {
            let bin = if target == Target::GofeOutbound {
                this
            } else {
                baseline
            };
            let (p, admin) = gofe_sidecar(env, bin, port, free_port()?, None)?;
            return Ok(Some(single(vec![p], vec![admin])));
        }
        Target::GofeTwoHopMtls | Target::GofeTwoHopPlain | Target::BaselineTwoHopMtls => {
            let mtls = target != Target::GofeTwoHopPlain;
            let bin = if target == Target::BaselineTwoHopMtls {
                baseline
            } else {
                this
            };
            let server_inbound = free_port()?;
            let (server, server_admin) = gofe_sidecar(
                env,
                bin,
                free_port()?,
                server_inbound,
                mtls.then_some("server"),
            )?;
            let (client, client_admin) =
                gofe_sidecar(env, bin, port, free_port()?, mtls.then_some("client"))?;
            // The client names the server sidecar's inbound listener as its authority;
            // the client sidecar routes by it, the server sidecar forwards to the origin.
            return Ok(Some(Running {
                processes: vec![client, server],
                entry: listen,
                authority: format!("127.0.0.1:{server_inbound}"),
                admins: vec![client_admin, server_admin],
            }));
        }
        Target::HaproxyTwoHopMtls => {
            haproxy_certs(dir)?;
            let b_port = free_port()?;
            let d = dir.display();
            // HTTP/2 between the two for HTTP/2 clients; for HTTP/1.1 clients, HTTP/1.1
            // (h2load 1.52 miscounts the reason-less HTTP/1.1 status lines HAProxy
            // writes for responses that crossed HTTP/2).
            let (bind_proto, server_proto, hop_alpn) = match proto {
                Proto::H1 => ("", "", "http/1.1"),
                Proto::H2 => (" proto h2", " proto h2", "h2"),
            };
            let global = "global\n  nbthread 1\n  maxconn 4000\n\
                 defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n";
            let b = format!(
                "{global}frontend fe\n  bind 127.0.0.1:{b_port} ssl crt {d}/haproxy-b.pem ca-file {d}/haproxy-ca.pem verify required alpn h2,http/1.1\n  default_backend be\n\
                 backend be\n  server origin {origin}{server_proto}\n"
            );
            let a = format!(
                "{global}frontend fe\n  bind {listen}{bind_proto}\n  default_backend be\n\
                 backend be\n  server b 127.0.0.1:{b_port} ssl verify required ca-file {d}/haproxy-ca.pem crt {d}/haproxy-a.pem sni str(haproxy-b) verifyhost haproxy-b alpn {hop_alpn}\n"
            );
            let mut processes = Vec::new();
            for (name, cfg, port) in [("b", b, b_port), ("a", a, port)] {
                let path = dir.join(format!("haproxy-{name}.cfg"));
                std::fs::write(&path, cfg)?;
                let mut c = pinned_command("haproxy", pinned);
                c.args(["-db", "-f"]).arg(&path);
                processes.push(Proxy {
                    child: c
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::inherit())
                        .spawn()
                        .context("haproxy")?,
                });
                wait_listening(SocketAddr::from(([127, 0, 0, 1], port)), "haproxy")?;
            }
            return Ok(Some(single(processes, Vec::new())));
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
    wait_listening(listen, target.name())?;
    Ok(Some(single(vec![proxy], Vec::new())))
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Measures every target for `proto`. All targets run at once (idle ones cost nothing)
/// and the throughput runs go round-robin across them, so that a machine drifting
/// during the run (a VM's neighbours) moves every target's figures alike.
async fn measure(
    targets: &[Target],
    proto: Proto,
    env: &Env,
    s: &Settings,
) -> anyhow::Result<Vec<Row>> {
    struct Live {
        target: Target,
        running: Option<Running>,
        addr: SocketAddr,
        authority: String,
        cpu_us: Vec<f64>,
        rps: Vec<f64>,
        failed: u64,
    }
    let mut live = Vec::new();
    for &target in targets {
        eprintln!("== starting {} ({})", target.name(), proto.name());
        match start_target(target, proto, env) {
            Ok(running) => {
                let (addr, authority) = match &running {
                    Some(r) => (r.entry, r.authority.clone()),
                    None => (env.origin, env.origin.to_string()),
                };
                live.push(Live {
                    target,
                    running,
                    addr,
                    authority,
                    cpu_us: Vec::new(),
                    rps: Vec::new(),
                    failed: 0,
                });
            }
            Err(e) => eprintln!("!! {} {} not measured: {e:#}", target.name(), proto.name()),
        }
    }
    let cpu = |l: &Live| -> anyhow::Result<f64> {
        match &l.running {
            Some(r) => r.processes.iter().map(|p| cpu_seconds(pid_of(p))).sum(),
            None => Ok(0.0),
        }
    };
    for l in &live {
        // Warm up: connections, pools, caches.
        h2load(proto, l.addr, &l.authority, 5_000, env.pinned)?;
    }
    for round in 0..s.rounds {
        for l in &mut live {
            eprintln!(
                "== {} {} round {}",
                l.target.name(),
                proto.name(),
                round + 1
            );
            let before = cpu(l)?;
            let (rps, done) = h2load(proto, l.addr, &l.authority, s.requests, env.pinned)?;
            let after = cpu(l)?;
            l.cpu_us.push((after - before) * 1e6 / done.max(1) as f64);
            l.rps.push(rps);
            l.failed += s.requests - done;
        }
    }
    let mut rows = Vec::new();
    for l in &live {
        let processes = l
            .running
            .as_ref()
            .map(|r| r.processes.as_slice())
            .unwrap_or(&[]);
        let rss = (!processes.is_empty())
            .then(|| {
                processes
                    .iter()
                    .map(|p| rss_kib(pid_of(p)))
                    .sum::<anyhow::Result<u64>>()
            })
            .transpose()?;
        let hist = latency(
            proto,
            l.addr,
            &l.authority,
            s.rate,
            Duration::from_secs(s.latency_secs),
        )
        .await?;
        let q = |v: f64| hist.value_at_quantile(v) as f64;
        let mut note = if l.failed > 0 {
            format!("{} requests failed", l.failed)
        } else {
            String::new()
        };
        // The mTLS figures count only if the sidecars really spoke mTLS throughout.
        if matches!(
            l.target,
            Target::GofeTwoHopMtls | Target::BaselineTwoHopMtls
        ) && let Some(client_admin) = l.running.as_ref().and_then(|r| r.admins.first())
        {
            let (_, metrics) = admin_get(*client_admin, "/metrics")?;
            let outbound = |tls: &str| {
                metrics.lines().any(|line| {
                    line.starts_with("gofe_requests_total{direction=\"outbound\"")
                        && line.contains(tls)
                })
            };
            if outbound("tls=\"false\"") || !outbound("tls=\"true\"") {
                note = format!("{note} NOT ALL mTLS").trim().to_string();
            }
        }
        rows.push(Row {
            target: l.target,
            proto,
            rps: median(l.rps.clone()),
            cpu_us_per_req: (!processes.is_empty()).then(|| median(l.cpu_us.clone())),
            rss_kib: rss,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            note,
        });
    }
    Ok(rows)
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

fn report(rows: &[Row], s: &Settings, pinned: bool, given: &str) -> String {
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
        "Run {date}: `cargo bench --bench load{}{given}` on {cpu}",
        if given.is_empty() { "" } else { " -- " }
    );
    let _ = writeln!(
        out,
        "({}; throughput: median of {} interleaved runs of {} requests per target; latency at {} req/s for {}s)\n",
        if pinned {
            "proxy pinned to CPU 0, h2load + origin + latency client to CPU 1"
        } else {
            "one CPU: nothing pinned, CPU figures are still the proxy's own"
        },
        s.rounds,
        s.requests,
        s.rate,
        s.latency_secs
    );
    for (two_hop, title) in [
        (false, "One hop"),
        (true, "Two hops (client sidecar → server sidecar)"),
    ] {
        for proto in [Proto::H1, Proto::H2] {
            let set: Vec<&Row> = rows
                .iter()
                .filter(|r| {
                    r.proto == proto
                        && (r.target == Target::Direct || r.target.two_hop() == two_hop)
                })
                .collect();
            if set.len() <= 1 {
                continue;
            }
            let direct = set.iter().find(|r| r.target == Target::Direct);
            let reference = if two_hop {
                Target::HaproxyTwoHopMtls
            } else {
                Target::Haproxy
            };
            let haproxy = set.iter().find(|r| r.target == reference);
            let _ = writeln!(out, "**{title}, {}**\n", proto.name());
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
    }
    out
}
