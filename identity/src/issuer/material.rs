//! The issuer's material, laid out like a `kubernetes.io/tls` Secret with a CA
//! (cert-manager's layout): `ca.crt` (trust anchors), `tls.crt` (the issuer's
//! certificate, then any intermediates above it), `tls.key` (the issuer's key).
//! `bootstrap` writes a fresh set for development.

use crate::cert::{self, CertError};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub const ANCHORS_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Cert { path: PathBuf, source: CertError },
    #[error("{path}: invalid key: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("issuer certificate does not fit: {0}")]
    Mismatch(String),
    #[error("cannot make certificates: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What the issuer signs with.
pub struct IssuerMaterial {
    pub anchors_pem: Vec<u8>,
    /// The issuer certificate first, then intermediates towards (not including) a root.
    pub chain: Vec<CertificateDer<'static>>,
    pub chain_pem: String,
    pub issuer: Issuer<'static, KeyPair>,
    pub not_after: SystemTime,
}

fn read(dir: &Path, file: &str) -> Result<(PathBuf, Vec<u8>), MaterialError> {
    let path = dir.join(file);
    std::fs::read(&path)
        .map(|b| (path.clone(), b))
        .map_err(|source| MaterialError::Read { path, source })
}

pub fn load(dir: &Path) -> Result<IssuerMaterial, MaterialError> {
    let (anchors_path, anchors_pem) = read(dir, ANCHORS_FILE)?;
    cert::certs_from_pem(&anchors_pem).map_err(|source| MaterialError::Cert {
        path: anchors_path,
        source,
    })?;
    let (cert_path, chain_pem) = read(dir, CERT_FILE)?;
    let chain = cert::certs_from_pem(&chain_pem).map_err(|source| MaterialError::Cert {
        path: cert_path.clone(),
        source,
    })?;
    let (key_path, key_pem) = read(dir, KEY_FILE)?;
    let key_text = String::from_utf8_lossy(&key_pem);
    let key = KeyPair::from_pem(&key_text).map_err(|e| MaterialError::Key {
        path: key_path,
        reason: e.to_string(),
    })?;
    let info = cert::inspect(&chain[0]).map_err(|source| MaterialError::Cert {
        path: cert_path,
        source,
    })?;
    let issuer = Issuer::from_ca_cert_der(&chain[0], key)?;
    Ok(IssuerMaterial {
        anchors_pem,
        chain,
        chain_pem: String::from_utf8_lossy(&chain_pem).into_owned(),
        issuer,
        not_after: info.not_after,
    })
}

fn ca_params(common_name: String, lifetime: Duration, path_len: Option<u8>) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(3600)).into();
    p.not_after = (now + lifetime).into();
    p.serial_number = Some(crate::issuer::sign::random_serial());
    p.use_authority_key_identifier_extension = true;
    p
}

/// Writes a fresh trust anchor (a self-signed root, its key discarded) and an issuer
/// certificate and key signed by it into `dir`.
pub fn bootstrap(dir: &Path, trust_domain: &str) -> Result<(), MaterialError> {
    bootstrap_for(dir, trust_domain, ISSUER_LIFETIME)
}

/// As `bootstrap`, with an issuer certificate valid for `issuer_lifetime` (a rotation
/// rehearsal, or an issuer about to expire).
pub fn bootstrap_for(
    dir: &Path,
    trust_domain: &str,
    issuer_lifetime: Duration,
) -> Result<(), MaterialError> {
    let root_key = KeyPair::generate()?;
    let root_params = ca_params(
        format!("gofe trust anchor ({trust_domain})"),
        ROOT_LIFETIME,
        None,
    );
    let root = root_params.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root_params, root_key);
    let issuer_key = KeyPair::generate()?;
    let issuer = ca_params(
        format!("gofe issuer ({trust_domain})"),
        issuer_lifetime,
        Some(0),
    )
    .signed_by(&issuer_key, &root_issuer)?;
    std::fs::create_dir_all(dir).map_err(|source| MaterialError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let write = |file: &str, text: String, mode: u32| -> Result<(), MaterialError> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let path = dir.join(file);
        // Created with its mode, so the key is never readable by others, even briefly.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.set_permissions(std::fs::Permissions::from_mode(mode))
            })
            .map_err(|source| MaterialError::Write { path, source })
    };
    write(ANCHORS_FILE, root.pem(), 0o644)?;
    write(CERT_FILE, issuer.pem(), 0o644)?;
    write(KEY_FILE, issuer_key.serialize_pem(), 0o600)?;
    Ok(())
}
