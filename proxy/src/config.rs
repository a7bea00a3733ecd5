//! The proxy's settings: every `GOFE_*` variable is declared once here (name, default,
//! why), read in one pass into typed values, and every bad value is reported together
//! before start-up. `gofe init`, the injector and the docs read the same declarations.

use gofe_identity::SpiffeId;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use gofe_telemetry::logs::LogFormat;
pub use gofe_telemetry::trace::Protocol as TraceProtocol;

/// One environment variable: its name, its default (as a user would type it) and what
/// it does.
#[derive(Debug)]
pub struct Var {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

macro_rules! vars {
    ($($id:ident = $name:literal, $default:literal, $help:literal;)*) => {
        $(pub const $id: Var = Var { name: $name, default: $default, help: $help };)*
    };
}

vars! {
    OUTBOUND_LISTEN = "GOFE_OUTBOUND_LISTEN", "127.0.0.1:4140",
        "Outbound listener; iptables' OUTPUT chain redirects the application's connections here. Loopback only: nothing outside the pod should reach it.";
    INBOUND_LISTEN = "GOFE_INBOUND_LISTEN", "0.0.0.0:4143",
        "Inbound listener; iptables' PREROUTING chain redirects connections to the pod here.";
    ADMIN_LISTEN = "GOFE_ADMIN_LISTEN", "0.0.0.0:4191",
        "Admin server (probes, metrics); never intercepted, so the kubelet and Prometheus reach it.";
    INBOUND_DIRECT_TARGET = "GOFE_INBOUND_DIRECT_TARGET", "",
        "Where the inbound listener forwards connections that reached it without an iptables redirect (running without iptables, as the demo does). Empty: such connections are refused.";
    DETECT_TIMEOUT = "GOFE_DETECT_TIMEOUT", "10s",
        "How long to wait for a client's first bytes before treating the connection as opaque TCP. Long enough for slow clients, short enough that a server-speaks-first protocol on a port not listed as opaque still works.";
    OPAQUE_PORTS = "GOFE_OPAQUE_PORTS", "25,587,3306,4444,5432,6379,9300,11211",
        "Ports whose connections skip protocol detection: server-speaks-first protocols (SMTP, MySQL, PostgreSQL, Redis, memcached...) would otherwise wait for the detection timeout.";
    CONNECT_TIMEOUT = "GOFE_CONNECT_TIMEOUT", "1s",
        "TCP connect to an endpoint. Inside a cluster a healthy connect takes well under a millisecond; a second means the endpoint is gone.";
    IDLE_TIMEOUT = "GOFE_IDLE_TIMEOUT", "60s",
        "How long an unused pooled upstream connection is kept. Below the usual 75-120s server keep-alive so that the proxy closes first and never reuses a connection the server is closing.";
    SHUTDOWN_GRACE_PERIOD = "GOFE_SHUTDOWN_GRACE_PERIOD", "30s",
        "After SIGTERM, how long in-flight requests and connections may run before the proxy exits. Matches Kubernetes' default terminationGracePeriodSeconds.";
    WORKER_THREADS = "GOFE_WORKER_THREADS", "0",
        "Runtime worker threads; 0 uses the CPUs this process may run on. One thread runs a single-threaded runtime, which is the cheapest per request.";
    LOG = "GOFE_LOG", "info",
        "Log filter (tracing-subscriber EnvFilter syntax, e.g. info,gofe_proxy=debug).";
    LOG_FORMAT = "GOFE_LOG_FORMAT", "plain",
        "Log line format: plain or json.";
    ACCESS_LOG = "GOFE_ACCESS_LOG", "off",
        "off, or json: one JSON line on stdout per request (and per connection that is not HTTP).";
    TRACE_COLLECTOR = "GOFE_TRACE_COLLECTOR", "",
        "OTLP endpoint that receives the proxy's spans (http://jaeger-collector.observability:4317); empty: no traces.";
    TRACE_PROTOCOL = "GOFE_TRACE_PROTOCOL", "grpc",
        "OTLP transport to the collector: grpc or http/protobuf (the URL's path, or /v1/traces).";
    TRACE_SAMPLE_RATIO = "GOFE_TRACE_SAMPLE_RATIO", "1.0",
        "Share of new traces sampled, 0.0 to 1.0; a request whose parent was sampled (or not) follows its parent.";
    SERVICE_NAME = "GOFE_SERVICE_NAME", "gofe",
        "The spans' service.name: the workload's name.";
    PROXY_UID = "GOFE_PROXY_UID", "2102",
        "User id the proxy runs as; `gofe init` exempts its traffic from redirection so it cannot loop.";
    SKIP_INBOUND_PORTS = "GOFE_SKIP_INBOUND_PORTS", "",
        "Inbound ports not redirected to the proxy (list and ranges: 25,8000-8100).";
    SKIP_OUTBOUND_PORTS = "GOFE_SKIP_OUTBOUND_PORTS", "",
        "Outbound destination ports not redirected to the proxy (list and ranges).";
    SKIP_OUTBOUND_CIDRS = "GOFE_SKIP_OUTBOUND_CIDRS", "",
        "Outbound destination networks not redirected to the proxy (10.0.0.0/8,fd00::/8).";
    IPV6 = "GOFE_IPV6", "auto",
        "Install ip6tables rules too: auto (when the namespace has IPv6), true or false.";
    IPTABLES_MODE = "GOFE_IPTABLES_MODE", "auto",
        "iptables backend for `gofe init`: auto (the one already holding rules, else nft), nft or legacy.";
    IDENTITY_DISABLED = "GOFE_IDENTITY_DISABLED", "false",
        "true runs without an identity: no certificate, no mTLS, plaintext only.";
    IDENTITY_ADDR = "GOFE_IDENTITY_ADDR", "",
        "The issuer's address, host:port (gofe-identity.gofe-system.svc:8443). Required unless GOFE_IDENTITY_DISABLED=true.";
    IDENTITY_SERVER_NAME = "GOFE_IDENTITY_SERVER_NAME", "gofe-identity.gofe-system.svc",
        "The name the issuer's serving certificate must carry.";
    IDENTITY_NAME = "GOFE_IDENTITY_NAME", "",
        "This workload's SPIFFE ID, spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>. Required unless GOFE_IDENTITY_DISABLED=true.";
    IDENTITY_TRUST_ANCHORS = "GOFE_IDENTITY_TRUST_ANCHORS", "",
        "PEM file of the mesh's trust anchors, re-read when it changes. Required unless GOFE_IDENTITY_DISABLED=true.";
    IDENTITY_TOKEN_FILE = "GOFE_IDENTITY_TOKEN_FILE", "/var/run/secrets/tokens/gofe-identity-token",
        "The service-account token sent to the issuer (the injector projects it here, with the issuer's audience).";
    TRUST_DOMAIN = "GOFE_TRUST_DOMAIN", "cluster.local",
        "The mesh's trust domain: the authority of every SPIFFE ID it issues and accepts.";
    OUTBOUND_MTLS = "GOFE_OUTBOUND_MTLS", "auto",
        "auto: mTLS to peers that answer it, plaintext (remembered for a minute) to those that do not; strict: mTLS or fail; off.";
    INBOUND_MTLS = "GOFE_INBOUND_MTLS", "permissive",
        "strict: only mTLS from the mesh; permissive: mTLS or plaintext; off: no TLS termination.";
    INBOUND_AUTHORIZE = "GOFE_INBOUND_AUTHORIZE", "",
        "SPIFFE IDs allowed in over mTLS, comma-separated; empty allows the whole mesh.";
    REQUEST_TIMEOUT = "GOFE_REQUEST_TIMEOUT", "0",
        "A whole request, retries included, until its response headers; on expiry 504 (gRPC: DEADLINE_EXCEEDED). 0: none.";
    PER_TRY_TIMEOUT = "GOFE_PER_TRY_TIMEOUT", "0",
        "One attempt, until its response headers; an attempt that runs out is retried like a 504. 0: none.";
    RETRY_ON = "GOFE_RETRY_ON", "connect-failure,refused-stream",
        "When to retry: connect-failure, refused-stream, 5xx, gateway-error (502/503/504), reset, retriable-status-codes, and for gRPC unavailable, cancelled, deadline-exceeded, resource-exhausted.";
    RETRY_LIMIT = "GOFE_RETRY_LIMIT", "2",
        "Retries of one request, after its first attempt.";
    RETRY_BUDGET_RATIO = "GOFE_RETRY_BUDGET_RATIO", "0.2",
        "Retries may be at most this share of a destination's requests (over 10 s)...";
    RETRY_BUDGET_MIN_PER_SEC = "GOFE_RETRY_BUDGET_MIN_PER_SEC", "10",
        "...plus this many a second, so a destination with little traffic can still retry.";
    RETRY_BACKOFF = "GOFE_RETRY_BACKOFF", "25ms..250ms",
        "Wait before retry n: a random time up to min(max, min x 2^(n-1)) (exponential, full jitter).";
    RETRY_MAX_BODY = "GOFE_RETRY_MAX_BODY", "64KiB",
        "Request bodies up to this size are kept while they stream, so a retry can replay them; larger ones are never retried.";
    RETRY_STATUS_CODES = "GOFE_RETRY_STATUS_CODES", "",
        "The statuses retriable-status-codes retries (e.g. 429,503).";
    RETRYABLE = "GOFE_RETRYABLE", "false",
        "true marks a destination's routes retryable: status and reset conditions then retry any method, not only idempotent ones (the application promises it is safe).";
    LB = "GOFE_LB", "ewma",
        "ewma (power of two choices over peak-EWMA latency), round-robin, or random.";
    OUTLIER_CONSECUTIVE_5XX = "GOFE_OUTLIER_CONSECUTIVE_5XX", "5",
        "Eject an endpoint after this many 5xx responses in a row (0: never).";
    OUTLIER_CONSECUTIVE_GATEWAY = "GOFE_OUTLIER_CONSECUTIVE_GATEWAY", "5",
        "...or after this many connect failures, 502s, 503s or 504s in a row (0: never).";
    OUTLIER_BASE_EJECTION = "GOFE_OUTLIER_BASE_EJECTION", "30s",
        "Ejection time: this times the number of times the endpoint has been ejected...";
    OUTLIER_MAX_EJECTION = "GOFE_OUTLIER_MAX_EJECTION", "300s",
        "...capped at this.";
    OUTLIER_MAX_EJECTION_PERCENT = "GOFE_OUTLIER_MAX_EJECTION_PERCENT", "50",
        "Never eject more than this share of a destination's endpoints (a destination with one endpoint keeps it).";
    MAX_CONCURRENT_REQUESTS = "GOFE_MAX_CONCURRENT_REQUESTS", "1024",
        "Requests in flight per destination; beyond it, 503 at once with gofe-overloaded: true.";
    DISCOVERY = "GOFE_DISCOVERY", "dns",
        "Endpoint sources, in order, comma-separated: dns (the authority's A/AAAA records), file:PATH (a YAML file of destinations). The first that knows a destination gives its endpoints; with none, the original destination is the one endpoint.";
    POLICY_FILE = "GOFE_POLICY_FILE", "",
        "YAML file of per-destination policy overriding these defaults; re-read when it changes, a bad file is logged and the last good one stays.";
    DNS_REFRESH = "GOFE_DNS_REFRESH", "1s..60s",
        "DNS records are re-resolved when their TTL runs out, but no sooner than the first and no later than the second.";
    ISSUER_DIR = "GOFE_ISSUER_DIR", "/var/run/gofe/issuer",
        "(issuer) Directory with ca.crt, tls.crt and tls.key, laid out like a kubernetes.io/tls Secret.";
    ISSUER_LISTEN = "GOFE_ISSUER_LISTEN", "0.0.0.0:8443",
        "(issuer) The certify endpoint (HTTPS).";
    ISSUER_ADMIN_LISTEN = "GOFE_ISSUER_ADMIN_LISTEN", "0.0.0.0:9990",
        "(issuer) /live, /ready and /metrics.";
    ISSUER_CERT_LIFETIME = "GOFE_ISSUER_CERT_LIFETIME", "24h",
        "(issuer) Lifetime of workload certificates; proxies renew at about 70% of it.";
    ISSUER_JWKS = "GOFE_ISSUER_JWKS", "",
        "(issuer) The cluster's service-account issuer keys: a JWKS file, or an https URL (https://kubernetes.default.svc/openid/v1/jwks).";
    ISSUER_JWKS_CA = "GOFE_ISSUER_JWKS_CA", "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        "(issuer) CA bundle that verifies an https JWKS URL; the issuer's own service-account token authenticates the fetch.";
    ISSUER_INSECURE_DEV = "GOFE_ISSUER_INSECURE_DEV", "false",
        "(issuer) true accepts any token and issues whatever SPIFFE ID in the trust domain is asked for. Demo only.";
    ISSUER_TOKEN_AUDIENCE = "GOFE_ISSUER_TOKEN_AUDIENCE", "identity.gofe.io",
        "(issuer) The audience workload tokens must carry.";
    ISSUER_TOKEN_ISSUER = "GOFE_ISSUER_TOKEN_ISSUER", "",
        "(issuer) When set, the `iss` workload tokens must carry.";
}

/// The variables `gofe proxy` reads.
pub const PROXY_VARS: &[&Var] = &[
    &OUTBOUND_LISTEN,
    &INBOUND_LISTEN,
    &ADMIN_LISTEN,
    &INBOUND_DIRECT_TARGET,
    &DETECT_TIMEOUT,
    &OPAQUE_PORTS,
    &CONNECT_TIMEOUT,
    &IDLE_TIMEOUT,
    &SHUTDOWN_GRACE_PERIOD,
    &WORKER_THREADS,
    &LOG,
    &LOG_FORMAT,
    &ACCESS_LOG,
    &TRACE_COLLECTOR,
    &TRACE_PROTOCOL,
    &TRACE_SAMPLE_RATIO,
    &SERVICE_NAME,
    &IDENTITY_DISABLED,
    &IDENTITY_ADDR,
    &IDENTITY_SERVER_NAME,
    &IDENTITY_NAME,
    &IDENTITY_TRUST_ANCHORS,
    &IDENTITY_TOKEN_FILE,
    &TRUST_DOMAIN,
    &OUTBOUND_MTLS,
    &INBOUND_MTLS,
    &INBOUND_AUTHORIZE,
    &DISCOVERY,
    &POLICY_FILE,
    &DNS_REFRESH,
];

/// The variables a destination's policy is made of: each may be overridden per
/// destination in the policy or discovery file, by its name in lower case without the
/// prefix (`retry_on: 5xx`).
pub const POLICY_VARS: &[&Var] = &[
    &REQUEST_TIMEOUT,
    &PER_TRY_TIMEOUT,
    &RETRY_ON,
    &RETRY_LIMIT,
    &RETRY_BUDGET_RATIO,
    &RETRY_BUDGET_MIN_PER_SEC,
    &RETRY_BACKOFF,
    &RETRY_MAX_BODY,
    &RETRY_STATUS_CODES,
    &RETRYABLE,
    &LB,
    &OUTLIER_CONSECUTIVE_5XX,
    &OUTLIER_CONSECUTIVE_GATEWAY,
    &OUTLIER_BASE_EJECTION,
    &OUTLIER_MAX_EJECTION,
    &OUTLIER_MAX_EJECTION_PERCENT,
    &MAX_CONCURRENT_REQUESTS,
];

/// The variables `gofe identity` reads (and GOFE_TRUST_DOMAIN).
pub const ISSUER_VARS: &[&Var] = &[
    &ISSUER_DIR,
    &ISSUER_LISTEN,
    &ISSUER_ADMIN_LISTEN,
    &ISSUER_CERT_LIFETIME,
    &ISSUER_JWKS,
    &ISSUER_JWKS_CA,
    &ISSUER_INSECURE_DEV,
    &ISSUER_TOKEN_AUDIENCE,
    &ISSUER_TOKEN_ISSUER,
];

/// The variables `gofe init` reads besides the listener ports.
pub const INIT_VARS: &[&Var] = &[
    &PROXY_UID,
    &SKIP_INBOUND_PORTS,
    &SKIP_OUTBOUND_PORTS,
    &SKIP_OUTBOUND_CIDRS,
    &IPV6,
    &IPTABLES_MODE,
];

/// One variable whose value could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadVar {
    pub name: &'static str,
    pub value: String,
    pub expected: String,
}

