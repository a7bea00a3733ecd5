//! Every socket the proxy uses comes from the `SocketFactory`: listeners, upstream
//! connections, and the options every proxied connection gets. Nothing else in the
//! proxy creates sockets.

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Keep-alive probes find peers that vanished without a FIN (a node lost, a NAT entry
/// expired) long before the kernel's two-hour default would.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// A burst of connections waits in the kernel rather than being refused.
const LISTEN_BACKLOG: i32 = 1024;

#[derive(Clone, Debug, Default)]
pub struct SocketFactory {}

impl SocketFactory {
    pub fn new() -> Self {
        Self {}
    }

    /// A listening socket. IPv6 listeners are IPv6-only so that a `0.0.0.0` and a `[::]`
    /// listener can share a port.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        TcpListener::from_std(socket.into())
    }

    /// Options for a connection the proxy accepted.
    pub fn accepted(&self, stream: &TcpStream) {
        configure(stream);
    }

    /// Connects to `addr`. The caller applies the timeout.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        let stream = socket.connect(addr).await?;
        configure(&stream);
        Ok(stream)
    }
}

fn configure(stream: &TcpStream) {
    // Proxied request/response traffic is latency-bound: never wait to coalesce.
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Closes a connection with a reset rather than a FIN, so that the peer learns at once
/// that the connection failed rather than that it ended.
pub fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Whether `ip` is an address of this host (in this network namespace): only a local
/// address can be bound.
pub fn is_local_ip(ip: std::net::IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}
