//! Where destinations get their policy: the policy file, then the discovery files,
//! then the environment's defaults. A generation number goes up whenever a file is
//! reloaded, so that destinations know when to look again.

use super::discovery::file::Watched;
use crate::addrs::DestKey;
use crate::config::policy::Policy;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Policies {
    files: Vec<Arc<Watched>>,
    generation: Arc<AtomicU64>,
    base: Arc<Policy>,
}

impl Policies {
    pub fn new(files: Vec<Arc<Watched>>, generation: Arc<AtomicU64>, base: Policy) -> Self {
        Self {
            files,
            generation,
            base: Arc::new(base),
        }
    }

    pub fn lookup(&self, key: &DestKey) -> Arc<Policy> {
        self.files
            .iter()
            .find_map(|f| f.current().destinations.get(key).map(|e| e.policy.clone()))
            .unwrap_or_else(|| self.base.clone())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The files policy comes from.
    pub fn files(&self) -> &[Arc<Watched>] {
        &self.files
    }

    /// The defaults every destination starts from.
    pub fn base(&self) -> &Arc<Policy> {
        &self.base
    }
}