impl fmt::Display for BadVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?}: {}", self.name, self.value, self.expected)
    }
}

/// Every bad variable found in one read of the environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError(pub Vec<BadVar>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, bad) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "invalid configuration: {bad}")?;
        }
        Ok(())
    }
}

/// Reads variables from a source (the process environment, or a map the injector built
/// from annotations), collecting errors instead of stopping at the first.
type Lookup<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

pub struct Env<'a> {
    lookup: Lookup<'a>,
    errors: Vec<BadVar>,
    /// Whether the files variables name are read and checked too.
    check_files: bool,
}

impl<'a> Env<'a> {
    pub fn from_process() -> Env<'static> {
        Env {
            lookup: Box::new(|name| std::env::var(name).ok()),
            errors: Vec::new(),
            check_files: true,
        }
    }

    pub fn from_map(map: &'a HashMap<String, String>) -> Env<'a> {
        Env {
            lookup: Box::new(move |name| map.get(name).cloned()),
            errors: Vec::new(),
            check_files: true,
        }
    }

    /// The value of `var` parsed with `parse`, or its default when unset. A bad value
    /// is recorded and the default is returned so that reading can go on and report
    /// every bad variable at once.
    pub fn get<T>(&mut self, var: &Var, parse: impl Fn(&str) -> Result<T, String>) -> T {
        if let Some(value) = (self.lookup)(var.name) {
            match parse(&value) {
                Ok(v) => return v,
                Err(expected) => self.errors.push(BadVar {
                    name: var.name,
                    value,
                    expected,
                }),
            }
        }
        match parse(var.default) {
            Ok(v) => v,
            Err(e) => panic!("default of {} does not parse: {e}", var.name),
        }
    }

    /// Records a problem found by a check across several variables.
    /// The value of `name` as given, if it is set.
    pub fn raw(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
    }

    pub fn reject(&mut self, var: &Var, value: impl ToString, expected: impl ToString) {
        self.errors.push(BadVar {
            name: var.name,
            value: value.to_string(),
            expected: expected.to_string(),
        });
    }

    pub fn finish(self) -> Result<(), ConfigError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(self.errors))
        }
    }
}

