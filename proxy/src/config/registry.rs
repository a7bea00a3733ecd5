//! The registry's settings: where etcd is and how to reach it (shared by the proxy and
//! `gofe registry`), and what this pod registers. Read with the other variables, every
//! bad value reported with its name.

use super::env::Env;
use super::file::{FileError, Table};
use super::parse::parse_nonzero_duration;
use super::policy::Policy;
use super::rules::InboundRules;
use super::vars::*;
use crate::addrs::DestKey;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How to reach etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryConfig {
    /// `http://h:2379` or `https://h:2379`, all of one scheme.
    pub endpoints: Vec<String>,
    pub tls: Option<RegistryTls>,
    /// User name and the file holding the password (read when connecting, so that a
    /// rotated Secret is used on the next connection).
    pub auth: Option<(String, PathBuf)>,
    /// Key prefix: entries under `<prefix>/services/`, policy under `<prefix>/policy/`.
    pub prefix: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryTls {
    pub ca: PathBuf,
    /// Client certificate and key, when etcd asks for one.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl RegistryConfig {
    /// Where `authority`'s endpoints live: `<prefix>/services/<authority>/`.
    pub fn service_prefix(&self, authority: &DestKey) -> String {
        format!("{}/services/{authority}/", self.prefix)
    }

    pub fn services_root(&self) -> String {
        format!("{}/services/", self.prefix)
    }

    pub fn policy_root(&self) -> String {
        format!("{}/policy/", self.prefix)
    }

    pub fn inbound_root(&self) -> String {
        format!("{}/inbound/", self.prefix)
    }
}

/// One service this pod serves: clients reach `service` through `port` on this pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    pub service: DestKey,
    pub port: u16,
    pub weight: u32,
}

impl fmt::Display for Registered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.service, self.port)?;
        if self.weight != 1 {
            write!(f, "@{}", self.weight)?;
        }
        Ok(())
    }
}

/// What this pod registers, and on what terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterConfig {
    pub services: Vec<Registered>,
    /// The address others reach this pod on; None: the address this host uses to reach
    /// etcd.
    pub address: Option<IpAddr>,
    pub ttl: Duration,
    pub metadata: BTreeMap<String, String>,
}

/// `api.demo:80=8080,api.demo:9090=9090`; `@N` after the port gives a weight.
pub fn parse_register(s: &str) -> Result<Vec<Registered>, String> {
    const EXPECTED: &str =
        "expected service:port=app-port[@weight], comma-separated (api.demo:80=8080)";
    let mut out: Vec<Registered> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (service, rest) = part.split_once('=').ok_or(EXPECTED)?;
        let (port, weight) = match rest.split_once('@') {
            Some((p, w)) => (p, w.trim().parse::<u32>().ok().filter(|w| *w > 0)),
            None => (rest, Some(1)),
        };
        let weight = weight.ok_or_else(|| format!("{part:?}: a weight is a number above 0"))?;
        let port = port
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{part:?}: {EXPECTED}"))?;
        let service = DestKey::parse(service.trim()).map_err(|e| format!("{part:?}: {e}"))?;
        if matches!(service, DestKey::Addr(_)) {
            return Err(format!("{part:?}: a service is a name, not an address"));
        }
        if out.iter().any(|r| r.service == service) {
            return Err(format!("{service} is registered twice"));
        }
        out.push(Registered {
            service,
            port,
            weight,
        });
    }
    Ok(out)
}

/// `version=v2,zone=a`.
pub fn parse_metadata(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected key=value, comma-separated"))?;
        let k = k.trim();
        let valid = |c: char| c.is_ascii_alphanumeric() || "-_./".contains(c);
        if k.is_empty() || !k.chars().all(valid) {
            return Err(format!(
                "{k:?}: a key is letters, digits and - _ . / (version=v2,zone=a)"
            ));
        }
        out.insert(k.to_string(), v.trim().to_string());
    }
    Ok(out)
}

fn parse_endpoints(s: &str) -> Result<Vec<String>, String> {
    let list: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    for e in &list {
        let rest = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
            .ok_or_else(|| format!("{e:?}: expected http://host:port or https://host:port"))?;
        let uri: http::Uri = e.parse().map_err(|_| format!("{e:?} is not a URL"))?;
        if uri.port_u16().is_none() || rest.trim_end_matches('/').contains('/') {
            return Err(format!(
                "{e:?}: expected http://host:port (etcd's client URL)"
            ));
        }
    }
    let https = list.iter().filter(|e| e.starts_with("https://")).count();
    if https != 0 && https != list.len() {
        return Err("every endpoint http://, or every one https://".into());
    }
    Ok(list)
}

