//! The issuer and the proxy's client against each other, in-process but for real: a
//! bootstrapped CA, an HTTPS issuer, ES256 service-account tokens checked against a
//! JWKS file, PKCS#10 CSRs.

use base64::Engine;
use gofe_identity::SpiffeId;
use gofe_identity::api::{CERTIFY_PATH, TOKEN_AUDIENCE};
use gofe_identity::client::{CertifyError, IdentityClient};
use gofe_identity::issuer::tokens::JwksSource;
use gofe_identity::issuer::{Bound, IssuerConfig, material};
use gofe_identity::trust::TrustAnchors;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

struct Cluster {
    dir: tempfile::TempDir,
    signing: rcgen::KeyPair,
}

impl Cluster {
    /// A CA directory and a service-account signing key published as a JWKS file.
    fn new() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        material::bootstrap(&dir.path().join("issuer"), "cluster.local").unwrap();
        let signing = rcgen::KeyPair::generate().unwrap();
        let raw = rcgen::PublicKeyData::der_bytes(&signing);
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        }]});
        std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
        Cluster { dir, signing }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A token as the kubelet would project it.
    fn token(&self, ns: &str, sa: &str, audience: &str, expires_in: i64) -> String {
        self.token_with(ns, sa, audience, expires_in, "")
    }

    /// The same, with `extra` (raw JSON members, written as they are) in its claims.
    fn token_with(
        &self,
        ns: &str,
        sa: &str,
        audience: &str,
        expires_in: i64,
        extra: &str,
    ) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let claims = serde_json::json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": [audience],
            "exp": now + expires_in,
            "iat": now - 10,
            "nbf": now - 10,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"}},
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k1".into());
        let key = jsonwebtoken::EncodingKey::from_ec_pem(self.signing.serialize_pem().as_bytes())
            .unwrap();
        let mut payload = claims.to_string();
        if !extra.is_empty() {
            payload.pop();
            payload.push_str(&format!(",{extra}}}"));
        }
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let head = b64(serde_json::to_string(&header).unwrap().as_bytes());
        let signing_input = format!("{head}.{}", b64(payload.as_bytes()));
        let signature =
            jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, header.alg).unwrap();
        format!("{signing_input}.{signature}")
    }

    fn write_token(&self, name: &str, token: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, token).unwrap();
        p
    }

    async fn issuer(
        &self,
        insecure_dev: bool,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let bound = Bound::bind(IssuerConfig {
            dir: self.path("issuer"),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            cert_lifetime: Duration::from_secs(3600),
            jwks: Some(JwksSource::File(self.path("jwks.json"))),
            insecure_dev,
            trust_domain: "cluster.local".into(),
            audience: TOKEN_AUDIENCE.into(),
            token_issuer: None,
        })
        .await
        .unwrap();
        let addr = bound.addr();
        (addr, tokio::spawn(bound.run(std::future::pending())))
    }

    fn client(&self, addr: std::net::SocketAddr, name: &str, token: &Path) -> IdentityClient {
        let anchors = Arc::new(TrustAnchors::load(&self.path("issuer/ca.crt")).unwrap());
        IdentityClient::new(
            addr.to_string(),
            gofe_identity::issuer::SERVER_NAME.into(),
            name.parse().unwrap(),
            token.to_owned(),
            anchors,
        )
        .unwrap()
    }
}

fn refused(r: Result<gofe_identity::client::Issued, CertifyError>) -> (u16, String) {
    match r {
        Err(CertifyError::Refused { status, message }) => (status, message),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a certificate"),
    }
}

#[tokio::test]
async fn issues_a_certificate_for_the_tokens_identity() {
    let c = Cluster::new();
    let (addr, _issuer) = c.issuer(false).await;
    let token = c.write_token("web.token", &c.token("default", "web", TOKEN_AUDIENCE, 600));
    let client = c.client(addr, "spiffe://cluster.local/ns/default/sa/web", &token);
    let issued = client.certify().await.unwrap();
    let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
    assert_eq!(issued.info.identity, Some(id));
    assert_eq!(issued.chain.len(), 2, "leaf and issuer");
    let lifetime = issued
        .info
        .not_after
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(lifetime > Duration::from_secs(3500) && lifetime <= Duration::from_secs(3600));
    // Backdated a little for clock skew.
    assert!(issued.info.not_before < SystemTime::now() - Duration::from_secs(30));
    // A second certificate has a new serial, and certifies a new key.
    let again = client.certify().await.unwrap();
    assert_ne!(again.info.serial, issued.info.serial);
    let key = |chain: &[rustls::pki_types::CertificateDer<'static>]| {
        x509_parser::parse_x509_certificate(&chain[0])
            .unwrap()
            .1
            .public_key()
            .raw
            .to_vec()
    };
    assert_ne!(
        key(&again.chain),
        key(&issued.chain),
        "a fresh key pair each time"
    );
}

