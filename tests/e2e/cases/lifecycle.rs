//! The proxy's life: draining on SIGTERM, the admin server, `/shutdown`.

use super::{HTTP_PORT, meshed_pair};
use crate::harness::{World, eventually, raw_http};
use anyhow::{anyhow, ensure};
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::time::Duration;

crate::cases::register![
    sigterm_drains_an_in_flight_request,
    admin_endpoints_and_loopback_only_shutdown,
];

const DEADLINE: Duration = Duration::from_secs(10);

pub fn sigterm_drains_an_in_flight_request(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    let app = SocketAddr::from(([127, 0, 0, 1], HTTP_PORT));
    let out = w.dir().join("held.out");
    client.spawn_as_app(
        "held-request",
        "curl",
        &[
            "-sS",
            "--max-time",
            "60",
            "-o",
            out.to_str().unwrap(),
            &format!("http://{}:{HTTP_PORT}/hold", server.ip4),
        ],
    )?;
    eventually("the request is held by the app", DEADLINE, || {
        let (_, held) = server.in_ns(|| raw_http(app, "GET", "/held"))??;
        Ok((held == "1").then_some(()))
    })?;

    client.signal_proxy(Signal::SIGTERM)?;
    eventually("the draining proxy reports not ready", DEADLINE, || {
        Ok(client
            .admin("GET", "/ready")
            .ok()
            .filter(|(s, b)| *s == 503 && b.contains("draining"))
            .map(|_| ()))
    })?;
    eventually("new connections are refused", DEADLINE, || {
        let out = client.curl_output(&[
            "--max-time",
            "5",
            &format!("http://{}:{HTTP_PORT}/", server.ip4),
        ])?;
        // curl exit 7: could not connect.
        Ok((out.status.code() == Some(7)).then_some(()))
    })?;
    let pid = client.proxy_pid.unwrap();
    ensure!(
        w.try_wait(pid)?.is_none(),
        "the proxy waits for the held request"
    );

    server.in_ns(|| raw_http(app, "POST", "/release"))??;
    let status = eventually("the proxy exits once the request is done", DEADLINE, || {
        w.try_wait(pid)
    })?;
    ensure!(status.success(), "clean exit: {status}");
    eventually("the held request completed", DEADLINE, || {
        Ok(std::fs::read_to_string(&out)
            .ok()
            .filter(|s| s == "released\n")
            .map(|_| ()))
    })?;
    Ok(())
}

pub fn admin_endpoints_and_loopback_only_shutdown(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    let (status, live) = server.admin("GET", "/live")?;
    ensure!(status == 200 && live == "live\n");
    let (status, config) = server.admin("GET", "/config")?;
    ensure!(status == 200);
    let config: serde_json::Value = serde_json::from_str(&config)?;
    ensure!(config["GOFE_INBOUND_LISTEN"] == "0.0.0.0:4143", "{config}");
    ensure!(config["GOFE_DETECT_TIMEOUT"] == "10s", "{config}");

    // From another pod the admin port is reachable (never intercepted) but shutdown is
    // refused.
    let remote = SocketAddr::from((server.ip4, 4191));
    let (status, _) = client.in_ns(|| raw_http(remote, "GET", "/ready"))??;
    ensure!(status == 200, "probes reach the admin port from outside");
    let (status, _) = client.in_ns(|| raw_http(remote, "POST", "/shutdown"))??;
    ensure!(status == 403, "remote shutdown refused: {status}");
    let (status, _) = server.admin("GET", "/shutdown")?;
    ensure!(status == 405);

    let (status, _) = server.admin("POST", "/shutdown")?;
    ensure!(status == 200);
    let pid = server.proxy_pid.ok_or_else(|| anyhow!("proxy"))?;
    let exit = eventually("the proxy exits after /shutdown", DEADLINE, || {
        w.try_wait(pid)
    })?;
    ensure!(exit.success(), "{exit}");
    Ok(())
}
