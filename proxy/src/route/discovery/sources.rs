//! The endpoints of a destination, kept current. Sources are asked in the order
//! GOFE_DISCOVERY lists them: `registry` knows the names with entries in etcd (those
//! that verify and that the destination's policy allows); `file:PATH` knows the
//! destinations its file lists; `dns`
//! knows names with A/AAAA records (re-resolved as their TTL says, within bounds, the
//! last good set kept when resolution fails). With no source knowing it, a destination
//! named by an address is its own one endpoint, and a request to one named by a host
//! goes to its own original destination.

use super::dns::Dns;
use super::file::{Generation, WatchError, Watched};
use super::registry::Registry;
use crate::addrs::{DestKey, EndpointAddr};
use crate::config::DiscoverySource;
use crate::config::file::Table;
use crate::endpoint::{Endpoint, EndpointSet, Source};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{Instrument, debug};

/// A task that keeps something current in the background.
pub type BoxTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("GOFE_DISCOVERY: {0}")]
    File(#[from] WatchError),
}

#[derive(Clone)]
enum Kind {
    Dns,
    File(Arc<Watched>),
    Registry(Arc<Registry>),
}

/// Which identities may serve a destination, as its policy says now (the registry's
/// entries are filtered by it).
pub type Allowed = Arc<dyn Fn(&DestKey) -> Option<Vec<gofe_identity::SpiffeId>> + Send + Sync>;

/// The configured sources.
#[derive(Clone)]
pub struct Discovery {
    sources: Vec<Kind>,
    dns: Option<Arc<Dns>>,
    generation: Generation,
}

impl Discovery {
    /// The sources `sources` names; file sources come with the tasks that keep them
    /// current (their policy values checked over `base_policy`, `generation` bumped on
    /// every reload).
    pub fn new(
        sources: &[DiscoverySource],
        dns_refresh: (Duration, Duration),
        base_policy: &HashMap<String, String>,
        generation: Generation,
        registry: Option<Arc<Registry>>,
    ) -> Result<(Discovery, Vec<BoxTask>), DiscoveryError> {
        let mut kinds = Vec::new();
        let mut tasks: Vec<BoxTask> = Vec::new();
        let mut dns = None;
        for s in sources {
            match s {
                DiscoverySource::Dns => match Dns::new(dns_refresh.0, dns_refresh.1) {
                    Ok(d) => {
                        dns = Some(Arc::new(d));
                        kinds.push(Kind::Dns);
                    }
                    // Without a resolver configuration, destinations keep their
                    // original destination.
                    Err(error) => tracing::warn!(%error, "DNS discovery is off"),
                },
                DiscoverySource::File(path) => {
                    let (watched, task) =
                        Watched::start(path, base_policy.clone(), generation.clone())?;
                    kinds.push(Kind::File(Arc::new(watched)));
                    tasks.push(Box::pin(task));
                }
                // (Its task is the caller's: the registry also serves policy.)
                DiscoverySource::Registry => {
                    if let Some(r) = &registry {
                        kinds.push(Kind::Registry(r.clone()));
                    }
                }
            }
        }
        Ok((
            Discovery {
                sources: kinds,
                dns,
                generation,
            },
            tasks,
        ))
    }

    /// The file sources, whose tables may also carry policy.
    pub fn files(&self) -> impl Iterator<Item = &Arc<Watched>> {
        self.sources.iter().filter_map(|s| match s {
            Kind::File(w) => Some(w),
            Kind::Dns | Kind::Registry(_) => None,
        })
    }

    fn registry(&self) -> Option<&Arc<Registry>> {
        self.sources.iter().find_map(|s| match s {
            Kind::Registry(r) => Some(r),
            _ => None,
        })
    }

    /// Starts keeping the endpoints of `key` current. The task stops when the last
    /// receiver is dropped.
    /// `allowed` says which identities the destination's policy admits.
    pub fn watch(&self, key: DestKey, allowed: Allowed) -> watch::Receiver<Arc<EndpointSet>> {
        let (tx, rx) = watch::channel(Arc::new(EndpointSet::pending()));
        let this = self.clone();
        tokio::spawn(async move { this.keep(key, tx, allowed).await });
        rx
    }

