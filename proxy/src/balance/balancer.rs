//! Balancing a destination's attempts over its endpoints: P2C over peak-EWMA latency
//! (the default), round-robin, or random, each respecting weights; ejected endpoints
//! are left out (never more than the policy's max percent of them); a retry prefers an
//! endpoint it has not tried yet. While discovery knows no endpoint, a request goes to
//! its own original destination.

use super::outlier::Outcome;
use super::state::{EndpointState, InFlight};
use crate::addrs::{EndpointAddr, OrigDstAddr};
use crate::config::policy::{Lb, OutlierPolicy};
use crate::endpoint::{Endpoint, EndpointSet, Source};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// What happened to an attempt, for the latency estimate and outlier detection.
pub struct Observed {
    /// For how long, when this observation ejected the endpoint.
    pub ejected: Option<Duration>,
}

/// The set the endpoints were made from, and the endpoints.
type Current = (Option<Arc<EndpointSet>>, Arc<Vec<Arc<EndpointState>>>);

/// Original destinations a balancer keeps state for (when discovery knows nothing
/// better, each request goes to its own).
const MAX_FALLBACKS: usize = 256;

/// An endpoint's time-to-failure counted as its latency: a connection that failed makes
/// its endpoint look slow for a while, so P2C steers around it (ejection aside).
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

pub struct Balancer {
    endpoints: RwLock<Current>,
    next: AtomicUsize,
    /// Discovery's answers.
    feed: watch::Receiver<Arc<EndpointSet>>,
    /// The original destinations used while discovery knows nothing better.
    fallbacks: Mutex<HashMap<OrigDstAddr, Arc<EndpointState>>>,
    /// Held while deciding an ejection, so that concurrent failures cannot together
    /// pass the max percent.
    ejecting: Mutex<()>,
}

/// What `Balancer::next_now` could decide at once.
pub enum Next {
    /// The endpoint (None: discovery names none there is to pick).
    Now(Option<Chosen>),
    /// Discovery's first answer is needed: `Balancer::next` waits for it.
    Wait,
}

/// The endpoint for an attempt, and whether the balancer chose it from discovery's
/// endpoints (rather than taking the request's original destination).
pub struct Chosen {
    pub endpoint: Arc<EndpointState>,
    pub balanced: bool,
}

impl Balancer {
    /// A balancer over what discovery says through `feed`.
    pub fn new(feed: watch::Receiver<Arc<EndpointSet>>) -> Self {
        Self {
            endpoints: RwLock::new((None, Arc::new(Vec::new()))),
            next: AtomicUsize::new(0),
            feed,
            fallbacks: Mutex::new(HashMap::new()),
            ejecting: Mutex::new(()),
        }
    }

    /// The endpoint for the next attempt of a request whose original destination is
    /// `orig_dst`: balanced over discovery's endpoints, avoiding those in `tried` when
    /// others remain; while discovery knows no endpoint (or has not answered yet), the
    /// original destination. Without one, waits up to `wait` for discovery's first
    /// answer.
    pub async fn next(
        &self,
        wait: Duration,
        orig_dst: Option<OrigDstAddr>,
        lb: Lb,
        tried: &[EndpointAddr],
    ) -> Option<Chosen> {
        match self.next_now(orig_dst, lb, tried) {
            Next::Now(chosen) => chosen,
            Next::Wait => self.first_answer(wait, lb, tried).await,
        }
    }

    /// As `next`, without waiting: `Next::Wait` when only discovery's first answer
    /// can tell (no original destination, and discovery has not answered yet). Every
    /// request once discovery has answered is decided here, so the balancing layer
    /// needs no future of its own for it.
    pub fn next_now(&self, orig_dst: Option<OrigDstAddr>, lb: Lb, tried: &[EndpointAddr]) -> Next {
        let set = self.feed.borrow().clone();
        match (set.source.knows(), orig_dst) {
            (true, _) => {}
            (false, Some(orig)) => {
                // Discovery may have known endpoints before: they are gone.
                if set.source != Source::Pending {
                    self.sync(&set);
                }
                return Next::Now(Some(Chosen {
                    endpoint: self.fallback(orig),
                    balanced: false,
                }));
            }
            (false, None) if set.source == Source::Pending => return Next::Wait,
            (false, None) => {}
        }
        self.sync(&set);
        Next::Now(self.pick(lb, tried).map(|endpoint| Chosen {
            endpoint,
            balanced: true,
        }))
    }

