//! Traffic rules as settings: a destination's routes (matches, weighted backends,
//! stickiness, mirror, faults, per-route timeout and rate limit), its rate limit, its
//! active health check and priority classes; and the inbound ports' rules. Every check
//! runs while the YAML is deserialized, so a mistake is reported by serde_yaml with its
//! path (`destinations[0].policy.routes[1].backends`) and its line and column.

use super::parse::{parse_duration, parse_nonzero_duration};
use super::retry::RetryPolicy;
use crate::addrs::DestKey;
use gofe_identity::SpiffeId;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// A compiled regular expression, compared by its text (so that a policy reloaded
/// unchanged compares equal and keeps its stacks).
#[derive(Clone, Debug)]
pub struct Pattern(pub regex::Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Pattern {
    /// `s` anchored at both ends: a rule's regex matches the whole value.
    fn whole(s: &str) -> Result<Pattern, String> {
        regex::Regex::new(&format!("^(?:{s})$"))
            .map(Pattern)
            .map_err(|e| {
                let e = e.to_string();
                let why = e
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim_start_matches("error: ");
                format!("regex {s:?} does not compile: {why}")
            })
    }

    pub fn is_match(&self, s: &str) -> bool {
        self.0.is_match(s)
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn nonzero_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_nonzero_duration(&s).map_err(serde::de::Error::custom)
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(|d| (!d.is_zero()).then_some(d))
}

/// How a request's path is matched.
#[derive(Clone, Debug, PartialEq)]
pub enum PathMatch {
    Exact(String),
    /// Whole segments: `/checkout` matches `/checkout` and `/checkout/pay`, not
    /// `/checkouts`. Kept without its trailing slash (`/` for the root).
    Prefix(String),
    Regex(Pattern),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathDoc {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

impl<'de> Deserialize<'de> for PathMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let p = PathDoc::deserialize(d)?;
        match (p.exact, p.prefix, p.regex) {
            (Some(p), None, None) if p.starts_with('/') => Ok(PathMatch::Exact(p)),
            (None, Some(p), None) if p.starts_with('/') => {
                let trimmed = p.trim_end_matches('/');
                Ok(PathMatch::Prefix(if trimmed.is_empty() {
                    "/".into()
                } else {
                    trimmed.into()
                }))
            }
            (None, None, Some(r)) => Pattern::whole(&r)
                .map(PathMatch::Regex)
                .map_err(D::Error::custom),
            (Some(p), None, None) | (None, Some(p), None) => {
                Err(D::Error::custom(format!("path {p:?} must start with /")))
            }
            _ => Err(D::Error::custom(
                "expected one of exact: PATH, prefix: PATH or regex: PATTERN",
            )),
        }
    }
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) if p == "/" => true,
            PathMatch::Prefix(p) => {
                path.starts_with(p.as_str())
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
            PathMatch::Regex(r) => r.is_match(path),
        }
    }

    /// How specific it is, for precedence: exact paths first, then the longest (a
    /// regex counts the literal characters it starts with).
    fn rank(&self) -> (bool, usize) {
        match self {
            PathMatch::Exact(p) => (true, p.len()),
            PathMatch::Prefix(p) => (false, p.len()),
            PathMatch::Regex(r) => {
                let src = r.0.as_str();
                let inner = &src[4..src.len() - 2]; // within ^(?: ... )$
                let literal = inner
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || matches!(c, '/' | '-' | '_'))
                    .count();
                (false, literal)
            }
        }
    }
}

/// How one header's or query parameter's value is matched.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueMatch {
    Exact(String),
    Regex(Pattern),
    Present,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ValueDoc {
    exact: Option<String>,
    regex: Option<String>,
    present: Option<bool>,
}

impl<'de> Deserialize<'de> for ValueMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = ValueDoc::deserialize(d)?;
        match (v.exact, v.regex, v.present) {
            (Some(e), None, None) => Ok(ValueMatch::Exact(e)),
            (None, Some(r), None) => Pattern::whole(&r)
                .map(ValueMatch::Regex)
                .map_err(D::Error::custom),
            (None, None, Some(true)) => Ok(ValueMatch::Present),
            _ => Err(D::Error::custom(
                "expected one of exact: VALUE, regex: PATTERN or present: true",
            )),
        }
    }
}

impl ValueMatch {
    pub fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (_, None) => false,
            (ValueMatch::Present, Some(_)) => true,
            (ValueMatch::Exact(e), Some(v)) => e == v,
            (ValueMatch::Regex(r), Some(v)) => r.is_match(v),
        }
    }
}

