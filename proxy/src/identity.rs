//! This proxy's identity in the mesh: its certificate (requested from the issuer and
//! kept fresh in the background), the trust anchors (re-read when their file changes),
//! and the TLS configs made from both. Outbound and inbound decide, each in their own
//! stage, when to use them.

use crate::config::IdentityConfig;
use gofe_identity::SpiffeId;
use gofe_identity::client::IdentityClient;
use gofe_identity::store::CertStore;
use gofe_identity::tls::MeshTls;
use gofe_identity::trust::TrustAnchors;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("GOFE_IDENTITY_TRUST_ANCHORS: {0}")]
    Anchors(#[from] gofe_identity::trust::TrustError),
    #[error("cannot prepare the identity client: {0}")]
    Client(String),
}

pub struct ProxyIdentity {
    pub tls: MeshTls,
    pub store: Arc<CertStore>,
    pub anchors: Arc<TrustAnchors>,
    client: Arc<IdentityClient>,
}

impl ProxyIdentity {
    pub fn new(id: &IdentityConfig, trust_domain: &str) -> Result<ProxyIdentity, IdentityError> {
        let anchors = Arc::new(TrustAnchors::load(&id.trust_anchors)?);
        let client = IdentityClient::new(
            id.addr.clone(),
            id.server_name.clone(),
            id.name.clone(),
            id.token_file.clone(),
            anchors.clone(),
        )
        .map_err(IdentityError::Client)?;
        let store = CertStore::new();
        Ok(ProxyIdentity {
            tls: MeshTls::new(store.clone(), anchors.clone(), trust_domain),
            store,
            anchors,
            client: Arc::new(client),
        })
    }

    pub fn name(&self) -> &SpiffeId {
        self.client.name()
    }

    /// Whether a current certificate is held.
    pub fn is_ready(&self) -> bool {
        self.store.is_ready()
    }

    /// Keeps the certificate and the anchors current, forever.
    pub async fn maintain(self: Arc<Self>) {
        tokio::join!(
            gofe_identity::renew::maintain(self.client.clone(), self.store.clone()),
            self.anchors.clone().watch(),
        );
    }
}