    /// Waits up to `wait` for discovery's first answer, then picks from it.
    async fn first_answer(&self, wait: Duration, lb: Lb, tried: &[EndpointAddr]) -> Option<Chosen> {
        let mut rx = self.feed.clone();
        let first = rx.wait_for(|s| s.source != Source::Pending);
        let set = match tokio::time::timeout(wait, first).await {
            Ok(Ok(set)) => set.clone(),
            _ => return None,
        };
        self.sync(&set);
        self.pick(lb, tried).map(|endpoint| Chosen {
            endpoint,
            balanced: true,
        })
    }

    /// The state kept for original destination `orig`.
    fn fallback(&self, orig: OrigDstAddr) -> Arc<EndpointState> {
        let mut map = self.fallbacks.lock();
        if let Some(e) = map.get(&orig) {
            return e.clone();
        }
        if map.len() >= MAX_FALLBACKS {
            map.retain(|_, e| e.pending() > 0);
        }
        let e = Arc::new(EndpointState::new(Arc::new(Endpoint::bare(
            orig.as_endpoint(),
        ))));
        if map.len() < MAX_FALLBACKS {
            map.insert(orig, e.clone());
        }
        e
    }

    /// The original destinations requests went to while discovery knew nothing better.
    pub fn fallbacks(&self) -> Vec<Arc<EndpointState>> {
        let mut v: Vec<Arc<EndpointState>> = self.fallbacks.lock().values().cloned().collect();
        v.sort_by_key(|e| e.endpoint.addr);
        v
    }

    /// The set the endpoints come from now.
    pub fn set(&self) -> Arc<EndpointSet> {
        self.feed.borrow().clone()
    }

