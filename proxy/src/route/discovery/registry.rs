//! The etcd registry and config center as a discovery source. One watch over the
//! prefix keeps a mirror of every entry and policy document; destinations read their
//! endpoints from it, keeping only entries that verify (see `entry`) and whose identity
//! their policy allows. A watch cut by compaction, or a lost connection, re-reads the
//! prefix once, after a jittered backoff. While etcd is away the mirror, the last good
//! state, keeps serving, and its age is shown; a destination it does not know falls
//! through to the next source.

use super::entry::{self, Reject, Verified};
use super::file::Generation;
use crate::addrs::DestKey;
use crate::config::RegistryConfig;
use crate::config::policy::Policy;
use crate::config::registry::{parse_inbound_document, parse_policy_document};
use crate::config::rules::InboundRules;
use crate::endpoint::Endpoint;
use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, KeyValue, TlsOptions,
    WatchOptions,
};
use gofe_identity::SpiffeId;
use gofe_identity::trust::TrustAnchors;
use gofe_telemetry::prom::{Exposition, Kind};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// A TCP connect to an etcd member that takes longer than this is a member that is not
/// there: try the next.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One read or write; etcd answers in milliseconds, a slow answer means a sick cluster.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 PINGs on the connection, so that a member that vanished without a reset is
/// noticed within seconds, not at the next TCP timeout.
const KEEPALIVE: Duration = Duration::from_secs(3);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Re-reads after a lost connection or a compaction wait this, doubling, up to the
/// cap, with full jitter: a thousand sidecars coming back do not arrive together.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read {what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the watch stream ended")]
    WatchEnded,
}

/// A connection to the etcd cluster `cfg` names (TLS, user and password as set), for the
/// proxy and for `gofe registry`.
pub async fn connect(cfg: &RegistryConfig) -> Result<Client, RegistryError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(KEEPALIVE, KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true)
        // A member cut off from the leader cancels our watches instead of serving a
        // history that stopped.
        .with_require_leader(true);
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| RegistryError::File {
            what,
            path: path.to_owned(),
            source,
        })
    };
    if let Some((user, file)) = &cfg.auth {
        let password = String::from_utf8_lossy(&read("the etcd password", file)?).into_owned();
        opts = opts.with_user(user.clone(), password.trim_end_matches(['\r', '\n']));
    }
    if let Some(tls) = &cfg.tls {
        let mut t =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read("the etcd CA", &tls.ca)?));
        if let Some((cert, key)) = &tls.client {
            t = t.identity(Identity::from_pem(
                read("the etcd client certificate", cert)?,
                read("the etcd client key", key)?,
            ));
        }
        opts = opts.with_tls(t);
    }
    within(Client::connect(&cfg.endpoints, Some(opts))).await
}

/// `f`, or a timeout error after REQUEST_TIMEOUT.
pub async fn within<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(RegistryError::Timeout(REQUEST_TIMEOUT)),
    }
}

/// The wait before attempt `n` (1, 2, ...) after failures: full jitter over an
/// exponential bound.
pub fn backoff(n: u32) -> Duration {
    let bound = BACKOFF_MIN
        .saturating_mul(
            1u32.checked_shl(n.saturating_sub(1).min(16))
                .unwrap_or(u32::MAX),
        )
        .min(BACKOFF_MAX);
    bound.mul_f64(0.5 + fastrand::f64() * 0.5)
}

struct Kv {
    value: Arc<[u8]>,
    mod_revision: i64,
}

/// What etcd held when last read, kept current by the watch.
#[derive(Default)]
struct Mirror {
    /// Entries by key, `<prefix>/services/<authority>/<address>`.
    services: BTreeMap<String, Kv>,
    /// Each destination's last good pushed policy.
    policies: HashMap<DestKey, Arc<Policy>>,
    /// The revision of the document last looked at per policy key (good or not), so a
    /// re-read does not judge (and count) the same document twice.
    policy_seen: HashMap<String, i64>,
    /// This pod's inbound ports' last good pushed rules, by document key (whose port
    /// they are for).
    inbound: BTreeMap<String, Arc<InboundRules>>,
    /// As `policy_seen`, for inbound documents.
    inbound_seen: HashMap<String, i64>,
    revision: i64,
    /// Read at least once: before that the registry knows nothing.
    synced: bool,
    connected: bool,
    /// When the mirror was last known current (the connection was lost then).
    stale_since: Option<Instant>,
}

