//! Addresses that must not be confused with one another: the application's original
//! destination, the connecting client, and the endpoint the proxy connects to are all
//! socket addresses, and the compiler keeps them apart.

use std::fmt;
use std::net::SocketAddr;

macro_rules! addr_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub SocketAddr);

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
