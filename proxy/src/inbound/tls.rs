//! Terminating another proxy's mTLS: the handshake (the verifier checks the peer's
//! chain and trust domain), the peer's identity checked against
//! GOFE_INBOUND_AUTHORIZE, then what the connection carries by its ALPN: HTTP/2 (or
//! HTTP/1.1 for upgrades) from the peer's applications, or an opaque stream.

use crate::addrs::{ClientAddr, Direction};
use crate::ctx::Ctx;
use crate::detect::{self, Protocol};
use crate::http::conn::{HttpConn, HttpVersion};
use crate::http::server;
use crate::identity::ProxyIdentity;
use crate::io::{AsTcp, Io, Prefixed};
use crate::opaque;
use crate::route::target::ConnTarget;
use crate::socket;
use bytes::Bytes;
use gofe_identity::tls::{ALPN_H2, ALPN_HTTP1, ALPN_TCP};
use std::sync::Arc;
use tracing::debug;

pub async fn terminate<I: Io>(
    io: I,
    identity: &ProxyIdentity,
    client: ClientAddr,
    target: ConnTarget,
    ctx: Arc<Ctx>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.tls.server_config());
    let handshake = tokio::time::timeout(ctx.config.detect_timeout, acceptor.accept(io)).await;
    let tls = match handshake {
        Ok(Ok(tls)) => {
            ctx.metrics.tls_handshake(Direction::Inbound, "ok");
            tls
        }
        Ok(Err(error)) => {
            ctx.metrics.tls_handshake(Direction::Inbound, "error");
            debug!(%client, %error, "mTLS handshake failed");
            return;
        }
        Err(_) => {
            ctx.metrics.tls_handshake(Direction::Inbound, "error");
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
    let refused = ctx.inbound_policy.refuse(&peer);
    let version = match alpn.as_deref() {
        Some(ALPN_H2) => HttpVersion::Http2,
        Some(ALPN_HTTP1) => HttpVersion::Http1,
        Some(ALPN_TCP) => {
            if let Some(reason) = refused {
                debug!(%client, %peer, reason, "refusing an opaque mTLS stream");
                socket::reset(tls.as_tcp());
                return;
            }
            let ConnTarget::Inbound { app, .. } = target else {
                return;
            };
            // The far proxy found no protocol it knew, or its port was opaque there; here,
            // on a port that is not opaque, HTTP is served as HTTP so that its headers
            // (gofe-client-id among them) are handled like any other request's.
            let mut tls = tls;
            let detected = if ctx.config.opaque_ports.contains(app.port()) {
                None
            } else {
                match detect::detect(&mut tls, ctx.config.detect_timeout).await {
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
                _ => return opaque::forward(io, client, target, &ctx).await,
            };
            let conn = HttpConn::new(ctx.clone(), Direction::Inbound, client, target, version)
                .with_peer(Some(peer));
            return server::serve(io, version, Arc::new(conn)).await;
        }
        _ => {
            debug!(%client, "mTLS without a mesh protocol; closing");
            return;
        }
    };
    let conn = HttpConn::new(ctx.clone(), Direction::Inbound, client, target, version)
        .with_peer(Some(peer))
        .refusing(refused);
    server::serve(tls, version, Arc::new(conn)).await;
}
