//! gofe's data path, read from top to bottom in the order a connection meets it:
//!
//! 1. `accept` — listeners and the accept loop
//! 2. `orig_dst` — where a redirected connection was going
//! 3. `detect` — which protocol it speaks; 3b. `inbound` — the mesh's mTLS terminated
//!    and authorized
//! 4. `http` — HTTP served, each request observed and forwarded; `opaque` — anything
//!    else, copied
//! 5. `route` — the destination, its endpoints (discovery) and its policy
//! 6. `policy` — the layers: concurrency limit, timeouts, retries
//! 7. `balance` — the endpoint for each attempt, and outlier ejection
//! 8. `forward` — one attempt sent to its endpoint; tunnels joined
//! 9. `client` — pooled connections (HTTP/1, HTTP/2, the mesh's HTTP/2 over mTLS)
//! 10. `connect` — TCP, and the one outbound-TLS decision
//!
//! Beside the path: `register` — this pod's own entries in the registry, made once it
//! is ready and deleted when draining starts.
//!
//! Leaves, used at any stage: `addrs`, `body`, `call`, `config`, `endpoint`, `io`,
//! `metrics`, `probes` (the application's probes, run for the kubelet), `proto`,
//! `socket`; `identity` (this proxy's certificate); `ctx` (what
//! every connection shares); `admin` (the admin server, beside the path).
//!
//! A module imports only modules below it on the path, and leaves. `Proxy` binds the
//! listeners, runs them, and drains on shutdown.
#![forbid(unsafe_code)]

mod accept;
pub mod balance;
pub mod client;
pub mod connect;
pub mod detect;
pub mod forward;
pub mod http;
pub mod inbound;
pub mod opaque;
pub mod orig_dst;
pub mod policy;
pub mod register;
pub mod route;

pub mod addrs;
pub mod admin;
pub mod body;
pub mod call;
pub mod config;
pub mod ctx;
pub mod endpoint;
pub mod identity;
pub mod io;
pub mod metrics;
pub mod probes;
pub mod proto;
pub mod socket;

pub use ctx::Shutdown;

