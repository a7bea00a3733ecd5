//! TCP behaviour through two sidecars: opaque ports, half-close, application TLS, fast
//! failure, and what iptables must leave alone.

use super::{HTTP_PORT, meshed_pair};
use crate::harness::{PROXY_UID, World};
use anyhow::{Context, bail, ensure};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

crate::cases::register![
    server_speaks_first_on_an_opaque_port,
    half_close_is_honoured_both_ways,
    application_tls_passes_through_with_sni,
    closed_port_fails_fast,
    skipped_ports_bypass_the_proxy,
    proxy_own_connections_are_not_redirected,
    connection_to_own_listener_is_refused,
];

const IO_DEADLINE: Duration = Duration::from_secs(5);

pub fn server_speaks_first_on_an_opaque_port(w: &World) -> anyhow::Result<()> {
    // Detection would hold the connection for a minute: only skipping it lets the
    // banner through in time.
    let (client, server) = meshed_pair(w, &[("GOFE_DETECT_TIMEOUT", "60s")])?;
    server.app("banner", 3306)?;
    let addr = (server.ip4, 3306);
    client.block_on(|| async move {
        let s = TcpStream::connect(addr).await?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        timeout(IO_DEADLINE, r.read_line(&mut line))
            .await
            .context("banner arrives without the client speaking")??;
        ensure!(line == "220 banner from server\r\n", "{line:?}");
        r.get_mut().write_all(b"ping\n").await?;
        line.clear();
        timeout(IO_DEADLINE, r.read_line(&mut line)).await??;
        ensure!(line == "ping\n", "{line:?}");
        Ok(())
    })??;
    let cm = client.metrics()?;
    ensure!(
        cm.sum(
            "gofe_tcp_connections_total",
            &[("direction", "outbound"), ("protocol", "opaque")]
        ) == 1.0
    );
    Ok(())
}

pub fn half_close_is_honoured_both_ways(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    server.app("halfclose", 7000)?;
    let speaker = server.app("speakfirst", 4444)?;
    let (ip, ip2) = (server.ip4, server.ip4);
    client.block_on(|| async move {
        // The client half-closes; the server still answers.
        let mut s = TcpStream::connect((ip, 7000)).await?;
        s.write_all(b"client data").await?;
        s.shutdown().await?;
        let mut reply = String::new();
        timeout(IO_DEADLINE, s.read_to_string(&mut reply)).await??;
        ensure!(reply == "got 11 bytes: client data\n", "{reply:?}");

        // The server half-closes; the client still sends.
        let mut s = TcpStream::connect((ip2, 4444)).await?;
        let mut greeting = String::new();
        timeout(IO_DEADLINE, s.read_to_string(&mut greeting)).await??;
        ensure!(greeting == "hello, then silence\n", "{greeting:?}");
        s.write_all(b"late reply").await?;
        s.shutdown().await?;
        Ok(())
    })??;
    speaker.wait_line("received: late reply", IO_DEADLINE)?;
    Ok(())
}

pub fn application_tls_passes_through_with_sni(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    let outsider = w.pod("outsider").start()?;
    server.app("tls", 8443)?;
    let resolve = format!("app.test:8443:{}", server.ip4);
    for pod in [&client, &outsider] {
        let out = pod.curl(&["-k", "--resolve", &resolve, "https://app.test:8443/"])?;
        ensure!(out == "tls ok, sni app.test\n", "from {}: {out}", pod.name);
    }
    // The meshed client's proxy sees the application's TLS and carries it inside the
    // mesh's mTLS; the server's proxy sees that mTLS from one client and the
    // application's own TLS from the other.
    let labels = |direction, protocol, sni| {
        [
            ("direction", direction),
            ("protocol", protocol),
            ("server_name", sni),
        ]
    };
    let cm = client.metrics()?;
    ensure!(
        cm.sum(
            "gofe_tcp_connections_total",
            &labels("outbound", "tls", "app.test")
        ) == 1.0,
        "{}",
        cm.0
    );
    let sm = server.metrics()?;
    ensure!(
        sm.sum("gofe_tcp_connections_total", &labels("inbound", "mtls", "")) == 1.0,
        "{}",
        sm.0
    );
    ensure!(
        sm.sum(
            "gofe_tcp_connections_total",
            &labels("inbound", "tls", "app.test")
        ) == 1.0,
        "{}",
        sm.0
    );
    Ok(())
}

