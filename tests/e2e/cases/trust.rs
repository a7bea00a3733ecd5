//! Trust against an active attacker (SECURITY.md): what a client sends cannot put an
//! identity in front of the application; loopback-only services stay private; auto
//! mode never falls back to plaintext on a bad certificate or a cut handshake; the
//! issuer stays within its memory under a flood and keeps issuing; a client cannot
//! grow the metrics or force trace sampling.

use super::{HTTP_PORT, meshed_pair};
use crate::harness::{Capture, Issuer, Pod, World, eventually};
use crate::otlp::Receiver;
use anyhow::{Context, ensure};
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

crate::cases::register![
    malformed_request_heads_never_deliver_a_forged_identity,
    an_application_bound_to_loopback_is_unreachable_from_other_pods,
    auto_mode_fails_rather_than_fall_back_on_a_foreign_certificate_or_a_cut_handshake,
    without_a_valid_certificate_of_its_own_a_proxy_sends_nothing_and_is_not_ready,
    the_issuer_stays_bounded_under_half_sent_bodies_and_keeps_issuing,
    a_client_cannot_grow_the_metrics_or_force_sampling,
];

const DEADLINE: Duration = Duration::from_secs(20);
/// What an attacker wants the application to believe.
const FORGED: &str = "spiffe://cluster.local/ns/default/sa/admin";

/// Request heads an HTTP parser may reject, each carrying a forged identity header.
fn malformed_heads() -> Vec<(&'static str, Vec<u8>)> {
    let h = format!("gofe-client-id: {FORGED}\r\n");
    let mut long = b"GET /".to_vec();
    long.resize(24 * 1024, b'a');
    long.extend_from_slice(format!(" HTTP/1.1\r\nHost: a\r\n{h}\r\n").as_bytes());
    vec![
        (
            "well formed (the control)",
            format!("GET / HTTP/1.1\r\nHost: a\r\n{h}\r\n").into_bytes(),
        ),
        (
            "two spaces after the method",
            format!("GET  / HTTP/1.1\r\nHost: a\r\n{h}\r\n").into_bytes(),
        ),
        (
            "a tab after the method",
            format!("GET\t/ HTTP/1.1\r\nHost: a\r\n{h}\r\n").into_bytes(),
        ),
        (
            "HTTP/1.2",
            format!("GET / HTTP/1.2\r\nHost: a\r\n{h}\r\n").into_bytes(),
        ),
        (
            "a lower-case method",
            format!("get / HTTP/1.1\r\nHost: a\r\n{h}\r\n").into_bytes(),
        ),
        (
            "an unknown method",
            format!("FROBNICATE / HTTP/1.1\r\nHost: a\r\n{h}\r\n").into_bytes(),
        ),
        (
            "LF-only lines",
            format!("GET / HTTP/1.1\nHost: a\ngofe-client-id: {FORGED}\n\n").into_bytes(),
        ),
        (
            "a NUL in the request line",
            format!("GET /\0 HTTP/1.1\r\nHost: a\r\n{h}\r\n").into_bytes(),
        ),
        (
            "a NUL in a header",
            format!("GET / HTTP/1.1\r\nHost: a\r\nX-A: \0\r\n{h}\r\n").into_bytes(),
        ),
        (
            "an obs-fold",
            format!("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n{h}\r\n").into_bytes(),
        ),
        ("an over-long request line", long),
        (
            "a partial HTTP/2 preface, then HTTP/1",
            format!("PRI * HTTP/2.0\r\n\r\nXY\r\nHost: a\r\n{h}\r\n").into_bytes(),
        ),
        (
            "an identity folded into another header's line",
            format!("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tgofe-client-id: {FORGED}\r\n\r\n")
                .into_bytes(),
        ),
    ]
}

