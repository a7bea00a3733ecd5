//! `gofe identity`'s settings.

use super::env::Env;
use super::parse::{parse_bool, parse_nonzero_duration, parse_socket_addr, parse_trust_domain};
use super::vars::*;
use std::path::PathBuf;
use std::time::Duration;

/// `gofe identity`'s settings.
pub fn read_issuer(env: &mut Env<'_>) -> gofe_identity::issuer::IssuerConfig {
    let insecure_dev = env.get(&ISSUER_INSECURE_DEV, parse_bool);
    let jwks_ca = env.get(&ISSUER_JWKS_CA, |s| Ok::<_, String>(PathBuf::from(s)));
    let jwks = env.get(&ISSUER_JWKS, |s| {
        if s.is_empty() {
            Ok(None)
        } else {
            gofe_identity::issuer::tokens::JwksSource::parse(
                s,
                Some(jwks_ca.clone()),
                Some(PathBuf::from(
                    "/var/run/secrets/kubernetes.io/serviceaccount/token",
                ))
                .filter(|p| p.exists()),
            )
            .map(Some)
        }
    });
    if jwks.is_none() && !insecure_dev {
        env.reject(
            &ISSUER_JWKS,
            "",
            "a JWKS file or URL (or GOFE_ISSUER_INSECURE_DEV=true for a demo)",
        );
    }
    gofe_identity::issuer::IssuerConfig {
        dir: env.get(&ISSUER_DIR, |s| Ok::<_, String>(PathBuf::from(s))),
        listen: env.get(&ISSUER_LISTEN, parse_socket_addr),
        admin_listen: env.get(&ISSUER_ADMIN_LISTEN, parse_socket_addr),
        cert_lifetime: env.get(&ISSUER_CERT_LIFETIME, |s| {
            parse_nonzero_duration(s).and_then(|d| {
                if d < Duration::from_secs(1) {
                    Err("expected at least 1s".into())
                } else {
                    Ok(d)
                }
            })
        }),
        jwks,
        insecure_dev,
        trust_domain: env.get(&TRUST_DOMAIN, parse_trust_domain),
        audience: env.get(&ISSUER_TOKEN_AUDIENCE, |s| {
            if s.is_empty() {
                Err("expected an audience".to_string())
            } else {
                Ok(s.to_string())
            }
        }),
        token_issuer: env.get(&ISSUER_TOKEN_ISSUER, |s| {
            Ok::<_, String>((!s.is_empty()).then(|| s.to_string()))
        }),
    }
}
