//! Issuing workload certificates: the CSR must be well formed, signed by its key, and
//! name exactly one thing, a SPIFFE ID in this trust domain, which must be the identity
//! the caller's token proved. Everything else in the certificate is the issuer's
//! choice, not the CSR's.

use crate::spiffe::SpiffeId;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use std::time::{Duration, SystemTime};

/// Certificates start a little in the past so that a peer whose clock is behind
/// accepts them at once.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("invalid CSR: {0}")]
    BadCsr(String),
    #[error("the CSR must name exactly one SPIFFE ID (a URI SAN) and nothing else; it names: {0}")]
    Names(String),
    #[error("the CSR names {requested}, but the token is for {allowed}")]
    WrongIdentity { requested: String, allowed: String },
    #[error("the CSR names {requested}, outside trust domain {trust_domain}")]
    ForeignTrustDomain {
        requested: String,
        trust_domain: String,
    },
    #[error(
        "the issuer's own certificate expires at {}, before a {lifetime:?} certificate issued now would: renew the issuer's certificate",
        crate::cert::rfc3339(*issuer_not_after)
    )]
    Expiring {
        issuer_not_after: SystemTime,
        lifetime: Duration,
    },
    #[error("cannot sign: {0}")]
    Internal(String),
}

/// What the caller may be issued.
pub enum Allowed {
    /// The identity its token proved.
    Exactly(SpiffeId),
    /// Development only: whatever SPIFFE ID in the trust domain it asks for.
    AnyInTrustDomain,
}

pub struct Signed {
    pub chain_pem: String,
    pub identity: SpiffeId,
    pub serial: String,
    pub not_after: SystemTime,
}

pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    chain_pem: String,
    issuer_not_after: SystemTime,
    lifetime: Duration,
    trust_domain: String,
}

pub fn random_serial() -> SerialNumber {
    let mut bytes: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
    // Positive and of full length.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from(bytes)
}

fn describe(names: &[SanType]) -> String {
    names
        .iter()
        .map(|n| match n {
            SanType::URI(u) => format!("URI {}", u.as_str()),
            SanType::DnsName(d) => format!("DNS {}", d.as_str()),
            SanType::IpAddress(ip) => format!("IP {ip}"),
            SanType::Rfc822Name(e) => format!("email {}", e.as_str()),
            _ => "another name".to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Signer {
    /// `chain_pem` is the issuer's own chain (its `tls.crt`), sent after each
    /// certificate it issues.
    pub fn new(
        issuer: Issuer<'static, KeyPair>,
        chain_pem: String,
        issuer_not_after: SystemTime,
        lifetime: Duration,
        trust_domain: String,
    ) -> Signer {
        Signer {
            issuer,
            chain_pem,
            issuer_not_after,
            lifetime,
            trust_domain,
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    pub fn issuer_not_after(&self) -> SystemTime {
        self.issuer_not_after
    }

    /// Whether a certificate issued now, for the whole lifetime, would still be covered
    /// by the issuer's own: an issuer never hands out a certificate that outlives it
    /// (or one born expired), and stops issuing (and is not ready) before that.
    pub fn can_issue(&self, lifetime: Duration) -> Result<(), SignError> {
        if SystemTime::now() + lifetime > self.issuer_not_after {
            return Err(SignError::Expiring {
                issuer_not_after: self.issuer_not_after,
                lifetime,
            });
        }
        Ok(())
    }

    /// Checks `csr_pem` against what the caller may have and issues it.
    pub fn sign(&self, csr_pem: &str, allowed: &Allowed) -> Result<Signed, SignError> {
        self.can_issue(self.lifetime)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| SignError::BadCsr(e.to_string()))?;
        let names = &csr.params.subject_alt_names;
        let requested = match names.as_slice() {
            [SanType::URI(uri)] => uri
                .as_str()
                .parse::<SpiffeId>()
                .map_err(|_| SignError::Names(describe(names)))?,
            _ => return Err(SignError::Names(describe(names))),
        };
        if requested.trust_domain() != self.trust_domain {
            return Err(SignError::ForeignTrustDomain {
                requested: requested.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if let Allowed::Exactly(id) = allowed
            && *id != requested
        {
            return Err(SignError::WrongIdentity {
                requested: requested.to_string(),
                allowed: id.to_string(),
            });
        }
        let (cert, serial, not_after) = self.issue(
            requested.to_string(),
            SanKind::Uri,
            &csr.public_key,
            self.lifetime,
        )?;
        Ok(Signed {
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            identity: requested,
            serial,
            not_after,
        })
    }

    /// A TLS server certificate for the issuer itself, for `dns_name`, with a key of its
    /// own.
    pub fn serving_cert(
        &self,
        dns_name: &str,
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, KeyPair), SignError> {
        let key = KeyPair::generate().map_err(|e| SignError::Internal(e.to_string()))?;
        let (cert, _, _) = self.issue(dns_name.to_string(), SanKind::Dns, &key, lifetime)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(
            crate::cert::certs_from_pem(self.chain_pem.as_bytes())
                .map_err(|e| SignError::Internal(e.to_string()))?,
        );
        Ok((chain, key))
    }

    fn issue(
        &self,
        name: String,
        kind: SanKind,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<(rcgen::Certificate, String, SystemTime), SignError> {
        let internal = |e: rcgen::Error| SignError::Internal(e.to_string());
        let now = SystemTime::now();
        // Never outlive the issuer's own certificate (`can_issue` refuses workload
        // certificates before it comes to this; the serving certificate is cut short).
        let not_after = (now + lifetime).min(self.issuer_not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let ia5 = rcgen::string::Ia5String::try_from(name).map_err(internal)?;
        params.subject_alt_names = vec![match kind {
            SanKind::Uri => SanType::URI(ia5),
            SanKind::Dns => SanType::DnsName(ia5),
        }];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        let serial = random_serial();
        let serial_text = serial
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(internal)?;
        Ok((cert, serial_text, not_after))
    }
}

enum SanKind {
    Uri,
    Dns,
}