#[tokio::test]
async fn an_issuer_about_to_expire_is_not_ready_and_issues_nothing_that_would_outlive_it() {
    let c = Cluster::new();
    // The issuer's own certificate has a minute left; workload certificates last an hour.
    material::bootstrap_for(&c.path("issuer"), "cluster.local", Duration::from_secs(60)).unwrap();
    let bound = Bound::bind(IssuerConfig {
        dir: c.path("issuer"),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        cert_lifetime: Duration::from_secs(3600),
        jwks: Some(JwksSource::File(c.path("jwks.json"))),
        insecure_dev: false,
        trust_domain: "cluster.local".into(),
        audience: TOKEN_AUDIENCE.into(),
        token_issuer: None,
    })
    .await
    .unwrap();
    let (addr, admin) = (bound.addr(), bound.admin_addr());
    let _issuer = tokio::spawn(bound.run(std::future::pending()));
    let token = c.write_token("web.token", &c.token("default", "web", TOKEN_AUDIENCE, 600));
    let (status, message) = refused(
        c.client(addr, "spiffe://cluster.local/ns/default/sa/web", &token)
            .certify()
            .await,
    );
    assert_eq!(status, 503, "{message}");
    assert!(message.contains("expires"), "{message}");
    let (ready, body) = get(admin, "/ready").await;
    assert_eq!(ready, 503, "{body}");
    let (_, metrics) = get(admin, "/metrics").await;
    assert!(metrics.contains("gofe_issuer_ready 0"), "{metrics}");
    assert!(
        metrics.contains("gofe_issuer_requests_total{result=\"issuer_expiring\"} 1"),
        "{metrics}"
    );
}

/// A plain GET to the issuer's admin listener: status and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn refuses_a_token_whose_claims_are_not_json() {
    // A lone surrogate in a claim the issuer does not read: the payload is no JSON, and
    // a token is all JSON or nothing (found by fuzzing, target jwt).
    let c = Cluster::new();
    let (addr, _issuer) = c.issuer(false).await;
    let name = "spiffe://cluster.local/ns/default/sa/web";
    let fine = c.write_token(
        "ok",
        &c.token_with("default", "web", TOKEN_AUDIENCE, 600, r#""x":"\u00e9""#),
    );
    c.client(addr, name, &fine)
        .certify()
        .await
        .expect("a well-formed extra claim");
    let token = c.write_token(
        "t",
        &c.token_with("default", "web", TOKEN_AUDIENCE, 600, r#""x":"\ud800""#),
    );
    let (status, message) = refused(c.client(addr, name, &token).certify().await);
    assert_eq!(status, 401, "{message}");
}

#[tokio::test]
async fn refuses_an_expired_token() {
    let c = Cluster::new();
    let (addr, _issuer) = c.issuer(false).await;
    let token = c.write_token("t", &c.token("default", "web", TOKEN_AUDIENCE, -120));
    let (status, message) = refused(
        c.client(addr, "spiffe://cluster.local/ns/default/sa/web", &token)
            .certify()
            .await,
    );
    assert_eq!(status, 401);
    assert!(message.contains("xpired"), "{message}");
}

#[tokio::test]
async fn refuses_a_token_for_another_audience_or_signed_by_another_key() {
    let c = Cluster::new();
    let (addr, _issuer) = c.issuer(false).await;
    let token = c.write_token("t", &c.token("default", "web", "vault", 600));
    let (status, _) = refused(
        c.client(addr, "spiffe://cluster.local/ns/default/sa/web", &token)
            .certify()
            .await,
    );
    assert_eq!(status, 401);
    let other = Cluster::new();
    let token = c.write_token("t2", &other.token("default", "web", TOKEN_AUDIENCE, 600));
    let (status, message) = refused(
        c.client(addr, "spiffe://cluster.local/ns/default/sa/web", &token)
            .certify()
            .await,
    );
    assert_eq!(status, 401, "{message}");
    let token = c.write_token("t3", "not.a.jwt");
    let (status, _) = refused(
        c.client(addr, "spiffe://cluster.local/ns/default/sa/web", &token)
            .certify()
            .await,
    );
    assert_eq!(status, 401);
}

#[tokio::test]
async fn refuses_a_csr_for_another_identity() {
    let c = Cluster::new();
    let (addr, _issuer) = c.issuer(false).await;
    let token = c.write_token("t", &c.token("default", "web", TOKEN_AUDIENCE, 600));
    let (status, message) = refused(
        c.client(addr, "spiffe://cluster.local/ns/default/sa/admin", &token)
            .certify()
            .await,
    );
    assert_eq!(status, 403);
    assert!(
        message.contains("sa/admin") && message.contains("sa/web"),
        "{message}"
    );
}

/// A CSR with a second name is refused even when its first name is right; sent by hand
/// since the proxy's client never makes one.
#[tokio::test]
async fn refuses_a_csr_with_extra_names() {
    let c = Cluster::new();
    let (addr, _issuer) = c.issuer(false).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
    params.subject_alt_names.insert(
        0,
        rcgen::SanType::URI(
            "spiffe://cluster.local/ns/default/sa/web"
                .try_into()
                .unwrap(),
        ),
    );
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let body =
        serde_json::json!({"csr": csr, "token": c.token("default", "web", TOKEN_AUDIENCE, 600)});
    let (status, text) = post(&c, addr, body.to_string()).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("DNS evil.example.com"), "{text}");
}