    /// Brings the endpoint list in line with `set`, keeping the state of addresses that
    /// stay; an address listed twice is one endpoint. Cheap when the set has not
    /// changed.
    pub fn sync(&self, set: &Arc<EndpointSet>) {
        if self
            .endpoints
            .read()
            .0
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, set))
        {
            return;
        }
        let mut guard = self.endpoints.write();
        if guard.0.as_ref().is_some_and(|s| Arc::ptr_eq(s, set)) {
            return;
        }
        let old = guard.1.clone();
        let mut list: Vec<Arc<EndpointState>> = Vec::with_capacity(set.endpoints.len());
        for e in &set.endpoints {
            if list.iter().any(|s| s.endpoint.addr == e.addr) {
                continue;
            }
            let same = |s: &&Arc<EndpointState>| {
                s.endpoint.addr == e.addr
                    && s.weight() == e.weight.max(1)
                    && s.endpoint.identity == e.identity
                    && s.endpoint.metadata == e.metadata
            };
            list.push(match old.iter().find(same) {
                Some(s) => s.clone(),
                None => Arc::new(EndpointState::new(Arc::new(e.clone()))),
            });
        }
        *guard = (Some(set.clone()), Arc::new(list));
    }

    /// Whether the destination may serve a request now: false only once discovery
    /// has answered and every endpoint it named is out (ejected or failing its health
    /// checks), or it named none. A split sends such a backend nothing.
    pub fn might_serve(&self) -> bool {
        let set = self.feed.borrow().clone();
        if !set.source.knows() {
            return true;
        }
        self.sync(&set);
        let now = Instant::now();
        self.endpoints()
            .iter()
            .any(|e| !e.ejected(now) && e.is_healthy())
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<EndpointState>>> {
        self.endpoints.read().1.clone()
    }

    /// An endpoint for the next attempt, avoiding those in `tried` when others remain.
    pub fn pick(&self, lb: Lb, tried: &[EndpointAddr]) -> Option<Arc<EndpointState>> {
        let all = self.endpoints();
        match all.len() {
            0 => return None,
            1 => return Some(all[0].clone()),
            _ => {}
        }
        let now = Instant::now();
        // Per endpoint: bit 1 ready (not ejected), bit 2 ready and not tried yet, bit 4
        // not tried yet. On the stack for any usual number of endpoints: this runs for
        // every request.
        const INLINE: usize = 64;
        let mut inline = [0u8; INLINE];
        let mut heap = Vec::new();
        let flags: &mut [u8] = if all.len() <= INLINE {
            &mut inline[..all.len()]
        } else {
            heap.resize(all.len(), 0);
            &mut heap
        };
        let (mut any_ready, mut any_fresh, mut any_untried) = (false, false, false);
        for (f, e) in flags.iter_mut().zip(all.iter()) {
            // Failing health checks counts as out; when every endpoint is out, all of
            // them serve (panic mode, as Envoy's) rather than none.
            let ready = !e.ejected(now) && e.is_healthy();
            let untried = !tried.contains(&e.endpoint.addr);
            let fresh = ready && untried;
            *f = u8::from(ready) | (u8::from(fresh) << 1) | (u8::from(untried) << 2);
            any_ready |= ready;
            any_fresh |= fresh;
            any_untried |= untried;
        }
        // Untried ready ones when there are; else any ready one; else (only when every
        // endpoint is ejected, which a max percent of 100 allows) an untried one; else
        // any.
        let need = if any_fresh {
            2
        } else if any_ready {
            1
        } else if any_untried {
            4
        } else {
            0
        };
        let weight = |i: usize| -> u64 {
            if need == 0 || flags[i] & need != 0 {
                u64::from(all[i].weight())
            } else {
                0
            }
        };
        let eligible = (0..all.len()).filter(|i| weight(*i) > 0).count();
        let chosen = match (eligible, lb) {
            (0, _) => return None,
            (1, _) => (0..all.len()).find(|i| weight(*i) > 0).unwrap_or(0),
            (_, Lb::Random) => weighted(all.len(), &weight, None),
            (_, Lb::RoundRobin) => {
                let total: u64 = (0..all.len()).map(weight).sum();
                let mut n = self.next.fetch_add(1, Ordering::Relaxed) as u64 % total;
                (0..all.len())
                    .find(|i| {
                        let w = weight(*i);
                        if n < w {
                            true
                        } else {
                            n -= w;
                            false
                        }
                    })
                    .unwrap_or(0)
            }
            (_, Lb::Ewma) => {
                // Two different endpoints, each as likely as its weight.
                let i = weighted(all.len(), &weight, None);
                let j = weighted(all.len(), &weight, Some(i));
                if all[i].cost(now) <= all[j].cost(now) {
                    i
                } else {
                    j
                }
            }
        };
        Some(all[chosen].clone())
    }

    /// Records how an attempt ended: its latency (for responses) and its outcome (for
    /// outlier detection), ejecting the endpoint if it crossed a threshold and the
    /// destination can spare it.
    pub fn observe(&self, flight: &InFlight, outcome: Outcome, policy: &OutlierPolicy) -> Observed {
        self.observe_with(flight, outcome, policy, true)
    }

    /// As `observe`, for a connection rather than a request: its outcome counts, its
    /// time does not (a connect is no measure of an endpoint's request latency).
    pub fn observe_connect(
        &self,
        flight: &InFlight,
        outcome: Outcome,
        policy: &OutlierPolicy,
    ) -> Observed {
        self.observe_with(flight, outcome, policy, false)
    }

    fn observe_with(
        &self,
        flight: &InFlight,
        outcome: Outcome,
        policy: &OutlierPolicy,
        latency: bool,
    ) -> Observed {
        let endpoint = flight.endpoint();
        let now = Instant::now();
        if outcome == Outcome::ConnectFailure {
            endpoint.ewma.lock().observe(FAILURE_PENALTY, now);
        } else if latency {
            endpoint
                .ewma
                .lock()
                .observe(now.saturating_duration_since(flight.started), now);
        }
        let crossed = endpoint.outlier.lock().record(outcome, policy, now);
        let mut ejected = None;
        if crossed {
            let _deciding = self.ejecting.lock();
            let all = self.endpoints();
            let out = all
                .iter()
                .filter(|e| !Arc::ptr_eq(e, endpoint) && e.ejected(now))
                .count();
            let mut outlier = endpoint.outlier.lock();
            if outlier.is_ejected(now) {
                // Requests that were in flight when it was ejected, failing late: it is
                // out already, and stays out for the time it was given.
                outlier.clear_counts();
            } else if all.iter().any(|e| Arc::ptr_eq(e, endpoint))
                && (out + 1) * 100 <= all.len() * policy.max_ejection_percent as usize
            {
                // Never more than the max percent of the endpoints out at once.
                ejected = Some(outlier.eject(now, policy));
            }
        }
        Observed { ejected }
    }
}

