//! Every `GOFE_*` variable, declared once: its name, its default as a user would type
//! it, and why that default. `gofe init`, the injector and the docs read the same
//! declarations.

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
    INBOUND_TARGET = "GOFE_INBOUND_TARGET", "pod-ip",
        "Where redirected inbound connections go: pod-ip, the address the client dialled (so a port the application bound to loopback only, a debug or admin port, stays unreachable from other pods), or localhost (127.0.0.1 or ::1, which reaches loopback-only listeners too).";
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
    MAX_CONNECTIONS = "GOFE_MAX_CONNECTIONS", "20000",
        "Open connections per listener; beyond it a new one is closed at once. Each costs a task and a few kilobytes of buffers, so this bounds what a flood of connections can make the proxy hold (~20000 x 40 KiB = 800 MiB at worst, far below a node's file-descriptor limit).";
    HTTP_HEADER_READ_TIMEOUT = "GOFE_HTTP_HEADER_READ_TIMEOUT", "10s",
        "A request head must arrive within this, counted from its first byte (slowloris); past it the connection is closed.";
    MAX_REQUEST_HEADERS = "GOFE_MAX_REQUEST_HEADERS", "64KiB",
        "Request head size (request line and headers), the same on every hop: HTTP/1 from the application, HTTP/2 from it and between proxies; larger heads get 431. Well above real cookies and tokens, small enough that a connection cannot hold megabytes of headers.";
    HTTP2_MAX_CONCURRENT_STREAMS = "GOFE_HTTP2_MAX_CONCURRENT_STREAMS", "1024",
        "HTTP/2 streams per connection, asked of clients and assumed of peers on the mesh hop; beyond it the proxy opens another connection to the peer, up to 8, then answers 503 with gofe-overloaded rather than queue.";
    HTTP2_KEEPALIVE = "GOFE_HTTP2_KEEPALIVE", "30s",
        "PING interval on idle HTTP/2 connections, both directions; a peer that does not answer within it is dead and its connection closed. A PING answered keeps a connection alive, not busy: it does not hold off the idle timeout.";
    HTTP_IDLE_TIMEOUT = "GOFE_HTTP_IDLE_TIMEOUT", "5m",
        "An HTTP connection from a client with no request in flight for this long is closed (gracefully: HTTP/2 GOAWAY).";
    TCP_IDLE_TIMEOUT = "GOFE_TCP_IDLE_TIMEOUT", "1h",
        "An opaque stream or tunnel with no bytes either way for this long is closed.";
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
        "OTLP endpoint that receives the proxy's spans (http://jaeger-collector.observability:4317, or https:// with GOFE_TRACE_COLLECTOR_CA): its requests, and its own operations (certificate requests, discovery refreshes, reloads, drains); empty: no traces.";
    TRACE_COLLECTOR_CA = "GOFE_TRACE_COLLECTOR_CA", "",
        "PEM file of the CA certificates that verify an https:// GOFE_TRACE_COLLECTOR (required for https; no system roots are built in, so a collector is trusted only as named).";
    TRACE_PROTOCOL = "GOFE_TRACE_PROTOCOL", "grpc",
        "OTLP transport to the collector: grpc or http/protobuf (the URL's path, or /v1/traces).";
    TRACE_SAMPLE_RATIO = "GOFE_TRACE_SAMPLE_RATIO", "1.0",
        "Share of new traces sampled, 0.0 to 1.0; a request whose parent was sampled (or not) follows its parent.";
    TRACE_TRUST_INCOMING = "GOFE_TRACE_TRUST_INCOMING", "mesh",
        "Whose sampling decision (traceparent's flag, B3's sampled and debug) is honoured: mesh (meshed peers over mTLS and the local application), all, or none. Others' traces are continued but sampled by GOFE_TRACE_SAMPLE_RATIO, so that no client can force every span to the collector.";
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
        "Endpoint sources, in order, comma-separated: registry (etcd, GOFE_REGISTRY), dns (the authority's A/AAAA records), file:PATH (a YAML file of destinations). The first that knows a destination gives its endpoints; with none, the original destination is the one endpoint. With GOFE_REGISTRY set and this unset: registry,dns.";
    POLICY_FILE = "GOFE_POLICY_FILE", "",
        "YAML file of per-destination policy overriding these defaults; re-read when it changes, a bad file is logged and the last good one stays.";
    REGISTRY = "GOFE_REGISTRY", "",
        "etcd (v3) endpoints of the registry and config center, comma-separated: http://h:2379,http://h2:2379 (https:// with TLS). Empty: no registry.";
    REGISTRY_CA = "GOFE_REGISTRY_CA", "",
        "PEM file of the CA that signed etcd's serving certificate; required with https:// endpoints.";
    REGISTRY_CERT = "GOFE_REGISTRY_CERT", "",
        "Client certificate (PEM) presented to etcd, when etcd asks for one; with GOFE_REGISTRY_KEY.";
    REGISTRY_KEY = "GOFE_REGISTRY_KEY", "",
        "The client certificate's key (PEM).";
    REGISTRY_USER = "GOFE_REGISTRY_USER", "",
        "etcd user, when etcd has authentication on; with GOFE_REGISTRY_PASSWORD_FILE.";
    REGISTRY_PASSWORD_FILE = "GOFE_REGISTRY_PASSWORD_FILE", "",
        "File holding the etcd user's password (a file, not a variable, so it stays out of /config and the process environment).";
    REGISTRY_PREFIX = "GOFE_REGISTRY_PREFIX", "/gofe",
        "Key prefix: endpoints under <prefix>/services/<authority>/<address>, policy under <prefix>/policy/<destination>. One etcd can hold several meshes under different prefixes.";
    REGISTER = "GOFE_REGISTER", "",
        "What this pod serves, registered once it is ready: service:port=app-port, comma-separated (api.demo:80=8080); @N after the app port gives a weight. Needs GOFE_REGISTRY and an identity.";
    REGISTER_ADDRESS = "GOFE_REGISTER_ADDRESS", "",
        "The IP others reach this pod on (Kubernetes: status.podIP). Empty: the address this host uses to reach etcd.";
    REGISTER_TTL = "GOFE_REGISTER_TTL", "10s",
        "Lease time to live, kept alive every third of it: a killed pod's endpoints disappear within it; short enough for that, long enough that two missed renewals do not drop a live pod.";
    REGISTER_METADATA = "GOFE_REGISTER_METADATA", "",
        "Labels carried by this pod's entries, version=v2,zone=a: shown in /endpoints and `gofe registry ls`.";
    APP_PROBES = "GOFE_APP_PROBES", "",
        "The application's own liveness, readiness and startup probes (JSON, written by the injector), which the admin server runs at /app-health/<container>/<livez|readyz|startupz> when the kubelet asks. Empty: the kubelet probes the application itself, which strict inbound mTLS would refuse.";
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
    &INBOUND_TARGET,
    &INBOUND_DIRECT_TARGET,
    &DETECT_TIMEOUT,
    &OPAQUE_PORTS,
    &CONNECT_TIMEOUT,
    &IDLE_TIMEOUT,
    &MAX_CONNECTIONS,
    &HTTP_HEADER_READ_TIMEOUT,
    &MAX_REQUEST_HEADERS,
    &HTTP2_MAX_CONCURRENT_STREAMS,
    &HTTP2_KEEPALIVE,
    &HTTP_IDLE_TIMEOUT,
    &TCP_IDLE_TIMEOUT,
    &SHUTDOWN_GRACE_PERIOD,
    &WORKER_THREADS,
    &LOG,
    &LOG_FORMAT,
    &ACCESS_LOG,
    &TRACE_COLLECTOR,
    &TRACE_COLLECTOR_CA,
    &TRACE_PROTOCOL,
    &TRACE_SAMPLE_RATIO,
    &TRACE_TRUST_INCOMING,
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
    &REGISTRY,
    &REGISTRY_CA,
    &REGISTRY_CERT,
    &REGISTRY_KEY,
    &REGISTRY_USER,
    &REGISTRY_PASSWORD_FILE,
    &REGISTRY_PREFIX,
    &REGISTER,
    &REGISTER_ADDRESS,
    &REGISTER_TTL,
    &REGISTER_METADATA,
    &APP_PROBES,
];

/// The variables `gofe registry` reads: how to reach etcd.
pub const REGISTRY_VARS: &[&Var] = &[
    &REGISTRY,
    &REGISTRY_CA,
    &REGISTRY_CERT,
    &REGISTRY_KEY,
    &REGISTRY_USER,
    &REGISTRY_PASSWORD_FILE,
    &REGISTRY_PREFIX,
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
