//! Statements signed with a workload's mesh key: the registry's entries. The signer
//! attaches its certificate chain; a reader trusts the statement only if that chain
//! leads to the trust anchors today (so an expired certificate, or one from another
//! CA, signs nothing) and the leaf's key made the signature over exactly these bytes.

use crate::cert::{self, CertInfo};
use crate::store::CertStore;
use crate::trust::TrustAnchors;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, SignatureScheme};
use std::time::SystemTime;

/// Schemes a mesh key may sign with, in order of preference (the issuer's keys are
/// ECDSA P-256; the rest keep other key types working).
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

/// A signature and what is needed to check it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub scheme: SignatureScheme,
    /// The signer's certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    pub signature: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("no certificate is held yet")]
    NoCertificate,
    #[error("the mesh key cannot sign with any of {SCHEMES:?}")]
    NoScheme,
    #[error("signing failed: {0}")]
    Sign(rustls::Error),
}

/// Why a signed statement is not believed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no certificate chain")]
    NoChain,
    #[error("the signer's certificate has expired or is not valid yet")]
    Expired,
    #[error("the signer's certificate does not chain to the trust anchors: {0}")]
    Untrusted(String),
    #[error("signature scheme {0:?} is not supported")]
    Scheme(SignatureScheme),
    #[error("the signature does not match the statement")]
    BadSignature,
    #[error("the signer's certificate names no SPIFFE ID")]
    NoIdentity,
}

/// Signs `message` with the key of the certificate `store` holds now.
pub fn sign(store: &CertStore, message: &[u8]) -> Result<Signature, SignError> {
    let held = store.current().ok_or(SignError::NoCertificate)?;
    let signer = held
        .certified
        .key
        .choose_scheme(SCHEMES)
        .ok_or(SignError::NoScheme)?;
    let signature = signer.sign(message).map_err(SignError::Sign)?;
    Ok(Signature {
        scheme: signer.scheme(),
        chain: held.certified.cert.clone(),
        signature,
    })
}

/// Checks that `sig` was made over `message` by a certificate that chains to `anchors`
/// at `now`; returns what the certificate says (its identity, its expiry).
pub fn verify(
    anchors: &TrustAnchors,
    message: &[u8],
    sig: &Signature,
    now: SystemTime,
) -> Result<CertInfo, VerifyError> {
    let (leaf, intermediates) = sig.chain.split_first().ok_or(VerifyError::NoChain)?;
    let parsed =
        ParsedCertificate::try_from(leaf).map_err(|e| VerifyError::Untrusted(e.to_string()))?;
    let now_unix = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let algorithms = &anchors.provider().signature_verification_algorithms;
    // The same check a mesh client makes of a server: a chain to the current anchors,
    // valid now, with the usage the issuer gives every workload certificate.
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &anchors.roots(),
        intermediates,
        now_unix,
        algorithms.all,
    )
    .map_err(|e| match e {
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => VerifyError::Expired,
        other => VerifyError::Untrusted(other.to_string()),
    })?;
    let algs = algorithms
        .mapping
        .iter()
        .find(|(s, _)| *s == sig.scheme)
        .map(|(_, algs)| *algs)
        .ok_or(VerifyError::Scheme(sig.scheme))?;
    let ee =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| VerifyError::Untrusted(e.to_string()))?;
    if !algs
        .iter()
        .any(|alg| ee.verify_signature(*alg, message, &sig.signature).is_ok())
    {
        return Err(VerifyError::BadSignature);
    }
    let info = cert::inspect(leaf).map_err(|e| VerifyError::Untrusted(e.to_string()))?;
    if info.identity.is_none() {
        return Err(VerifyError::NoIdentity);
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issuer::material;
    use crate::issuer::sign::{Allowed, Signer};
    use std::sync::Arc;
    use std::time::Duration;

    /// A mesh (anchors and an issuer) and a store holding a certificate for `name`.
    fn mesh(dir: &std::path::Path, name: &str) -> (TrustAnchors, Arc<CertStore>) {
        material::bootstrap(dir, "cluster.local").unwrap();
        let m = material::load(dir).unwrap();
        let signer = Signer::new(
            m.issuer,
            m.chain_pem.clone(),
            m.not_after,
            Duration::from_secs(3600),
            "cluster.local".into(),
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(name.try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let signed = signer.sign(&csr, &Allowed::AnyInTrustDomain).unwrap();
        let store = CertStore::new();
        let signing = crate::store::signing_key(&crate::trust::provider(), &key).unwrap();
        let chain = cert::certs_from_pem(signed.chain_pem.as_bytes()).unwrap();
        let info = cert::inspect(&chain[0]).unwrap();
        store.set(chain, info, signing);
        (TrustAnchors::from_pem(&m.anchors_pem).unwrap(), store)
    }

    #[test]
    fn a_signed_statement_verifies_and_names_its_signer() {
        let dir = tempfile::tempdir().unwrap();
        let (anchors, store) = mesh(dir.path(), "spiffe://cluster.local/ns/demo/sa/api");
        let sig = sign(&store, b"statement").unwrap();
        let info = verify(&anchors, b"statement", &sig, SystemTime::now()).unwrap();
        assert_eq!(
            info.identity.unwrap().to_string(),
            "spiffe://cluster.local/ns/demo/sa/api"
        );
    }

    #[test]
    fn tampering_another_ca_or_expiry_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (anchors, store) = mesh(dir.path(), "spiffe://cluster.local/ns/demo/sa/api");
        let sig = sign(&store, b"statement").unwrap();
        assert!(matches!(
            verify(&anchors, b"statement!", &sig, SystemTime::now()),
            Err(VerifyError::BadSignature)
        ));
        let mut flipped = sig.clone();
        let last = flipped.signature.len() - 1;
        flipped.signature[last] ^= 1;
        assert!(verify(&anchors, b"statement", &flipped, SystemTime::now()).is_err());
        let later = SystemTime::now() + Duration::from_secs(7200);
        assert!(matches!(
            verify(&anchors, b"statement", &sig, later),
            Err(VerifyError::Expired)
        ));
        let other = tempfile::tempdir().unwrap();
        let (foreign, _) = mesh(other.path(), "spiffe://cluster.local/ns/demo/sa/api");
        assert!(matches!(
            verify(&foreign, b"statement", &sig, SystemTime::now()),
            Err(VerifyError::Untrusted(_))
        ));
        let no_chain = Signature {
            chain: Vec::new(),
            ..sig
        };
        assert!(matches!(
            verify(&anchors, b"statement", &no_chain, SystemTime::now()),
            Err(VerifyError::NoChain)
        ));
    }
}
