//! Checking a workload's Kubernetes service-account token: a JWT signed by one of the
//! keys the cluster's service-account issuer publishes (a JWKS, from a file or a URL),
//! for our audience, not expired. The token's namespace and service account make the
//! workload's SPIFFE ID.

use crate::spiffe::SpiffeId;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::RwLock;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;
/// A JWKS is re-read this often, and at most this often when a token names a key it
/// does not hold (the cluster rotated its signing key).
const REFRESH_EVERY: Duration = Duration::from_secs(300);
const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// A JWKS fetch that takes longer than this is abandoned (the keys held stay).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_JWKS: usize = 1024 * 1024;

const ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
];

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token is not a service-account token: {0}")]
    NotServiceAccount(String),
    #[error("no key in the JWKS verifies this token (kid {0:?})")]
    UnknownKey(Option<String>),
    #[error("cannot load the JWKS from {source_name}: {reason}")]
    Jwks { source_name: String, reason: String },
}

#[derive(Clone, Debug)]
pub enum JwksSource {
    File(PathBuf),
    /// An HTTPS (or HTTP) URL; over HTTPS the server is verified against `ca` (the
    /// cluster CA) when given, and `bearer` (a token file) is sent when given.
    Url {
        url: http::Uri,
        ca: Option<PathBuf>,
        bearer: Option<PathBuf>,
    },
}

impl JwksSource {
    /// A path, or an http(s) URL.
    pub fn parse(
        s: &str,
        ca: Option<PathBuf>,
        bearer: Option<PathBuf>,
    ) -> Result<JwksSource, String> {
        if s.starts_with("https://") || s.starts_with("http://") {
            let url: http::Uri = s.parse().map_err(|e| format!("invalid URL: {e}"))?;
            // Keys fetched in the clear could be replaced on the way (and a bearer token
            // would travel in the clear): plain HTTP only to this host.
            let loopback = matches!(url.host(), Some("localhost" | "127.0.0.1" | "[::1]"));
            if url.scheme_str() == Some("http") && !loopback {
                return Err("expected an https URL (plain http only to localhost)".into());
            }
            Ok(JwksSource::Url { url, ca, bearer })
        } else if s.is_empty() {
            Err("expected a JWKS file or URL".into())
        } else {
            Ok(JwksSource::File(s.into()))
        }
    }

    fn name(&self) -> String {
        match self {
            JwksSource::File(p) => p.display().to_string(),
            JwksSource::Url { url, .. } => url.to_string(),
        }
    }

