//! What every connection of one proxy shares: the settings, the handles of the stages
//! below (destinations, inbound routes, the client and its connector, the proxy's
//! identity), telemetry, and the signals of its life (ready, draining, shutdown). No
//! behaviour of its own.

use crate::addrs::Direction;
use crate::client::send::Client;
use crate::config::Config;
use crate::identity::ProxyIdentity;
use crate::inbound::authorize::InboundPolicy;
use crate::metrics::Metrics;
use crate::route::destinations::Destinations;
use crate::route::inbound::InboundRoutes;
use crate::socket::SocketFactory;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A request to stop: set by SIGTERM or `POST /shutdown`, after which the proxy stops
/// accepting, lets what is in flight finish within the grace period, and returns.
#[derive(Clone, Debug, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    pub fn trigger(&self) {
        self.0.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    pub async fn requested(&self) {
        self.0.cancelled().await
    }
}

pub struct Ctx {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub sockets: Arc<dyn SocketFactory>,
    pub client: Arc<Client>,
    /// Outbound destinations: their endpoints, balancers, policy and stacks.
    pub destinations: Arc<Destinations>,
    pub inbound: InboundRoutes,
    pub inbound_policy: InboundPolicy,
    /// The proxy's identity; None when identity is disabled.
    pub identity: Option<Arc<ProxyIdentity>>,
    /// Spans of requests; None without a collector.
    pub tracer: Option<gofe_telemetry::trace::Tracer>,
    /// The process's log filter, for `/log-level`.
    pub log: OnceLock<gofe_telemetry::logs::LogHandle>,
    /// Cancelled when draining starts: listeners stop, HTTP connections wind down.
    pub drain: CancellationToken,
    /// Every connection and tunnel, so that draining can wait for them.
    pub tasks: TaskTracker,
    /// Set once the listeners run.
    pub listening: AtomicBool,
    pub shutdown: Shutdown,
}

impl Ctx {
    /// Listening, and (with identity) holding a current certificate.
    pub fn is_ready(&self) -> bool {
        self.listening.load(Ordering::Acquire)
            && self.identity.as_ref().is_none_or(|i| i.is_ready())
    }

    /// Whether connections on `direction` are the mesh's to terminate (inbound mTLS).
    pub fn terminates_mtls(&self, direction: Direction) -> bool {
        direction == Direction::Inbound && self.inbound_policy.terminating().is_some()
    }
}
