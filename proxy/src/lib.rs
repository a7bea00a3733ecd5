//! gofe's data path. A connection is followed from top to bottom through one module per
//! stage: `accept` → `orig_dst` → `detect` → `destination` → `endpoint` → forwarded by
//! `http` or `tcp`. `Proxy` binds the listeners, runs them, and drains on shutdown.
#![forbid(unsafe_code)]

mod accept;
pub mod addrs;
mod admin;
pub mod balance;
pub mod config;
pub mod destination;
pub mod detect;
pub mod discovery;
pub mod endpoint;
pub mod http;
pub mod io;
pub mod mesh;
pub mod metrics;
pub mod orig_dst;
pub mod outlier;
pub mod policy;
pub mod socket;
mod tcp;

use addrs::{Direction, EndpointAddr};
use config::Config;
use destination::Destinations;
use endpoint::{ConnectError, Connector, HttpEndpoints, OwnListeners, Peer, Upstream};
use gofe_identity::SpiffeId;
use gofe_identity::tls::MeshTls;
use mesh::{Mesh, Outbound};
use metrics::Metrics;
use socket::SocketFactory;
use std::io as stdio;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

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

/// What every connection of one proxy shares.
pub(crate) struct State {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub sockets: SocketFactory,
    pub own: OwnListeners,
    pub http: HttpEndpoints,
    /// Outbound destinations: their endpoints, balancers and policy.
    pub destinations: Arc<Destinations>,
    /// Cancelled when draining starts: listeners stop, HTTP connections wind down.
    pub drain: CancellationToken,
    /// Every connection and tunnel, so that draining can wait for them.
    pub tasks: TaskTracker,
    pub ready: AtomicBool,
    pub shutdown: Shutdown,
    /// The proxy's identity and mTLS; None when identity is disabled.
    pub mesh: Option<Arc<Mesh>>,
    /// Spans of requests; None without a collector.
    pub tracer: Option<gofe_telemetry::trace::Tracer>,
    /// The process's log filter, for `/log-level`.
    pub log: std::sync::OnceLock<gofe_telemetry::logs::LogHandle>,
}

impl State {
    /// The mesh TLS to reach `endpoint` with (outbound to a peer that is, or may be,
    /// meshed), and whether plaintext may be tried when the peer does not answer it.
    pub fn outbound_tls(
        &self,
        direction: Direction,
        endpoint: EndpointAddr,
    ) -> (Option<&MeshTls>, bool) {
        match (direction, &self.mesh) {
            (Direction::Outbound, Some(m)) => match m.outbound(endpoint) {
                Outbound::Plaintext => (None, false),
                // Without a current certificate of its own, a proxy's handshakes fail
                // for its own reasons: auto mode goes plaintext this time, and learns
                // nothing about the peer from it.
                Outbound::TryMtls if !m.store.is_ready() => (None, false),
                Outbound::TryMtls => (Some(&m.tls), true),
                Outbound::RequireMtls => (Some(&m.tls), false),
            },
            _ => (None, false),
        }
    }

    /// Auto mode: `endpoint` did not answer mTLS, so it is reached in plaintext for a
    /// while.
    pub fn plaintext_from_now(&self, endpoint: EndpointAddr, error: &ConnectError) {
        if let Some(m) = &self.mesh {
            debug!(%endpoint, %error, "peer does not answer mTLS; reaching it in plaintext");
            m.remember_plaintext(endpoint);
        }
    }

    /// The mesh TLS to reach an endpoint whose identity discovery named: mTLS with no
    /// fallback, unless mTLS is off (or identity disabled) altogether.
    pub fn required_tls(&self) -> (Option<&MeshTls>, bool) {
        match &self.mesh {
            Some(m) if self.config.outbound_mtls != config::OutboundMtls::Off => {
                (Some(&m.tls), false)
            }
            _ => (None, false),
        }
    }