/// The index (below `n`) of a random endpoint other than `skip`, each as likely as its
/// weight; the caller makes sure another with a weight exists.
fn weighted(n: usize, weight: &dyn Fn(usize) -> u64, skip: Option<usize>) -> usize {
    let w = |i: usize| if Some(i) == skip { 0 } else { weight(i) };
    let total: u64 = (0..n).map(w).sum();
    let mut r = fastrand::u64(0..total.max(1));
    for i in 0..n {
        let wi = w(i);
        if r < wi {
            return i;
        }
        r -= wi;
    }
    (0..n).find(|i| w(*i) > 0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(addrs: &[(&str, u32)]) -> Arc<EndpointSet> {
        Arc::new(EndpointSet {
            endpoints: addrs
                .iter()
                .map(|(a, w)| Endpoint {
                    addr: EndpointAddr::new(a.parse().unwrap()),
                    weight: *w,
                    identity: None,
                    metadata: Default::default(),
                })
                .collect(),
            source: Source::File,
        })
    }

    /// A balancer whose discovery has said nothing yet: tests sync it by hand.
    fn balancer() -> Balancer {
        Balancer::new(watch::channel(Arc::new(EndpointSet::pending())).1)
    }

    fn outlier(pct: u8) -> OutlierPolicy {
        OutlierPolicy {
            consecutive_5xx: 1,
            consecutive_gateway: 1,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: pct,
        }
    }

    fn counts(b: &Balancer, lb: Lb, n: usize) -> std::collections::HashMap<String, usize> {
        let mut c = std::collections::HashMap::new();
        for _ in 0..n {
            let e = b.pick(lb, &[]).unwrap();
            *c.entry(e.endpoint.addr.to_string()).or_insert(0) += 1;
        }
        c
    }

    #[test]
    fn round_robin_is_even_and_weights_count() {
        let b = balancer();
        b.sync(&set(&[
            ("10.0.0.1:80", 1),
            ("10.0.0.2:80", 1),
            ("10.0.0.3:80", 2),
        ]));
        let c = counts(&b, Lb::RoundRobin, 400);
        assert_eq!(c["10.0.0.1:80"], 100);
        assert_eq!(c["10.0.0.2:80"], 100);
        assert_eq!(c["10.0.0.3:80"], 200);
    }

    #[test]
    fn ewma_avoids_a_slow_endpoint() {
        let b = balancer();
        b.sync(&set(&[
            ("10.0.0.1:80", 1),
            ("10.0.0.2:80", 1),
            ("10.0.0.3:80", 1),
        ]));
        // Teach it: endpoint 3 answers in 50 ms; the others keep the 30 ms a new
        // endpoint starts with.
        for e in b.endpoints().iter() {
            if e.endpoint.addr.to_string() == "10.0.0.3:80" {
                e.ewma
                    .lock()
                    .observe(Duration::from_millis(50), Instant::now());
            }
        }
        let c = counts(&b, Lb::Ewma, 3000);
        assert!(c.get("10.0.0.3:80").copied().unwrap_or(0) < 100, "{c:?}");
    }

    #[test]
    fn an_address_listed_twice_is_one_endpoint_and_p2c_still_picks() {
        let b = balancer();
        b.sync(&set(&[("10.0.0.1:80", 1), ("10.0.0.1:80", 1)]));
        assert_eq!(b.endpoints().len(), 1);
        assert!(b.pick(Lb::Ewma, &[]).is_some());
        b.sync(&set(&[
            ("10.0.0.1:80", 1),
            ("10.0.0.1:80", 1),
            ("10.0.0.2:80", 1000),
        ]));
        let tried = [EndpointAddr::new("10.0.0.2:80".parse().unwrap())];
        for _ in 0..100 {
            assert_eq!(
                b.pick(Lb::Ewma, &tried).unwrap().endpoint.addr.to_string(),
                "10.0.0.1:80"
            );
        }
    }

    #[test]
    fn concurrent_failures_never_eject_past_the_max_percent() {
        for _ in 0..20 {
            let b = Arc::new(balancer());
            b.sync(&set(&[
                ("10.0.0.1:80", 1),
                ("10.0.0.2:80", 1),
                ("10.0.0.3:80", 1),
                ("10.0.0.4:80", 1),
            ]));
            let p = outlier(50);
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let threads: Vec<_> = b
                .endpoints()
                .iter()
                .cloned()
                .map(|e| {
                    let (b, barrier) = (b.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        let flight = e.start();
                        barrier.wait();
                        b.observe(&flight, Outcome::Status(503), &p)
                            .ejected
                            .is_some()
                    })
                })
                .collect();
            let ejected = threads
                .into_iter()
                .map(|t| t.join().unwrap())
                .filter(|e| *e)
                .count();
            assert_eq!(ejected, 2);
        }
    }

    #[test]
    fn retries_prefer_untried_endpoints() {
        let b = balancer();
        b.sync(&set(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]));
        let tried = [EndpointAddr::new("10.0.0.1:80".parse().unwrap())];
        for _ in 0..50 {
            assert_eq!(
                b.pick(Lb::Random, &tried)
                    .unwrap()
                    .endpoint
                    .addr
                    .to_string(),
                "10.0.0.2:80"
            );
        }
        // With every endpoint tried, any will do.
        let all = [tried[0], EndpointAddr::new("10.0.0.2:80".parse().unwrap())];
        assert!(b.pick(Lb::Random, &all).is_some());
    }

    #[test]
    fn ejection_never_exceeds_the_max_percent() {
        let b = balancer();
        b.sync(&set(&[
            ("10.0.0.1:80", 1),
            ("10.0.0.2:80", 1),
            ("10.0.0.3:80", 1),
            ("10.0.0.4:80", 1),
        ]));
        let p = outlier(50);
        let mut ejected = 0;
        for e in b.endpoints().iter() {
            let flight = e.start();
            if b.observe(&flight, Outcome::Status(503), &p)
                .ejected
                .is_some()
            {
                ejected += 1;
            }
        }
        assert_eq!(ejected, 2, "half of four");
        let c = counts(&b, Lb::Random, 200);
        assert_eq!(c.len(), 2, "the ejected two get nothing: {c:?}");
    }

    #[test]
    fn late_failures_of_an_ejected_endpoint_do_not_eject_it_again() {
        let b = balancer();
        b.sync(&set(&[
            ("10.0.0.1:80", 1),
            ("10.0.0.2:80", 1),
            ("10.0.0.3:80", 1),
        ]));
        let e = b.endpoints()[0].clone();
        // Three requests in flight; all fail, one after the other.
        let flights: Vec<InFlight> = (0..3).map(|_| e.start()).collect();
        let ejections = flights
            .iter()
            .filter(|f| {
                b.observe(f, Outcome::Status(503), &outlier(50))
                    .ejected
                    .is_some()
            })
            .count();
        assert_eq!(ejections, 1);
        assert_eq!(e.ejection().1, 1, "ejected once, for the base time");
    }

    #[test]
    fn with_every_endpoint_ejected_a_retry_still_prefers_an_untried_one() {
        let b = balancer();
        b.sync(&set(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]));
        for e in b.endpoints().iter() {
            e.outlier.lock().eject(Instant::now(), &outlier(100));
        }
        let tried = [EndpointAddr::new("10.0.0.1:80".parse().unwrap())];
        for _ in 0..50 {
            assert_eq!(
                b.pick(Lb::Random, &tried)
                    .unwrap()
                    .endpoint
                    .addr
                    .to_string(),
                "10.0.0.2:80"
            );
        }
    }

    #[test]
    fn a_single_endpoint_is_never_ejected() {
        let b = balancer();
        b.sync(&set(&[("10.0.0.1:80", 1)]));
        let e = b.endpoints()[0].clone();
        for _ in 0..10 {
            let flight = e.start();
            assert!(
                b.observe(&flight, Outcome::ConnectFailure, &outlier(99))
                    .ejected
                    .is_none()
            );
        }
    }

    #[test]
    fn state_survives_a_set_change_for_addresses_that_stay() {
        let b = balancer();
        b.sync(&set(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]));
        let first = b.endpoints()[0].clone();
        let _flight = first.start();
        b.sync(&set(&[("10.0.0.1:80", 1), ("10.0.0.5:80", 1)]));
        let now = b.endpoints();
        assert!(Arc::ptr_eq(&now[0], &first));
        assert_eq!(now[0].pending(), 1);
        assert_eq!(now[1].endpoint.addr.to_string(), "10.0.0.5:80");
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_comes_back_after_its_ejection_time() {
        let b = balancer();
        b.sync(&set(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]));
        let first = b.endpoints()[0].clone();
        let flight = first.start();
        let ejected = b
            .observe(&flight, Outcome::Status(503), &outlier(50))
            .ejected;
        assert_eq!(ejected, Some(Duration::from_secs(30)));
        assert_eq!(counts(&b, Lb::Random, 100).get("10.0.0.1:80"), None);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(counts(&b, Lb::Random, 100).get("10.0.0.1:80"), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            counts(&b, Lb::Random, 100)["10.0.0.1:80"] > 0,
            "back after 30 s"
        );
    }
}
