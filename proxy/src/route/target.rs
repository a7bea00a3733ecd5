//! Where a connection's traffic is aimed, decided when it is accepted: outbound, where
//! the application was connecting (its destination found per request by authority, or
//! by that address); inbound, the application in this pod; or, for a client that
//! connected to the outbound listener itself, wherever each request's authority says.

use crate::addrs::{Direction, EndpointAddr, OrigDstAddr};
use crate::config::InboundTarget;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnTarget {
    /// Outbound, redirected by iptables: the application was connecting to this.
    Outbound(OrigDstAddr),
    /// Inbound: the application's endpoint in this pod, and where the client was
    /// connecting (None when it reached the listener without a redirect).
    Inbound {
        app: EndpointAddr,
        orig_dst: Option<OrigDstAddr>,
    },
    /// An explicit proxy client on the outbound listener: each request names its
    /// destination in its authority.
    Explicit,
}

impl ConnTarget {
    /// The target of a connection redirected from `orig_dst`. Inbound, the application
    /// is reached where the client dialled it (GOFE_INBOUND_TARGET=pod-ip): what the
    /// application bound to loopback only is not exposed to the cluster by the proxy.
    /// With `localhost`, on the loopback address of the client's family.
    pub fn redirected(
        direction: Direction,
        orig_dst: OrigDstAddr,
        inbound: InboundTarget,
    ) -> ConnTarget {
        match direction {
            Direction::Outbound => ConnTarget::Outbound(orig_dst),
            Direction::Inbound => {
                let ip = match (inbound, orig_dst.ip()) {
                    (InboundTarget::PodIp, ip) => ip,
                    (InboundTarget::Localhost, IpAddr::V4(_)) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    (InboundTarget::Localhost, IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                };
                ConnTarget::Inbound {
                    app: EndpointAddr::new(SocketAddr::new(ip, orig_dst.port())),
                    orig_dst: Some(orig_dst),
                }
            }
        }
    }

    pub fn orig_dst(&self) -> Option<OrigDstAddr> {
        match self {
            ConnTarget::Outbound(o) => Some(*o),
            ConnTarget::Inbound { orig_dst, .. } => *orig_dst,
            ConnTarget::Explicit => None,
        }
    }

    /// The port the application connected to, when it is known.
    pub fn port(&self) -> Option<u16> {
        match self {
            ConnTarget::Outbound(o) => Some(o.port()),
            ConnTarget::Inbound { app, .. } => Some(app.port()),
            ConnTarget::Explicit => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_goes_to_the_address_dialled() {
        let orig = OrigDstAddr::new("10.0.0.5:8080".parse().unwrap());
        let t = ConnTarget::redirected(Direction::Inbound, orig, InboundTarget::PodIp);
        assert_eq!(
            t,
            ConnTarget::Inbound {
                app: orig.as_endpoint(),
                orig_dst: Some(orig)
            }
        );
    }

    #[test]
    fn localhost_mode_goes_to_loopback_in_the_clients_family() {
        let t = ConnTarget::redirected(
            Direction::Inbound,
            OrigDstAddr::new("10.0.0.5:8080".parse().unwrap()),
            InboundTarget::Localhost,
        );
        assert!(
            matches!(t, ConnTarget::Inbound { app, .. } if app.addr() == "127.0.0.1:8080".parse().unwrap())
        );
        let t = ConnTarget::redirected(
            Direction::Inbound,
            OrigDstAddr::new("[fd00::5]:8080".parse().unwrap()),
            InboundTarget::Localhost,
        );
        assert!(
            matches!(t, ConnTarget::Inbound { app, .. } if app.addr() == "[::1]:8080".parse().unwrap())
        );
    }

    #[test]
    fn outbound_keeps_the_original_destination() {
        let orig = OrigDstAddr::new("10.0.0.9:80".parse().unwrap());
        assert_eq!(
            ConnTarget::redirected(Direction::Outbound, orig, InboundTarget::PodIp),
            ConnTarget::Outbound(orig)
        );
    }
}