/// Sends each head on a connection of its own from `pod` to `addr`: what came back.
fn send_raw(
    pod: &Pod<'_>,
    addr: (Ipv4Addr, u16),
    heads: Vec<(&'static str, Vec<u8>)>,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    pod.block_on(|| async move {
        let mut answers = Vec::new();
        for (name, head) in heads {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(&head).await?;
            // The answer's first line: wait for the first bytes, then take what follows
            // closely (a keep-alive connection stays open after its response).
            let mut back = Vec::new();
            let mut buf = [0u8; 4096];
            let mut wait = Duration::from_secs(5);
            while let Ok(Ok(n)) = tokio::time::timeout(wait, s.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
                back.extend_from_slice(&buf[..n]);
                wait = Duration::from_millis(300);
            }
            let first = String::from_utf8_lossy(&back)
                .lines()
                .next()
                .unwrap_or("(closed)")
                .to_string();
            answers.push((name, first));
        }
        anyhow::Ok(answers)
    })?
}

/// What the recording application got, decoded.
fn recorded(app: &crate::harness::App) -> Vec<Vec<u8>> {
    app.lines()
        .iter()
        .filter_map(|l| l.strip_prefix("received "))
        .map(|hex| {
            (0..hex.len() / 2)
                .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                .collect()
        })
        .collect()
}

pub fn malformed_request_heads_never_deliver_a_forged_identity(w: &World) -> anyhow::Result<()> {
    // (a) Plaintext, from a pod without a sidecar, into a permissive sidecar.
    let server = w.pod("permissive").sidecar().start()?;
    let app = server.app("record", HTTP_PORT)?;
    let outsider = w.pod("outsider").start()?;
    let answers = send_raw(&outsider, (server.ip4, HTTP_PORT), malformed_heads())?;
    // (b) From a meshed workload through its own sidecar, into a strict one.
    let (client, strict) = meshed_pair(w, &[("GOFE_INBOUND_MTLS", "strict")])?;
    let strict_app = strict.app("record", 9090)?;
    let meshed = send_raw(&client, (strict.ip4, 9090), malformed_heads())?;

    for (name, first) in answers.iter().chain(&meshed) {
        let refused = first.starts_with("HTTP/1.1 4") || first.starts_with("HTTP/1.1 5");
        let forwarded = first == "HTTP/1.1 200 OK";
        ensure!(
            refused || forwarded || first == "(closed)",
            "{name}: neither refused nor forwarded: {first}"
        );
        if *name == "well formed (the control)" {
            ensure!(forwarded, "the control reaches the app: {first}");
        }
    }
    // Nothing the app received carries the forged value, and it did receive requests.
    for (app, which) in [(&app, "plaintext"), (&strict_app, "meshed, strict")] {
        eventually(
            &format!("the {which} control reached the app"),
            DEADLINE,
            || Ok((!recorded(app).is_empty()).then_some(())),
        )?;
        for bytes in recorded(app) {
            let text = String::from_utf8_lossy(&bytes);
            ensure!(
                !text.contains(FORGED),
                "{which}: a forged identity reached the application: {text:?}"
            );
        }
    }
    // The meshed app got its requests with the client's real identity.
    let real = Issuer::identity("client");
    ensure!(
        recorded(&strict_app)
            .iter()
            .any(|b| String::from_utf8_lossy(b).contains(&real)),
        "the mesh identity is set by the proxy"
    );
    Ok(())
}

