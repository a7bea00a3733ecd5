//! `gofe demo`: a small mesh on this machine, without root. A client sends a steady
//! stream to `web`; each of web's requests calls `api`, which runs as three replicas.
//! Every service is behind its own gofe sidecar:
//!
//! ```text
//! client ─▶ [web sidecar] ─▶ web ─HTTP/2─▶ [web sidecar] ═mTLS═▶ [api-1 sidecar] ─▶ api-1  healthy
//!                                                        ═mTLS═▶ [api-2 sidecar] ─▶ api-2  fails 70%
//!                                                        ═mTLS═▶ [api-3 sidecar] ─▶ api-3  25 ms slower
//! ```
//!
//! Without iptables, the sidecars are reached directly: each inbound listener forwards
//! to its application (GOFE_INBOUND_DIRECT_TARGET) and `web` sends its calls for
//! `api.demo` to its sidecar's outbound listener as an explicit proxy. The web sidecar
//! learns api's three endpoints, and the identity they must present, from a discovery
//! file, and applies its policy: retries on 5xx, outlier ejection, P2C over peak-EWMA
//! latency. An embedded issuer (`gofe identity`, in development mode) gives each
//! sidecar a SPIFFE identity with a short lifetime, so renewals show too. Every second
//! the demo prints what the client saw, the retries that saved requests, and how api's
//! traffic spread over its replicas; ejections and returns as they happen; Ctrl-C or
//! `--duration` drains the sidecars and prints a summary: each sidecar's latency
//! quantiles from its histograms, and one request's trace across both hops as a
//! waterfall. Every sidecar makes spans (web passes the trace context on, as an
//! instrumented application does); with GOFE_TRACE_COLLECTOR set they are exported
//! there too (Jaeger, say).
//!
//! With an `etcd` binary on the PATH (Debian: etcd-server), the demo runs one on
//! loopback and the mesh uses it as its registry and config center: the api replicas
//! register themselves, a fourth one as a `gofe proxy` process of its own that is
//! killed (kill -9) a few seconds in, so that its lease expires; web's sidecar finds
//! api there and gets its policy pushed from there, and a policy change is pushed live.
//!
//! Then three traffic-rules stories (`demo_rules`): a canary rollout with sticky users,
//! a client over its rate limit, and a replica whose health check fails; and the limits
//! (`demo_limits`): a slowloris flood held off while a polite client's requests flow.

use anyhow::Context;
use bytes::Bytes;
use gofe_proxy::config::{self, Config};
use gofe_proxy::metrics::Metrics;
use gofe_proxy::{Proxy, addrs::Direction};
use hdrhistogram::Histogram;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Stop after this long (e.g. 30s); without it, run until Ctrl-C.
    #[arg(long, value_parser = config::parse_nonzero_duration)]
    pub duration: Option<Duration>,
    /// Requests per second the client sends.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,
    /// First of the 30 ports the demo listens on, all on 127.0.0.1.
    #[arg(long, default_value_t = 7400)]
    pub port_base: u16,
}

/// The registered replicas' lease TTL: short, so that a killed one's expiry shows soon.
const DEMO_REGISTER_TTL: &str = "3s";

