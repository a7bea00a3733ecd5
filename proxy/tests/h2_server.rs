//! The serving side of HTTP/2 in this process, as a client sees it: a CONNECT's stream
//! becomes its tunnel, a stream the client resets gives its request up (its upstream
//! stream is reset too), a stream the application refused is refused to the client
//! (and a meshed client's sidecar sends it again), and a client
//! that stops answering PINGs loses its connection while one that answers keeps it.
//! Real proxies on loopback; the clients are the `h2` crate and, where a client must
//! misbehave, raw frames.

mod support;

use bytes::Bytes;
use h2::Reason;
use http::{Method, Request, StatusCode};
use std::future::poll_fn;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const DISABLED: (&str, &str) = ("GOFE_IDENTITY_DISABLED", "true");

/// An HTTP/2 (prior knowledge) client of `addr`.
async fn h2_client(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tx.ready().await.unwrap()
}

/// The next DATA of `body`, its window given back.
async fn next_data(body: &mut h2::RecvStream) -> Option<Bytes> {
    let data = body.data().await?.unwrap();
    let _ = body.flow_control().release_capacity(data.len());
    Some(data)
}

#[tokio::test]
async fn an_http2_connect_to_the_explicit_proxy_is_a_tunnel_both_ways() {
    let echo = echo().await;
    let proxy = TestProxy::start(&[DISABLED]);
    proxy.ready().await;
    let mut client = h2_client(proxy.addrs.outbound).await;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(echo.to_string())
        .body(())
        .unwrap();
    let (rsp, mut send) = client.send_request(req, false).unwrap();
    let rsp = tokio::time::timeout(Duration::from_secs(10), rsp)
        .await
        .expect("the CONNECT is answered")
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    let mut recv = rsp.into_body();
    let mut echoed = Vec::new();
    for chunk in [&b"ping "[..], b"through ", b"the tunnel"] {
        send.send_data(Bytes::copy_from_slice(chunk), false)
            .unwrap();
    }
    let want = b"ping through the tunnel";
    while echoed.len() < want.len() {
        let data = tokio::time::timeout(Duration::from_secs(10), next_data(&mut recv))
            .await
            .expect("the echo comes back through the tunnel")
            .expect("the tunnel is still open");
        echoed.extend_from_slice(&data);
    }
    assert_eq!(&echoed, want);
    // 4 MiB more, past every window on the way (the client's 64 KiB, the proxy's
    // 256 KiB a stream): it comes back whole only if each side gives its window back
    // as it reads and waits for the other's.
    let big: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    let reader = tokio::spawn(async move {
        let mut back = Vec::new();
        while back.len() < 4 << 20 {
            match next_data(&mut recv).await {
                Some(data) => back.extend_from_slice(&data),
                None => break,
            }
        }
        (back, recv)
    });
    let sent = async {
        for chunk in big.chunks(16 * 1024) {
            send.reserve_capacity(chunk.len());
            while send.capacity() < chunk.len() {
                poll_fn(|cx| send.poll_capacity(cx)).await.unwrap().unwrap();
            }
            send.send_data(Bytes::copy_from_slice(chunk), false)
                .unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(30), sent)
        .await
        .expect("4 MiB go into the tunnel as its windows open");
    let (back, mut recv) = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("4 MiB come back through the tunnel")
        .unwrap();
    assert!(
        back == big,
        "the 4 MiB came back as sent ({} bytes)",
        back.len()
    );
    // The client's end of the stream half-closes the tunnel; the echo server then
    // closes its side, and the stream ends.
    send.send_data(Bytes::new(), true).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        // (The end may come as an empty DATA frame with END_STREAM.)
        while let Some(data) = next_data(&mut recv).await {
            assert!(data.is_empty(), "nothing more was sent: {data:?}");
        }
    });
    end.await.expect("the tunnel's end reaches the client");
    proxy.stop().await;
}

