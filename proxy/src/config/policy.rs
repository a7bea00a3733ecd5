//! A destination's resilience policy as settings: timeouts, retries, balancing,
//! outlier ejection, the concurrency limit. Defaults come from the environment; the
//! policy and discovery files override them per destination, under the same names
//! (lower case, without `GOFE_`), parsed by the same code.

use super::env::{BadVar, Env};
use super::parse::{parse_bool, parse_duration, parse_nonzero_duration, parse_range, parse_size};
use super::vars::{self as config, POLICY_VARS, Var};
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

pub use super::retry::{RetryOn, RetryPolicy, RouteRetry, RouteTryTimeout};

/// How a destination spreads requests over its endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lb {
    /// Power of two choices over peak-EWMA latency times requests in flight.
    Ewma,
    RoundRobin,
    Random,
}

impl fmt::Display for Lb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lb::Ewma => "ewma",
            Lb::RoundRobin => "round-robin",
            Lb::Random => "random",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OutlierPolicy {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejection_percent: u8,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub request_timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub lb: Lb,
    pub outlier: OutlierPolicy,
    pub max_concurrent_requests: usize,
    /// The identities that may serve the destination (`identities:` in a policy
    /// document); registry entries naming any other are refused. None: any of the mesh.
    pub identities: Option<Vec<gofe_identity::SpiffeId>>,
    /// Routes, rate limit, health check, priorities: only from policy documents.
    pub rules: std::sync::Arc<super::rules::Rules>,
}

