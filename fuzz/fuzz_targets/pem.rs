//! Reading certificates: trust anchors (`gofe_identity::trust::TrustAnchors::from_pem`,
//! what GOFE_IDENTITY_TRUST_ANCHORS holds), certificate chains
//! (`gofe_identity::cert::certs_from_pem`: the issuer's answer, the issuer's and the
//! webhook's files), keys (`cert::key_from_pem`) and what a certificate says
//! (`cert::inspect`, `cert::peer_identity`: a peer's certificate in a handshake). Never
//! a panic; anchors that load hold one root per certificate of the bundle.
//!
//! Each input is read twice: as PEM text, and as DER (given to `inspect` and
//! `peer_identity` as it is, and wrapped in a `CERTIFICATE` PEM block for the rest).
#![no_main]

use gofe_identity::cert;
use gofe_identity::trust::TrustAnchors;
use libfuzzer_sys::fuzz_target;

fn read(pem: &[u8]) {
    let certs = cert::certs_from_pem(pem);
    if let Ok(certs) = &certs {
        for c in certs {
            let _ = cert::inspect(c);
        }
    }
    let _ = cert::key_from_pem(pem);
    if let Ok(anchors) = TrustAnchors::from_pem(pem) {
        let certs = certs.expect("anchors that load are certificates");
        assert_eq!(anchors.count(), certs.len(), "one root per certificate");
    }
}

fuzz_target!(|data: &[u8]| {
    read(data);
    let _ = cert::inspect(data);
    let _ = cert::peer_identity(data);
    read(gofe_fuzz::pem("CERTIFICATE", data).as_bytes());
});