/// What a request must be for a route to take it. Every part given must match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    pub method: Option<http::Method>,
    /// Header names lower case.
    pub headers: Vec<(http::HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchDoc {
    path: Option<PathMatch>,
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, ValueMatch>,
    #[serde(default)]
    query: BTreeMap<String, ValueMatch>,
}

impl<'de> Deserialize<'de> for RouteMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let m = MatchDoc::deserialize(d)?;
        let method = m
            .method
            .map(|s| {
                http::Method::from_bytes(s.to_ascii_uppercase().as_bytes())
                    .map_err(|_| D::Error::custom(format!("method {s:?} is not an HTTP method")))
            })
            .transpose()?;
        let headers = m
            .headers
            .into_iter()
            .map(|(k, v)| {
                http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                    .map(|n| (n, v))
                    .map_err(|_| D::Error::custom(format!("header {k:?} is not a header name")))
            })
            .collect::<Result<_, _>>()?;
        Ok(RouteMatch {
            path: m.path,
            method,
            headers,
            query: m.query.into_iter().collect(),
        })
    }
}

impl RouteMatch {
    /// Gateway API's order, most specific first: exact path, longest path, a method,
    /// most headers, most query parameters. (Ties: the first listed, by a stable sort.)
    pub fn precedence(&self) -> (bool, usize, bool, usize, usize) {
        let (exact, len) = self.path.as_ref().map_or((false, 1), PathMatch::rank);
        (
            exact,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }

    pub fn matches<B>(&self, req: &http::Request<B>) -> bool {
        if let Some(m) = &self.method
            && req.method() != m
        {
            return false;
        }
        if let Some(p) = &self.path
            && !p.matches(req.uri().path())
        {
            return false;
        }
        let headers = req.headers();
        for (name, m) in &self.headers {
            // A header sent more than once matches when any of its values does.
            let mut values = headers.get_all(name).iter().peekable();
            if values.peek().is_none() {
                return false;
            }
            if !values.any(|v| m.matches(v.to_str().ok())) {
                return false;
            }
        }
        if !self.query.is_empty() {
            let query = req.uri().query().unwrap_or("");
            for (name, m) in &self.query {
                let value = query
                    .split('&')
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (k == name).then_some(v)
                    })
                    .next();
                if !m.matches(value) {
                    return false;
                }
            }
        }
        true
    }
}

/// One backend of a weighted split: a destination of its own.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendSpec {
    pub destination: DestKey,
    pub weight: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendDoc {
    destination: String,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

impl<'de> Deserialize<'de> for BackendSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let b = BackendDoc::deserialize(d)?;
        let destination = DestKey::parse(&b.destination).map_err(|_| {
            D::Error::custom(format!(
                "destination {:?} is not host:port or ip:port",
                b.destination
            ))
        })?;
        if b.weight > 1_000_000 {
            return Err(D::Error::custom("weight must be at most 1000000"));
        }
        Ok(BackendSpec {
            destination,
            weight: b.weight,
        })
    }
}

/// Where a user's key comes from, to keep the user on one backend.
#[derive(Clone, Debug, PartialEq)]
pub enum Sticky {
    /// Set on the response when the request has none.
    Cookie {
        name: String,
        ttl: Duration,
    },
    Header(http::HeaderName),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StickyDoc {
    cookie: Option<String>,
    #[serde(default, deserialize_with = "optional_duration")]
    ttl: Option<Duration>,
    header: Option<String>,
}

/// A sticky cookie's lifetime when the rule gives none.
const STICKY_TTL: Duration = Duration::from_secs(3600);

impl<'de> Deserialize<'de> for Sticky {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let s = StickyDoc::deserialize(d)?;
        match (s.cookie, s.header) {
            (Some(name), None) => {
                let ok = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !ok {
                    return Err(D::Error::custom(format!(
                        "cookie name {name:?}: expected letters, digits, '-', '_', '.'"
                    )));
                }
                Ok(Sticky::Cookie {
                    name,
                    ttl: s.ttl.unwrap_or(STICKY_TTL),
                })
            }
            (None, Some(h)) if s.ttl.is_none() => {
                http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                    .map(Sticky::Header)
                    .map_err(|_| D::Error::custom(format!("header {h:?} is not a header name")))
            }
            _ => Err(D::Error::custom(
                "expected {cookie: NAME, ttl: DURATION} or {header: NAME}",
            )),
        }
    }
}

