//! Discovery: the endpoints of a destination, kept current. A destination is an HTTP
//! authority (`host:port`) or, without one, an address. Sources are tried in the order
//! GOFE_DISCOVERY lists them: `file:PATH` knows the destinations its file lists; `dns`
//! knows names with A/AAAA records (re-resolved as their TTL says, within bounds, the
//! last good set kept when resolution fails). With no source knowing it, the original
//! destination, or the address itself, is the one endpoint.

pub mod dns;

use crate::addrs::EndpointAddr;
use crate::destination::BoxTask;
use crate::policy::file::Watched;
use gofe_identity::SpiffeId;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::debug;

/// What a destination is named by.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestKey {
    Name { host: String, port: u16 },
    Addr(SocketAddr),
}

impl DestKey {
    /// `host:port` (port 80 when absent), `ip:port` or `[ip6]:port`.
    pub fn parse(s: &str) -> Result<DestKey, String> {
        let authority: http::uri::Authority =
            s.parse().map_err(|_| format!("{s:?} is not host:port"))?;
        Ok(DestKey::from_authority(&authority, 80))
    }

    pub fn from_authority(a: &http::uri::Authority, default_port: u16) -> DestKey {
        let port = a.port_u16().unwrap_or(default_port);
        let host = a.host().trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) => DestKey::Addr(SocketAddr::new(ip, port)),
            Err(_) => DestKey::Name {
                host: host.trim_end_matches('.').to_ascii_lowercase(),
                port,
            },
        }
    }
}

impl fmt::Display for DestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DestKey::Name { host, port } => write!(f, "{host}:{port}"),
            DestKey::Addr(a) => write!(f, "{a}"),
        }
    }
}

/// One endpoint of a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: EndpointAddr,
    pub weight: u32,
    /// The identity its proxy must present, when discovery knows it: mTLS is then
    /// required, never a plaintext fallback.
    pub identity: Option<SpiffeId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Not known yet: the first resolution is under way.
    Pending,
    File,
    Dns,
    /// No source knew the destination: its original destination (or its address).
    Fallback,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Pending => "pending",
            Source::File => "file",
            Source::Dns => "dns",
            Source::Fallback => "original-destination",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSet {
    pub endpoints: Vec<Endpoint>,
    pub source: Source,
}

impl EndpointSet {
    fn pending() -> EndpointSet {
        EndpointSet {
            endpoints: Vec::new(),
            source: Source::Pending,
        }
    }
}

#[derive(Clone)]
enum SourceKind {
    Dns,
    File(Arc<Watched>),
}

/// The configured sources.
#[derive(Clone)]
pub struct Discovery {
    sources: Vec<SourceKind>,
    dns: Option<Arc<dns::Dns>>,
}

/// Parses GOFE_DISCOVERY: `dns`, `file:PATH`, comma-separated.
pub fn parse_sources(s: &str) -> Result<Vec<String>, String> {
    let parts: Vec<String> = s
        .split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    for p in &parts {
        if p != "dns" && p.strip_prefix("file:").is_none_or(|path| path.is_empty()) {
            return Err(format!(
                "{p:?} is not a source: expected dns or file:PATH, comma-separated"
            ));
        }
    }
    Ok(parts)
}

