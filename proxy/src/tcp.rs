//! Opaque TCP: bytes copied both ways until each side has closed, a half-close passed
//! on as a half-close (inside mesh TLS, as close_notify plus FIN). An endpoint that
//! cannot be reached, or a connection that fails, is answered with a reset so the
//! client knows at once.

use crate::State;
use crate::addrs::{Direction, EndpointAddr};
use crate::io::Io;
use crate::socket;
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
    let mut server = match state.connect_stream(direction, endpoint).await {
        Ok((s, _peer)) => s,
        Err(error) => {
            state.metrics.connect_error(direction, error.reason());
            debug!(%endpoint, %error, "opaque connection failed; resetting the client");
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
