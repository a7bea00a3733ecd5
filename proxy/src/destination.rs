//! Picking the destination: a connection redirected by iptables goes where it was
//! going (outbound) or to the application on localhost (inbound); a connection that
//! reached a listener directly is either an explicit proxy client, routed per request
//! by its authority, or (inbound) sent to the configured direct target.

use crate::addrs::{Direction, EndpointAddr, OrigDstAddr};
use http::uri::Authority;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Where a connection's traffic goes, decided when it is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnTarget {
    /// Everything on the connection goes to one endpoint.
    Endpoint {
        endpoint: EndpointAddr,
        /// Set when iptables redirected the connection.
        orig_dst: Option<OrigDstAddr>,
    },
    /// An explicit proxy client on the outbound listener: each request names its
    /// destination in its authority.
    Explicit,
}

impl ConnTarget {
    /// The target of a connection redirected from `orig_dst`.
    pub fn redirected(direction: Direction, orig_dst: OrigDstAddr) -> ConnTarget {
        let endpoint = match direction {
            Direction::Outbound => EndpointAddr(orig_dst.0),
            // The application listens on the pod's loopback, in the family the client
            // used.
            Direction::Inbound => {
                let lo = match orig_dst.0.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                };
                EndpointAddr(SocketAddr::new(lo, orig_dst.0.port()))
            }
        };
        ConnTarget::Endpoint {
            endpoint,
            orig_dst: Some(orig_dst),
        }
    }

    pub fn orig_dst(&self) -> Option<OrigDstAddr> {
        match self {
            ConnTarget::Endpoint { orig_dst, .. } => *orig_dst,
            ConnTarget::Explicit => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no address found for {name}")]
    NoAddress { name: String },
    #[error("resolving {name} failed: {source}")]
    Lookup {
        name: String,
        source: std::io::Error,
    },
}

/// How long a resolved name is reused. Names here are explicit-proxy authorities; the
/// system resolver does not give TTLs, so a short fixed time bounds staleness.
const NAME_CACHE_TTL: Duration = Duration::from_secs(5);
const NAME_CACHE_MAX: usize = 10_000;

/// Resolves authorities to an endpoint: IP literals at once, names through the system
/// resolver with a short cache.
#[derive(Default)]
pub struct Resolver {
    cache: RwLock<HashMap<String, (SocketAddr, Instant)>>,
}

impl Resolver {
    pub async fn resolve(
        &self,
        authority: &Authority,
        default_port: u16,
    ) -> Result<EndpointAddr, ResolveError> {
        let port = authority.port_u16().unwrap_or(default_port);
        let host = authority.host();
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return Ok(EndpointAddr(SocketAddr::new(ip, port)));
        }
        let key = format!("{host}:{port}");
        if let Some((addr, at)) = self.cache.read().get(&key)
            && at.elapsed() < NAME_CACHE_TTL
        {
            return Ok(EndpointAddr(*addr));
        }
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| ResolveError::Lookup {
                name: host.to_string(),
                source,
            })?
            .next()
            .ok_or_else(|| ResolveError::NoAddress {
                name: host.to_string(),
            })?;
        let mut cache = self.cache.write();
        if cache.len() >= NAME_CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < NAME_CACHE_TTL);
        }
        if cache.len() < NAME_CACHE_MAX {
            cache.insert(key, (addr, Instant::now()));
        }
        Ok(EndpointAddr(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_goes_to_loopback_in_the_clients_family() {
        let t = ConnTarget::redirected(
            Direction::Inbound,
            OrigDstAddr("10.0.0.5:8080".parse().unwrap()),
        );
        assert!(
            matches!(t, ConnTarget::Endpoint { endpoint, .. } if endpoint.0 == "127.0.0.1:8080".parse().unwrap())
        );
        let t = ConnTarget::redirected(
            Direction::Inbound,
            OrigDstAddr("[fd00::5]:8080".parse().unwrap()),
        );
        assert!(
            matches!(t, ConnTarget::Endpoint { endpoint, .. } if endpoint.0 == "[::1]:8080".parse().unwrap())
        );
    }

    #[test]
    fn outbound_goes_to_the_original_destination() {
        let orig = OrigDstAddr("10.0.0.9:80".parse().unwrap());
        let t = ConnTarget::redirected(Direction::Outbound, orig);
        assert_eq!(
            t,
            ConnTarget::Endpoint {
                endpoint: EndpointAddr(orig.0),
                orig_dst: Some(orig)
            }
        );
    }

    #[tokio::test]
    async fn literals_and_localhost_resolve() {
        let r = Resolver::default();
        let a: Authority = "10.1.2.3:8080".parse().unwrap();
        assert_eq!(
            r.resolve(&a, 80).await.unwrap().0,
            "10.1.2.3:8080".parse().unwrap()
        );
        let a: Authority = "[::1]".parse().unwrap();
        assert_eq!(
            r.resolve(&a, 80).await.unwrap().0,
            "[::1]:80".parse().unwrap()
        );
        let a: Authority = "localhost:9".parse().unwrap();
        assert!(r.resolve(&a, 80).await.unwrap().0.ip().is_loopback());
        let a: Authority = "no-such-host.invalid".parse().unwrap();
        assert!(r.resolve(&a, 80).await.is_err());
    }
}
