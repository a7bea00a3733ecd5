//! The `gofe` command line, run as a user would run it. No root needed.

// The end-to-end tests' OTLP receiver, on loopback here.
#[path = "e2e/otlp.rs"]
#[allow(dead_code)]
mod otlp;

use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn gofe(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gofe"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("gofe runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_proxy_configuration_exits_2_naming_every_bad_variable() {
    let out = gofe(
        &["proxy"],
        &[
            ("GOFE_DETECT_TIMEOUT", "soon"),
            ("GOFE_INBOUND_LISTEN", "nowhere"),
            ("GOFE_LOG_FORMAT", "xml"),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    for needle in [
        "GOFE_DETECT_TIMEOUT=\"soon\"",
        "GOFE_INBOUND_LISTEN=\"nowhere\"",
        "GOFE_LOG_FORMAT=\"xml\"",
    ] {
        assert!(err.contains(needle), "{needle} in {err}");
    }
}

#[test]
fn listener_in_use_exits_1_naming_the_variable() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = gofe(
        &["proxy"],
        &[
            ("GOFE_IDENTITY_DISABLED", "true"),
            ("GOFE_OUTBOUND_LISTEN", addr.as_str()),
            ("GOFE_INBOUND_LISTEN", "127.0.0.1:0"),
            ("GOFE_ADMIN_LISTEN", "127.0.0.1:0"),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("GOFE_OUTBOUND_LISTEN"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_init_flag_exits_2_under_the_variable_name() {
    let out = gofe(&["init", "--dry-run", "--proxy-uid", "gofe"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("GOFE_PROXY_UID=\"gofe\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn await_gives_up_with_exit_1_when_no_proxy_answers() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let start = Instant::now();
    let out = gofe(
        &[
            "await",
            "--admin",
            &closed.to_string(),
            "--timeout",
            "500ms",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not ready within"),
        "{}",
        stderr(&out)
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// How `child` exited, waiting up to 30 seconds for it; `what` says what failed.
fn exit_of(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An ordinary sidecar container's order: `gofe await` (the postStart hook) returns
/// only once the proxy is ready, and a Job's last container ends the proxy with
/// `POST /shutdown`, after which it exits 0.
#[test]
fn await_returns_once_the_proxy_is_ready_and_shutdown_ends_it() {
    let admin = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut waiting = Command::new(env!("CARGO_BIN_EXE_gofe"))
        .args(["await", "--admin", &admin.to_string(), "--timeout", "60s"])
        .spawn()
        .unwrap();
    // Not ready before the proxy exists.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "await returned early"
    );
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_gofe"))
        .arg("proxy")
        .env_clear()
        .envs([
            ("GOFE_IDENTITY_DISABLED", "true"),
            ("GOFE_OUTBOUND_LISTEN", "127.0.0.1:0"),
            ("GOFE_INBOUND_LISTEN", "127.0.0.1:0"),
            ("GOFE_ADMIN_LISTEN", &admin.to_string()),
            ("GOFE_LOG", "warn"),
        ])
        .spawn()
        .unwrap();
    let status = exit_of(&mut waiting, "await never returned");
    assert!(status.success(), "await: {status}");
    // The Job is done: its container asks the proxy to go.
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"POST /shutdown HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let exited = exit_of(&mut proxy, "the proxy did not exit after /shutdown");
    assert!(exited.success(), "proxy: {exited}");
}

/// The shop window: the demo runs without root; every request succeeds through the
/// sidecars although one api replica fails most of its requests (retries save them,
/// the replica is ejected); it drains and exits cleanly at the end of `--duration`,
/// and its spans reach the collector named by GOFE_TRACE_COLLECTOR.
#[test]
fn demo_runs_and_drains_cleanly() {
    let collector = otlp::Receiver::start_on_loopback().unwrap();
    let collector_url = collector.grpc_url();
    // 30 consecutive ports: take a free one as the base and hope its neighbours are
    // free too; retry with another base when they are not.
    let mut last = None;
    for _ in 0..5 {
        let base = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if base > 65_000 {
            continue;
        }
        let out = gofe(
            &[
                "demo",
                "--duration",
                "8s",
                "--rate",
                "100",
                "--port-base",
                &base.to_string(),
            ],
            &[("GOFE_TRACE_COLLECTOR", &collector_url)],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if stderr(&out).contains("cannot listen") {
            last = Some(stderr(&out));
            continue;
        }
        assert!(out.status.success(), "{text}\n{}", stderr(&out));
        assert!(text.contains(" 0 failed"), "{text}");
        for sidecar in ["web", "api-1", "api-2", "api-3"] {
            assert!(
                text.contains(&format!("{sidecar} sidecar drained")),
                "{text}"
            );
        }
        assert!(text.contains("web sidecar ejected api-2"), "{text}");
        // The kubelet's rewritten probes, answered by the sidecars' admin ports.
        for line in [
            "api-1 GET 127.0.0.1:",
            "/app-health/api/livez  200  GET http://127.0.0.1:",
            "/app-health/api/readyz 200  TCP connection to 127.0.0.1:",
        ] {
            assert!(text.contains(line), "{line:?} not in {text}");
        }
        let retried = text
            .lines()
            .find(|l| l.contains("web sidecar retried"))
            .unwrap();
        assert!(!retried.contains("retried 0 calls"), "{text}");
        assert!(
            text.contains("over mTLS to spiffe://cluster.local/ns/demo/sa/api"),
            "{text}"
        );
        let client_line = text.lines().find(|l| l.contains("client:")).unwrap();
        let statuses = client_line
            .split("statuses {")
            .nth(1)
            .and_then(|r| r.split('}').next())
            .unwrap();
        assert!(
            statuses.starts_with("200: ") && !statuses.contains(','),
            "only 200s: {text}"
        );
        let ok: u64 = statuses["200: ".len()..].parse().unwrap();
        assert!(ok >= 500, "a steady stream for 8s at 100/s: {text}");
        // With etcd on the PATH (tests/setup.sh installs it), the registry's part:
        // replicas registered, one killed and its lease expired, a policy pushed live.
        let has_etcd = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file()));
        if has_etcd {
            for line in [
                "every api sidecar registers api.demo:80",
                "api-4's sidecar killed (kill -9)",
                "api-4's lease expired",
                "pushed to etcd: api's policy with lb round-robin",
            ] {
                assert!(text.contains(line), "{line:?} missing: {text}");
            }
        } else {
            assert!(text.contains("no etcd on the PATH"), "{text}");
        }
        // The traffic-rules stories: the polite client is never limited, and no request
        // fails on the replica whose health check fails.
        assert!(text.contains("2. rate limit 20/s per client"), "{text}");
        assert!(
            text.contains("ok, 0 got 429\n"),
            "the polite client: {text}"
        );
        assert!(
            text.contains("requests failed: 0"),
            "the health check: {text}"
        );
        // The limits story: a slowloris flood meets the connection cap and the head
        // timeout (each counted), and every one of the polite client's requests passes.
        let polite = text
            .lines()
            .find(|l| l.contains("polite client:") && l.contains("during the flood"))
            .unwrap_or_else(|| panic!("no limits story: {text}"));
        let counts: Vec<u64> = polite
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert!(
            counts.len() >= 2 && counts[0] == counts[1] && counts[0] > 0,
            "{polite}"
        );
        let sidecar = text
            .lines()
            .find(|l| l.contains("flood connections closed at once at the cap"))
            .unwrap_or_else(|| panic!("no limits counts: {text}"));
        let tripped: Vec<u64> = sidecar
            .split_whitespace()
            .filter_map(|w| w.trim_end_matches(',').parse().ok())
            .collect();
        assert!(
            tripped.len() >= 2 && tripped[0] > 0 && tripped[1] > 0,
            "both bounds held and were counted: {sidecar}"
        );
        // The histograms count what the client sent, per sidecar and direction.
        let web_inbound = text
            .lines()
            .find(|l| l.trim_start().starts_with("web      inbound"))
            .unwrap_or_else(|| panic!("no latency line for web's inbound: {text}"));
        let counted: u64 = web_inbound
            .split_whitespace()
            .nth(3)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(counted, ok, "{web_inbound}");
        // A trace through both hops, with the retry that saved it.
        let trace = text
            .split("one request's trace ")
            .nth(1)
            .unwrap_or_else(|| panic!("no trace printed: {text}"));
        assert!(trace.contains("the web sidecar retried it"), "{text}");
        for hop in [
            "web sidecar SERVER",
            "web sidecar CLIENT",
            "api-2 sidecar SERVER",
        ] {
            assert!(trace.contains(hop), "{hop} missing from the trace: {text}");
        }
        // Drained sidecars have exported everything: web made a SERVER and a CLIENT
        // span per request, api a SERVER span per attempt.
        let mut services = std::collections::BTreeMap::<String, usize>::new();
        for span in collector.spans() {
            *services.entry(span.service).or_default() += 1;
        }
        assert_eq!(
            services.get("web").copied().unwrap_or(0) as u64,
            2 * ok,
            "spans at the collector: {services:?}"
        );
        // (api-4's sidecar, killed with kill -9, loses the spans it had queued: up to a
        // second's worth.)
        let api_spans = services.get("api").copied().unwrap_or(0) as u64;
        assert!(
            if has_etcd {
                api_spans * 10 > ok * 9
            } else {
                api_spans > ok
            },
            "api's spans (one per attempt, retries included): {services:?}"
        );
        return;
    }
    panic!("no free port range for the demo: {last:?}");
}

/// Every variable the code declares is in the README's reference, with its default.
#[test]
fn readme_documents_every_variable() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    use gofe_proxy::config::{INIT_VARS, ISSUER_VARS, POLICY_VARS, PROXY_VARS};
    for var in PROXY_VARS
        .iter()
        .chain(INIT_VARS)
        .chain(ISSUER_VARS)
        .chain(POLICY_VARS)
    {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", var.name)))
            .unwrap_or_else(|| panic!("README has no row for {}", var.name));
        // Each proxy and init setting has its annotation: config.gofe.io/<name>.
        // The injector makes GOFE_IDENTITY_NAME and GOFE_APP_PROBES itself.
        if !var.name.starts_with("GOFE_ISSUER_")
            && !["GOFE_IDENTITY_NAME", "GOFE_APP_PROBES"].contains(&var.name)
        {
            let annotation = format!(
                "`config.gofe.io/{}`",
                var.name["GOFE_".len()..].to_lowercase().replace('_', "-")
            );
            assert!(
                row.contains(&annotation),
                "README's row for {} does not give its annotation {annotation}: {row}",
                var.name
            );
        }
        if !var.default.is_empty() {
            assert!(
                row.contains(&format!("`{}`", var.default)),
                "README's row for {} does not give its default {:?}: {row}",
                var.name,
                var.default
            );
        }
    }
}

/// Every test SECURITY.md (and RELIABILITY.md, once it exists) names as proof exists.
#[test]
fn the_security_and_reliability_tables_name_real_tests() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = String::new();
    fn walk(dir: &std::path::Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = entry.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if p.is_dir() && name != "target" && !name.starts_with('.') {
                walk(&p, out);
            } else if name.ends_with(".rs") {
                out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    for dir in ["src", "proxy", "identity", "telemetry", "tests", "fuzz"] {
        walk(&root.join(dir), &mut sources);
    }
    for doc in ["SECURITY.md", "RELIABILITY.md"] {
        let Ok(text) = std::fs::read_to_string(root.join(doc)) else {
            continue;
        };
        let mut named = 0;
        for cell in text.split('`').skip(1).step_by(2) {
            let Some((_, test)) = cell.split_once("::") else {
                continue;
            };
            if test.is_empty()
                || !test
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '*')
            {
                continue;
            }
            named += 1;
            // `refuses_*` names a family of tests.
            let needle = match test.strip_suffix('*') {
                Some(prefix) => format!("fn {prefix}"),
                None => format!("fn {test}("),
            };
            assert!(
                sources.contains(&needle),
                "{doc} names {cell}, but no such test exists"
            );
        }
        assert!(named > 10, "{doc} names its tests ({named} found)");
    }
}
