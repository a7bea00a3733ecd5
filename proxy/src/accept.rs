//! Stage 1: accepting connections. Each accepted connection has its original
//! destination read (stage 2), its protocol detected (stage 3), and is then handed on:
//! another proxy's mTLS to `inbound`, HTTP to `http`, anything else to `opaque`.

use crate::addrs::{ClientAddr, Direction};
use crate::ctx::Ctx;
use crate::detect::{self, Detected, Protocol};
use crate::http::conn::{HttpConn, HttpVersion};
use crate::http::server;
use crate::inbound;
use crate::io::{AsTcp, Counted, Prefixed};
use crate::metrics::{ConnLabels, Limit};
use crate::opaque;
use crate::orig_dst::{self, OrigDst};
use crate::route::target::ConnTarget;
use crate::socket;
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

/// After an accept error (out of file descriptors, say), wait before trying again
/// rather than spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// One of a listener's connection slots, given back when the connection ends.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        let slot = Slot(open.clone());
        (open.fetch_add(1, Ordering::AcqRel) < max).then_some(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long the inbound side of an opaque port waits for a peer proxy's ClientHello. A
/// meshed client's proxy sends it at once; a plaintext client of a server-speaks-first
/// protocol is held back no longer than this.
const OPAQUE_MESH_DETECT: Duration = Duration::from_millis(200);

const STRICT_REFUSAL: &str = "this pod accepts only mTLS from the mesh (GOFE_INBOUND_MTLS=strict, or GOFE_INBOUND_AUTHORIZE set)";

/// Accepts on `listener` until the proxy drains. At GOFE_MAX_CONNECTIONS open
/// connections a new one is closed at once.
pub async fn accept_loop(listener: TcpListener, direction: Direction, ctx: Arc<Ctx>) {
    let open = Arc::new(AtomicUsize::new(0));
    let max = ctx.config.limits.max_connections;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = ctx.drain.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(slot) = Slot::take(&open, max) else {
                    ctx.metrics
                        .limit_tripped(Limit::Connections, direction.as_str());
                    debug!(%direction, %peer, max, "at the connection limit; closing");
                    socket::reset(&stream);
                    continue;
                };
                let ctx2 = ctx.clone();
                ctx.tasks.spawn(async move {
                    let _slot = slot;
                    handle(stream, ClientAddr::new(peer), direction, ctx2).await
                });
            }
            Err(error) => {
                ctx.metrics
                    .limit_tripped(Limit::AcceptErrors, direction.as_str());
                warn!(%direction, %error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
    info!(%direction, addr = ?listener.local_addr().ok(), "stopped accepting");
}

async fn handle(stream: TcpStream, client: ClientAddr, direction: Direction, ctx: Arc<Ctx>) {
    ctx.sockets.accepted(&stream);
    let target = match target(&stream, direction, &ctx) {
        Ok(t) => t,
        Err(reason) => {
            debug!(%client, %direction, reason, "refusing connection");
            socket::reset(&stream);
            return;
        }
    };
    let metrics = &ctx.metrics;
    let bytes = metrics.bytes(direction);
    let mut io = Counted::new(
        stream,
        bytes.client_to_server.clone(),
        bytes.server_to_client.clone(),
        metrics.open(direction).clone(),
    );
    // Inbound, where this proxy terminates the mesh's mTLS.
    let terminating = match direction {
        Direction::Inbound => ctx.inbound_policy.terminating().cloned(),
        Direction::Outbound => None,
    };
    let opaque_port = target
        .port()
        .is_some_and(|p| ctx.config.opaque_ports.contains(p));
    let detected = match (opaque_port, &terminating) {
        (true, None) => Detected {
            protocol: Protocol::Opaque,
            prefix: Bytes::new(),
            timed_out: false,
        },
        (true, Some(_)) => {
            // Only mesh TLS is looked for; anything else on an opaque port is opaque.
            let wait = OPAQUE_MESH_DETECT.min(ctx.config.detect_timeout);
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
        (false, _) => match detect::detect(&mut io, ctx.config.detect_timeout).await {
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
    let strict = terminating.is_some() && ctx.inbound_policy.refuses_plaintext();
    let version = match (detected.protocol, terminating) {
        (Protocol::Tls { mesh: true, .. }, Some(identity)) => {
            return inbound::tls::terminate(io, &identity, client, target, ctx).await;
        }
        (Protocol::Http1, _) => HttpVersion::Http1,
        (Protocol::Http2, _) => HttpVersion::Http2,
        (Protocol::Tls { .. } | Protocol::Opaque, _) => {
            if strict {
                debug!(%client, "refusing a connection without mesh mTLS (strict inbound)");
                socket::reset(io.as_tcp());
                return;
            }
            if target == ConnTarget::Explicit {
                debug!(%client, "explicit proxy connection is not HTTP; closing");
                return;
            }
            return opaque::forward(io, client, target, &ctx).await;
        }
    };
    let conn = HttpConn::new(ctx.clone(), direction, client, target, version)
        .refusing(strict.then(|| STRICT_REFUSAL.to_string()));
    server::serve(io, version, Arc::new(conn)).await;
}

/// Where a newly accepted connection goes, or why it is refused.
fn target(stream: &TcpStream, direction: Direction, ctx: &Ctx) -> Result<ConnTarget, &'static str> {
    match orig_dst::original_dst(ctx.sockets.as_ref(), stream) {
        Ok(OrigDst::Redirected(orig)) => {
            if ctx.client.connector().tcp().is_own(orig.addr()) {
                return Err("its original destination is one of this proxy's own listeners");
            }
            Ok(ConnTarget::redirected(
                direction,
                orig,
                ctx.config.inbound_target,
            ))
        }
        Ok(OrigDst::Direct) => match direction {
            Direction::Outbound => Ok(ConnTarget::Explicit),
            Direction::Inbound => ctx
                .config
                .inbound_direct_target
                .map(|t| ConnTarget::Inbound {
                    app: crate::addrs::EndpointAddr::new(t),
                    orig_dst: None,
                })
                .ok_or("it reached the inbound listener without a redirect and GOFE_INBOUND_DIRECT_TARGET is unset"),
        },
        Err(_) => Err("its original destination could not be read"),
    }
}
