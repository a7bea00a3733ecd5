//! Opaque TCP: a connection that is not HTTP (or is on an opaque port) goes to one
//! endpoint (inbound, the application; outbound, an endpoint of its original
//! destination, through the destination's connection stack) and bytes are copied both
//! ways until each side has closed. An endpoint that cannot be reached is answered with
//! a reset, so the client knows at once.

use crate::addrs::{ClientAddr, DestKey, Direction, EndpointAddr};
use crate::call::{Call, ConnectTo};
use crate::connect::connector::Connected;
use crate::ctx::Ctx;
use crate::forward::tunnel::{self, Ended};
use crate::io::Io;
use crate::metrics::Limit;
use crate::route::target::ConnTarget;
use crate::socket;
use gofe_identity::tls::ALPN_TCP;
use tower::ServiceExt;
use tracing::debug;

pub async fn forward<I: Io>(mut client: I, client_addr: ClientAddr, target: ConnTarget, ctx: &Ctx) {
    let started = (std::time::SystemTime::now(), std::time::Instant::now());
    let connected = connect(target, ctx).await;
    let (endpoint, outcome) = match connected {
        Ok((endpoint, Connected { io: mut server, .. })) => {
            let idle = ctx.config.limits.tcp_idle_timeout;
            let copied = match tunnel::copy(&mut client, &mut server, idle).await {
                Ended::Closed(sent, received) => {
                    debug!(%endpoint, sent, received, "opaque connection closed");
                    Ok((sent, received))
                }
                Ended::Idle => {
                    let at = direction_of(target).as_str();
                    ctx.metrics.limit_tripped(Limit::TcpIdle, at);
                    debug!(%endpoint, ?idle, "opaque connection idle; closed");
                    Err(format!(
                        "no bytes either way for {idle:?} (GOFE_TCP_IDLE_TIMEOUT)"
                    ))
                }
                Ended::Failed(error) => {
                    debug!(%endpoint, %error, "opaque connection failed");
                    Err(error.to_string())
                }
            };
            (Some(endpoint), copied)
        }
        Err(error) => {
            debug!(?target, %error, "opaque connection failed; resetting the client");
            socket::reset(client.as_tcp());
            (None, Err(error))
        }
    };
    if ctx.config.access_log {
        let direction = direction_of(target);
        let mut entry = serde_json::json!({
            "timestamp": gofe_telemetry::access::timestamp(started.0),
            "direction": direction.as_str(),
            "client": client_addr.to_string(),
            "endpoint": endpoint.or_else(|| aimed_at(target)).map(|e| e.to_string()),
            "protocol": "tcp",
            "duration_ms": started.1.elapsed().as_secs_f64() * 1e3,
        });
        if let Some(fields) = entry.as_object_mut() {
            match &outcome {
                Ok((sent, received)) => {
                    fields.insert("bytes_from_client".into(), (*sent).into());
                    fields.insert("bytes_to_client".into(), (*received).into());
                }
                // (The copy does not say how far it got before it failed.)
                Err(e) => {
                    fields.insert("error".into(), e.as_str().into());
                }
            }
        }
        gofe_telemetry::access::write(&entry);
    }
}

/// The connection to the endpoint, or why there is none.
async fn connect(target: ConnTarget, ctx: &Ctx) -> Result<(EndpointAddr, Connected), String> {
    match target {
        // Inbound goes to the application.
        ConnTarget::Inbound { app, .. } => ctx
            .client
            .connector()
            .connect(Direction::Inbound, app, None, ALPN_TCP)
            .await
            .map(|c| (app, c))
            .map_err(|e| e.to_string()),
        // Outbound, the original destination is the destination: its endpoints come
        // from discovery (a file may list them), else it is its own one endpoint.
        ConnTarget::Outbound(orig) => {
            let dest = ctx.destinations.get(DestKey::orig_dst(orig));
            let call = Call::new(ConnectTo { alpn: ALPN_TCP }).with_orig_dst(Some(orig));
            let a = dest
                .connect_stack()
                .oneshot(call)
                .await
                .map_err(|e| e.to_string())?;
            let endpoint = a.endpoint.unwrap_or(orig.as_endpoint());
            Ok((endpoint, a.value))
        }
        ConnTarget::Explicit => Err("an explicit proxy connection is not HTTP".into()),
    }
}

fn direction_of(target: ConnTarget) -> Direction {
    match target {
        ConnTarget::Inbound { .. } => Direction::Inbound,
        _ => Direction::Outbound,
    }
}

/// Where a connection was aimed, before an endpoint was picked.
fn aimed_at(target: ConnTarget) -> Option<EndpointAddr> {
    match target {
        ConnTarget::Inbound { app, .. } => Some(app),
        ConnTarget::Outbound(orig) => Some(orig.as_endpoint()),
        ConnTarget::Explicit => None,
    }
}
