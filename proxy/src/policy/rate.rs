//! Rate limits: token buckets, kept exactly. Each bucket is GCRA (the generic cell
//! rate algorithm): one atomic "theoretical arrival time" moved forward by one
//! interval per request admitted, refused while it runs more than a burst ahead of
//! now. No sharding and no periodic refill, so under any overload the admitted rate is
//! the configured rate plus the burst, not a fraction of it. A limit holds a bucket for
//! everyone, one per client (its mesh identity, else its source IP) in a bounded map,
//! and overrides by identity.

pub use crate::addrs::ClientKey;
use crate::call::{Answer, Call, Failure};
pub use crate::call::{Refused, Scope};
use crate::config::rules::{Bucket, RateLimit};
use futures_util::future::Either;
use gofe_telemetry::metrics::Counter;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Ready;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::{Layer, Service};

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// Nanoseconds since the process's epoch: the clock the buckets run on.
pub fn now_nanos() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

/// Client buckets kept at most per limit. Buckets that have refilled are dropped first
/// (losing nothing: a full bucket is a new one); past that, the fullest one goes and is
/// counted in `evicted`.
const MAX_CLIENTS: usize = 10_000;

/// One token bucket.
#[derive(Debug)]
pub struct Gcra {
    /// Nanoseconds a token takes to come back.
    interval: u64,
    /// How far ahead of now the arrival time may run: the burst.
    tolerance: u64,
    /// When the bucket is full again (the theoretical arrival time).
    tat: AtomicU64,
    pub bucket: Bucket,
}

/// A request let through, and what is left.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Admitted {
    pub remaining: u64,
}

impl Gcra {
    pub fn new(bucket: Bucket) -> Gcra {
        let interval = (1e9 / bucket.requests_per_second).round().max(1.0) as u64;
        Gcra {
            interval,
            tolerance: interval.saturating_mul(u64::from(bucket.burst)),
            tat: AtomicU64::new(0),
            bucket,
        }
    }

    /// Takes a token at `now`, or says how long until one is there.
    pub fn take(&self, now: u64) -> Result<Admitted, Duration> {
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = tat.max(now) + self.interval;
            let ahead = next - now;
            if ahead > self.tolerance {
                return Err(Duration::from_nanos(ahead - self.tolerance));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(Admitted {
                        remaining: (self.tolerance - ahead) / self.interval,
                    });
                }
                Err(t) => tat = t,
            }
        }
    }

    /// Gives back a token taken (another bucket refused the request).
    pub fn give_back(&self) {
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_sub(self.interval))
            });
    }

    fn full_at(&self) -> u64 {
        self.tat.load(Ordering::Relaxed)
    }
}

/// The buckets of one rate limit.
pub struct Limiter {
    total: Option<Gcra>,
    per_client: Option<Bucket>,
    overrides: HashMap<Arc<str>, Gcra>,
    clients: RwLock<HashMap<ClientKey, Arc<Gcra>>>,
    max_clients: usize,
    evicted: AtomicU64,
}

impl Limiter {
    pub fn new(spec: &RateLimit) -> Limiter {
        Self::with_max_clients(spec, MAX_CLIENTS)
    }

    fn with_max_clients(spec: &RateLimit, max_clients: usize) -> Limiter {
        Limiter {
            total: spec.total.map(Gcra::new),
            per_client: spec.per_client,
            overrides: spec
                .overrides
                .iter()
                .map(|o| (Arc::from(o.client.to_string()), Gcra::new(o.bucket)))
                .collect(),
            clients: RwLock::new(HashMap::new()),
            max_clients,
            evicted: AtomicU64::new(0),
        }
    }

    /// Takes a token for a request from `client` at `now` (from `now_nanos`): from the
    /// client's bucket (its override's, else its own), then from everyone's.
    pub fn check(&self, client: Option<&ClientKey>, now: u64) -> Result<Admitted, Refused> {
        let refused = |scope, g: &Gcra, wait| Refused {
            scope,
            bucket: g.bucket,
            retry_after: wait,
        };
        let own = client.and_then(|c| self.client_bucket(c, now));
        let mut admitted = None;
        if let Some(g) = &own {
            match g.take(now) {
                Ok(a) => admitted = Some(a),
                Err(wait) => return Err(refused(Scope::Client, g, wait)),
            }
        }
        if let Some(g) = &self.total {
            match g.take(now) {
                Ok(a) => {
                    admitted = Some(match admitted {
                        Some(b) if b.remaining < a.remaining => b,
                        _ => a,
                    })
                }
                Err(wait) => {
                    if let Some(g) = &own {
                        g.give_back();
                    }
                    return Err(refused(Scope::Total, g, wait));
                }
            }
        }
        Ok(admitted.unwrap_or(Admitted {
            remaining: u64::MAX,
        }))
    }