fn percent<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    use serde::de::Error;
    let p = f64::deserialize(d)?;
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(D::Error::custom("expected a percentage from 0 to 100"))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MirrorSpec {
    pub destination: DestKey,
    pub percent: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorDoc {
    destination: String,
    #[serde(deserialize_with = "percent")]
    percent: f64,
}

impl<'de> Deserialize<'de> for MirrorSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let m = MirrorDoc::deserialize(d)?;
        let destination = DestKey::parse(&m.destination).map_err(|_| {
            D::Error::custom(format!(
                "destination {:?} is not host:port or ip:port",
                m.destination
            ))
        })?;
        Ok(MirrorSpec {
            destination,
            percent: m.percent,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbortSpec {
    #[serde(deserialize_with = "percent")]
    pub percent: f64,
    #[serde(deserialize_with = "status")]
    pub status: http::StatusCode,
}

fn status<'de, D: Deserializer<'de>>(d: D) -> Result<http::StatusCode, D::Error> {
    use serde::de::Error;
    let s = u16::deserialize(d)?;
    http::StatusCode::from_u16(s)
        .ok()
        .filter(|s| (200..600).contains(&s.as_u16()))
        .ok_or_else(|| D::Error::custom("expected an HTTP status from 200 to 599"))
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelaySpec {
    #[serde(deserialize_with = "percent")]
    pub percent: f64,
    #[serde(deserialize_with = "nonzero_duration")]
    pub duration: Duration,
}

/// Faults injected on purpose, to test how clients bear them.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    pub abort: Option<AbortSpec>,
    pub delay: Option<DelaySpec>,
}

/// A token bucket: `requests_per_second` refill, up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    pub requests_per_second: f64,
    pub burst: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BucketDoc {
    requests_per_second: f64,
    burst: Option<u32>,
}

impl BucketDoc {
    fn check(self) -> Result<Bucket, String> {
        if !(self.requests_per_second > 0.0 && self.requests_per_second <= 1e9) {
            return Err("requests_per_second must be above 0 (and at most 1e9)".into());
        }
        // Without a burst, one second's worth.
        let burst = self
            .burst
            .unwrap_or_else(|| self.requests_per_second.ceil().max(1.0) as u32);
        if burst == 0 {
            return Err("burst must be at least 1".into());
        }
        Ok(Bucket {
            requests_per_second: self.requests_per_second,
            burst,
        })
    }
}

impl<'de> Deserialize<'de> for Bucket {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BucketDoc::deserialize(d)?
            .check()
            .map_err(serde::de::Error::custom)
    }
}

/// A bucket for one client identity, instead of `per_client`'s.
#[derive(Clone, Debug, PartialEq)]
pub struct Override {
    pub client: SpiffeId,
    pub bucket: Bucket,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideDoc {
    client: String,
    requests_per_second: f64,
    burst: Option<u32>,
}

impl<'de> Deserialize<'de> for Override {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let o = OverrideDoc::deserialize(d)?;
        let client = o
            .client
            .parse::<SpiffeId>()
            .map_err(|e| D::Error::custom(format!("client: {e}")))?;
        let bucket = BucketDoc {
            requests_per_second: o.requests_per_second,
            burst: o.burst,
        }
        .check()
        .map_err(D::Error::custom)?;
        Ok(Override { client, bucket })
    }
}

/// A rate limit: one bucket for everyone, and optionally one per client (its identity
/// when meshed, else its source IP), with overrides by identity.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimit {
    pub total: Option<Bucket>,
    pub per_client: Option<Bucket>,
    pub overrides: Vec<Override>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitDoc {
    requests_per_second: Option<f64>,
    burst: Option<u32>,
    per_client: Option<Bucket>,
    #[serde(default)]
    overrides: Vec<Override>,
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let r = RateLimitDoc::deserialize(d)?;
        let total = match (r.requests_per_second, r.burst) {
            (Some(rps), burst) => Some(
                BucketDoc {
                    requests_per_second: rps,
                    burst,
                }
                .check()
                .map_err(D::Error::custom)?,
            ),
            (None, Some(_)) => {
                return Err(D::Error::custom("burst without requests_per_second"));
            }
            (None, None) => None,
        };
        if total.is_none() && r.per_client.is_none() && r.overrides.is_empty() {
            return Err(D::Error::custom(
                "expected requests_per_second, per_client or overrides",
            ));
        }
        Ok(RateLimit {
            total,
            per_client: r.per_client,
            overrides: r.overrides,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthProtocol {
    Http,
    /// grpc.health.v1.Health/Check
    Grpc,
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default = "http_protocol")]
    pub protocol: HealthProtocol,
    /// HTTP: the path asked for. gRPC: the service name (empty: the server as a whole).
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default = "five_seconds", deserialize_with = "nonzero_duration")]
    pub interval: Duration,
    #[serde(default = "one_second", deserialize_with = "nonzero_duration")]
    pub timeout: Duration,
    #[serde(default = "three")]
    pub unhealthy_threshold: u32,
    #[serde(default = "two")]
    pub healthy_threshold: u32,
    #[serde(default = "ok_status")]
    pub expected_statuses: Vec<u16>,
}

fn http_protocol() -> HealthProtocol {
    HealthProtocol::Http
}
fn five_seconds() -> Duration {
    Duration::from_secs(5)
}
fn one_second() -> Duration {
    Duration::from_secs(1)
}
fn three() -> u32 {
    3
}
fn two() -> u32 {
    2
}
fn ok_status() -> Vec<u16> {
    vec![200]
}

impl HealthCheck {
    fn check(&self) -> Result<(), String> {
        if self.unhealthy_threshold == 0 || self.healthy_threshold == 0 {
            return Err("thresholds must be at least 1".into());
        }
        if self.expected_statuses.is_empty()
            || self
                .expected_statuses
                .iter()
                .any(|s| !(100..600).contains(s))
        {
            return Err("expected_statuses must list HTTP statuses".into());
        }
        if let Some(p) = &self.path
            && !p.starts_with('/')
        {
            return Err(format!("path {p:?} must start with /"));
        }
        Ok(())
    }
}

/// Which requests are refused first at the concurrency limit.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Priority {
    #[serde(deserialize_with = "header_name")]
    pub header: http::HeaderName,
    /// First listed, first shed.
    pub shed_first: Vec<String>,
}