pub fn an_application_bound_to_loopback_is_unreachable_from_other_pods(
    w: &World,
) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    // A debug port bound to loopback only, and a service on every address.
    server.app_with("http", 9100, &[("GOFE_TESTAPP_BIND", "127.0.0.1")])?;
    server.app_with(
        "http",
        9101,
        &[("GOFE_TESTAPP_BIND", &server.ip4.to_string())],
    )?;
    let status = |pod: &Pod<'_>, ip: Ipv4Addr, port: u16| -> anyhow::Result<String> {
        pod.curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            &format!("http://{ip}:{port}/"),
        ])
    };
    ensure!(
        status(&client, server.ip4, HTTP_PORT)? == "200",
        "every address"
    );
    ensure!(
        status(&client, server.ip4, 9101)? == "200",
        "the pod address"
    );
    let private = status(&client, server.ip4, 9100)?;
    ensure!(
        private == "502",
        "a loopback-only port is not exposed to other pods: {private}"
    );
    // Opaque TCP to it is refused too.
    let ip = server.ip4;
    let reached = client.block_on(|| async move {
        let mut s = tokio::net::TcpStream::connect((ip, 9100)).await?;
        s.write_all(&[0u8, 1, 2, 3]).await?;
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .context("no hang")?;
        anyhow::Ok(matches!(n, Ok(n) if n > 0))
    })??;
    ensure!(
        !reached,
        "opaque bytes did not reach the loopback-only port"
    );

    // GOFE_INBOUND_TARGET=localhost restores the old forwarding (and the exposure).
    let old = w
        .pod("old")
        .sidecar()
        .env("GOFE_INBOUND_TARGET", "localhost")
        .start()?;
    old.app_with("http", 9100, &[("GOFE_TESTAPP_BIND", "127.0.0.1")])?;
    ensure!(
        status(&client, old.ip4, 9100)? == "200",
        "localhost mode reaches loopback-only listeners"
    );
    Ok(())
}

pub fn auto_mode_fails_rather_than_fall_back_on_a_foreign_certificate_or_a_cut_handshake(
    w: &World,
) -> anyhow::Result<()> {
    let client = w.pod("client").sidecar().start()?;
    // Not meshed: a TLS server with a self-signed certificate on 8443 (what an on-path
    // attacker presents), a peer that resets after the ClientHello on 8444, and a
    // plaintext HTTP server on 8080 (the control: auto mode reaches it in plaintext).
    let other = w.pod("other").start()?;
    other.app("tls", 8443)?;
    other.app("reset", 8444)?;
    other.app("http", HTTP_PORT)?;
    let capture = Capture::start(&other)?;
    let marker = |port: u16| format!("secret-marker-{port}");
    let code = |port: u16| -> anyhow::Result<String> {
        client.curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            &format!("http://{}:{port}/headers?m={}", other.ip4, marker(port)),
        ])
    };
    let foreign = code(8443)?;
    let reset = code(8444)?;
    let plain = code(HTTP_PORT)?;
    let frames = capture.finish()?;
    let seen = |needle: &str| frames.windows(needle.len()).any(|w| w == needle.as_bytes());
    ensure!(
        foreign == "502",
        "a foreign certificate fails the request: {foreign}"
    );
    ensure!(
        reset == "502",
        "a handshake cut midway fails the request: {reset}"
    );
    ensure!(
        plain == "200",
        "a peer without TLS is reached in plaintext: {plain}"
    );
    ensure!(
        !seen(&marker(8443)) && !seen(&marker(8444)),
        "no plaintext of the failed requests crossed the wire"
    );
    ensure!(
        seen(&marker(HTTP_PORT)),
        "the capture sees plaintext when there is some"
    );
    // Nothing was remembered as plaintext: a second try fails the same way.
    ensure!(code(8443)? == "502", "still no fallback");
    Ok(())
}

pub fn without_a_valid_certificate_of_its_own_a_proxy_sends_nothing_and_is_not_ready(
    w: &World,
) -> anyhow::Result<()> {
    // Certificates of 3 s, and the issuer stopped once the client has one.
    let issuer = w.issuer_with_lifetime(Duration::from_secs(3))?;
    let client = w.pod("client").sidecar().start()?;
    let other = w.pod("other").start()?;
    other.app("http", HTTP_PORT)?;
    w.stop_issuer(&issuer)?;
    eventually("the client's certificate expires", DEADLINE, || {
        let (status, body) = client.admin("GET", "/ready")?;
        Ok((status == 503 && body.contains("certificate")).then_some(body))
    })?;
    let capture = Capture::start(&other)?;
    let marker = "expired-marker";
    let out = client.curl_output(&[
        "-s",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--max-time",
        "10",
        &format!("http://{}:{HTTP_PORT}/{marker}", other.ip4),
    ])?;
    let frames = capture.finish()?;
    let head = String::from_utf8_lossy(&out.stdout);
    ensure!(head.starts_with("HTTP/1.1 502"), "{head}");
    ensure!(
        head.contains("no valid certificate"),
        "the reason is given: {head}"
    );
    ensure!(
        !frames.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "nothing was sent in plaintext"
    );
    Ok(())
}