fn path_or_none(s: &str) -> Result<Option<PathBuf>, String> {
    Ok((!s.trim().is_empty()).then(|| PathBuf::from(s.trim())))
}

impl RegistryConfig {
    /// The registry variables; None when GOFE_REGISTRY is empty. Files named are
    /// checked when `check_files`.
    pub fn read(env: &mut Env<'_>) -> Option<RegistryConfig> {
        let endpoints = env.get(&REGISTRY, parse_endpoints);
        let ca = env.get(&REGISTRY_CA, path_or_none);
        let cert = env.get(&REGISTRY_CERT, path_or_none);
        let key = env.get(&REGISTRY_KEY, path_or_none);
        let user = env.get(&REGISTRY_USER, |s| Ok::<_, String>(s.trim().to_string()));
        let password_file = env.get(&REGISTRY_PASSWORD_FILE, path_or_none);
        let prefix = env.get(&REGISTRY_PREFIX, |s| {
            let p = s.trim();
            if p.len() > 1 && p.starts_with('/') && !p.ends_with('/') && !p.contains("//") {
                Ok(p.to_string())
            } else {
                Err("expected a key prefix such as /gofe (a leading /, no trailing /)".into())
            }
        });
        if endpoints.is_empty() {
            for (var, set) in [
                (&REGISTRY_CA, ca.is_some()),
                (&REGISTRY_CERT, cert.is_some()),
                (&REGISTRY_USER, !user.is_empty()),
            ] {
                if set {
                    env.reject(var, "(set)", "nothing without GOFE_REGISTRY");
                }
            }
            return None;
        }
        let https = endpoints[0].starts_with("https://");
        let tls = match (https, ca, cert, key) {
            (false, None, None, None) => None,
            (false, ..) => {
                env.reject(
                    &REGISTRY,
                    endpoints.join(","),
                    "https:// endpoints, since GOFE_REGISTRY_CA/CERT/KEY are set",
                );
                None
            }
            (true, None, ..) => {
                env.reject(
                    &REGISTRY_CA,
                    "",
                    "the CA that signed etcd's certificate (https://)",
                );
                None
            }
            (true, Some(ca), None, None) => Some(RegistryTls { ca, client: None }),
            (true, Some(ca), Some(cert), Some(key)) => Some(RegistryTls {
                ca,
                client: Some((cert, key)),
            }),
            (true, Some(_), cert, _) => {
                let (var, other) = if cert.is_some() {
                    (&REGISTRY_KEY, "GOFE_REGISTRY_CERT")
                } else {
                    (&REGISTRY_CERT, "GOFE_REGISTRY_KEY")
                };
                env.reject(var, "", format!("a file, since {other} is set"));
                None
            }
        };
        let auth = match (user.is_empty(), password_file) {
            (true, None) => None,
            (false, Some(file)) => Some((user, file)),
            (false, None) => {
                env.reject(
                    &REGISTRY_PASSWORD_FILE,
                    "",
                    "a file, since GOFE_REGISTRY_USER is set",
                );
                None
            }
            (true, Some(file)) => {
                env.reject(
                    &REGISTRY_USER,
                    "",
                    format!(
                        "a user, since GOFE_REGISTRY_PASSWORD_FILE={} is set",
                        file.display()
                    ),
                );
                None
            }
        };
        if env.check_files {
            let files = tls
                .iter()
                .flat_map(|t| {
                    std::iter::once((&REGISTRY_CA, t.ca.clone())).chain(t.client.iter().flat_map(
                        |(c, k)| [(&REGISTRY_CERT, c.clone()), (&REGISTRY_KEY, k.clone())],
                    ))
                })
                .chain(
                    auth.iter()
                        .map(|(_, f)| (&REGISTRY_PASSWORD_FILE, f.clone())),
                )
                .collect::<Vec<_>>();
            for (var, path) in files {
                if let Err(e) = std::fs::metadata(&path) {
                    env.reject(var, path.display(), format!("a readable file ({e})"));
                }
            }
        }
        Some(RegistryConfig {
            endpoints,
            tls,
            auth,
            prefix,
        })
    }
}

