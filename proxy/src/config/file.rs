//! The YAML files of destinations: the policy file (GOFE_POLICY_FILE) and the discovery
//! file (GOFE_DISCOVERY=file:PATH) share one shape. Each destination is named by its
//! authority (`host:port`, port 80 when left out) or by an address; it may list
//! endpoints and override any policy setting:
//!
//! ```yaml
//! destinations:
//!   - name: api.demo:80
//!     endpoints:
//!       - address: 10.0.0.5:8080
//!         weight: 2
//!         identity: spiffe://cluster.local/ns/demo/sa/api
//!     policy:
//!       retry_on: 5xx,connect-failure
//!       per_try_timeout: 200ms
//!       retryable: true
//! ```
//!
//! A file is checked whole: one mistake refuses all of it.

use super::env::BadVar;
use super::policy::Policy;
use super::rules::{self, HealthCheck, InboundRules, RouteSpec, Rules};
use crate::addrs::{BadDestination, DestKey, EndpointAddr};
use crate::endpoint::Endpoint;
use gofe_identity::SpiffeId;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    #[serde(default)]
    destinations: Vec<DestDoc>,
    #[serde(default)]
    inbound: Vec<InboundRules>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestDoc {
    name: String,
    #[serde(default)]
    endpoints: Option<Vec<EndpointDoc>>,
    #[serde(default)]
    policy: PolicyDoc,
}

/// A destination's `policy:`: settings named like the variables (scalars, checked by
/// the variables' parsers), `identities`, and the traffic rules, which are
/// deserialized as they are read so that a mistake in them names its line.
#[derive(Default)]
struct PolicyDoc {
    settings: BTreeMap<String, serde_yaml::Value>,
    rules: Rules,
}

struct Routes(Vec<RouteSpec>);
struct Health(HealthCheck);

impl<'de> Deserialize<'de> for Routes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        rules::routes(d).map(Routes)
    }
}

impl<'de> Deserialize<'de> for Health {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        rules::health_check(d).map(Health)
    }
}

impl<'de> Deserialize<'de> for PolicyDoc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = PolicyDoc;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of policy settings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<PolicyDoc, A::Error> {
                use serde::de::Error;
                let mut doc = PolicyDoc::default();
                while let Some(key) = map.next_key::<String>()? {
                    let dup = match key.as_str() {
                        "routes" => {
                            let had = !doc.rules.routes.is_empty();
                            doc.rules.routes = map.next_value::<Routes>()?.0;
                            had
                        }
                        "rate_limit" => doc.rules.rate_limit.replace(map.next_value()?).is_some(),
                        "health_check" => doc
                            .rules
                            .health_check
                            .replace(map.next_value::<Health>()?.0)
                            .is_some(),
                        "priority" => doc.rules.priority.replace(map.next_value()?).is_some(),
                        _ => {
                            let v = map.next_value()?;
                            doc.settings.insert(key.clone(), v).is_some()
                        }
                    };
                    if dup {
                        return Err(A::Error::custom(format!("{key} is given twice")));
                    }
                }
                Ok(doc)
            }
        }
        d.deserialize_map(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointDoc {
    address: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    identity: Option<String>,
}

fn one() -> u32 {
    1
}

/// What is wrong with a destinations file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The YAML does not parse or does not have the file's shape (the message gives the
    /// line and column).
    #[error(transparent)]
    Yaml(#[from] serde_yaml::Error),
    #[error("destination: {0}")]
    Name(#[from] BadDestination),
    #[error("{destination}: {problem}")]
    Destination {
        destination: String,
        problem: Problem,
    },
    #[error("destination {0:?} is listed twice")]
    Duplicate(String),
    #[error("inbound port {0} is listed twice")]
    DuplicatePort(u16),
}

/// What is wrong with one destination of a file.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("endpoint address {0:?} is not ip:port")]
    Address(String),
    #[error("endpoint {0} has weight 0")]
    ZeroWeight(String),
    #[error(transparent)]
    Identity(#[from] gofe_identity::spiffe::SpiffeIdError),
    #[error("{0:?} is not a policy setting")]
    UnknownSetting(String),
    #[error("{0} must be a single value")]
    NotScalar(String),
    #[error("{0} must be a list of SPIFFE IDs")]
    NotList(String),
    #[error("{}", BadVars(.0))]
    Values(Vec<BadVar>),
    #[error("route {route}: {}", BadVars(.bad))]
    Route { route: String, bad: Vec<BadVar> },
}

struct BadVars<'a>(&'a [BadVar]);

impl fmt::Display for BadVars<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, bad) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            bad.fmt(f)?;
        }
        Ok(())
    }
}

