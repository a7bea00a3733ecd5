//! Where destinations get their policy: the policy file, then the registry's pushed
//! documents, then the discovery files, then the environment's defaults. A generation
//! number goes up whenever one of them changes, so that destinations know when to look
//! again.

use super::discovery::file::{Generation, Watched};
use super::discovery::registry::Registry;
use crate::addrs::DestKey;
use crate::config::policy::Policy;
use crate::config::rules::InboundRules;
use std::sync::Arc;

pub struct Policies {
    policy_file: Option<Arc<Watched>>,
    registry: Option<Arc<Registry>>,
    discovery_files: Vec<Arc<Watched>>,
    generation: Generation,
    base: Arc<Policy>,
}

impl Policies {
    pub fn new(
        policy_file: Option<Arc<Watched>>,
        registry: Option<Arc<Registry>>,
        discovery_files: Vec<Arc<Watched>>,
        generation: Generation,
        base: Policy,
    ) -> Self {
        Self {
            policy_file,
            registry,
            discovery_files,
            generation,
            base: Arc::new(base),
        }
    }

    pub fn lookup(&self, key: &DestKey) -> Arc<Policy> {
        let from_file =
            |f: &Arc<Watched>| f.current().destinations.get(key).map(|e| e.policy.clone());
        self.policy_file
            .iter()
            .find_map(from_file)
            .or_else(|| self.registry.as_ref().and_then(|r| r.policy(key)))
            .or_else(|| self.discovery_files.iter().find_map(from_file))
            .unwrap_or_else(|| self.base.clone())
    }

    /// The rules of inbound `port`: the policy file's, then the registry's pushed
    /// documents, then the discovery files' (the order destinations' policy follows).
    pub fn inbound(&self, port: u16) -> Option<Arc<InboundRules>> {
        let from_file = |f: &Arc<Watched>| f.current().inbound.get(&port).cloned();
        self.policy_file
            .iter()
            .find_map(from_file)
            .or_else(|| self.registry.as_ref().and_then(|r| r.inbound(port)))
            .or_else(|| self.discovery_files.iter().find_map(from_file))
    }

    /// Every inbound port's rules in force, by port.
    pub fn all_inbound(&self) -> Vec<Arc<InboundRules>> {
        let mut by_port = std::collections::BTreeMap::new();
        let mut take = |r: &Arc<InboundRules>| {
            by_port.entry(r.port).or_insert_with(|| r.clone());
        };
        if let Some(f) = &self.policy_file {
            f.current().inbound.values().for_each(&mut take);
        }
        if let Some(r) = &self.registry {
            r.all_inbound().iter().for_each(&mut take);
        }
        for f in &self.discovery_files {
            f.current().inbound.values().for_each(&mut take);
        }
        by_port.into_values().collect()
    }

    /// The traffic rules in force, for `/config`: each destination's whose policy has
    /// rules, from where `lookup` takes it (the policy file, the registry, the
    /// discovery files, in that order), and each inbound port's.
    pub fn rules_json(&self) -> serde_json::Value {
        let mut by_name = std::collections::BTreeMap::new();
        let mut take = |key: &DestKey, policy: &Arc<Policy>, from: &str| {
            by_name
                .entry(key.to_string())
                .or_insert_with(|| (policy.clone(), from.to_string()));
        };
        if let Some(f) = &self.policy_file {
            for (k, e) in &f.current().destinations {
                take(k, &e.policy, "policy_file");
            }
        }
        if let Some(r) = &self.registry {
            for (k, p) in r.policies() {
                take(&k, &p, "registry");
            }
        }
        for f in &self.discovery_files {
            for (k, e) in &f.current().destinations {
                take(k, &e.policy, "discovery_file");
            }
        }
        let destinations: Vec<serde_json::Value> = by_name
            .into_iter()
            .filter(|(_, (p, _))| !p.rules.is_empty())
            .map(|(name, (p, from))| {
                let mut rules = p.rules.to_json();
                rules["name"] = name.into();
                rules["from"] = from.into();
                rules
            })
            .collect();
        let inbound: Vec<serde_json::Value> =
            self.all_inbound().iter().map(|r| r.to_json()).collect();
        serde_json::json!({ "destinations": destinations, "inbound": inbound })
    }

    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    /// The files policy comes from: the policy file, then the discovery files.
    pub fn files(&self) -> impl Iterator<Item = &Arc<Watched>> {
        self.policy_file.iter().chain(&self.discovery_files)
    }

    /// The defaults every destination starts from.
    pub fn base(&self) -> &Arc<Policy> {
        &self.base
    }
}