    fn client_bucket(&self, client: &ClientKey, now: u64) -> Option<ClientBucket<'_>> {
        if let ClientKey::Identity(id) = client
            && let Some(g) = self.overrides.get(id)
        {
            return Some(ClientBucket::Override(g));
        }
        let bucket = self.per_client?;
        if let Some(g) = self.clients.read().get(client) {
            return Some(ClientBucket::Own(g.clone()));
        }
        let mut clients = self.clients.write();
        if let Some(g) = clients.get(client) {
            return Some(ClientBucket::Own(g.clone()));
        }
        if clients.len() >= self.max_clients {
            // Full buckets first: forgetting them changes nothing.
            clients.retain(|_, g| g.full_at() > now);
            if clients.len() >= self.max_clients {
                let fullest = clients
                    .iter()
                    .min_by_key(|(_, g)| g.full_at())
                    .map(|(k, _)| k.clone());
                if let Some(k) = fullest {
                    clients.remove(&k);
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let g = Arc::new(Gcra::new(bucket));
        clients.insert(client.clone(), g.clone());
        Some(ClientBucket::Own(g))
    }

    /// Client buckets forgotten while still refilling, because the map was full.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    pub fn clients(&self) -> usize {
        self.clients.read().len()
    }
}

/// The rate limit layer: a request over the limit fails at once (429, or gRPC
/// RESOURCE_EXHAUSTED) and is counted in `gofe_rate_limited_total`. Without a limiter
/// it passes everything.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Option<Arc<Limiter>>,
    what: Arc<str>,
    refused: Option<Arc<Counter>>,
}

impl RateLimitLayer {
    /// `what` names the limit in errors; `refused` counts the refusals.
    pub fn new(limiter: Option<Arc<Limiter>>, what: Arc<str>, refused: Arc<Counter>) -> Self {
        Self {
            refused: limiter.is_some().then_some(refused),
            limiter,
            what,
        }
    }

