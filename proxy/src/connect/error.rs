//! Leaf: why a connection to an endpoint was not made.

use crate::addrs::EndpointAddr;
use std::io;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection to {addr} refused")]
    Refused { addr: EndpointAddr },
    #[error("connection to {addr} timed out after {timeout:?}")]
    Timeout {
        addr: EndpointAddr,
        timeout: Duration,
    },
    #[error("{addr} is one of this proxy's own listeners; refusing to connect to itself")]
    Loop { addr: EndpointAddr },
    #[error("connection to {addr} failed: {source}")]
    Io {
        addr: EndpointAddr,
        source: io::Error,
    },
    /// The peer does not speak mesh TLS at all: it answered with something that is not
    /// TLS, closed on the ClientHello, refused the mesh's ALPN, or presented a
    /// certificate that is not a mesh certificate. `fallback`: auto mode has noted the
    /// peer as one to reach in plaintext, and a new decision will say so.
    #[error("{addr} does not answer mTLS: {reason}")]
    NotMeshed {
        addr: EndpointAddr,
        reason: String,
        fallback: bool,
    },
    /// A mesh TLS handshake that failed otherwise (an alert about certificates, an
    /// expired certificate, no answer in time): never a reason to fall back to
    /// plaintext.
    #[error("mTLS handshake with {addr} failed: {reason}")]
    Tls { addr: EndpointAddr, reason: String },
    #[error("{addr} presented identity {presented}, expected {expected}")]
    Identity {
        addr: EndpointAddr,
        presented: String,
        expected: String,
    },
    /// The decision refused to connect at all.
    #[error("not connecting to {addr}: {reason}")]
    Refuse {
        addr: EndpointAddr,
        reason: &'static str,
    },
    /// Another request's connection attempt failed while this one waited for it (it
    /// was counted there).
    #[error("{message}")]
    Recent {
        reason: &'static str,
        message: String,
        fallback: bool,
    },
}

impl ConnectError {
    /// The `reason` label of `gofe_tcp_connect_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Refused { .. } => "refused",
            ConnectError::Timeout { .. } => "timeout",
            ConnectError::Loop { .. } => "loop",
            ConnectError::Io { .. } => "error",
            ConnectError::NotMeshed { .. } => "not_meshed",
            ConnectError::Tls { .. } => "tls",
            ConnectError::Identity { .. } => "identity",
            ConnectError::Refuse { .. } => "refused_by_policy",
            ConnectError::Recent { reason, .. } => reason,
        }
    }

    /// Auto mode found the peer without a sidecar: decide again (plaintext now).
    pub fn decide_again(&self) -> bool {
        match self {
            ConnectError::NotMeshed { fallback, .. } | ConnectError::Recent { fallback, .. } => {
                *fallback
            }
            _ => false,
        }
    }

    /// The same failure, for requests that waited on this attempt.
    pub fn recent(&self) -> ConnectError {
        ConnectError::Recent {
            reason: self.reason(),
            message: self.to_string(),
            fallback: self.decide_again(),
        }
    }
}