fn header_name<'de, D: Deserializer<'de>>(d: D) -> Result<http::HeaderName, D::Error> {
    use serde::de::Error;
    let s = String::deserialize(d)?;
    http::HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
        .map_err(|_| D::Error::custom(format!("header {s:?} is not a header name")))
}

impl Priority {
    /// The share of the limit a request of this priority may use: those listed first
    /// in `shed_first` the least, unlisted (critical) ones all of it.
    pub fn share(&self, value: Option<&[u8]>) -> (usize, usize) {
        let n = self.shed_first.len();
        let class = value
            .and_then(|v| self.shed_first.iter().position(|s| s.as_bytes() == v))
            .unwrap_or(n);
        (class + 1, n + 1)
    }
}

/// One route: what it matches and where its requests go.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteSpec {
    pub name: Arc<str>,
    pub matches: RouteMatch,
    /// Empty: the destination itself.
    pub backends: Vec<BackendSpec>,
    pub sticky: Option<Sticky>,
    pub mirror: Option<MirrorSpec>,
    pub fault: Option<FaultSpec>,
    pub timeout: Option<Duration>,
    /// Each attempt's timeout on this route, over the backend's `per_try_timeout`.
    pub per_try_timeout: Option<Duration>,
    pub rate_limit: Option<RateLimit>,
    /// The route's own retry settings (`retry_on`, `retry_limit`...), as written.
    pub retry_settings: BTreeMap<&'static str, String>,
    /// Those settings over the destination's, once the file's parser has read them
    /// with the destination's (None: the backend's own retries apply).
    pub retry: Option<Arc<RetryPolicy>>,
}

