//! The certificate a proxy holds, with its private key: each key is made in the
//! process for one certificate and never leaves it; certificates come and go. TLS configs resolve their certificate here at
//! every handshake, so a renewal takes effect on the next connection while open
//! connections carry on.

use crate::cert::CertInfo;
use gofe_telemetry::metrics::Counter;
use parking_lot::RwLock;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{SignatureScheme, crypto::CryptoProvider};
use std::sync::Arc;
use std::time::SystemTime;

/// A certificate in use, and its key (`certified.key`).
pub struct Held {
    pub certified: Arc<CertifiedKey>,
    pub info: CertInfo,
}

pub struct CertStore {
    current: RwLock<Option<Arc<Held>>>,
    next_renewal: RwLock<Option<SystemTime>>,
    pub renewals_ok: Counter,
    pub renewals_failed: Counter,
    ready: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl CertStore {
    pub fn new() -> Arc<CertStore> {
        Arc::new(CertStore {
            current: RwLock::new(None),
            next_renewal: RwLock::new(None),
            renewals_ok: Counter::default(),
            renewals_failed: Counter::default(),
            ready: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Starts using `chain` (leaf first), which certifies `key`, for new handshakes.
    pub fn set(
        &self,
        chain: Vec<CertificateDer<'static>>,
        info: CertInfo,
        key: Arc<dyn SigningKey>,
    ) {
        let held = Held {
            certified: Arc::new(CertifiedKey::new(chain, key)),
            info,
        };
        *self.current.write() = Some(Arc::new(held));
        self.ready.send_replace(true);
    }

    pub fn current(&self) -> Option<Arc<Held>> {
        self.current.read().clone()
    }

    pub fn set_next_renewal(&self, at: SystemTime) {
        *self.next_renewal.write() = Some(at);
    }

    pub fn next_renewal(&self) -> Option<SystemTime> {
        *self.next_renewal.read()
    }

    /// Holding a certificate that has not expired.
    pub fn is_ready(&self) -> bool {
        self.current()
            .is_some_and(|h| h.info.not_after > SystemTime::now())
    }

    /// Resolves once a certificate is held.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
}

/// Hands the held certificate to rustls, for both the client and the server side.
#[derive(Debug)]
pub struct StoreResolver(pub Arc<CertStore>);

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|h| h.certified.clone())
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|h| h.certified.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.current().is_some()
    }
}

/// Loads a PKCS#8 key made by rcgen as a rustls signing key.
pub fn signing_key(
    provider: &CryptoProvider,
    key: &rcgen::KeyPair,
) -> Result<Arc<dyn SigningKey>, rustls::Error> {
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    provider.key_provider.load_private_key(der)
}