fn optional(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

fn number<T: std::str::FromStr>(expected: &'static str) -> impl Fn(&str) -> Result<T, String> {
    move |s| s.trim().parse::<T>().map_err(|_| expected.to_string())
}

impl Policy {
    /// Reads the policy variables from `env`.
    pub fn read(env: &mut Env<'_>) -> Policy {
        let (backoff_min, backoff_max) = env.get(&config::RETRY_BACKOFF, parse_range);
        Policy {
            request_timeout: optional(env.get(&config::REQUEST_TIMEOUT, parse_duration)),
            per_try_timeout: optional(env.get(&config::PER_TRY_TIMEOUT, parse_duration)),
            retry: RetryPolicy {
                on: env.get(&config::RETRY_ON, RetryOn::parse),
                limit: env.get(&config::RETRY_LIMIT, |s| {
                    s.trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n <= 10)
                        .ok_or_else(|| "expected a number of retries from 0 to 10".to_string())
                }),
                budget_ratio: env.get(&config::RETRY_BUDGET_RATIO, |s| {
                    s.trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|r| (0.0..=10.0).contains(r))
                        .ok_or_else(|| "expected a ratio from 0 to 10, such as 0.2".to_string())
                }),
                budget_min_per_sec: env.get(&config::RETRY_BUDGET_MIN_PER_SEC, |s| {
                    s.trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n <= 1_000_000)
                        .ok_or_else(|| {
                            "expected a whole number of retries a second, up to 1000000".to_string()
                        })
                }),
                backoff_min,
                backoff_max,
                max_body: env.get(&config::RETRY_MAX_BODY, parse_size),
                status_codes: env.get(&config::RETRY_STATUS_CODES, |s| {
                    s.split(',')
                        .map(str::trim)
                        .filter(|c| !c.is_empty())
                        .map(|c| {
                            c.parse::<u16>()
                                .ok()
                                .filter(|c| (100..600).contains(c))
                                .ok_or_else(|| {
                                    "expected HTTP status codes such as 429,503".to_string()
                                })
                        })
                        .collect()
                }),
                retryable: env.get(&config::RETRYABLE, parse_bool),
            },
            lb: env.get(&config::LB, |s| match s.trim() {
                "ewma" => Ok(Lb::Ewma),
                "round-robin" => Ok(Lb::RoundRobin),
                "random" => Ok(Lb::Random),
                _ => Err("expected ewma, round-robin or random".into()),
            }),
            outlier: OutlierPolicy {
                consecutive_5xx: env.get(
                    &config::OUTLIER_CONSECUTIVE_5XX,
                    number("expected a count (0: never)"),
                ),
                consecutive_gateway: env.get(
                    &config::OUTLIER_CONSECUTIVE_GATEWAY,
                    number("expected a count (0: never)"),
                ),
                base_ejection: env.get(&config::OUTLIER_BASE_EJECTION, parse_nonzero_duration),
                max_ejection: env.get(&config::OUTLIER_MAX_EJECTION, parse_nonzero_duration),
                max_ejection_percent: env.get(&config::OUTLIER_MAX_EJECTION_PERCENT, |s| {
                    s.trim()
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= 100)
                        .ok_or_else(|| "expected a percentage from 0 to 100".to_string())
                }),
            },
            max_concurrent_requests: env.get(&config::MAX_CONCURRENT_REQUESTS, |s| {
                s.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| "expected a number of requests above zero".to_string())
            }),
            identities: None,
            rules: Default::default(),
        }
    }

    /// The policy variables as given (the process environment's values), to which
    /// per-destination overrides are applied.
    pub fn base_vars(lookup: impl Fn(&str) -> Option<String>) -> HashMap<String, String> {
        POLICY_VARS
            .iter()
            .filter_map(|v| lookup(v.name).map(|value| (v.name.to_string(), value)))
            .collect()
    }

    /// This policy's variables with `overrides` (variable name to value) applied, or
    /// every override that is wrong.
    pub fn with_overrides(
        base: &HashMap<String, String>,
        overrides: &HashMap<String, String>,
    ) -> Result<Policy, Vec<BadVar>> {
        let mut merged = base.clone();
        merged.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut env = Env::from_map(&merged);
        let policy = Policy::read(&mut env);
        env.finish().map(|()| policy).map_err(|e| e.0)
    }

    /// The variable a file key names: `retry_on` is GOFE_RETRY_ON.
    pub fn var_for_key(key: &str) -> Option<&'static Var> {
        let name = format!("GOFE_{}", key.to_ascii_uppercase().replace('-', "_"));
        POLICY_VARS.iter().copied().find(|v| v.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_spec_defaults() {
        let p = Policy::with_overrides(&HashMap::new(), &HashMap::new()).unwrap();
        assert_eq!(p.request_timeout, None);
        assert!(p.retry.on.connect_failure && p.retry.on.refused_stream && !p.retry.on.status_5xx);
        assert_eq!(p.retry.limit, 2);
        assert_eq!(
            (p.retry.backoff_min, p.retry.backoff_max),
            (Duration::from_millis(25), Duration::from_millis(250))
        );
        assert_eq!(p.retry.max_body, 64 * 1024);
        assert_eq!(p.lb, Lb::Ewma);
        assert_eq!(p.outlier.consecutive_5xx, 5);
        assert_eq!(p.outlier.max_ejection_percent, 50);
        assert_eq!(p.max_concurrent_requests, 1024);
    }

    #[test]
    fn overrides_apply_over_the_base_and_are_checked() {
        let base = map(&[("GOFE_RETRY_ON", "5xx"), ("GOFE_RETRY_LIMIT", "3")]);
        let p = Policy::with_overrides(
            &base,
            &map(&[("GOFE_RETRY_LIMIT", "1"), ("GOFE_LB", "round-robin")]),
        )
        .unwrap();
        assert!(p.retry.on.status_5xx);
        assert_eq!(p.retry.limit, 1);
        assert_eq!(p.lb, Lb::RoundRobin);
        let bad = Policy::with_overrides(
            &base,
            &map(&[("GOFE_RETRY_ON", "5xx,sometimes"), ("GOFE_LB", "best")]),
        )
        .unwrap_err();
        let names: Vec<&str> = bad.iter().map(|b| b.name).collect();
        assert_eq!(names, vec!["GOFE_RETRY_ON", "GOFE_LB"]);
    }

    #[test]
    fn sizes_ranges_and_keys() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("lots").is_err());
        assert!(parse_range("250ms..25ms").is_err());
        assert_eq!(
            Policy::var_for_key("retry_on").unwrap().name,
            "GOFE_RETRY_ON"
        );
        assert_eq!(
            Policy::var_for_key("per-try-timeout").unwrap().name,
            "GOFE_PER_TRY_TIMEOUT"
        );
        assert!(Policy::var_for_key("log").is_none(), "not a policy setting");
    }

    #[test]
    fn grpc_conditions() {
        let on = RetryOn::parse("unavailable,resource-exhausted").unwrap();
        assert!(on.grpc(14) && on.grpc(8) && !on.grpc(4) && !on.grpc(13));
    }
}