/// One entry's verdict, kept while its value (mod revision) and the anchors stay.
struct Judged {
    mod_revision: i64,
    result: Result<Verified, (&'static str, String)>,
    /// Counted once as expired, or as not allowed by a policy.
    counted_late: bool,
}

#[derive(Default)]
struct Judgements {
    roots: Option<Arc<rustls::RootCertStore>>,
    by_key: HashMap<String, Judged>,
}

/// The registry's counters, which `/metrics` shows (the self-registration counts its
/// lease renewals here too).
#[derive(Default)]
pub struct RegistryStats {
    updates: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    renewals: Mutex<BTreeMap<&'static str, u64>>,
}

impl RegistryStats {
    pub fn update(&self, kind: &'static str, result: &'static str) {
        *self.updates.lock().entry((kind, result)).or_default() += 1;
    }

    pub fn rejected(&self, reason: &'static str) {
        *self.rejected.lock().entry(reason).or_default() += 1;
    }

    /// `ok`, `failed` (etcd did not answer), `expired` (the lease was gone: registered
    /// again).
    pub fn renewal(&self, result: &'static str) {
        *self.renewals.lock().entry(result).or_default() += 1;
    }

    pub fn rejected_count(&self, reason: &str) -> u64 {
        self.rejected.lock().get(reason).copied().unwrap_or(0)
    }
}

pub struct Registry {
    config: RegistryConfig,
    /// None with identity disabled: nothing can be verified, so no entry is used.
    anchors: Option<Arc<TrustAnchors>>,
    trust_domain: String,
    /// The policy variables as given, under the pushed documents.
    base: HashMap<String, String>,
    /// What this pod serves, `(service, app port)`: whose inbound documents apply here.
    served: Vec<(DestKey, u16)>,
    generation: Generation,
    mirror: RwLock<Mirror>,
    /// Bumped when entries change, waking the destinations that read them.
    changed: watch::Sender<u64>,
    judged: Mutex<Judgements>,
    pub stats: Arc<RegistryStats>,
    started: Instant,
}

/// What the registry says about one destination.
pub struct Answer {
    pub endpoints: Vec<Endpoint>,
    /// When the first of their certificates expires: look again then.
    pub recheck: Option<Duration>,
}

impl Registry {
    /// A registry for a pod that serves nothing (no inbound document applies to it).
    pub fn new(
        config: RegistryConfig,
        anchors: Option<Arc<TrustAnchors>>,
        trust_domain: &str,
        base: HashMap<String, String>,
        generation: Generation,
    ) -> Arc<Registry> {
        Self::serving(config, anchors, trust_domain, base, Vec::new(), generation)
    }

