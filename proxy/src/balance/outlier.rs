//! Outlier detection for one endpoint: consecutive 5xx responses, and consecutive
//! gateway failures (connect failures, 502, 503, 504), each against its threshold. An
//! ejected endpoint is out for the base ejection time times the number of times it has
//! been ejected, up to the cap, then comes back with its counts cleared; each base
//! ejection time it then stays healthy takes one off that number (as Envoy's
//! multiplier does). Whether an ejection may happen at all (the destination's max
//! percent) is the balancer's call.

use crate::config::policy::OutlierPolicy;
use std::time::Duration;
use tokio::time::Instant;

/// What one attempt on an endpoint came to, as outlier detection sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// A 5xx response.
    Status(u16),
    /// No response: the connection failed or broke.
    ConnectFailure,
}

#[derive(Debug, Default)]
pub struct Outlier {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    pub times_ejected: u32,
    pub ejected_until: Option<Instant>,
    /// Since when the endpoint has been back without a new ejection (what takes the
    /// count of ejections down).
    healthy_since: Option<Instant>,
}

impl Outlier {
    /// Counts `outcome`; true if the endpoint has now crossed a threshold.
    pub fn record(&mut self, outcome: Outcome, policy: &OutlierPolicy, now: Instant) -> bool {
        match outcome {
            Outcome::Success => {
                self.consecutive_5xx = 0;
                self.consecutive_gateway = 0;
                if self.times_ejected > 0 && self.ejected_until.is_none() {
                    let since = *self.healthy_since.get_or_insert(now);
                    if now.saturating_duration_since(since) >= policy.base_ejection {
                        self.times_ejected -= 1;
                        self.healthy_since = Some(now);
                    }
                }
                return false;
            }
            Outcome::Status(code) => {
                self.consecutive_5xx += 1;
                if matches!(code, 502..=504) {
                    self.consecutive_gateway += 1;
                } else {
                    self.consecutive_gateway = 0;
                }
            }
            Outcome::ConnectFailure => self.consecutive_gateway += 1,
        }
        let over = |count: u32, threshold: u32| threshold > 0 && count >= threshold;
        over(self.consecutive_5xx, policy.consecutive_5xx)
            || over(self.consecutive_gateway, policy.consecutive_gateway)
    }

    /// Forgets the failures counted so far.
    pub fn clear_counts(&mut self) {
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
    }

    /// Ejects until now + base x times ejected (capped); returns for how long.
    pub fn eject(&mut self, now: Instant, policy: &OutlierPolicy) -> Duration {
        self.times_ejected += 1;
        let time = policy
            .base_ejection
            .saturating_mul(self.times_ejected)
            .min(policy.max_ejection);
        self.ejected_until = Some(now + time);
        self.healthy_since = None;
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        time
    }

    /// Whether the endpoint is out at `now`; one whose time is up comes back.
    pub fn is_ejected(&mut self, now: Instant) -> bool {
        match self.ejected_until {
            Some(until) if now < until => true,
            Some(_) => {
                self.ejected_until = None;
                self.healthy_since = Some(now);
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Instant {
        Instant::now()
    }

    fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_5xx: 3,
            consecutive_gateway: 2,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(75),
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn consecutive_5xx_cross_the_threshold_and_a_success_resets() {
        let (mut o, p) = (Outlier::default(), policy());
        assert!(!o.record(Outcome::Status(500), &p, t()));
        assert!(!o.record(Outcome::Status(500), &p, t()));
        assert!(!o.record(Outcome::Success, &p, t()));
        assert!(!o.record(Outcome::Status(500), &p, t()));
        assert!(!o.record(Outcome::Status(500), &p, t()));
        assert!(o.record(Outcome::Status(500), &p, t()));
    }

    #[test]
    fn gateway_failures_have_their_own_threshold() {
        let (mut o, p) = (Outlier::default(), policy());
        assert!(!o.record(Outcome::ConnectFailure, &p, t()));
        assert!(
            o.record(Outcome::Status(503), &p, t()),
            "a connect failure then a 503: two gateway failures"
        );
    }

    #[test]
    fn ejection_grows_with_each_ejection_up_to_the_cap_and_ends() {
        let (mut o, p) = (Outlier::default(), policy());
        let t0 = Instant::now();
        assert_eq!(o.eject(t0, &p), Duration::from_secs(30));
        assert!(o.is_ejected(t0 + Duration::from_secs(29)));
        assert!(
            !o.is_ejected(t0 + Duration::from_secs(30)),
            "back after the ejection time"
        );
        assert_eq!(o.eject(t0, &p), Duration::from_secs(60));
        assert_eq!(o.eject(t0, &p), Duration::from_secs(75), "capped");
    }

    #[test]
    fn staying_healthy_brings_the_ejection_time_down() {
        let (mut o, p) = (Outlier::default(), policy());
        let t0 = Instant::now();
        o.eject(t0, &p);
        o.eject(t0, &p);
        assert_eq!(o.times_ejected, 2);
        let back = t0 + Duration::from_secs(60);
        assert!(!o.is_ejected(back));
        o.record(Outcome::Success, &p, back + Duration::from_secs(29));
        assert_eq!(
            o.times_ejected, 2,
            "not healthy for a base ejection time yet"
        );
        o.record(Outcome::Success, &p, back + Duration::from_secs(30));
        assert_eq!(o.times_ejected, 1);
        o.record(Outcome::Success, &p, back + Duration::from_secs(60));
        assert_eq!(o.times_ejected, 0);
        let again = o.eject(back + Duration::from_secs(60), &p);
        assert_eq!(again, Duration::from_secs(30), "back to the base time");
    }

    #[test]
    fn zero_disables_a_threshold() {
        let mut p = policy();
        p.consecutive_5xx = 0;
        p.consecutive_gateway = 0;
        let mut o = Outlier::default();
        for _ in 0..100 {
            assert!(!o.record(Outcome::Status(503), &p, t()));
        }
    }
}