/// etcd on loopback, for as long as the demo runs.
struct EtcdProcess {
    child: std::process::Child,
    url: String,
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Starts etcd on 127.0.0.1 (client `port`, peer `port + 1`), its data in `dir`, and
/// waits until it answers.
async fn start_etcd(
    bin: &std::path::Path,
    port: u16,
    dir: &std::path::Path,
) -> anyhow::Result<EtcdProcess> {
    let url = format!("http://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{}", port + 1);
    let log = std::fs::File::create(dir.join("etcd.log"))?;
    let child = std::process::Command::new(bin)
        .args([
            "--name=demo",
            &format!("--data-dir={}", dir.join("etcd").display()),
            &format!("--listen-client-urls={url}"),
            &format!("--advertise-client-urls={url}"),
            &format!("--listen-peer-urls={peer}"),
            &format!("--initial-advertise-peer-urls={peer}"),
            &format!("--initial-cluster=demo={peer}"),
        ])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let etcd = EtcdProcess { child, url };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let up = async {
            let mut c = etcd_client::Client::connect([etcd.url.clone()], None).await?;
            c.status().await
        };
        if tokio::time::timeout(Duration::from_secs(2), up)
            .await
            .is_ok_and(|r| r.is_ok())
        {
            return Ok(etcd);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "etcd did not start (see {})",
            dir.join("etcd.log").display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pushes `text` (a policy file) into the registry, checked by the proxy's parser
/// first, as `gofe registry apply` does.
async fn push_policy(url: &str, text: &str) -> anyhow::Result<()> {
    let docs = gofe_proxy::config::registry::split_policy_file(text, &HashMap::new())?;
    let mut c = etcd_client::Client::connect([url], None).await?;
    for (dest, doc) in docs {
        c.put(format!("/gofe/policy/{dest}"), doc, None).await?;
    }
    Ok(())
}

/// The web sidecar's policy for api, as a policy document (`lb` as given).
fn api_policy(lb: &str) -> String {
    let file = discovery_file(&[]);
    let policy = &file[file.find("    policy:").expect("a policy section")..];
    format!(
        "destinations:\n  - name: {API_DESTINATION}\n{}",
        policy.replace("lb: ewma", &format!("lb: {lb}"))
    )
}

/// Client connections; enough for the rate at a few milliseconds per request.
const CLIENT_CONNECTIONS: usize = 8;

#[derive(Clone, Copy)]
struct SidecarPorts {
    outbound: u16,
    inbound: u16,
    admin: u16,
}

struct Sidecar {
    name: &'static str,
    /// The spans this sidecar made, as its exporter got them.
    spans: gofe_telemetry::trace::LocalSpans,
    ports: SidecarPorts,
    metrics: Arc<Metrics>,
    destinations: Arc<gofe_proxy::route::destinations::Destinations>,
    mesh: Arc<gofe_proxy::identity::ProxyIdentity>,
    shutdown: gofe_proxy::Shutdown,
    done: tokio::task::JoinHandle<()>,
    /// The serial of the certificate last reported.
    serial: parking_lot::Mutex<Option<String>>,
}

/// Short-lived certificates, so that a renewal shows in a short run (renewed at ~70%).
const DEMO_CERT_LIFETIME: Duration = Duration::from_secs(30);

/// The name web calls api by; the web sidecar's discovery file lists its endpoints.
const API_AUTHORITY: &str = "api.demo";
const API_DESTINATION: &str = "api.demo:80";

/// How each api replica behaves.
#[derive(Clone, Copy)]
struct Behaviour {
    /// Percent of requests answered 503.
    fail_percent: u64,
    /// Added to every request.
    extra_delay: Duration,
    what: &'static str,
}

const REPLICAS: [(&str, Behaviour); 3] = [
    (
        "api-1",
        Behaviour {
            fail_percent: 0,
            extra_delay: Duration::ZERO,
            what: "healthy",
        },
    ),
    (
        "api-2",
        Behaviour {
            fail_percent: 70,
            extra_delay: Duration::ZERO,
            what: "fails 70% of its requests (503)",
        },
    ),
    (
        "api-3",
        Behaviour {
            fail_percent: 0,
            extra_delay: Duration::from_millis(25),
            what: "healthy, 25 ms slower",
        },
    ),
];

/// The web sidecar's view of api: the replicas' sidecars, the identity they must
/// present, and the policy that keeps api's failures from reaching web.
fn discovery_file(replica_inbound: &[u16]) -> String {
    let mut y = format!("destinations:\n  - name: {API_DESTINATION}\n");
    if !replica_inbound.is_empty() {
        y += "    endpoints:\n";
    }
    for port in replica_inbound {
        y += &format!(
            "      - address: {}\n        identity: {}\n",
            local(*port),
            spiffe("api")
        );
    }
    y += "    policy:\n";
    for (k, v) in [
        ("retry_on", "5xx"),
        ("retry_limit", "2"),
        ("lb", "ewma"),
        ("outlier_consecutive_5xx", "5"),
        ("outlier_base_ejection", "5s"),
        ("outlier_max_ejection", "20s"),
        ("per_try_timeout", "1s"),
        ("request_timeout", "3s"),
    ] {
        y += &format!("      {k}: {v}\n");
    }
    y
}

/// Where the embedded issuer is and what the sidecars need to reach it.
struct Identity {
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

fn spiffe(name: &str) -> String {
    format!("spiffe://cluster.local/ns/demo/sa/{name}")
}

/// Starts the embedded issuer: a fresh trust anchor and issuer in a temporary
/// directory, development mode (any token), short lifetimes.
async fn start_issuer(port: u16, admin_port: u16) -> anyhow::Result<Identity> {
    let dir = std::env::temp_dir().join(format!("gofe-demo-{}", std::process::id()));
    gofe_identity::issuer::material::bootstrap(&dir.join("issuer"), "cluster.local")?;
    std::fs::write(
        dir.join("token"),
        "demo: the issuer runs with --insecure-dev\n",
    )?;
    let bound = gofe_identity::issuer::Bound::bind(gofe_identity::issuer::IssuerConfig {
        dir: dir.join("issuer"),
        listen: local(port),
        admin_listen: local(admin_port),
        cert_lifetime: DEMO_CERT_LIFETIME,
        jwks: None,
        insecure_dev: true,
        trust_domain: "cluster.local".into(),
        audience: gofe_identity::api::TOKEN_AUDIENCE.into(),
        token_issuer: None,
    })
    .await
    .context("cannot start the embedded issuer (try --port-base)")?;
    let addr = bound.addr();
    tokio::spawn(bound.run(std::future::pending()));
    Ok(Identity { addr, dir })
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The variables of a demo sidecar in front of the application on `app_port`.
fn sidecar_vars(
    name: &str,
    ports: SidecarPorts,
    app_port: u16,
    identity: &Identity,
) -> HashMap<String, String> {
    let mut vars = [
        (
            config::OUTBOUND_LISTEN.name,
            local(ports.outbound).to_string(),
        ),
        (
            config::INBOUND_LISTEN.name,
            local(ports.inbound).to_string(),
        ),
        (config::ADMIN_LISTEN.name, local(ports.admin).to_string()),
        (
            config::INBOUND_DIRECT_TARGET.name,
            local(app_port).to_string(),
        ),
        (config::SHUTDOWN_GRACE_PERIOD.name, "5s".to_string()),
        (config::IDENTITY_ADDR.name, identity.addr.to_string()),
        (config::IDENTITY_NAME.name, spiffe(name)),
        (
            config::IDENTITY_TRUST_ANCHORS.name,
            identity.dir.join("issuer/ca.crt").display().to_string(),
        ),
        (
            config::IDENTITY_TOKEN_FILE.name,
            identity.dir.join("token").display().to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect::<HashMap<String, String>>();
    // A collector named in the demo's environment gets the spans too.
    for var in [
        &config::TRACE_COLLECTOR,
        &config::TRACE_PROTOCOL,
        &config::TRACE_SAMPLE_RATIO,
    ] {
        if let Ok(v) = std::env::var(var.name) {
            vars.entry(var.name.to_string()).or_insert(v);
        }
    }
    vars
}

/// Starts a sidecar in front of the application on `app_port`, configured through the
/// same variables a user would set.
fn sidecar(
    name: &'static str,
    ports: SidecarPorts,
    app_port: u16,
    identity: &Identity,
    extra: &[(&str, String)],
) -> anyhow::Result<Sidecar> {
    let mut vars = sidecar_vars(name, ports, app_port, identity);
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let config = Config::from_map(&vars).map_err(crate::BadConfig)?;
    let spans = gofe_telemetry::trace::LocalSpans::default();
    let proxy = Proxy::bind_with(
        config,
        Some(spans.clone()),
        Arc::new(gofe_proxy::socket::HostSockets),
    )
    .with_context(|| format!("{name} sidecar"))?;
    let metrics = proxy.metrics();
    let destinations = proxy.destinations();
    let mesh = proxy
        .identity()
        .context("the demo's sidecars have identities")?;
    let shutdown = proxy.shutdown();
    let done = tokio::spawn(proxy.run());
    Ok(Sidecar {
        name,
        spans,
        ports,
        metrics,
        destinations,
        mesh,
        shutdown,
        done,
        serial: parking_lot::Mutex::new(None),
    })
}

impl Sidecar {
    fn requests(&self, direction: Direction) -> u64 {
        total(&self.metrics, direction)
    }

    /// A line for each certificate the sidecar starts using.
    fn report_certificate(&self, started: Instant) {
        let Some(held) = self.mesh.store.current() else {
            return;
        };
        let mut last = self.serial.lock();
        if last.as_deref() == Some(held.info.serial.as_str()) {
            return;
        }
        let verb = if last.is_some() { "renewed" } else { "got" };
        let left = held
            .info
            .not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        println!(
            "  {:>4}s  {} sidecar {verb} its certificate: {} serial {}..., valid {}s more",
            started.elapsed().as_secs(),
            self.name,
            self.mesh.name(),
            &held.info.serial[..11.min(held.info.serial.len())],
            left.as_secs()
        );
        *last = Some(held.info.serial.clone());
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    gofe_telemetry::logs::init("warn", gofe_telemetry::logs::LogFormat::Plain)?;
    let rt = crate::runtime(0)?;
    let etcd = rt.block_on(demo(args))?;
    // etcd goes last: the sidecars' watches end with the runtime, not with a warning.
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(etcd);
    Ok(())
}

/// Runs the demo; returns its etcd (if it ran one) for the caller to stop.
async fn demo(args: DemoArgs) -> anyhow::Result<Option<EtcdProcess>> {
    let base = args.port_base;
    anyhow::ensure!(
        base <= u16::MAX - 30,
        "--port-base leaves no room for 30 ports"
    );
    let web_app = base + 2;
    let replica_apps = [base + 1, base + 5, base + 6];
    let replica_ports = [0u16, 1, 2].map(|i| SidecarPorts {
        outbound: base + 10 + 3 * i,
        inbound: base + 11 + 3 * i,
        admin: base + 12 + 3 * i,
    });
    let web_ports = SidecarPorts {
        outbound: base + 20,
        inbound: base + 21,
        admin: base + 22,
    };

    let identity = start_issuer(base + 3, base + 4).await?;
    let discovery = identity.dir.join("destinations.yaml");
    std::fs::write(
        &discovery,
        discovery_file(&replica_ports.map(|p| p.inbound)),
    )?;
    // With etcd at hand, the registry takes the discovery file's place.
    let etcd = match find_on_path("etcd") {
        Some(bin) => Some(start_etcd(&bin, base + 23, &identity.dir).await?),
        None => None,
    };
    let registering = |name: &str, inbound: u16| -> Vec<(&'static str, String)> {
        let Some(etcd) = &etcd else { return Vec::new() };
        vec![
            (config::REGISTRY.name, etcd.url.clone()),
            (
                config::REGISTER.name,
                format!("{API_DESTINATION}={inbound}"),
            ),
            (config::REGISTER_ADDRESS.name, "127.0.0.1".into()),
            (config::REGISTER_TTL.name, DEMO_REGISTER_TTL.into()),
            (config::REGISTER_METADATA.name, format!("replica={name}")),
        ]
    };
    for ((_, behaviour), port) in REPLICAS.iter().zip(replica_apps) {
        tokio::spawn(serve_api(bind(port).await?, *behaviour, Default::default()));
    }
    tokio::spawn(serve_web(bind(web_app).await?, web_ports.outbound));
    let mut replicas = Vec::new();
    for (((name, _), ports), app) in REPLICAS.iter().zip(replica_ports).zip(replica_apps) {
        // The probes a Deployment of api would declare, as the injector hands them
        // to the sidecar: the kubelet asks the admin port, the sidecar asks the app.
        let probes = format!(
            r#"{{"api": {{"livez": {{"httpGet": {{"path": "/healthz", "port": {app}}}}}, "readyz": {{"tcpSocket": {{"port": {app}}}}}}}}}"#
        );
        let mut as_api = vec![
            (config::IDENTITY_NAME.name, spiffe("api")),
            (config::SERVICE_NAME.name, "api".to_string()),
            (config::APP_PROBES.name, probes),
        ];
        as_api.extend(registering(name, ports.inbound));
        replicas.push(sidecar(name, ports, app, &identity, &as_api)?);
    }
    let mut web_vars = vec![(config::SERVICE_NAME.name, "web".to_string())];
    match &etcd {
        Some(etcd) => {
            push_policy(&etcd.url, &api_policy("ewma")).await?;
            web_vars.push((config::REGISTRY.name, etcd.url.clone()));
            web_vars.push((config::DISCOVERY.name, "registry".into()));
        }
        None => web_vars.push((
            config::DISCOVERY.name,
            format!("file:{}", discovery.display()),
        )),
    }
    let web = sidecar("web", web_ports, web_app, &identity, &web_vars)?;
    // api-4: a healthy replica whose sidecar is a process of its own, to be killed.
    let api4 = match &etcd {
        Some(_) => {
            let served = Arc::new(AtomicU64::new(0));
            let healthy = REPLICAS[0].1;
            tokio::spawn(serve_api(bind(base + 28).await?, healthy, served.clone()));
            let ports = SidecarPorts {
                outbound: base + 25,
                inbound: base + 26,
                admin: base + 27,
            };
            let mut vars = sidecar_vars("api-4", ports, base + 28, &identity);
            vars.insert(config::IDENTITY_NAME.name.into(), spiffe("api"));
            vars.insert(config::SERVICE_NAME.name.into(), "api".into());
            vars.extend(
                registering("api-4", ports.inbound)
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v)),
            );
            vars.insert(config::LOG.name.into(), "error".into());
            let log = std::fs::File::create(identity.dir.join("api-4.log"))?;
            let child = std::process::Command::new(std::env::current_exe()?)
                .arg("proxy")
                .env_clear()
                .envs(&vars)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("cannot start api-4's sidecar")?;
            Some(Api4 {
                child: Some(child),
                served,
                ports,
                killed: None,
                expired: false,
            })
        }
        None => None,
    };
    let mut api4 = api4;
    if let Some(etcd) = &etcd {
        // The client starts once web's sidecar sees every replica registered.
        let registry = web
            .destinations
            .registry()
            .context("web watches the registry")?
            .clone();
        let dest = gofe_proxy::addrs::DestKey::parse(API_DESTINATION)?;
        let all = REPLICAS.len() + 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        while registry
            .endpoints(&dest, None)
            .map_or(0, |a| a.endpoints.len())
            < all
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the replicas did not register in etcd at {} (see {})",
                etcd.url,
                identity.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), async {
        for s in std::iter::once(&web).chain(&replicas) {
            s.mesh.store.wait_ready().await;
        }
    })
    .await
    .context("the sidecars did not get certificates from the embedded issuer")?;

    println!(
        "gofe demo: a client, web, and api as three replicas, each behind its own gofe sidecar"
    );
    println!();
    println!(
        "  client ─▶ [web sidecar] ─▶ web ─HTTP/2─▶ [web sidecar] ═mTLS═▶ [api-N sidecar] ─▶ api-N"
    );
    println!();
    for ((name, behaviour), s) in REPLICAS.iter().zip(&replicas) {
        println!(
            "  {name}: {:<33} sidecar inbound 127.0.0.1:{}, admin http://127.0.0.1:{}/metrics",
            behaviour.what, s.ports.inbound, s.ports.admin
        );
    }
    println!(
        "  web sidecar: outbound 127.0.0.1:{}, admin http://127.0.0.1:{}/endpoints",
        web.ports.outbound, web.ports.admin
    );
    match (&etcd, &api4) {
        (Some(etcd), Some(a4)) => {
            println!(
                "  api-4: a healthy replica behind a `gofe proxy` process of its own (inbound 127.0.0.1:{}), killed a few seconds in",
                a4.ports.inbound
            );
            println!(
                "  registry: etcd at {} (GOFE_REGISTRY); every api sidecar registers {API_DESTINATION} there, signed",
                etcd.url
            );
            println!(
                "  with its mesh key, on a {DEMO_REGISTER_TTL} lease; web's sidecar watches it (GOFE_DISCOVERY=registry) and requires"
            );
            println!(
                "  mTLS with the identity {} that each entry names; `gofe registry ls` shows them:",
                spiffe("api")
            );
            println!("    GOFE_REGISTRY={} gofe registry ls", etcd.url);
            println!(
                "  web's policy for api is pushed from etcd (/gofe/policy/{API_DESTINATION}): retries on 5xx, P2C over"
            );
            println!(
                "  peak-EWMA latency, outlier ejection after 5 failures in a row (5 s, growing with each ejection)"
            );
        }
        _ => {
            println!(
                "  web calls http://{API_AUTHORITY}/: its sidecar finds api's endpoints, and the identity {}",
                spiffe("api")
            );
            println!(
                "  they must present, in {}; its policy: retries on 5xx, P2C over peak-EWMA latency,",
                discovery.display()
            );
            println!(
                "  outlier ejection after 5 failures in a row (5 s, growing with each ejection)"
            );
            println!(
                "  registry: no etcd on the PATH, so a discovery file it is; install Debian's etcd-server (apt-get install"
            );
            println!(
                "  etcd-server) and the demo runs etcd as the registry and config center too (README \"Registry\")"
            );
        }
    }
    print_probes(&replicas).await;
    match std::env::var(config::TRACE_COLLECTOR.name) {
        Ok(c) if !c.trim().is_empty() => println!(
            "  traces: every sidecar exports its spans to {c} (GOFE_TRACE_COLLECTOR); look for services web and api"
        ),
        _ => println!(
            "  traces: kept in memory for the summary; set GOFE_TRACE_COLLECTOR (e.g. http://127.0.0.1:4317) to see them in Jaeger"
        ),
    }
    println!(
        "  issuer: https://{} (trust anchor {}), certificates for {}s",
        identity.addr,
        identity.dir.join("issuer/ca.crt").display(),
        DEMO_CERT_LIFETIME.as_secs()
    );
    println!();
    match args.duration {
        Some(d) => println!(
            "  sending {} requests/s for {d:?}; Ctrl-C stops early",
            args.rate
        ),
        None => println!("  sending {} requests/s; Ctrl-C stops", args.rate),
    }
    println!();
    println!(
        "  {:>5} {:>6} {:>6} {:>4} {:>4} {:>8} {:>8} | {:>7} | api-1 api-2 api-3{}",
        "time",
        "sent",
        "2xx",
        "5xx",
        "fail",
        "p50",
        "p99",
        "retries",
        if api4.is_some() { " api-4" } else { "" }
    );

    for s in std::iter::once(&web).chain(&replicas) {
        s.report_certificate(started);
    }
    let stats = Arc::new(parking_lot::Mutex::new(Stats::new()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let client = tokio::spawn(client(
        local(web_ports.inbound),
        args.rate,
        stats.clone(),
        stop.clone(),
    ));

    let deadline = args.duration.map(|d| started + d);
    // The registry's moments: api-4 killed, then a policy pushed live.
    let kill_at = args.duration.map_or(Duration::from_secs(5), |d| {
        d.mul_f64(0.2).min(Duration::from_secs(5))
    });
    let push_at = args.duration.map_or(Duration::from_secs(12), |d| {
        d.mul_f64(0.75).min(Duration::from_secs(12))
    });
    let mut pushed = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut view = View::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                for s in std::iter::once(&web).chain(&replicas) {
                    s.report_certificate(started);
                }
                view.report_endpoints(started, &web, &replicas);
                print_line(started, &stats, &web, &replicas, &mut view, api4.as_ref());
                if let (Some(a4), Some(etcd)) = (api4.as_mut(), &etcd) {
                    a4.step(started, kill_at, &web)?;
                    if !pushed && started.elapsed() >= push_at {
                        pushed = true;
                        push_policy(&etcd.url, &api_policy("round-robin")).await?;
                        println!(
                            "  {:>4}s  pushed to etcd: api's policy with lb round-robin (was ewma); web's sidecar applies it",
                            started.elapsed().as_secs()
                        );
                    }
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
            _ = &mut ctrl_c => {
                println!("  Ctrl-C");
                break;
            }
        }
    }

    // Stop sending, let the last requests finish, then drain the sidecars.
    stop.notify_waiters();
    let _ = client.await;
    for s in std::iter::once(&web).chain(&replicas) {
        s.shutdown.trigger();
    }
    let drained = Instant::now();
    if let Some(a4) = api4.as_mut() {
        a4.kill();
    }
    print_mtls(&web.metrics);
    print_resilience(&web, &replicas);
    let mut latencies = Vec::new();
    let mut spans = Vec::new();
    for s in std::iter::once(web).chain(replicas) {
        let name = s.name;
        let metrics = s.metrics.clone();
        s.done.await.with_context(|| format!("{name} sidecar"))?;
        // Drained: its last spans are exported.
        latencies.push((name, metrics.clone()));
        spans.extend(s.spans.spans().into_iter().map(|span| (name, span)));
        let (inbound, outbound) = (
            total(&metrics, Direction::Inbound),
            total(&metrics, Direction::Outbound),
        );
        println!(
            "  {name} sidecar drained: {inbound} inbound and {outbound} outbound requests proxied"
        );
    }
    print_summary(&stats.lock(), started.elapsed(), drained.elapsed());
    print_latencies(&latencies);
    print_trace(&spans);
    println!();
    println!(
        "  the same in Kubernetes: `gofe inject k8s/demo.yaml` shows the pods with their sidecars;"
    );
    println!("  README \"Kubernetes\" installs the issuer, the injector webhook and Jaeger");
    let _ = std::fs::remove_dir_all(&identity.dir);
    crate::demo_rules::stories().await?;
    crate::demo_limits::story().await?;
    Ok(etcd)
}

/// api-4: a replica whose sidecar is a process, killed to show its lease expire.
struct Api4 {
    child: Option<std::process::Child>,
    served: Arc<AtomicU64>,
    ports: SidecarPorts,
    killed: Option<Instant>,
    expired: bool,
}

impl Api4 {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the sidecar once `kill_at` has passed, then reports when web's view of the
    /// registry drops it.
    fn step(&mut self, started: Instant, kill_at: Duration, web: &Sidecar) -> anyhow::Result<()> {
        if self.killed.is_none() && started.elapsed() >= kill_at {
            self.kill();
            self.killed = Some(Instant::now());
            println!(
                "  {:>4}s  api-4's sidecar killed (kill -9): no deregistration; its entry stays until its {DEMO_REGISTER_TTL} lease expires",
                started.elapsed().as_secs()
            );
        }
        if let (Some(at), false) = (self.killed, self.expired) {
            let dest = gofe_proxy::addrs::DestKey::parse(API_DESTINATION)?;
            let addr = local(self.ports.inbound);
            let listed = web
                .destinations
                .registry()
                .and_then(|r| r.endpoints(&dest, None))
                .is_some_and(|a| a.endpoints.iter().any(|e| e.addr.addr() == addr));
            if !listed {
                self.expired = true;
                println!(
                    "  {:>4}s  api-4's lease expired {:.1}s after the kill: etcd deleted its entry, web's sidecar dropped it",
                    started.elapsed().as_secs(),
                    at.elapsed().as_secs_f64()
                );
            }
        }
        Ok(())
    }
}

/// The kubelet's view under strict mTLS: the app's probes, rewritten by the injector to
/// `/app-health/api/<kind>` on each replica's admin port and run by its sidecar against
/// the app (api-2's liveness fails as often as api-2 does).
async fn print_probes(replicas: &[Sidecar]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    println!("  kubelet probes, answered by each sidecar's admin port (GOFE_APP_PROBES):");
    for s in replicas {
        for kind in ["livez", "readyz"] {
            let path = format!("/app-health/api/{kind}");
            let answer = async {
                let mut c = TcpStream::connect(local(s.ports.admin)).await?;
                c.write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: kube-probe/1.37\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await?;
                let mut text = String::new();
                c.read_to_string(&mut text).await?;
                std::io::Result::Ok(text)
            };
            let text = match tokio::time::timeout(Duration::from_secs(3), answer).await {
                Ok(Ok(t)) => t,
                _ => "no answer".into(),
            };
            let status = text.split(' ').nth(1).unwrap_or("?");
            let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b.trim());
            println!(
                "    {} GET 127.0.0.1:{}{path:<22} {status}  {body}",
                s.name, s.ports.admin
            );
        }
    }
}

/// What the demo last showed: per replica, the requests counted and whether the web
/// sidecar had it ejected; the retries counted.
#[derive(Default)]
struct View {
    served: HashMap<&'static str, u64>,
    ejected: HashMap<String, bool>,
    retries: u64,
}

impl View {
    /// A line when the web sidecar ejects a replica or takes it back.
    fn report_endpoints(&mut self, started: Instant, web: &Sidecar, replicas: &[Sidecar]) {
        let Some(dest) = web
            .destinations
            .all()
            .into_iter()
            .find(|d| d.name.as_ref() == API_DESTINATION)
        else {
            return;
        };
        for e in dest.balancer.endpoints().iter() {
            let addr = e.endpoint.addr.to_string();
            let name = replicas
                .iter()
                .find(|r| local(r.ports.inbound).to_string() == addr)
                .map_or("?", |r| r.name);
            let (until, times) = e.ejection();
            let now_ejected = until.is_some();
            let was = self
                .ejected
                .insert(addr.clone(), now_ejected)
                .unwrap_or(false);
            match (was, until) {
                (false, Some(until)) => println!(
                    "  {:>4}s  web sidecar ejected {name} ({addr}) for {}s: failures in a row (ejection #{times})",
                    started.elapsed().as_secs(),
                    until
                        .saturating_duration_since(tokio::time::Instant::now())
                        .as_secs_f64()
                        .round()
                ),
                (true, None) => println!(
                    "  {:>4}s  {name} is back in the web sidecar's rotation",
                    started.elapsed().as_secs()
                ),
                _ => {}
            }
        }
    }
}

/// How the web sidecar reached api: requests by whether they went over mTLS, and the
/// identity the api sidecar presented.
fn print_mtls(web: &Metrics) {
    for (labels, stats) in web.requests.snapshot() {
        if labels.direction == Direction::Outbound {
            let how = if labels.tls {
                format!("over mTLS to {}", labels.peer_identity)
            } else {
                "in plaintext".to_string()
            };
            println!(
                "  web sidecar -> {}: {} requests {how}",
                labels.authority,
                stats.total()
            );
        }
    }
}

fn total(metrics: &Metrics, direction: Direction) -> u64 {
    metrics
        .requests
        .snapshot()
        .iter()
        .filter(|(l, _)| l.direction == direction)
        .map(|(_, s)| s.total())
        .sum()
}

async fn bind(port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind(local(port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port} (try --port-base)"))
}

/// An `api` replica: answers `/item/N` after a little simulated work, or fails, as
/// its `behaviour` says.
async fn serve_api(listener: TcpListener, behaviour: Behaviour, served: Arc<AtomicU64>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let served = served.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let n = served.fetch_add(1, Ordering::Relaxed);
                async move {
                    // 0.5 to 3 ms of "work", varied so the latency figures move.
                    let work = 500 + (n.wrapping_mul(7919) % 2500);
                    tokio::time::sleep(Duration::from_micros(work) + behaviour.extra_delay).await;
                    if fastrand::u64(0..100) < behaviour.fail_percent {
                        let mut r = Response::new(Full::new(Bytes::from("overloaded\n")));
                        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        return Ok::<_, Infallible>(r);
                    }
                    let body = format!(
                        "{{\"item\":\"{}\",\"served_by\":\"api\"}}",
                        req.uri().path()
                    );
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `web`: each request calls `api` over HTTP/2 through its sidecar's outbound
/// listener, naming it `api.demo`.
async fn serve_web(listener: TcpListener, sidecar_outbound: u16) {
    let upstream = Arc::new(H2Upstream::new(local(sidecar_outbound)));
    let api_authority = API_AUTHORITY.to_string();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let upstream = upstream.clone();
        let authority = api_authority.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let upstream = upstream.clone();
                let authority = authority.clone();
                async move {
                    let uri = format!("http://{authority}/item{}", req.uri().path());
                    // As an instrumented application does: the call to api continues
                    // the trace of the request being served.
                    let context: Vec<_> = ["traceparent", "tracestate"]
                        .into_iter()
                        .filter_map(|h| req.headers().get(h).map(|v| (h, v.clone())))
                        .collect();
                    let rsp = match upstream.get(&uri, &context).await {
                        Ok((status, body)) if status.is_success() => {
                            let mut r =
                                Response::new(Full::new(Bytes::from(format!("web saw {body}\n"))));
                            *r.status_mut() = StatusCode::OK;
                            r
                        }
                        Ok((status, _)) => {
                            let mut r = Response::new(Full::new(Bytes::from("api failed\n")));
                            *r.status_mut() = if status.is_server_error() {
                                StatusCode::BAD_GATEWAY
                            } else {
                                status
                            };
                            r
                        }
                        Err(e) => {
                            let mut r = Response::new(Full::new(Bytes::from(format!(
                                "api unreachable: {e}\n"
                            ))));
                            *r.status_mut() = StatusCode::BAD_GATEWAY;
                            r
                        }
                    };
                    Ok::<_, Infallible>(rsp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// One HTTP/2 connection to a proxy, made again if it breaks.
struct H2Upstream {
    addr: SocketAddr,
    tx: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Empty<Bytes>>>>,
}

impl H2Upstream {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            tx: tokio::sync::Mutex::new(None),
        }
    }

    async fn sender(
        &self,
    ) -> anyhow::Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>> {
        let mut tx = self.tx.lock().await;
        if let Some(t) = tx.as_ref().filter(|t| !t.is_closed()) {
            return Ok(t.clone());
        }
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let (t, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await?;
        tokio::spawn(conn);
        *tx = Some(t.clone());
        Ok(t)
    }

    async fn get(
        &self,
        uri: &str,
        headers: &[(&'static str, http::HeaderValue)],
    ) -> anyhow::Result<(StatusCode, String)> {
        let mut tx = self.sender().await?;
        let mut req = Request::get(uri).body(Empty::new())?;
        for (name, value) in headers {
            req.headers_mut().insert(*name, value.clone());
        }
        let rsp = tx.send_request(req).await?;
        let status = rsp.status();
        let body = rsp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

struct Stats {
    sent: u64,
    statuses: BTreeMap<u16, u64>,
    failed: u64,
    /// Latency in microseconds, all run long and for the last second.
    all: Histogram<u64>,
    window: Histogram<u64>,
}

impl Stats {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
        Self {
            sent: 0,
            statuses: BTreeMap::new(),
            failed: 0,
            all: h(),
            window: h(),
        }
    }

    fn count(&self, f: impl Fn(u16) -> bool) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| f(**s))
            .map(|(_, n)| n)
            .sum()
    }
}

/// Sends `rate` requests a second over a few keep-alive connections.
async fn client(
    target: SocketAddr,
    rate: u32,
    stats: Arc<parking_lot::Mutex<Stats>>,
    stop: Arc<tokio::sync::Notify>,
) {
    let (jobs_tx, jobs_rx) = job_queue(CLIENT_CONNECTIONS * 4);
    let mut workers = Vec::new();
    for _ in 0..CLIENT_CONNECTIONS {
        let jobs = jobs_rx.clone();
        let stats = stats.clone();
        workers.push(tokio::spawn(async move {
            let mut conn: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> = None;
            while let Ok(n) = recv(&jobs).await {
                let start = Instant::now();
                let result = client_request(&mut conn, target, n).await;
                let micros = start.elapsed().as_micros() as u64;
                let mut s = stats.lock();
                match result {
                    Ok(status) => {
                        *s.statuses.entry(status.as_u16()).or_default() += 1;
                        s.all.saturating_record(micros.max(1));
                        s.window.saturating_record(micros.max(1));
                    }
                    Err(_) => {
                        s.failed += 1;
                        conn = None;
                    }
                }
            }
        }));
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = stop.notified();
    tokio::pin!(stopped);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = tick.tick() => {
                stats.lock().sent += 1;
                if jobs_tx.send(n).await.is_err() {
                    break;
                }
                n += 1;
            }
        }
    }
    drop(jobs_tx);
    for w in workers {
        let _ = w.await;
    }
}

type Jobs = Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<u64>>>;

fn job_queue(cap: usize) -> (tokio::sync::mpsc::Sender<u64>, Jobs) {
    let (tx, rx) = tokio::sync::mpsc::channel(cap);
    (tx, Arc::new(tokio::sync::Mutex::new(rx)))
}

async fn recv(jobs: &Jobs) -> Result<u64, ()> {
    jobs.lock().await.recv().await.ok_or(())
}

async fn client_request(
    conn: &mut Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
    target: SocketAddr,
    n: u64,
) -> anyhow::Result<StatusCode> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        let stream = TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        let (tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(c);
        *conn = Some(tx);
    }
    let tx = conn.as_mut().expect("connected");
    tx.ready().await?;
    let req = Request::get(format!("/{n}"))
        .header("host", "web.demo")
        .body(Empty::new())?;
    let rsp = tx.send_request(req).await?;
    let status = rsp.status();
    rsp.into_body().collect().await?;
    Ok(status)
}

fn ms(micros: u64) -> String {
    format!("{:.1}ms", micros as f64 / 1000.0)
}

fn print_line(
    started: Instant,
    stats: &parking_lot::Mutex<Stats>,
    web: &Sidecar,
    replicas: &[Sidecar],
    view: &mut View,
    api4: Option<&Api4>,
) {
    let mut s = stats.lock();
    let (p50, p99) = if s.window.is_empty() {
        ("-".to_string(), "-".to_string())
    } else {
        (
            ms(s.window.value_at_quantile(0.5)),
            ms(s.window.value_at_quantile(0.99)),
        )
    };
    s.window.reset();
    let retries = web.metrics.retries_total(API_DESTINATION);
    let new_retries = retries - view.retries;
    view.retries = retries;
    let mut per_replica: Vec<String> = replicas
        .iter()
        .map(|r| {
            let n = r.requests(Direction::Inbound);
            let last = view.served.insert(r.name, n).unwrap_or(0);
            format!("{:>5}", n - last)
        })
        .collect();
    if let Some(a4) = api4 {
        let n = a4.served.load(Ordering::Relaxed);
        let last = view.served.insert("api-4", n).unwrap_or(0);
        per_replica.push(format!("{:>5}", n - last));
    }
    println!(
        "  {:>4}s {:>6} {:>6} {:>4} {:>4} {:>8} {:>8} | {:>7} | {}",
        started.elapsed().as_secs(),
        s.sent,
        s.count(|c| (200..300).contains(&c)),
        s.count(|c| c >= 500),
        s.failed,
        p50,
        p99,
        new_retries,
        per_replica.join(" "),
    );
}

/// What the web sidecar's policy did for api: the retries, the ejections, and how the
/// traffic spread.
fn print_resilience(web: &Sidecar, replicas: &[Sidecar]) {
    let retries = web.metrics.retries_by_reason(API_DESTINATION);
    let total: u64 = retries.iter().map(|(_, n)| n).sum();
    let reasons: Vec<String> = retries.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    println!(
        "  web sidecar retried {total} calls to api ({}), {} refused by the retry budget",
        reasons.join(", "),
        web.metrics.budget_exhausted_total(API_DESTINATION)
    );
    let all: u64 = replicas
        .iter()
        .map(|r| r.requests(Direction::Inbound))
        .sum();
    for (r, (_, behaviour)) in replicas.iter().zip(REPLICAS) {
        let n = r.requests(Direction::Inbound);
        let ejected = web
            .metrics
            .ejections_total(API_DESTINATION, &local(r.ports.inbound).to_string());
        println!(
            "  {}: {n} requests ({:.0}%), ejected {ejected} times; {}",
            r.name,
            100.0 * n as f64 / all.max(1) as f64,
            behaviour.what
        );
    }
}

fn print_summary(s: &Stats, ran: Duration, drain: Duration) {
    println!();
    println!(
        "  ran {:.1}s, drained in {:.0}ms",
        ran.as_secs_f64(),
        drain.as_secs_f64() * 1000.0
    );
    let statuses: Vec<String> = s
        .statuses
        .iter()
        .map(|(c, n)| format!("{c}: {n}"))
        .collect();
    println!(
        "  client: {} sent, statuses {{{}}}, {} failed",
        s.sent,
        statuses.join(", "),
        s.failed
    );
    if !s.all.is_empty() {
        println!(
            "  latency through both sidecars: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            ms(s.all.value_at_quantile(0.5)),
            ms(s.all.value_at_quantile(0.9)),
            ms(s.all.value_at_quantile(0.99)),
            ms(s.all.value_at_quantile(0.999)),
            ms(s.all.max()),
        );
    }
}

/// Each sidecar's latency per destination, from its histograms: the quantiles over
/// the last minute that `/metrics` serves as `gofe_request_duration_seconds_quantile`.
fn print_latencies(sidecars: &[(&'static str, Arc<Metrics>)]) {
    println!();
    println!("  latency per destination, from each sidecar's histograms (last minute):");
    println!(
        "    {:<8} {:<9} {:<16} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "sidecar", "direction", "authority", "requests", "p50", "p90", "p99", "p99.9"
    );
    for (name, metrics) in sidecars {
        let mut rows = metrics.requests.snapshot();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        for (labels, stats) in rows {
            let s = stats.latency.snapshot();
            let Some(q) = s.quantiles else { continue };
            let f = |secs: f64| ms((secs * 1e6) as u64);
            println!(
                "    {:<8} {:<9} {:<16} {:>8} {:>9} {:>9} {:>9} {:>9}",
                name,
                labels.direction.as_str(),
                labels.authority,
                s.count,
                f(q[0]),
                f(q[1]),
                f(q[2]),
                f(q[3]),
            );
        }
    }
}

/// One request's trace as a waterfall: the spans of every hop as the sidecars
/// exported them, indented by parent. A trace in which the web sidecar retried is
/// chosen when there is one.
fn print_trace(spans: &[(&'static str, gofe_telemetry::trace::ExportedSpan)]) {
    use gofe_telemetry::trace::SpanKind;
    let attr = |s: &gofe_telemetry::trace::ExportedSpan, key: &str| {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    };
    let mut traces: HashMap<String, Vec<&(&'static str, gofe_telemetry::trace::ExportedSpan)>> =
        HashMap::new();
    for s in spans {
        traces
            .entry(s.1.span_context.trace_id().to_string())
            .or_default()
            .push(s);
    }
    let retried = |t: &[&(&'static str, gofe_telemetry::trace::ExportedSpan)]| {
        t.iter().any(|(_, s)| {
            s.span_kind == SpanKind::Client && attr(s, "gofe.retries").is_some_and(|r| r != "0")
        })
    };
    let start = |t: &[&(&'static str, gofe_telemetry::trace::ExportedSpan)]| {
        t.iter().map(|(_, s)| s.start_time).min()
    };
    let chosen = traces
        .values()
        .filter(|t| t.len() >= 3)
        .max_by_key(|t| (retried(t), start(t)));
    let Some(trace) = chosen else {
        println!();
        println!("  no complete trace was recorded");
        return;
    };
    let mut trace: Vec<_> = trace.clone();
    trace.sort_by_key(|(_, s)| s.start_time);
    let t0 = trace[0].1.start_time;
    let t1 = trace.iter().map(|(_, s)| s.end_time).max().unwrap_or(t0);
    let total = t1
        .duration_since(t0)
        .unwrap_or_default()
        .as_secs_f64()
        .max(1e-6);
    println!();
    println!(
        "  one request's trace {} ({} spans{}):",
        trace[0].1.span_context.trace_id(),
        trace.len(),
        if retried(&trace) {
            ", the web sidecar retried it"
        } else {
            ""
        }
    );
    const WIDTH: usize = 40;
    let depth = |s: &gofe_telemetry::trace::ExportedSpan| {
        let mut d = 0;
        let mut parent = s.parent_span_id;
        while let Some((_, p)) = trace
            .iter()
            .find(|(_, p)| p.span_context.span_id() == parent)
        {
            d += 1;
            parent = p.parent_span_id;
        }
        d
    };
    for (sidecar, s) in &trace {
        let from = s
            .start_time
            .duration_since(t0)
            .unwrap_or_default()
            .as_secs_f64();
        let to = s
            .end_time
            .duration_since(t0)
            .unwrap_or_default()
            .as_secs_f64();
        let a = (((from / total) * WIDTH as f64).floor() as usize).min(WIDTH - 1);
        let b = (((to / total) * WIDTH as f64).ceil() as usize).clamp(a + 1, WIDTH);
        let bar: String = (0..WIDTH)
            .map(|i| if i >= a && i < b { '█' } else { ' ' })
            .collect();
        let kind = match s.span_kind {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
            _ => "INTERNAL",
        };
        let label = format!(
            "{}{} sidecar {kind} {} {}",
            "  ".repeat(depth(s)),
            sidecar,
            s.name,
            attr(s, "url.path").unwrap_or_default()
        );
        let mut notes = vec![format!(
            "{}",
            attr(s, "http.response.status_code").unwrap_or_default()
        )];
        if s.span_kind == SpanKind::Client
            && let Some(r) = attr(s, "gofe.retries").filter(|r| r != "0")
        {
            notes.push(format!("retries {r}"));
        }
        if let Some(p) = attr(s, "gofe.peer_identity") {
            notes.push(format!("peer {p}"));
        }
        println!(
            "    {label:<40} |{bar}| {:>8}  {}",
            ms(((to - from) * 1e6) as u64),
            notes.join(", ")
        );
    }
}
