//! The stacks of layers, built once per destination (again when its policy changes)
//! and once per inbound port, then cloned for each request.
//!
//! Outbound requests: concurrency limit → request timeout → retries → balancer →
//! per-try timeout → the endpoint. Outbound connections of their own (opaque TCP,
//! tunnels, upgrades): retries of connects → balancer → the connection. Inbound
//! requests: concurrency limit → request timeout → the application.

use super::budget::RetryBudget;
use super::limit::{Limit, LimitLayer};
use super::retry::{Retry, RetryConnect, RetryLayer, RetryStats};
use super::timeout::{Timeout, TimeoutLayer};
use crate::addrs::Direction;
use crate::balance::balancer::Balancer;
use crate::balance::layer::{Balance, BalanceLayer};
use crate::client::send::Client;
use crate::config::policy::Policy;
use crate::forward::endpoint::{Connect, Forward};
use crate::metrics::Metrics;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tower::Layer;

pub type HttpStack = Limit<Timeout<Retry<Balance<Timeout<Forward>>>>>;
pub type ConnectStack = RetryConnect<Balance<Connect>>;
pub type InboundStack = Limit<Timeout<Forward>>;

/// What an outbound destination's stacks are made of.
#[derive(Clone)]
pub struct Outbound {
    pub name: Arc<str>,
    pub policy: Arc<Policy>,
    pub budget: Arc<RetryBudget>,
    pub balancer: Arc<Balancer>,
    /// The destination's requests in flight, shared by every stack it has had.
    pub in_flight: Arc<AtomicUsize>,
    pub metrics: Arc<Metrics>,
    pub client: Arc<Client>,
}

impl Outbound {
    fn retry(&self) -> RetryLayer {
        RetryLayer::new(
            self.policy.clone(),
            self.budget.clone(),
            RetryStats {
                destination: self.name.clone(),
                metrics: self.metrics.clone(),
            },
        )
    }

    fn balance(&self, latency: bool) -> BalanceLayer {
        BalanceLayer::new(
            self.balancer.clone(),
            self.policy.lb,
            self.policy.outlier,
            self.name.clone(),
            self.metrics.clone(),
            latency,
        )
    }

    pub fn http(&self) -> HttpStack {
        let p = &self.policy;
        let endpoint = Forward::new(self.client.clone(), Direction::Outbound);
        let attempt = TimeoutLayer::attempt(p.per_try_timeout).layer(endpoint);
        let balanced = self.balance(true).layer(attempt);
        let retried = self.retry().layer(balanced);
        let timed = TimeoutLayer::request(p.request_timeout).layer(retried);
        LimitLayer::new(
            self.in_flight.clone(),
            p.max_concurrent_requests,
            self.name.clone(),
        )
        .layer(timed)
    }

    pub fn connect(&self) -> ConnectStack {
        let endpoint = Connect::new(self.client.connector().clone());
        let balanced = self.balance(false).layer(endpoint);
        self.retry().for_connections().layer(balanced)
    }
}

/// The stack of an inbound port: requests to the application in this pod.
pub fn inbound(
    name: Arc<str>,
    in_flight: Arc<AtomicUsize>,
    max_concurrent_requests: usize,
    request_timeout: Option<Duration>,
    client: Arc<Client>,
) -> InboundStack {
    let app = Forward::new(client, Direction::Inbound);
    let timed = TimeoutLayer::request(request_timeout).layer(app);
    LimitLayer::new(in_flight, max_concurrent_requests, name).layer(timed)
}