/// The proxy's typed settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub outbound_listen: SocketAddr,
    pub inbound_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub inbound_direct_target: Option<SocketAddr>,
    pub detect_timeout: Duration,
    pub opaque_ports: PortSet,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace_period: Duration,
    pub worker_threads: usize,
    pub log: String,
    pub log_format: LogFormat,
    pub access_log: bool,
    /// The OTLP collector and how to reach it; None: no traces.
    pub trace_collector: Option<(String, TraceProtocol)>,
    pub trace_sample_ratio: f64,
    pub service_name: String,
    /// None when GOFE_IDENTITY_DISABLED=true.
    pub identity: Option<IdentityConfig>,
    pub trust_domain: String,
    pub outbound_mtls: OutboundMtls,
    pub inbound_mtls: InboundMtls,
    pub inbound_authorize: Vec<SpiffeId>,
    /// GOFE_DISCOVERY: `dns`, `file:PATH`, in order.
    pub discovery: Vec<String>,
    pub policy_file: Option<PathBuf>,
    pub dns_refresh: (Duration, Duration),
    /// The default policy of every destination.
    pub policy: crate::policy::Policy,
    /// The policy variables as given, to which the files' overrides apply.
    pub policy_vars: HashMap<String, String>,
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

pub fn parse_trust_domain(s: &str) -> Result<String, String> {
    SpiffeId::new(s, "x", "x")
        .map(|_| s.to_string())
        .map_err(|_| "expected a trust domain such as cluster.local (lowercase letters, digits, '.', '-', '_')".into())
}