    /// An opaque stream to `endpoint`, mTLS to meshed peers; with `expected`, mTLS to a
    /// peer with that identity only.
    pub async fn connect_stream(
        &self,
        direction: Direction,
        endpoint: EndpointAddr,
        expected: Option<&SpiffeId>,
    ) -> Result<(Upstream, Peer), ConnectError> {
        let connector = self.http.connector();
        let plain = || async {
            connector
                .connect_stream(endpoint, None)
                .await
                .map(|(s, _)| (s, None))
        };
        let tls = match expected {
            Some(_) => self.required_tls(),
            None => self.outbound_tls(direction, endpoint),
        };
        if let (Some(tls), Some(expected)) = (tls.0, expected) {
            let (s, peer) = connector.connect_stream(endpoint, Some(tls)).await?;
            return match peer {
                Some(p) if &p == expected => Ok((s, Some(Arc::new(p)))),
                p => Err(ConnectError::Identity {
                    addr: endpoint,
                    presented: p.map(|p| p.to_string()).unwrap_or_default(),
                    expected: expected.to_string(),
                }),
            };
        }
        match tls {
            (None, _) => plain().await,
            (Some(tls), may_fall_back) => match connector.connect_stream(endpoint, Some(tls)).await
            {
                Ok((s, peer)) => Ok((s, peer.map(Arc::new))),
                Err(e) if may_fall_back && e.not_meshed() => {
                    self.plaintext_from_now(endpoint, &e);
                    plain().await
                }
                Err(e) => Err(e),
            },
        }
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.mesh.as_ref().is_none_or(|m| m.store.is_ready())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {addr} ({var}): {source}")]
    Listen {
        var: &'static str,
        addr: SocketAddr,
        source: stdio::Error,
    },
    #[error(transparent)]
    Mesh(#[from] mesh::MeshError),
    #[error("discovery: {0}")]
    Discovery(String),
    #[error(transparent)]
    Trace(#[from] gofe_telemetry::trace::TraceError),
}

/// The addresses the proxy listens on (the first of each, when a listener also has
/// an IPv6 twin).
#[derive(Clone, Copy, Debug)]
pub struct ProxyAddrs {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

pub struct Proxy {
    state: Arc<State>,
    outbound: Vec<TcpListener>,
    inbound: Vec<TcpListener>,
    admin: Vec<TcpListener>,
}

impl Proxy {
    /// Binds every listener. Must be called within a Tokio runtime.
    pub fn bind(config: Config) -> Result<Proxy, BindError> {
        Self::bind_with(config, None)
    }

    /// Binds every listener; with `local_spans`, spans are also kept in memory there
    /// (the demo shows them), and are made even without a collector.
    pub fn bind_with(
        config: Config,
        local_spans: Option<gofe_telemetry::trace::LocalSpans>,
    ) -> Result<Proxy, BindError> {
        let sockets = SocketFactory::new();
        let outbound = bind_with_twin(
            &sockets,
            config::OUTBOUND_LISTEN.name,
            config.outbound_listen,
        )?;
        let inbound = bind_with_twin(&sockets, config::INBOUND_LISTEN.name, config.inbound_listen)?;
        let admin = bind_with_twin(&sockets, config::ADMIN_LISTEN.name, config.admin_listen)?;
        let own = OwnListeners::new(
            outbound
                .iter()
                .chain(&inbound)
                .chain(&admin)
                .filter_map(|l| l.local_addr().ok())
                .collect(),
        );
        let metrics = Arc::new(Metrics::new());
        let mesh = Mesh::new(&config)?.map(Arc::new);
        let connector = Connector::new(
            sockets.clone(),
            config.connect_timeout,
            own.clone(),
            metrics.clone(),
        );
        let http = HttpEndpoints::new(connector, config.idle_timeout);
        let (destinations, background) = Destinations::new(
            &config.discovery,
            config.dns_refresh,
            config.policy_file.as_deref(),
            config.policy.clone(),
            &config.policy_vars,
        )
        .map_err(BindError::Discovery)?;
        for task in background {
            tokio::spawn(task);
        }
        let tracer = if config.trace_collector.is_some() || local_spans.is_some() {
            Some(gofe_telemetry::trace::Tracer::new(
                gofe_telemetry::trace::TraceConfig {
                    collector: config.trace_collector.clone(),
                    local: local_spans,
                    sample_ratio: config.trace_sample_ratio,
                    service_name: config.service_name.clone(),
                },
            )?)
        } else {
            None
        };
        let state = Arc::new(State {
            config,
            metrics,
            mesh,
            sockets,
            own,
            http,
            destinations: Arc::new(destinations),
            drain: CancellationToken::new(),
            tasks: TaskTracker::new(),
            ready: AtomicBool::new(false),
            shutdown: Shutdown::default(),
            tracer,
            log: std::sync::OnceLock::new(),
        });
        Ok(Proxy {
            state,
            outbound,
            inbound,
            admin,
        })
    }

    pub fn addrs(&self) -> ProxyAddrs {
        let first = |ls: &[TcpListener]| ls[0].local_addr().expect("bound listener has an address");
        ProxyAddrs {
            outbound: first(&self.outbound),
            inbound: first(&self.inbound),
            admin: first(&self.admin),
        }
    }

    /// Lets `/log-level` show and change the process's log filter.
    pub fn set_log_handle(&self, handle: gofe_telemetry::logs::LogHandle) {
        let _ = self.state.log.set(handle);
    }

    /// The proxy's tracer, when it makes spans.
    pub fn tracer(&self) -> Option<gofe_telemetry::trace::Tracer> {
        self.state.tracer.clone()
    }

    /// The handle that starts draining.
    pub fn shutdown(&self) -> Shutdown {
        self.state.shutdown.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    /// The outbound destinations, their endpoints and their state.
    pub fn destinations(&self) -> Arc<Destinations> {
        self.state.destinations.clone()
    }

    /// The proxy's identity and mTLS, unless identity is disabled.
    pub fn mesh(&self) -> Option<Arc<Mesh>> {
        self.state.mesh.clone()
    }

    /// Serves until shutdown is requested, then drains: stops accepting, lets in-flight
    /// requests and connections finish within the grace period, and returns.
    pub async fn run(self) {
        let state = self.state;
        for l in self.admin {
            tokio::spawn(admin::serve(l, state.clone()));
        }
        let mut accepting = Vec::new();
        for (listeners, direction) in [
            (self.outbound, Direction::Outbound),
            (self.inbound, Direction::Inbound),
        ] {
            for l in listeners {
                info!(%direction, addr = ?l.local_addr().ok(), "listening");
                accepting.push(tokio::spawn(accept::accept_loop(
                    l,
                    direction,
                    state.clone(),
                )));
            }
        }
        let sweeper = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(state.http.sweep_interval());
                loop {
                    tick.tick().await;
                    state.http.sweep();
                    state.destinations.sweep();
                }
            })
        };
        let maintain = state.mesh.clone().map(|m| {
            info!(identity = %m.name(), "requesting a certificate");
            let ready = m.clone();
            tokio::spawn(async move {
                ready.store.wait_ready().await;
                info!(identity = %ready.name(), "ready: identity held");
            });
            tokio::spawn(m.maintain())
        });
        state.ready.store(true, Ordering::Release);
        info!("listening");

        state.shutdown.requested().await;
        let grace = state.config.shutdown_grace_period;
        info!(grace = ?grace, "draining");
        state.ready.store(false, Ordering::Release);
        state.drain.cancel();
        for a in accepting {
            let _ = a.await;
        }
        state.tasks.close();
        if tokio::time::timeout(grace, state.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                open = state.tasks.len(),
                "grace period over; closing the connections still open"
            );
        }
        sweeper.abort();
        if let Some(m) = maintain {
            m.abort();
        }
        if let Some(tracer) = state.tracer.clone() {
            // The spans still queued go out (or fail) within a bounded time.
            let _ = tokio::task::spawn_blocking(move || {
                tracer.shutdown(std::time::Duration::from_secs(2))
            })
            .await;
        }
        info!("drained");
    }
}

/// Binds `addr` and, for the IPv4 wildcard or loopback, the IPv6 twin on the same
/// port where the host has IPv6, so that ip6tables redirects land somewhere.
fn bind_with_twin(
    sockets: &SocketFactory,
    var: &'static str,
    addr: SocketAddr,
) -> Result<Vec<TcpListener>, BindError> {
    let first = sockets
        .bind(addr)
        .map_err(|source| BindError::Listen { var, addr, source })?;
    let mut listeners = vec![first];
    let twin_ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => Some(Ipv6Addr::UNSPECIFIED),
        IpAddr::V4(ip) if ip.is_loopback() => Some(Ipv6Addr::LOCALHOST),
        _ => None,
    };
    if let (Some(ip), true) = (twin_ip, addr.port() != 0) {
        let twin = SocketAddr::new(IpAddr::V6(ip), addr.port());
        match sockets.bind(twin) {
            Ok(l) => listeners.push(l),
            Err(error) => debug!(%twin, %error, "no IPv6 twin listener"),
        }
    }
    Ok(listeners)
}
