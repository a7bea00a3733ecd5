//! Identity and mutual TLS between pods: the real `gofe identity` issuing to real
//! proxies, TLS on the wire, strict inbound refusals, renewal and rotation under load.

use super::{HTTP_PORT, meshed_pair};
use crate::harness::{Capture, Issuer, Pod, World, eventually};
use anyhow::{Context, anyhow, bail, ensure};
use gofe_identity::trust::{MeshServerVerifier, TrustAnchors};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

crate::cases::register![
    traffic_is_mtls_on_the_wire_and_the_app_sees_the_client_identity,
    a_client_cannot_forge_its_identity,
    strict_inbound_refuses_plaintext,
    strict_inbound_refuses_a_foreign_ca_and_an_expired_certificate,
    inbound_authorize_admits_only_listed_identities,
    renewals_under_load_fail_no_request,
    issuer_outage_keeps_traffic_flowing_and_renewal_resumes,
    trust_anchor_rotation_fails_no_request,
    auto_mode_reaches_an_unmeshed_pod_in_plaintext_and_remembers,
    the_issuer_refuses_bad_tokens_and_names,
];

const DEADLINE: Duration = Duration::from_secs(20);

fn identity_json(pod: &Pod<'_>) -> anyhow::Result<serde_json::Value> {
    let (_, body) = pod.admin("GET", "/identity")?;
    Ok(serde_json::from_str(&body)?)
}

fn renewals(pod: &Pod<'_>, result: &str) -> anyhow::Result<f64> {
    Ok(pod
        .metrics()?
        .sum("gofe_identity_renewals_total", &[("result", result)]))
}

/// A workload certificate for `spiffe` signed by the issuer in `issuer_dir`, valid
/// from `not_before` to `not_after`: what a test client presents.
fn mint(
    issuer_dir: &Path,
    spiffe: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = gofe_identity::cert::certs_from_pem(&std::fs::read(issuer_dir.join("tls.crt"))?)?;
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(issuer_dir.join("tls.key"))?)?;
    let issuer = rcgen::Issuer::from_ca_cert_der(&chain[0], key)?;
    let leaf_key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(spiffe.try_into()?)];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let leaf = params.signed_by(&leaf_key, &issuer)?;
    let mut out = vec![leaf.der().clone()];
    out.extend(chain);
    Ok((out, PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into())))
}

/// An HTTP/2 request over mesh TLS, presenting `chain`, to the proxy at `addr`, as
/// another proxy would make it. The status, or why there is none.
async fn mesh_request(
    addr: std::net::SocketAddr,
    anchors: &Path,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<u16> {
    use http_body_util::BodyExt;
    let anchors = Arc::new(TrustAnchors::load(anchors)?);
    let mut config = rustls::ClientConfig::builder_with_provider(anchors.provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier::new(
            anchors.clone(),
            "cluster.local",
        )))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![gofe_identity::tls::ALPN_H2.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await?;
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}/"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let rsp = tokio::time::timeout(Duration::from_secs(10), tx.send_request(req)).await??;
    let status = rsp.status().as_u16();
    rsp.into_body().collect().await?;
    Ok(status)
}

/// Records the certificate a server presents, accepting anything.
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Option<String>>);

impl rustls::client::danger::ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = gofe_identity::cert::inspect(end_entity)
            .ok()
            .map(|i| i.serial);
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The serial of the certificate a new handshake with the proxy at `addr` shows.
async fn presented_serial(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let recorder = Arc::new(Recorder::default());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .dangerous()
    .with_custom_certificate_verifier(recorder.clone())
    .with_no_client_auth();
    config.alpn_protocols = vec![gofe_identity::tls::ALPN_H2.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    // The proxy refuses us (no client certificate) after showing its own.
    let _ = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await;
    let serial = recorder.0.lock().unwrap().clone();
    serial.ok_or_else(|| anyhow!("no certificate presented"))
}

/// A steady stream of work from a client pod to a server pod until stopped: HTTP
/// requests on fresh client connections, and opaque round trips (each its own mTLS
/// handshake between the proxies).
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
    stop: AtomicBool,
}

