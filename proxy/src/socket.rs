//! Leaf: every socket the proxy uses comes from a `SocketFactory`: listeners, endpoint
//! connections, the options every proxied connection gets, and what the kernel says a
//! redirected connection's original destination was. Production binds plain sockets on
//! the host (`HostSockets`); tests substitute a factory of their own (one that hands out
//! a fixed original destination, say), and nothing else in the proxy knows the
//! difference.

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>>;

pub trait SocketFactory: Send + Sync + 'static {
    /// A listening socket.
    fn bind(&self, addr: SocketAddr) -> io::Result<TcpListener>;

    /// Applies the options every accepted connection gets.
    fn accepted(&self, stream: &TcpStream);

    /// Connects to `addr` (the caller applies the timeout).
    fn connect(&self, addr: SocketAddr) -> Connecting<'_>;

    /// Where an accepted connection was going before a redirect brought it here; None
    /// when nothing redirected it.
    fn original_dst(&self, stream: &TcpStream) -> io::Result<Option<SocketAddr>>;
}

/// Keep-alive probes find peers that vanished without a FIN (a node lost, a NAT entry
/// expired) long before the kernel's two-hour default would.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// A burst of connections waits in the kernel rather than being refused.
const LISTEN_BACKLOG: i32 = 1024;

/// The host's sockets, as production uses them.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostSockets;

impl SocketFactory for HostSockets {
    /// IPv6 listeners are IPv6-only so that a `0.0.0.0` and a `[::]` listener can share
    /// a port.
    fn bind(&self, addr: SocketAddr) -> io::Result<TcpListener> {
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

    fn accepted(&self, stream: &TcpStream) {
        configure(stream);
    }

    fn connect(&self, addr: SocketAddr) -> Connecting<'_> {
        Box::pin(async move {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            let stream = socket.connect(addr).await?;
            configure(&stream);
            Ok(stream)
        })
    }

    /// From conntrack, with `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6);
    /// socket2 wraps both getsockopts, so no unsafe code is needed here.
    fn original_dst(&self, stream: &TcpStream) -> io::Result<Option<SocketAddr>> {
        let local = stream.local_addr()?;
        let sock = SockRef::from(stream);
        let v4 = match local.ip() {
            IpAddr::V4(_) => true,
            IpAddr::V6(ip) => ip.to_ipv4_mapped().is_some(),
        };
        let result = if v4 {
            sock.original_dst_v4()
        } else {
            sock.original_dst_v6()
        };
        match result {
            Ok(addr) => addr.as_socket().map(Some).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "original destination is not an IP address",
                )
            }),
            // No conntrack entry: nothing redirected this connection.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
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
pub fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}
