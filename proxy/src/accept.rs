//! Accepting connections: each accepted connection has its original destination read,
//! its protocol detected, and is then served as HTTP or forwarded as opaque TCP.

use crate::State;
use crate::addrs::{ClientAddr, Direction, EndpointAddr};
use crate::destination::ConnTarget;
use crate::detect::{self, Detected, Protocol};
use crate::endpoint::HttpVersion;
use crate::http::{self, HttpConn};
use crate::io::{Counted, Prefixed};
use crate::metrics::ConnLabels;
use crate::orig_dst::{self, OrigDst};
use crate::{socket, tcp};
use bytes::Bytes;
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

    let opaque_port = match target {
        ConnTarget::Endpoint { endpoint, .. } => {
            state.config.opaque_ports.contains(endpoint.0.port())
        }
        ConnTarget::Explicit => false,
    };
    let detected = if opaque_port {
        Detected {
            protocol: Protocol::Opaque,
            prefix: Bytes::new(),
            timed_out: false,
        }
    } else {
        match detect::detect(&mut io, state.config.detect_timeout).await {
            Ok(d) => d,
            Err(error) => {
                debug!(%client, %error, "connection failed during protocol detection");
                return;
            }
        }
    };
    if detected.timed_out {
        debug!(%client, "no protocol detected before the timeout; forwarding opaquely");
    }
    let server_name = match &detected.protocol {
        Protocol::Tls {
            server_name: Some(n),
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
    let version = match detected.protocol {
        Protocol::Http1 => HttpVersion::Http1,
        Protocol::Http2 => HttpVersion::Http2,
        Protocol::Tls { .. } | Protocol::Opaque => {
            match target {
                ConnTarget::Endpoint { endpoint, .. } => {
                    tcp::forward(io, endpoint, direction, &state).await
                }
                ConnTarget::Explicit => {
                    debug!(%client, "explicit proxy connection is not HTTP; closing");
                }
            }
            return;
        }
    };
    let conn = Arc::new(HttpConn::new(state.clone(), direction, client, target));
    http::serve(io, version, conn).await;
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