    /// Lets everything through.
    pub fn none() -> Self {
        Self {
            limiter: None,
            what: "".into(),
            refused: None,
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;

    fn layer(&self, inner: S) -> RateLimited<S> {
        RateLimited {
            inner,
            cfg: Arc::new(self.clone()),
        }
    }
}

/// The settings in one `Arc`: the stack is cloned for every request.
#[derive(Clone)]
pub struct RateLimited<S> {
    inner: S,
    cfg: Arc<RateLimitLayer>,
}

impl<S, R, T> Service<Call<R>> for RateLimited<S>
where
    S: Service<Call<R>, Response = Answer<T>, Error = Failure<R>>,
    R: Debug,
{
    type Response = Answer<T>;
    type Error = Failure<R>;
    type Future = Either<Ready<Result<Answer<T>, Failure<R>>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure<R>>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call<R>) -> Self::Future {
        if let Some(limiter) = &self.cfg.limiter
            && let Err(refused) = limiter.check(call.client.as_ref(), now_nanos())
        {
            if let Some(c) = &self.cfg.refused {
                c.inc();
            }
            return Either::Left(std::future::ready(Err(Failure::RateLimited {
                what: self.cfg.what.clone(),
                refused,
            })));
        }
        Either::Right(self.inner.call(call))
    }
}

enum ClientBucket<'a> {
    Override(&'a Gcra),
    Own(Arc<Gcra>),
}

impl std::ops::Deref for ClientBucket<'_> {
    type Target = Gcra;
    fn deref(&self) -> &Gcra {
        match self {
            ClientBucket::Override(g) => g,
            ClientBucket::Own(g) => g,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::rules::Override;
    use std::net::IpAddr;

    const SEC: u64 = 1_000_000_000;

    fn bucket(rps: f64, burst: u32) -> Bucket {
        Bucket {
            requests_per_second: rps,
            burst,
        }
    }

    fn limit(total: Option<Bucket>, per_client: Option<Bucket>) -> RateLimit {
        RateLimit {
            total,
            per_client,
            overrides: vec![],
        }
    }

    #[test]
    fn admits_exactly_the_rate_plus_the_burst_under_overload() {
        let g = Gcra::new(bucket(200.0, 50));
        // 1,000 requests a second offered for 10 seconds, evenly.
        let admitted = (0..10_000u64)
            .filter(|i| g.take(SEC + i * SEC / 1000).is_ok())
            .count();
        // The first burst, then 200 a second.
        assert!((2049..=2051).contains(&admitted), "{admitted}");
    }

    #[test]
    fn a_refusal_says_when_to_come_back() {
        let g = Gcra::new(bucket(2.0, 1));
        assert!(g.take(SEC).is_ok());
        let wait = g.take(SEC).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(g.take(SEC + 500_000_000).is_ok());
    }

    #[test]
    fn clients_have_their_own_buckets_and_overrides() {
        let mut spec = limit(None, Some(bucket(1.0, 2)));
        spec.overrides.push(Override {
            client: "spiffe://cluster.local/ns/batch/sa/report".parse().unwrap(),
            bucket: bucket(1.0, 5),
        });
        let l = Limiter::new(&spec);
        let a = ClientKey::Ip("10.0.0.1".parse().unwrap());
        let b = ClientKey::Ip("10.0.0.2".parse().unwrap());
        let batch = ClientKey::Identity("spiffe://cluster.local/ns/batch/sa/report".into());
        let count = |k: &ClientKey| (0..10).filter(|_| l.check(Some(k), SEC).is_ok()).count();
        assert_eq!(count(&a), 2);
        assert_eq!(count(&b), 2, "b is not limited by a's requests");
        assert_eq!(count(&batch), 5, "the override's burst");
        let refused = l.check(Some(&a), SEC).unwrap_err();
        assert_eq!(refused.scope, Scope::Client);
        assert_eq!(refused.retry_after_secs(), 1);
    }

    #[test]
    fn everyone_shares_the_total_and_a_refused_request_costs_its_client_nothing() {
        let l = Limiter::new(&limit(Some(bucket(1.0, 3)), Some(bucket(1.0, 2))));
        let a = ClientKey::Ip("10.0.0.1".parse().unwrap());
        let b = ClientKey::Ip("10.0.0.2".parse().unwrap());
        assert!(l.check(Some(&a), SEC).is_ok());
        assert!(l.check(Some(&a), SEC).is_ok());
        assert!(l.check(Some(&b), SEC).is_ok());
        let refused = l.check(Some(&b), SEC).unwrap_err();
        assert_eq!(refused.scope, Scope::Total);
        // A second later one token each has come back: b still has its second.
        assert!(l.check(Some(&b), 2 * SEC).is_ok());
    }

    #[test]
    fn the_client_map_is_bounded_and_forgets_full_buckets_first() {
        let l = Limiter::with_max_clients(&limit(None, Some(bucket(1.0, 1))), 3);
        for i in 0..3u8 {
            let k = ClientKey::Ip(IpAddr::from([10, 0, 0, i]));
            assert!(l.check(Some(&k), SEC).is_ok());
        }
        // Still refilling: the fullest is evicted, and counted.
        let k = ClientKey::Ip("10.0.0.9".parse().unwrap());
        assert!(l.check(Some(&k), SEC).is_ok());
        assert_eq!((l.clients(), l.evicted()), (3, 1));
        // Ten seconds on every bucket is full again: dropped without loss.
        let k = ClientKey::Ip("10.0.0.10".parse().unwrap());
        assert!(l.check(Some(&k), 10 * SEC).is_ok());
        assert_eq!((l.clients(), l.evicted()), (1, 1));
    }

    #[test]
    fn refusal_fields_follow_the_draft() {
        let r = Refused {
            scope: Scope::Client,
            bucket: bucket(100.0, 200),
            retry_after: Duration::from_millis(10),
        };
        assert_eq!(r.policy_field(), "\"client\";q=100;w=1;burst=200");
        assert_eq!(r.limit_field(), "\"client\";r=0;t=1");
        assert_eq!(r.retry_after_secs(), 1);
    }
}