pub fn the_issuer_stays_bounded_under_half_sent_bodies_and_keeps_issuing(
    w: &World,
) -> anyhow::Result<()> {
    let issuer = w.issuer()?;
    let attacker = w.pod("attacker").start()?;
    let before = issuer.rss_kib()?;
    let anchors = std::fs::read(w.anchors_file())?;
    let addr = (issuer.ip, crate::harness::ISSUER_PORT);
    // 64 connections, each opening as many streams as the issuer lets it and sending
    // as much of a 64 KiB body as flow control allows, never finishing any; held open
    // (on a thread in the attacker's pod) until the test is done looking.
    let netns = std::fs::File::open(format!("/run/netns/{}", attacker.ns))?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let flood = std::thread::spawn(move || -> anyhow::Result<()> {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let held = half_sent_bodies(addr, &anchors, 64).await;
            let counts = held.as_ref().map(|h| h.counts).map_err(|e| e.to_string());
            let _ = ready_tx.send(counts);
            let _ = stop_rx.await;
            drop(held);
        });
        Ok(())
    });
    let (connections, streams, bytes) = ready_rx
        .recv_timeout(Duration::from_secs(60))
        .context("the flood did not start")?
        .map_err(|e| anyhow::anyhow!("the flood failed: {e}"))?;
    let checks = (|| {
        ensure!(
            connections >= 32,
            "the flood connected ({connections} connections)"
        );
        // Meanwhile a proxy starts and gets its certificate.
        let late = w.pod("late").sidecar().start()?;
        ensure!(
            late.admin("GET", "/ready")?.0 == 200,
            "a valid CSR is served during the flood"
        );
        let during = issuer.rss_kib()?;
        ensure!(
            during < 64 * 1024,
            "the issuer stays under its 64 MiB limit: {during} KiB (was {before} KiB; \
             {connections} connections, {streams} streams, {bytes} body bytes held)"
        );
        Ok(())
    })();
    let _ = stop_tx.send(());
    let _ = flood.join();
    checks
}

/// Connections and streams held open, each stream's body half sent.
struct Held {
    counts: (usize, usize, u64),
    _conns: Vec<h2::client::SendRequest<bytes::Bytes>>,
    _streams: Vec<h2::SendStream<bytes::Bytes>>,
}

/// Opens `n` HTTP/2 connections to the issuer at once, each with as many certify
/// streams as it allows (up to 200), sending body bytes as the windows allow and never
/// ending a body.
async fn half_sent_bodies(addr: (Ipv4Addr, u16), anchors: &[u8], n: usize) -> anyhow::Result<Held> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in gofe_identity::cert::certs_from_pem(anchors)? {
        roots.add(cert)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(one_connection(addr, connector.clone())))
        .collect();
    let (mut conns, mut streams, mut bytes) = (Vec::new(), Vec::new(), 0);
    for t in tasks {
        if let Ok(Some((c, s, b))) = t.await {
            conns.push(c);
            streams.extend(s);
            bytes += b;
        }
    }
    Ok(Held {
        counts: (conns.len(), streams.len(), bytes),
        _conns: conns,
        _streams: streams,
    })
}

type OneConnection = (
    h2::client::SendRequest<bytes::Bytes>,
    Vec<h2::SendStream<bytes::Bytes>>,
    u64,
);

