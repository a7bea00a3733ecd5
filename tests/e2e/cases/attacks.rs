//! The attack suite (RELIABILITY.md): each attack is sent, with real tools, at a
//! sidecar's inbound listener from a pod without a sidecar, while a meshed client's
//! legitimate requests keep flowing through its own sidecar to the same application.
//! Each case asserts that the victim's memory stays under a stated bound, that its CPU
//! goes back to idle once the attack stops, that at least 99% of the legitimate
//! requests sent meanwhile succeed, and that the bound that held is counted. Each
//! prints one `attack:` line with its figures. The floods are named `attack_*`:
//! tests/run runs them alone, one at a time, after the other cases.

use super::{HTTP_PORT, require_tool};
use crate::harness::{ADMIN_PORT, Outcome, Pod, Steady, World, eventually};
use anyhow::{Context, ensure};
use std::time::{Duration, Instant};

crate::cases::register![
    attack_http2_rapid_reset_is_bounded,
    attack_http2_continuation_flood_is_bounded,
    attack_http2_settings_flood_is_bounded,
    attack_http2_ping_flood_is_bounded,
    attack_http2_empty_frame_flood_is_bounded,
    attack_http2_slow_reader_on_every_stream_is_bounded,
    attack_slowloris_is_bounded,
    attack_slow_post_is_bounded,
    attack_twenty_thousand_held_connections_are_bounded,
    sixty_kib_headers_pass_every_hop_and_larger_heads_get_431,
    attack_live_answers_within_a_second_under_an_admin_flood,
];

/// Legitimate requests a second during an attack.
const LEGIT_RATE: u32 = 200;
const ATTACK_SECONDS: u64 = 8;
const DEADLINE: Duration = Duration::from_secs(30);

/// The victim, its legitimate client, and the attacker.
struct Scene<'w> {
    server: Pod<'w>,
    client: Pod<'w>,
    attacker: Pod<'w>,
}

fn scene<'w>(w: &'w World, server_env: &[(&str, &str)]) -> anyhow::Result<Scene<'w>> {
    let mut server = w.pod("server").sidecar();
    for (k, v) in server_env {
        server = server.env(k, v);
    }
    let server = server.start()?;
    server.app("http", HTTP_PORT)?;
    let client = w.pod("client").sidecar().start()?;
    let attacker = w.pod("attacker").start()?;
    Ok(Scene {
        server,
        client,
        attacker,
    })
}

/// What an attack came to.
struct Report {
    legit: Outcome,
    peak_rss_mib: f64,
    attack: String,
}

