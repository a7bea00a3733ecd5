//! Trust anchors and the mesh's certificate verifiers. Anchors come from a PEM file that
//! is re-read when it changes (a Kubernetes ConfigMap update, a root rotation with an
//! old+new bundle); a file that does not parse keeps the anchors already loaded. The
//! verifiers read the current anchors at every handshake, so a reload takes effect on
//! the next connection without rebuilding any TLS config.
//!
//! Mesh certificates name workloads with a SPIFFE URI SAN and no DNS name, so servers
//! are verified by chain only and their identity is checked by the caller against what
//! it expected.

use crate::cert::{self, CertError};
use parking_lot::RwLock;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How often the anchors file is checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read trust anchors {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid trust anchors: {0}")]
    Cert(#[from] CertError),
    #[error("invalid trust anchor: {0}")]
    Anchor(String),
}

struct Loaded {
    pem: Vec<u8>,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl Loaded {
    fn parse(pem: Vec<u8>, provider: &Arc<CryptoProvider>) -> Result<Loaded, TrustError> {
        let mut roots = RootCertStore::empty();
        for c in cert::certs_from_pem(&pem)? {
            roots
                .add(c)
                .map_err(|e| TrustError::Anchor(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| TrustError::Anchor(e.to_string()))?;
        Ok(Loaded {
            pem,
            roots,
            client_verifier,
        })
    }
}

/// The mesh's trust anchors, reloadable.
pub struct TrustAnchors {
    path: Option<PathBuf>,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("path", &self.path)
            .field("count", &self.count())
            .finish()
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TrustAnchors {
    pub fn from_pem(pem: &[u8]) -> Result<TrustAnchors, TrustError> {
        let provider = provider();
        Ok(TrustAnchors {
            path: None,
            current: RwLock::new(Arc::new(Loaded::parse(pem.to_vec(), &provider)?)),
            provider,
        })
    }

    pub fn load(path: &Path) -> Result<TrustAnchors, TrustError> {
        let pem = std::fs::read(path).map_err(|source| TrustError::Read {
            path: path.to_owned(),
            source,
        })?;
        let provider = provider();
        Ok(TrustAnchors {
            path: Some(path.to_owned()),
            current: RwLock::new(Arc::new(Loaded::parse(pem, &provider)?)),
            provider,
        })
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.current.read().roots.clone()
    }

    pub fn count(&self) -> usize {
        self.current.read().roots.len()
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.current.read().client_verifier.clone()
    }

    /// Re-reads the file; true if the anchors changed. A file that does not parse is an
    /// error and leaves the current anchors in place.
    pub fn reload(&self) -> Result<bool, TrustError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let pem = std::fs::read(path).map_err(|source| TrustError::Read {
            path: path.clone(),
            source,
        })?;
        if pem == self.current.read().pem {
            return Ok(false);
        }
        let loaded = Loaded::parse(pem, &self.provider)?;
        *self.current.write() = Arc::new(loaded);
        Ok(true)
    }

    /// Reloads on change, forever.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        loop {
            tick.tick().await;
            match self.reload() {
                Ok(true) => {
                    info!(anchors = self.count(), path = ?self.path, "trust anchors reloaded")
                }
                Ok(false) => {}
                Err(error) => warn!(%error, "keeping the trust anchors already loaded"),
            }
        }
    }

    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

/// The certificate must name a SPIFFE ID, and one in this mesh's trust domain: anchors
/// shared with another trust domain do not make its workloads ours.
fn require_identity(
    end_entity: &CertificateDer<'_>,
    trust_domain: &str,
) -> Result<(), rustls::Error> {
    let refuse = |e: IdentityError| {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    };
    match cert::peer_identity(end_entity) {
        None => Err(refuse(IdentityError::None)),
        Some(id) if id.trust_domain() != trust_domain => {
            Err(refuse(IdentityError::ForeignTrustDomain(id.to_string())))
        }
        Some(_) => Ok(()),
    }
}

#[derive(Debug, thiserror::Error)]
enum IdentityError {
    #[error("the certificate carries no SPIFFE ID")]
    None,
    #[error("{0} is outside this mesh's trust domain")]
    ForeignTrustDomain(String),
}

/// Verifies a mesh server: a chain to the anchors, usable for server auth, naming a
/// SPIFFE ID. The name the client dialled is not checked here: mesh certificates carry
/// identities, not host names; callers compare the identity with the one they expect.
#[derive(Debug)]
pub struct MeshServerVerifier {
    anchors: Arc<TrustAnchors>,
    trust_domain: String,
}

impl MeshServerVerifier {
    pub fn new(anchors: Arc<TrustAnchors>, trust_domain: &str) -> Self {
        Self {
            anchors,
            trust_domain: trust_domain.to_string(),
        }
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.anchors.roots(),
            intermediates,
            now,
            self.anchors.algorithms().all,
        )?;
        require_identity(end_entity, &self.trust_domain)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.anchors.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.anchors.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.anchors.algorithms().supported_schemes()
    }
}

/// Verifies a mesh client: a certificate is required, chained to the current anchors,
/// usable for client auth, naming a SPIFFE ID.
#[derive(Debug)]
pub struct MeshClientVerifier {
    anchors: Arc<TrustAnchors>,
    trust_domain: String,
}

impl MeshClientVerifier {
    pub fn new(anchors: Arc<TrustAnchors>, trust_domain: &str) -> Self {
        Self {
            anchors,
            trust_domain: trust_domain.to_string(),
        }
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Mesh clients hold one certificate and send it whatever the hints say.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified =
            self.anchors
                .client_verifier()
                .verify_client_cert(end_entity, intermediates, now)?;
        require_identity(end_entity, &self.trust_domain)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.anchors.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.anchors.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.anchors.algorithms().supported_schemes()
    }
}
