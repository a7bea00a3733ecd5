//! The issuer's CSR handling (`gofe_identity::issuer::sign::Signer::sign`), with a CA
//! bootstrapped as `gofe identity --bootstrap` makes it. Never a panic; a certificate
//! is issued only for one SPIFFE ID in the trust domain (the caller's, when its token
//! named one), for the key the CSR carries, and verifies as a mesh client certificate
//! against the trust anchors.
//!
//! Input: a first byte; bit 0 clear: the rest is the PEM text; set: the rest is DER,
//! wrapped here in a `CERTIFICATE REQUEST` PEM block. Bit 1 set: the caller's token
//! proved spiffe://cluster.local/ns/default/sa/web; clear: any identity in the trust
//! domain may be asked for (the issuer's development mode).
#![no_main]

use gofe_fuzz::TRUST_DOMAIN;
use gofe_identity::SpiffeId;
use gofe_identity::cert;
use gofe_identity::issuer::material;
use gofe_identity::issuer::sign::{Allowed, Signer};
use libfuzzer_sys::fuzz_target;
use rustls::pki_types::UnixTime;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use std::sync::Arc;
use std::time::Duration;
use x509_parser::prelude::{FromDer, X509Certificate};

struct World {
    signer: Signer,
    verifier: Arc<dyn ClientCertVerifier>,
}

thread_local! {
    static WORLD: World = {
        let (_, dir) = gofe_fuzz::issuer_material();
        let m = material::load(dir).expect("the bootstrapped CA loads");
        let anchors = gofe_identity::trust::TrustAnchors::from_pem(&m.anchors_pem)
            .expect("the anchors load");
        let verifier = WebPkiClientVerifier::builder_with_provider(
            anchors.roots(),
            anchors.provider().clone(),
        )
        .build()
        .expect("a client verifier");
        World {
            signer: Signer::new(
                m.issuer,
                m.chain_pem,
                m.not_after,
                Duration::from_secs(3600),
                TRUST_DOMAIN.into(),
            ),
            verifier,
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let csr_pem = if mode & 1 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        text.to_string()
    } else {
        gofe_fuzz::pem("CERTIFICATE REQUEST", rest)
    };
    let web: SpiffeId = "spiffe://cluster.local/ns/default/sa/web"
        .parse()
        .expect("a SPIFFE ID");
    let allowed = if mode & 2 != 0 {
        Allowed::Exactly(web.clone())
    } else {
        Allowed::AnyInTrustDomain
    };
    WORLD.with(|w| {
        let Ok(signed) = w.signer.sign(&csr_pem, &allowed) else {
            return;
        };
        assert_eq!(signed.identity.trust_domain(), TRUST_DOMAIN);
        if mode & 2 != 0 {
            assert_eq!(signed.identity, web, "issued for another identity");
        }
        let chain = cert::certs_from_pem(signed.chain_pem.as_bytes()).expect("the chain parses");
        assert!(
            chain.len() >= 2,
            "the issuer's chain follows the certificate"
        );
        let info = cert::inspect(&chain[0]).expect("the certificate parses");
        assert_eq!(info.identity.as_ref(), Some(&signed.identity));
        assert_eq!(info.serial, signed.serial);
        let csr =
            rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).expect("it was signed");
        let (_, issued) = X509Certificate::from_der(&chain[0]).expect("the certificate parses");
        assert_eq!(
            issued.public_key().subject_public_key.data.as_ref(),
            rcgen::PublicKeyData::der_bytes(&csr.public_key),
            "the certificate is for another key than the CSR's"
        );
        w.verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .expect("the issued certificate verifies as a mesh client certificate");
    });
});