/// Runs `attack` (from the attacker's pod) while legitimate traffic flows, then checks
/// the bounds: peak RSS under `rss_mib`, ≥ 99% legitimate success, CPU back to idle.
fn under_attack(
    name: &str,
    s: &Scene<'_>,
    rss_mib: f64,
    attack: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<Report> {
    let load = Steady::start(
        &s.client,
        (s.server.ip4, HTTP_PORT),
        LEGIT_RATE,
        "server",
        "/",
    )?;
    eventually("the legitimate traffic flows", DEADLINE, || {
        Ok((load.ok() > 50).then_some(()))
    })?;
    let before_rss = s.server.proxy_rss()? as f64 / (1 << 20) as f64;
    let attack = attack()?;
    let legit = load.stop()?;
    let peak_rss_mib = s.server.proxy_peak_rss()? as f64 / (1 << 20) as f64;
    let tripped: Vec<String> = s
        .server
        .metrics()?
        .0
        .lines()
        .filter(|l| l.starts_with("gofe_limits_tripped_total{"))
        .map(|l| {
            l.trim_start_matches("gofe_limits_tripped_total")
                .to_string()
        })
        .collect();
    println!(
        "attack: {name}: legitimate {}/{} ok ({:.2}%), victim RSS {before_rss:.1} MiB before, peak {peak_rss_mib:.1} MiB; {attack}; limits tripped {tripped:?}; errors {:?}",
        legit.ok,
        legit.ok + legit.failed,
        legit.success_ratio() * 100.0,
        legit.errors
    );
    ensure!(
        legit.success_ratio() >= 0.99,
        "{name}: {} of {} legitimate requests failed: {:?}",
        legit.failed,
        legit.ok + legit.failed,
        legit.errors
    );
    ensure!(
        peak_rss_mib < rss_mib,
        "{name}: the victim's memory peaked at {peak_rss_mib:.1} MiB (bound {rss_mib} MiB)"
    );
    cpu_back_to_idle(&s.server, name)?;
    Ok(Report {
        legit,
        peak_rss_mib,
        attack,
    })
}

/// The proxy uses under 5% of a core over a second, within the deadline.
fn cpu_back_to_idle(pod: &Pod<'_>, name: &str) -> anyhow::Result<()> {
    eventually(
        &format!("{name}: the victim's CPU back to idle"),
        DEADLINE,
        || {
            let start = (pod.proxy_cpu_seconds()?, Instant::now());
            std::thread::sleep(Duration::from_secs(1));
            let used = (pod.proxy_cpu_seconds()? - start.0) / start.1.elapsed().as_secs_f64();
            Ok((used < 0.05).then_some(()))
        },
    )
}

/// The Python h2 attack script, from the attacker's pod, for the attack's length.
fn h2_attack(s: &Scene<'_>, mode: &str, connections: u32) -> anyhow::Result<String> {
    require_tool("python3")?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/attacks/h2_attack.py");
    let out = s.attacker.in_ns(|| {
        std::process::Command::new("python3")
            .arg(script)
            .arg(mode)
            .arg(s.server.ip4.to_string())
            .arg(HTTP_PORT.to_string())
            .args(["--seconds", &ATTACK_SECONDS.to_string()])
            .args(["--connections", &connections.to_string()])
            .args(["--authority", "server"])
            .output()
    })??;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // The script exits non-zero when it sent nothing or one of its threads failed:
    // an attack that never happened must not pass for a defence that held.
    ensure!(
        out.status.success() && stdout.starts_with('{'),
        "the attack script failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// The victim counted `limit` (at its inbound listener) at least once.
fn tripped(pod: &Pod<'_>, limit: &str) -> anyhow::Result<f64> {
    let m = pod.metrics()?;
    Ok(m.sum(
        "gofe_limits_tripped_total",
        &[("limit", limit), ("at", "inbound")],
    ))
}

fn flood(w: &World, mode: &str, connections: u32, rss_mib: f64) -> anyhow::Result<()> {
    let s = scene(w, &[])?;
    let r = under_attack(mode, &s, rss_mib, || h2_attack(&s, mode, connections))?;
    let _ = (r.legit, r.peak_rss_mib);
    Ok(())
}

pub fn attack_http2_rapid_reset_is_bounded(w: &World) -> anyhow::Result<()> {
    let s = scene(w, &[])?;
    let r = under_attack("rapid reset", &s, 64.0, || h2_attack(&s, "rapid-reset", 4))?;
    let summary: serde_json::Value = serde_json::from_str(&r.attack)?;
    ensure!(
        summary["goaways"].as_u64().unwrap_or(0) > 0
            || summary["closed_by_server"].as_u64().unwrap_or(0) > 0,
        "the server sent rapid resetters away: {summary}"
    );
    ensure!(
        tripped(&s.server, "http2_protocol")? >= 1.0,
        "and counted it"
    );
    Ok(())
}

pub fn attack_http2_continuation_flood_is_bounded(w: &World) -> anyhow::Result<()> {
    let s = scene(w, &[])?;
    let r = under_attack("CONTINUATION flood", &s, 64.0, || {
        h2_attack(&s, "continuation", 4)
    })?;
    let summary: serde_json::Value = serde_json::from_str(&r.attack)?;
    ensure!(
        summary["closed_by_server"].as_u64().unwrap_or(0) > 0,
        "an endless header block is cut off: {summary}"
    );
    Ok(())
}

pub fn attack_http2_settings_flood_is_bounded(w: &World) -> anyhow::Result<()> {
    flood(w, "settings", 4, 64.0)
}

pub fn attack_http2_ping_flood_is_bounded(w: &World) -> anyhow::Result<()> {
    flood(w, "ping", 4, 64.0)
}

pub fn attack_http2_empty_frame_flood_is_bounded(w: &World) -> anyhow::Result<()> {
    flood(w, "empty-frames", 4, 64.0)
}

pub fn attack_http2_slow_reader_on_every_stream_is_bounded(w: &World) -> anyhow::Result<()> {
    // Each of 8 connections opens 1024 streams for a 1 MiB response and reads none of
    // it: what the victim may hold is bounded by its per-stream send buffer, and the
    // requests one unmeshed address may have in flight by half the port's limit, so
    // the meshed client keeps its share.
    let s = scene(w, &[])?;
    under_attack("slow reader", &s, 160.0, || h2_attack(&s, "slow-reader", 8))?;
    ensure!(
        tripped(&s.server, "source_share")? >= 1.0,
        "the slow reader was held to its share of the port, and that was counted"
    );
    Ok(())
}

/// slowhttptest from the attacker's pod against the victim.
fn slowhttptest(s: &Scene<'_>, mode: &str, connections: u32) -> anyhow::Result<String> {
    require_tool("slowhttptest")?;
    let url = format!("http://{}:{HTTP_PORT}/sink", s.server.ip4);
    let out = s.attacker.in_ns(|| {
        std::process::Command::new("slowhttptest")
            .arg(mode)
            .args(["-c", &connections.to_string()])
            .args(["-r", "200"])
            .args(["-i", "1"])
            .args(["-l", &ATTACK_SECONDS.to_string()])
            .args(["-u", &url])
            .args(["-s", "65536"])
            .output()
    })??;
    // Its report is coloured: drop the escape sequences.
    let raw = String::from_utf8_lossy(&out.stdout);
    let mut parts = raw.split('\x1b');
    let mut text = parts.next().unwrap_or_default().to_string();
    for part in parts {
        text.push_str(part.split_once('m').map_or(part, |(_, rest)| rest));
    }
    let last = text
        .lines()
        .rev()
        .find(|l| l.contains("connected") || l.contains("closed"))
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    Ok(format!(
        "slowhttptest {mode} {connections} connections: {last}"
    ))
}

pub fn attack_slowloris_is_bounded(w: &World) -> anyhow::Result<()> {
    // Heads must arrive within 2 s of their first byte here (10 s by default): the
    // attack lasts long enough for the bound to cut its connections.
    let s = scene(w, &[("GOFE_HTTP_HEADER_READ_TIMEOUT", "2s")])?;
    under_attack("slowloris", &s, 96.0, || slowhttptest(&s, "-H", 1000))?;
    ensure!(
        tripped(&s.server, "header_read_timeout")? >= 1.0,
        "slow heads were cut off and counted"
    );
    Ok(())
}

pub fn attack_slow_post_is_bounded(w: &World) -> anyhow::Result<()> {
    let s = scene(w, &[])?;
    under_attack("slow POST", &s, 96.0, || slowhttptest(&s, "-B", 1000))?;
    Ok(())
}

pub fn attack_twenty_thousand_held_connections_are_bounded(w: &World) -> anyhow::Result<()> {
    // The listener takes at most GOFE_MAX_CONNECTIONS (20000): the attacker's 20000
    // connections fill it but for the legitimate client's, which came first.
    let s = scene(w, &[])?;
    let ip = s.server.ip4;
    let held = std::sync::atomic::AtomicU64::new(0);
    under_attack("20000 held connections", &s, 512.0, || {
        let held = &held;
        s.attacker.block_on(|| async move {
            raise_fd_limit();
            let mut conns = Vec::with_capacity(20_000);
            let until = tokio::time::Instant::now() + Duration::from_secs(40);
            while conns.len() < 20_000 && tokio::time::Instant::now() < until {
                let batch: Vec<_> = (0..500)
                    .map(|_| tokio::net::TcpStream::connect((ip, HTTP_PORT)))
                    .collect();
                let opened = futures_util::future::join_all(batch).await;
                conns.extend(opened.into_iter().flatten());
            }
            held.store(conns.len() as u64, std::sync::atomic::Ordering::Relaxed);
            // Held for the attack's length, saying nothing.
            tokio::time::sleep(Duration::from_secs(ATTACK_SECONDS)).await;
            drop(conns);
            anyhow::Ok(())
        })??;
        Ok(format!(
            "{} connections opened and held",
            held.load(std::sync::atomic::Ordering::Relaxed)
        ))
    })?;
    ensure!(
        held.load(std::sync::atomic::Ordering::Relaxed) >= 19_000,
        "the attack held its connections"
    );
    Ok(())
}

/// The test process may open tens of thousands of sockets (and other cases run beside
/// it in the same process): as root it may raise its hard limit too.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANT: u64 = 1 << 20;
    if setrlimit(Resource::RLIMIT_NOFILE, WANT, WANT).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

pub fn sixty_kib_headers_pass_every_hop_and_larger_heads_get_431(w: &World) -> anyhow::Result<()> {
    let (client, server) = super::meshed_pair(w, &[])?;
    let outsider = w.pod("outsider").start()?;
    let url = format!("http://{}:{HTTP_PORT}/headers", server.ip4);
    let cookie = |kib: usize| format!("Cookie: c={}", "a".repeat(kib * 1024));
    let code = |pod: &Pod<'_>, kib: usize| -> anyhow::Result<String> {
        pod.curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &cookie(kib),
            &url,
        ])
        .context("curl")
    };
    // Through two sidecars over mTLS (HTTP/1 into the client's, HTTP/2 between them),
    // and in plaintext straight into the server's: one limit everywhere.
    ensure!(code(&client, 60)? == "200", "60 KiB over the mesh");
    ensure!(code(&outsider, 60)? == "200", "60 KiB in plaintext");
    ensure!(
        code(&client, 70)? == "431",
        "70 KiB refused at the first hop"
    );
    ensure!(code(&outsider, 70)? == "431", "70 KiB refused in plaintext");
    ensure!(
        client
            .metrics()?
            .sum("gofe_limits_tripped_total", &[("limit", "header_size")])
            >= 1.0,
        "counted"
    );
    Ok(())
}