impl RegisterConfig {
    /// What this pod registers; None when GOFE_REGISTER is empty. Registering needs
    /// the registry and an identity (entries are signed with the mesh key).
    pub fn read(env: &mut Env<'_>, registry: bool, identity: bool) -> Option<RegisterConfig> {
        let services = env.get(&REGISTER, parse_register);
        let address = env.get(&REGISTER_ADDRESS, |s| {
            if s.trim().is_empty() {
                Ok(None)
            } else {
                s.trim()
                    .parse::<IpAddr>()
                    .map(Some)
                    .map_err(|_| "expected an IP address (the pod's, status.podIP)".into())
            }
        });
        let ttl = env.get(&REGISTER_TTL, |s| {
            let d = parse_nonzero_duration(s)?;
            if !(Duration::from_secs(2)..=Duration::from_secs(3600)).contains(&d) {
                return Err("expected 2s to 1h (etcd counts leases in seconds)".into());
            }
            Ok(d)
        });
        let metadata = env.get(&REGISTER_METADATA, parse_metadata);
        if services.is_empty() {
            return None;
        }
        if !registry {
            env.reject(&REGISTER, "(set)", "nothing without GOFE_REGISTRY");
            return None;
        }
        if !identity {
            env.reject(
                &REGISTER,
                "(set)",
                "nothing without an identity: entries are signed with the mesh key (GOFE_IDENTITY_DISABLED=true)",
            );
            return None;
        }
        Some(RegisterConfig {
            services,
            address,
            ttl,
            metadata,
        })
    }
}

/// What is wrong with a policy document meant for the registry.
#[derive(Debug, thiserror::Error)]
pub enum PolicyDocError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0}: endpoints come from registrations, not from policy documents")]
    Endpoints(String),
    #[error("the document is stored for {key} but names {named}")]
    Name { key: String, named: String },
    #[error("a stored document names exactly one destination; this one names {0}")]
    Count(usize),
    #[error(
        "inbound rules are stored apart, under <prefix>/inbound/<service>/<port>, not in a destination's policy"
    )]
    InboundInPolicy,
    #[error(
        "an inbound document gives the rules of exactly one port, {key}; this one gives {given:?}"
    )]
    InboundPorts { key: u16, given: Vec<u16> },
    #[error("an inbound document gives no destinations")]
    DestinationsInInbound,
}

/// The rules of inbound `port` from the document stored at
/// `<prefix>/inbound/<service>/<port>`: the policy file's `inbound:` schema with that one
/// port, checked by the file's own parser.
pub fn parse_inbound_document(
    port: u16,
    text: &str,
    base: &HashMap<String, String>,
) -> Result<Arc<InboundRules>, PolicyDocError> {
    let mut table = Table::parse(text, base)?;
    if !table.destinations.is_empty() {
        return Err(PolicyDocError::DestinationsInInbound);
    }
    match table.inbound.remove(&port) {
        Some(rules) if table.inbound.is_empty() => Ok(rules),
        other => {
            let mut given: Vec<u16> = table.inbound.keys().copied().collect();
            given.extend(other.map(|r| r.port));
            given.sort_unstable();
            Err(PolicyDocError::InboundPorts { key: port, given })
        }
    }
}

/// The policy of `dest` from the document stored at `<prefix>/policy/<dest>`: the policy
/// file's schema with that one destination, checked by the file's own parser over
/// `base` (the defaults' values).
pub fn parse_policy_document(
    dest: &DestKey,
    text: &str,
    base: &HashMap<String, String>,
) -> Result<Arc<Policy>, PolicyDocError> {
    let mut table = Table::parse(text, base)?;
    if !table.inbound.is_empty() {
        return Err(PolicyDocError::InboundInPolicy);
    }
    if table.destinations.len() != 1 {
        return Err(PolicyDocError::Count(table.destinations.len()));
    }
    let (named, entry) = table.destinations.drain().next().expect("one destination");
    if named != *dest {
        return Err(PolicyDocError::Name {
            key: dest.to_string(),
            named: named.to_string(),
        });
    }
    if entry.endpoints.is_some() {
        return Err(PolicyDocError::Endpoints(named.to_string()));
    }
    Ok(entry.policy)
}