#[tokio::test]
async fn a_stream_the_client_resets_gives_its_request_up_upstream() {
    // An application (HTTP/2, as the client spoke) that takes a request, never
    // answers, and says how its stream ended.
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    let (got_tx, got_rx) = oneshot::channel();
    let (reset_tx, reset_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = app.accept().await.unwrap();
        let mut conn = h2::server::handshake(s).await.unwrap();
        let (req, mut respond) = conn.accept().await.unwrap().unwrap();
        let _ = got_tx.send(req.uri().path().to_string());
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let reset = poll_fn(|cx| respond.poll_reset(cx)).await;
        let _ = reset_tx.send(reset.map_err(|e| e.to_string()));
    });
    let proxy = TestProxy::start(&[DISABLED]);
    proxy.outbound_to(app_addr);
    proxy.ready().await;
    let mut client = h2_client(proxy.addrs.outbound).await;
    let req = Request::get(format!("http://app.test:{}/hang", app_addr.port()))
        .body(())
        .unwrap();
    let (rsp, mut send) = client.send_request(req, true).unwrap();
    let path = tokio::time::timeout(Duration::from_secs(10), got_rx)
        .await
        .expect("the request reaches the application")
        .unwrap();
    assert_eq!(path, "/hang");
    send.send_reset(Reason::CANCEL);
    let reset = tokio::time::timeout(Duration::from_secs(5), reset_rx)
        .await
        .expect("the reset request's upstream stream is reset too, not left to wait")
        .unwrap();
    assert_eq!(reset, Ok(Reason::CANCEL));
    drop(rsp);
    proxy.stop().await;
}

/// A frame's header: length, type, flags, stream.
fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags, 0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

const SETTINGS: u8 = 4;
const PING: u8 = 6;
const ACK: u8 = 1;

#[tokio::test]
async fn a_client_that_stops_answering_pings_loses_its_connection_and_one_that_answers_keeps_it() {
    let app = App::start().await;
    let proxy = TestProxy::start(&[
        DISABLED,
        ("GOFE_HTTP2_KEEPALIVE", "1s"),
        ("GOFE_HTTP_IDLE_TIMEOUT", "60s"),
    ]);
    proxy.inbound_for(app.addr);
    proxy.ready().await;

    // Raw frames: the preface and SETTINGS, the server's SETTINGS acknowledged, its
    // PINGs never.
    let started = Instant::now();
    let mut raw = TcpStream::connect(proxy.addrs.inbound).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(SETTINGS, 0, &[]));
    raw.write_all(&hello).await.unwrap();
    let mut pings = 0;
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        let mut head = [0u8; 9];
        loop {
            if raw.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            if raw.read_exact(&mut payload).await.is_err() {
                return;
            }
            match (head[3], head[4] & ACK) {
                (SETTINGS, 0) => {
                    let _ = raw.write_all(&frame(SETTINGS, ACK, &[])).await;
                }
                (PING, 0) => pings += 1,
                _ => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a connection whose PINGs go unanswered is closed"
    );
    assert!(pings >= 1, "the proxy sent a PING before closing");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed within two PING intervals or so, not by the idle timeout: {:?}",
        started.elapsed()
    );

    // The h2 crate answers PINGs: its connection outlives three intervals and serves.
    let mut client = h2_client(proxy.addrs.inbound).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let req = Request::get(format!("http://app.test:{}/", app.addr.port()))
        .body(())
        .unwrap();
    poll_fn(|cx| client.poll_ready(cx))
        .await
        .expect("the connection that answered its PINGs is still open");
    let (rsp, _) = client.send_request(req, true).unwrap();
    let rsp = tokio::time::timeout(Duration::from_secs(10), rsp)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    proxy.stop().await;
}