pub fn attack_live_answers_within_a_second_under_an_admin_flood(w: &World) -> anyhow::Result<()> {
    // The attacker opens connections to the admin port as fast as it can, each sending
    // half a request head and then nothing, and holds up to 19,000 of them (near this
    // machine's file limit: uncapped, the victim would run out of descriptors for
    // everything). Meanwhile the kubelet's probe, from another pod and on a fresh
    // connection each time as the kubelet sends it, asks /live every 100 ms, and the
    // legitimate traffic flows.
    let s = scene(w, &[])?;
    let (ip, kubelet) = (s.server.ip4, w.pod("kubelet").start()?);
    let attacking = std::sync::atomic::AtomicBool::new(true);
    let opened = std::sync::atomic::AtomicU64::new(0);
    let mut probes = Vec::new();
    under_attack("admin flood", &s, 512.0, || {
        std::thread::scope(|scope| -> anyhow::Result<String> {
            let flood = scope.spawn(|| {
                s.attacker.block_on(|| async {
                    use tokio::io::AsyncWriteExt;
                    raise_fd_limit();
                    let mut held = std::collections::VecDeque::new();
                    while attacking.load(std::sync::atomic::Ordering::Relaxed) {
                        let connect = tokio::net::TcpStream::connect((ip, ADMIN_PORT));
                        if let Ok(Ok(mut c)) =
                            tokio::time::timeout(Duration::from_secs(1), connect).await
                        {
                            let _ = c.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n").await;
                            opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            held.push_back(c);
                            if held.len() > 19_000 {
                                held.pop_front();
                            }
                        }
                    }
                })
            });
            eventually("the flood is under way", DEADLINE, || {
                Ok((opened.load(std::sync::atomic::Ordering::Relaxed) > 2000).then_some(()))
            })?;
            probes = kubelet.block_on(|| async {
                let mut took = Vec::new();
                for _ in 0..50 {
                    let start = Instant::now();
                    let answered = tokio::time::timeout(Duration::from_secs(5), probe(ip)).await;
                    took.push(match answered {
                        Ok(Ok(())) => Ok(start.elapsed()),
                        Ok(Err(e)) => Err(format!("{e:#}")),
                        Err(_) => Err("no answer in 5 s".to_string()),
                    });
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                took
            })?;
            attacking.store(false, std::sync::atomic::Ordering::Relaxed);
            flood
                .join()
                .map_err(|_| anyhow::anyhow!("the flood panicked"))??;
            Ok(format!(
                "{} connections opened",
                opened.load(std::sync::atomic::Ordering::Relaxed)
            ))
        })
    })?;
    let failed: Vec<&String> = probes.iter().filter_map(|p| p.as_ref().err()).collect();
    let slowest = probes.iter().filter_map(|p| p.as_ref().ok()).max();
    println!(
        "attack: admin flood: /live asked {} times, slowest answer {slowest:?}, failed {failed:?}",
        probes.len()
    );
    ensure!(
        failed.is_empty(),
        "/live failed under the flood: {failed:?}"
    );
    ensure!(
        slowest.is_some_and(|s| *s < Duration::from_secs(1)),
        "/live took {slowest:?} under the flood"
    );
    ensure!(
        s.server.metrics()?.sum(
            "gofe_limits_tripped_total",
            &[("limit", "admin_connections")]
        ) >= 1.0,
        "the admin server's cap held, and that was counted"
    );
    Ok(())
}

/// One probe as the kubelet sends it: a fresh connection, `Connection: close`.
async fn probe(ip: std::net::Ipv4Addr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect((ip, ADMIN_PORT)).await?;
    c.write_all(b"GET /live HTTP/1.1\r\nHost: kubelet\r\nConnection: close\r\n\r\n")
        .await?;
    let mut rsp = Vec::new();
    c.read_to_end(&mut rsp).await?;
    ensure!(
        rsp.starts_with(b"HTTP/1.1 200"),
        "/live said {:?}",
        String::from_utf8_lossy(&rsp)
    );
    Ok(())
}
