//! Connecting to an endpoint: the decision (`tls`), TCP within the connect timeout,
//! then mesh TLS within the same deadline. A failure is counted once, in
//! `gofe_tcp_connect_errors_total`, here.

use super::error::ConnectError;
use super::tcp::{TcpConnector, Upstream};
use super::tls::{Decision, OutboundTls};
use crate::addrs::{Direction, EndpointAddr};
use crate::metrics::Metrics;
use gofe_identity::SpiffeId;
use std::sync::Arc;

/// A connection to an endpoint, and the identity its proxy presented (over mTLS).
pub struct Connected {
    pub io: Upstream,
    pub peer: Option<Arc<SpiffeId>>,
}

pub struct Connector {
    tcp: TcpConnector,
    tls: OutboundTls,
    metrics: Arc<Metrics>,
}

impl Connector {
    pub fn new(tcp: TcpConnector, tls: OutboundTls, metrics: Arc<Metrics>) -> Self {
        Self { tcp, tls, metrics }
    }

    pub fn tcp(&self) -> &TcpConnector {
        &self.tcp
    }

    /// How to reach `addr` (see `tls::OutboundTls::decide`).
    pub fn decide<'a>(
        &self,
        direction: Direction,
        addr: EndpointAddr,
        expected: Option<&'a SpiffeId>,
    ) -> Decision<'a> {
        self.tls.decide(direction, addr, expected)
    }

    /// A connection to `addr` as `decision` says, asking for `alpn` over mTLS. A peer
    /// that auto mode found without a sidecar comes back as an error that asks for a
    /// new decision (`decide_again`), not counted as a failure.
    pub async fn open(
        &self,
        direction: Direction,
        addr: EndpointAddr,
        decision: Decision<'_>,
        alpn: &[u8],
    ) -> Result<Connected, ConnectError> {
        let timeout = self.tcp.timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        if let Decision::Refuse(reason) = decision {
            return Err(self.refuse(direction, addr, reason));
        }
        let result = match self.tcp.connect(addr, deadline).await {
            Err(e) => Err(e),
            Ok(tcp) => match decision {
                Decision::Refuse(_) => unreachable!("refused above"),
                Decision::Plaintext => Ok(Connected {
                    io: Upstream::Plain(tcp),
                    peer: None,
                }),
                Decision::Mtls { .. } => self
                    .tls
                    .handshake(tcp, addr, decision, alpn, deadline, timeout)
                    .await
                    .map(|(s, peer)| Connected {
                        io: Upstream::Tls(Box::new(s)),
                        peer: Some(peer),
                    }),
            },
        };
        if let Err(e) = &result
            && !e.decide_again()
        {
            self.metrics.connect_error(direction, e.reason());
        }
        result
    }

    /// The failure a refusing decision is, counted.
    pub fn refuse(
        &self,
        direction: Direction,
        addr: EndpointAddr,
        reason: &'static str,
    ) -> ConnectError {
        let e = ConnectError::Refuse { addr, reason };
        self.metrics.connect_error(direction, e.reason());
        e
    }

    /// A connection of its own to `addr` (opaque TCP, a tunnel, an upgrade): decided,
    /// opened, and decided again once if the peer turned out to have no sidecar.
    pub async fn connect(
        &self,
        direction: Direction,
        addr: EndpointAddr,
        expected: Option<&SpiffeId>,
        alpn: &[u8],
    ) -> Result<Connected, ConnectError> {
        let decision = self.decide(direction, addr, expected);
        match self.open(direction, addr, decision, alpn).await {
            Err(e) if e.decide_again() => {
                let decision = self.decide(direction, addr, expected);
                self.open(direction, addr, decision, alpn).await
            }
            other => other,
        }
    }
}