pub fn closed_port_fails_fast(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    // HTTP: a 502 saying why, well within curl's deadline.
    let out = client.curl_output(&[
        "--max-time",
        "5",
        "-D",
        "-",
        "-o",
        "/dev/null",
        &format!("http://{}:9999/", server.ip4),
    ])?;
    let head = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "curl finished: {:?}", out);
    ensure!(head.starts_with("HTTP/1.1 502"), "{head}");
    // Told by the server's sidecar (inbound): the kind of failure, no address.
    ensure!(
        head.contains("gofe-proxy-error: the destination could not be reached (refused)"),
        "{head}"
    );

    // Opaque TCP (5432 skips detection): the client's connection is reset.
    let ip = server.ip4;
    let result = client.block_on(|| async move {
        let mut s = TcpStream::connect((ip, 5432)).await?;
        let mut buf = [0u8; 16];
        anyhow::Ok(
            timeout(IO_DEADLINE, s.read(&mut buf))
                .await
                .context("no hang")?,
        )
    })??;
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => bail!("expected a reset, got {other:?}"),
    }
    let sm = server.metrics()?;
    ensure!(
        sm.sum(
            "gofe_tcp_connect_errors_total",
            &[("direction", "inbound"), ("reason", "refused")]
        ) == 2.0
    );
    Ok(())
}

pub fn skipped_ports_bypass_the_proxy(w: &World) -> anyhow::Result<()> {
    let client = w
        .pod("client")
        .sidecar()
        .env("GOFE_SKIP_OUTBOUND_PORTS", "9090")
        .start()?;
    let server = w
        .pod("server")
        .sidecar()
        .env("GOFE_SKIP_INBOUND_PORTS", "9000-9099")
        .start()?;
    server.app("http", 9090)?;
    server.app("http", HTTP_PORT)?;
    let peer = |port: u16| -> anyhow::Result<String> {
        let out = client.curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%header{x-peer}",
            &format!("http://{}:{port}/", server.ip4),
        ])?;
        Ok(out)
    };
    let skipped = peer(9090)?;
    ensure!(
        skipped.starts_with(&format!("{}:", client.ip4)),
        "the app saw the client pod itself: {skipped}"
    );
    // The inbound proxy reaches the app on the pod address the client dialled
    // (GOFE_INBOUND_TARGET=pod-ip): the app sees its own pod as the peer.
    let meshed = peer(HTTP_PORT)?;
    ensure!(
        meshed.starts_with(&format!("{}:", server.ip4)),
        "the app saw its inbound proxy: {meshed}"
    );
    ensure!(
        client
            .metrics()?
            .sum("gofe_tcp_connections_total", &[("direction", "outbound")])
            == 1.0
    );
    ensure!(
        server
            .metrics()?
            .sum("gofe_tcp_connections_total", &[("direction", "inbound")])
            == 1.0
    );
    Ok(())
}

pub fn proxy_own_connections_are_not_redirected(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    let url = format!("http://{}:{HTTP_PORT}/", server.ip4);
    // Through the outbound proxy: one accepted connection. Were the proxy's own
    // upstream connection redirected back to it, there would be a second.
    ensure!(client.curl(&[&url])? == "hello from server\n");
    let outbound = |m: &crate::harness::Metrics| {
        m.sum("gofe_tcp_connections_total", &[("direction", "outbound")])
    };
    ensure!(outbound(&client.metrics()?) == 1.0);
    // A process with the proxy's UID goes straight out.
    let mut cmd = client.command("curl", Some(PROXY_UID))?;
    cmd.args(["-sS", "--max-time", "10", &url]);
    ensure!(crate::harness::sh(&mut cmd)? == "hello from server\n");
    ensure!(
        outbound(&client.metrics()?) == 1.0,
        "the proxy UID's connection was not intercepted"
    );
    ensure!(
        server
            .metrics()?
            .sum("gofe_tcp_connections_total", &[("direction", "inbound")])
            == 2.0,
        "both reached the server pod through its inbound proxy"
    );
    Ok(())
}

pub fn connection_to_own_listener_is_refused(w: &World) -> anyhow::Result<()> {
    let client = w.pod("client").sidecar().start()?;
    // The pod's own IP is redirected to the outbound listener, whose original
    // destination is then the inbound listener: a loop, refused with a reset.
    let out = client.curl_output(&["--max-time", "5", &format!("http://{}:4143/", client.ip4)])?;
    // The reset comes right after the handshake: curl reports it as a failed
    // connect (7), send (55) or receive (56), depending on when it looks.
    ensure!(
        matches!(out.status.code(), Some(7) | Some(55) | Some(56)),
        "refused: {out:?}"
    );
    let m = client.metrics()?;
    ensure!(
        m.sum("gofe_tcp_connections_total", &[]) == 0.0,
        "nothing was proxied: {}",
        m.0
    );
    Ok(())
}
