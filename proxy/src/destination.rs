//! Picking the destination: a connection redirected by iptables goes where it was
//! going (outbound) or to the application on localhost (inbound); a connection that
//! reached a listener directly is either an explicit proxy client, routed per request
//! by its authority, or (inbound) sent to the configured direct target.
//!
//! Outbound, the destination is the request's authority (HTTP) or the original
//! destination (TCP); `Destinations` keeps one `Destination` per name, each with its
//! endpoints from discovery, their balancer, and the policy that applies to it.

use crate::addrs::{Direction, EndpointAddr, OrigDstAddr};
use crate::balance::{Balancer, Chosen, DISCOVERY_WAIT, EndpointState};
use crate::discovery::{DestKey, Discovery};
use crate::metrics::Metrics;
use crate::outlier::Outcome;
use crate::policy::budget::RetryBudget;
use crate::policy::file::Watched;
use crate::policy::{Policy, retry};
use gofe_telemetry::prom::{Exposition, Kind};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tower::retry::budget::Budget;

/// Where a connection's traffic goes, decided when it is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnTarget {
    /// Everything on the connection goes to one endpoint.
    Endpoint {
        endpoint: EndpointAddr,
        /// Set when iptables redirected the connection.
        orig_dst: Option<OrigDstAddr>,
    },
    /// An explicit proxy client on the outbound listener: each request names its
    /// destination in its authority.
    Explicit,
}

impl ConnTarget {
    /// The target of a connection redirected from `orig_dst`.
    pub fn redirected(direction: Direction, orig_dst: OrigDstAddr) -> ConnTarget {
        let endpoint = match direction {
            Direction::Outbound => EndpointAddr(orig_dst.0),
            // The application listens on the pod's loopback, in the family the client
            // used.
            Direction::Inbound => {
                let lo = match orig_dst.0.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                };
                EndpointAddr(SocketAddr::new(lo, orig_dst.0.port()))
            }
        };
        ConnTarget::Endpoint {
            endpoint,
            orig_dst: Some(orig_dst),
        }
    }

    pub fn orig_dst(&self) -> Option<OrigDstAddr> {
        match self {
            ConnTarget::Endpoint { orig_dst, .. } => *orig_dst,
            ConnTarget::Explicit => None,
        }
    }
}

/// How long a destination nobody has used is kept (with its endpoints' latency and
/// ejection state, and its retry budget).
const DESTINATION_IDLE: Duration = Duration::from_secs(600);
/// Destinations kept at most; past this, the one unused longest makes room.
const MAX_DESTINATIONS: usize = 1_000;

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

fn now_secs() -> u64 {
    EPOCH.elapsed().as_secs()
}

/// Where destinations get their policy: the policy file, then the discovery files,
/// then the environment's defaults.
pub struct Policies {
    files: Vec<Arc<Watched>>,
    /// Bumped whenever one of the files is reloaded.
    generation: Arc<AtomicU64>,
    base: Arc<Policy>,
}

impl Policies {
    fn lookup(&self, key: &DestKey) -> Arc<Policy> {
        self.files
            .iter()
            .find_map(|f| f.current().destinations.get(key).map(|e| e.policy.clone()))
            .unwrap_or_else(|| self.base.clone())
    }
}

/// One destination: its endpoints and their state, its policy, its retry budget and
/// its count of requests in flight.
pub struct Destination {
    pub key: DestKey,
    /// How metrics and `/endpoints` name it.
    pub name: Arc<str>,
    pub balancer: Arc<Balancer>,
    pub in_flight: Arc<AtomicUsize>,
    policies: Arc<Policies>,
    policy: RwLock<(u64, Arc<Policy>)>,
    budget: Mutex<((f32, u32), Arc<RetryBudget>)>,
    last_used: AtomicU64,
    /// Set when the registry forgets it: whoever still holds it looks it up again.
    removed: AtomicBool,
}

impl Destination {
    /// The destination's policy now.
    pub fn policy(&self) -> Arc<Policy> {
        let generation = self.policies.generation.load(Ordering::Acquire);
        {
            let p = self.policy.read();
            if p.0 == generation {
                return p.1.clone();
            }
        }
        let policy = self.policies.lookup(&self.key);
        *self.policy.write() = (generation, policy.clone());
        policy
    }

    /// The retry budget, made again if the policy's terms for it changed.
    pub fn budget(&self, policy: &Policy) -> Arc<RetryBudget> {
        let terms = (policy.retry.budget_ratio, policy.retry.budget_min_per_sec);
        let mut b = self.budget.lock();
        if b.0 != terms {
            *b = (terms, Arc::new(retry::budget(&policy.retry)));
        }
        b.1.clone()
    }

