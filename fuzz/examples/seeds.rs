//! Writes the seeds that have to be made rather than written by hand: TLS ClientHellos
//! (rustls), service-account tokens (jsonwebtoken, with the `jwt` target's fixture
//! key), CSRs (rcgen) and PEM bundles (a CA as `gofe identity --bootstrap` makes it).
//! `cargo run --example seeds` from fuzz/ rewrites them in corpus/; the hand-written
//! seeds beside them stay.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use std::path::Path;
use std::sync::Arc;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn client_hello(server_name: &str, alpn: &[&[u8]]) -> Vec<u8> {
    #[derive(Debug)]
    struct AnyServer;
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            unreachable!("only the ClientHello is made")
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            unreachable!()
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            unreachable!()
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer))
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

fn token(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    let header: jsonwebtoken::Header = serde_json::from_value(header.clone()).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_pem(gofe_fuzz::TOKEN_KEY_PEM.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn csr(names: Vec<SanType>) -> (String, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = names;
    let csr = params.serialize_request(&key).unwrap();
    (csr.pem().unwrap(), csr.der().to_vec())
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn main() {
    // detect: a first byte 0 (the bytes arrive whole), 0x80 (one at a time), or a
    // count of piece lengths.
    for (name, hello) in [
        (
            "tls-sni",
            client_hello("api.example.com", &[b"h2", b"http/1.1"]),
        ),
        (
            "tls-mesh",
            client_hello("10.0.0.1", &[gofe_identity::tls::ALPN_H2]),
        ),
        (
            "tls-mesh-tcp",
            client_hello("db.demo", &[gofe_identity::tls::ALPN_TCP]),
        ),
    ] {
        let mut whole = vec![0u8];
        whole.extend(&hello);
        write("detect", &format!("{name}-whole"), &whole);
        let mut pieces = vec![0x03u8, 0, 4, 100];
        pieces.extend(&hello);
        write("detect", &format!("{name}-pieces"), &pieces);
    }
    let mut trickled = vec![0x80u8];
    trickled.extend(client_hello("trickle.example", &[]));
    write("detect", "tls-trickled", &trickled);

    // jwt: bit 0 clear, a token; set, header and claims signed by the target.
    let claims = |ns: &str, sa: &str| {
        serde_json::json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": [gofe_fuzz::AUDIENCE],
            "exp": 4102444800u64,
            "iat": 1700000000u64,
            "nbf": 1700000000u64,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"}},
        })
    };
    let es256 = serde_json::json!({"alg": "ES256", "kid": gofe_fuzz::TOKEN_KID, "typ": "JWT"});
    let no_kid = serde_json::json!({"alg": "ES256"});
    let legacy = serde_json::json!({
        "iss": "kubernetes/serviceaccount",
        "sub": "system:serviceaccount:default:web",
        "aud": gofe_fuzz::AUDIENCE,
        "exp": 4102444800u64,
    });
    let expired = serde_json::json!({
        "sub": "system:serviceaccount:default:web",
        "aud": [gofe_fuzz::AUDIENCE],
        "exp": 1600000000u64,
    });
    for (name, header, claims) in [
        ("projected", &es256, &claims("demo", "api")),
        ("no-kid", &no_kid, &claims("default", "web")),
        ("legacy-sub", &es256, &legacy),
        ("expired", &es256, &expired),
    ] {
        let mut raw = vec![0u8];
        raw.extend(token(header, claims).as_bytes());
        write("jwt", &format!("token-{name}"), &raw);
        let mut parts = vec![1u8];
        parts.extend(header.to_string().as_bytes());
        parts.push(b'\n');
        parts.extend(claims.to_string().as_bytes());
        write("jwt", &format!("parts-{name}"), &parts);
    }
    let mut rs = vec![1u8];
    rs.extend(br#"{"alg":"RS256","kid":"rsa"}"#);
    rs.push(b'\n');
    rs.extend(claims("default", "web").to_string().as_bytes());
    write("jwt", "parts-rs256-kid", &rs);

    // csr: bit 0 set, DER; bit 1 set, the token proved spiffe://cluster.local/ns/default/sa/web.
    for (name, names) in [
        ("web", vec![uri("spiffe://cluster.local/ns/default/sa/web")]),
        ("api", vec![uri("spiffe://cluster.local/ns/demo/sa/api")]),
        (
            "foreign",
            vec![uri("spiffe://evil.example/ns/default/sa/web")],
        ),
        (
            "two-names",
            vec![
                uri("spiffe://cluster.local/ns/default/sa/web"),
                SanType::DnsName("web.default.svc".try_into().unwrap()),
            ],
        ),
        (
            "dns",
            vec![SanType::DnsName("web.default.svc".try_into().unwrap())],
        ),
        ("none", vec![]),
    ] {
        let (pem, der) = csr(names);
        for (mode, tag) in [(0u8, "any"), (2, "token")] {
            let mut text = vec![mode];
            text.extend(pem.as_bytes());
            write("csr", &format!("{name}-pem-{tag}"), &text);
        }
        let mut bin = vec![3u8];
        bin.extend(&der);
        write("csr", &format!("{name}-der"), &bin);
    }

    // pem: a CA's files, a workload certificate, DER.
    let dir = tempfile::tempdir().unwrap();
    gofe_identity::issuer::material::bootstrap(dir.path(), gofe_fuzz::TRUST_DOMAIN).unwrap();
    let anchors = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let issuer = std::fs::read(dir.path().join("tls.crt")).unwrap();
    write("pem", "anchors", &anchors);
    write(
        "pem",
        "issuer-key",
        &std::fs::read(dir.path().join("tls.key")).unwrap(),
    );
    let mut bundle = anchors.clone();
    bundle.extend(&issuer);
    write("pem", "bundle", &bundle);
    let m = gofe_identity::issuer::material::load(dir.path()).unwrap();
    let signer = gofe_identity::issuer::sign::Signer::new(
        m.issuer,
        m.chain_pem,
        m.not_after,
        std::time::Duration::from_secs(3600),
        gofe_fuzz::TRUST_DOMAIN.into(),
    );
    let (pem, _) = csr(vec![uri("spiffe://cluster.local/ns/default/sa/web")]);
    let signed = signer
        .sign(
            &pem,
            &gofe_identity::issuer::sign::Allowed::AnyInTrustDomain,
        )
        .unwrap();
    write("pem", "workload-chain", signed.chain_pem.as_bytes());
    let der = gofe_identity::cert::certs_from_pem(signed.chain_pem.as_bytes()).unwrap();
    write("pem", "workload-der", &der[0]);
    write("pem", "anchor-der", &m.chain[0]);
    println!("seeds written");
}
