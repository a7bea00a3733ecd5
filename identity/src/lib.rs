//! gofe's workload identity: SPIFFE names; the issuer (the mesh CA, `gofe identity`);
//! the proxy's side (a key made in-process, CSRs, a held certificate renewed before it
//! expires); trust anchors reloaded when they change; the TLS configs proxies use with
//! each other.
#![forbid(unsafe_code)]

pub mod api;
pub mod cert;
pub mod client;
pub mod issuer;
pub mod renew;
pub mod signed;
pub mod spiffe;
pub mod store;
pub mod tls;
pub mod trust;

pub use spiffe::SpiffeId;
