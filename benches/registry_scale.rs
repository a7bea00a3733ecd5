//! The registry at scale: 200 services × 10 signed endpoints in a real etcd (Debian's
//! etcd-server on loopback, its own data directory), watched by 50 in-process clients
//! (each the proxy's own `Registry`: one watch, a mirror, entries verified against the
//! trust anchors when a destination reads them). Measures:
//!
//! - the first full read of every client (2000 entries each) and its verification,
//! - how long a change takes to reach every client (an entry put; the time until each
//!   client's destination lists it), p50/p99 over changes × clients,
//! - memory per client (the process's resident memory before and after, divided),
//! - etcd's load: CPU seconds, resident memory, watchers, bytes sent.
//!
//! Run once, briefly (it is not part of `cargo test`):
//! `cargo build --bench registry_scale && nice -n 10 target/debug/deps/registry_scale-*`
//! (the dev profile: etcd and the network dominate; ring's crypto is optimised either
//! way). `GOFE_BENCH_CLIENTS`, `GOFE_BENCH_SERVICES`, `GOFE_BENCH_CHANGES` change the
//! sizes.

use gofe_proxy::addrs::DestKey;
use gofe_proxy::config::RegistryConfig;
use gofe_proxy::route::discovery::entry::{self, Claim};
use gofe_proxy::route::discovery::file::Generation;
use gofe_proxy::route::discovery::registry::Registry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// etcd's client port here (the peer port is the next one).
const PORT: u16 = 42_379;

struct EtcdProcess(Child);

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// etcd's own metrics: (CPU seconds, watchers, gRPC bytes sent).
async fn etcd_metrics(url: &str) -> (f64, f64, f64) {
    let text = reqwest_lite(url).await.unwrap_or_default();
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    (
        sum("process_cpu_seconds_total"),
        sum("etcd_debugging_mvcc_watcher_total"),
        sum("etcd_network_client_grpc_sent_bytes_total"),
    )
}

