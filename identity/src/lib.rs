//! Workload identity. This crate starts with the names: SPIFFE IDs of the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`, which certificates,
//! the issuer and `GOFE_INBOUND_AUTHORIZE` all speak. The issuer, the CSR client and
//! certificate rotation build on it.
#![forbid(unsafe_code)]

pub mod spiffe;

pub use spiffe::SpiffeId;