/// The retry settings a route may give itself (the budget stays its destination's).
const ROUTE_RETRY_KEYS: [&str; 6] = [
    "retry_on",
    "retry_limit",
    "retry_backoff",
    "retry_max_body",
    "retry_status_codes",
    "retryable",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteDoc {
    name: String,
    #[serde(rename = "match", default)]
    matches: Option<RouteMatch>,
    #[serde(default)]
    backends: Vec<BackendSpec>,
    sticky: Option<Sticky>,
    mirror: Option<MirrorSpec>,
    fault: Option<FaultSpec>,
    #[serde(default, deserialize_with = "optional_duration")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    per_try_timeout: Option<Duration>,
    rate_limit: Option<RateLimit>,
    retry_on: Option<serde_yaml::Value>,
    retry_limit: Option<serde_yaml::Value>,
    retry_backoff: Option<serde_yaml::Value>,
    retry_max_body: Option<serde_yaml::Value>,
    retry_status_codes: Option<serde_yaml::Value>,
    retryable: Option<serde_yaml::Value>,
}

impl<'de> Deserialize<'de> for RouteSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let r = RouteDoc::deserialize(d)?;
        if r.name.is_empty() {
            return Err(D::Error::custom("a route needs a name"));
        }
        if !r.backends.is_empty() && r.backends.iter().all(|b| b.weight == 0) {
            return Err(D::Error::custom(format!(
                "route {}: every backend has weight 0",
                r.name
            )));
        }
        if r.sticky.is_some() && r.backends.len() < 2 {
            return Err(D::Error::custom(format!(
                "route {}: sticky needs backends to choose between",
                r.name
            )));
        }
        let given = [
            r.retry_on,
            r.retry_limit,
            r.retry_backoff,
            r.retry_max_body,
            r.retry_status_codes,
            r.retryable,
        ];
        let mut retry_settings = BTreeMap::new();
        for (key, value) in ROUTE_RETRY_KEYS.into_iter().zip(given) {
            let Some(v) = value else { continue };
            let text = match v {
                serde_yaml::Value::String(s) => s,
                serde_yaml::Value::Number(n) => n.to_string(),
                serde_yaml::Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(D::Error::custom(format!(
                        "route {}: {key} must be a single value",
                        r.name
                    )));
                }
            };
            retry_settings.insert(key, text);
        }
        Ok(RouteSpec {
            retry_settings,
            retry: None,
            name: r.name.into(),
            matches: r.matches.unwrap_or_default(),
            backends: r.backends,
            sticky: r.sticky,
            mirror: r.mirror,
            fault: r.fault,
            timeout: r.timeout,
            per_try_timeout: r.per_try_timeout,
            rate_limit: r.rate_limit,
        })
    }
}

/// A destination's traffic rules.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rules {
    /// In precedence order (most specific first).
    pub routes: Vec<RouteSpec>,
    pub rate_limit: Option<RateLimit>,
    pub health_check: Option<HealthCheck>,
    pub priority: Option<Priority>,
}

impl Rules {
    pub fn is_empty(&self) -> bool {
        *self == Rules::default()
    }

    /// The route `req` takes: the first in precedence order that matches.
    pub fn route<B>(&self, req: &http::Request<B>) -> Option<&RouteSpec> {
        self.routes.iter().find(|r| r.matches.matches(req))
    }
}

fn value_json(m: &ValueMatch) -> serde_json::Value {
    match m {
        ValueMatch::Exact(e) => serde_json::json!({ "exact": e }),
        ValueMatch::Regex(r) => serde_json::json!({ "regex": r.0.as_str() }),
        ValueMatch::Present => serde_json::json!({ "present": true }),
    }
}

fn bucket_json(b: &Bucket) -> serde_json::Value {
    serde_json::json!({ "requests_per_second": b.requests_per_second, "burst": b.burst })
}

fn rate_json(r: &RateLimit) -> serde_json::Value {
    serde_json::json!({
        "total": r.total.as_ref().map(bucket_json),
        "per_client": r.per_client.as_ref().map(bucket_json),
        "overrides": r.overrides.iter().map(|o| serde_json::json!({
            "client": o.client.to_string(),
            "bucket": bucket_json(&o.bucket),
        })).collect::<Vec<_>>(),
    })
}

fn priority_json(p: &Priority) -> serde_json::Value {
    serde_json::json!({ "header": p.header.as_str(), "shed_first": p.shed_first })
}

