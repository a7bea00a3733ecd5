//! A destination's routes, made ready from its rules: in precedence order, each with
//! its own rate limit's buckets (kept while the rule stays the same). The route a
//! request takes is the first that matches it; none: the destination serves it as
//! without rules.

use crate::addrs::Direction;
use crate::config::rules::{RouteSpec, Rules};
use crate::metrics::Metrics;
use crate::policy::rate::{Limiter, RateLimitLayer};
use std::sync::Arc;

pub struct Route {
    pub spec: RouteSpec,
    /// The route's own rate limit (or none).
    pub limit: RateLimitLayer,
}

#[derive(Default)]
pub struct Routes {
    pub list: Vec<Route>,
}

impl Routes {
    /// The routes of `rules` for destination `name`.
    pub fn new(name: &Arc<str>, rules: &Rules, metrics: &Metrics) -> Routes {
        Routes {
            list: rules
                .routes
                .iter()
                .map(|spec| Route {
                    limit: match &spec.rate_limit {
                        Some(r) => RateLimitLayer::new(
                            Some(Arc::new(Limiter::new(r))),
                            format!("{name} route {}", spec.name).into(),
                            metrics.rate_limited(Direction::Outbound, name, &spec.name),
                        ),
                        None => RateLimitLayer::none(),
                    },
                    spec: spec.clone(),
                })
                .collect(),
        }
    }

    /// The index of the route `req` takes, if one does.
    pub fn pick<B>(&self, req: &http::Request<B>) -> Option<usize> {
        self.list.iter().position(|r| r.spec.matches.matches(req))
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}