    /// Picks an endpoint and runs `connect` on it, for a connection of its own (a
    /// tunnel, an upgrade, opaque TCP). A connect failure is tried again on another
    /// endpoint, within the policy's retry limit and budget.
    pub async fn connect<T, E, F, Fut>(
        &self,
        metrics: &Metrics,
        fallback: Option<EndpointAddr>,
        is_connect_failure: impl Fn(&E) -> bool,
        mut connect: F,
    ) -> Result<T, PickError<E>>
    where
        F: FnMut(Arc<EndpointState>) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let policy = self.policy();
        let budget = self.budget(&policy);
        budget.deposit();
        let on = &policy.retry.on;
        let mut tried = Vec::new();
        let mut attempt = 1;
        loop {
            let Some(Chosen { endpoint, balanced }) = self
                .balancer
                .next(DISCOVERY_WAIT, fallback, policy.lb, &tried)
                .await
            else {
                return Err(PickError::NoEndpoints(self.name.clone()));
            };
            tried.push(endpoint.addr);
            let flight = endpoint.start();
            match connect(endpoint.clone()).await {
                Ok(t) => {
                    if balanced {
                        self.balancer
                            .observe_connect(&flight, Outcome::Success, &policy.outlier);
                    }
                    return Ok(t);
                }
                Err(e) if is_connect_failure(&e) => {
                    // The request's own original destination is not balanced, nor ejected.
                    let observed = balanced.then(|| {
                        self.balancer.observe_connect(
                            &flight,
                            Outcome::ConnectFailure,
                            &policy.outlier,
                        )
                    });
                    if observed.is_some_and(|o| o.ejected.is_some()) {
                        metrics.ejection(&self.name, &endpoint.addr.to_string());
                    }
                    let retry = attempt <= policy.retry.limit
                        && (on.connect_failure || on.status_5xx || on.gateway_error);
                    if !retry {
                        return Err(PickError::Failed(e));
                    }
                    if !budget.withdraw() {
                        metrics.retry_budget_exhausted(&self.name);
                        return Err(PickError::Failed(e));
                    }
                    metrics.retry(&self.name, "connect-failure");
                    tokio::time::sleep(retry::backoff(
                        policy.retry.backoff_min,
                        policy.retry.backoff_max,
                        attempt,
                    ))
                    .await;
                    attempt += 1;
                }
                Err(e) => return Err(PickError::Failed(e)),
            }
        }
    }

    /// Whether the registry has forgotten this destination (a new one stands for its
    /// name now).
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    pub fn touch(&self) {
        self.last_used.store(now_secs(), Ordering::Relaxed);
    }
}

/// Every destination the proxy has sent to lately.
pub struct Destinations {
    discovery: Discovery,
    policies: Arc<Policies>,
    map: RwLock<HashMap<DestKey, Arc<Destination>>>,
}

impl Destinations {
    /// `policy_file` (GOFE_POLICY_FILE) and the discovery's own files give policy over
    /// `base`. The tasks returned keep the files current.
    pub fn new(
        sources: &[String],
        dns_refresh: (Duration, Duration),
        policy_file: Option<&std::path::Path>,
        base: Policy,
        base_vars: &HashMap<String, String>,
    ) -> Result<(Destinations, Vec<BoxTask>), String> {
        let generation = Arc::new(AtomicU64::new(0));
        let (discovery, mut tasks) =
            Discovery::new(sources, dns_refresh, base_vars, generation.clone())?;
        let mut files = Vec::new();
        if let Some(path) = policy_file {
            let (watched, task) = Watched::start(path, base_vars.clone(), generation.clone())?;
            files.push(Arc::new(watched));
            tasks.push(Box::pin(task));
        }
        files.extend(discovery.files().cloned());
        Ok((
            Destinations {
                discovery,
                policies: Arc::new(Policies {
                    files,
                    generation,
                    base: Arc::new(base),
                }),
                map: RwLock::new(HashMap::new()),
            },
            tasks,
        ))
    }

