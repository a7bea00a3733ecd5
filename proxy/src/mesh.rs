//! The proxy as a member of the mesh: its identity (a certificate kept fresh in the
//! background), the TLS it speaks with other proxies, and the policy deciding when:
//! outbound mTLS per GOFE_OUTBOUND_MTLS (auto remembers peers that did not answer TLS),
//! inbound per GOFE_INBOUND_MTLS and GOFE_INBOUND_AUTHORIZE.

use crate::addrs::EndpointAddr;
use crate::config::{Config, InboundMtls, OutboundMtls};
use gofe_identity::SpiffeId;
use gofe_identity::client::IdentityClient;
use gofe_identity::store::CertStore;
use gofe_identity::tls::MeshTls;
use gofe_identity::trust::TrustAnchors;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long auto mode remembers that an endpoint did not answer TLS: long enough not
/// to pay a failed handshake per connection, short enough that a pod which gains a
/// sidecar (or an address reused by one that has one) is soon reached with mTLS.
const PLAINTEXT_MEMORY: Duration = Duration::from_secs(60);
const PLAINTEXT_MEMORY_MAX: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("GOFE_IDENTITY_TRUST_ANCHORS: {0}")]
    Anchors(#[from] gofe_identity::trust::TrustError),
    #[error("cannot prepare the identity client: {0}")]
    Client(String),
}

/// How to reach an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outbound {
    Plaintext,
    /// mTLS, falling back to plaintext if the peer does not answer TLS (auto).
    TryMtls,
    /// mTLS or nothing (strict).
    RequireMtls,
}

pub struct Mesh {
    pub tls: MeshTls,
    pub store: Arc<CertStore>,
    pub anchors: Arc<TrustAnchors>,
    client: Arc<IdentityClient>,
    outbound: OutboundMtls,
    inbound: InboundMtls,
    authorize: Vec<SpiffeId>,
    plaintext: RwLock<HashMap<EndpointAddr, Instant>>,
}

impl Mesh {
    /// The mesh side of `config`, or None when identity is disabled.
    pub fn new(config: &Config) -> Result<Option<Mesh>, MeshError> {
        let Some(id) = &config.identity else {
            return Ok(None);
        };
        let anchors = Arc::new(TrustAnchors::load(&id.trust_anchors)?);
        let client = IdentityClient::new(
            id.addr.clone(),
            id.server_name.clone(),
            id.name.clone(),
            id.token_file.clone(),
            anchors.clone(),
        )
        .map_err(MeshError::Client)?;
        let store = CertStore::new(client.signing_key());
        Ok(Some(Mesh {
            tls: MeshTls::new(store.clone(), anchors.clone(), &config.trust_domain),
            store,
            anchors,
            client: Arc::new(client),
            outbound: config.outbound_mtls,
            inbound: config.inbound_mtls,
            authorize: config.inbound_authorize.clone(),
            plaintext: RwLock::new(HashMap::new()),
        }))
    }

    pub fn name(&self) -> &SpiffeId {
        self.client.name()
    }

    /// Keeps the certificate and the anchors current, forever.
    pub async fn maintain(self: Arc<Self>) {
        tokio::join!(
            gofe_identity::renew::maintain(self.client.clone(), self.store.clone()),
            self.anchors.clone().watch(),
        );
    }

    pub fn outbound(&self, endpoint: EndpointAddr) -> Outbound {
        match self.outbound {
            OutboundMtls::Off => Outbound::Plaintext,
            OutboundMtls::Strict => Outbound::RequireMtls,
            OutboundMtls::Auto => {
                let remembered = self
                    .plaintext
                    .read()
                    .get(&endpoint)
                    .is_some_and(|at| at.elapsed() < PLAINTEXT_MEMORY);
                if remembered {
                    Outbound::Plaintext
                } else {
                    Outbound::TryMtls
                }
            }
        }
    }

    /// Auto mode: `endpoint` did not answer TLS; reach it in plaintext for a while.
    pub fn remember_plaintext(&self, endpoint: EndpointAddr) {
        let mut map = self.plaintext.write();
        if map.len() >= PLAINTEXT_MEMORY_MAX {
            map.retain(|_, at| at.elapsed() < PLAINTEXT_MEMORY);
        }
        // Still full of fresh entries: this one is tried again next time.
        if map.len() < PLAINTEXT_MEMORY_MAX {
            map.insert(endpoint, Instant::now());
        }
    }

    pub fn inbound(&self) -> InboundMtls {
        self.inbound
    }

    /// Whether only listed identities may come in.
    pub fn authorizes_a_list(&self) -> bool {
        !self.authorize.is_empty()
    }

    /// Why `peer` may not come in, if it may not.
    pub fn refuse(&self, peer: &SpiffeId) -> Option<String> {
        if self.authorize.is_empty() || self.authorize.contains(peer) {
            None
        } else {
            Some(format!("identity {peer} is not in GOFE_INBOUND_AUTHORIZE"))
        }
    }
}