    async fn fetch(&self) -> Result<JwkSet, TokenError> {
        let err = |reason: String| TokenError::Jwks {
            source_name: self.name(),
            reason,
        };
        let bytes = match self {
            JwksSource::File(p) => tokio::fs::read(p).await.map_err(|e| err(e.to_string()))?,
            JwksSource::Url { url, ca, bearer } => {
                tokio::time::timeout(FETCH_TIMEOUT, fetch_url(url, ca.as_ref(), bearer.as_ref()))
                    .await
                    .map_err(|_| err(format!("no answer within {FETCH_TIMEOUT:?}")))?
                    .map_err(err)?
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| err(format!("not a JWKS: {e}")))
    }
}

async fn fetch_url(
    url: &http::Uri,
    ca: Option<&PathBuf>,
    bearer: Option<&PathBuf>,
) -> Result<Vec<u8>, String> {
    let host = url.host().ok_or("URL has no host")?.to_string();
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?;
    let mut req = http::Request::get(url.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header("host", host.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    if let Some(path) = bearer {
        let token = std::fs::read_to_string(path)
            .map_err(|e| format!("bearer token {}: {e}", path.display()))?;
        let value = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| "bearer token is not a header value")?;
        req.headers_mut().insert("authorization", value);
    }
    let mut tx = if https {
        let provider = crate::trust::provider();
        let roots = match ca {
            Some(path) => crate::trust::TrustAnchors::load(path)
                .map_err(|e| e.to_string())?
                .roots(),
            None => return Err("an https JWKS URL needs a CA file (GOFE_ISSUER_JWKS_CA)".into()),
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name =
            rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        tx
    } else {
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        tx
    };
    let rsp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    if !rsp.status().is_success() {
        return Err(format!("answered {}", rsp.status()));
    }
    let body = Limited::new(rsp.into_body(), MAX_JWKS)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(body.to_vec())
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    name: String,
}

struct Keys {
    set: JwkSet,
    fetched: Instant,
}

pub struct TokenVerifier {
    source: JwksSource,
    keys: RwLock<Keys>,
    /// Held by the one refresh under way; others go on with the keys held.
    refreshing: tokio::sync::Mutex<()>,
    audience: String,
    issuer: Option<String>,
    trust_domain: String,
}

impl TokenVerifier {
    pub async fn new(
        source: JwksSource,
        audience: String,
        issuer: Option<String>,
        trust_domain: String,
    ) -> Result<TokenVerifier, TokenError> {
        let set = source.fetch().await?;
        Ok(TokenVerifier {
            source,
            keys: RwLock::new(Keys {
                set,
                fetched: Instant::now(),
            }),
            refreshing: tokio::sync::Mutex::new(()),
            audience,
            issuer,
            trust_domain,
        })
    }

    /// The identity `token` proves.
    pub async fn identity(&self, token: &str) -> Result<SpiffeId, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let age = self.keys.read().fetched.elapsed();
        let known = header
            .kid
            .as_ref()
            .is_none_or(|kid| self.keys.read().set.find(kid).is_some());
        // One refresh at a time. A token naming an unknown key waits for it (the cluster
        // may have rotated its signing key); otherwise a refresh under way is not waited
        // for.
        if age >= REFRESH_EVERY || (!known && age >= REFRESH_MIN_INTERVAL) {
            let guard = if known {
                self.refreshing.try_lock().ok()
            } else {
                Some(self.refreshing.lock().await)
            };
            if let Some(_refreshing) = guard
                && self.keys.read().fetched.elapsed() >= REFRESH_MIN_INTERVAL
            {
                match self.source.fetch().await {
                    Ok(set) => {
                        *self.keys.write() = Keys {
                            set,
                            fetched: Instant::now(),
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "keeping the JWKS already loaded");
                        // Not again at once for every request.
                        let retry_from = Instant::now()
                            .checked_sub(REFRESH_EVERY - REFRESH_MIN_INTERVAL)
                            .unwrap_or_else(Instant::now);
                        self.keys.write().fetched = retry_from;
                    }
                }
            }
        }
        let candidates: Vec<DecodingKey> = {
            let keys = self.keys.read();
            let jwks: Vec<_> = match &header.kid {
                Some(kid) => keys.set.find(kid).into_iter().collect(),
                None => keys.set.keys.iter().collect(),
            };
            jwks.into_iter()
                .filter_map(|k| DecodingKey::from_jwk(k).ok())
                .collect()
        };
        if candidates.is_empty() {
            return Err(TokenError::UnknownKey(header.kid));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[&self.audience]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        let mut last = None;
        for key in &candidates {
            // The payload is read whole as JSON first: read straight into `Claims`,
            // claims it does not name are skipped unchecked, and a token whose payload
            // is no JSON (a lone surrogate in an unknown claim) was accepted. Found by
            // fuzzing (target jwt).
            match jsonwebtoken::decode::<serde_json::Value>(token, key, &validation) {
                Ok(data) => {
                    let claims = serde_json::from_value::<Claims>(data.claims)
                        .map_err(|e| TokenError::Invalid(format!("claims: {e}")))?;
                    return self.identity_of(claims);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(TokenError::Invalid(
            last.map(|e| e.to_string()).unwrap_or_default(),
        ))
    }

    fn identity_of(&self, claims: Claims) -> Result<SpiffeId, TokenError> {
        let (ns, sa) = match claims.kubernetes {
            Some(KubernetesClaims {
                namespace,
                serviceaccount: Some(Named { name }),
            }) => (namespace, name),
            _ => {
                // Legacy tokens carry only `sub`: system:serviceaccount:<ns>:<name>.
                let mut parts = claims.sub.splitn(4, ':');
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some("system"), Some("serviceaccount"), Some(ns), Some(sa)) => {
                        (ns.to_string(), sa.to_string())
                    }
                    _ => return Err(TokenError::NotServiceAccount(claims.sub)),
                }
            }
        };
        SpiffeId::new(&self.trust_domain, &ns, &sa)
            .map_err(|e| TokenError::NotServiceAccount(e.to_string()))
    }
}
