//! The data path in this process, as an ordinary user: inbound and outbound requests,
//! opaque TCP, retries over a discovery file, and mTLS between two proxies with auto
//! mode's plaintext fallback. The socket factory stands in for iptables' redirect (it
//! hands out each listener's original destination); everything else is real: sockets
//! on loopback, hyper on both ends, the issuer's certificates, rustls.

mod support;

use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DISABLED: (&str, &str) = ("GOFE_IDENTITY_DISABLED", "true");

#[tokio::test]
async fn an_outbound_request_reaches_its_original_destination() {
    let app = App::start().await;
    let proxy = TestProxy::start(&[DISABLED]);
    proxy.outbound_to(app.addr);
    proxy.ready().await;
    let uri = format!("http://api.test:{}/hello", app.addr.port());
    let rsp = get(proxy.addrs.outbound, &uri, &[("x-app", "1")])
        .await
        .unwrap();
    assert_eq!(rsp.status, 200, "{}", rsp.body);
    let seen = seen(&rsp.body);
    assert_eq!(seen["x-app"], "1");
    assert_eq!(
        seen["gofe-attempt"], "1",
        "outbound requests go through retries"
    );
    let metrics = proxy.metrics().await;
    let authority = format!("api.test:{}", app.addr.port());
    assert_eq!(
        sample(
            &metrics,
            "gofe_requests_total",
            &[
                ("direction", "outbound"),
                ("authority", &authority),
                ("status_code", "200")
            ]
        ),
        Some(1.0),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_inbound_request_reaches_the_application_without_a_forged_identity() {
    let app = App::start().await;
    let proxy = TestProxy::start(&[DISABLED]);
    proxy.inbound_for(app.addr);
    proxy.ready().await;
    let rsp = get(
        proxy.addrs.inbound,
        "http://web/",
        &[
            (
                "gofe-client-id",
                "spiffe://cluster.local/ns/default/sa/admin",
            ),
            (
                "gofe_client_id",
                "spiffe://cluster.local/ns/default/sa/admin",
            ),
        ],
    )
    .await
    .unwrap();
    assert_eq!(rsp.status, 200, "{}", rsp.body);
    let seen = seen(&rsp.body);
    assert!(!seen.contains_key("gofe-client-id"), "{seen:?}");
    assert!(!seen.contains_key("gofe_client_id"), "{seen:?}");
    assert!(
        !seen.contains_key("gofe-attempt"),
        "inbound requests are not retried"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_unreachable_original_destination_is_a_502_naming_it() {
    let closed = closed_port();
    let proxy = TestProxy::start(&[DISABLED]);
    proxy.outbound_to(closed);
    proxy.ready().await;
    let rsp = get(proxy.addrs.outbound, &format!("http://{closed}/"), &[])
        .await
        .unwrap();
    assert_eq!(rsp.status, 502);
    let why = rsp.headers["gofe-proxy-error"].to_str().unwrap();
    assert!(why.contains(&closed.to_string()), "{why}");
    let metrics = proxy.metrics().await;
    // Connect failures are retried (GOFE_RETRY_LIMIT=2): three attempts, each counted.
    assert_eq!(
        sample(
            &metrics,
            "gofe_tcp_connect_errors_total",
            &[("reason", "refused")]
        ),
        Some(3.0),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn opaque_bytes_are_copied_both_ways() {
    let echo = echo().await;
    let proxy = TestProxy::start(&[DISABLED]);
    proxy.outbound_to(echo);
    proxy.ready().await;
    let mut s = tokio::net::TcpStream::connect(proxy.addrs.outbound)
        .await
        .unwrap();
    // Not HTTP: binary bytes, then a half-close.
    s.write_all(b"\x00\x01binary\xff").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"\x00\x01binary\xff");
    proxy.stop().await;
}

#[tokio::test]
async fn a_refused_endpoint_is_retried_on_another_from_the_discovery_file() {
    let app = App::start().await;
    let closed = closed_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("destinations.yaml");
    std::fs::write(
        &file,
        format!(
            "destinations:\n  - name: api.test:80\n    endpoints:\n      - address: {closed}\n      - address: {}\n    policy:\n      lb: round-robin\n      outlier_consecutive_gateway: 0\n",
            app.addr
        ),
    )
    .unwrap();
    let discovery = format!("file:{}", file.display());
    let proxy = TestProxy::start(&[DISABLED, ("GOFE_DISCOVERY", &discovery)]);
    proxy.ready().await;
    for _ in 0..6 {
        // An explicit proxy request: routed by its authority.
        let rsp = get(proxy.addrs.outbound, "http://api.test/", &[])
            .await
            .unwrap();
        assert_eq!(rsp.status, 200, "{}", rsp.body);
    }
    let metrics = proxy.metrics().await;
    let retries = sample(
        &metrics,
        "gofe_retries_total",
        &[("authority", "api.test:80"), ("reason", "connect-failure")],
    )
    .unwrap_or(0.0);
    assert!(
        retries >= 3.0,
        "round-robin sends every other first attempt to the closed one: {metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn two_proxies_speak_mtls_and_the_application_learns_its_clients_identity() {
    let issuer = Issuer::start().await;
    let app = App::start().await;
    let server = TestProxy::start(&pairs(&issuer.vars("api")));
    server.inbound_for(app.addr);
    let client = TestProxy::start(&pairs(&issuer.vars("web")));
    // The client's application connects to the server pod; in a pod, iptables sends
    // that to the server's inbound listener.
    client.outbound_to(server.addrs.inbound);
    server.ready().await;
    client.ready().await;
    let rsp = get(client.addrs.outbound, "http://api.test/", &[])
        .await
        .unwrap();
    assert_eq!(rsp.status, 200, "{}", rsp.body);
    let seen = seen(&rsp.body);
    assert_eq!(
        seen["gofe-client-id"],
        "spiffe://cluster.local/ns/default/sa/web"
    );
    let metrics = client.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "gofe_requests_total",
            &[
                ("direction", "outbound"),
                ("tls", "true"),
                ("peer_identity", "spiffe://cluster.local/ns/default/sa/api")
            ]
        ),
        Some(1.0),
        "{metrics}"
    );
    client.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn auto_mode_reaches_a_peer_without_a_sidecar_in_plaintext_and_remembers() {
    let issuer = Issuer::start().await;
    let app = App::start().await;
    let client = TestProxy::start(&pairs(&issuer.vars("web")));
    client.outbound_to(app.addr);
    client.ready().await;
    for _ in 0..3 {
        let rsp = get(client.addrs.outbound, "http://plain.test/", &[])
            .await
            .unwrap();
        assert_eq!(rsp.status, 200, "{}", rsp.body);
        assert!(!seen(&rsp.body).contains_key("gofe-orig-proto"));
    }
    let metrics = client.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "gofe_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "error")]
        ),
        Some(1.0),
        "one failed handshake, then the peer is remembered: {metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "gofe_requests_total",
            &[("direction", "outbound"), ("tls", "false")]
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "gofe_tcp_connect_errors_total", &[]),
        None,
        "{metrics}"
    );
    client.stop().await;
}

#[tokio::test]
async fn strict_mode_refuses_a_peer_without_a_sidecar() {
    let issuer = Issuer::start().await;
    let app = App::start().await;
    let mut vars = issuer.vars("web");
    vars.push(("GOFE_OUTBOUND_MTLS".into(), "strict".into()));
    let client = TestProxy::start(&pairs(&vars));
    client.outbound_to(app.addr);
    client.ready().await;
    let rsp = get(client.addrs.outbound, "http://plain.test/", &[])
        .await
        .unwrap();
    assert_eq!(rsp.status, 502, "{}", rsp.body);
    assert_eq!(
        app.connections.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "three connects (the retries of connect failures), none of which got a request"
    );
    client.stop().await;
}

#[tokio::test]
async fn a_policy_file_with_an_absurd_duration_is_refused_and_the_last_good_stays() {
    let app = App::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    let name = format!("api.test:{}", app.addr.port());
    let policy = |lb: &str, timeout: &str| {
        format!(
            "destinations:\n  - name: {name}\n    policy:\n      lb: {lb}\n      request_timeout: {timeout}\n"
        )
    };
    std::fs::write(&file, policy("round-robin", "5s")).unwrap();
    let policy_file = file.display().to_string();
    let proxy = TestProxy::start(&[DISABLED, ("GOFE_POLICY_FILE", &policy_file)]);
    proxy.outbound_to(app.addr);
    proxy.ready().await;
    let uri = format!("http://{name}/");
    let lb = || async {
        let json = admin(proxy.addrs.admin, "/endpoints").await.1;
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["destinations"][0]["lb"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        get(proxy.addrs.outbound, &uri, &[]).await.unwrap().status,
        200
    );
    assert_eq!(lb().await, "round-robin");
    // A good change is taken...
    std::fs::write(&file, policy("random", "5s")).unwrap();
    eventually(Duration::from_secs(10), || async { lb().await == "random" }).await;
    // ... a duration that would overflow a deadline is refused, counted, and the last
    // good policy stays.
    std::fs::write(&file, policy("ewma", "1000000000s")).unwrap();
    let refused = |m: String| {
        sample(
            &m,
            "gofe_file_reloads_total",
            &[("path", &policy_file), ("result", "refused")],
        )
    };
    eventually(Duration::from_secs(10), || async {
        refused(proxy.metrics().await) == Some(1.0)
    })
    .await;
    assert_eq!(lb().await, "random");
    assert_eq!(
        get(proxy.addrs.outbound, &uri, &[]).await.unwrap().status,
        200
    );
    proxy.stop().await;
}