impl Discovery {
    /// The sources named by `sources` (as `parse_sources` gives them). File sources
    /// come with the tasks that keep them current.
    pub fn new(
        sources: &[String],
        dns_refresh: (Duration, Duration),
        base_policy: &std::collections::HashMap<String, String>,
        generation: Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<(Discovery, Vec<BoxTask>), String> {
        let mut kinds = Vec::new();
        let mut tasks: Vec<BoxTask> = Vec::new();
        let mut dns = None;
        for s in sources {
            if s == "dns" {
                match dns::Dns::new(dns_refresh.0, dns_refresh.1) {
                    Ok(d) => {
                        dns = Some(Arc::new(d));
                        kinds.push(SourceKind::Dns);
                    }
                    // Without a resolver configuration, destinations keep their
                    // original destination.
                    Err(error) => tracing::warn!(%error, "DNS discovery is off"),
                }
            } else if let Some(path) = s.strip_prefix("file:") {
                let (watched, task) = Watched::start(
                    std::path::Path::new(path),
                    base_policy.clone(),
                    generation.clone(),
                )?;
                kinds.push(SourceKind::File(Arc::new(watched)));
                tasks.push(Box::pin(task));
            }
        }
        Ok((
            Discovery {
                sources: kinds,
                dns,
            },
            tasks,
        ))
    }

    /// The file sources, whose tables may also carry policy.
    pub fn files(&self) -> impl Iterator<Item = &Arc<Watched>> {
        self.sources.iter().filter_map(|s| match s {
            SourceKind::File(w) => Some(w),
            SourceKind::Dns => None,
        })
    }

    /// Starts keeping the endpoints of `key` current. With no source knowing it, the
    /// set is empty (or, for an address, the address itself), marked `Fallback`: each
    /// request then goes to its own original destination. The task stops when the last
    /// receiver is dropped.
    pub fn watch(&self, key: DestKey) -> watch::Receiver<Arc<EndpointSet>> {
        let (tx, rx) = watch::channel(Arc::new(EndpointSet::pending()));
        let this = self.clone();
        tokio::spawn(async move { this.keep(key, tx).await });
        rx
    }

    async fn keep(self, key: DestKey, tx: watch::Sender<Arc<EndpointSet>>) {
        let mut files: Vec<watch::Receiver<Arc<crate::policy::file::Table>>> =
            self.files().map(|w| w.subscribe()).collect();
        let mut failures = 0u32;
        loop {
            let last = tx.borrow().clone();
            // Nobody listening any more: stop, even in the middle of a lookup.
            let resolved = tokio::select! {
                r = self.resolve(&key, &last) => r,
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
            tokio::select! {
                _ = tx.closed() => return,
                _ = file_changed => {}
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
    ) -> (EndpointSet, Option<Duration>, bool) {
        let mut recheck = None;
        for source in &self.sources {
            match source {
                SourceKind::File(w) => {
                    if let Some(endpoints) = w
                        .current()
                        .destinations
                        .get(key)
                        .and_then(|e| e.endpoints.clone())
                    {
                        return (
                            EndpointSet {
                                endpoints,
                                source: Source::File,
                            },
                            None,
                            false,
                        );
                    }
                }
                SourceKind::Dns => {
                    let (DestKey::Name { host, port }, Some(dns)) = (key, &self.dns) else {
                        continue;
                    };
                    match dns.resolve(host).await {
                        Ok(Some((ips, valid_for))) => {
                            let endpoints = ips
                                .into_iter()
                                .map(|ip| Endpoint {
                                    addr: EndpointAddr(SocketAddr::new(ip, *port)),
                                    weight: 1,
                                    identity: None,
                                })
                                .collect();
                            return (
                                EndpointSet {
                                    endpoints,
                                    source: Source::Dns,
                                },
                                Some(dns.refresh_after(valid_for)),
                                false,
                            );
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
        DestKey::Addr(a) => vec![Endpoint {
            addr: EndpointAddr(*a),
            weight: 1,
            identity: None,
        }],
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

    #[test]
    fn keys_normalize() {
        assert_eq!(
            DestKey::parse("API.Demo").unwrap(),
            DestKey::Name {
                host: "api.demo".into(),
                port: 80
            }
        );
        assert_eq!(
            DestKey::parse("api.demo.:8080").unwrap().to_string(),
            "api.demo:8080"
        );
        assert_eq!(
            DestKey::parse("10.0.0.1:5432").unwrap(),
            DestKey::Addr("10.0.0.1:5432".parse().unwrap())
        );
        assert_eq!(
            DestKey::parse("[fd00::1]:80").unwrap(),
            DestKey::Addr("[fd00::1]:80".parse().unwrap())
        );
        assert!(DestKey::parse("a b").is_err());
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            parse_sources("dns, file:/etc/gofe/d.yaml").unwrap(),
            vec!["dns", "file:/etc/gofe/d.yaml"]
        );
        assert!(parse_sources("consul").is_err());
        assert!(parse_sources("file:").is_err());
    }

    #[tokio::test]
    async fn a_file_destination_then_the_fallback() {
        let dir = std::env::temp_dir().join(format!("gofe-disc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.yaml");
        std::fs::write(&path, "destinations: [{name: api:80, endpoints: [{address: 10.0.0.1:8080}, {address: 10.0.0.2:8080}]}]").unwrap();
        let (d, tasks) = Discovery::new(
            &[format!("file:{}", path.display())],
            (Duration::from_secs(1), Duration::from_secs(60)),
            &Default::default(),
            Default::default(),
        )
        .unwrap();
        for t in tasks {
            tokio::spawn(t);
        }
        let mut rx = d.watch(DestKey::parse("api:80").unwrap());
        let set = rx
            .wait_for(|s| s.source != Source::Pending)
            .await
            .unwrap()
            .clone();
        assert_eq!(set.source, Source::File);
        assert_eq!(set.endpoints.len(), 2);
        let mut rx = d.watch(DestKey::parse("other:80").unwrap());
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
        let mut rx = d.watch(DestKey::parse("10.9.9.9:5432").unwrap());
        let set = rx
            .wait_for(|s| s.source != Source::Pending)
            .await
            .unwrap()
            .clone();
        assert_eq!(set.endpoints[0].addr.0, "10.9.9.9:5432".parse().unwrap());
        // The file changes: the watcher follows.
        std::fs::write(
            &path,
            "destinations: [{name: api:80, endpoints: [{address: 10.0.0.3:8080}]}]",
        )
        .unwrap();
        let mut rx = d.watch(DestKey::parse("api:80").unwrap());
        let set = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|s| s.endpoints.len() == 1),
        )
        .await
        .expect("the change is seen")
        .unwrap()
        .clone();
        assert_eq!(set.endpoints[0].addr.0, "10.0.0.3:8080".parse().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
