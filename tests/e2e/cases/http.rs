//! HTTP through two sidecars: keep-alive, chunked and large bodies, HTTP/2, gRPC,
//! WebSocket, explicit proxy mode, IPv6, and real load from h2load.

use super::{HTTP_PORT, meshed_pair, require_tool};
use crate::apps::{pattern_byte, pattern_sha256};
use crate::grpc::{EchoClient, EchoMsg};
use crate::harness::World;
use anyhow::{Context, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use std::io::Write;
use tokio_tungstenite::tungstenite::Message;

crate::cases::register![
    http1_keepalive_reuses_connections,
    http1_chunked_bodies_pass_both_ways,
    http1_0_clients_and_forward_proxy_requests,
    http1_64mib_bodies_stream_without_proxy_memory_growth,
    http2_prior_knowledge_with_curl,
    grpc_unary_and_bidirectional_streaming,
    websocket_echo,
    explicit_proxy_mode_routes_by_authority,
    connect_to_an_application_proxy_is_tunnelled,
    ipv6_original_destination,
    h2load_through_two_sidecars,
];

pub fn http1_keepalive_reuses_connections(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    let url = format!("http://{}:{HTTP_PORT}/", server.ip4);
    // One curl, three requests: curl reports whether each opened a connection, the
    // app reports which of its connections served each.
    let out = client.curl(&[
        "-w",
        "%{http_code} %{num_connects} %header{x-conn-id}\n",
        "-o",
        "/dev/null",
        &url,
        "-o",
        "/dev/null",
        &url,
        "-o",
        "/dev/null",
        &url,
    ])?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == 3, "three transfers: {out}");
    let first: Vec<&str> = lines[0].split(' ').collect();
    ensure!(first[0] == "200" && first[1] == "1", "first request: {out}");
    for l in &lines[1..] {
        let f: Vec<&str> = l.split(' ').collect();
        ensure!(f[0] == "200", "status: {out}");
        ensure!(
            f[1] == "0",
            "curl reused its connection to the proxy: {out}"
        );
        ensure!(f[2] == first[2], "the app saw one pooled connection: {out}");
    }
    let cm = client.metrics()?;
    ensure!(cm.sum("gofe_tcp_connections_total", &[("direction", "outbound")]) == 1.0);
    let authority = format!("{}:{HTTP_PORT}", server.ip4);
    ensure!(
        cm.sum(
            "gofe_requests_total",
            &[
                ("direction", "outbound"),
                ("authority", &authority),
                ("status_code", "200")
            ]
        ) == 3.0,
        "{}",
        cm.0
    );
    let sm = server.metrics()?;
    ensure!(
        sm.sum("gofe_tcp_connections_total", &[("direction", "inbound")]) == 1.0,
        "the client proxy reused one connection to the server pod: {}",
        sm.0
    );
    ensure!(
        sm.sum(
            "gofe_requests_total",
            &[("direction", "inbound"), ("status_code", "200")]
        ) == 3.0
    );
    Ok(())
}

pub fn http1_0_clients_and_forward_proxy_requests(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    let url = format!("http://{}:{HTTP_PORT}/", server.ip4);
    // HTTP/1.0 closes the client connection after each request; upstream the proxies
    // speak HTTP/1.1 and keep one pooled connection.
    let out = client.curl(&[
        "--http1.0",
        "-w",
        "%header{x-request-proto} %header{x-conn-id}\n",
        "-o",
        "/dev/null",
        &url,
        "-o",
        "/dev/null",
        &url,
    ])?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(
        lines.len() == 2 && lines[0] == lines[1],
        "one upstream connection: {out}"
    );
    ensure!(
        lines[0].starts_with("HTTP/1.1 "),
        "upstream spoke HTTP/1.1: {out}"
    );
    // The app is itself an HTTP proxy: a request meant for it keeps its absolute-form
    // request-target through both sidecars.
    let out = client.curl(&[
        "-x",
        &format!("http://{}:{HTTP_PORT}", server.ip4),
        "-o",
        "/dev/null",
        "-w",
        "%header{x-request-uri}",
        "http://example.test/some/path",
    ])?;
    ensure!(
        out == "http://example.test/some/path",
        "request-target kept: {out}"
    );
    Ok(())
}