/// An HTTP/2 application that refuses the first stream of each method on every
/// connection (RST_STREAM REFUSED_STREAM, as a server at its stream limit does) and
/// answers the others 200 with the body it read; every stream it took is reported as
/// (path, gofe-attempt, body), a refused one's body as "(refused)".
async fn refusing_app() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(String, String, Vec<u8>)>,
) {
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = app.local_addr().unwrap();
    let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = app.accept().await else {
                return;
            };
            let seen = seen_tx.clone();
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(s).await.unwrap();
                let mut refused = std::collections::HashSet::new();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let attempt = req
                        .headers()
                        .get("gofe-attempt")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    let path = req.uri().path().to_string();
                    if refused.insert(req.method().clone()) {
                        let _ = seen.send((path, attempt, b"(refused)".to_vec()));
                        respond.send_reset(Reason::REFUSED_STREAM);
                        continue;
                    }
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        let mut got = Vec::new();
                        while let Some(data) = next_data(&mut body).await {
                            got.extend_from_slice(&data);
                        }
                        let _ = seen.send((path, attempt, got.clone()));
                        let rsp = http::Response::new(());
                        let mut send = respond.send_response(rsp, false).unwrap();
                        send.send_data(Bytes::from(got), true).unwrap();
                    });
                }
            });
        }
    });
    (addr, seen_rx)
}

/// A stream the application refused was never processed (RFC 9113 §8.7): the proxy
/// refuses the client's stream in turn rather than answering 502, so that whoever
/// sent it may send it again. Through two sidecars, the client's sidecar does: the
/// request arrives whole on its second attempt, a GET and a POST with its body alike,
/// and the client sees only the answer.
#[tokio::test]
async fn a_stream_the_application_refused_is_refused_to_the_client_and_a_sidecar_sends_it_again() {
    // One hop: a client of the inbound listener sees the refusal itself.
    let (app, mut seen) = refusing_app().await;
    let proxy = TestProxy::start(&[DISABLED]);
    proxy.inbound_for(app);
    proxy.ready().await;
    let mut client = h2_client(proxy.addrs.inbound).await;
    let req = Request::get(format!("http://{app}/once")).body(()).unwrap();
    let (rsp, _) = client.send_request(req, true).unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), rsp)
        .await
        .expect("an answer or a reset")
        .expect_err("refused, not answered");
    assert_eq!(refused.reason(), Some(Reason::REFUSED_STREAM), "{refused}");
    assert_eq!(seen.recv().await.unwrap().0, "/once");
    proxy.stop().await;

    // Two hops over mTLS: the client's sidecar sends the refused stream again.
    let (app, mut seen) = refusing_app().await;
    let issuer = Issuer::start().await;
    let server = TestProxy::start(&pairs(&issuer.vars("api")));
    server.inbound_for(app);
    let sidecar = TestProxy::start(&pairs(&issuer.vars("web")));
    sidecar.outbound_to(server.addrs.inbound);
    server.ready().await;
    sidecar.ready().await;
    let mut client = h2_client(sidecar.addrs.outbound).await;
    for (method, body) in [(Method::GET, &b""[..]), (Method::POST, &b"order 66"[..])] {
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("http://api.test:{}/twice", app.port()))
            .body(())
            .unwrap();
        let (rsp, mut send) = client.send_request(req, body.is_empty()).unwrap();
        if !body.is_empty() {
            send.send_data(Bytes::from_static(body), true).unwrap();
        }
        let rsp = tokio::time::timeout(Duration::from_secs(10), rsp)
            .await
            .expect("answered in time")
            .unwrap_or_else(|e| panic!("{method}: answered, not {e}"));
        assert_eq!(rsp.status(), StatusCode::OK, "{method}");
        let mut answer = rsp.into_body();
        let mut got = Vec::new();
        while let Some(data) = next_data(&mut answer).await {
            got.extend_from_slice(&data);
        }
        assert_eq!(got, body, "{method}: the answer echoes the body");
        let first = seen.recv().await.unwrap();
        let second = seen.recv().await.unwrap();
        assert_eq!(
            (first.1.as_str(), first.2.as_slice()),
            ("1", &b"(refused)"[..]),
            "{method}: the first attempt was refused"
        );
        assert_eq!(
            (second.0.as_str(), second.1.as_str(), second.2.as_slice()),
            ("/twice", "2", body),
            "{method}: sent again, whole"
        );
    }
    sidecar.stop().await;
    server.stop().await;
}
