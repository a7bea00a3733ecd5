//! Every destination the proxy has sent to lately: one per name, made on first use with
//! discovery watching its endpoints, forgotten after a while unused (and, past a cap,
//! the one unused longest makes room).

use super::destination::{Destination, now_secs};
use super::discovery::file::{Generation, WatchError, Watched};
use super::discovery::registry::Registry;
use super::discovery::sources::{Allowed, BoxTask, Discovery, DiscoveryError};
use super::policies::Policies;
use crate::addrs::DestKey;
use crate::balance::balancer::Balancer;
use crate::client::send::Client;
use crate::config::Config;
use crate::metrics::Metrics;
use gofe_identity::trust::TrustAnchors;
use gofe_telemetry::prom::{Exposition, Kind};
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// How long a destination nobody has used is kept (with its endpoints' latency and
/// ejection state, and its retry budget).
const DESTINATION_IDLE: Duration = Duration::from_secs(600);
/// Destinations kept at most; past this, the one unused longest makes room.
const MAX_DESTINATIONS: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum DestinationsError {
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("GOFE_POLICY_FILE: {0}")]
    PolicyFile(#[from] WatchError),
}

pub struct Destinations {
    discovery: Discovery,
    registry: Option<Arc<Registry>>,
    policies: Arc<Policies>,
    metrics: Arc<Metrics>,
    client: Arc<Client>,
    map: RwLock<HashMap<DestKey, Arc<Destination>>>,
}