/// A policy file cut into the documents the registry stores, one per destination,
/// after the whole file passed the file's parser (one mistake refuses all of it).
pub fn split_policy_file(
    text: &str,
    base: &HashMap<String, String>,
) -> Result<Vec<(DestKey, String)>, PolicyDocError> {
    let table = Table::parse(text, base)?;
    if !table.inbound.is_empty() {
        return Err(PolicyDocError::InboundInPolicy);
    }
    if let Some((k, _)) = table
        .destinations
        .iter()
        .find(|(_, e)| e.endpoints.is_some())
    {
        return Err(PolicyDocError::Endpoints(k.to_string()));
    }
    let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(FileError::from)?;
    let mut out = Vec::new();
    let items = doc
        .get("destinations")
        .and_then(|d| d.as_sequence())
        .cloned()
        .unwrap_or_default();
    for item in items {
        let name = item
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or_default();
        let key = DestKey::parse(name).map_err(FileError::from)?;
        let mut one = serde_yaml::Mapping::new();
        one.insert(
            "destinations".into(),
            serde_yaml::Value::Sequence(vec![item.clone()]),
        );
        let text = serde_yaml::to_string(&one).map_err(FileError::from)?;
        out.push((key, text));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pairs: &[(&str, &str)]) -> (Option<RegistryConfig>, Vec<&'static str>) {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut env = Env::from_map(&map);
        env.check_files = false;
        let r = RegistryConfig::read(&mut env);
        let names = env.finish().err().map(|e| e.0).unwrap_or_default();
        (r, names.into_iter().map(|b| b.name).collect())
    }

    #[test]
    fn endpoints_tls_and_auth_are_checked_together() {
        let (r, bad) = read(&[("GOFE_REGISTRY", "http://10.0.0.1:2379, http://e2:2379")]);
        assert!(bad.is_empty(), "{bad:?}");
        let r = r.unwrap();
        assert_eq!(r.endpoints.len(), 2);
        assert_eq!(r.prefix, "/gofe");
        assert_eq!(
            r.service_prefix(&DestKey::parse("API.demo").unwrap()),
            "/gofe/services/api.demo:80/"
        );
        let (_, bad) = read(&[("GOFE_REGISTRY", "https://e:2379")]);
        assert_eq!(bad, vec!["GOFE_REGISTRY_CA"]);
        let (_, bad) = read(&[("GOFE_REGISTRY", "http://e:2379,https://f:2379")]);
        assert_eq!(bad, vec!["GOFE_REGISTRY"]);
        let (_, bad) = read(&[("GOFE_REGISTRY", "e:2379")]);
        assert_eq!(bad, vec!["GOFE_REGISTRY"]);
        let (r, bad) = read(&[
            ("GOFE_REGISTRY", "https://e:2379"),
            ("GOFE_REGISTRY_CA", "/ca.pem"),
            ("GOFE_REGISTRY_CERT", "/c.pem"),
            ("GOFE_REGISTRY_KEY", "/k.pem"),
            ("GOFE_REGISTRY_USER", "gofe"),
            ("GOFE_REGISTRY_PASSWORD_FILE", "/pw"),
            ("GOFE_REGISTRY_PREFIX", "/mesh/a"),
        ]);
        assert!(bad.is_empty(), "{bad:?}");
        let r = r.unwrap();
        assert!(r.tls.unwrap().client.is_some());
        assert_eq!(r.auth.unwrap().0, "gofe");
        let (_, bad) = read(&[
            ("GOFE_REGISTRY", "http://e:2379"),
            ("GOFE_REGISTRY_USER", "gofe"),
            ("GOFE_REGISTRY_PREFIX", "gofe/"),
        ]);
        assert_eq!(
            bad,
            vec!["GOFE_REGISTRY_PREFIX", "GOFE_REGISTRY_PASSWORD_FILE"]
        );
    }

    #[test]
    fn registrations_parse_with_ports_and_weights() {
        let r = parse_register("api.demo:80=8080, api.demo:9090=9090@3").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].port, 8080);
        assert_eq!(r[1].weight, 3);
        assert_eq!(r[1].to_string(), "api.demo:9090=9090@3");
        for bad in [
            "api.demo:80",
            "api.demo:80=0",
            "api.demo:80=8080@0",
            "10.0.0.1:80=8080",
            "a:80=1,a:80=2",
        ] {
            assert!(parse_register(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_metadata("version=v2, zone=a").unwrap()["zone"],
            "a".to_string()
        );
        assert!(parse_metadata("version").is_err());
    }

    #[test]
    fn policy_files_split_into_documents_the_readers_accept() {
        let text = "destinations:\n  - name: api.demo\n    policy:\n      retry_on: 5xx\n      identities: [spiffe://cluster.local/ns/demo/sa/api]\n  - name: web.demo:8080\n    policy: {retry_limit: 3}\n";
        let docs = split_policy_file(text, &HashMap::new()).unwrap();
        assert_eq!(docs.len(), 2);
        let (key, doc) = &docs[0];
        assert_eq!(key.to_string(), "api.demo:80");
        let p = parse_policy_document(key, doc, &HashMap::new()).unwrap();
        assert!(p.retry.on.status_5xx);
        assert_eq!(p.identities.as_ref().unwrap().len(), 1);
        // Stored under another destination's key: refused.
        let err = parse_policy_document(&docs[1].0, doc, &HashMap::new()).unwrap_err();
        assert!(matches!(err, PolicyDocError::Name { .. }), "{err}");
        let err = split_policy_file(
            "destinations: [{name: a, endpoints: [{address: 10.0.0.1:80}]}]",
            &HashMap::new(),
        )
        .unwrap_err();
        assert!(matches!(err, PolicyDocError::Endpoints(_)), "{err}");
        let err = split_policy_file(
            "destinations: [{name: a, policy: {retry_on: sometimes}}]",
            &HashMap::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("GOFE_RETRY_ON"), "{err}");
    }
}