/// GET over plain HTTP/1.0 (etcd's /metrics), without another client library.
async fn reqwest_lite(url: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let clients = env_usize("GOFE_BENCH_CLIENTS", 50);
    let services = env_usize("GOFE_BENCH_SERVICES", 200);
    let per_service = 10;
    let changes = env_usize("GOFE_BENCH_CHANGES", 40);
    let dir = std::env::temp_dir().join(format!("gofe-registry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let url = format!("http://127.0.0.1:{PORT}");
    let peer = format!("http://127.0.0.1:{}", PORT + 1);
    let etcd = EtcdProcess(
        Command::new("etcd")
            .args([
                "--name=bench",
                &format!("--data-dir={}", dir.join("etcd").display()),
                &format!("--listen-client-urls={url}"),
                &format!("--advertise-client-urls={url}"),
                &format!("--listen-peer-urls={peer}"),
                &format!("--initial-advertise-peer-urls={peer}"),
                &format!("--initial-cluster=bench={peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start etcd (Debian: etcd-server): {e}"))?,
    );
    let etcd_pid = etcd.0.id();
    let mut kv = loop {
        if let Ok(Ok(mut c)) = tokio::time::timeout(
            Duration::from_secs(1),
            etcd_client::Client::connect([url.clone()], None),
        )
        .await
            && c.status().await.is_ok()
        {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The mesh: anchors, and one signing identity per service.
    let issuer_dir = dir.join("issuer");
    gofe_identity::issuer::material::bootstrap(&issuer_dir, "cluster.local")?;
    let m = gofe_identity::issuer::material::load(&issuer_dir)?;
    let anchors = Arc::new(gofe_identity::trust::TrustAnchors::from_pem(
        &m.anchors_pem,
    )?);
    let signer = gofe_identity::issuer::sign::Signer::new(
        m.issuer,
        m.chain_pem.clone(),
        m.not_after,
        Duration::from_secs(3600),
        "cluster.local".into(),
    );
    let cfg = RegistryConfig {
        endpoints: vec![url.clone()],
        tls: None,
        auth: None,
        prefix: "/gofe".into(),
    };
    let store_for = |name: &str| -> anyhow::Result<Arc<gofe_identity::store::CertStore>> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(name.try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let signed = signer.sign(
            &csr,
            &gofe_identity::issuer::sign::Allowed::AnyInTrustDomain,
        )?;
        let store = gofe_identity::store::CertStore::new();
        let signing = gofe_identity::store::signing_key(&gofe_identity::trust::provider(), &key)?;
        let chain = gofe_identity::cert::certs_from_pem(signed.chain_pem.as_bytes())?;
        let info = gofe_identity::cert::inspect(&chain[0])?;
        store.set(chain, info, signing);
        Ok(store)
    };
    let service = |s: usize| DestKey::parse(&format!("svc-{s}.bench:80")).unwrap();
    let identity = |s: usize| format!("spiffe://cluster.local/ns/bench/sa/svc-{s}");
    let mut stores = Vec::new();
    let written = Instant::now();
    let mut bytes = 0usize;
    for s in 0..services {
        let store = store_for(&identity(s))?;
        let mut ops = Vec::new();
        for e in 0..per_service {
            let address: SocketAddr =
                format!("10.{}.{}.{}:8080", s / 250, s % 250, e + 1).parse()?;
            let key = format!("{}{address}", cfg.service_prefix(&service(s)));
            let value = entry::sign(
                &key,
                &Claim {
                    address,
                    identity: identity(s),
                    weight: 1,
                    metadata: [("version".to_string(), "v1".to_string())].into(),
                },
                &store,
            )?;
            bytes += key.len() + value.len();
            ops.push(etcd_client::TxnOp::put(key, value, None));
        }
        kv.txn(etcd_client::Txn::new().and_then(ops)).await?;
        stores.push(store);
    }
    let entries = services * per_service;
    println!(
        "wrote {entries} signed entries ({} services × {per_service}), {:.1} MB, in {:.2?}",
        services,
        bytes as f64 / 1e6,
        written.elapsed()
    );

    let (cpu0, _, sent0) = etcd_metrics(&format!("{url}/metrics")).await;
    let rss_before = rss_bytes(std::process::id());
    let etcd_rss_before = rss_bytes(etcd_pid);

    // The clients: each a registry with its own connection, watch and mirror.
    let started = Instant::now();
    let mut registries = Vec::new();
    for _ in 0..clients {
        let r = Registry::new(
            cfg.clone(),
            Some(anchors.clone()),
            "cluster.local",
            HashMap::new(),
            Generation::default(),
        );
        tokio::spawn(r.clone().run());
        registries.push(r);
    }
    // Synced: every client's mirror holds every entry.
    loop {
        let synced = registries
            .iter()
            .filter(|r| r.to_json()["entries"].as_u64() == Some(entries as u64))
            .count();
        if synced == clients {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "{synced}/{clients} synced"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let synced_in = started.elapsed();
    // A sidecar talks to some of the services: each client reads (and verifies) 20.
    let verify_started = Instant::now();
    for (i, r) in registries.iter().enumerate() {
        for k in 0..20 {
            let a = r
                .endpoints(&service((i * 7 + k) % services), None)
                .expect("known");
            assert_eq!(a.endpoints.len(), per_service);
        }
    }
    let verified_in = verify_started.elapsed();
    let rss_after = rss_bytes(std::process::id());
    println!(
        "{clients} clients read everything in {synced_in:.2?} (the last one done); 20 destinations each verified in {:.2?} in all ({:.2?} per client)",
        verified_in,
        verified_in / clients as u32
    );

    // Changes: one entry put at a time; the time until each client lists it.
    let mut samples = Vec::new();
    for c in 0..changes {
        let s = (c * 13) % services;
        let dest = service(s);
        let address: SocketAddr = format!("10.200.{}.{}:8080", c / 250, c % 250 + 1).parse()?;
        let key = format!("{}{address}", cfg.service_prefix(&dest));
        let value = entry::sign(
            &key,
            &Claim {
                address,
                identity: identity(s),
                weight: 1,
                metadata: Default::default(),
            },
            &stores[s],
        )?;
        // The destination is one the clients already use: its entries are verified
        // before the change (else the first look would verify ten, not one).
        for r in &registries {
            r.endpoints(&dest, None);
        }
        let mut waiting: Vec<_> = registries
            .iter()
            .map(|r| {
                let mut rx = r.subscribe();
                rx.mark_unchanged();
                let r = r.clone();
                let dest = dest.clone();
                tokio::spawn(async move {
                    loop {
                        if r.endpoints(&dest, None)
                            .is_some_and(|a| a.endpoints.iter().any(|e| e.addr.addr() == address))
                        {
                            return Instant::now();
                        }
                        if rx.changed().await.is_err() {
                            return Instant::now();
                        }
                    }
                })
            })
            .collect();
        let t0 = Instant::now();
        kv.put(key, value, None).await?;
        for w in waiting.drain(..) {
            let seen = tokio::time::timeout(Duration::from_secs(10), w).await??;
            samples.push(seen.saturating_duration_since(t0));
        }
    }
    samples.sort();
    let (cpu1, watchers, sent1) = etcd_metrics(&format!("{url}/metrics")).await;
    println!(
        "propagation of a change to all {clients} clients, over {} samples: p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        samples.len(),
        quantile(&samples, 0.5),
        quantile(&samples, 0.99),
        samples.last().copied().unwrap_or_default()
    );
    println!(
        "memory: {:.1} MB per client (process RSS {:.0} MB before the clients, {:.0} MB after)",
        rss_after.saturating_sub(rss_before) as f64 / clients as f64 / 1e6,
        rss_before as f64 / 1e6,
        rss_after as f64 / 1e6
    );
    println!(
        "etcd: {:.2} CPU seconds while the clients read and watched; RSS {:.0} MB -> {:.0} MB; {watchers} watchers; {:.1} MB sent",
        cpu1 - cpu0,
        etcd_rss_before as f64 / 1e6,
        rss_bytes(etcd_pid) as f64 / 1e6,
        (sent1 - sent0) / 1e6
    );
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
