//! The issuer's service-account token check
//! (`gofe_identity::issuer::tokens::TokenVerifier::identity`) against a fixed JWKS (an
//! ES256 key, an RSA key and another EC key). Never a panic; a token is accepted only
//! if its claims say so: the audience, an expiry not past, a not-before not ahead, and
//! the identity made from its `kubernetes.io` claims (or its legacy `sub`) in the trust
//! domain.
//!
//! Input: a first byte; bit 0 clear: the rest is the token. Bit 0 set: the rest is a
//! JOSE header and claims (JSON, split at the first newline), signed here with the
//! JWKS's ES256 key, so that what follows the signature check is fuzzed too.
#![no_main]

use base64::Engine;
use gofe_fuzz::{AUDIENCE, TOKEN_KEY_PEM, TRUST_DOMAIN};
use gofe_identity::issuer::tokens::{JwksSource, TokenVerifier};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::time::{SystemTime, UNIX_EPOCH};

struct World {
    runtime: tokio::runtime::Runtime,
    verifier: TokenVerifier,
    key: EncodingKey,
    _dir: tempfile::TempDir,
}

thread_local! {
    static WORLD: World = {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, gofe_fuzz::jwks().to_string()).expect("JWKS written");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let verifier = runtime
            .block_on(TokenVerifier::new(
                JwksSource::File(path),
                AUDIENCE.into(),
                None,
                TRUST_DOMAIN.into(),
            ))
            .expect("the JWKS loads");
        World {
            runtime,
            verifier,
            key: EncodingKey::from_ec_pem(TOKEN_KEY_PEM.as_bytes()).expect("fixture key"),
            _dir: dir,
        }
    };
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    WORLD.with(|w| {
        let token = if mode & 1 == 0 {
            let Ok(t) = std::str::from_utf8(rest) else {
                return;
            };
            t.to_string()
        } else {
            let cut = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
            let (header, claims) = (&rest[..cut], rest.get(cut + 1..).unwrap_or_default());
            let signed = format!("{}.{}", b64(header), b64(claims));
            let signature = jsonwebtoken::crypto::sign(signed.as_bytes(), &w.key, Algorithm::ES256)
                .expect("signing");
            format!("{signed}.{signature}")
        };
        let Ok(id) = w.runtime.block_on(w.verifier.identity(&token)) else {
            return;
        };
        // Accepted: the claims must say so.
        let payload = token.split('.').nth(1).expect("a JWT has a payload");
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .expect("an accepted token's payload is base64url"),
        )
        .expect("an accepted token's payload is JSON");
        assert_eq!(id.trust_domain(), TRUST_DOMAIN);
        let aud = &claims["aud"];
        assert!(
            aud == AUDIENCE
                || aud
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == AUDIENCE)),
            "accepted for audience {aud}"
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        let exp = claims["exp"].as_f64().expect("an accepted token expires");
        assert!(exp + 30.0 > now, "accepted, expired at {exp}");
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf.as_f64().expect("nbf is a time");
            assert!(nbf - 30.0 <= now, "accepted, not valid before {nbf}");
        }
        let k8s = &claims["kubernetes.io"];
        let (ns, sa) = match (
            k8s["namespace"].as_str(),
            k8s["serviceaccount"]["name"].as_str(),
        ) {
            (Some(ns), Some(sa)) => (ns.to_string(), sa.to_string()),
            _ => {
                let sub = claims["sub"].as_str().expect("a subject");
                let rest = sub
                    .strip_prefix("system:serviceaccount:")
                    .unwrap_or_else(|| panic!("accepted subject {sub:?}"));
                let (ns, sa) = rest.split_once(':').expect("namespace:name");
                (ns.to_string(), sa.to_string())
            }
        };
        assert_eq!(
            (id.namespace(), id.service_account()),
            (ns.as_str(), sa.as_str()),
            "the identity is not the one the claims name"
        );
    });
});
