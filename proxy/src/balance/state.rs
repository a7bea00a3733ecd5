//! One endpoint as the balancer knows it: its latency estimate, its attempts in flight,
//! and its outlier record. This state outlives changes to the endpoint set for the
//! addresses that stay.

use super::ewma::PeakEwma;
use super::outlier::Outlier;
use crate::endpoint::Endpoint;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub struct EndpointState {
    pub endpoint: Arc<Endpoint>,
    pub(super) ewma: Mutex<PeakEwma>,
    pending: AtomicUsize,
    pub(super) outlier: Mutex<Outlier>,
    /// Active health checks: failing ones leave the balancer until they pass again.
    healthy: AtomicBool,
    /// Checks failed and passed in a row.
    checks: Mutex<(u32, u32)>,
}

impl EndpointState {
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        Self {
            endpoint,
            ewma: Mutex::new(PeakEwma::new(Instant::now())),
            pending: AtomicUsize::new(0),
            outlier: Mutex::new(Outlier::default()),
            healthy: AtomicBool::new(true),
            checks: Mutex::new((0, 0)),
        }
    }

    /// Whether its active health checks pass (true when it has none).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Records one active health check: `unhealthy_threshold` failures in a row take
    /// the endpoint out, `healthy_threshold` passes in a row bring it back. Returns the
    /// new state when it changed.
    pub fn checked(&self, passed: bool, unhealthy_after: u32, healthy_after: u32) -> Option<bool> {
        let mut c = self.checks.lock();
        let healthy = self.is_healthy();
        if passed {
            *c = (0, c.1.saturating_add(1));
            if !healthy && c.1 >= healthy_after {
                self.healthy.store(true, Ordering::Release);
                return Some(true);
            }
        } else {
            *c = (c.0.saturating_add(1), 0);
            if healthy && c.0 >= unhealthy_after {
                self.healthy.store(false, Ordering::Release);
                return Some(false);
            }
        }
        None
    }

    pub fn weight(&self) -> u32 {
        self.endpoint.weight.max(1)
    }

    /// Load: the latency estimate times the requests in flight (plus the one to come),
    /// per unit of weight.
    pub(super) fn cost(&self, now: Instant) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed) as f64 + 1.0;
        self.ewma.lock().estimate(now) * pending / f64::from(self.weight())
    }

    pub fn ewma(&self) -> Duration {
        Duration::from_nanos(self.ewma.lock().estimate(Instant::now()) as u64)
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// `(ejected until, times ejected)`.
    pub fn ejection(&self) -> (Option<Instant>, u32) {
        let mut o = self.outlier.lock();
        let out = o.is_ejected(Instant::now());
        (out.then_some(o.ejected_until).flatten(), o.times_ejected)
    }

    pub(super) fn ejected(&self, now: Instant) -> bool {
        self.outlier.lock().is_ejected(now)
    }

    /// Marks an attempt under way: counted as in flight until dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            started: Instant::now(),
        }
    }
}

/// An attempt in flight on an endpoint.
pub struct InFlight {
    endpoint: Arc<EndpointState>,
    pub(super) started: Instant,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.endpoint
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
    }
}