#[tokio::test]
async fn insecure_dev_accepts_any_token_but_not_another_trust_domain() {
    let c = Cluster::new();
    let (addr, _issuer) = c.issuer(true).await;
    let token = c.write_token("t", "anything");
    let issued = c
        .client(addr, "spiffe://cluster.local/ns/demo/sa/api", &token)
        .certify()
        .await
        .unwrap();
    assert_eq!(
        issued.info.identity.unwrap().to_string(),
        "spiffe://cluster.local/ns/demo/sa/api"
    );
    let (status, message) = refused(
        c.client(addr, "spiffe://other.org/ns/demo/sa/api", &token)
            .certify()
            .await,
    );
    assert_eq!(status, 403);
    assert!(message.contains("trust domain"), "{message}");
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_issuer_refuses_it() {
    let c = Cluster::new();
    let other = Cluster::new();
    let (addr, _issuer) = c.issuer(false).await;
    let token = c.write_token("t", &c.token("default", "web", TOKEN_AUDIENCE, 600));
    // Anchors of another mesh: the issuer's serving certificate does not verify.
    let anchors = Arc::new(TrustAnchors::load(&other.path("issuer/ca.crt")).unwrap());
    let client = IdentityClient::new(
        addr.to_string(),
        gofe_identity::issuer::SERVER_NAME.into(),
        "spiffe://cluster.local/ns/default/sa/web".parse().unwrap(),
        token,
        anchors,
    )
    .unwrap();
    match client.certify().await {
        Err(CertifyError::Connect { reason, .. }) => assert!(reason.contains("TLS"), "{reason}"),
        other => panic!("expected a TLS failure, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn issuer_refuses_to_start_with_a_key_that_does_not_fit() {
    let c = Cluster::new();
    let other = Cluster::new();
    std::fs::copy(other.path("issuer/tls.key"), c.path("issuer/tls.key")).unwrap();
    let err = Bound::bind(IssuerConfig {
        dir: c.path("issuer"),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        cert_lifetime: Duration::from_secs(60),
        jwks: None,
        insecure_dev: true,
        trust_domain: "cluster.local".into(),
        audience: TOKEN_AUDIENCE.into(),
        token_issuer: None,
    })
    .await
    .err()
    .expect("a mismatched key is refused");
    assert!(err.to_string().contains("ca.crt"), "{err}");
}

#[test]
fn anchors_reload_on_change_and_keep_the_old_ones_on_garbage() {
    let a = Cluster::new();
    let b = Cluster::new();
    let path = a.path("anchors.pem");
    std::fs::copy(a.path("issuer/ca.crt"), &path).unwrap();
    let anchors = TrustAnchors::load(&path).unwrap();
    assert_eq!(anchors.count(), 1);
    assert!(!anchors.reload().unwrap(), "unchanged");
    let bundle = [
        std::fs::read(a.path("issuer/ca.crt")).unwrap(),
        std::fs::read(b.path("issuer/ca.crt")).unwrap(),
    ]
    .concat();
    std::fs::write(&path, bundle).unwrap();
    assert!(anchors.reload().unwrap());
    assert_eq!(anchors.count(), 2);
    std::fs::write(&path, "garbage").unwrap();
    assert!(anchors.reload().is_err());
    assert_eq!(anchors.count(), 2, "the last good anchors stay");
}

/// A raw POST to the issuer, trusting its anchors.
async fn post(c: &Cluster, addr: std::net::SocketAddr, body: String) -> (u16, String) {
    use http_body_util::BodyExt;
    let anchors = TrustAnchors::load(&c.path("issuer/ca.crt")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(anchors.provider().clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(anchors.roots())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(gofe_identity::issuer::SERVER_NAME.try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let rsp = tx
        .send_request(
            http::Request::post(CERTIFY_PATH)
                .header("host", "gofe-identity")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = rsp.status().as_u16();
    let text =
        String::from_utf8_lossy(&rsp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    (status, text)
}
