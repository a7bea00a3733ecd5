//! The proxy's typed settings, read from the environment in one pass and checked
//! together before start-up.

use super::env::{ConfigError, Env};
use super::file::Table;
use super::parse::*;
use super::policy::Policy;
use super::probes::AppProbes;
use super::registry::{RegisterConfig, RegistryConfig};
use super::vars::*;
use gofe_identity::SpiffeId;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use gofe_telemetry::logs::LogFormat;
pub use gofe_telemetry::trace::Protocol as TraceProtocol;

/// The proxy's typed settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub outbound_listen: SocketAddr,
    pub inbound_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub inbound_target: InboundTarget,
    pub inbound_direct_target: Option<SocketAddr>,
    pub detect_timeout: Duration,
    pub opaque_ports: PortSet,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub limits: Limits,
    pub shutdown_grace_period: Duration,
    pub worker_threads: usize,
    pub log: String,
    pub log_format: LogFormat,
    pub access_log: bool,
    /// The OTLP collector and how to reach it; None: no traces.
    pub trace_collector: Option<(String, TraceProtocol)>,
    /// CA certificates (PEM file) for an https collector.
    pub trace_collector_ca: Option<PathBuf>,
    pub trace_sample_ratio: f64,
    pub trace_trust: TraceTrust,
    pub service_name: String,
    /// None when GOFE_IDENTITY_DISABLED=true.
    pub identity: Option<IdentityConfig>,
    pub trust_domain: String,
    pub outbound_mtls: OutboundMtls,
    pub inbound_mtls: InboundMtls,
    pub inbound_authorize: Vec<SpiffeId>,
    /// GOFE_DISCOVERY: `registry`, `dns`, `file:PATH`, in order.
    pub discovery: Vec<DiscoverySource>,
    /// etcd, the registry and config center; None when GOFE_REGISTRY is empty.
    pub registry: Option<RegistryConfig>,
    /// What this pod registers there; None when GOFE_REGISTER is empty.
    pub register: Option<RegisterConfig>,
    pub policy_file: Option<PathBuf>,
    pub dns_refresh: (Duration, Duration),
    /// GOFE_APP_PROBES: the application's probes the admin server runs for the kubelet.
    pub app_probes: AppProbes,
    /// The default policy of every destination.
    pub policy: Policy,
    /// The policy variables as given, to which the files' overrides apply.
    pub policy_vars: HashMap<String, String>,
}

/// What one client can make a listener hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_request_headers: usize,
    pub h2_max_concurrent_streams: u32,
    pub h2_keepalive: Duration,
    pub http_idle_timeout: Duration,
    pub tcp_idle_timeout: Duration,
}

impl Limits {
    fn read(env: &mut Env<'_>) -> Limits {
        Limits {
            max_connections: env.get(&MAX_CONNECTIONS, |s| {
                s.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1_000_000).contains(n))
                    .ok_or_else(|| "expected a number of connections from 1 to 1000000".into())
            }),
            header_read_timeout: env.get(&HTTP_HEADER_READ_TIMEOUT, parse_nonzero_duration),
            max_request_headers: env.get(&MAX_REQUEST_HEADERS, |s| {
                parse_size(s).and_then(|n| {
                    if (8 * 1024..=16 * 1024 * 1024).contains(&n) {
                        Ok(n)
                    } else {
                        Err("expected a size from 8KiB to 16MiB".into())
                    }
                })
            }),
            h2_max_concurrent_streams: env.get(&HTTP2_MAX_CONCURRENT_STREAMS, |s| {
                s.trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or_else(|| "expected a number of streams from 1 to 100000".into())
            }),
            h2_keepalive: env.get(&HTTP2_KEEPALIVE, parse_nonzero_duration),
            http_idle_timeout: env.get(&HTTP_IDLE_TIMEOUT, parse_nonzero_duration),
            tcp_idle_timeout: env.get(&TCP_IDLE_TIMEOUT, parse_nonzero_duration),
        }
    }
}

/// Whose sampling decisions are honoured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceTrust {
    /// Meshed peers (over mTLS) and the local application.
    Mesh,
    All,
    None,
}

