//! Opaque TCP: bytes copied both ways until each side has closed, a half-close passed
//! on as a half-close (inside mesh TLS, as close_notify plus FIN). An endpoint that
//! cannot be reached, or a connection that fails, is answered with a reset so the
//! client knows at once.

use crate::State;
use crate::addrs::{ClientAddr, Direction, EndpointAddr};
use crate::destination::PickError;
use crate::discovery::DestKey;
use crate::endpoint::ConnectError;
use crate::io::Io;
use crate::socket;
use gofe_identity::SpiffeId;
use tracing::debug;

/// Per-direction copy buffer: large enough for bulk transfers, small enough that many
/// idle connections stay cheap.
const COPY_BUFFER: usize = 16 * 1024;

pub(crate) async fn forward<I: Io>(
    client: I,
    client_addr: ClientAddr,
    endpoint: EndpointAddr,
    direction: Direction,
    state: &State,
) {
    let started = (std::time::SystemTime::now(), std::time::Instant::now());
    let outcome = copy(client, endpoint, direction, state).await;
    if state.config.access_log {
        let mut entry = serde_json::json!({
            "timestamp": gofe_telemetry::access::timestamp(started.0),
            "direction": direction.as_str(),
            "client": client_addr.to_string(),
            "endpoint": endpoint.to_string(),
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

/// Copies until both sides have closed: the bytes each way, or what went wrong.
async fn copy<I: Io>(
    mut client: I,
    endpoint: EndpointAddr,
    direction: Direction,
    state: &State,
) -> Result<(u64, u64), String> {
    let connect = |addr: EndpointAddr, expected: Option<SpiffeId>| async move {
        let r = state
            .connect_stream(direction, addr, expected.as_ref())
            .await;
        if let Err(e) = &r {
            state.metrics.connect_error(direction, e.reason());
        }
        r
    };
    let connected = match direction {
        // Inbound goes to the application.
        Direction::Inbound => connect(endpoint, None).await.map_err(PickError::Failed),
        // Outbound, the original destination is the destination: its endpoints come
        // from discovery (a file may list them), else it is its own one endpoint.
        Direction::Outbound => {
            let dest = state.destinations.get(DestKey::Addr(endpoint.0));
            dest.connect(
                &state.metrics,
                Some(endpoint),
                |_: &ConnectError| true,
                |ep| connect(ep.addr, ep.identity.clone()),
            )
            .await
        }
    };
    let mut server = match connected {
        Ok((s, _peer)) => s,
        Err(error) => {
            debug!(%endpoint, ?error, "opaque connection failed; resetting the client");
            socket::reset(client.as_tcp());
            return Err(format!("{error:?}"));
        }
    };
    match tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut server,
        COPY_BUFFER,
        COPY_BUFFER,
    )
    .await
    {
        Ok((sent, received)) => {
            debug!(%endpoint, sent, received, "opaque connection closed");
            Ok((sent, received))
        }
        Err(error) => {
            // Pass a failure on as a failure: both peers see a reset, not an orderly end.
            debug!(%endpoint, %error, "opaque connection failed");
            socket::reset(client.as_tcp());
            socket::reset(crate::io::AsTcp::as_tcp(&server));
            Err(error.to_string())
        }
    }
}
