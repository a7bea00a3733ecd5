//! The proxy's metrics: what it counts, under the names and labels SPEC gives, and
//! their Prometheus exposition. Hot paths hold `Arc`s to their counters; the families'
//! maps are only crossed when a connection or a new authority first appears.

use crate::addrs::Direction;
use gofe_telemetry::latency::{self, Latency};
use gofe_telemetry::metrics::{Counter, Family, Gauge};
use gofe_telemetry::prom::{Exposition, Kind};
use http::StatusCode;
use parking_lot::Mutex;
use std::sync::Arc;

/// Label sets per family before new ones fold into "other": enough for every
/// authority a sidecar normally talks to, small enough that a client sending random
/// Host headers costs a bounded few megabytes.
const MAX_LABEL_SETS: usize = 1000;

/// Label sets of request metrics, per direction (inbound and outbound each have their
/// own, so that one cannot crowd the other out). Each holds its latency histograms: the
/// cumulative one (64 KiB for latencies up to 100 ms, 136 KiB at most) and, while
/// requests come, up to six windows of half that; so at most ~110 MB per direction if
/// every label set saw minute-long latencies in every window, ~50 MB for 100 ms.
/// Inbound label sets are few in practice: the authority is the port the application
/// was reached on, the identity one of the mesh's.
const MAX_REQUEST_LABEL_SETS: usize = 200;

/// Unusual (status, gRPC status) pairs counted apart per label set (a gRPC status
/// outside 0..=16, a status above 599); past this many, the rest count as "other".
const MAX_RARE_STATUSES: usize = 16;

const OVERFLOW: &str = "other";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestLabels {
    pub direction: Direction,
    pub authority: Arc<str>,
    pub tls: bool,
    pub peer_identity: Arc<str>,
    /// The traffic rule's route and backend (outbound); empty when none applied.
    pub route: Arc<str>,
    pub backend: Arc<str>,
}

/// Response counts of one label set, by HTTP status and gRPC status. Statuses are
/// array slots, so recording a response is one atomic add.
pub struct RequestStats {
    by_status: Box<[Counter]>,
    /// gRPC responses with HTTP 200, by grpc-status 0..=16.
    grpc_ok: Box<[Counter]>,
    /// Anything else (a gRPC status outside 0..=16, or with a non-200 HTTP status):
    /// rare, so a lock is fine; bounded, since an upstream chooses them.
    rare: Mutex<Vec<(u16, Option<u16>, u64)>>,
    /// Rare pairs past the bound.
    rare_overflow: Counter,
    /// From the request's start to the end of its response body.
    pub latency: Latency,
}

const STATUS_MIN: u16 = 100;
const STATUS_SLOTS: usize = 500;
const GRPC_SLOTS: usize = 17;

impl Default for RequestStats {
    fn default() -> Self {
        Self {
            by_status: (0..STATUS_SLOTS).map(|_| Counter::default()).collect(),
            grpc_ok: (0..GRPC_SLOTS).map(|_| Counter::default()).collect(),
            rare: Mutex::new(Vec::new()),
            rare_overflow: Counter::default(),
            latency: Latency::default(),
        }
    }
}

impl RequestStats {
    pub fn record(&self, status: StatusCode, grpc_status: Option<u16>) {
        let code = status.as_u16();
        match grpc_status {
            None => {
                if let Some(c) = self.by_status.get(code.wrapping_sub(STATUS_MIN) as usize) {
                    c.inc();
                    return;
                }
            }
            Some(g) if code == 200 && (g as usize) < GRPC_SLOTS => {
                self.grpc_ok[g as usize].inc();
                return;
            }
            Some(_) => {}
        }
        let mut rare = self.rare.lock();
        let full = rare.len() >= MAX_RARE_STATUSES;
        match rare
            .iter_mut()
            .find(|(s, g, _)| *s == code && *g == grpc_status)
        {
            Some(entry) => entry.2 += 1,
            None if full => self.rare_overflow.inc(),
            None => rare.push((code, grpc_status, 1)),
        }
    }

    /// Responses whose (status, gRPC status) came past the bound of rare ones.
    pub fn other_statuses(&self) -> u64 {
        self.rare_overflow.get()
    }