impl fmt::Display for TraceTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TraceTrust::Mesh => "mesh",
            TraceTrust::All => "all",
            TraceTrust::None => "none",
        })
    }
}

/// Where redirected inbound connections go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundTarget {
    /// The pod address the client dialled.
    PodIp,
    /// The loopback address of the client's family.
    Localhost,
}

impl fmt::Display for InboundTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InboundTarget::PodIp => "pod-ip",
            InboundTarget::Localhost => "localhost",
        })
    }
}

/// A source of endpoints, as GOFE_DISCOVERY names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoverySource {
    /// The authority's A/AAAA records.
    Dns,
    /// A YAML file of destinations, re-read when it changes.
    File(PathBuf),
    /// The etcd registry's signed entries, watched.
    Registry,
}

impl DiscoverySource {
    /// `registry`, `dns`, `file:PATH`, comma-separated, in the order they are asked.
    pub fn parse_list(s: &str) -> Result<Vec<DiscoverySource>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| match p.strip_prefix("file:") {
                _ if p == "dns" => Ok(DiscoverySource::Dns),
                _ if p == "registry" => Ok(DiscoverySource::Registry),
                Some(path) if !path.is_empty() => Ok(DiscoverySource::File(PathBuf::from(path))),
                _ => Err(format!(
                    "{p:?} is not a source: expected registry, dns or file:PATH, comma-separated"
                )),
            })
            .collect()
    }
}

impl fmt::Display for DiscoverySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiscoverySource::Dns => f.write_str("dns"),
            DiscoverySource::File(p) => write!(f, "file:{}", p.display()),
            DiscoverySource::Registry => f.write_str("registry"),
        }
    }
}

/// Where the proxy gets its certificate.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    pub addr: String,
    pub server_name: String,
    pub name: SpiffeId,
    pub trust_anchors: PathBuf,
    pub token_file: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundMtls {
    Auto,
    Strict,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundMtls {
    Strict,
    Permissive,
    Off,
}

impl fmt::Display for OutboundMtls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutboundMtls::Auto => "auto",
            OutboundMtls::Strict => "strict",
            OutboundMtls::Off => "off",
        })
    }
}

impl fmt::Display for InboundMtls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InboundMtls::Strict => "strict",
            InboundMtls::Permissive => "permissive",
            InboundMtls::Off => "off",
        })
    }
}