    /// A registry for a pod that serves `served` (`(service, app port)`, as it
    /// registers them): the inbound documents of those apply to it.
    pub fn serving(
        config: RegistryConfig,
        anchors: Option<Arc<TrustAnchors>>,
        trust_domain: &str,
        base: HashMap<String, String>,
        served: Vec<(DestKey, u16)>,
        generation: Generation,
    ) -> Arc<Registry> {
        if anchors.is_none() {
            warn!(
                "identity is disabled: registry entries cannot be verified and none is used (pushed policy still is)"
            );
        }
        Arc::new(Registry {
            config,
            anchors,
            trust_domain: trust_domain.to_string(),
            base,
            served,
            generation,
            mirror: RwLock::new(Mirror::default()),
            changed: watch::Sender::new(0),
            judged: Mutex::new(Judgements::default()),
            stats: Arc::new(RegistryStats::default()),
            started: Instant::now(),
        })
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Wakes on every change of the entries.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn is_connected(&self) -> bool {
        self.mirror.read().connected
    }

    /// How old the state is: zero while the watch runs, else the time since it was
    /// last known current (since start, before the first read).
    pub fn state_age(&self) -> Duration {
        let m = self.mirror.read();
        match (m.connected, m.stale_since) {
            (true, _) => Duration::ZERO,
            (false, Some(since)) => since.elapsed(),
            (false, None) => self.started.elapsed(),
        }
    }

    /// The pushed policy of `dest`, if one was.
    pub fn policy(&self, dest: &DestKey) -> Option<Arc<Policy>> {
        self.mirror.read().policies.get(dest).cloned()
    }

    /// The pushed rules of this pod's inbound `port`, if there are.
    pub fn inbound(&self, port: u16) -> Option<Arc<InboundRules>> {
        let m = self.mirror.read();
        m.inbound.values().find(|r| r.port == port).cloned()
    }

    /// Every pushed inbound port's rules.
    pub fn all_inbound(&self) -> Vec<Arc<InboundRules>> {
        self.mirror.read().inbound.values().cloned().collect()
    }

    /// Every pushed policy, by destination.
    pub fn policies(&self) -> Vec<(DestKey, Arc<Policy>)> {
        let m = self.mirror.read();
        m.policies
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect()
    }

    /// The endpoints registered for `dest` that verify and that `allowed` (the
    /// destination policy's identities, when it lists them) admits; None when the
    /// registry has no entry for it (the next source is asked).
    pub fn endpoints(&self, dest: &DestKey, allowed: Option<&[SpiffeId]>) -> Option<Answer> {
        self.endpoints_at(dest, allowed, SystemTime::now())
    }

    /// `endpoints` as of `now`.
    fn endpoints_at(
        &self,
        dest: &DestKey,
        allowed: Option<&[SpiffeId]>,
        now: SystemTime,
    ) -> Option<Answer> {
        if !matches!(dest, DestKey::Name { .. }) {
            return None;
        }
        let anchors = self.anchors.as_ref()?;
        let prefix = self.config.service_prefix(dest);
        let entries: Vec<(String, i64, Arc<[u8]>)> = {
            let m = self.mirror.read();
            m.services
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, kv)| (k.clone(), kv.mod_revision, kv.value.clone()))
                .collect()
        };
        if entries.is_empty() {
            return None;
        }
        let mut judged = self.judged.lock();
        let roots = anchors.roots();
        if !judged
            .roots
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(r, &roots))
        {
            // New anchors: every verdict is made again.
            judged.roots = Some(roots);
            judged.by_key.clear();
        }
        let mut endpoints = Vec::new();
        let mut first_expiry: Option<SystemTime> = None;
        for (key, mod_revision, value) in entries {
            let fresh = judged
                .by_key
                .get(&key)
                .is_none_or(|j| j.mod_revision != mod_revision);
            if fresh {
                let result = entry::verify(&key, &value, anchors, &self.trust_domain, now)
                    .map_err(|r| (r.reason(), r.to_string()));
                if let Err((reason, why)) = &result {
                    warn!(%key, reason, error = %why, "registry entry rejected");
                    self.stats.rejected(reason);
                }
                judged.by_key.insert(
                    key.clone(),
                    Judged {
                        mod_revision,
                        result,
                        counted_late: false,
                    },
                );
            }
            let j = judged.by_key.get_mut(&key).expect("judged above");
            let Ok(v) = &j.result else { continue };
            let late = if now >= v.not_after {
                Some(Reject::Signature(
                    gofe_identity::signed::VerifyError::Expired,
                ))
            } else {
                allowed
                    .filter(|list| {
                        v.endpoint
                            .identity
                            .as_ref()
                            .is_none_or(|id| !list.contains(id))
                    })
                    .map(|_| {
                        Reject::NotAllowed(
                            v.endpoint
                                .identity
                                .as_ref()
                                .map(ToString::to_string)
                                .unwrap_or_default(),
                        )
                    })
            };
            if let Some(reject) = late {
                if !j.counted_late {
                    j.counted_late = true;
                    warn!(%key, reason = reject.reason(), error = %reject, "registry entry rejected");
                    self.stats.rejected(reject.reason());
                }
                continue;
            }
            first_expiry = Some(first_expiry.map_or(v.not_after, |f| f.min(v.not_after)));
            endpoints.push(v.endpoint.clone());
        }
        let recheck = first_expiry
            .map(|t| t.duration_since(now).unwrap_or_default() + Duration::from_millis(500));
        Some(Answer { endpoints, recheck })
    }

    /// The entries of `dest` that were refused, and why, for `/endpoints`.
    pub fn rejected(&self, dest: &DestKey) -> Vec<(String, String)> {
        let prefix = self.config.service_prefix(dest);
        self.judged
            .lock()
            .by_key
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, j)| match &j.result {
                Err((_, why)) => Some((k[prefix.len()..].to_string(), why.clone())),
                Ok(_) => None,
            })
            .collect()
    }

    /// Keeps the mirror current, forever: read, watch; after a lost connection or a
    /// compaction, read again once, after a backoff.
    pub async fn run(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            let error = self.session(&mut failures).await;
            let was_connected = {
                let mut m = self.mirror.write();
                let was = m.connected;
                if was {
                    m.connected = false;
                    m.stale_since = Some(Instant::now());
                }
                was
            };
            if was_connected {
                warn!(%error, "registry connection lost: serving the last good state");
            } else if failures == 0 {
                // The first failure of a streak is worth an operator's eye; the
                // retries after it are not.
                warn!(%error, "registry unreachable: trying again");
            } else {
                debug!(%error, failures, "registry still unreachable");
            }
            failures = failures.saturating_add(1);
            tokio::time::sleep(backoff(failures)).await;
        }
    }

    /// One connection's life: reads, watches, reads again after a compaction; returns
    /// why it ended.
    async fn session(&self, failures: &mut u32) -> RegistryError {
        let mut client = match connect(&self.config).await {
            Ok(c) => c,
            Err(e) => return e,
        };
        let root = format!("{}/", self.config.prefix);
        let mut compactions = 0u32;
        loop {
            let read =
                within(client.get(root.clone(), Some(GetOptions::new().with_prefix()))).await;
            let resp = match read {
                Ok(r) => r,
                Err(e) => return e,
            };
            let revision = resp.header().map_or(0, |h| h.revision());
            self.replace(resp.kvs(), revision);
            *failures = 0;
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let mut stream = match within(client.watch(root.clone(), Some(opts))).await {
                Ok(s) => s,
                Err(e) => return e,
            };
            loop {
                let resp = match stream.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => return RegistryError::WatchEnded,
                    Err(e) => return e.into(),
                };
                if resp.compact_revision() > 0 || resp.canceled() {
                    compactions = compactions.saturating_add(1);
                    info!(
                        compact_revision = resp.compact_revision(),
                        reason = resp.cancel_reason(),
                        "registry watch cut: reading again"
                    );
                    self.stats.update("resync", "applied");
                    tokio::time::sleep(backoff(compactions)).await;
                    break;
                }
                compactions = 0;
                let revision = resp.header().map_or(0, |h| h.revision());
                self.apply(resp.events(), revision);
            }
        }
    }

    /// A full read: the mirror becomes what etcd holds.
    fn replace(&self, kvs: &[KeyValue], revision: i64) {
        let read = kvs
            .iter()
            .filter_map(|kv| Some((kv.key_str().ok()?, kv.value(), kv.mod_revision())));
        self.replace_all(read, revision);
    }

    /// `replace` over (key, value, mod revision).
    fn replace_all<'a>(&self, kvs: impl Iterator<Item = (&'a str, &'a [u8], i64)>, revision: i64) {
        let services_root = self.config.services_root();
        let policy_root = self.config.policy_root();
        let inbound_root = self.config.inbound_root();
        let mut services = BTreeMap::new();
        let mut docs = Vec::new();
        let mut inbound_docs = Vec::new();
        for (key, value, mod_revision) in kvs {
            if key.starts_with(&services_root) {
                services.insert(
                    key.to_string(),
                    Kv {
                        value: value.into(),
                        mod_revision,
                    },
                );
            } else if key.starts_with(&policy_root) {
                docs.push((key.to_string(), mod_revision, value.to_vec()));
            } else if key.starts_with(&inbound_root) {
                inbound_docs.push((key.to_string(), mod_revision, value.to_vec()));
            }
        }
        let policies_changed;
        {
            let mut m = self.mirror.write();
            m.services = services;
            let present: Vec<&str> = docs.iter().map(|(k, _, _)| k.as_str()).collect();
            let before = m.policies.len();
            m.policy_seen.retain(|k, _| present.contains(&k.as_str()));
            let keep: Vec<DestKey> = present
                .iter()
                .filter_map(|k| DestKey::parse(&k[policy_root.len()..]).ok())
                .collect();
            m.policies.retain(|d, _| keep.contains(d));
            let mut changed = m.policies.len() != before;
            for (key, rev, value) in docs {
                changed |= self.judge_policy(&mut m, &key, rev, Some(&value));
            }
            let present: Vec<&str> = inbound_docs.iter().map(|(k, _, _)| k.as_str()).collect();
            let before = m.inbound.len();
            m.inbound_seen.retain(|k, _| present.contains(&k.as_str()));
            m.inbound.retain(|k, _| present.contains(&k.as_str()));
            changed |= m.inbound.len() != before;
            for (key, rev, value) in inbound_docs {
                changed |= self.judge_inbound(&mut m, &key, rev, Some(&value));
            }
            policies_changed = changed;
            m.revision = revision;
            m.synced = true;
            if !m.connected {
                info!(
                    revision,
                    entries = m.services.len(),
                    policies = m.policies.len(),
                    "registry read"
                );
            }
            m.connected = true;
            m.stale_since = None;
        }
        let mut judged = self.judged.lock();
        let m = self.mirror.read();
        judged.by_key.retain(|k, _| m.services.contains_key(k));
        drop(m);
        drop(judged);
        // Every destination looks again (also those first seen before this read).
        self.changed.send_modify(|r| *r = revision as u64);
        if policies_changed {
            self.generation.bump();
        }
    }

    /// Events from the watch.
    fn apply(&self, events: &[etcd_client::Event], revision: i64) {
        let changes = events.iter().filter_map(|ev| {
            let kv = ev.kv()?;
            let put = ev.event_type() == EventType::Put;
            Some((
                kv.key_str().ok()?,
                put.then(|| kv.value()),
                kv.mod_revision(),
            ))
        });
        self.apply_changes(changes, revision);
    }

    /// `apply` over (key, value or None when deleted, mod revision).
    fn apply_changes<'a>(
        &self,
        changes: impl Iterator<Item = (&'a str, Option<&'a [u8]>, i64)>,
        revision: i64,
    ) {
        let services_root = self.config.services_root();
        let policy_root = self.config.policy_root();
        let inbound_root = self.config.inbound_root();
        let (mut services_changed, mut policies_changed) = (false, false);
        let mut m = self.mirror.write();
        for (key, value, mod_revision) in changes {
            if key.starts_with(&services_root) {
                services_changed = true;
                self.stats.update("services", "applied");
                match value {
                    Some(value) => {
                        m.services.insert(
                            key.to_string(),
                            Kv {
                                value: value.into(),
                                mod_revision,
                            },
                        );
                    }
                    None => {
                        m.services.remove(key);
                        self.judged.lock().by_key.remove(key);
                    }
                }
            } else if key.starts_with(&policy_root) {
                policies_changed |= self.judge_policy(&mut m, key, mod_revision, value);
            } else if key.starts_with(&inbound_root) {
                policies_changed |= self.judge_inbound(&mut m, key, mod_revision, value);
            }
        }
        m.revision = revision;
        drop(m);
        if services_changed {
            debug!(revision, "registry entries changed");
            self.changed.send_modify(|r| *r = revision as u64);
        }
        if policies_changed {
            self.generation.bump();
        }
    }

    /// A policy document put (Some) or deleted (None) at `key`; true if the policy in
    /// force changed. A bad document is refused and counted, and the last good stays.
    fn judge_policy(&self, m: &mut Mirror, key: &str, rev: i64, value: Option<&[u8]>) -> bool {
        let name = &key[self.config.policy_root().len()..];
        let dest = match DestKey::parse(name) {
            Ok(d) => d,
            Err(error) => {
                if m.policy_seen.insert(key.to_string(), rev) != Some(rev) {
                    warn!(%key, %error, "policy document refused");
                    self.stats.update("policy", "rejected");
                }
                return false;
            }
        };
        let Some(value) = value else {
            m.policy_seen.remove(key);
            self.stats.update("policy", "applied");
            info!(destination = %dest, "pushed policy removed");
            return m.policies.remove(&dest).is_some();
        };
        if m.policy_seen.insert(key.to_string(), rev) == Some(rev) {
            return false;
        }
        let text = String::from_utf8_lossy(value);
        match parse_policy_document(&dest, &text, &self.base) {
            Ok(policy) => {
                self.stats.update("policy", "applied");
                info!(destination = %dest, revision = rev, "pushed policy applied");
                let changed = m.policies.get(&dest).is_none_or(|p| **p != *policy);
                m.policies.insert(dest, policy);
                changed
            }
            Err(error) => {
                self.stats.update("policy", "rejected");
                warn!(destination = %dest, revision = rev, %error, "pushed policy refused: keeping the last good one");
                false
            }
        }
    }

    /// An inbound document put (Some) or deleted (None) at `key`
    /// (`<prefix>/inbound/<service>/<port>`); true if the rules in force changed. Only
    /// documents for what this pod serves apply; a bad one is refused and counted
    /// (`kind="inbound"`), and the last good stays.
    fn judge_inbound(&self, m: &mut Mirror, key: &str, rev: i64, value: Option<&[u8]>) -> bool {
        let name = &key[self.config.inbound_root().len()..];
        let parsed = name.rsplit_once('/').and_then(|(service, port)| {
            Some((DestKey::parse(service).ok()?, port.parse::<u16>().ok()?))
        });
        let Some((service, port)) = parsed else {
            if value.is_some() && m.inbound_seen.insert(key.to_string(), rev) != Some(rev) {
                warn!(%key, "inbound document refused: the key is not <service>/<port>");
                self.stats.update("inbound", "rejected");
            }
            return false;
        };
        if !self.served.iter().any(|(s, p)| *s == service && *p == port) {
            // Another pod's.
            return false;
        }
        let Some(value) = value else {
            m.inbound_seen.remove(key);
            self.stats.update("inbound", "applied");
            info!(%service, port, "pushed inbound rules removed");
            return m.inbound.remove(key).is_some();
        };
        if m.inbound_seen.insert(key.to_string(), rev) == Some(rev) {
            return false;
        }
        let text = String::from_utf8_lossy(value);
        match parse_inbound_document(port, &text, &self.base) {
            Ok(rules) => {
                self.stats.update("inbound", "applied");
                info!(%service, port, revision = rev, "pushed inbound rules applied");
                let changed = m.inbound.get(key).is_none_or(|r| **r != *rules);
                m.inbound.insert(key.to_string(), rules);
                changed
            }
            Err(error) => {
                self.stats.update("inbound", "rejected");
                warn!(%service, port, revision = rev, %error, "pushed inbound rules refused: keeping the last good ones");
                false
            }
        }
    }

    /// The registry's part of `/endpoints`.
    pub fn to_json(&self) -> serde_json::Value {
        let age = (self.state_age().as_secs_f64() * 10.0).round() / 10.0;
        let m = self.mirror.read();
        let policies: Vec<String> = m.policies.keys().map(|k| k.to_string()).collect();
        serde_json::json!({
            "connected": m.connected,
            "synced": m.synced,
            "revision": m.revision,
            "entries": m.services.len(),
            "policies": policies,
            "state_age_seconds": age,
        })
    }

    /// The `gofe_registry_*` metrics.
    pub fn render(&self, e: &mut Exposition) {
        e.family(
            "gofe_registry_connected",
            "1 while the registry's watch runs, 0 while etcd is unreachable.",
            Kind::Gauge,
        );
        e.sample(
            "gofe_registry_connected",
            &[],
            u64::from(self.is_connected()),
        );
        e.family(
            "gofe_registry_state_age_seconds",
            "How old the registry state in use is: 0 while watching, else the time since it was last known current.",
            Kind::Gauge,
        );
        e.sample(
            "gofe_registry_state_age_seconds",
            &[],
            self.state_age().as_secs_f64(),
        );
        e.family(
            "gofe_registry_updates_total",
            "Changes read from the registry, by kind (services, policy, resync) and result (applied, rejected).",
            Kind::Counter,
        );
        for ((kind, result), n) in self.stats.updates.lock().iter() {
            e.sample(
                "gofe_registry_updates_total",
                &[("kind", kind), ("result", result)],
                *n,
            );
        }
        e.family(
            "gofe_registry_entries_rejected_total",
            "Registry entries refused: malformed, key, signature, untrusted, expired, identity, not_allowed.",
            Kind::Counter,
        );
        for (reason, n) in self.stats.rejected.lock().iter() {
            e.sample(
                "gofe_registry_entries_rejected_total",
                &[("reason", reason)],
                *n,
            );
        }
        e.family(
            "gofe_registry_lease_renewals_total",
            "Keep-alives of this pod's registration lease: ok, failed, expired (registered again).",
            Kind::Counter,
        );
        for (result, n) in self.stats.renewals.lock().iter() {
            e.sample(
                "gofe_registry_lease_renewals_total",
                &[("result", result)],
                *n,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gofe_identity::issuer::material;
    use gofe_identity::issuer::sign::{Allowed, Signer};
    use gofe_identity::store::CertStore;

    const API: &str = "spiffe://cluster.local/ns/demo/sa/api";

    struct Mesh {
        _dir: tempfile::TempDir,
        anchors: Arc<TrustAnchors>,
        signer: Signer,
    }

    fn mesh() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        material::bootstrap(dir.path(), "cluster.local").unwrap();
        let m = material::load(dir.path()).unwrap();
        Mesh {
            anchors: Arc::new(TrustAnchors::from_pem(&m.anchors_pem).unwrap()),
            signer: Signer::new(
                m.issuer,
                m.chain_pem,
                m.not_after,
                Duration::from_secs(3600),
                "cluster.local".into(),
            ),
            _dir: dir,
        }
    }

    fn store(mesh: &Mesh, name: &str) -> Arc<CertStore> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(name.try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let signed = mesh.signer.sign(&csr, &Allowed::AnyInTrustDomain).unwrap();
        let store = CertStore::new();
        let signing =
            gofe_identity::store::signing_key(&gofe_identity::trust::provider(), &key).unwrap();
        let chain = gofe_identity::cert::certs_from_pem(signed.chain_pem.as_bytes()).unwrap();
        let info = gofe_identity::cert::inspect(&chain[0]).unwrap();
        store.set(chain, info, signing);
        store
    }

    fn registry(mesh: &Mesh) -> Arc<Registry> {
        let config = RegistryConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            tls: None,
            auth: None,
            prefix: "/gofe".into(),
        };
        Registry::serving(
            config,
            Some(mesh.anchors.clone()),
            "cluster.local",
            HashMap::new(),
            vec![(api(), 8080)],
            Generation::default(),
        )
    }

    /// The key and signed value of an entry for api.demo:80 at `address`.
    fn entry(store: &CertStore, address: &str, identity: &str, weight: u32) -> (String, Vec<u8>) {
        let key = format!("/gofe/services/api.demo:80/{address}");
        let claim = entry::Claim {
            address: address.parse().unwrap(),
            identity: identity.into(),
            weight,
            metadata: [("version".to_string(), "v2".to_string())].into(),
        };
        let value = entry::sign(&key, &claim, store).unwrap();
        (key, value)
    }

    fn api() -> DestKey {
        DestKey::parse("api.demo:80").unwrap()
    }

    #[test]
    fn entries_that_verify_are_endpoints_with_their_weight_metadata_and_identity() {
        let mesh = mesh();
        let r = registry(&mesh);
        let api_store = store(&mesh, API);
        let (k1, v1) = entry(&api_store, "10.0.0.1:8080", API, 3);
        // Claims api's identity with another workload's certificate.
        let (k2, v2) = entry(
            &store(&mesh, "spiffe://cluster.local/ns/demo/sa/web"),
            "10.0.0.2:8080",
            API,
            1,
        );
        // api's entry, its address changed.
        let (_, v3) = entry(&api_store, "10.0.0.3:8080", API, 1);
        let tampered = String::from_utf8(v3)
            .unwrap()
            .replace("10.0.0.3:8080", "10.0.0.4:8080");
        let k4 = "/gofe/services/api.demo:80/10.0.0.4:8080".to_string();
        r.replace_all(
            [
                (k1.as_str(), v1.as_slice(), 1),
                (k2.as_str(), v2.as_slice(), 2),
                (k4.as_str(), tampered.as_bytes(), 3),
            ]
            .into_iter(),
            3,
        );
        let answer = r.endpoints(&api(), None).unwrap();
        assert_eq!(answer.endpoints.len(), 1);
        let e = &answer.endpoints[0];
        assert_eq!(e.addr.addr(), "10.0.0.1:8080".parse().unwrap());
        assert_eq!(e.weight, 3);
        assert_eq!(e.identity.as_ref().unwrap().to_string(), API);
        assert_eq!(e.metadata["version"], "v2");
        assert_eq!(r.stats.rejected_count("identity"), 1);
        assert_eq!(r.stats.rejected_count("signature"), 1);
        assert_eq!(r.rejected(&api()).len(), 2);
        // Read again: judged once, counted once.
        r.endpoints(&api(), None).unwrap();
        assert_eq!(r.stats.rejected_count("signature"), 1);
        // Unknown to the registry: the next source is asked.
        assert!(
            r.endpoints(&DestKey::parse("web.demo:80").unwrap(), None)
                .is_none()
        );
        // The policy allows another identity only: nothing is used, and that is counted.
        let web: SpiffeId = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        let none = r.endpoints(&api(), Some(&[web])).unwrap();
        assert!(none.endpoints.is_empty());
        assert_eq!(r.stats.rejected_count("not_allowed"), 1);
        // Deleted: gone.
        r.apply_changes([(k1.as_str(), None, 4)].into_iter(), 4);
        assert!(r.endpoints(&api(), None).unwrap().endpoints.is_empty());
    }

    #[test]
    fn an_entry_whose_certificate_expired_is_dropped() {
        let mesh = mesh();
        let r = registry(&mesh);
        let (k, v) = entry(&store(&mesh, API), "10.0.0.1:8080", API, 1);
        r.replace_all([(k.as_str(), v.as_slice(), 1)].into_iter(), 1);
        let answer = r.endpoints(&api(), None).unwrap();
        assert_eq!(answer.endpoints.len(), 1);
        assert!(
            answer.recheck.unwrap() <= Duration::from_secs(3601),
            "looked at again by expiry"
        );
        let later = SystemTime::now() + Duration::from_secs(7200);
        assert!(
            r.endpoints_at(&api(), None, later)
                .unwrap()
                .endpoints
                .is_empty()
        );
        assert_eq!(r.stats.rejected_count("expired"), 1);
    }

    #[test]
    fn a_bad_policy_document_is_refused_and_the_last_good_stays() {
        let mesh = mesh();
        let r = registry(&mesh);
        let key = "/gofe/policy/api.demo:80";
        let good = b"destinations: [{name: api.demo:80, policy: {retry_on: 5xx}}]";
        r.apply_changes([(key, Some(good.as_slice()), 1)].into_iter(), 1);
        assert!(r.policy(&api()).unwrap().retry.on.status_5xx);
        let bad = b"destinations: [{name: api.demo:80, policy: {retry_on: never}}]";
        r.apply_changes([(key, Some(bad.as_slice()), 2)].into_iter(), 2);
        assert!(
            r.policy(&api()).unwrap().retry.on.status_5xx,
            "the last good stays"
        );
        // Under another destination's key, or with endpoints: refused too.
        let other = b"destinations: [{name: web.demo:80, policy: {retry_limit: 1}}]";
        r.apply_changes([(key, Some(other.as_slice()), 3)].into_iter(), 3);
        let updates = r.stats.updates.lock().clone();
        assert_eq!(updates[&("policy", "applied")], 1);
        assert_eq!(updates[&("policy", "rejected")], 2);
        // A full read that no longer has it: removed.
        r.replace_all(std::iter::empty(), 4);
        assert!(r.policy(&api()).is_none());
    }

    #[test]
    fn inbound_documents_of_this_pod_apply_and_a_bad_one_is_refused() {
        let mesh = mesh();
        let r = registry(&mesh);
        let key = "/gofe/inbound/api.demo:80/8080";
        let good = b"inbound: [{port: 8080, rate_limit: {requests_per_second: 5, burst: 10}}]";
        r.apply_changes([(key, Some(good.as_slice()), 1)].into_iter(), 1);
        let rules = r.inbound(8080).expect("applied");
        assert_eq!(rules.rate_limit.as_ref().unwrap().total.unwrap().burst, 10);
        // Bad: a misspelt field, another port than the key's, a policy inside.
        for (rev, bad) in [
            "inbound: [{port: 8080, rate_limt: {requests_per_second: 1}}]",
            "inbound: [{port: 9090, max_concurrent_requests: 1}]",
            "destinations: [{name: a, policy: {retry_limit: 1}}]",
        ]
        .into_iter()
        .enumerate()
        {
            let rev = rev as i64 + 2;
            r.apply_changes([(key, Some(bad.as_bytes()), rev)].into_iter(), rev);
        }
        assert_eq!(r.inbound(8080), Some(rules), "the last good stays");
        // Another pod's service or port: not this pod's business, not counted.
        let theirs = "/gofe/inbound/web.demo:80/8080";
        r.apply_changes([(theirs, Some(good.as_slice()), 9)].into_iter(), 9);
        let updates = r.stats.updates.lock().clone();
        assert_eq!(updates[&("inbound", "applied")], 1);
        assert_eq!(updates[&("inbound", "rejected")], 3);
        // Deleted: gone.
        r.apply_changes([(key, None, 10)].into_iter(), 10);
        assert!(r.inbound(8080).is_none());
        // A policy document with inbound rules is refused, not half applied.
        let mixed = b"destinations: [{name: api.demo:80, policy: {retry_limit: 1}}]\ninbound: [{port: 8080}]";
        r.apply_changes(
            [("/gofe/policy/api.demo:80", Some(mixed.as_slice()), 11)].into_iter(),
            11,
        );
        assert!(r.policy(&api()).is_none());
    }
}