pub fn http1_chunked_bodies_pass_both_ways(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    let base = format!("http://{}:{HTTP_PORT}", server.ip4);
    let path = w.dir().join("upload.txt");
    let upload: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(&path, &upload)?;
    let path = path.to_str().unwrap();

    let echoed = client.curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{path}"),
        &format!("{base}/echo"),
    ])?;
    ensure!(
        echoed == upload,
        "chunked request echoed intact ({} bytes back)",
        echoed.len()
    );

    // A GET with a chunked body: its framing must survive the hop.
    let got = client.curl(&[
        "-X",
        "GET",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{path}"),
        &format!("{base}/sink"),
    ])?;
    ensure!(
        got.starts_with(&format!("{} ", upload.len())),
        "GET body arrived: {got}"
    );

    let out = client.curl(&["-D", "-", &format!("{base}/chunked")])?;
    let lower = out.to_ascii_lowercase();
    ensure!(
        lower.contains("transfer-encoding: chunked"),
        "response stayed chunked: {out}"
    );
    ensure!(
        out.ends_with("chunk-0;chunk-1;chunk-2;chunk-3;chunk-4;"),
        "all chunks arrived: {out}"
    );
    Ok(())
}

pub fn http1_64mib_bodies_stream_without_proxy_memory_growth(w: &World) -> anyhow::Result<()> {
    const SIZE: u64 = 64 * 1024 * 1024;
    const ALLOWED_GROWTH: u64 = 16 * 1024 * 1024;
    let (client, server) = meshed_pair(w, &[])?;
    let base = format!("http://{}:{HTTP_PORT}", server.ip4);
    let upload = w.dir().join("upload.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&upload)?);
        let mut buf = vec![0u8; 1 << 16];
        let mut off = 0u64;
        while off < SIZE {
            for (j, b) in buf.iter_mut().enumerate() {
                *b = pattern_byte(off + j as u64);
            }
            f.write_all(&buf)?;
            off += buf.len() as u64;
        }
    }
    let expected = pattern_sha256(SIZE);
    let before = (client.proxy_peak_rss()?, server.proxy_peak_rss()?);

    let sink = client.curl(&[
        "--data-binary",
        &format!("@{}", upload.display()),
        "-H",
        "content-type: application/octet-stream",
        &format!("{base}/sink"),
    ])?;
    ensure!(
        sink.trim() == format!("{SIZE} {expected}"),
        "upload arrived intact: {sink}"
    );

    let download = w.dir().join("download.bin");
    client.curl(&[
        "-o",
        download.to_str().unwrap(),
        &format!("{base}/bytes/{SIZE}"),
    ])?;
    let got = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut f = std::fs::File::open(&download)?;
        std::io::copy(&mut f, &mut h)?;
        crate::apps::hex(&h.finalize())
    };
    ensure!(got == expected, "download arrived intact");

    let after = (client.proxy_peak_rss()?, server.proxy_peak_rss()?);
    for (who, b, a) in [("client", before.0, after.0), ("server", before.1, after.1)] {
        ensure!(
            a.saturating_sub(b) < ALLOWED_GROWTH,
            "{who} proxy peak RSS grew from {b} to {a} bytes while 2 x 64 MiB streamed through"
        );
    }
    Ok(())
}

