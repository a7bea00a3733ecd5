//! One outbound destination: its endpoints (discovery's, through its balancer), its
//! policy, and the stacks of layers built from that policy, made again only when the
//! policy changes. The retry budget outlives a policy change unless its terms changed.

use super::policies::Policies;
use super::routes::Routes;
use crate::addrs::DestKey;
use crate::balance::balancer::Balancer;
use crate::balance::health::Checker;
use crate::client::send::Client;
use crate::config::policy::Policy;
use crate::metrics::Metrics;
use crate::policy::retry;
use crate::policy::stack::{ConnectStack, HttpStack, Outbound};
use parking_lot::RwLock;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

pub(super) fn now_secs() -> u64 {
    EPOCH.elapsed().as_secs()
}

/// The stacks made from one version of the policy.
struct Built {
    generation: u64,
    parts: Outbound,
    http: HttpStack,
    connect: ConnectStack,
    routes: Arc<Routes>,
    /// Stops the health checker (if the policy has one) when this version goes.
    _health: Option<tokio_util::sync::DropGuard>,
}

impl Built {
    fn new(generation: u64, parts: Outbound) -> Built {
        let health = parts.policy.rules.health_check.clone().map(|check| {
            let stop = tokio_util::sync::CancellationToken::new();
            let checker = Checker {
                check,
                balancer: parts.balancer.clone(),
                name: parts.name.clone(),
                client: parts.client.clone(),
                metrics: parts.metrics.clone(),
            };
            tokio::spawn(checker.run(stop.clone()));
            stop.drop_guard()
        });
        Built {
            _health: health,
            generation,
            http: parts.http(),
            connect: parts.connect(),
            routes: Arc::new(Routes::new(
                &parts.name,
                &parts.policy.rules,
                &parts.metrics,
            )),
            parts,
        }
    }
}

pub struct Destination {
    pub key: DestKey,
    /// How metrics and `/endpoints` name it.
    pub name: Arc<str>,
    pub balancer: Arc<Balancer>,
    pub in_flight: Arc<AtomicUsize>,
    policies: Arc<Policies>,
    built: RwLock<Built>,
    pub(super) last_used: AtomicU64,
    /// Set when the table forgets it: whoever still holds it looks it up again.
    pub(super) removed: AtomicBool,
}

impl Destination {
    pub(super) fn new(
        key: DestKey,
        balancer: Balancer,
        policies: Arc<Policies>,
        metrics: Arc<Metrics>,
        client: Arc<Client>,
    ) -> Destination {
        let name: Arc<str> = key.to_string().into();
        let balancer = Arc::new(balancer);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let generation = policies.generation();
        let policy = policies.lookup(&key);
        let parts = Outbound {
            name: name.clone(),
            budget: Arc::new(retry::budget(&policy.retry)),
            policy,
            balancer: balancer.clone(),
            in_flight: in_flight.clone(),
            metrics,
            client,
        };
        Destination {
            key,
            name,
            balancer,
            in_flight,
            policies,
            built: RwLock::new(Built::new(generation, parts)),
            last_used: AtomicU64::new(now_secs()),
            removed: AtomicBool::new(false),
        }
    }

    /// The stacks for the policy now: made again when a file that gives policy was
    /// reloaded and the destination's policy changed with it.
    fn current<T>(&self, f: impl FnOnce(&Built) -> T) -> T {
        let generation = self.policies.generation();
        {
            let b = self.built.read();
            if b.generation == generation {
                return f(&b);
            }
        }
        let mut b = self.built.write();
        if b.generation != generation {
            let policy = self.policies.lookup(&self.key);
            if *policy == *b.parts.policy {
                b.generation = generation;
            } else {
                let old = &b.parts.policy.retry;
                let mut parts = b.parts.clone();
                if (old.budget_ratio, old.budget_min_per_sec)
                    != (policy.retry.budget_ratio, policy.retry.budget_min_per_sec)
                {
                    parts.budget = Arc::new(retry::budget(&policy.retry));
                }
                parts.policy = policy;
                *b = Built::new(generation, parts);
            }
        }
        f(&b)
    }

    /// The destination's policy now.
    pub fn policy(&self) -> Arc<Policy> {
        self.current(|b| b.parts.policy.clone())
    }

    /// The stack a request to this destination goes through.
    pub fn http_stack(&self) -> HttpStack {
        self.current(|b| b.http.clone())
    }

    /// The routes of its traffic rules.
    pub fn routes(&self) -> Arc<Routes> {
        self.current(|b| b.routes.clone())
    }

    /// The stack a connection of its own to this destination goes through.
    pub fn connect_stack(&self) -> ConnectStack {
        self.current(|b| b.connect.clone())
    }

    /// Whether the table has forgotten this destination (a new one stands for its
    /// name now).
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    pub fn touch(&self) {
        self.last_used.store(now_secs(), Ordering::Relaxed);
    }

    pub(super) fn idle_for(&self, now: u64) -> Duration {
        Duration::from_secs(now.saturating_sub(self.last_used.load(Ordering::Relaxed)))
    }
}
