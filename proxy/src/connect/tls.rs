//! The one outbound-TLS decision, and the mesh TLS handshake that carries it out.
//!
//! For every connection to an endpoint, whatever it will carry (HTTP, an upgrade, a
//! CONNECT tunnel, opaque TCP), `decide` says how: in plaintext, or with mTLS (the peer
//! presenting the identity discovery named, when it named one; in auto mode, with
//! plaintext allowed if the peer shows it has no sidecar). Nothing else in the proxy
//! chooses between TLS and plaintext.

use super::error::ConnectError;
use crate::addrs::{Direction, EndpointAddr};
use crate::config::OutboundMtls;
use crate::identity::ProxyIdentity;
use crate::metrics::Metrics;
use gofe_identity::SpiffeId;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// How long auto mode remembers that an endpoint did not answer TLS: long enough not
/// to pay a failed handshake per connection, short enough that a pod which gains a
/// sidecar (or an address reused by one that has one) is soon reached with mTLS.
const PLAINTEXT_MEMORY: Duration = Duration::from_secs(60);
const PLAINTEXT_MEMORY_MAX: usize = 10_000;

const NO_CERTIFICATE: &str =
    "this proxy holds no valid certificate of its own (see /ready and /identity)";

/// How to reach an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    Plaintext,
    /// Neither: mTLS would be required or tried, and this proxy holds no valid
    /// certificate of its own. Nothing is sent in plaintext instead.
    Refuse(&'static str),
    /// Mesh mTLS. `expected`: the identity the peer must present. `fallback`: a peer
    /// that shows it has no sidecar is noted, and reached in plaintext after a new
    /// decision (auto mode).
    Mtls {
        expected: Option<&'a SpiffeId>,
        fallback: bool,
    },
}

/// The outbound side of the mesh: this proxy's identity and GOFE_OUTBOUND_MTLS, and
/// (auto mode) the endpoints found without a sidecar.
pub struct OutboundTls {
    identity: Option<Arc<ProxyIdentity>>,
    mode: OutboundMtls,
    plaintext: RwLock<HashMap<EndpointAddr, Instant>>,
    metrics: Arc<Metrics>,
}

impl OutboundTls {
    pub fn new(
        identity: Option<Arc<ProxyIdentity>>,
        mode: OutboundMtls,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            identity,
            mode,
            plaintext: RwLock::new(HashMap::new()),
            metrics,
        }
    }

    /// How to reach `addr`, whose proxy must present `expected` when discovery named an
    /// identity.
    pub fn decide<'a>(
        &self,
        direction: Direction,
        addr: EndpointAddr,
        expected: Option<&'a SpiffeId>,
    ) -> Decision<'a> {
        // Inbound connections go to the application, in this pod.
        let (Direction::Outbound, Some(identity)) = (direction, &self.identity) else {
            return Decision::Plaintext;
        };
        match (self.mode, expected) {
            (OutboundMtls::Off, _) => Decision::Plaintext,
            // A peer auto mode found without a sidecar (and named by no discovery
            // source with an identity).
            (OutboundMtls::Auto, None) if self.remembered(addr) => Decision::Plaintext,
            // Without a valid certificate of its own, a proxy cannot tell a peer
            // without a sidecar from its own failing handshakes: it sends nothing
            // rather than guess plaintext (and /ready says why).
            _ if !identity.is_ready() => Decision::Refuse(NO_CERTIFICATE),
            // An identity named by discovery: mTLS with it, or nothing.
            (_, Some(_)) | (OutboundMtls::Strict, None) => Decision::Mtls {
                expected,
                fallback: false,
            },
            (OutboundMtls::Auto, None) => Decision::Mtls {
                expected: None,
                fallback: true,
            },
        }
    }

    fn remembered(&self, addr: EndpointAddr) -> bool {
        self.plaintext
            .read()
            .get(&addr)
            .is_some_and(|at| at.elapsed() < PLAINTEXT_MEMORY)
    }

    /// Auto mode: `addr` did not answer mesh TLS; reach it in plaintext for a while.
    fn remember_plaintext(&self, addr: EndpointAddr) {
        let mut map = self.plaintext.write();
        if map.len() >= PLAINTEXT_MEMORY_MAX {
            map.retain(|_, at| at.elapsed() < PLAINTEXT_MEMORY);
        }
        // Still full of fresh entries: this one is tried again next time.
        if map.len() < PLAINTEXT_MEMORY_MAX {
            map.insert(addr, Instant::now());
        }
    }

    /// Mesh TLS over `tcp` asking for `alpn`, by `deadline`, as `decision` (an `Mtls`
    /// one) says: the peer chains to the trust anchors (the verifier checks) and
    /// presents the expected identity (checked here). Returns the stream and the
    /// identity the peer presented.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        addr: EndpointAddr,
        decision: Decision<'_>,
        alpn: &[u8],
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<(TlsStream<TcpStream>, Arc<SpiffeId>), ConnectError> {
        let (Decision::Mtls { expected, fallback }, Some(identity)) = (decision, &self.identity)
        else {
            unreachable!("a handshake is made only for an mTLS decision, which needs an identity");
        };
        let connector = tokio_rustls::TlsConnector::from(identity.tls.client_config(alpn));
        // Mesh certificates name identities, not hosts: the name only fills the
        // handshake; the verifier checks the chain and this function the identity.
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let result = match tokio::time::timeout_at(deadline, connector.connect(name, tcp)).await {
            Err(_) => Err(ConnectError::Tls {
                addr,
                reason: format!("no handshake within {timeout:?}"),
            }),
            Ok(Err(e)) if speaks_no_mesh_tls(&e) => {
                if fallback {
                    tracing::debug!(%addr, error = %e, "peer does not answer mTLS; reaching it in plaintext");
                    self.remember_plaintext(addr);
                }
                Err(ConnectError::NotMeshed {
                    addr,
                    reason: e.to_string(),
                    fallback,
                })
            }
            Ok(Err(e)) => Err(ConnectError::Tls {
                addr,
                reason: e.to_string(),
            }),
            Ok(Ok(stream)) => match gofe_identity::tls::peer_identity(stream.get_ref().1) {
                Some(id) if expected.is_none_or(|e| *e == id) => Ok((stream, Arc::new(id))),
                Some(id) => Err(ConnectError::Identity {
                    addr,
                    presented: id.to_string(),
                    expected: expected.map(ToString::to_string).unwrap_or_default(),
                }),
                None => Err(ConnectError::Tls {
                    addr,
                    reason: "the peer presented no SPIFFE ID".into(),
                }),
            },
        };
        self.metrics.tls_handshake(
            Direction::Outbound,
            if result.is_ok() { "ok" } else { "error" },
        );
        result
    }
}

/// Whether a failed handshake is evidence that the peer has no sidecar: it closed the
/// connection on the ClientHello without a word, or answered it with something that is
/// not TLS (a plaintext server's error page). Anything else is a failure and never a
/// reason for plaintext: a certificate that does not verify (another CA, self-signed:
/// what an attacker on the path would present), a TLS alert, or a connection reset in
/// the middle of the handshake. Where discovery names the identity to expect, or with
/// GOFE_OUTBOUND_MTLS=strict, there is no fallback at all.
fn speaks_no_mesh_tls(e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return true;
    }
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidMessage(_))
    )
}