    async fn keep(self, key: DestKey, tx: watch::Sender<Arc<EndpointSet>>, allowed: Allowed) {
        let mut files: Vec<watch::Receiver<Arc<Table>>> =
            self.files().map(|w| w.subscribe()).collect();
        // With the registry: its entries change, or a policy (the identities allowed).
        let mut registry = self
            .registry()
            .map(|r| (r.subscribe(), self.generation.subscribe()));
        let mut failures = 0u32;
        loop {
            let last = tx.borrow().clone();
            // Each lookup is an operation span: an operator sees which refresh was
            // slow or failed, and what it found.
            let span = tracing::info_span!(
                target: gofe_telemetry::ops::TARGET,
                "discovery.refresh",
                destination = %key,
                source = tracing::field::Empty,
                endpoints = tracing::field::Empty,
                changed = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            // Nobody listening any more: stop, even in the middle of a lookup.
            let resolved = tokio::select! {
                r = self.resolve(&key, &last, &allowed).instrument(span.clone()) => r,
                _ = tx.closed() => return,
            };
            let (set, mut recheck, failed) = resolved;
            if failed {
                // Resolution failed: again soon, then less and less often.
                failures = failures.saturating_add(1);
                if let Some(dns) = &self.dns {
                    recheck = Some(dns.after_failures(failures));
                }
            } else {
                failures = 0;
            }
            span.record("source", set.source.as_str());
            span.record("endpoints", set.endpoints.len());
            span.record("changed", *last != set);
            if failed {
                span.record("otel.status_code", "ERROR");
            }
            drop(span);
            if *last != set {
                debug!(destination = %key, source = set.source.as_str(), endpoints = set.endpoints.len(), "endpoints changed");
                tx.send_replace(Arc::new(set));
            }
            let file_changed = async {
                if files.is_empty() {
                    std::future::pending::<()>().await;
                }
                let changes = files.iter_mut().map(|f| Box::pin(f.changed()));
                let _ = futures_util::future::select_all(changes).await;
            };
            let registry_changed = async {
                match &mut registry {
                    Some((entries, policy)) => {
                        let ok = tokio::select! {
                            r = entries.changed() => r.is_ok(),
                            r = policy.changed() => r.is_ok(),
                        };
                        if !ok {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tx.closed() => return,
                _ = file_changed => {}
                _ = registry_changed => {}
                _ = sleep_opt(recheck.take()) => {}
            }
        }
    }

    /// The endpoints now, when to look again (DNS TTLs), and whether resolution
    /// failed.
    async fn resolve(
        &self,
        key: &DestKey,
        last: &EndpointSet,
        allowed: &Allowed,
    ) -> (EndpointSet, Option<Duration>, bool) {
        let mut recheck = None;
        for source in &self.sources {
            match source {
                Kind::Registry(r) => {
                    let identities = allowed(key);
                    if let Some(answer) = r.endpoints(key, identities.as_deref()) {
                        let set = EndpointSet {
                            endpoints: answer.endpoints,
                            source: Source::Registry,
                        };
                        return (set, answer.recheck, false);
                    }
                }
                Kind::File(w) => {
                    if let Some(endpoints) = w
                        .current()
                        .destinations
                        .get(key)
                        .and_then(|e| e.endpoints.clone())
                    {
                        let set = EndpointSet {
                            endpoints,
                            source: Source::File,
                        };
                        return (set, None, false);
                    }
                }
                Kind::Dns => {
                    let (DestKey::Name { host, port }, Some(dns)) = (key, &self.dns) else {
                        continue;
                    };
                    match dns.resolve(host).await {
                        Ok(Some((ips, valid_for))) => {
                            let endpoints = ips
                                .into_iter()
                                .map(|ip| {
                                    Endpoint::bare(EndpointAddr::new(SocketAddr::new(ip, *port)))
                                })
                                .collect();
                            let set = EndpointSet {
                                endpoints,
                                source: Source::Dns,
                            };
                            return (set, Some(dns.refresh_after(valid_for)), false);
                        }
                        // No such name or no addresses: another source, or the
                        // fallback; the name may appear later.
                        Ok(None) => recheck = Some(dns.negative_recheck()),
                        Err(error) => {
                            debug!(destination = %key, %error, "DNS resolution failed");
                            // The last good set stays.
                            if last.source == Source::Dns {
                                return (last.clone(), None, true);
                            }
                            return (fallback_set(key), None, true);
                        }
                    }
                }
            }
        }
        (fallback_set(key), recheck, false)
    }
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// What no source knows: an address stands for itself; a name has no endpoints.
fn fallback_set(key: &DestKey) -> EndpointSet {
    let endpoints = match key {
        DestKey::Addr(a) => vec![Endpoint::bare(EndpointAddr::new(*a))],
        DestKey::Name { .. } => Vec::new(),
    };
    EndpointSet {
        endpoints,
        source: Source::Fallback,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none_allowed() -> Allowed {
        Arc::new(|_| None)
    }

    #[tokio::test]
    async fn a_file_destination_then_the_fallback() {
        let dir = std::env::temp_dir().join(format!("gofe-disc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.yaml");
        std::fs::write(&path, "destinations: [{name: api:80, endpoints: [{address: 10.0.0.1:8080}, {address: 10.0.0.2:8080}]}]").unwrap();
        let (d, tasks) = Discovery::new(
            &[DiscoverySource::File(path.clone())],
            (Duration::from_secs(1), Duration::from_secs(60)),
            &Default::default(),
            Default::default(),
            None,
        )
        .unwrap();
        for t in tasks {
            tokio::spawn(t);
        }
        let mut rx = d.watch(DestKey::parse("api:80").unwrap(), none_allowed());
        let set = rx
            .wait_for(|s| s.source != Source::Pending)
            .await
            .unwrap()
            .clone();
        assert_eq!(set.source, Source::File);
        assert_eq!(set.endpoints.len(), 2);
        let mut rx = d.watch(DestKey::parse("other:80").unwrap(), none_allowed());
        let set = rx
            .wait_for(|s| s.source != Source::Pending)
            .await
            .unwrap()
            .clone();
        assert_eq!(set.source, Source::Fallback);
        assert!(
            set.endpoints.is_empty(),
            "each request goes to its original destination"
        );
        let mut rx = d.watch(DestKey::parse("10.9.9.9:5432").unwrap(), none_allowed());
        let set = rx
            .wait_for(|s| s.source != Source::Pending)
            .await
            .unwrap()
            .clone();
        assert_eq!(
            set.endpoints[0].addr.addr(),
            "10.9.9.9:5432".parse().unwrap()
        );
        // The file changes: the watcher follows.
        std::fs::write(
            &path,
            "destinations: [{name: api:80, endpoints: [{address: 10.0.0.3:8080}]}]",
        )
        .unwrap();
        let mut rx = d.watch(DestKey::parse("api:80").unwrap(), none_allowed());
        let set = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|s| s.endpoints.len() == 1),
        )
        .await
        .expect("the change is seen")
        .unwrap()
        .clone();
        assert_eq!(
            set.endpoints[0].addr.addr(),
            "10.0.0.3:8080".parse().unwrap()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