fn parse_spiffe_ids(s: &str) -> Result<Vec<SpiffeId>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<SpiffeId>().map_err(|e| e.to_string()))
        .collect()
}

/// A host:port address, the host a name or an IP literal.
pub fn parse_host_port(s: &str) -> Result<String, String> {
    const EXPECTED: &str = "expected host:port such as gofe-identity.gofe-system.svc:8443";
    let (host, port) = s.rsplit_once(':').ok_or(EXPECTED)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(EXPECTED.into());
    }
    Ok(s.to_string())
}

impl Config {
    /// Reads the proxy's variables from `env`.
    pub fn read(env: &mut Env<'_>) -> Config {
        let cfg = Config {
            outbound_listen: env.get(&OUTBOUND_LISTEN, parse_socket_addr),
            inbound_listen: env.get(&INBOUND_LISTEN, parse_socket_addr),
            admin_listen: env.get(&ADMIN_LISTEN, parse_socket_addr),
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
            trace_sample_ratio: env.get(&TRACE_SAMPLE_RATIO, |s| {
                s.parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| "expected a number from 0.0 to 1.0".into())
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
            discovery: env.get(&DISCOVERY, crate::discovery::parse_sources),
            policy_file: env.get(&POLICY_FILE, |s| {
                Ok::<_, String>((!s.trim().is_empty()).then(|| PathBuf::from(s.trim())))
            }),
            dns_refresh: env.get(&DNS_REFRESH, crate::policy::parse_range),
            policy: crate::policy::Policy::read(env),
            policy_vars: crate::policy::Policy::base_vars(|name| env.raw(name)),
        };
        let mut cfg = cfg;
        cfg.identity = read_identity(env, &cfg);
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

    /// The effective settings under the names users type, for `/config`.
    pub fn effective(&self) -> Vec<(&'static str, String)> {
        fn d(v: Duration) -> String {
            humantime::format_duration(v).to_string()
        }
        vec![
            (OUTBOUND_LISTEN.name, self.outbound_listen.to_string()),
            (INBOUND_LISTEN.name, self.inbound_listen.to_string()),
            (ADMIN_LISTEN.name, self.admin_listen.to_string()),
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
                TRACE_PROTOCOL.name,
                self.trace_collector
                    .as_ref()
                    .map_or(TraceProtocol::Grpc, |(_, p)| *p)
                    .to_string(),
            ),
            (TRACE_SAMPLE_RATIO.name, self.trace_sample_ratio.to_string()),
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
            (DISCOVERY.name, self.discovery.join(",")),
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
        ]
        .into_iter()
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
    let files = cfg
        .policy_file
        .iter()
        .map(|p| (&POLICY_FILE, p.clone()))
        .chain(
            cfg.discovery
                .iter()
                .filter_map(|s| s.strip_prefix("file:"))
                .map(|p| (&DISCOVERY, PathBuf::from(p))),
        )
        .collect::<Vec<_>>();
    for (var, path) in files {
        let checked = std::fs::read_to_string(&path)
            .map_err(|e| format!("a readable file ({e})"))
            .and_then(|text| {
                crate::policy::file::Table::parse(&text, &cfg.policy_vars)
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

/// `gofe identity`'s settings.
pub fn read_issuer(env: &mut Env<'_>) -> gofe_identity::issuer::IssuerConfig {
    let insecure_dev = env.get(&ISSUER_INSECURE_DEV, parse_bool);
    let jwks_ca = env.get(&ISSUER_JWKS_CA, |s| Ok::<_, String>(PathBuf::from(s)));
    let jwks = env.get(&ISSUER_JWKS, |s| {
        if s.is_empty() {
            Ok(None)
        } else {
            gofe_identity::issuer::tokens::JwksSource::parse(
                s,
                Some(jwks_ca.clone()),
                Some(PathBuf::from(
                    "/var/run/secrets/kubernetes.io/serviceaccount/token",
                ))
                .filter(|p| p.exists()),
            )
            .map(Some)
        }
    });
    if jwks.is_none() && !insecure_dev {
        env.reject(
            &ISSUER_JWKS,
            "",
            "a JWKS file or URL (or GOFE_ISSUER_INSECURE_DEV=true for a demo)",
        );
    }
    gofe_identity::issuer::IssuerConfig {
        dir: env.get(&ISSUER_DIR, |s| Ok::<_, String>(PathBuf::from(s))),
        listen: env.get(&ISSUER_LISTEN, parse_socket_addr),
        admin_listen: env.get(&ISSUER_ADMIN_LISTEN, parse_socket_addr),
        cert_lifetime: env.get(&ISSUER_CERT_LIFETIME, |s| {
            parse_nonzero_duration(s).and_then(|d| {
                if d < Duration::from_secs(1) {
                    Err("expected at least 1s".into())
                } else {
                    Ok(d)
                }
            })
        }),
        jwks,
        insecure_dev,
        trust_domain: env.get(&TRUST_DOMAIN, parse_trust_domain),
        audience: env.get(&ISSUER_TOKEN_AUDIENCE, |s| {
            if s.is_empty() {
                Err("expected an audience".to_string())
            } else {
                Ok(s.to_string())
            }
        }),
        token_issuer: env.get(&ISSUER_TOKEN_ISSUER, |s| {
            Ok::<_, String>((!s.is_empty()).then(|| s.to_string()))
        }),
    }
}

pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| "expected an address and port such as 0.0.0.0:4143 or [::]:4143".into())
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|_| "expected a duration such as 10s, 250ms or 1m (0 for none)".into())
}

pub fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s) {
        Ok(d) if d.is_zero() => Err("expected a duration above zero such as 10s or 250ms".into()),
        other => other,
    }
}

pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// A set of TCP ports written as a list of ports and ranges: `25,8000-8100`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet(Vec<RangeInclusive<u16>>);

impl PortSet {
    pub fn parse(s: &str) -> Result<PortSet, String> {
        const EXPECTED: &str = "expected ports and ranges such as 25,8000-8100 (1-65535)";
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (lo.trim(), hi.trim()),
                None => (part, part),
            };
            let lo: u16 = lo.parse().map_err(|_| EXPECTED.to_string())?;
            let hi: u16 = hi.parse().map_err(|_| EXPECTED.to_string())?;
            if lo == 0 || hi < lo {
                return Err(EXPECTED.into());
            }
            ranges.push(lo..=hi);
        }
        Ok(PortSet(ranges))
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(&port))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn ranges(&self) -> &[RangeInclusive<u16>] {
        &self.0
    }

    pub fn with(mut self, port: u16) -> PortSet {
        if !self.contains(port) {
            self.0.push(port..=port);
        }
        self
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if r.start() == r.end() {
                write!(f, "{}", r.start())?;
            } else {
                write!(f, "{}-{}", r.start(), r.end())?;
            }
        }
        Ok(())
    }
}