impl Load {
    fn new() -> Load {
        Load {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_error: std::sync::Mutex::new(None),
            stop: AtomicBool::new(false),
        }
    }

    fn record(&self, r: anyhow::Result<()>) {
        match r {
            Ok(()) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                self.first_error
                    .lock()
                    .unwrap()
                    .get_or_insert(format!("{e:#}"));
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    async fn run(&self, server: std::net::Ipv4Addr) {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut n = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            n += 1;
            let http = async {
                let tcp = tokio::net::TcpStream::connect((server, HTTP_PORT)).await?;
                let (mut tx, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                        .await?;
                tokio::spawn(conn);
                let req = http::Request::get(format!("/load/{n}"))
                    .header("host", "server")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())?;
                let rsp = tx.send_request(req).await?;
                let status = rsp.status();
                rsp.into_body().collect().await?;
                ensure!(status == 404, "the app's answer to /load: {status}");
                anyhow::Ok(())
            };
            self.record(
                tokio::time::timeout(Duration::from_secs(5), http)
                    .await
                    .unwrap_or_else(|_| Err(anyhow!("timed out"))),
            );
            if n.is_multiple_of(5) {
                let opaque = async {
                    let s = tokio::net::TcpStream::connect((server, 3306)).await?;
                    let mut r = tokio::io::BufReader::new(s);
                    let mut line = String::new();
                    r.read_line(&mut line).await?;
                    ensure!(line.starts_with("220 "), "banner: {line:?}");
                    r.get_mut().write_all(b"ping\n").await?;
                    line.clear();
                    r.read_line(&mut line).await?;
                    ensure!(line == "ping\n", "echo: {line:?}");
                    anyhow::Ok(())
                };
                self.record(
                    tokio::time::timeout(Duration::from_secs(5), opaque)
                        .await
                        .unwrap_or_else(|_| Err(anyhow!("timed out"))),
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn check(&self) -> anyhow::Result<u64> {
        let failed = self.failed.load(Ordering::Relaxed);
        ensure!(
            failed == 0,
            "{failed} of {} operations failed; first: {:?}",
            failed + self.ok.load(Ordering::Relaxed),
            self.first_error.lock().unwrap()
        );
        Ok(self.ok.load(Ordering::Relaxed))
    }
}

/// Runs `during` while `load` goes on from `client` to `server`; then checks that no
/// operation failed.
fn under_load(
    client: &Pod<'_>,
    server: &Pod<'_>,
    during: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let load = Load::new();
    let ip = server.ip4;
    let result = std::thread::scope(|s| {
        let runner = s.spawn(|| client.block_on(|| load.run(ip)));
        let result = during();
        load.stop.store(true, Ordering::Relaxed);
        runner.join().map_err(|_| anyhow!("load panicked"))??;
        result
    });
    result?;
    load.check()
}

pub fn traffic_is_mtls_on_the_wire_and_the_app_sees_the_client_identity(
    w: &World,
) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[])?;
    let marker = format!("plaintext-marker-{}", std::process::id());
    let capture = Capture::start(&server)?;
    let out = client.curl(&[
        "-H",
        "gofe-client-id: spiffe://cluster.local/ns/evil/sa/spoofed",
        "--data-binary",
        &marker,
        &format!("http://{}:{HTTP_PORT}/headers", server.ip4),
    ])?;
    let frames = capture.finish()?;
    let headers: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        headers["gofe-client-id"] == Issuer::identity("client"),
        "the app sees the client's SPIFFE ID, not a spoofed one: {headers}"
    );
    let contains = |needle: &[u8]| frames.windows(needle.len()).any(|w| w == needle);
    ensure!(
        frames.len() > 1000,
        "the capture saw the exchange ({} bytes)",
        frames.len()
    );
    ensure!(
        !contains(marker.as_bytes()),
        "the request body crossed the wire in plaintext"
    );
    ensure!(
        !contains(b"/headers"),
        "the request line crossed the wire in plaintext"
    );
    // TLS 1.3 application data records.
    ensure!(contains(&[0x17, 0x03, 0x03]), "no TLS records on the wire");
    // From outside the mesh, a claimed identity is removed, not passed on.
    let outsider = w.pod("outsider").start()?;
    let out = outsider.curl(&[
        "-H",
        "gofe-client-id: spiffe://cluster.local/ns/default/sa/client",
        &format!("http://{}:{HTTP_PORT}/headers", server.ip4),
    ])?;
    let headers: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        headers.get("gofe-client-id").is_none(),
        "a plaintext client's claim was removed: {headers}"
    );
    let sm = server.metrics()?;
    for (tls, peer) in [
        ("true", Issuer::identity("client")),
        ("false", String::new()),
    ] {
        ensure!(
            sm.sum(
                "gofe_requests_total",
                &[
                    ("direction", "inbound"),
                    ("tls", tls),
                    ("peer_identity", &peer)
                ]
            ) == 1.0,
            "{}",
            sm.0
        );
    }
    Ok(())
}

/// A raw request, written by hand from the client pod, whose headers claim another
/// identity; returns what the app saw as the client's identity.
fn forged_request(
    client: &Pod<'_>,
    server: std::net::Ipv4Addr,
    stall: Duration,
) -> anyhow::Result<String> {
    let forged = "spiffe://cluster.local/ns/default/sa/admin";
    let reply = client.block_on(|| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect((server, HTTP_PORT)).await?;
        s.write_all(b"G").await?;
        tokio::time::sleep(stall).await;
        let rest = format!(
            "ET /headers HTTP/1.1\r\nHost: server\r\ngofe-client-id: {forged}\r\ngofe_client_id: {forged}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(rest.as_bytes()).await?;
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await??;
        anyhow::Ok(out)
    })??;
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let headers: serde_json::Value = serde_json::from_str(body).with_context(|| reply.clone())?;
    ensure!(
        headers.get("gofe_client_id").is_none(),
        "the underscored claim was removed: {headers}"
    );
    Ok(headers["gofe-client-id"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Stalling past detection, or declaring the port opaque on its own side, does not let
/// a meshed client pass a forged gofe-client-id to the server's application.
pub fn a_client_cannot_forge_its_identity(w: &World) -> anyhow::Result<()> {
    let stalling = w
        .pod("stalling")
        .sidecar()
        .env("GOFE_DETECT_TIMEOUT", "1s")
        .start()?;
    let opaque = w
        .pod("opaque")
        .sidecar()
        .env("GOFE_OPAQUE_PORTS", &format!("{HTTP_PORT}"))
        .start()?;
    let server = w.pod("server").sidecar().start()?;
    server.app("http", HTTP_PORT)?;
    let seen = forged_request(&stalling, server.ip4, Duration::from_millis(1500))?;
    ensure!(
        seen == Issuer::identity("stalling"),
        "after a stall the app saw {seen:?}"
    );
    let seen = forged_request(&opaque, server.ip4, Duration::ZERO)?;
    ensure!(
        seen == Issuer::identity("opaque"),
        "through an opaque port the app saw {seen:?}"
    );
    Ok(())
}

pub fn strict_inbound_refuses_plaintext(w: &World) -> anyhow::Result<()> {
    let (client, server) = meshed_pair(w, &[("GOFE_INBOUND_MTLS", "strict")])?;
    server.app("banner", 3306)?;
    let outsider = w.pod("outsider").start()?;
    let url = format!("http://{}:{HTTP_PORT}/", server.ip4);
    ensure!(
        client.curl(&[&url])? == "hello from server\n",
        "the mesh gets in"
    );
    let out = outsider.curl_output(&["-D", "-", "-o", "/dev/null", &url])?;
    let head = String::from_utf8_lossy(&out.stdout);
    ensure!(
        head.starts_with("HTTP/1.1 403"),
        "plaintext HTTP refused: {head}"
    );
    // A remote client learns why in general terms, nothing of the pod's settings.
    ensure!(
        head.contains("gofe-proxy-error: refused by the destination's inbound policy")
            && !head.contains("GOFE_"),
        "{head}"
    );
    // Opaque plaintext: reset, nothing from the app.
    let ip = server.ip4;
    let read = outsider.block_on(|| async move {
        use tokio::io::AsyncReadExt;
        let mut s = tokio::net::TcpStream::connect((ip, 3306)).await?;
        let mut buf = [0u8; 64];
        anyhow::Ok(tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await?)
    })??;
    ensure!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
            || matches!(read, Ok(0)),
        "opaque plaintext refused: {read:?}"
    );
    Ok(())
}

pub fn strict_inbound_refuses_a_foreign_ca_and_an_expired_certificate(
    w: &World,
) -> anyhow::Result<()> {
    let server = w
        .pod("server")
        .sidecar()
        .env("GOFE_INBOUND_MTLS", "strict")
        .start()?;
    server.app("http", HTTP_PORT)?;
    let outsider = w.pod("outsider").start()?;
    let issuer = w.issuer()?;
    let foreign = w.dir().join("foreign");
    gofe_identity::issuer::material::bootstrap(&foreign, "cluster.local")?;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let id = Issuer::identity("outsider");
    let cases = [
        (
            "a certificate from the mesh's issuer",
            mint(&issuer.dir, &id, now - hour, now + hour)?,
            true,
        ),
        (
            "a certificate from a foreign CA",
            mint(&foreign, &id, now - hour, now + hour)?,
            false,
        ),
        (
            "an expired certificate",
            mint(&issuer.dir, &id, now - 2 * hour, now - hour)?,
            false,
        ),
    ];
    let addr = std::net::SocketAddr::from((server.ip4, HTTP_PORT));
    let anchors = w.anchors_file();
    for (what, (chain, key), accepted) in cases {
        let anchors = anchors.clone();
        let result =
            outsider.block_on(|| async move { mesh_request(addr, &anchors, chain, key).await })?;
        match (result, accepted) {
            (Ok(200), true) => {}
            (Err(_), false) => {}
            (other, _) => bail!(
                "{what}: expected {}, got {other:?}",
                if accepted {
                    "200"
                } else {
                    "a refused handshake"
                }
            ),
        }
    }
    let m = server.metrics()?;
    ensure!(
        m.sum(
            "gofe_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "error")]
        ) == 2.0,
        "{}",
        m.0
    );
    Ok(())
}

pub fn inbound_authorize_admits_only_listed_identities(w: &World) -> anyhow::Result<()> {
    let server = w
        .pod("server")
        .sidecar()
        .env("GOFE_INBOUND_AUTHORIZE", &Issuer::identity("client"))
        .start()?;
    server.app("http", HTTP_PORT)?;
    let client = w.pod("client").sidecar().start()?;
    let intruder = w.pod("intruder").sidecar().start()?;
    let url = format!("http://{}:{HTTP_PORT}/", server.ip4);
    ensure!(client.curl(&[&url])? == "hello from server\n");
    let out = intruder.curl_output(&["-D", "-", "-o", "/dev/null", &url])?;
    let head = String::from_utf8_lossy(&out.stdout);
    ensure!(head.starts_with("HTTP/1.1 403"), "{head}");
    ensure!(
        head.contains("gofe-proxy-error: refused by the destination's inbound policy")
            && !head.contains("spiffe://"),
        "the refusal names no identity to a remote client: {head}"
    );
    Ok(())
}

pub fn renewals_under_load_fail_no_request(w: &World) -> anyhow::Result<()> {
    // 3 s certificates: a renewal every ~2 s.
    w.issuer_with_lifetime(Duration::from_secs(3))?;
    let (client, server) = meshed_pair(w, &[])?;
    server.app("banner", 3306)?;
    // Handshakes are looked at from outside the mesh (a meshed pod's own proxy would
    // intercept them).
    let observer = w.pod("observer").start()?;
    let inbound = std::net::SocketAddr::from((server.ip4, HTTP_PORT));
    let mut serials = std::collections::BTreeSet::new();
    let ops = under_load(&client, &server, || {
        eventually(
            "five renewals on both sides",
            Duration::from_secs(30),
            || {
                let serial = observer.block_on(|| presented_serial(inbound))??;
                serials.insert(serial);
                let done = renewals(&client, "ok")? >= 6.0 && renewals(&server, "ok")? >= 6.0;
                std::thread::sleep(Duration::from_millis(200));
                Ok(done.then_some(()))
            },
        )
    })?;
    ensure!(ops > 100, "the load ran ({ops} operations)");
    ensure!(
        serials.len() >= 5,
        "new handshakes showed the new certificates: {serials:?}"
    );
    Ok(())
}

pub fn issuer_outage_keeps_traffic_flowing_and_renewal_resumes(w: &World) -> anyhow::Result<()> {
    // 20 s certificates: the first renewal is due after ~14 s, and the issuer is gone
    // from the start until renewals have failed for a while.
    let issuer = w.issuer_with_lifetime(Duration::from_secs(20))?;
    let (client, server) = meshed_pair(w, &[])?;
    server.app("banner", 3306)?;
    let ops = under_load(&client, &server, || {
        w.stop_issuer(&issuer)?;
        eventually(
            "renewals fail while the issuer is down",
            Duration::from_secs(30),
            || {
                Ok(
                    (renewals(&client, "error")? >= 2.0 && renewals(&server, "error")? >= 2.0)
                        .then_some(()),
                )
            },
        )?;
        ensure!(
            identity_json(&client)?["certificate"].is_object(),
            "the current certificate still serves"
        );
        w.start_issuer(&issuer)?;
        eventually("renewal succeeds when the issuer returns", DEADLINE, || {
            Ok((renewals(&client, "ok")? >= 2.0 && renewals(&server, "ok")? >= 2.0).then_some(()))
        })?;
        Ok(())
    })?;
    ensure!(ops > 100, "the load ran ({ops} operations)");
    Ok(())
}

pub fn trust_anchor_rotation_fails_no_request(w: &World) -> anyhow::Result<()> {
    let issuer = w.issuer_with_lifetime(Duration::from_secs(4))?;
    let (client, server) = meshed_pair(w, &[])?;
    server.app("banner", 3306)?;
    let old_anchor = std::fs::read(w.anchors_file())?;
    let next = w.dir().join("next");
    gofe_identity::issuer::material::bootstrap(&next, "cluster.local")?;
    let new_anchor = std::fs::read(next.join("ca.crt"))?;
    let anchors_now = |n: u64| {
        move |pod: &Pod<'_>| -> anyhow::Result<bool> {
            Ok(identity_json(pod)?["trust_anchors"] == n)
        }
    };
    let ops = under_load(&client, &server, || {
        // 1: every proxy trusts the old and the new root.
        let bundle = [old_anchor.clone(), new_anchor.clone()].concat();
        std::fs::write(w.anchors_file(), &bundle)?;
        eventually("both proxies trust both roots", DEADLINE, || {
            Ok((anchors_now(2)(&client)? && anchors_now(2)(&server)?).then_some(()))
        })?;
        // 2: the issuer signs under the new root; every proxy renews onto it.
        w.stop_issuer(&issuer)?;
        for f in ["tls.crt", "tls.key"] {
            std::fs::copy(next.join(f), issuer.dir.join(f))?;
        }
        std::fs::write(issuer.dir.join("ca.crt"), &bundle)?;
        let before = (renewals(&client, "ok")?, renewals(&server, "ok")?);
        w.start_issuer(&issuer)?;
        eventually(
            "both proxies hold certificates from the new issuer",
            DEADLINE,
            || {
                Ok((renewals(&client, "ok")? >= before.0 + 2.0
                    && renewals(&server, "ok")? >= before.1 + 2.0)
                    .then_some(()))
            },
        )?;
        // 3: the old root is retired.
        std::fs::write(w.anchors_file(), &new_anchor)?;
        eventually("both proxies trust only the new root", DEADLINE, || {
            Ok((anchors_now(1)(&client)? && anchors_now(1)(&server)?).then_some(()))
        })?;
        let after = renewals(&client, "ok")?;
        eventually("renewals go on under the new root alone", DEADLINE, || {
            Ok((renewals(&client, "ok")? >= after + 1.0).then_some(()))
        })?;
        Ok(())
    })?;
    ensure!(ops > 100, "the load ran ({ops} operations)");
    Ok(())
}

pub fn auto_mode_reaches_an_unmeshed_pod_in_plaintext_and_remembers(
    w: &World,
) -> anyhow::Result<()> {
    let client = w.pod("client").sidecar().start()?;
    let strict = w
        .pod("strict")
        .sidecar()
        .env("GOFE_OUTBOUND_MTLS", "strict")
        .start()?;
    let plain = w.pod("plain").start()?;
    plain.app("http", HTTP_PORT)?;
    let url = format!("http://{}:{HTTP_PORT}/", plain.ip4);
    for _ in 0..5 {
        ensure!(client.curl(&[&url])? == "hello from plain\n");
    }
    let m = client.metrics()?;
    ensure!(
        m.sum(
            "gofe_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "error")]
        ) == 1.0,
        "one failed handshake, then plaintext remembered: {}",
        m.0
    );
    ensure!(
        m.sum(
            "gofe_requests_total",
            &[
                ("direction", "outbound"),
                ("tls", "false"),
                ("status_code", "200")
            ]
        ) == 5.0,
        "{}",
        m.0
    );
    let out = strict.curl_output(&["-o", "/dev/null", "-w", "%{http_code}", &url])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "502",
        "strict mode refuses plaintext: {out:?}"
    );
    Ok(())
}

pub fn the_issuer_refuses_bad_tokens_and_names(w: &World) -> anyhow::Result<()> {
    let issuer = w.issuer()?;
    let outsider = w.pod("outsider").start()?;
    let addr = std::net::SocketAddr::from((issuer.ip, crate::harness::ISSUER_PORT));
    let anchors = w.anchors_file();
    let key = rcgen::KeyPair::generate()?;
    let csr = |names: Vec<rcgen::SanType>| -> anyhow::Result<String> {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = names;
        Ok(p.serialize_request(&key)?.pem()?)
    };
    let uri =
        |s: &str| -> anyhow::Result<rcgen::SanType> { Ok(rcgen::SanType::URI(s.try_into()?)) };
    let web = Issuer::identity("web");
    let cases = [
        (
            "a valid request",
            csr(vec![uri(&web)?])?,
            w.token("web")?,
            200,
        ),
        (
            "a token that is not a JWT",
            csr(vec![uri(&web)?])?,
            "garbage".to_string(),
            401,
        ),
        (
            "another workload's name",
            csr(vec![uri(&Issuer::identity("admin"))?])?,
            w.token("web")?,
            403,
        ),
        (
            "extra names",
            csr(vec![
                uri(&web)?,
                rcgen::SanType::DnsName("evil.example".try_into()?),
            ])?,
            w.token("web")?,
            403,
        ),
    ];
    for (what, csr, token, want) in cases {
        let anchors = anchors.clone();
        let body = serde_json::json!({"csr": csr, "token": token}).to_string();
        let status = outsider.block_on(|| async move { certify(addr, &anchors, body).await })??;
        ensure!(status == want, "{what}: expected {want}, got {status}");
    }
    Ok(())
}

/// A raw certify request to the issuer over TLS.
async fn certify(addr: std::net::SocketAddr, anchors: &Path, body: String) -> anyhow::Result<u16> {
    use http_body_util::BodyExt;
    let anchors = TrustAnchors::load(anchors)?;
    let config = rustls::ClientConfig::builder_with_provider(anchors.provider().clone())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(anchors.roots())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(gofe_identity::issuer::SERVER_NAME.try_into()?, tcp)
        .await
        .context("TLS to the issuer")?;
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let rsp = tx
        .send_request(
            http::Request::post(gofe_identity::api::CERTIFY_PATH)
                .header("host", gofe_identity::issuer::SERVER_NAME)
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))?,
        )
        .await?;
    let status = rsp.status().as_u16();
    rsp.into_body().collect().await?;
    Ok(status)
}
