//! The proxy's side of issuance: a key made once in this process, a CSR naming this
//! workload's SPIFFE ID, sent with the service-account token (re-read each time: the
//! kubelet rotates it) to the issuer over TLS; the certificate that comes back is
//! checked before it is used.

use crate::api::{CERTIFY_PATH, CertifyRequest, CertifyResponse, ErrorResponse};
use crate::cert::{self, CertInfo};
use crate::spiffe::SpiffeId;
use crate::trust::TrustAnchors;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::SigningKey;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A whole certify exchange: connect, handshake, request, response.
const CERTIFY_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("cannot read the service-account token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach the issuer at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the issuer refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the issuer's answer is unusable: {0}")]
    Response(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// A certificate fresh from the issuer, checked, with the key it certifies.
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub info: CertInfo,
    /// Made for this request and never sent anywhere: a certificate leaked (or a key
    /// compromised) serves no later certificate.
    pub key: Arc<dyn SigningKey>,
}

/// A key pair made in this process, and the CSR naming `name` that it signs.
struct Request {
    csr_pem: String,
    public_key: Vec<u8>,
    key: Arc<dyn SigningKey>,
}

pub struct IdentityClient {
    addr: String,
    server_name: ServerName<'static>,
    name: SpiffeId,
    token_file: PathBuf,
    anchors: Arc<TrustAnchors>,
}

impl IdentityClient {
    pub fn new(
        addr: String,
        server_name: String,
        name: SpiffeId,
        token_file: PathBuf,
        anchors: Arc<TrustAnchors>,
    ) -> Result<IdentityClient, String> {
        let server_name =
            ServerName::try_from(server_name).map_err(|e| format!("issuer server name: {e}"))?;
        let client = IdentityClient {
            addr,
            server_name,
            name,
            token_file,
            anchors,
        };
        // A first key pair now: a name that cannot be put in a CSR is a start-up error.
        client.request().map_err(|e| e.to_string())?;
        Ok(client)
    }

    /// A fresh key pair and its CSR.
    fn request(&self) -> Result<Request, CertifyError> {
        let bad = |e: String| CertifyError::Response(format!("cannot make a CSR: {e}"));
        let key = rcgen::KeyPair::generate().map_err(|e| bad(e.to_string()))?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(self.name.to_string())
                .map_err(|e| bad(e.to_string()))?,
        )];
        let csr_pem = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(|e| bad(e.to_string()))?;
        let signing_key = crate::store::signing_key(self.anchors.provider(), &key)
            .map_err(|e| bad(e.to_string()))?;
        Ok(Request {
            csr_pem,
            public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
            key: signing_key,
        })
    }
    pub fn name(&self) -> &SpiffeId {
        &self.name
    }

    pub async fn certify(&self) -> Result<Issued, CertifyError> {
        tokio::time::timeout(CERTIFY_TIMEOUT, self.exchange())
            .await
            .map_err(|_| CertifyError::Timeout(CERTIFY_TIMEOUT))?
    }

    async fn exchange(&self) -> Result<Issued, CertifyError> {
        let request = self.request()?;
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|source| CertifyError::Token {
                path: self.token_file.clone(),
                source,
            })?;
        let connect_err = |reason: String| CertifyError::Connect {
            addr: self.addr.clone(),
            reason,
        };
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let config = rustls::ClientConfig::builder_with_provider(self.anchors.provider().clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| connect_err(e.to_string()))?
            .with_root_certificates(self.anchors.roots())
            .with_no_client_auth();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| connect_err(format!("TLS: {e}")))?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        tokio::spawn(conn);
        let body = serde_json::to_vec(&CertifyRequest {
            csr: request.csr_pem.clone(),
            token: token.trim().to_string(),
        })
        .map_err(|e| CertifyError::Response(e.to_string()))?;
        let req = http::Request::post(CERTIFY_PATH)
            .header("host", self.server_name.to_str().as_ref())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CertifyError::Response(e.to_string()))?;
        let rsp = tx
            .send_request(req)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let status = rsp.status();
        let body = Limited::new(rsp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| CertifyError::Response(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorResponse>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(CertifyError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        let rsp: CertifyResponse =
            serde_json::from_slice(&body).map_err(|e| CertifyError::Response(e.to_string()))?;
        self.check(
            cert::certs_from_pem(rsp.certificate_chain.as_bytes())
                .map_err(|e| CertifyError::Response(e.to_string()))?,
            request,
        )
    }

    /// A certificate is used only if it names us, carries our key, and chains to the
    /// anchors peers will check it against.
    fn check(
        &self,
        chain: Vec<CertificateDer<'static>>,
        request: Request,
    ) -> Result<Issued, CertifyError> {
        let bad = |m: String| CertifyError::Response(m);
        let leaf = &chain[0];
        let info = cert::inspect(leaf).map_err(|e| bad(e.to_string()))?;
        if info.identity.as_ref() != Some(&self.name) {
            return Err(bad(format!(
                "certificate names {:?}, expected {}",
                info.identity.map(|i| i.to_string()),
                self.name
            )));
        }
        let parsed = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| bad(e.to_string()))?
            .1;
        if parsed.public_key().raw != request.public_key.as_slice() {
            return Err(bad("certificate is not for this proxy's key".into()));
        }
        let end_entity =
            rustls::server::ParsedCertificate::try_from(leaf).map_err(|e| bad(e.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &end_entity,
            &self.anchors.roots(),
            &chain[1..],
            UnixTime::now(),
            self.anchors
                .provider()
                .signature_verification_algorithms
                .all,
        )
        .map_err(|e| {
            bad(format!(
                "certificate does not chain to the trust anchors: {e}"
            ))
        })?;
        Ok(Issued {
            chain,
            info,
            key: request.key,
        })
    }
}