pub fn http2_prior_knowledge_with_curl(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    let url = format!("http://{}:{HTTP_PORT}/echo", server.ip4);
    let out = client.curl(&[
        "--http2-prior-knowledge",
        "-D",
        "-",
        "--data-binary",
        "over h2",
        &url,
    ])?;
    ensure!(out.starts_with("HTTP/2 200"), "client got HTTP/2: {out}");
    ensure!(
        out.contains("x-request-proto: HTTP/2.0"),
        "the app got HTTP/2: {out}"
    );
    ensure!(out.ends_with("over h2"), "body echoed: {out}");
    let cm = client.metrics()?;
    ensure!(
        cm.sum(
            "gofe_tcp_connections_total",
            &[("direction", "outbound"), ("protocol", "h2")]
        ) == 1.0
    );
    Ok(())
}

pub fn grpc_unary_and_bidirectional_streaming(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    let uri = format!("http://{}:{HTTP_PORT}", server.ip4);
    client.block_on(|| async move {
        let mut echo = EchoClient::connect(uri).await?;
        let rsp = echo
            .unary(EchoMsg {
                text: "hello".into(),
                seq: 1,
            })
            .await?;
        ensure!(rsp.text == "hello" && rsp.seq == 1);

        let status = echo
            .fail(EchoMsg {
                text: "no more".into(),
                seq: 2,
            })
            .await
            .unwrap_err();
        ensure!(
            status.code() == tonic::Code::ResourceExhausted,
            "{status:?}"
        );
        ensure!(status.message() == "no more", "{status:?}");

        // Each reply must arrive before the next message is sent: the stream is
        // relayed message by message, not buffered.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut replies = echo
            .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?;
        for seq in 0..20u32 {
            tx.send(EchoMsg {
                text: format!("m{seq}"),
                seq,
            })
            .await?;
            let reply = tokio::time::timeout(std::time::Duration::from_secs(10), replies.next())
                .await
                .context("reply in time")?
                .context("stream open")??;
            ensure!(reply.seq == seq && reply.text == format!("m{seq}"));
        }
        drop(tx);
        ensure!(
            replies.next().await.is_none(),
            "stream ends after the client's end"
        );
        Ok(())
    })??;
    let cm = client.metrics()?;
    let ok = cm.sum(
        "gofe_requests_total",
        &[("direction", "outbound"), ("grpc_status", "0")],
    );
    let exhausted = cm.sum(
        "gofe_requests_total",
        &[("direction", "outbound"), ("grpc_status", "8")],
    );
    ensure!(
        ok == 2.0 && exhausted == 1.0,
        "gRPC statuses counted: {}",
        cm.0
    );
    Ok(())
}

fn client_metrics_open(pod: &crate::harness::Pod<'_>) -> anyhow::Result<f64> {
    Ok(pod
        .metrics()?
        .sum("gofe_tcp_connections_open", &[("direction", "outbound")]))
}

pub fn websocket_echo(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    let url = format!("ws://{}:{HTTP_PORT}/ws", server.ip4);
    let client_for_ws = &client;
    client.block_on(|| async move {
        let (mut ws, rsp) = tokio_tungstenite::connect_async(url.as_str()).await?;
        ensure!(rsp.status() == 101);
        ws.send(Message::text("ping")).await?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str() == "ping" => {}
            other => bail!("text echo: {other:?}"),
        }
        let big: Vec<u8> = (0..256 * 1024u64).map(pattern_byte).collect();
        ws.send(Message::binary(big.clone())).await?;
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b[..] == big[..] => {}
            other => bail!("binary echo: {:?}", other.map(|m| m.map(|m| m.len()))),
        }
        // The tunnel holds the connection open after the upgrade.
        let open = client_metrics_open(client_for_ws)?;
        ensure!(open == 1.0, "the open WebSocket is counted: {open}");
        ws.close(None).await?;
        Ok(())
    })??;
    crate::harness::eventually(
        "the closed WebSocket is no longer counted",
        std::time::Duration::from_secs(10),
        || Ok((client_metrics_open(&client)? == 0.0).then_some(())),
    )?;
    let cm = client.metrics()?;
    ensure!(
        cm.sum("gofe_requests_total", &[("status_code", "101")]) == 1.0,
        "{}",
        cm.0
    );
    Ok(())
}

