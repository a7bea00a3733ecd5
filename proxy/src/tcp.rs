//! Opaque TCP: bytes copied both ways until each side has closed, a half-close passed
//! on as a half-close (inside mesh TLS, as close_notify plus FIN). An endpoint that
//! cannot be reached, or a connection that fails, is answered with a reset so the
//! client knows at once.

use crate::State;
use crate::addrs::{Direction, EndpointAddr};
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
    mut client: I,
    endpoint: EndpointAddr,
    direction: Direction,
    state: &State,
) {
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
            return;
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
        Ok((sent, received)) => debug!(%endpoint, sent, received, "opaque connection closed"),
        Err(error) => {
            // Pass a failure on as a failure: both peers see a reset, not an orderly end.
            debug!(%endpoint, %error, "opaque connection failed");
            socket::reset(client.as_tcp());
            socket::reset(crate::io::AsTcp::as_tcp(&server));
        }
    }
}