impl Destinations {
    /// The destinations of `config` (discovery, the registry, the policy file, the
    /// defaults); the tasks returned keep the files and the registry's mirror current.
    /// `anchors` check the registry's entries.
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        client: Arc<Client>,
        anchors: Option<Arc<TrustAnchors>>,
    ) -> Result<(Destinations, Vec<BoxTask>), DestinationsError> {
        let generation = Generation::default();
        let registry = config.registry.clone().map(|r| {
            Registry::serving(
                r,
                anchors,
                &config.trust_domain,
                config.policy_vars.clone(),
                config
                    .register
                    .iter()
                    .flat_map(|r| &r.services)
                    .map(|s| (s.service.clone(), s.port))
                    .collect(),
                generation.clone(),
            )
        });
        let (discovery, mut tasks) = Discovery::new(
            &config.discovery,
            config.dns_refresh,
            &config.policy_vars,
            generation.clone(),
            registry.clone(),
        )?;
        if let Some(r) = &registry {
            tasks.push(Box::pin(r.clone().run()));
        }
        let mut policy_file = None;
        if let Some(path) = &config.policy_file {
            let (watched, task) =
                Watched::start(path, config.policy_vars.clone(), generation.clone())?;
            policy_file = Some(Arc::new(watched));
            tasks.push(Box::pin(task));
        }
        let policies = Arc::new(Policies::new(
            policy_file,
            registry.clone(),
            discovery.files().cloned().collect(),
            generation,
            config.policy.clone(),
        ));
        Ok((
            Destinations {
                discovery,
                registry,
                policies,
                metrics,
                client,
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
        let policies = self.policies.clone();
        let allowed: Allowed = Arc::new(move |k| policies.lookup(k).identities.clone());
        let balancer = Balancer::new(self.discovery.watch(key.clone(), allowed));
        let d = Arc::new(Destination::new(
            key.clone(),
            balancer,
            self.policies.clone(),
            self.metrics.clone(),
            self.client.clone(),
        ));
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
            let keep =
                d.idle_for(now) < DESTINATION_IDLE || d.in_flight.load(Ordering::Relaxed) > 0;
            if !keep {
                d.removed.store(true, Ordering::Release);
            }
            keep
        });
    }

    /// Where destinations (and inbound ports) get their policy.
    pub fn policies(&self) -> &Arc<Policies> {
        &self.policies
    }

    /// The registry, when GOFE_REGISTRY is set.
    pub fn registry(&self) -> Option<&Arc<Registry>> {
        self.registry.as_ref()
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
                            "address": e.endpoint.addr.to_string(),
                            "weight": e.weight(),
                            "identity": e.endpoint.identity.as_ref().map(|i| i.to_string()),
                            "metadata": &*e.endpoint.metadata,
                            "state": if ejected_until.is_some() { "ejected" } else if !e.is_healthy() { "unhealthy" } else { "ready" },
                            "healthy": e.is_healthy(),
                            "ewma_ms": (e.ewma().as_secs_f64() * 1e6).round() / 1e3,
                            "in_flight": e.pending(),
                            "ejected_for_ms": ejected_until.map(|u| u.saturating_duration_since(Instant::now()).as_millis() as u64),
                            "times_ejected": times_ejected,
                        })
                    })
                    .collect();
                let mut extra = serde_json::Map::new();
                if let (Some(r), crate::endpoint::Source::Registry) = (&self.registry, set.source) {
                    extra.insert(
                        "state_age_seconds".into(),
                        ((r.state_age().as_secs_f64() * 10.0).round() / 10.0).into(),
                    );
                    let rejected: Vec<serde_json::Value> = r
                        .rejected(&d.key)
                        .into_iter()
                        .map(|(address, why)| serde_json::json!({"address": address, "reason": why}))
                        .collect();
                    extra.insert("rejected".into(), rejected.into());
                }
                let mut json = serde_json::json!({
                    "name": d.name.as_ref(),
                    "original_destinations": d.balancer.fallbacks().iter().map(|e| serde_json::json!({
                        "address": e.endpoint.addr.to_string(),
                        "in_flight": e.pending(),
                    })).collect::<Vec<_>>(),
                    "source": set.source.as_str(),
                    "lb": policy.lb.to_string(),
                    "in_flight": d.in_flight.load(Ordering::Relaxed),
                    "endpoints": endpoints,
                });
                if !policy.rules.is_empty() {
                    extra.insert("rules".into(), policy.rules.to_json());
                }
                json.as_object_mut().expect("an object").extend(extra);
                json
            })
            .collect();
        let inbound: Vec<serde_json::Value> = self
            .policies
            .all_inbound()
            .iter()
            .map(|r| r.to_json())
            .collect();
        let mut all = serde_json::json!({ "destinations": destinations, "inbound": inbound });
        if let Some(r) = &self.registry {
            all["registry"] = r.to_json();
        }
        all
    }

    /// `gofe_endpoints{authority,state}`, and the files' reloads.
    pub fn render(&self, e: &mut Exposition) {
        e.family(
            "gofe_file_reloads_total",
            "Changed policy and discovery files read again: ok (in force) or refused (a mistake; the last good version stays).",
            Kind::Counter,
        );
        for w in self.policies.files() {
            let path = w.path.display().to_string();
            for (result, n) in [
                ("ok", w.reloads.ok.get()),
                ("refused", w.reloads.refused.get()),
            ] {
                e.sample(
                    "gofe_file_reloads_total",
                    &[("path", &path), ("result", result)],
                    n,
                );
            }
        }
        let mut counts: BTreeMap<(Arc<str>, &'static str), u64> = BTreeMap::new();
        for d in self.all() {
            let (mut ready, mut ejected, mut unhealthy) = (0, 0, 0);
            for ep in d.balancer.endpoints().iter() {
                if ep.ejection().0.is_some() {
                    ejected += 1;
                } else if !ep.is_healthy() {
                    unhealthy += 1;
                } else {
                    ready += 1;
                }
            }
            *counts.entry((d.name.clone(), "ready")).or_default() += ready;
            *counts.entry((d.name.clone(), "ejected")).or_default() += ejected;
            *counts.entry((d.name.clone(), "unhealthy")).or_default() += unhealthy;
        }
        e.family(
            "gofe_endpoints",
            "Endpoints of each destination: ready, ejected by outlier detection, or unhealthy (failing active health checks).",
            Kind::Gauge,
        );
        for ((authority, state), n) in counts {
            e.sample(
                "gofe_endpoints",
                &[("authority", &authority), ("state", state)],
                n,
            );
        }
        if let Some(r) = &self.registry {
            r.render(e);
        }
    }
}
