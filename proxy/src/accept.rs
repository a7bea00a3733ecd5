//! Accepting connections: each accepted connection has its original destination read,
//! its protocol detected, and is then served as HTTP or forwarded as opaque TCP.

use crate::State;
use crate::addrs::{ClientAddr, Direction, EndpointAddr};
use crate::config::InboundMtls;
use crate::destination::ConnTarget;
use crate::detect::{self, Detected, Protocol};
use crate::endpoint::HttpVersion;
use crate::http::{self, HttpConn};
use crate::io::{AsTcp, Io};
use crate::io::{Counted, Prefixed};
use crate::mesh::Mesh;
use crate::metrics::ConnLabels;
use crate::orig_dst::{self, OrigDst};
use crate::{socket, tcp};
use bytes::Bytes;
use gofe_identity::tls::{ALPN_H2, ALPN_HTTP1, ALPN_TCP};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

/// After an accept error (out of file descriptors, say), wait before trying again
/// rather than spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts on `listener` until the proxy drains.
pub(crate) async fn accept_loop(listener: TcpListener, direction: Direction, state: Arc<State>) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = state.drain.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let state2 = state.clone();
                state
                    .tasks
                    .spawn(handle(stream, ClientAddr(peer), direction, state2));
            }
            Err(error) => {
                warn!(%direction, %error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
    info!(%direction, addr = ?listener.local_addr().ok(), "stopped accepting");
}

/// How long the inbound side of an opaque port waits for a peer proxy's ClientHello. A
/// meshed client's proxy sends it at once; a plaintext client of a server-speaks-first
/// protocol is held back no longer than this.
const OPAQUE_MESH_DETECT: Duration = Duration::from_millis(200);

const STRICT_REFUSAL: &str = "this pod accepts only mTLS from the mesh (GOFE_INBOUND_MTLS=strict, or GOFE_INBOUND_AUTHORIZE set)";

async fn handle(stream: TcpStream, client: ClientAddr, direction: Direction, state: Arc<State>) {
    state.sockets.accepted(&stream);
    let target = match target(&stream, direction, &state) {
        Ok(t) => t,
        Err(reason) => {
            debug!(%client, %direction, reason, "refusing connection");
            socket::reset(&stream);
            return;
        }
    };
    let metrics = &state.metrics;
    let bytes = metrics.bytes(direction);
    let mut io = Counted::new(
        stream,
        bytes.client_to_server.clone(),
        bytes.server_to_client.clone(),
        metrics.open(direction).clone(),
    );
    // Inbound, where this proxy terminates the mesh's mTLS.
    let mesh = match (direction, &state.mesh) {
        (Direction::Inbound, Some(m)) if m.inbound() != InboundMtls::Off => Some(m.clone()),
        _ => None,
    };

    let opaque_port = match target {
        ConnTarget::Endpoint { endpoint, .. } => {
            state.config.opaque_ports.contains(endpoint.0.port())
        }
        ConnTarget::Explicit => false,
    };
    let detected = match (opaque_port, &mesh) {
        (true, None) => Detected {
            protocol: Protocol::Opaque,
            prefix: Bytes::new(),
            timed_out: false,
        },
        (true, Some(_)) => {
            // Only mesh TLS is looked for; anything else on an opaque port is opaque.
            let wait = OPAQUE_MESH_DETECT.min(state.config.detect_timeout);
            match detect::detect(&mut io, wait).await {
                Ok(d) if matches!(d.protocol, Protocol::Tls { mesh: true, .. }) => d,
                Ok(d) => Detected {
                    protocol: Protocol::Opaque,
                    prefix: d.prefix,
                    timed_out: false,
                },
                Err(error) => {
                    debug!(%client, %error, "connection failed during protocol detection");
                    return;
                }
            }
        }
        (false, _) => match detect::detect(&mut io, state.config.detect_timeout).await {
            Ok(d) => d,
            Err(error) => {
                debug!(%client, %error, "connection failed during protocol detection");
                return;
            }
        },
    };
    if detected.timed_out {
        debug!(%client, "no protocol detected before the timeout; forwarding opaquely");
    }
    let server_name = match &detected.protocol {
        Protocol::Tls {
            server_name: Some(n),
            mesh: false,
        } => n.as_str(),
        _ => "",
    };
    metrics
        .connections
        .get(&ConnLabels {
            direction,
            protocol: detected.protocol.as_str(),
            server_name: server_name.into(),
        })
        .inc();

    let io = Prefixed::new(detected.prefix, io);
    // Plaintext has no identity to authorize: a list of allowed identities keeps it out
    // as strict mode does.
    let strict = mesh
        .as_ref()
        .is_some_and(|m| m.inbound() == InboundMtls::Strict || m.authorizes_a_list());
    let version = match (detected.protocol, mesh) {
        (Protocol::Tls { mesh: true, .. }, Some(mesh)) => {
            return terminate(io, mesh, client, target, state).await;
        }
        (Protocol::Http1, _) => HttpVersion::Http1,
        (Protocol::Http2, _) => HttpVersion::Http2,
        (Protocol::Tls { .. } | Protocol::Opaque, _) => {
            if strict {
                debug!(%client, "refusing a connection without mesh mTLS (strict inbound)");
                socket::reset(io.as_tcp());
                return;
            }
            match target {
                ConnTarget::Endpoint { endpoint, .. } => {
                    tcp::forward(io, client, endpoint, direction, &state).await
                }
                ConnTarget::Explicit => {
                    debug!(%client, "explicit proxy connection is not HTTP; closing");
                }
            }
            return;
        }
    };
    let conn = HttpConn::new(state.clone(), direction, client, target)
        .refusing(strict.then(|| STRICT_REFUSAL.to_string()));
    http::serve(io, version, Arc::new(conn)).await;
}

/// Terminates another proxy's mTLS and serves what it carries: HTTP/2 (or HTTP/1.1 for
/// upgrades) from its applications, or an opaque stream.
async fn terminate<I: Io>(
    io: I,
    mesh: Arc<Mesh>,
    client: ClientAddr,
    target: ConnTarget,
    state: Arc<State>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(mesh.tls.server_config());
    let tls = match tokio::time::timeout(state.config.detect_timeout, acceptor.accept(io)).await {
        Ok(Ok(tls)) => {
            state.metrics.tls_handshake(Direction::Inbound, "ok");
            tls
        }
        Ok(Err(error)) => {
            state.metrics.tls_handshake(Direction::Inbound, "error");
            debug!(%client, %error, "mTLS handshake failed");
            return;
        }
        Err(_) => {
            state.metrics.tls_handshake(Direction::Inbound, "error");
            debug!(%client, "mTLS handshake timed out");
            return;
        }
    };
    let (alpn, peer) = {
        let session = tls.get_ref().1;
        (
            session.alpn_protocol().map(<[u8]>::to_vec),
            gofe_identity::tls::peer_identity(session),
        )
    };
    // The verifier only accepts certificates that name a SPIFFE ID.
    let Some(peer) = peer.map(Arc::new) else {
        return;
    };
    let refused = mesh.refuse(&peer);
    let version = match alpn.as_deref() {
        Some(ALPN_H2) => HttpVersion::Http2,
        Some(ALPN_HTTP1) => HttpVersion::Http1,
        Some(ALPN_TCP) => {
            let endpoint = match (refused, target) {
                (Some(reason), _) => {
                    debug!(%client, %peer, reason, "refusing an opaque mTLS stream");
                    socket::reset(tls.as_tcp());
                    return;
                }
                (None, ConnTarget::Endpoint { endpoint, .. }) => endpoint,
                (None, ConnTarget::Explicit) => return,
            };
            // The far proxy found no protocol it knew, or its port was opaque there; here,
            // on a port that is not opaque, HTTP is served as HTTP so that its headers
            // (gofe-client-id among them) are handled like any other request's.
            let mut tls = tls;
            let detected = if state.config.opaque_ports.contains(endpoint.0.port()) {
                None
            } else {
                match detect::detect(&mut tls, state.config.detect_timeout).await {
                    Ok(d) => Some(d),
                    Err(_) => return,
                }
            };
            let (protocol, prefix) = match detected {
                Some(d) => (d.protocol, d.prefix),
                None => (Protocol::Opaque, Bytes::new()),
            };
            let io = Prefixed::new(prefix, tls);
            let version = match protocol {
                Protocol::Http1 => HttpVersion::Http1,
                Protocol::Http2 => HttpVersion::Http2,
                _ => return tcp::forward(io, client, endpoint, Direction::Inbound, &state).await,
            };
            let conn = HttpConn::new(state.clone(), Direction::Inbound, client, target)
                .with_peer(Some(peer));
            return http::serve(io, version, Arc::new(conn)).await;
        }
        _ => {
            debug!(%client, "mTLS without a mesh protocol; closing");
            return;
        }
    };
    let conn = HttpConn::new(state.clone(), Direction::Inbound, client, target)
        .with_peer(Some(peer))
        .refusing(refused);
    http::serve(tls, version, Arc::new(conn)).await;
}

/// Where a newly accepted connection goes, or why it is refused.
fn target(
    stream: &TcpStream,
    direction: Direction,
    state: &State,
) -> Result<ConnTarget, &'static str> {
    match orig_dst::original_dst(stream) {
        Ok(OrigDst::Redirected(orig)) => {
            if state.own.contains(orig.0) {
                return Err("its original destination is one of this proxy's own listeners");
            }
            Ok(ConnTarget::redirected(direction, orig))
        }
        Ok(OrigDst::Direct) => match direction {
            Direction::Outbound => Ok(ConnTarget::Explicit),
            Direction::Inbound => state
                .config
                .inbound_direct_target
                .map(|t| ConnTarget::Endpoint {
                    endpoint: EndpointAddr(t),
                    orig_dst: None,
                })
                .ok_or("it reached the inbound listener without a redirect and GOFE_INBOUND_DIRECT_TARGET is unset"),
        },
        Err(_) => Err("its original destination could not be read"),
    }
}
