//! The issuer's certify API: `POST /v1/certify` over HTTPS with a JSON body.

use serde::{Deserialize, Serialize};

pub const CERTIFY_PATH: &str = "/v1/certify";

/// The audience a workload's service-account token must carry for the issuer.
pub const TOKEN_AUDIENCE: &str = "identity.gofe.io";

#[derive(Debug, Serialize, Deserialize)]
pub struct CertifyRequest {
    /// PKCS#10 request, PEM. Its only name is the workload's SPIFFE ID (a URI SAN).
    pub csr: String,
    /// The workload's Kubernetes service-account token.
    pub token: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CertifyResponse {
    /// The workload certificate, then the issuer's chain, PEM.
    pub certificate_chain: String,
    /// RFC 3339.
    pub not_after: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}