impl Rules {
    /// The rules in force, for `/endpoints` (routes in precedence order).
    pub fn to_json(&self) -> serde_json::Value {
        let routes: Vec<serde_json::Value> = self
            .routes
            .iter()
            .map(|r| {
                let m = &r.matches;
                serde_json::json!({
                    "name": &*r.name,
                    "match": {
                        "path": m.path.as_ref().map(|p| match p {
                            PathMatch::Exact(e) => serde_json::json!({ "exact": e }),
                            PathMatch::Prefix(e) => serde_json::json!({ "prefix": e }),
                            PathMatch::Regex(e) => serde_json::json!({ "regex": e.0.as_str() }),
                        }),
                        "method": m.method.as_ref().map(|m| m.as_str()),
                        "headers": m.headers.iter().map(|(k, v)| (k.to_string(), value_json(v))).collect::<serde_json::Map<_, _>>(),
                        "query": m.query.iter().map(|(k, v)| (k.clone(), value_json(v))).collect::<serde_json::Map<_, _>>(),
                    },
                    "backends": r.backends.iter().map(|b| serde_json::json!({
                        "destination": b.destination.to_string(),
                        "weight": b.weight,
                    })).collect::<Vec<_>>(),
                    "sticky": r.sticky.as_ref().map(|s| match s {
                        Sticky::Cookie { name, ttl } => serde_json::json!({ "cookie": name, "ttl_seconds": ttl.as_secs() }),
                        Sticky::Header(h) => serde_json::json!({ "header": h.as_str() }),
                    }),
                    "mirror": r.mirror.as_ref().map(|m| serde_json::json!({
                        "destination": m.destination.to_string(),
                        "percent": m.percent,
                    })),
                    "fault": r.fault.as_ref().map(|f| serde_json::json!({
                        "abort": f.abort.as_ref().map(|a| serde_json::json!({ "percent": a.percent, "status": a.status.as_u16() })),
                        "delay": f.delay.as_ref().map(|d| serde_json::json!({ "percent": d.percent, "ms": d.duration.as_millis() as u64 })),
                    })),
                    "timeout_ms": r.timeout.map(|t| t.as_millis() as u64),
                    "per_try_timeout_ms": r.per_try_timeout.map(|t| t.as_millis() as u64),
                    "retry": &r.retry_settings,
                    "rate_limit": r.rate_limit.as_ref().map(rate_json),
                })
            })
            .collect();
        serde_json::json!({
            "routes": routes,
            "rate_limit": self.rate_limit.as_ref().map(rate_json),
            "health_check": self.health_check.as_ref().map(|h| serde_json::json!({
                "protocol": format!("{:?}", h.protocol).to_ascii_lowercase(),
                "path": h.path,
                "service": h.service,
                "interval_ms": h.interval.as_millis() as u64,
                "timeout_ms": h.timeout.as_millis() as u64,
                "unhealthy_threshold": h.unhealthy_threshold,
                "healthy_threshold": h.healthy_threshold,
                "expected_statuses": h.expected_statuses,
            })),
            "priority": self.priority.as_ref().map(priority_json),
        })
    }
}

impl InboundRules {
    /// The port's rules in force.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "port": self.port,
            "rate_limit": self.rate_limit.as_ref().map(rate_json),
            "max_concurrent_requests": self.max_concurrent_requests,
            "priority": self.priority.as_ref().map(priority_json),
        })
    }
}

/// Routes as listed, deserialized and put in precedence order.
pub fn routes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<RouteSpec>, D::Error> {
    use serde::de::Error;
    let mut routes = Vec::<RouteSpec>::deserialize(d)?;
    let mut names = std::collections::HashSet::new();
    for r in &routes {
        if !names.insert(r.name.clone()) {
            return Err(D::Error::custom(format!(
                "route {} is listed twice",
                r.name
            )));
        }
    }
    // Stable: equal precedence keeps the order listed.
    routes.sort_by_key(|r| std::cmp::Reverse(r.matches.precedence()));
    Ok(routes)
}

pub fn health_check<'de, D: Deserializer<'de>>(d: D) -> Result<HealthCheck, D::Error> {
    let h = HealthCheck::deserialize(d)?;
    h.check()
        .map_err(|e| serde::de::Error::custom(format!("health_check: {e}")))?;
    Ok(h)
}

/// The rules of one inbound port (requests into this pod).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InboundRules {
    pub port: u16,
    pub rate_limit: Option<RateLimit>,
    pub max_concurrent_requests: Option<usize>,
    pub priority: Option<Priority>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundDoc {
    port: u16,
    rate_limit: Option<RateLimit>,
    max_concurrent_requests: Option<usize>,
    priority: Option<Priority>,
}