/// One destination of a file.
#[derive(Debug)]
pub struct Entry {
    pub endpoints: Option<Vec<Endpoint>>,
    /// The file's policy for it, over the defaults (variable name to value).
    pub overrides: HashMap<String, String>,
    pub policy: Arc<Policy>,
}

/// A file, parsed and checked.
#[derive(Debug, Default)]
pub struct Table {
    pub destinations: HashMap<DestKey, Entry>,
    /// The inbound ports' rules (`inbound:`), by port.
    pub inbound: HashMap<u16, Arc<InboundRules>>,
}

fn scalar(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Table {
    /// Parses `text`, every policy value checked against `base` (the defaults' values).
    pub fn parse(text: &str, base: &HashMap<String, String>) -> Result<Table, FileError> {
        let doc: Doc = serde_yaml::from_str(text)?;
        let mut destinations = HashMap::new();
        for d in doc.destinations {
            let key = DestKey::parse(&d.name)?;
            let in_dest = |problem: Problem| FileError::Destination {
                destination: d.name.clone(),
                problem,
            };
            let endpoints = match d.endpoints {
                None => None,
                Some(list) => Some(
                    list.into_iter()
                        .map(|e| endpoint(e).map_err(in_dest))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            let mut overrides = HashMap::new();
            let mut identities = None;
            for (k, v) in &d.policy.settings {
                if k == "identities" {
                    identities = Some(identity_list(v).map_err(in_dest)?);
                    continue;
                }
                let var = Policy::var_for_key(k)
                    .ok_or_else(|| in_dest(Problem::UnknownSetting(k.clone())))?;
                let value = scalar(v).ok_or_else(|| in_dest(Problem::NotScalar(k.clone())))?;
                overrides.insert(var.name.to_string(), value);
            }
            let mut policy = Policy::with_overrides(base, &overrides)
                .map_err(|bad| in_dest(Problem::Values(bad)))?;
            policy.identities = identities;
            let mut rules = d.policy.rules;
            for route in &mut rules.routes {
                if route.retry_settings.is_empty() {
                    continue;
                }
                // The route's settings over the destination's, read by the same code.
                let mut own = overrides.clone();
                for (k, v) in &route.retry_settings {
                    let var = Policy::var_for_key(k).expect("a route's retry keys are settings");
                    own.insert(var.name.to_string(), v.clone());
                }
                let p = Policy::with_overrides(base, &own).map_err(|bad| {
                    in_dest(Problem::Route {
                        route: route.name.to_string(),
                        bad,
                    })
                })?;
                route.retry = Some(Arc::new(p.retry));
            }
            policy.rules = Arc::new(rules);
            let entry = Entry {
                endpoints,
                overrides,
                policy: Arc::new(policy),
            };
            if destinations.insert(key, entry).is_some() {
                return Err(FileError::Duplicate(d.name));
            }
        }
        let mut inbound = HashMap::new();
        for i in doc.inbound {
            let port = i.port;
            if inbound.insert(port, Arc::new(i)).is_some() {
                return Err(FileError::DuplicatePort(port));
            }
        }
        Ok(Table {
            destinations,
            inbound,
        })
    }
}

/// `identities: [spiffe://...]`: who may serve a destination.
fn identity_list(v: &serde_yaml::Value) -> Result<Vec<SpiffeId>, Problem> {
    let list = v
        .as_sequence()
        .ok_or_else(|| Problem::NotList("identities".into()))?;
    list.iter()
        .map(|i| {
            let s = i
                .as_str()
                .ok_or_else(|| Problem::NotList("identities".into()))?;
            Ok(s.parse::<SpiffeId>()?)
        })
        .collect()
}

fn endpoint(e: EndpointDoc) -> Result<Endpoint, Problem> {
    let addr = e
        .address
        .parse()
        .map_err(|_| Problem::Address(e.address.clone()))?;
    if e.weight == 0 {
        return Err(Problem::ZeroWeight(e.address));
    }
    let identity = e.identity.map(|i| i.parse::<SpiffeId>()).transpose()?;
    Ok(Endpoint {
        addr: EndpointAddr::new(addr),
        weight: e.weight,
        identity,
        metadata: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_destination_with_endpoints_and_policy() {
        let t = Table::parse(
            r#"
destinations:
  - name: API.demo
    endpoints:
      - address: 10.0.0.5:8080
        weight: 2
        identity: spiffe://cluster.local/ns/demo/sa/api
      - address: "[fd00::5]:8080"
    policy:
      retry_on: 5xx
      retry_limit: 3
      per_try_timeout: 200ms
      retryable: true
"#,
            &HashMap::new(),
        )
        .unwrap();
        let e = &t.destinations[&DestKey::parse("api.demo:80").unwrap()];
        let eps = e.endpoints.as_ref().unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].weight, 2);
        assert_eq!(eps[1].weight, 1);
        assert!(eps[0].identity.is_some());
        assert!(e.policy.retry.on.status_5xx);
        assert_eq!(e.policy.retry.limit, 3);
        assert_eq!(e.policy.per_try_timeout, Some(Duration::from_millis(200)));
        assert!(e.policy.retry.retryable);
    }

    #[test]
    fn mistakes_are_refused_whole() {
        for (bad, why) in [
            (
                "destinations: [{name: a, policy: {retry_on: sometimes}}]",
                "GOFE_RETRY_ON",
            ),
            (
                "destinations: [{name: a, policy: {log: debug}}]",
                "not a policy setting",
            ),
            (
                "destinations: [{name: a, endpoints: [{address: nowhere}]}]",
                "not ip:port",
            ),
            ("destinations: [{name: a, colour: blue}]", "unknown field"),
            ("destinations: [{name: a}, {name: a}]", "twice"),
            ("destinations: [{name: 'a:b:c'}]", "destination"),
        ] {
            let err = Table::parse(bad, &HashMap::new()).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn a_route_has_retry_settings_of_its_own_checked_like_the_destination_s() {
        let t = Table::parse(
            r#"
destinations:
  - name: api.demo
    policy:
      retry_limit: 1
      routes:
        - name: pay
          match: {path: {prefix: /pay}}
          retry_on: 5xx
          retry_limit: 3
          per_try_timeout: 250ms
        - name: rest
"#,
            &HashMap::new(),
        )
        .unwrap();
        let p = &t.destinations[&DestKey::parse("api.demo:80").unwrap()].policy;
        let pay = p.rules.routes.iter().find(|r| &*r.name == "pay").unwrap();
        let retry = pay.retry.as_ref().unwrap();
        assert!(retry.on.status_5xx);
        assert_eq!(retry.limit, 3);
        assert_eq!(pay.per_try_timeout, Some(Duration::from_millis(250)));
        let rest = p.rules.routes.iter().find(|r| &*r.name == "rest").unwrap();
        assert!(rest.retry.is_none(), "the destination's apply");
        let e = Table::parse(
            "destinations: [{name: a, policy: {routes: [{name: pay, retry_on: sometimes}]}}]",
            &HashMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("route pay") && e.contains("GOFE_RETRY_ON"),
            "{e}"
        );
    }
}
