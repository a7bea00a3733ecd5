//! Leaf: addresses that must not be confused with one another. The application's
//! original destination, the connecting client, and the endpoint the proxy connects to
//! are all socket addresses, and the compiler keeps them apart; a destination's name
//! (an authority, or an address) is its own type too.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

macro_rules! addr_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(SocketAddr);

        impl $name {
            pub const fn new(addr: SocketAddr) -> Self {
                Self(addr)
            }

            pub const fn addr(self) -> SocketAddr {
                self.0
            }

            pub const fn port(self) -> u16 {
                self.0.port()
            }

            pub const fn ip(self) -> IpAddr {
                self.0.ip()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

addr_newtype!(
    /// Where the application meant to connect before iptables redirected it.
    OrigDstAddr
);
addr_newtype!(
    /// The peer of an accepted connection.
    ClientAddr
);
addr_newtype!(
    /// An address the proxy connects to.
    EndpointAddr
);

impl OrigDstAddr {
    /// The original destination used as the endpoint itself: the one place where a
    /// request goes where the application was sending it, because nothing better is
    /// known.
    pub const fn as_endpoint(self) -> EndpointAddr {
        EndpointAddr(self.0)
    }
}

/// Which listener a connection arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a destination is named by: an HTTP authority's host and port, or an address
/// (an IP literal authority, or a connection's original destination).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestKey {
    Name { host: String, port: u16 },
    Addr(SocketAddr),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not host:port")]
pub struct BadDestination(pub String);

/// Whether an authority names a host and, if it says one, a port: `http` accepts
/// `api.demo:t43` (a port that is no number) with no port, and the host it would then
/// show (`api.demo:t43`) names nothing; it accepts `[fd05@:]0:8080` too (userinfo
/// `[fd05`, host `:]0`) and `[fd05@,]080` (host `,]080`). Found by fuzzing (targets
/// destinations and http_head). A host's brackets pair up, and it has colons only
/// inside them (an IPv6 address, or a name written with them).
pub fn well_formed(a: &http::uri::Authority) -> bool {
    // Bytes, not `str` patterns: this runs for every request (it was 800 instructions
    // a call).
    let s = a.as_str().as_bytes();
    let host_port = match s.iter().rposition(|&b| b == b'@') {
        Some(at) => &s[at + 1..],
        None => s,
    };
    let (host, port) = match host_port.iter().rposition(|&b| b == b':') {
        None => (host_port, None),
        // The last colon is inside a bracketed host: there is no port.
        Some(colon) if host_port[colon..].contains(&b']') => (host_port, None),
        Some(colon) => (&host_port[..colon], Some(&host_port[colon + 1..])),
    };
    // Brackets pair up (`[`, then `]`, not nested); colons only inside them.
    let mut bracketed = false;
    for &b in host {
        match b {
            b'[' if bracketed => return false,
            b']' if !bracketed => return false,
            b'[' => bracketed = true,
            b']' => bracketed = false,
            b':' if !bracketed => return false,
            _ => {}
        }
    }
    if bracketed {
        return false;
    }
    // A host of dots only (`.`) is none: trailing dots are dropped from names. A port,
    // if any, is a number (`host:` and `:80` are refused too).
    !host.iter().all(|&b| b == b'.') && port.is_none_or(|p| !p.is_empty() && a.port_u16().is_some())
}

/// Who a client is, for its own rate-limit bucket.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A meshed client's identity (SPIFFE ID).
    Identity(Arc<str>),
    /// An unmeshed client: its source IP.
    Ip(IpAddr),
}

impl DestKey {
    /// `host:port` (port 80 when absent), `ip:port` or `[ip6]:port`.
    pub fn parse(s: &str) -> Result<DestKey, BadDestination> {
        let authority: http::uri::Authority = s
            .parse()
            .ok()
            .filter(well_formed)
            .ok_or_else(|| BadDestination(s.to_string()))?;
        Ok(DestKey::from_authority(&authority, 80))
    }

    /// The destination an authority names; `default_port` when it has none.
    pub fn from_authority(a: &http::uri::Authority, default_port: u16) -> DestKey {
        let port = a.port_u16().unwrap_or(default_port);
        // The host as written, without the port: `Authority::host` cuts a host with a
        // stray bracket (`x[fd00::1]:80`, which `http` accepts) at its first colon.
        let host_port = a.as_str().rsplit('@').next().unwrap_or_default();
        let host = a
            .port()
            .and_then(|p| host_port.strip_suffix(p.as_str()))
            .and_then(|h| h.strip_suffix(':'))
            .unwrap_or(host_port);
        // Trailing dots go before anything else, as they go from names: `10.0.0.1.`
        // names the address as `10.0.0.1` does (WHATWG's host parser reads one trailing
        // dot so), not a name that would show as the address and so name something
        // else when read back.
        let host = host.trim_end_matches('.');
        let unbracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        match unbracketed.unwrap_or(host).parse::<IpAddr>() {
            Ok(ip) => DestKey::Addr(SocketAddr::new(ip, port)),
            // A bracketed host that is no address (`[fd00::1%25eth0]`, a typo) keeps its
            // brackets, so that the name shows as an authority that names it again.
            Err(_) => DestKey::Name {
                host: host.to_ascii_lowercase(),
                port,
            },
        }
    }

    /// The destination of a connection that carries no authority: where it was going.
    pub fn orig_dst(orig: OrigDstAddr) -> DestKey {
        DestKey::Addr(orig.addr())
    }
}

impl fmt::Display for DestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DestKey::Name { host, port } => write!(f, "{host}:{port}"),
            DestKey::Addr(a) => write!(f, "{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_authority_whose_port_is_no_number_names_no_destination() {
        for bad in [
            "api.demo:dest8",
            "api.demo:t43",
            "1.2.3.4:x",
            "api.demo:80:80",
            ":",
            ":80",
            "api.demo:",
            ".",
            "..:80",
            "[fd05@:]0:8080",
            "[fd05@,]080",
            "a]b",
            "a[b",
            "[[a]]",
        ] {
            assert!(DestKey::parse(bad).is_err(), "{bad}");
        }
        for good in [
            "api.demo",
            "api.demo:8080",
            "[fd00::1]",
            "[fd00::1]:80",
            "1.2.3.4:80",
        ] {
            let key = DestKey::parse(good).unwrap();
            assert_eq!(DestKey::parse(&key.to_string()), Ok(key), "{good}");
        }
    }

    #[test]
    fn destination_keys_normalize() {
        assert_eq!(
            DestKey::parse("API.Demo").unwrap(),
            DestKey::Name {
                host: "api.demo".into(),
                port: 80
            }
        );
        assert_eq!(
            DestKey::parse("api.demo.:8080").unwrap().to_string(),
            "api.demo:8080"
        );
        assert_eq!(
            DestKey::parse("10.0.0.1:5432").unwrap(),
            DestKey::Addr("10.0.0.1:5432".parse().unwrap())
        );
        assert_eq!(
            DestKey::parse("[fd00::1]:80").unwrap(),
            DestKey::Addr("[fd00::1]:80".parse().unwrap())
        );
        assert!(DestKey::parse("a b").is_err());
    }

    /// Found by fuzzing (destinations, 309 s into its hour): `10.0.0.1.:5432` was a name
    /// that showed as `10.0.0.1:5432`, which read back is the address: a policy file
    /// written from what the proxy showed named another destination.
    #[test]
    fn an_address_with_a_trailing_dot_is_the_address() {
        for (text, addr) in [
            ("10.0.0.1.:5432", "10.0.0.1:5432"),
            ("10.0.0.1..", "10.0.0.1:80"),
            ("[fd00::5].:8080", "[fd00::5]:8080"),
        ] {
            let key = DestKey::parse(text).unwrap();
            assert_eq!(key, DestKey::Addr(addr.parse().unwrap()), "{text}");
            assert_eq!(DestKey::parse(&key.to_string()), Ok(key), "{text}");
        }
    }

    /// Found by fuzzing: `[fz00::5]:8080` was named `fz00::5:8080`, which is no
    /// authority, so a policy file could not name what it showed.
    #[test]
    fn a_bracketed_host_that_is_no_address_shows_as_a_name_that_parses_back() {
        for text in ["[fz00::5]:8080", "[fe80::1%25eth0]:80", "[v1.x]"] {
            let key = DestKey::parse(text).unwrap();
            assert!(matches!(key, DestKey::Name { .. }), "{text}: {key:?}");
            assert_eq!(DestKey::parse(&key.to_string()), Ok(key), "{text}");
        }
    }

    /// Found by fuzzing (http_head): a request's `Host: ![fd00::5]:8080` went to a
    /// destination named `![fd00:8080`, which names something else.
    #[test]
    fn a_host_with_a_stray_bracket_is_named_as_written() {
        for (text, named) in [
            ("![fd00::5]:8080", "![fd00::5]:8080"),
            ("u@![fd00::5]", "![fd00::5]:80"),
        ] {
            let key = DestKey::parse(text).unwrap();
            assert_eq!(key.to_string(), named);
            assert_eq!(DestKey::parse(named), Ok(key), "{text}");
        }
    }
}
