//! Inbound, where requests go: the application in this pod, on the port the client
//! connected to, through that port's stack (its concurrency limit shared by every
//! connection to the port; its rate limits and priorities from the policy file's
//! `inbound:` rules, made again when they change; of which one unmeshed source
//! address holds at most half).

use super::policies::Policies;
use crate::client::send::Client;
use crate::config::policy::Policy;
use crate::config::rules::InboundRules;
use crate::metrics::Metrics;
use crate::policy::share::SourceShares;
use crate::policy::stack::{self, InboundStack};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

struct Port {
    generation: u64,
    rules: Option<Arc<InboundRules>>,
    in_flight: Arc<AtomicUsize>,
    stack: InboundStack,
    shares: Arc<SourceShares>,
}

pub struct InboundRoutes {
    client: Arc<Client>,
    policy: Arc<Policy>,
    policies: Option<Arc<Policies>>,
    metrics: Arc<Metrics>,
    ports: Mutex<HashMap<u16, Port, foldhash::fast::RandomState>>,
}

impl InboundRoutes {
    /// Ports' stacks from `policy` (the defaults) and the rules `policies` give.
    pub fn new(
        client: Arc<Client>,
        policy: Arc<Policy>,
        policies: Option<Arc<Policies>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            policy,
            policies,
            metrics,
            ports: Mutex::new(HashMap::default()),
        }
    }

    /// The stack requests to the application's `port` go through, and the shares its
    /// unmeshed clients hold of its concurrency limit.
    pub fn port(&self, port: u16) -> (InboundStack, Arc<SourceShares>) {
        let generation = self.policies.as_ref().map_or(0, |p| p.generation());
        let mut ports = self.ports.lock();
        if let Some(p) = ports.get_mut(&port) {
            if p.generation != generation {
                let rules = self.rules(port);
                p.generation = generation;
                if rules != p.rules {
                    p.stack = self.build(port, p.in_flight.clone(), rules.clone());
                    p.shares = Arc::new(SourceShares::new(self.limit(&rules)));
                    p.rules = rules;
                }
            }
            return (p.stack.clone(), p.shares.clone());
        }
        let rules = self.rules(port);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let stack = self.build(port, in_flight.clone(), rules.clone());
        let shares = Arc::new(SourceShares::new(self.limit(&rules)));
        // (A port number is 16 bits: the table is bounded.)
        ports.insert(
            port,
            Port {
                generation,
                rules,
                in_flight,
                stack: stack.clone(),
                shares: shares.clone(),
            },
        );
        (stack, shares)
    }

    /// The port's concurrency limit: its rules', else the default.
    fn limit(&self, rules: &Option<Arc<InboundRules>>) -> usize {
        rules
            .as_ref()
            .and_then(|r| r.max_concurrent_requests)
            .unwrap_or(self.policy.max_concurrent_requests)
    }

    fn rules(&self, port: u16) -> Option<Arc<InboundRules>> {
        self.policies.as_ref().and_then(|p| p.inbound(port))
    }

    fn build(
        &self,
        port: u16,
        in_flight: Arc<AtomicUsize>,
        rules: Option<Arc<InboundRules>>,
    ) -> InboundStack {
        stack::inbound(stack::Inbound {
            name: format!("inbound:{port}").into(),
            in_flight,
            max_concurrent_requests: self.policy.max_concurrent_requests,
            request_timeout: self.policy.request_timeout,
            rules,
            metrics: self.metrics.clone(),
            client: self.client.clone(),
        })
    }
}
