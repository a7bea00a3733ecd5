//! The stacks of layers, built once per destination (again when its policy changes)
//! and once per inbound port, then cloned for each request.
//!
//! Outbound requests: rate limit → concurrency limit (with priorities) → request
//! timeout → retries → balancer → per-try timeout → the endpoint. Outbound connections
//! of their own (opaque TCP, tunnels, upgrades): retries of connects → balancer → the
//! connection. Inbound requests: rate limit (total, per client) → concurrency limit
//! (with priorities) → request timeout → the application.

use super::budget::RetryBudget;
use super::limit::{Limit, LimitLayer};
use super::rate::{Limiter, RateLimitLayer, RateLimited};
use super::retry::{Retry, RetryConnect, RetryLayer, RetryStats};
use super::timeout::{Timeout, TimeoutLayer};
use crate::addrs::Direction;
use crate::balance::balancer::Balancer;
use crate::balance::layer::{Balance, BalanceLayer};
use crate::client::send::Client;
use crate::config::policy::Policy;
use crate::config::rules::{InboundRules, RateLimit};
use crate::forward::endpoint::{Connect, Forward};
use crate::metrics::Metrics;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tower::Layer;

pub type HttpStack = RateLimited<Limit<Timeout<Retry<Balance<Timeout<Forward>>>>>>;
pub type ConnectStack = RetryConnect<Balance<Connect>>;
pub type InboundStack = RateLimited<Limit<Timeout<Forward>>>;

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
        let limited = LimitLayer::new(
            self.in_flight.clone(),
            p.max_concurrent_requests,
            self.name.clone(),
        )
        .with_priority(
            p.rules.priority.clone(),
            self.metrics.clone(),
            Direction::Outbound,
        )
        .layer(timed);
        rate_limit(
            p.rules.rate_limit.as_ref(),
            &self.name,
            Direction::Outbound,
            &self.metrics,
        )
        .layer(limited)
    }

    pub fn connect(&self) -> ConnectStack {
        let endpoint = Connect::new(self.client.connector().clone());
        let balanced = self.balance(false).layer(endpoint);
        self.retry().for_connections().layer(balanced)
    }
}

/// The rate limit layer of `limit` (None: none), counting under `name`.
fn rate_limit(
    limit: Option<&RateLimit>,
    name: &Arc<str>,
    direction: Direction,
    metrics: &Metrics,
) -> RateLimitLayer {
    match limit {
        Some(r) => RateLimitLayer::new(
            Some(Arc::new(Limiter::new(r))),
            name.clone(),
            metrics.rate_limited(direction, name, &"".into()),
        ),
        None => RateLimitLayer::none(),
    }
}

/// What an inbound port's stack is made of.
pub struct Inbound {
    pub name: Arc<str>,
    pub in_flight: Arc<AtomicUsize>,
    pub max_concurrent_requests: usize,
    pub request_timeout: Option<Duration>,
    pub rules: Option<Arc<InboundRules>>,
    pub metrics: Arc<Metrics>,
    pub client: Arc<Client>,
}

/// The stack of an inbound port: requests to the application in this pod.
pub fn inbound(i: Inbound) -> InboundStack {
    let app = Forward::new(i.client, Direction::Inbound);
    let timed = TimeoutLayer::request(i.request_timeout).layer(app);
    let rules = i.rules.as_deref();
    let max = rules
        .and_then(|r| r.max_concurrent_requests)
        .unwrap_or(i.max_concurrent_requests);
    let limited = LimitLayer::new(i.in_flight, max, i.name.clone())
        .with_priority(
            rules.and_then(|r| r.priority.clone()),
            i.metrics.clone(),
            Direction::Inbound,
        )
        .layer(timed);
    rate_limit(
        rules.and_then(|r| r.rate_limit.as_ref()),
        &i.name,
        Direction::Inbound,
        &i.metrics,
    )
    .layer(limited)
}
