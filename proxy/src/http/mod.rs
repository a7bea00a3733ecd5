//! HTTP: an accepted connection served with hyper (HTTP/1.x with upgrades, or HTTP/2),
//! each request forwarded by `forward`, and the connection drained gracefully when the
//! proxy shuts down.

pub mod body;
mod errors;
mod forward;
pub mod headers;
pub mod mesh;
mod observe;
mod upgrade;
mod upstream;

/// The port an authority without one means, for plain HTTP.
const HTTP_PORT: u16 = 80;

use crate::State;
use crate::addrs::{ClientAddr, Direction, EndpointAddr};
use crate::destination::{ConnTarget, Destination};
use crate::discovery::DestKey;
use crate::endpoint::HttpVersion;
use crate::io::Io;
use crate::metrics::{RequestLabels, RequestStats};
use gofe_identity::SpiffeId;
use http::uri::Authority;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use std::convert::Infallible;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// The labels that pick a connection's last request counters.
type StatsKey = (Arc<str>, Option<Arc<SpiffeId>>);

/// One accepted HTTP connection: where its requests go and the metrics they count in.
pub(crate) struct HttpConn {
    pub state: Arc<State>,
    pub direction: Direction,
    pub client: ClientAddr,
    pub target: ConnTarget,
    /// The mesh identity of the client, for an inbound connection over mTLS.
    pub peer: Option<Arc<SpiffeId>>,
    /// Why requests on this connection are refused (inbound policy), if they are.
    pub refused: Option<String>,
    /// The stats of the last authority and peer seen: a connection's requests nearly
    /// always share them, so the metrics family is crossed once per connection.
    last_stats: Mutex<Option<(StatsKey, Arc<RequestStats>)>>,
    /// Likewise the destination of the last authority (outbound).
    last_destination: Mutex<Option<(Option<Authority>, Arc<Destination>)>>,
}

impl HttpConn {
    pub fn new(
        state: Arc<State>,
        direction: Direction,
        client: ClientAddr,
        target: ConnTarget,
    ) -> Self {
        Self {
            state,
            direction,
            client,
            target,
            peer: None,
            refused: None,
            last_stats: Mutex::new(None),
            last_destination: Mutex::new(None),
        }
    }

    /// The destination a request to `authority` goes to: the authority's when it has
    /// one, else the original destination's (`fallback`).
    fn destination(
        &self,
        authority: Option<&Authority>,
        fallback: Option<EndpointAddr>,
    ) -> Arc<Destination> {
        let mut last = self.last_destination.lock();
        if let Some((a, d)) = last.as_ref()
            && a.as_ref() == authority
            && !d.is_removed()
        {
            d.touch();
            return d.clone();
        }
        let key = match (authority, fallback) {
            // An authority without a port means the port the application connected to
            // (80 for an explicit proxy request).
            (Some(a), _) => DestKey::from_authority(a, fallback.map_or(HTTP_PORT, |f| f.0.port())),
            (None, Some(f)) => DestKey::Addr(f.0),
            (None, None) => {
                unreachable!("an explicit proxy request without authority is refused earlier")
            }
        };
        let d = self.state.destinations.get(key);
        *last = Some((authority.cloned(), d.clone()));
        d
    }

    pub fn with_peer(mut self, peer: Option<Arc<SpiffeId>>) -> Self {
        self.peer = peer;
        self
    }

    pub fn refusing(mut self, reason: Option<String>) -> Self {
        self.refused = reason;
        self
    }

    /// The request counters for a request to `authority` (the original destination
    /// when the request has none) over a connection whose far side is `peer` (mTLS)
    /// or unauthenticated.
    fn stats(
        &self,
        authority: Option<&Authority>,
        peer: Option<&Arc<SpiffeId>>,
    ) -> Arc<RequestStats> {
        let fallback;
        let label = match authority {
            Some(a) => a.as_str(),
            None => {
                fallback = self
                    .target
                    .orig_dst()
                    .map(|o| o.to_string())
                    .unwrap_or_default();
                fallback.as_str()
            }
        };
        let mut last = self.last_stats.lock();
        if let Some(((a, p), s)) = last.as_ref()
            && a.as_ref() == label
            && p.as_ref() == peer
        {
            return s.clone();
        }
        let label: Arc<str> = label.into();
        let stats = self.state.metrics.requests.get(&RequestLabels {
            direction: self.direction,
            authority: label.clone(),
            tls: peer.is_some(),
            peer_identity: peer
                .map(|p| Arc::from(p.to_string()))
                .unwrap_or_else(|| Arc::from("")),
        });
        *last = Some(((label, peer.cloned()), stats.clone()));
        stats
    }
}

/// Serves HTTP on `io` until the client closes it or the proxy drains.
pub(crate) async fn serve<I: Io>(io: I, version: HttpVersion, conn: Arc<HttpConn>) {
    let drain = conn.state.drain.clone();
    let client = conn.client;
    let svc = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(forward::forward(conn, req).await) }
    });
    let io = TokioIo::new(io);
    let result = match version {
        HttpVersion::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // A proxy passes the origin's Date on; it does not invent one.
                .auto_date_header(false)
                .serve_connection(io, svc)
                .with_upgrades();
            drive(pin!(conn), &drain, |c| c.graceful_shutdown()).await
        }
        HttpVersion::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .auto_date_header(false)
                .serve_connection(io, svc);
            drive(pin!(conn), &drain, |c| c.graceful_shutdown()).await
        }
    };
    if let Err(error) = result {
        debug!(%client, %error, "HTTP connection ended with an error");
    }
}

/// Runs a hyper connection; when the proxy drains, asks it to finish what is in flight
/// and stop (HTTP/1: close after the current response; HTTP/2: GOAWAY).
async fn drive<F: Future<Output = hyper::Result<()>>>(
    mut conn: Pin<&mut F>,
    drain: &CancellationToken,
    graceful: impl FnOnce(Pin<&mut F>),
) -> hyper::Result<()> {
    tokio::select! {
        res = conn.as_mut() => res,
        _ = drain.cancelled() => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}
