//! Two connections joined byte for byte until each side has closed, a half-close passed
//! on as a half-close (inside mesh TLS, as close_notify plus FIN). A failure is passed
//! on as a failure: both peers see a reset, not an orderly end.

use crate::io::AsTcp;
use crate::socket;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// Per-direction copy buffer: large enough for bulk transfers, small enough that many
/// idle connections stay cheap.
const COPY_BUFFER: usize = 16 * 1024;

/// Copies between `client` and `server` until both have closed: the bytes each way.
pub async fn copy<A, B>(client: &mut A, server: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + AsTcp + Unpin,
    B: AsyncRead + AsyncWrite + AsTcp + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(client, server, COPY_BUFFER, COPY_BUFFER).await {
        Ok(counts) => Ok(counts),
        Err(error) => {
            socket::reset(client.as_tcp());
            socket::reset(server.as_tcp());
            Err(error)
        }
    }
}

/// Joins two streams whose sockets are hyper's (an upgrade's two sides), where a reset
/// cannot be asked for.
pub async fn join<A, B>(mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(error) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
        debug!(%error, "tunnel ended with an error");
    }
}