    /// Every (status, grpc status, count) with a count above zero.
    pub fn counts(&self) -> Vec<(u16, Option<u16>, u64)> {
        let mut out = Vec::new();
        for (i, c) in self.by_status.iter().enumerate() {
            let n = c.get();
            if n > 0 {
                out.push((STATUS_MIN + i as u16, None, n));
            }
        }
        for (g, c) in self.grpc_ok.iter().enumerate() {
            let n = c.get();
            if n > 0 {
                out.push((200, Some(g as u16), n));
            }
        }
        out.extend(self.rare.lock().iter().copied());
        out
    }

    pub fn total(&self) -> u64 {
        self.counts().iter().map(|(_, _, n)| n).sum::<u64>() + self.other_statuses()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnLabels {
    pub direction: Direction,
    pub protocol: &'static str,
    /// The SNI of application TLS passed through; empty otherwise.
    pub server_name: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectErrorLabels {
    pub direction: Direction,
    pub reason: &'static str,
}

/// The byte counters of one direction: bytes from the client towards the server, and
/// back.
pub struct ByteCounters {
    pub client_to_server: Arc<Counter>,
    pub server_to_client: Arc<Counter>,
}

impl Default for ByteCounters {
    fn default() -> Self {
        Self {
            client_to_server: Arc::new(Counter::default()),
            server_to_client: Arc::new(Counter::default()),
        }
    }
}

/// The request label sets, inbound and outbound each capped on its own.
pub struct Requests([Family<RequestLabels, RequestStats>; 2]);

impl Requests {
    fn new() -> Self {
        let family = || {
            Family::new(MAX_REQUEST_LABEL_SETS, |l: &RequestLabels| RequestLabels {
                direction: l.direction,
                authority: OVERFLOW.into(),
                tls: l.tls,
                peer_identity: OVERFLOW.into(),
                route: OVERFLOW.into(),
                backend: OVERFLOW.into(),
            })
        };
        Self([family(), family()])
    }

    pub fn get(&self, labels: &RequestLabels) -> Arc<RequestStats> {
        self.0[idx(labels.direction)].get(labels)
    }

    pub fn snapshot(&self) -> Vec<(RequestLabels, Arc<RequestStats>)> {
        self.0.iter().flat_map(|f| f.snapshot()).collect()
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|f| f.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Label sets folded into "other" in `direction`.
    pub fn overflowed(&self, direction: Direction) -> u64 {
        self.0[idx(direction)].overflowed()
    }
}

pub struct Metrics {
    pub requests: Requests,
    tls_handshakes: Family<(Direction, &'static str), Counter>,
    pub connections: Family<ConnLabels, Counter>,
    pub connect_errors: Family<ConnectErrorLabels, Counter>,
    open: [Arc<Gauge>; 2],
    bytes: [ByteCounters; 2],
    /// By destination and reason.
    retries: Family<(Arc<str>, Arc<str>), Counter>,
    retry_budget_exhausted: Family<Arc<str>, Counter>,
    /// By destination and endpoint.
    ejections: Family<(Arc<str>, Arc<str>), Counter>,
    /// By limit and where it tripped.
    limits: Family<(Limit, &'static str), Counter>,
    /// By direction, authority and route.
    rate_limited: Family<(Direction, Arc<str>, Arc<str>), Counter>,
    /// By direction, authority and priority.
    shed: Family<(Direction, Arc<str>, Arc<str>), Counter>,
    /// By mirror authority and result.
    mirrored: Family<(Arc<str>, &'static str), Counter>,
    /// By authority, endpoint and result.
    health_checks: Family<(Arc<str>, Arc<str>, &'static str), Counter>,
}

/// A bound that held against a client: what `gofe_limits_tripped_total` counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Limit {
    /// A listener at GOFE_MAX_CONNECTIONS closed a new connection.
    Connections,
    /// The admin server at its cap closed a connection that had sent no request.
    AdminConnections,
    /// Accepting failed (file descriptors, memory): the loop backed off.
    AcceptErrors,
    /// A request head did not arrive within GOFE_HTTP_HEADER_READ_TIMEOUT.
    HeaderReadTimeout,
    /// A request head larger than GOFE_MAX_REQUEST_HEADERS (431).
    HeaderSize,
    /// An HTTP/2 peer broke the protocol or flooded it (rapid reset, CONTINUATION,
    /// SETTINGS, PING, empty frames...): the connection ended with GOAWAY.
    Http2Protocol,
    /// An HTTP connection idle past GOFE_HTTP_IDLE_TIMEOUT.
    HttpIdle,
    /// An opaque stream or tunnel idle past GOFE_TCP_IDLE_TIMEOUT.
    TcpIdle,
    /// Every connection to a peer at its stream limit: 503 with gofe-overloaded.
    Http2Streams,
    /// An unmeshed source address at its share of an inbound port (half of
    /// GOFE_MAX_CONCURRENT_REQUESTS): 503 with gofe-overloaded.
    SourceShare,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::AdminConnections => "admin_connections",
            Limit::AcceptErrors => "accept_errors",
            Limit::HeaderReadTimeout => "header_read_timeout",
            Limit::HeaderSize => "header_size",
            Limit::Http2Protocol => "http2_protocol",
            Limit::HttpIdle => "http_idle",
            Limit::TcpIdle => "tcp_idle",
            Limit::Http2Streams => "http2_streams",
            Limit::SourceShare => "source_share",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn idx(d: Direction) -> usize {
    match d {
        Direction::Inbound => 0,
        Direction::Outbound => 1,
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            requests: Requests::new(),
            connections: Family::new(MAX_LABEL_SETS, |l: &ConnLabels| ConnLabels {
                direction: l.direction,
                protocol: l.protocol,
                server_name: OVERFLOW.into(),
            }),
            connect_errors: Family::new(MAX_LABEL_SETS, |l| l.clone()),
            tls_handshakes: Family::new(MAX_LABEL_SETS, |l| *l),
            open: [Arc::new(Gauge::default()), Arc::new(Gauge::default())],
            bytes: [ByteCounters::default(), ByteCounters::default()],
            retries: Family::new(MAX_LABEL_SETS, |(_, r)| (OVERFLOW.into(), r.clone())),
            retry_budget_exhausted: Family::new(MAX_LABEL_SETS, |_| OVERFLOW.into()),
            ejections: Family::new(MAX_LABEL_SETS, |_| (OVERFLOW.into(), OVERFLOW.into())),
            limits: Family::new(MAX_LABEL_SETS, |l| *l),
            rate_limited: Family::new(MAX_LABEL_SETS, |(d, _, _)| {
                (*d, OVERFLOW.into(), OVERFLOW.into())
            }),
            shed: Family::new(MAX_LABEL_SETS, |(d, _, _)| {
                (*d, OVERFLOW.into(), OVERFLOW.into())
            }),
            mirrored: Family::new(MAX_LABEL_SETS, |(_, r)| (OVERFLOW.into(), r)),
            health_checks: Family::new(MAX_LABEL_SETS, |(_, _, r)| {
                (OVERFLOW.into(), OVERFLOW.into(), r)
            }),
        }
    }

    /// A limit held, `at` a listener (`inbound`, `outbound`, `admin`) or on the
    /// client side (`upstream`).
    pub fn limit_tripped(&self, limit: Limit, at: &'static str) {
        self.limits.get(&(limit, at)).inc();
    }

    /// Times `limit` held, anywhere.
    pub fn limit_total(&self, limit: Limit) -> u64 {
        self.limits
            .snapshot()
            .iter()
            .filter(|((l, _), _)| *l == limit)
            .map(|(_, c)| c.get())
            .sum()
    }

    /// A retry of a request to `destination`, and why.
    pub fn retry(&self, destination: &Arc<str>, reason: &str) {
        self.retries
            .get(&(destination.clone(), reason.into()))
            .inc();
    }

    /// A retry the budget did not allow.
    pub fn retry_budget_exhausted(&self, destination: &Arc<str>) {
        self.retry_budget_exhausted.get(destination).inc();
    }

    /// An endpoint of `destination` ejected by outlier detection.
    pub fn ejection(&self, destination: &Arc<str>, endpoint: &str) {
        self.ejections
            .get(&(destination.clone(), endpoint.into()))
            .inc();
    }

    /// Retries to `destination` so far, for whatever reason.
    pub fn retries_total(&self, destination: &str) -> u64 {
        self.retries
            .snapshot()
            .iter()
            .filter(|((d, _), _)| d.as_ref() == destination)
            .map(|(_, c)| c.get())
            .sum()
    }

    /// Retries to `destination` by reason.
    pub fn retries_by_reason(&self, destination: &str) -> Vec<(Arc<str>, u64)> {
        let mut v: Vec<(Arc<str>, u64)> = self
            .retries
            .snapshot()
            .into_iter()
            .filter(|((d, _), _)| d.as_ref() == destination)
            .map(|((_, r), c)| (r, c.get()))
            .collect();
        v.sort();
        v
    }

    /// Times `endpoint` of `destination` was ejected.
    pub fn ejections_total(&self, destination: &str, endpoint: &str) -> u64 {
        self.ejections
            .snapshot()
            .iter()
            .filter(|((d, e), _)| d.as_ref() == destination && e.as_ref() == endpoint)
            .map(|(_, c)| c.get())
            .sum()
    }

    pub fn budget_exhausted_total(&self, destination: &str) -> u64 {
        self.retry_budget_exhausted
            .snapshot()
            .iter()
            .filter(|(d, _)| d.as_ref() == destination)
            .map(|(_, c)| c.get())
            .sum()
    }

    pub fn open(&self, d: Direction) -> &Arc<Gauge> {
        &self.open[idx(d)]
    }

    pub fn bytes(&self, d: Direction) -> &ByteCounters {
        &self.bytes[idx(d)]
    }

    /// A mesh TLS handshake and how it went: `ok` or `error`.
    pub fn tls_handshake(&self, direction: Direction, result: &'static str) {
        self.tls_handshakes.get(&(direction, result)).inc();
    }

    pub fn connect_error(&self, direction: Direction, reason: &'static str) {
        self.connect_errors
            .get(&ConnectErrorLabels { direction, reason })
            .inc();
    }

    /// The counter of requests refused by the rate limit of `authority` (`route`:
    /// the route's, else empty).
    pub fn rate_limited(
        &self,
        direction: Direction,
        authority: &Arc<str>,
        route: &Arc<str>,
    ) -> Arc<Counter> {
        self.rate_limited
            .get(&(direction, authority.clone(), route.clone()))
    }

    /// The counter of requests of `priority` shed at `authority`'s concurrency limit.
    pub fn shed(
        &self,
        direction: Direction,
        authority: &Arc<str>,
        priority: &Arc<str>,
    ) -> Arc<Counter> {
        self.shed
            .get(&(direction, authority.clone(), priority.clone()))
    }

    /// A copy of a request sent to `authority` (the mirror) ended with `result`.
    pub fn mirrored(&self, authority: &Arc<str>, result: &'static str) {
        self.mirrored.get(&(authority.clone(), result)).inc();
    }

    /// An active health check of `endpoint` ended with `result` (healthy, unhealthy).
    pub fn health_checked(&self, authority: &Arc<str>, endpoint: &Arc<str>, result: &'static str) {
        self.health_checks
            .get(&(authority.clone(), endpoint.clone(), result))
            .inc();
    }

    pub fn render(&self, e: &mut Exposition) {
        e.family(
            "gofe_requests_total",
            "HTTP requests proxied, by response status (and grpc-status for gRPC).",
            Kind::Counter,
        );
        let mut requests = self.requests.snapshot();
        requests.sort_by(|a, b| a.0.cmp(&b.0));
        for (l, stats) in &requests {
            let mut counts: Vec<(String, String, u64)> = stats
                .counts()
                .into_iter()
                .map(|(s, g, n)| {
                    (
                        s.to_string(),
                        g.map(|g| g.to_string()).unwrap_or_default(),
                        n,
                    )
                })
                .collect();
            counts.sort();
            if stats.other_statuses() > 0 {
                counts.push((OVERFLOW.into(), OVERFLOW.into(), stats.other_statuses()));
            }
            for (status, grpc, n) in counts {
                e.sample(
                    "gofe_requests_total",
                    &[
                        ("direction", l.direction.as_str()),
                        ("authority", &l.authority),
                        ("status_code", &status),
                        ("grpc_status", &grpc),
                        ("tls", if l.tls { "true" } else { "false" }),
                        ("peer_identity", &l.peer_identity),
                        ("route", &l.route),
                        ("backend", &l.backend),
                    ],
                    n,
                );
            }
        }

        let series: Vec<_> = requests
            .iter()
            .map(|(l, stats)| {
                (
                    vec![
                        ("direction", l.direction.as_str()),
                        ("authority", &*l.authority),
                        ("tls", if l.tls { "true" } else { "false" }),
                        ("peer_identity", &*l.peer_identity),
                        ("route", &*l.route),
                        ("backend", &*l.backend),
                    ],
                    stats.latency.snapshot(),
                )
            })
            .collect();
        latency::render(
            e,
            "gofe_request_duration_seconds",
            "HTTP request latency from the first request byte to the end of the response body.",
            &series,
        );

        e.family(
            "gofe_tcp_connections_open",
            "TCP connections the proxy holds open from clients.",
            Kind::Gauge,
        );
        for d in [Direction::Inbound, Direction::Outbound] {
            e.sample(
                "gofe_tcp_connections_open",
                &[("direction", d.as_str())],
                self.open(d).get(),
            );
        }

        e.family(
            "gofe_tcp_connections_total",
            "TCP connections accepted, by detected protocol (and SNI for application TLS).",
            Kind::Counter,
        );
        let mut conns = self.connections.snapshot();
        conns.sort_by(|a, b| a.0.cmp(&b.0));
        for (l, c) in conns {
            e.sample(
                "gofe_tcp_connections_total",
                &[
                    ("direction", l.direction.as_str()),
                    ("protocol", l.protocol),
                    ("server_name", &l.server_name),
                ],
                c.get(),
            );
        }

        e.family(
            "gofe_tcp_bytes_total",
            "Bytes on accepted connections: client_to_server is what the client sent.",
            Kind::Counter,
        );
        for d in [Direction::Inbound, Direction::Outbound] {
            let b = self.bytes(d);
            for (way, c) in [
                ("client_to_server", &b.client_to_server),
                ("server_to_client", &b.server_to_client),
            ] {
                e.sample(
                    "gofe_tcp_bytes_total",
                    &[("direction", d.as_str()), ("way", way)],
                    c.get(),
                );
            }
        }

        e.family(
            "gofe_tcp_connect_errors_total",
            "Failed connections to endpoints, by reason.",
            Kind::Counter,
        );
        let mut errors = self.connect_errors.snapshot();
        errors.sort_by(|a, b| a.0.cmp(&b.0));
        for (l, c) in errors {
            e.sample(
                "gofe_tcp_connect_errors_total",
                &[("direction", l.direction.as_str()), ("reason", l.reason)],
                c.get(),
            );
        }

        e.family(
            "gofe_tls_handshakes_total",
            "Mesh TLS handshakes, by result (ok, error).",
            Kind::Counter,
        );
        let mut handshakes = self.tls_handshakes.snapshot();
        handshakes.sort_by(|a, b| a.0.cmp(&b.0));
        for ((direction, result), c) in handshakes {
            e.sample(
                "gofe_tls_handshakes_total",
                &[("direction", direction.as_str()), ("result", result)],
                c.get(),
            );
        }

        e.family(
            "gofe_retries_total",
            "Retries, by destination and reason (connect-failure, refused-stream, reset, per-try-timeout, the status code, or the gRPC status).",
            Kind::Counter,
        );
        let mut retries = self.retries.snapshot();
        retries.sort_by(|a, b| a.0.cmp(&b.0));
        for ((authority, reason), c) in retries {
            e.sample(
                "gofe_retries_total",
                &[("authority", &authority), ("reason", &reason)],
                c.get(),
            );
        }

        e.family(
            "gofe_retry_budget_exhausted_total",
            "Retries not made because the destination's retry budget was spent.",
            Kind::Counter,
        );
        let mut exhausted = self.retry_budget_exhausted.snapshot();
        exhausted.sort_by(|a, b| a.0.cmp(&b.0));
        for (authority, c) in exhausted {
            e.sample(
                "gofe_retry_budget_exhausted_total",
                &[("authority", &authority)],
                c.get(),
            );
        }

        e.family(
            "gofe_outlier_ejections_total",
            "Endpoints ejected by outlier detection.",
            Kind::Counter,
        );
        let mut ejections = self.ejections.snapshot();
        ejections.sort_by(|a, b| a.0.cmp(&b.0));
        for ((authority, endpoint), c) in ejections {
            e.sample(
                "gofe_outlier_ejections_total",
                &[("authority", &authority), ("endpoint", &endpoint)],
                c.get(),
            );
        }

        e.family(
            "gofe_limits_tripped_total",
            "Times a bound held against a client or peer, by limit and where (see README, Limits).",
            Kind::Counter,
        );
        let mut limits = self.limits.snapshot();
        limits.sort_by(|a, b| a.0.cmp(&b.0));
        for ((limit, at), c) in limits {
            e.sample(
                "gofe_limits_tripped_total",
                &[("limit", limit.as_str()), ("at", at)],
                c.get(),
            );
        }

        e.family(
            "gofe_rate_limited_total",
            "Requests refused by a rate limit (429), by direction, authority and route.",
            Kind::Counter,
        );
        let mut limited = self.rate_limited.snapshot();
        limited.sort_by(|a, b| a.0.cmp(&b.0));
        for ((direction, authority, route), c) in limited {
            e.sample(
                "gofe_rate_limited_total",
                &[
                    ("direction", direction.as_str()),
                    ("authority", &authority),
                    ("route", &route),
                ],
                c.get(),
            );
        }

        e.family(
            "gofe_shed_total",
            "Requests refused at a concurrency limit (503 with gofe-overloaded), by priority.",
            Kind::Counter,
        );
        let mut shed = self.shed.snapshot();
        shed.sort_by(|a, b| a.0.cmp(&b.0));
        for ((direction, authority, priority), c) in shed {
            e.sample(
                "gofe_shed_total",
                &[
                    ("direction", direction.as_str()),
                    ("authority", &authority),
                    ("priority", &priority),
                ],
                c.get(),
            );
        }

        e.family(
            "gofe_mirrored_total",
            "Copies of requests sent to a mirror, by result (ok, error, skipped: a body too large to copy).",
            Kind::Counter,
        );
        let mut mirrored = self.mirrored.snapshot();
        mirrored.sort_by(|a, b| a.0.cmp(&b.0));
        for ((authority, result), c) in mirrored {
            e.sample(
                "gofe_mirrored_total",
                &[("authority", &authority), ("result", result)],
                c.get(),
            );
        }

        e.family(
            "gofe_health_checks_total",
            "Active health checks, by endpoint and result (healthy, unhealthy).",
            Kind::Counter,
        );
        let mut checks = self.health_checks.snapshot();
        checks.sort_by(|a, b| a.0.cmp(&b.0));
        for ((authority, endpoint, result), c) in checks {
            e.sample(
                "gofe_health_checks_total",
                &[
                    ("authority", &authority),
                    ("endpoint", &endpoint),
                    ("result", result),
                ],
                c.get(),
            );
        }

        e.family(
            "gofe_metrics_label_sets_overflowed_total",
            "Label sets folded into \"other\" because a family reached its cap.",
            Kind::Counter,
        );
        for d in [Direction::Inbound, Direction::Outbound] {
            e.sample(
                "gofe_metrics_label_sets_overflowed_total",
                &[("metric", "gofe_requests_total"), ("direction", d.as_str())],
                self.requests.overflowed(d),
            );
        }
        e.sample(
            "gofe_metrics_label_sets_overflowed_total",
            &[("metric", "gofe_tcp_connections_total"), ("direction", "")],
            self.connections.overflowed(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_land_in_their_slots() {
        let s = RequestStats::default();
        s.record(StatusCode::OK, None);
        s.record(StatusCode::OK, None);
        s.record(StatusCode::BAD_GATEWAY, None);
        s.record(StatusCode::OK, Some(14));
        s.record(StatusCode::SERVICE_UNAVAILABLE, Some(14));
        s.record(StatusCode::OK, Some(99));
        let mut c = s.counts();
        c.sort();
        assert_eq!(
            c,
            vec![
                (200, None, 2),
                (200, Some(14), 1),
                (200, Some(99), 1),
                (502, None, 1),
                (503, Some(14), 1)
            ]
        );
        assert_eq!(s.total(), 6);
    }

    #[test]
    fn odd_statuses_from_an_upstream_are_bounded() {
        let s = RequestStats::default();
        for g in 100..1100u16 {
            s.record(StatusCode::OK, Some(g));
        }
        assert_eq!(s.counts().len(), MAX_RARE_STATUSES);
        assert_eq!(s.other_statuses(), 1000 - MAX_RARE_STATUSES as u64);
        assert_eq!(s.total(), 1000);
    }

    #[test]
    fn random_authorities_fold_into_other_with_bounded_histograms() {
        let m = Metrics::new();
        for i in 0..(MAX_REQUEST_LABEL_SETS + 200) {
            let stats = m.requests.get(&RequestLabels {
                direction: Direction::Inbound,
                authority: format!("host-{i}.example:80").into(),
                tls: false,
                peer_identity: "".into(),
                route: "".into(),
                backend: "".into(),
            });
            stats.record(StatusCode::OK, None);
            stats.latency.record(std::time::Duration::from_millis(1));
        }
        assert_eq!(m.requests.len(), MAX_REQUEST_LABEL_SETS + 1);
        assert_eq!(m.requests.overflowed(Direction::Inbound), 200);
        // Outbound label sets have their own room.
        let outbound = m.requests.get(&RequestLabels {
            direction: Direction::Outbound,
            authority: "api:80".into(),
            tls: false,
            peer_identity: "".into(),
            route: "".into(),
            backend: "".into(),
        });
        outbound.record(StatusCode::OK, None);
        assert_eq!(m.requests.overflowed(Direction::Outbound), 0);
        let other = m.requests.get(&RequestLabels {
            direction: Direction::Inbound,
            authority: OVERFLOW.into(),
            tls: false,
            peer_identity: OVERFLOW.into(),
            route: OVERFLOW.into(),
            backend: OVERFLOW.into(),
        });
        assert_eq!(other.total(), 200);
        assert_eq!(other.latency.snapshot().count, 200);
        let mut e = Exposition::new();
        m.render(&mut e);
        let text = e.finish();
        assert!(text.contains(
            "gofe_request_duration_seconds_count{direction=\"inbound\",authority=\"other\",tls=\"false\",peer_identity=\"other\",route=\"other\",backend=\"other\"} 200"
        ));
        assert!(text.contains(
            "gofe_metrics_label_sets_overflowed_total{metric=\"gofe_requests_total\",direction=\"inbound\"} 200"
        ));
    }

    #[test]
    fn exposition_names_every_family() {
        let m = Metrics::new();
        m.requests
            .get(&RequestLabels {
                direction: Direction::Outbound,
                authority: "web:80".into(),
                tls: false,
                peer_identity: "".into(),
                route: "".into(),
                backend: "".into(),
            })
            .record(StatusCode::OK, None);
        m.open(Direction::Inbound).inc();
        let mut e = Exposition::new();
        m.render(&mut e);
        let text = e.finish();
        assert!(text.contains(
            "gofe_requests_total{direction=\"outbound\",authority=\"web:80\",status_code=\"200\",grpc_status=\"\",tls=\"false\",peer_identity=\"\",route=\"\",backend=\"\"} 1"
        ), "{text}");
        assert!(text.contains("gofe_tcp_connections_open{direction=\"inbound\"} 1"));
        assert!(
            text.contains(
                "gofe_tcp_bytes_total{direction=\"outbound\",way=\"server_to_client\"} 0"
            )
        );
    }
}
