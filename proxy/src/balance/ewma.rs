//! Peak EWMA: an endpoint's latency estimate jumps up to a slower observation at once
//! and decays towards faster ones, so that a slow endpoint is avoided at once and tried
//! again now and then.

use std::time::Duration;
use tokio::time::Instant;

/// How fast the latency estimate forgets (Linkerd's default): after this long without
/// news an endpoint's estimate has fallen to a third.
const DECAY: Duration = Duration::from_secs(10);
/// The estimate a new endpoint starts with: a typical in-cluster request.
const DEFAULT_RTT: Duration = Duration::from_millis(30);

#[derive(Debug)]
pub struct PeakEwma {
    estimate_ns: f64,
    stamp: Instant,
}

impl PeakEwma {
    pub fn new(now: Instant) -> Self {
        Self {
            estimate_ns: DEFAULT_RTT.as_nanos() as f64,
            stamp: now,
        }
    }

    fn decay(elapsed: Duration) -> f64 {
        (-(elapsed.as_secs_f64() / DECAY.as_secs_f64())).exp()
    }

    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let decay = Self::decay(now.saturating_duration_since(self.stamp));
        self.stamp = now;
        self.estimate_ns = if rtt > self.estimate_ns {
            rtt
        } else {
            self.estimate_ns * decay + rtt * (1.0 - decay)
        };
    }

    /// The estimate at `now`, in nanoseconds.
    pub fn estimate(&self, now: Instant) -> f64 {
        self.estimate_ns * Self::decay(now.saturating_duration_since(self.stamp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_counts_at_once_and_is_forgotten_with_time() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(500), t0);
        assert_eq!(e.estimate(t0), 500e6, "the peak is taken at once");
        e.observe(Duration::from_millis(1), t0);
        assert_eq!(e.estimate(t0), 500e6, "no time passed: no decay");
        tokio::time::advance(DECAY).await;
        let later = Instant::now();
        let third = 500e6 * (-1f64).exp();
        assert!(
            (e.estimate(later) - third).abs() < 1.0,
            "{}",
            e.estimate(later)
        );
        e.observe(Duration::from_millis(1), later);
        assert!(e.estimate(later) < 200e6, "faster answers pull it down");
    }
}