impl Config {
    /// Reads the proxy's variables from `env`.
    pub fn read(env: &mut Env<'_>) -> Config {
        let cfg = Config {
            outbound_listen: env.get(&OUTBOUND_LISTEN, parse_socket_addr),
            inbound_listen: env.get(&INBOUND_LISTEN, parse_socket_addr),
            admin_listen: env.get(&ADMIN_LISTEN, parse_socket_addr),
            inbound_target: env.get(&INBOUND_TARGET, |s| match s {
                "pod-ip" => Ok(InboundTarget::PodIp),
                "localhost" => Ok(InboundTarget::Localhost),
                _ => Err("expected pod-ip or localhost".into()),
            }),
            inbound_direct_target: env.get(&INBOUND_DIRECT_TARGET, |s| {
                if s.is_empty() {
                    Ok(None)
                } else {
                    parse_socket_addr(s).map(Some)
                }
            }),
            detect_timeout: env.get(&DETECT_TIMEOUT, parse_nonzero_duration),
            opaque_ports: env.get(&OPAQUE_PORTS, PortSet::parse),
            connect_timeout: env.get(&CONNECT_TIMEOUT, parse_nonzero_duration),
            idle_timeout: env.get(&IDLE_TIMEOUT, parse_nonzero_duration),
            limits: Limits::read(env),
            shutdown_grace_period: env.get(&SHUTDOWN_GRACE_PERIOD, parse_duration),
            worker_threads: env.get(&WORKER_THREADS, |s| {
                s.parse::<usize>()
                    .ok()
                    .filter(|n| *n <= 1024)
                    .ok_or_else(|| "expected a number of threads from 0 (automatic) to 1024".into())
            }),
            log: env.get(&LOG, |s| {
                gofe_telemetry::logs::parse_filter(s)
                    .map(|_| s.to_string())
                    .map_err(|e| e.to_string())
            }),
            log_format: env.get(&LOG_FORMAT, |s| s.parse::<LogFormat>()),
            access_log: env.get(&ACCESS_LOG, |s| match s {
                "off" => Ok(false),
                "json" => Ok(true),
                _ => Err("expected off or json".into()),
            }),
            trace_collector: {
                let collector = env.get(&TRACE_COLLECTOR, |s| {
                    if s.trim().is_empty() {
                        Ok(None)
                    } else {
                        gofe_telemetry::trace::parse_collector(s.trim()).map(Some)
                    }
                });
                let protocol = env.get(&TRACE_PROTOCOL, |s| s.parse::<TraceProtocol>());
                collector.map(|c| (c, protocol))
            },
            trace_collector_ca: env.get(&TRACE_COLLECTOR_CA, |s| {
                Ok::<_, String>((!s.trim().is_empty()).then(|| PathBuf::from(s.trim())))
            }),
            trace_sample_ratio: env.get(&TRACE_SAMPLE_RATIO, |s| {
                s.parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| "expected a number from 0.0 to 1.0".into())
            }),
            trace_trust: env.get(&TRACE_TRUST_INCOMING, |s| match s {
                "mesh" => Ok(TraceTrust::Mesh),
                "all" => Ok(TraceTrust::All),
                "none" => Ok(TraceTrust::None),
                _ => Err("expected mesh, all or none".into()),
            }),
            service_name: env.get(&SERVICE_NAME, |s| {
                if s.trim().is_empty() {
                    Err("expected a non-empty name".into())
                } else {
                    Ok(s.trim().to_string())
                }
            }),
            identity: None,
            trust_domain: env.get(&TRUST_DOMAIN, parse_trust_domain),
            outbound_mtls: env.get(&OUTBOUND_MTLS, |s| match s {
                "auto" => Ok(OutboundMtls::Auto),
                "strict" => Ok(OutboundMtls::Strict),
                "off" => Ok(OutboundMtls::Off),
                _ => Err("expected auto, strict or off".into()),
            }),
            inbound_mtls: env.get(&INBOUND_MTLS, |s| match s {
                "strict" => Ok(InboundMtls::Strict),
                "permissive" => Ok(InboundMtls::Permissive),
                "off" => Ok(InboundMtls::Off),
                _ => Err("expected strict, permissive or off".into()),
            }),
            inbound_authorize: env.get(&INBOUND_AUTHORIZE, parse_spiffe_ids),
            discovery: env.get(&DISCOVERY, DiscoverySource::parse_list),
            policy_file: env.get(&POLICY_FILE, |s| {
                Ok::<_, String>((!s.trim().is_empty()).then(|| PathBuf::from(s.trim())))
            }),
            dns_refresh: env.get(&DNS_REFRESH, parse_range),
            registry: RegistryConfig::read(env),
            register: None,
            app_probes: env.get(&APP_PROBES, AppProbes::parse),
            policy: Policy::read(env),
            policy_vars: Policy::base_vars(|name| env.raw(name)),
        };
        let mut cfg = cfg;
        cfg.identity = read_identity(env, &cfg);
        cfg.register = RegisterConfig::read(env, cfg.registry.is_some(), cfg.identity.is_some());
        if cfg.registry.is_some() && env.raw(DISCOVERY.name).is_none() {
            // The registry knows what registered; DNS the rest.
            cfg.discovery = vec![DiscoverySource::Registry, DiscoverySource::Dns];
        }
        if cfg.registry.is_none() && cfg.discovery.contains(&DiscoverySource::Registry) {
            env.reject(
                &DISCOVERY,
                env.raw(DISCOVERY.name).unwrap_or_default(),
                "sources without registry, or GOFE_REGISTRY set",
            );
        }
        if let Some((collector, _)) = &cfg.trace_collector
            && gofe_telemetry::trace::is_https(collector)
            && cfg.trace_collector_ca.is_none()
        {
            env.reject(
                &TRACE_COLLECTOR_CA,
                "",
                format!("a PEM file of CA certificates: {collector} is https"),
            );
        }
        if env.check_files {
            check_files(env, &cfg);
        }
        let ports = [
            (&OUTBOUND_LISTEN, cfg.outbound_listen),
            (&INBOUND_LISTEN, cfg.inbound_listen),
            (&ADMIN_LISTEN, cfg.admin_listen),
        ];
        for (i, (var, addr)) in ports.iter().enumerate() {
            for (other, other_addr) in &ports[..i] {
                if addr.port() != 0 && addr.port() == other_addr.port() {
                    env.reject(
                        var,
                        addr,
                        format!("a port other than {}'s ({})", other.name, other_addr),
                    );
                }
            }
        }
        cfg
    }

    /// Checks a map of variables as `from_map` does, except for the files they name
    /// (which are the pod's, for the injector).
    pub fn check_map(map: &HashMap<String, String>) -> Result<(), ConfigError> {
        let mut env = Env::from_map(map);
        env.check_files = false;
        Config::read(&mut env);
        env.finish()
    }

    /// Reads the process environment.
    pub fn from_process_env() -> Result<Config, ConfigError> {
        let mut env = Env::from_process();
        let cfg = Config::read(&mut env);
        env.finish().map(|()| cfg)
    }

    /// Reads a map of variables, as the injector does with annotations.
    pub fn from_map(map: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut env = Env::from_map(map);
        let cfg = Config::read(&mut env);
        env.finish().map(|()| cfg)
    }

    /// The registry's settings under the names users type (the password stays in its
    /// file).
    fn registry_effective(&self) -> Vec<(&'static str, String)> {
        let r = self.registry.as_ref();
        let tls = r.and_then(|r| r.tls.as_ref());
        let client = tls.and_then(|t| t.client.as_ref());
        let path = |p: Option<&PathBuf>| p.map(|p| p.display().to_string()).unwrap_or_default();
        let reg = self.register.as_ref();
        vec![
            (
                REGISTRY.name,
                r.map(|r| r.endpoints.join(",")).unwrap_or_default(),
            ),
            (REGISTRY_CA.name, path(tls.map(|t| &t.ca))),
            (REGISTRY_CERT.name, path(client.map(|c| &c.0))),
            (REGISTRY_KEY.name, path(client.map(|c| &c.1))),
            (
                REGISTRY_USER.name,
                r.and_then(|r| r.auth.as_ref())
                    .map(|a| a.0.clone())
                    .unwrap_or_default(),
            ),
            (
                REGISTRY_PASSWORD_FILE.name,
                path(r.and_then(|r| r.auth.as_ref()).map(|a| &a.1)),
            ),
            (
                REGISTRY_PREFIX.name,
                r.map_or(REGISTRY_PREFIX.default.to_string(), |r| r.prefix.clone()),
            ),
            (
                REGISTER.name,
                reg.map(|g| {
                    g.services
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default(),
            ),
            (
                REGISTER_ADDRESS.name,
                reg.and_then(|g| g.address)
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            ),
            (
                REGISTER_TTL.name,
                reg.map_or(REGISTER_TTL.default.to_string(), |g| {
                    humantime::format_duration(g.ttl).to_string()
                }),
            ),
            (
                REGISTER_METADATA.name,
                reg.map(|g| {
                    g.metadata
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default(),
            ),
        ]
    }

    /// The effective settings under the names users type, for `/config`.
    pub fn effective(&self) -> Vec<(&'static str, String)> {
        fn d(v: Duration) -> String {
            humantime::format_duration(v).to_string()
        }
        vec![
            (OUTBOUND_LISTEN.name, self.outbound_listen.to_string()),
            (INBOUND_LISTEN.name, self.inbound_listen.to_string()),
            (ADMIN_LISTEN.name, self.admin_listen.to_string()),
            (INBOUND_TARGET.name, self.inbound_target.to_string()),
            (
                INBOUND_DIRECT_TARGET.name,
                self.inbound_direct_target
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            ),
            (DETECT_TIMEOUT.name, d(self.detect_timeout)),
            (OPAQUE_PORTS.name, self.opaque_ports.to_string()),
            (CONNECT_TIMEOUT.name, d(self.connect_timeout)),
            (IDLE_TIMEOUT.name, d(self.idle_timeout)),
            (
                MAX_CONNECTIONS.name,
                self.limits.max_connections.to_string(),
            ),
            (
                HTTP_HEADER_READ_TIMEOUT.name,
                d(self.limits.header_read_timeout),
            ),
            (
                MAX_REQUEST_HEADERS.name,
                format!("{}B", self.limits.max_request_headers),
            ),
            (
                HTTP2_MAX_CONCURRENT_STREAMS.name,
                self.limits.h2_max_concurrent_streams.to_string(),
            ),
            (HTTP2_KEEPALIVE.name, d(self.limits.h2_keepalive)),
            (HTTP_IDLE_TIMEOUT.name, d(self.limits.http_idle_timeout)),
            (TCP_IDLE_TIMEOUT.name, d(self.limits.tcp_idle_timeout)),
            (SHUTDOWN_GRACE_PERIOD.name, d(self.shutdown_grace_period)),
            (WORKER_THREADS.name, self.worker_threads.to_string()),
            (LOG.name, self.log.clone()),
            (LOG_FORMAT.name, self.log_format.to_string()),
            (
                ACCESS_LOG.name,
                if self.access_log { "json" } else { "off" }.to_string(),
            ),
            (
                TRACE_COLLECTOR.name,
                self.trace_collector
                    .as_ref()
                    .map(|(c, _)| c.clone())
                    .unwrap_or_default(),
            ),
            (
                TRACE_COLLECTOR_CA.name,
                self.trace_collector_ca
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
            (
                TRACE_PROTOCOL.name,
                self.trace_collector
                    .as_ref()
                    .map_or(TraceProtocol::Grpc, |(_, p)| *p)
                    .to_string(),
            ),
            (TRACE_SAMPLE_RATIO.name, self.trace_sample_ratio.to_string()),
            (TRACE_TRUST_INCOMING.name, self.trace_trust.to_string()),
            (SERVICE_NAME.name, self.service_name.clone()),
            (IDENTITY_DISABLED.name, self.identity.is_none().to_string()),
            (
                IDENTITY_ADDR.name,
                self.identity
                    .as_ref()
                    .map(|i| i.addr.clone())
                    .unwrap_or_default(),
            ),
            (
                IDENTITY_SERVER_NAME.name,
                self.identity
                    .as_ref()
                    .map(|i| i.server_name.clone())
                    .unwrap_or_default(),
            ),
            (
                IDENTITY_NAME.name,
                self.identity
                    .as_ref()
                    .map(|i| i.name.to_string())
                    .unwrap_or_default(),
            ),
            (
                IDENTITY_TRUST_ANCHORS.name,
                self.identity
                    .as_ref()
                    .map(|i| i.trust_anchors.display().to_string())
                    .unwrap_or_default(),
            ),
            (
                IDENTITY_TOKEN_FILE.name,
                self.identity
                    .as_ref()
                    .map(|i| i.token_file.display().to_string())
                    .unwrap_or_default(),
            ),
            (TRUST_DOMAIN.name, self.trust_domain.clone()),
            (OUTBOUND_MTLS.name, self.outbound_mtls.to_string()),
            (INBOUND_MTLS.name, self.inbound_mtls.to_string()),
            (
                INBOUND_AUTHORIZE.name,
                self.inbound_authorize
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                DISCOVERY.name,
                self.discovery
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                POLICY_FILE.name,
                self.policy_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
            (
                DNS_REFRESH.name,
                format!("{}..{}", d(self.dns_refresh.0), d(self.dns_refresh.1)),
            ),
            (APP_PROBES.name, self.app_probes.raw().to_string()),
        ]
        .into_iter()
        .chain(self.registry_effective())
        .chain(POLICY_VARS.iter().map(|v| {
            let value = self
                .policy_vars
                .get(v.name)
                .cloned()
                .unwrap_or_else(|| v.default.to_string());
            (v.name, value)
        }))
        .collect()
    }
}

/// The files must be good at start-up; later, a bad version keeps the last good.
fn check_files(env: &mut Env<'_>, cfg: &Config) {
    if let Some(ca) = &cfg.trace_collector_ca {
        let checked = std::fs::read(ca)
            .map_err(|e| format!("a readable file ({e})"))
            .and_then(|pem| gofe_telemetry::trace::parse_ca_pem(&pem).map(|_| ()));
        if let Err(expected) = checked {
            env.reject(&TRACE_COLLECTOR_CA, ca.display(), expected);
        }
    }
    let files = cfg
        .policy_file
        .iter()
        .map(|p| (&POLICY_FILE, p.clone()))
        .chain(cfg.discovery.iter().filter_map(|s| match s {
            DiscoverySource::File(p) => Some((&DISCOVERY, p.clone())),
            DiscoverySource::Dns | DiscoverySource::Registry => None,
        }))
        .collect::<Vec<_>>();
    for (var, path) in files {
        let checked = std::fs::read_to_string(&path)
            .map_err(|e| format!("a readable file ({e})"))
            .and_then(|text| {
                Table::parse(&text, &cfg.policy_vars)
                    .map(|_| ())
                    .map_err(|e| format!("a valid destinations file: {e}"))
            });
        if let Err(expected) = checked {
            env.reject(var, path.display(), expected);
        }
    }
}

/// The identity settings, checked together: each is required unless identity is
/// disabled, and strict mTLS needs an identity.
fn read_identity(env: &mut Env<'_>, cfg: &Config) -> Option<IdentityConfig> {
    let disabled = env.get(&IDENTITY_DISABLED, parse_bool);
    let addr = env.get(&IDENTITY_ADDR, |s| {
        if s.is_empty() {
            Ok(None)
        } else {
            parse_host_port(s).map(Some)
        }
    });
    let server_name = env.get(&IDENTITY_SERVER_NAME, |s| {
        rustls::pki_types::ServerName::try_from(s)
            .map(|_| s.to_string())
            .map_err(|_| "expected a DNS name".into())
    });
    let name = env.get(&IDENTITY_NAME, |s| {
        if s.is_empty() {
            Ok(None)
        } else {
            s.parse::<SpiffeId>().map(Some).map_err(|e| e.to_string())
        }
    });
    let anchors = env.get(&IDENTITY_TRUST_ANCHORS, |s| {
        Ok::<_, String>((!s.is_empty()).then(|| PathBuf::from(s)))
    });
    let token_file = env.get(&IDENTITY_TOKEN_FILE, |s| Ok::<_, String>(PathBuf::from(s)));
    if disabled {
        if cfg.outbound_mtls == OutboundMtls::Strict {
            env.reject(
                &OUTBOUND_MTLS,
                "strict",
                "auto or off: strict mTLS needs an identity (GOFE_IDENTITY_DISABLED=true)",
            );
        }
        if cfg.inbound_mtls == InboundMtls::Strict {
            env.reject(
                &INBOUND_MTLS,
                "strict",
                "permissive or off: strict mTLS needs an identity (GOFE_IDENTITY_DISABLED=true)",
            );
        }
        return None;
    }
    let required = "a value: required unless GOFE_IDENTITY_DISABLED=true";
    if addr.is_none() {
        env.reject(&IDENTITY_ADDR, "", required);
    }
    if anchors.is_none() {
        env.reject(&IDENTITY_TRUST_ANCHORS, "", required);
    }
    match &name {
        None => env.reject(&IDENTITY_NAME, "", required),
        Some(n) if n.trust_domain() != cfg.trust_domain => env.reject(
            &IDENTITY_NAME,
            n,
            format!(
                "a SPIFFE ID in trust domain {} (GOFE_TRUST_DOMAIN)",
                cfg.trust_domain
            ),
        ),
        Some(_) => {}
    }
    Some(IdentityConfig {
        addr: addr?,
        server_name,
        name: name?,
        trust_anchors: anchors?,
        token_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn meshed() -> Vec<(&'static str, &'static str)> {
        vec![
            ("GOFE_IDENTITY_ADDR", "gofe-identity.gofe-system.svc:8443"),
            (
                "GOFE_IDENTITY_NAME",
                "spiffe://cluster.local/ns/default/sa/web",
            ),
            ("GOFE_IDENTITY_TRUST_ANCHORS", "/var/run/gofe/anchors.pem"),
        ]
    }

    #[test]
    fn identity_is_required_unless_disabled() {
        let err = Config::from_map(&HashMap::new()).unwrap_err();
        let names: Vec<&str> = err.0.iter().map(|b| b.name).collect();
        assert_eq!(
            names,
            vec![
                "GOFE_IDENTITY_ADDR",
                "GOFE_IDENTITY_TRUST_ANCHORS",
                "GOFE_IDENTITY_NAME"
            ]
        );
        let cfg = Config::from_map(&env(&meshed())).unwrap();
        let id = cfg.identity.unwrap();
        assert_eq!(
            id.name.to_string(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(id.server_name, "gofe-identity.gofe-system.svc");
        let cfg = Config::from_map(&env(&[("GOFE_IDENTITY_DISABLED", "true")])).unwrap();
        assert!(cfg.identity.is_none());
    }

    #[test]
    fn identity_must_be_in_the_trust_domain_and_strict_needs_one() {
        let mut vars = meshed();
        vars.push(("GOFE_TRUST_DOMAIN", "example.org"));
        let err = Config::from_map(&env(&vars)).unwrap_err();
        assert_eq!(err.0[0].name, "GOFE_IDENTITY_NAME", "{err}");
        let err = Config::from_map(&env(&[
            ("GOFE_IDENTITY_DISABLED", "true"),
            ("GOFE_INBOUND_MTLS", "strict"),
        ]))
        .unwrap_err();
        assert_eq!(err.0[0].name, "GOFE_INBOUND_MTLS", "{err}");
        let err = Config::from_map(&env(&[
            ("GOFE_IDENTITY_DISABLED", "true"),
            (
                "GOFE_INBOUND_AUTHORIZE",
                "spiffe://cluster.local/ns/a/sa/b,web",
            ),
        ]))
        .unwrap_err();
        assert_eq!(err.0[0].name, "GOFE_INBOUND_AUTHORIZE", "{err}");
    }

    #[test]
    fn defaults_parse() {
        let cfg = Config::from_map(&env(&[("GOFE_IDENTITY_DISABLED", "true")])).unwrap();
        assert_eq!(cfg.outbound_listen, "127.0.0.1:4140".parse().unwrap());
        assert_eq!(cfg.detect_timeout, Duration::from_secs(10));
        assert!(cfg.opaque_ports.contains(3306));
        assert!(!cfg.opaque_ports.contains(80));
        assert_eq!(cfg.inbound_direct_target, None);
        for var in PROXY_VARS.iter().chain(INIT_VARS) {
            assert!(var.name.starts_with("GOFE_"), "{}", var.name);
            assert!(!var.help.is_empty(), "{}", var.name);
        }
    }

    #[test]
    fn every_bad_variable_is_reported_with_name_and_value() {
        let err = Config::from_map(&env(&[
            ("GOFE_IDENTITY_DISABLED", "true"),
            ("GOFE_DETECT_TIMEOUT", "ten"),
            ("GOFE_OPAQUE_PORTS", "25,70000"),
            ("GOFE_INBOUND_LISTEN", "4143"),
        ]))
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(text.contains("GOFE_DETECT_TIMEOUT=\"ten\""), "{text}");
        assert!(text.contains("GOFE_OPAQUE_PORTS=\"25,70000\""), "{text}");
        assert!(text.contains("GOFE_INBOUND_LISTEN=\"4143\""), "{text}");
    }

    #[test]
    fn listeners_must_not_share_a_port() {
        let err = Config::from_map(&env(&[
            ("GOFE_IDENTITY_DISABLED", "true"),
            ("GOFE_ADMIN_LISTEN", "0.0.0.0:4143"),
        ]))
        .unwrap_err();
        assert_eq!(err.0[0].name, "GOFE_ADMIN_LISTEN");
        assert!(err.0[0].expected.contains("GOFE_INBOUND_LISTEN"));
    }

    #[test]
    fn an_https_collector_needs_a_readable_ca_file() {
        let https = ("GOFE_TRACE_COLLECTOR", "https://otel.observability:4317");
        let err = Config::from_map(&env(&[("GOFE_IDENTITY_DISABLED", "true"), https])).unwrap_err();
        assert_eq!(err.0[0].name, "GOFE_TRACE_COLLECTOR_CA", "{err}");
        let err = Config::from_map(&env(&[
            ("GOFE_IDENTITY_DISABLED", "true"),
            https,
            ("GOFE_TRACE_COLLECTOR_CA", "/nonexistent/ca.pem"),
        ]))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("GOFE_TRACE_COLLECTOR_CA=\"/nonexistent/ca.pem\""),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        let err = Config::from_map(&env(&[
            ("GOFE_IDENTITY_DISABLED", "true"),
            https,
            ("GOFE_TRACE_COLLECTOR_CA", bad.to_str().unwrap()),
        ]))
        .unwrap_err();
        assert!(
            err.to_string().contains("at least one CA certificate"),
            "{err}"
        );
    }

    #[test]
    fn zero_is_not_a_connect_timeout() {
        let err = Config::from_map(&env(&[
            ("GOFE_IDENTITY_DISABLED", "true"),
            ("GOFE_CONNECT_TIMEOUT", "0"),
        ]))
        .unwrap_err();
        assert_eq!(err.0[0].name, "GOFE_CONNECT_TIMEOUT");
    }

    #[test]
    fn discovery_sources_parse() {
        assert_eq!(
            DiscoverySource::parse_list("dns, file:/etc/gofe/d.yaml").unwrap(),
            vec![
                DiscoverySource::Dns,
                DiscoverySource::File("/etc/gofe/d.yaml".into())
            ]
        );
        assert!(DiscoverySource::parse_list("consul").is_err());
        assert_eq!(
            DiscoverySource::parse_list("registry,dns").unwrap(),
            vec![DiscoverySource::Registry, DiscoverySource::Dns]
        );
        assert!(DiscoverySource::parse_list("file:").is_err());
    }

    #[test]
    fn effective_config_round_trips_through_the_parser() {
        let mut vars = meshed();
        vars.push(("GOFE_IDLE_TIMEOUT", "90s"));
        let cfg = Config::from_map(&env(&vars)).unwrap();
        let map: HashMap<String, String> = cfg
            .effective()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let again = Config::from_map(&map).unwrap();
        assert_eq!(again.idle_timeout, Duration::from_secs(90));
        assert_eq!(again.effective(), cfg.effective());
    }
}

#[cfg(test)]
mod registry_tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_registry_comes_first_by_default_and_needs_its_endpoints() {
        let cfg = Config::from_map(&env(&[
            ("GOFE_IDENTITY_DISABLED", "true"),
            ("GOFE_REGISTRY", "http://127.0.0.1:2379"),
        ]))
        .unwrap();
        assert_eq!(
            cfg.discovery,
            vec![DiscoverySource::Registry, DiscoverySource::Dns]
        );
        let err = Config::from_map(&env(&[
            ("GOFE_IDENTITY_DISABLED", "true"),
            ("GOFE_DISCOVERY", "registry"),
        ]))
        .unwrap_err();
        assert_eq!(err.0[0].name, "GOFE_DISCOVERY", "{err}");
    }

    #[test]
    fn registering_needs_the_registry_and_an_identity() {
        let err = Config::from_map(&env(&[
            ("GOFE_IDENTITY_DISABLED", "true"),
            ("GOFE_REGISTRY", "http://127.0.0.1:2379"),
            ("GOFE_REGISTER", "api.demo:80=8080"),
            ("GOFE_REGISTER_TTL", "1s"),
        ]))
        .unwrap_err();
        let names: Vec<&str> = err.0.iter().map(|b| b.name).collect();
        assert_eq!(names, vec!["GOFE_REGISTER_TTL", "GOFE_REGISTER"], "{err}");
        let cfg = Config::from_map(&env(&[
            ("GOFE_IDENTITY_ADDR", "issuer:8443"),
            (
                "GOFE_IDENTITY_NAME",
                "spiffe://cluster.local/ns/demo/sa/api",
            ),
            ("GOFE_IDENTITY_TRUST_ANCHORS", "/anchors.pem"),
            ("GOFE_REGISTRY", "http://127.0.0.1:2379"),
            ("GOFE_REGISTER", "api.demo:80=8080"),
            ("GOFE_REGISTER_METADATA", "version=v2"),
        ]))
        .unwrap();
        let register = cfg.register.unwrap();
        assert_eq!(register.services[0].port, 8080);
        assert_eq!(register.ttl, Duration::from_secs(10));
        assert_eq!(register.metadata["version"], "v2");
    }
}
