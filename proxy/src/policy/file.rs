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
//! A file is read when it changes; one that does not parse, or names a setting or value
//! that is wrong, is logged and the last good one stays.

use super::Policy;
use crate::addrs::EndpointAddr;
use crate::discovery::{DestKey, Endpoint};
use gofe_identity::SpiffeId;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// How often a watched file is looked at.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    #[serde(default)]
    destinations: Vec<DestDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestDoc {
    name: String,
    #[serde(default)]
    endpoints: Option<Vec<EndpointDoc>>,
    #[serde(default)]
    policy: BTreeMap<String, serde_yaml::Value>,
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
    pub fn parse(text: &str, base: &HashMap<String, String>) -> Result<Table, String> {
        let doc: Doc = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mut destinations = HashMap::new();
        for d in doc.destinations {
            let key =
                DestKey::parse(&d.name).map_err(|e| format!("destination {:?}: {e}", d.name))?;
            let endpoints = match d.endpoints {
                None => None,
                Some(list) => Some(
                    list.into_iter()
                        .map(|e| {
                            let addr = e.address.parse().map_err(|_| {
                                format!(
                                    "{}: endpoint address {:?} is not ip:port",
                                    d.name, e.address
                                )
                            })?;
                            if e.weight == 0 {
                                return Err(format!(
                                    "{}: endpoint {} has weight 0",
                                    d.name, e.address
                                ));
                            }
                            let identity = e
                                .identity
                                .map(|i| {
                                    i.parse::<SpiffeId>()
                                        .map_err(|err| format!("{}: {err}", d.name))
                                })
                                .transpose()?;
                            Ok(Endpoint {
                                addr: EndpointAddr(addr),
                                weight: e.weight,
                                identity,
                            })
                        })
                        .collect::<Result<Vec<_>, String>>()?,
                ),
            };
            let mut overrides = HashMap::new();
            for (k, v) in &d.policy {
                let var = Policy::var_for_key(k)
                    .ok_or_else(|| format!("{}: {k:?} is not a policy setting", d.name))?;
                let value =
                    scalar(v).ok_or_else(|| format!("{}: {k} must be a single value", d.name))?;
                overrides.insert(var.name.to_string(), value);
            }
            let policy = Policy::with_overrides(base, &overrides).map_err(|bad| {
                let why: Vec<String> = bad.iter().map(|b| b.to_string()).collect();
                format!("{}: {}", d.name, why.join("; "))
            })?;
            if destinations
                .insert(
                    key,
                    Entry {
                        endpoints,
                        overrides,
                        policy: Arc::new(policy),
                    },
                )
                .is_some()
            {
                return Err(format!("destination {:?} is listed twice", d.name));
            }
        }
        Ok(Table { destinations })
    }
}

/// A file kept parsed: the current table, replaced when the file changes and parses.
pub struct Watched {
    pub path: PathBuf,
    rx: watch::Receiver<Arc<Table>>,
}

impl Watched {
    /// Reads `path` now (an error here is a start-up error) and returns the watcher
    /// and the task that keeps it current.
    pub fn start(
        path: &Path,
        base: HashMap<String, String>,
        generation: Arc<AtomicU64>,
    ) -> Result<
        (
            Watched,
            impl std::future::Future<Output = ()> + Send + 'static,
        ),
        String,
    > {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let table = Table::parse(&text, &base).map_err(|e| format!("{}: {e}", path.display()))?;
        let (tx, rx) = watch::channel(Arc::new(table));
        let owned = path.to_owned();
        let task = async move {
            let mut last = text;
            let mut tick = tokio::time::interval(RELOAD_INTERVAL);
            loop {
                tick.tick().await;
                let Ok(text) = tokio::fs::read_to_string(&owned).await else {
                    continue;
                };
                if text == last {
                    continue;
                }
                match Table::parse(&text, &base) {
                    Ok(table) => {
                        info!(path = %owned.display(), destinations = table.destinations.len(), "file reloaded");
                        tx.send_replace(Arc::new(table));
                        generation.fetch_add(1, Ordering::AcqRel);
                    }
                    Err(error) => {
                        warn!(path = %owned.display(), %error, "keeping the last good version of the file")
                    }
                }
                last = text;
            }
        };
        Ok((
            Watched {
                path: path.to_owned(),
                rx,
            },
            task,
        ))
    }

    pub fn current(&self) -> Arc<Table> {
        self.rx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Table>> {
        self.rx.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let err = Table::parse(bad, &HashMap::new()).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