async fn one_connection(
    addr: (Ipv4Addr, u16),
    connector: tokio_rustls::TlsConnector,
) -> Option<OneConnection> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("gofe-identity.gofe-system.svc").ok()?;
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .ok()?
        .ok()?;
    let (mut h2, conn) = h2::client::handshake(tls).await.ok()?;
    tokio::spawn(conn);
    let mut streams = Vec::new();
    let mut bytes = 0u64;
    for _ in 0..200 {
        let ready = tokio::time::timeout(Duration::from_millis(50), h2.clone().ready()).await;
        let Ok(Ok(mut ready)) = ready else { break };
        let req = http::Request::post("https://gofe-identity.gofe-system.svc/v1/certify")
            .header("content-type", "application/json")
            .header("content-length", "65536")
            .body(())
            .ok()?;
        let Ok((_rsp, mut body)) = ready.send_request(req, false) else {
            break;
        };
        body.reserve_capacity(64 * 1024);
        let capacity = tokio::time::timeout(
            Duration::from_millis(50),
            std::future::poll_fn(|cx| body.poll_capacity(cx)),
        )
        .await;
        if let Ok(Some(Ok(cap))) = capacity
            && body
                .send_data(bytes::Bytes::from(vec![b'{'; cap]), false)
                .is_ok()
        {
            bytes += cap as u64;
        }
        streams.push(body);
        h2 = ready;
    }
    Some((h2, streams, bytes))
}

pub fn a_client_cannot_grow_the_metrics_or_force_sampling(w: &World) -> anyhow::Result<()> {
    let otel = w.pod("otel").start()?;
    let rx = Receiver::start_in_namespace(&otel.ns, otel.ip4)?;
    let server = w
        .pod("server")
        .sidecar()
        .env("GOFE_TRACE_COLLECTOR", &rx.grpc_url())
        .env("GOFE_TRACE_SAMPLE_RATIO", "0")
        .start()?;
    server.app("http", HTTP_PORT)?;
    let outsider = w.pod("outsider").start()?;
    // 300 requests with Host headers of their own choosing, each asking for a trace
    // to be sampled (B3 debug and a sampled traceparent).
    let url = format!("http://{}:{HTTP_PORT}/", server.ip4);
    for i in 0..300 {
        let host = format!("Host: poison-{i}.example");
        let b3 = format!("b3: 80f198ee56343ba864fe8b2a57d3{i:04x}-e457b5a2e4d86bd1-d");
        outsider.curl(&["-s", "-o", "/dev/null", "-H", &host, "-H", &b3, &url])?;
    }
    let m = server.metrics()?;
    let inbound_sets =
        m.0.lines()
            .filter(|l| l.starts_with("gofe_requests_total{direction=\"inbound\""))
            .count();
    ensure!(
        inbound_sets == 1,
        "inbound requests are labelled by where they came in, not by Host: {inbound_sets} label sets\n{}",
        m.0
    );
    ensure!(
        m.sum("gofe_requests_total", &[("direction", "inbound")]) == 300.0,
        "all counted"
    );
    ensure!(
        m.0.lines().all(|l| !l.contains("poison-")),
        "no client-chosen host reaches the labels"
    );
    // A meshed client's sampled request is honoured (its span reaches the collector);
    // by then, any span an untrusted request forced would have gone out before it.
    let client = w.pod("client").sidecar().start()?;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    client.curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-H",
        &format!("traceparent: 00-{trace}-00f067aa0ba902b7-01"),
        &url,
    ])?;
    eventually("the trusted span is exported", DEADLINE, || {
        Ok(rx.spans().iter().any(|s| s.trace_id == trace).then_some(()))
    })?;
    let forced = rx.spans().iter().filter(|s| s.trace_id != trace).count();
    ensure!(
        forced == 0,
        "{forced} spans were forced by an untrusted client"
    );
    Ok(())
}
