//! Reading certificates and keys: PEM in, DER out, and what a certificate says (its
//! SPIFFE ID, serial and validity).

use crate::spiffe::SpiffeId;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no certificate found in PEM")]
    NoCertificate,
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("invalid certificate: {0}")]
    Parse(String),
    #[error("no private key found in PEM")]
    NoKey,
}

/// Every certificate in a PEM bundle, in order.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate);
    }
    Ok(certs)
}

pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| CertError::NoKey)
}

/// What a certificate says about itself.
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// The SPIFFE ID in its URI SAN, if it carries exactly one.
    pub identity: Option<SpiffeId>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub fn inspect(der: &[u8]) -> Result<CertInfo, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let time = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok(CertInfo {
        identity: identity_of(&cert),
        serial: cert.raw_serial_as_string(),
        not_before: time(cert.validity().not_before.timestamp()),
        not_after: time(cert.validity().not_after.timestamp()),
    })
}

fn identity_of(cert: &X509Certificate<'_>) -> Option<SpiffeId> {
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    first.parse().ok()
}

/// The SPIFFE ID of a peer's end-entity certificate.
pub fn peer_identity(end_entity: &[u8]) -> Option<SpiffeId> {
    X509Certificate::from_der(end_entity)
        .ok()
        .and_then(|(_, c)| identity_of(&c))
}

/// RFC 3339, second precision: what `/identity` shows.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