    /// The destination `key` names. Must be called within a Tokio runtime.
    pub fn get(&self, key: DestKey) -> Arc<Destination> {
        if let Some(d) = self.map.read().get(&key) {
            d.touch();
            return d.clone();
        }
        let mut map = self.map.write();
        if let Some(d) = map.get(&key) {
            return d.clone();
        }
        let rx = self.discovery.watch(key.clone());
        let policy = self.policies.lookup(&key);
        let d = Arc::new(Destination {
            name: key.to_string().into(),
            balancer: Arc::new(Balancer::watching(rx)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            budget: Mutex::new((
                (policy.retry.budget_ratio, policy.retry.budget_min_per_sec),
                Arc::new(retry::budget(&policy.retry)),
            )),
            policy: RwLock::new((self.policies.generation.load(Ordering::Acquire), policy)),
            policies: self.policies.clone(),
            last_used: AtomicU64::new(now_secs()),
            removed: AtomicBool::new(false),
            key: key.clone(),
        });
        if map.len() >= MAX_DESTINATIONS {
            // Room for the new one: the one idle longest goes (its discovery stops).
            let oldest = map
                .iter()
                .filter(|(_, d)| d.in_flight.load(Ordering::Relaxed) == 0)
                .min_by_key(|(_, d)| d.last_used.load(Ordering::Relaxed))
                .map(|(k, _)| k.clone());
            if let Some(d) = oldest.and_then(|k| map.remove(&k)) {
                d.removed.store(true, Ordering::Release);
            }
        }
        if map.len() < MAX_DESTINATIONS {
            map.insert(key, d.clone());
        }
        d
    }

    /// Forgets destinations unused for a while (and stops discovering them).
    pub fn sweep(&self) {
        let now = now_secs();
        self.map.write().retain(|_, d| {
            let keep = now.saturating_sub(d.last_used.load(Ordering::Relaxed))
                < DESTINATION_IDLE.as_secs()
                || d.in_flight.load(Ordering::Relaxed) > 0;
            if !keep {
                d.removed.store(true, Ordering::Release);
            }
            keep
        });
    }

    /// Every destination, by name.
    pub fn all(&self) -> Vec<Arc<Destination>> {
        let mut all: Vec<Arc<Destination>> = self.map.read().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// `/endpoints`: each destination, where its endpoints come from, and each
    /// endpoint's state.
    pub fn to_json(&self) -> serde_json::Value {
        let destinations: Vec<serde_json::Value> = self
            .all()
            .iter()
            .map(|d| {
                let policy = d.policy();
                let set = d.balancer.set();
                let endpoints: Vec<serde_json::Value> = d
                    .balancer
                    .endpoints()
                    .iter()
                    .map(|e| {
                        let (ejected_until, times_ejected) = e.ejection();
                        serde_json::json!({
                            "address": e.addr.to_string(),
                            "weight": e.weight,
                            "identity": e.identity.as_ref().map(|i| i.to_string()),
                            "state": if ejected_until.is_some() { "ejected" } else { "ready" },
                            "ewma_ms": (e.ewma().as_secs_f64() * 1e6).round() / 1e3,
                            "in_flight": e.pending(),
                            "ejected_for_ms": ejected_until.map(|u| u.saturating_duration_since(Instant::now()).as_millis() as u64),
                            "times_ejected": times_ejected,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": d.name.as_ref(),
                    "original_destinations": d.balancer.fallbacks().iter().map(|e| serde_json::json!({
                        "address": e.addr.to_string(),
                        "in_flight": e.pending(),
                    })).collect::<Vec<_>>(),
                    "source": set.map(|s| s.source.as_str()).unwrap_or("pending"),
                    "lb": policy.lb.to_string(),
                    "in_flight": d.in_flight.load(Ordering::Relaxed),
                    "endpoints": endpoints,
                })
            })
            .collect();
        serde_json::json!({ "destinations": destinations })
    }

    /// `gofe_endpoints{authority,state}`.
    pub fn render(&self, e: &mut Exposition) {
        let mut counts: BTreeMap<(Arc<str>, &'static str), u64> = BTreeMap::new();
        for d in self.all() {
            let (mut ready, mut ejected) = (0, 0);
            for ep in d.balancer.endpoints().iter() {
                if ep.ejection().0.is_some() {
                    ejected += 1;
                } else {
                    ready += 1;
                }
            }
            *counts.entry((d.name.clone(), "ready")).or_default() += ready;
            *counts.entry((d.name.clone(), "ejected")).or_default() += ejected;
        }
        e.family(
            "gofe_endpoints",
            "Endpoints of each destination, ready or ejected by outlier detection.",
            Kind::Gauge,
        );
        for ((authority, state), n) in counts {
            e.sample(
                "gofe_endpoints",
                &[("authority", &authority), ("state", state)],
                n,
            );
        }
    }
}

/// Why no connection was made.
#[derive(Debug)]
pub enum PickError<E> {
    NoEndpoints(Arc<str>),
    Failed(E),
}

impl<E> PickError<E> {
    pub fn map_failed<F>(self, f: impl FnOnce(E) -> F) -> PickError<F> {
        match self {
            PickError::NoEndpoints(d) => PickError::NoEndpoints(d),
            PickError::Failed(e) => PickError::Failed(f(e)),
        }
    }
}

pub type BoxTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_goes_to_loopback_in_the_clients_family() {
        let t = ConnTarget::redirected(
            Direction::Inbound,
            OrigDstAddr("10.0.0.5:8080".parse().unwrap()),
        );
        assert!(
            matches!(t, ConnTarget::Endpoint { endpoint, .. } if endpoint.0 == "127.0.0.1:8080".parse().unwrap())
        );
        let t = ConnTarget::redirected(
            Direction::Inbound,
            OrigDstAddr("[fd00::5]:8080".parse().unwrap()),
        );
        assert!(
            matches!(t, ConnTarget::Endpoint { endpoint, .. } if endpoint.0 == "[::1]:8080".parse().unwrap())
        );
    }

    #[test]
    fn outbound_goes_to_the_original_destination() {
        let orig = OrigDstAddr("10.0.0.9:80".parse().unwrap());
        let t = ConnTarget::redirected(Direction::Outbound, orig);
        assert_eq!(
            t,
            ConnTarget::Endpoint {
                endpoint: EndpointAddr(orig.0),
                orig_dst: Some(orig)
            }
        );
    }
}
