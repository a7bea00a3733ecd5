//! Stage 2: the original destination of an accepted connection. A connection that
//! iptables redirected to one of the proxy's listeners has one (the socket factory
//! reads it from conntrack); one that connected to the listener's own address was not
//! redirected.

use crate::addrs::OrigDstAddr;
use crate::socket::SocketFactory;
use std::io;
use std::net::{IpAddr, SocketAddr};
use tokio::net::TcpStream;

/// What the kernel says about where an accepted connection was going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrigDst {
    /// Redirected by iptables from this destination.
    Redirected(OrigDstAddr),
    /// Not redirected: the client connected to the listener's own address.
    Direct,
}

/// Reads the original destination of `stream`, accepted on a listener.
pub fn original_dst(sockets: &dyn SocketFactory, stream: &TcpStream) -> io::Result<OrigDst> {
    let local = stream.local_addr()?;
    Ok(match sockets.original_dst(stream)? {
        Some(orig) => classify(normalize(orig), normalize(local)),
        None => OrigDst::Direct,
    })
}

fn classify(orig: SocketAddr, local: SocketAddr) -> OrigDst {
    if orig == local {
        OrigDst::Direct
    } else {
        OrigDst::Redirected(OrigDstAddr::new(orig))
    }
}

/// `::ffff:10.0.0.1` and `10.0.0.1` are the same destination.
fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::HostSockets;

    #[test]
    fn same_address_means_not_redirected() {
        let local: SocketAddr = "127.0.0.1:4140".parse().unwrap();
        assert_eq!(classify(local, local), OrigDst::Direct);
        let orig: SocketAddr = "10.0.0.7:80".parse().unwrap();
        assert_eq!(
            classify(orig, local),
            OrigDst::Redirected(OrigDstAddr::new(orig))
        );
    }

    #[test]
    fn mapped_v4_is_plain_v4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(normalize(mapped), "10.1.2.3:80".parse().unwrap());
    }

    #[tokio::test]
    async fn unredirected_loopback_connection_is_direct() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(original_dst(&HostSockets, &s).unwrap(), OrigDst::Direct);
    }
}
