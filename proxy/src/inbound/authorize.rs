//! Who may come in over mTLS: GOFE_INBOUND_MTLS (strict, permissive, off) and
//! GOFE_INBOUND_AUTHORIZE (the identities allowed), with the identity that terminates
//! the mesh's mTLS.

use crate::config::InboundMtls;
use crate::identity::ProxyIdentity;
use gofe_identity::SpiffeId;
use std::sync::Arc;

/// Who may come in: GOFE_INBOUND_MTLS and GOFE_INBOUND_AUTHORIZE, with the identity
/// that terminates mTLS.
pub struct InboundPolicy {
    pub identity: Option<Arc<ProxyIdentity>>,
    pub mode: InboundMtls,
    pub authorize: Vec<SpiffeId>,
}

impl InboundPolicy {
    /// The identity inbound mTLS is terminated with, unless inbound mTLS is off.
    pub fn terminating(&self) -> Option<&Arc<ProxyIdentity>> {
        self.identity
            .as_ref()
            .filter(|_| self.mode != InboundMtls::Off)
    }

    /// Whether plaintext is refused: strict mode, or a list of allowed identities
    /// (plaintext has no identity to authorize).
    pub fn refuses_plaintext(&self) -> bool {
        self.terminating().is_some()
            && (self.mode == InboundMtls::Strict || !self.authorize.is_empty())
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