impl<'de> Deserialize<'de> for InboundRules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let i = InboundDoc::deserialize(d)?;
        if i.port == 0 {
            return Err(D::Error::custom("port must be 1-65535"));
        }
        if i.max_concurrent_requests == Some(0) {
            return Err(D::Error::custom("max_concurrent_requests must be above 0"));
        }
        Ok(InboundRules {
            port: i.port,
            rate_limit: i.rate_limit,
            max_concurrent_requests: i.max_concurrent_requests,
            priority: i.priority,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::file::Table;
    use super::*;
    use std::collections::HashMap;

    const SPEC_EXAMPLE: &str = r#"
destinations:
  - name: api.demo:80
    policy:
      retry_on: 5xx
      routes:
        - name: checkout
          match:
            path: {prefix: /checkout}
            method: POST
            headers: {x-user-tier: {exact: gold}}
            query: {beta: {exact: "1"}}
          backends:
            - {destination: api-v1.demo:80, weight: 90}
            - {destination: api-v2.demo:80, weight: 10}
          sticky: {cookie: gofe-sticky, ttl: 1h}
          mirror: {destination: api-shadow.demo:80, percent: 5}
          fault: {abort: {percent: 1, status: 503}, delay: {percent: 5, duration: 100ms}}
          timeout: 2s
          rate_limit: {requests_per_second: 50, burst: 100}
      rate_limit: {requests_per_second: 500, burst: 1000}
      health_check:
        protocol: http
        path: /healthz
        interval: 5s
        timeout: 1s
        unhealthy_threshold: 3
        healthy_threshold: 2
        expected_statuses: [200]
inbound:
  - port: 8080
    rate_limit:
      requests_per_second: 1000
      burst: 2000
      per_client: {requests_per_second: 100, burst: 200}
      overrides:
        - {client: spiffe://cluster.local/ns/batch/sa/report, requests_per_second: 20}
    max_concurrent_requests: 256
    priority: {header: gofe-priority, shed_first: [background, normal]}
"#;

    fn parse(text: &str) -> Table {
        Table::parse(text, &HashMap::new()).unwrap()
    }

    fn rules_of(t: &Table, name: &str) -> Arc<Rules> {
        t.destinations[&DestKey::parse(name).unwrap()]
            .policy
            .rules
            .clone()
    }

    #[test]
    fn the_spec_example_parses_whole() {
        let t = parse(SPEC_EXAMPLE);
        let e = &t.destinations[&DestKey::parse("api.demo:80").unwrap()];
        assert!(e.policy.retry.on.status_5xx, "the old settings still apply");
        let r = &e.policy.rules;
        let route = &r.routes[0];
        assert_eq!(&*route.name, "checkout");
        assert_eq!(route.backends.len(), 2);
        assert_eq!(route.backends[1].weight, 10);
        assert_eq!(
            route.sticky,
            Some(Sticky::Cookie {
                name: "gofe-sticky".into(),
                ttl: Duration::from_secs(3600)
            })
        );
        assert_eq!(route.mirror.as_ref().unwrap().percent, 5.0);
        let fault = route.fault.as_ref().unwrap();
        assert_eq!(fault.abort.as_ref().unwrap().status, 503);
        assert_eq!(
            fault.delay.as_ref().unwrap().duration,
            Duration::from_millis(100)
        );
        assert_eq!(route.timeout, Some(Duration::from_secs(2)));
        assert_eq!(
            route.rate_limit.as_ref().unwrap().total,
            Some(Bucket {
                requests_per_second: 50.0,
                burst: 100
            })
        );
        assert_eq!(r.rate_limit.as_ref().unwrap().total.unwrap().burst, 1000);
        let h = r.health_check.as_ref().unwrap();
        assert_eq!(
            (h.protocol, h.unhealthy_threshold, h.healthy_threshold),
            (HealthProtocol::Http, 3, 2)
        );
        let i = &t.inbound[&8080];
        let rl = i.rate_limit.as_ref().unwrap();
        assert_eq!(rl.per_client.unwrap().burst, 200);
        assert_eq!(rl.overrides[0].bucket.requests_per_second, 20.0);
        assert_eq!(rl.overrides[0].bucket.burst, 20, "one second's worth");
        assert_eq!(i.max_concurrent_requests, Some(256));
        let p = i.priority.as_ref().unwrap();
        assert_eq!(p.share(Some(b"background")), (1, 3));
        assert_eq!(p.share(Some(b"normal")), (2, 3));
        assert_eq!(p.share(Some(b"critical")), (3, 3));
        assert_eq!(p.share(None), (3, 3));
    }

    #[test]
    fn a_mistake_names_its_field_and_line() {
        for (bad, field, line) in [
            (
                "destinations:\n  - name: a\n    policy:\n      routes:\n        - name: r\n          match: {path: {regex: '(['}}\n",
                "routes[0].match: regex \"([\" does not compile",
                "line 6",
            ),
            (
                "destinations:\n  - name: a\n    policy:\n      routes:\n        - name: r\n          backends:\n            - {destination: b, weight: 0}\n",
                "routes: route r",
                "line 5",
            ),
            (
                "destinations:\n  - name: a\n    policy:\n      rate_limit: {requests_per_second: 0}\n",
                "requests_per_second must be above 0",
                "line 4",
            ),
            (
                "destinations:\n  - name: a\n    policy:\n      routes:\n        - name: r\n          match: {method: GET, colour: red}\n",
                "colour",
                "line 6",
            ),
            (
                "inbound:\n  - port: 8080\n  - port: 8081\n    priority: {header: 'a b', shed_first: []}\n",
                "inbound[1].priority: header \"a b\"",
                "line 4",
            ),
            (
                "destinations:\n  - name: a\n    policy:\n      health_check: {protocol: http, path: healthz}\n",
                "health_check",
                "line 4",
            ),
        ] {
            let err = Table::parse(bad, &HashMap::new()).unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains(line),
                "{bad}\n=> {err} (wanted {field} at {line})"
            );
        }
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn gateway_api_precedence_picks_the_most_specific_route() {
        let t = parse(
            r#"
destinations:
  - name: api
    policy:
      routes:
        - {name: everything, match: {path: {prefix: /}}}
        - {name: api, match: {path: {prefix: /api}}}
        - {name: api-v1, match: {path: {prefix: /api/v1}}}
        - {name: api-v1-exact, match: {path: {exact: /api/v1}}}
        - {name: api-v1-post, match: {path: {prefix: /api/v1}, method: POST}}
        - {name: api-v1-gold, match: {path: {prefix: /api/v1}, headers: {x-tier: {exact: gold}}}}
        - {name: api-v1-gold-beta, match: {path: {prefix: /api/v1}, headers: {x-tier: {exact: gold}, x-beta: {present: true}}}}
        - {name: api-v1-query, match: {path: {prefix: /api/v1}, headers: {x-tier: {regex: "gold|silver"}}, query: {debug: {exact: "1"}}}}
        - {name: users-regex, match: {path: {regex: "/users/[0-9]+"}}}
        - {name: users-first, match: {path: {prefix: /users}, headers: {x-a: {present: true}}}}
        - {name: users-second, match: {path: {prefix: /users}, headers: {x-b: {present: true}}}}
"#,
        );
        let rules = rules_of(&t, "api:80");
        for (method, uri, headers, want) in [
            ("GET", "/", &[][..], "everything"),
            ("GET", "/apix", &[], "everything"),
            ("GET", "/api", &[], "api"),
            ("GET", "/api/v2", &[], "api"),
            ("GET", "/api/v1", &[], "api-v1-exact"),
            ("GET", "/api/v1/", &[], "api-v1"),
            ("GET", "/api/v1/things", &[], "api-v1"),
            ("POST", "/api/v1/things", &[], "api-v1-post"),
            (
                "POST",
                "/api/v1/things",
                &[("x-tier", "gold")],
                "api-v1-post",
            ),
            (
                "GET",
                "/api/v1/things",
                &[("x-tier", "gold")],
                "api-v1-gold",
            ),
            (
                "GET",
                "/api/v1/things",
                &[("x-tier", "gold"), ("x-beta", "")],
                "api-v1-gold-beta",
            ),
            (
                "GET",
                "/api/v1/things?debug=1",
                &[("x-tier", "silver")],
                "api-v1-query",
            ),
            (
                "GET",
                "/api/v1/things?debug=1",
                &[("x-tier", "gold")],
                "api-v1-query",
            ),
            (
                "GET",
                "/api/v1/things?debug=2",
                &[("x-tier", "silver")],
                "api-v1",
            ),
            ("GET", "/users/42", &[], "users-regex"),
            ("GET", "/users/42x", &[], "everything"),
            (
                "GET",
                "/users/x",
                &[("x-a", "1"), ("x-b", "1")],
                "users-first",
            ),
            ("GET", "/users/x", &[("x-b", "1")], "users-second"),
        ] {
            let req = request(method, uri, headers);
            let got = rules.route(&req).map(|r| &*r.name);
            assert_eq!(got, Some(want), "{method} {uri} {headers:?}");
        }
    }

    #[test]
    fn no_route_matches_then_the_destination_serves() {
        let t = parse(
            "destinations:\n  - name: api\n    policy:\n      routes:\n        - {name: a, match: {path: {exact: /a}}}\n",
        );
        let rules = rules_of(&t, "api:80");
        assert!(rules.route(&request("GET", "/b", &[])).is_none());
        assert!(!rules.is_empty());
        let plain = parse("destinations:\n  - name: api\n");
        assert!(rules_of(&plain, "api:80").is_empty());
    }
}