/// An IP network: `10.0.0.0/8`, `fd00::/8`, or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        const EXPECTED: &str = "expected networks such as 10.0.0.0/8,fd00::/8";
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| EXPECTED.to_string())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| EXPECTED.to_string())?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(Cidr::from_str)
        .collect()
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
    fn zero_is_not_a_connect_timeout() {
        let err = Config::from_map(&env(&[
            ("GOFE_IDENTITY_DISABLED", "true"),
            ("GOFE_CONNECT_TIMEOUT", "0"),
        ]))
        .unwrap_err();
        assert_eq!(err.0[0].name, "GOFE_CONNECT_TIMEOUT");
    }

    #[test]
    fn port_sets_parse_lists_and_ranges() {
        let p = PortSet::parse("25, 8000-8100,9090").unwrap();
        assert!(p.contains(25) && p.contains(8050) && p.contains(9090));
        assert!(!p.contains(8101));
        assert_eq!(p.to_string(), "25,8000-8100,9090");
        assert!(PortSet::parse("").unwrap().is_empty());
        for bad in ["0", "100-50", "http", "1-", "65536"] {
            assert!(PortSet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_parse_both_families() {
        let c = parse_cidrs("10.0.0.0/8, fd00::/8,192.168.1.1").unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[2].to_string(), "192.168.1.1/32");
        assert!(parse_cidrs("10.0.0.0/33").is_err());
        assert!(parse_cidrs("ten/8").is_err());
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
