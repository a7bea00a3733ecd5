//! A registry entry: what a sidecar says it serves (address, identity, weight,
//! metadata), signed with its mesh key over the entry's key and its canonical JSON, its
//! certificate chain attached. Whoever can write to etcd can write anything; only an
//! entry signed by a current certificate of this mesh, naming the identity that
//! certificate names, is believed.

use crate::addrs::EndpointAddr;
use crate::endpoint::Endpoint;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use gofe_identity::SpiffeId;
use gofe_identity::signed::{self, SignError, Signature, VerifyError};
use gofe_identity::store::CertStore;
use gofe_identity::trust::TrustAnchors;
use rustls::SignatureScheme;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

/// What a signature covers comes after this line, so that a signature made for another
/// purpose with the same key can never pass for an entry's.
const CONTEXT: &str = "gofe-registry-entry/v1";

/// What the registering sidecar claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    pub address: SocketAddr,
    pub identity: String,
    pub weight: u32,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredSignature {
    /// The TLS SignatureScheme code point (1027: ECDSA P-256 SHA-256).
    scheme: u16,
    /// The signer's chain, leaf first, DER in base64.
    chain: Vec<String>,
    value: String,
}

/// The JSON stored at the entry's key.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    #[serde(flatten)]
    claim: Claim,
    signature: StoredSignature,
}

/// Why an entry is not used; `reason` labels `gofe_registry_entries_rejected_total`.
#[derive(Debug, thiserror::Error)]
pub enum Reject {
    #[error("not an entry: {0}")]
    Malformed(String),
    #[error("the key names address {key}, the entry {entry}")]
    Key { key: String, entry: SocketAddr },
    #[error("{0}")]
    Signature(#[from] VerifyError),
    #[error("the entry claims {claimed}, its certificate names {certified}")]
    Identity { claimed: String, certified: String },
    #[error("{0} is outside this mesh's trust domain")]
    TrustDomain(String),
    #[error("the destination's policy does not allow {0}")]
    NotAllowed(String),
    #[error("no trust anchors to check entries with (identity is disabled)")]
    NoAnchors,
}

impl Reject {
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::Malformed(_) => "malformed",
            Reject::Key { .. } => "key",
            Reject::Signature(VerifyError::Expired) => "expired",
            Reject::Signature(VerifyError::Untrusted(_) | VerifyError::NoChain) => "untrusted",
            Reject::Signature(_) => "signature",
            Reject::Identity { .. } | Reject::TrustDomain(_) => "identity",
            Reject::NotAllowed(_) => "not_allowed",
            Reject::NoAnchors => "no_anchors",
        }
    }
}

/// An entry that verified: the endpoint it gives, and when its certificate expires
/// (after which it is dropped: a dead signer cannot linger).
#[derive(Clone, Debug)]
pub struct Verified {
    pub endpoint: Endpoint,
    pub not_after: SystemTime,
}

/// The bytes a signature covers: the context, the key, and the claim as canonical JSON
/// (fields in declaration order, metadata sorted).
fn signed_bytes(key: &str, claim: &Claim) -> Vec<u8> {
    let json = serde_json::to_string(claim).expect("a claim serializes");
    format!("{CONTEXT}\n{key}\n{json}").into_bytes()
}

/// The value to store at `key` for `claim`, signed with the certificate `store` holds.
pub fn sign(key: &str, claim: &Claim, store: &CertStore) -> Result<Vec<u8>, SignError> {
    let sig = signed::sign(store, &signed_bytes(key, claim))?;
    let stored = Stored {
        claim: claim.clone(),
        signature: StoredSignature {
            scheme: u16::from(sig.scheme),
            chain: sig.chain.iter().map(|c| B64.encode(c.as_ref())).collect(),
            value: B64.encode(&sig.signature),
        },
    };
    Ok(serde_json::to_vec(&stored).expect("an entry serializes"))
}

/// The claim in a stored value, unchecked (for `gofe registry ls`).
pub fn claim(value: &[u8]) -> Result<Claim, Reject> {
    serde_json::from_slice::<Stored>(value)
        .map(|s| s.claim)
        .map_err(|e| Reject::Malformed(e.to_string()))
}

/// Checks the value stored at `key` (`.../<address>`): signed by a certificate that
/// chains to `anchors` now, names the identity claimed, in `trust_domain`.
pub fn verify(
    key: &str,
    value: &[u8],
    anchors: &TrustAnchors,
    trust_domain: &str,
    now: SystemTime,
) -> Result<Verified, Reject> {
    let stored: Stored =
        serde_json::from_slice(value).map_err(|e| Reject::Malformed(e.to_string()))?;
    let claim = stored.claim;
    let key_addr = key.rsplit('/').next().unwrap_or_default();
    if key_addr.parse::<SocketAddr>().ok() != Some(claim.address) {
        return Err(Reject::Key {
            key: key_addr.to_string(),
            entry: claim.address,
        });
    }
    if claim.weight == 0 {
        return Err(Reject::Malformed("weight 0".into()));
    }
    let identity: SpiffeId = claim
        .identity
        .parse()
        .map_err(|e: gofe_identity::spiffe::SpiffeIdError| Reject::Malformed(e.to_string()))?;
    if identity.trust_domain() != trust_domain {
        return Err(Reject::TrustDomain(claim.identity.clone()));
    }
    let chain = stored
        .signature
        .chain
        .iter()
        .map(|c| B64.decode(c).map(CertificateDer::from))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Reject::Malformed(format!("chain: {e}")))?;
    let sig = Signature {
        scheme: SignatureScheme::from(stored.signature.scheme),
        chain,
        signature: B64
            .decode(&stored.signature.value)
            .map_err(|e| Reject::Malformed(format!("signature: {e}")))?,
    };
    let info = signed::verify(anchors, &signed_bytes(key, &claim), &sig, now)?;
    let certified = info.identity.expect("verify requires an identity");
    if certified != identity {
        return Err(Reject::Identity {
            claimed: claim.identity,
            certified: certified.to_string(),
        });
    }
    Ok(Verified {
        endpoint: Endpoint {
            addr: EndpointAddr::new(claim.address),
            weight: claim.weight,
            identity: Some(identity),
            metadata: Arc::new(claim.metadata),
        },
        not_after: info.not_after,
    })
}