use addrs::Direction;
use client::send::Client;
use config::Config;
use connect::connector::Connector;
use connect::tcp::{OwnListeners, TcpConnector};
use connect::tls::OutboundTls;
use ctx::Ctx;
use identity::{IdentityError, ProxyIdentity};
use inbound::authorize::InboundPolicy;
use metrics::Metrics;
use route::destinations::{Destinations, DestinationsError};
use route::inbound::InboundRoutes;
use socket::{HostSockets, SocketFactory};
use std::io as stdio;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {addr} ({var}): {source}")]
    Listen {
        var: &'static str,
        addr: SocketAddr,
        source: stdio::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Destinations(#[from] DestinationsError),
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
    ctx: Arc<Ctx>,
    outbound: Vec<TcpListener>,
    inbound: Vec<TcpListener>,
    admin: Vec<TcpListener>,
}

impl Proxy {
    /// Binds every listener on the host's sockets. Must be called within a Tokio
    /// runtime.
    pub fn bind(config: Config) -> Result<Proxy, BindError> {
        Self::bind_with(config, None, Arc::new(HostSockets))
    }

    /// Binds every listener with `sockets`; with `local_spans`, spans are also kept in
    /// memory there (the demo shows them), and are made even without a collector.
    pub fn bind_with(
        config: Config,
        local_spans: Option<gofe_telemetry::trace::LocalSpans>,
        sockets: Arc<dyn SocketFactory>,
    ) -> Result<Proxy, BindError> {
        let outbound = bind_with_twin(
            &*sockets,
            config::OUTBOUND_LISTEN.name,
            config.outbound_listen,
        )?;
        let inbound = bind_with_twin(
            &*sockets,
            config::INBOUND_LISTEN.name,
            config.inbound_listen,
        )?;
        let admin = bind_with_twin(&*sockets, config::ADMIN_LISTEN.name, config.admin_listen)?;
        let own = OwnListeners::new(
            outbound
                .iter()
                .chain(&inbound)
                .chain(&admin)
                .filter_map(|l| l.local_addr().ok())
                .collect(),
        );
        let metrics = Arc::new(Metrics::new());
        let identity = match &config.identity {
            Some(id) => Some(Arc::new(ProxyIdentity::new(id, &config.trust_domain)?)),
            None => None,
        };
        let connector = Arc::new(Connector::new(
            TcpConnector::new(sockets.clone(), config.connect_timeout, own),
            OutboundTls::new(identity.clone(), config.outbound_mtls, metrics.clone()),
            metrics.clone(),
        ));
        let limits = config.limits;
        let h2 = client::h2::H2Settings {
            max_streams: limits.h2_max_concurrent_streams,
            max_header_list: limits.max_request_headers as u32,
            keepalive: limits.h2_keepalive,
        };
        let client = Arc::new(Client::new(
            connector,
            config.idle_timeout,
            h2,
            metrics.clone(),
        ));
        let (destinations, background) = Destinations::new(
            &config,
            metrics.clone(),
            client.clone(),
            identity.as_ref().map(|i| i.anchors.clone()),
        )?;
        for task in background {
            tokio::spawn(task);
        }
        let tracer = if config.trace_collector.is_some() || local_spans.is_some() {
            Some(gofe_telemetry::trace::Tracer::new(
                gofe_telemetry::trace::TraceConfig {
                    collector: config.trace_collector.clone(),
                    collector_ca: match &config.trace_collector_ca {
                        Some(path) => Some(std::fs::read(path).map_err(|e| {
                            gofe_telemetry::trace::TraceError::Exporter {
                                collector: config::TRACE_COLLECTOR_CA.name.into(),
                                reason: format!("cannot read {}: {e}", path.display()),
                            }
                        })?),
                        None => None,
                    },
                    local: local_spans,
                    sample_ratio: config.trace_sample_ratio,
                    service_name: config.service_name.clone(),
                },
            )?)
        } else {
            None
        };
        let ctx = Arc::new(Ctx {
            inbound: InboundRoutes::new(
                client.clone(),
                Arc::new(config.policy.clone()),
                Some(destinations.policies().clone()),
                metrics.clone(),
            ),
            inbound_policy: InboundPolicy {
                identity: identity.clone(),
                mode: config.inbound_mtls,
                authorize: config.inbound_authorize.clone(),
            },
            config,
            metrics,
            sockets,
            client,
            destinations: Arc::new(destinations),
            identity,
            tracer,
            log: std::sync::OnceLock::new(),
            drain: CancellationToken::new(),
            tasks: TaskTracker::new(),
            listening: Default::default(),
            shutdown: Shutdown::default(),
        });
        Ok(Proxy {
            ctx,
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
    /// The proxy's own operations (certificate requests, refreshes, reloads, drains)
    /// go to its tracer from then on.
    pub fn set_log_handle(&self, handle: gofe_telemetry::logs::LogHandle) {
        if let Some(tracer) = &self.ctx.tracer {
            handle.trace_operations(tracer);
        }
        let _ = self.ctx.log.set(handle);
    }

    /// The proxy's tracer, when it makes spans.
    pub fn tracer(&self) -> Option<gofe_telemetry::trace::Tracer> {
        self.ctx.tracer.clone()
    }

    /// The handle that starts draining.
    pub fn shutdown(&self) -> Shutdown {
        self.ctx.shutdown.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.ctx.metrics.clone()
    }

    /// The outbound destinations, their endpoints and their state.
    pub fn destinations(&self) -> Arc<Destinations> {
        self.ctx.destinations.clone()
    }

    /// The proxy's identity, unless identity is disabled.
    pub fn identity(&self) -> Option<Arc<ProxyIdentity>> {
        self.ctx.identity.clone()
    }

    /// Serves until shutdown is requested, then drains: stops accepting, lets in-flight
    /// requests and connections finish within the grace period, and returns.
    pub async fn run(self) {
        let ctx = self.ctx;
        let _admin = match admin::start(self.admin, ctx.clone()) {
            Ok(thread) => Some(thread),
            Err(error) => {
                // Only when the system is out of threads or descriptors; the proxy
                // still serves, and the kubelet's probes will say what is wrong.
                tracing::error!(%error, "cannot start the admin server");
                None
            }
        };
        let mut accepting = Vec::new();
        for (listeners, direction) in [
            (self.outbound, Direction::Outbound),
            (self.inbound, Direction::Inbound),
        ] {
            for l in listeners {
                info!(%direction, addr = ?l.local_addr().ok(), "listening");
                accepting.push(tokio::spawn(accept::accept_loop(l, direction, ctx.clone())));
            }
        }
        let sweeper = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(ctx.client.pools().sweep_interval());
                loop {
                    tick.tick().await;
                    ctx.client.pools().sweep();
                    ctx.destinations.sweep();
                }
            })
        };
        let maintain = ctx.identity.clone().map(|id| {
            info!(identity = %id.name(), "requesting a certificate");
            let ready = id.clone();
            tokio::spawn(async move {
                ready.store.wait_ready().await;
                info!(identity = %ready.name(), "ready: identity held");
            });
            tokio::spawn(id.maintain())
        });
        ctx.listening.store(true, Ordering::Release);
        info!("listening");
        let registration = register::Registration::start(&ctx);

        ctx.shutdown.requested().await;
        let grace = ctx.config.shutdown_grace_period;
        // The drain is an operation span: how long it took, and what it left open.
        let span = tracing::info_span!(
            target: gofe_telemetry::ops::TARGET,
            "proxy.drain",
            grace = ?grace,
            open = ctx.tasks.len(),
            left_open = tracing::field::Empty,
        );
        async {
            info!(grace = ?grace, "draining");
            ctx.listening.store(false, Ordering::Release);
            if let Some(r) = registration {
                // Clients stop choosing this pod before it stops serving: the entries
                // go first, the listeners once the watchers have seen it.
                if r.deregister().await {
                    tokio::time::sleep(register::PROPAGATION.min(grace)).await;
                }
            }
            ctx.drain.cancel();
            for a in accepting {
                let _ = a.await;
            }
            ctx.tasks.close();
            if tokio::time::timeout(grace, ctx.tasks.wait()).await.is_err() {
                tracing::Span::current().record("left_open", ctx.tasks.len());
                warn!(
                    open = ctx.tasks.len(),
                    "grace period over; closing the connections still open"
                );
            }
        }
        .instrument(span)
        .await;
        sweeper.abort();
        if let Some(m) = maintain {
            m.abort();
        }
        if let Some(tracer) = ctx.tracer.clone() {
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
    sockets: &dyn SocketFactory,
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