pub fn explicit_proxy_mode_routes_by_authority(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    let target = format!("http://{}:{HTTP_PORT}/", server.ip4);
    // 127.0.0.1 is never redirected: this reaches the outbound listener directly.
    let out = client.curl(&["-x", "http://127.0.0.1:4140", &target])?;
    ensure!(out == "hello from server\n", "{out}");
    // CONNECT tunnel through the same listener.
    let out = client.curl(&["-p", "-x", "http://127.0.0.1:4140", &target])?;
    ensure!(out == "hello from server\n", "{out}");
    let cm = client.metrics()?;
    let authority = format!("{}:{HTTP_PORT}", server.ip4);
    ensure!(
        cm.sum(
            "gofe_requests_total",
            &[("authority", &authority), ("status_code", "200")]
        ) == 2.0,
        "{}",
        cm.0
    );
    Ok(())
}

pub fn connect_to_an_application_proxy_is_tunnelled(w: &World) -> anyhow::Result<()> {
    // The server pod's app is also an HTTP proxy. The client talks to it with CONNECT,
    // through both sidecars, which pass the CONNECT on and then join the tunnel.
    let (client, server) = meshed_pair(w, &[])?;
    server.app("http", 9090)?;
    let proxy = format!("http://{}:{HTTP_PORT}", server.ip4);
    let out = client.curl(&["-p", "-x", &proxy, &format!("http://{}:9090/", server.ip4)])?;
    ensure!(out == "hello from server\n", "tunnelled request: {out}");
    for (pod, direction) in [(&client, "outbound"), (&server, "inbound")] {
        let m = pod.metrics()?;
        ensure!(
            m.sum(
                "gofe_requests_total",
                &[("direction", direction), ("status_code", "200")]
            ) == 1.0,
            "{direction} counted the CONNECT: {}",
            m.0
        );
    }
    Ok(())
}

pub fn ipv6_original_destination(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    let out = client.curl(&[
        "-g",
        "-D",
        "-",
        &format!("http://[{}]:{HTTP_PORT}/", server.ip6),
    ])?;
    ensure!(out.ends_with("hello from server\n"), "{out}");
    ensure!(
        out.contains(&format!("x-peer: [{}]:", server.ip6)),
        "inbound reached the app on the pod's IPv6 address it was dialled on: {out}"
    );
    let authority = format!("[{}]:{HTTP_PORT}", server.ip6);
    let cm = client.metrics()?;
    ensure!(
        cm.sum(
            "gofe_requests_total",
            &[("direction", "outbound"), ("authority", &authority)]
        ) == 1.0,
        "{}",
        cm.0
    );
    Ok(())
}

pub fn h2load_through_two_sidecars(w: &World) -> anyhow::Result<()> {
    require_tool("h2load")?;
    const N: u32 = 4000;
    let (client, server) = meshed_pair(w, &[])?;
    let url = format!("http://{}:{HTTP_PORT}/", server.ip4);
    for proto in [&["--h1"][..], &[][..]] {
        let mut cmd = client.command("h2load", Some(crate::harness::APP_UID))?;
        cmd.args(proto)
            .args(["-n", &N.to_string(), "-c", "8", "-m", "4", "-T", "30", &url]);
        let out = crate::harness::sh(&mut cmd)?;
        let expect = format!("{N} succeeded, 0 failed, 0 errored");
        ensure!(out.contains(&expect), "h2load {proto:?}: {out}");
    }
    let cm = client.metrics()?;
    ensure!(
        cm.sum(
            "gofe_requests_total",
            &[("direction", "outbound"), ("status_code", "200")]
        ) == f64::from(2 * N),
        "{}",
        cm.0
    );
    Ok(())
}
