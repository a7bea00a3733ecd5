//! Keeping a certificate: renew at about 70% of its lifetime (jittered, so a fleet
//! started together does not renew together); when the issuer cannot be reached,
//! retry with exponential backoff and jitter, capped so that a few attempts still fit
//! before the current certificate expires. The current certificate serves meanwhile.

use crate::client::IdentityClient;
use crate::store::CertStore;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};
use tracing::{Instrument, info, warn};

/// When to renew: 65-75% of the lifetime left at issuance.
pub fn renewal_delay(lifetime: Duration, jitter: f64) -> Duration {
    lifetime.mul_f64(0.65 + 0.1 * jitter.clamp(0.0, 1.0))
}

const RETRY_BASE: Duration = Duration::from_millis(250);

/// How long to wait before attempt `attempt` (1, 2, ...) after failures: exponential
/// from 250 ms, capped at a tenth of the certificate's remaining life (between 1 s and
/// 60 s; 5 s with no certificate yet), with half the delay jittered.
pub fn retry_delay(attempt: u32, remaining: Option<Duration>, jitter: f64) -> Duration {
    // With no usable certificate (none yet, or expired) there is nothing to save in a
    // hurry: a fleet waiting on an issuer that is down retries every few seconds, not
    // every second.
    let cap = match remaining {
        Some(r) if !r.is_zero() => (r / 10).clamp(Duration::from_secs(1), Duration::from_secs(60)),
        _ => Duration::from_secs(5),
    };
    let exp = RETRY_BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    exp.min(cap).mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// The result of one certify attempt as the loop sees it: the lifetime left on the
/// new certificate, or why there is none.
pub type Attempt = Result<Duration, String>;

/// Renews forever: calls `certify` now, then whenever `renewal_delay` or `retry_delay`
/// says. `remaining` tells how long the certificate in use still has; `next` is told
/// when the next attempt will be.
pub async fn renew_loop<F, Fut>(
    mut certify: F,
    remaining: impl Fn() -> Option<Duration>,
    mut next: impl FnMut(Duration),
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Attempt>,
{
    let mut failures = 0u32;
    loop {
        let delay = match certify().await {
            Ok(lifetime) => {
                failures = 0;
                renewal_delay(lifetime, fastrand::f64())
            }
            Err(_) => {
                failures += 1;
                retry_delay(failures, remaining(), fastrand::f64())
            }
        };
        next(delay);
        tokio::time::sleep(delay).await;
    }
}

/// Keeps `store` holding a current certificate from `client`. Each request to the
/// issuer is an operation span (`identity.certify`: first request or renewal, how many
/// failed before it, and its outcome), so a slow or failing renewal shows in traces.
pub async fn maintain(client: Arc<IdentityClient>, store: Arc<CertStore>) {
    let remaining_store = store.clone();
    let next_store = store.clone();
    let failed_before = Arc::new(AtomicU32::new(0));
    renew_loop(
        || {
            let (client, store) = (client.clone(), store.clone());
            let failed_before = failed_before.clone();
            let span = tracing::info_span!(
                target: gofe_telemetry::ops::TARGET,
                "identity.certify",
                identity = %client.name(),
                kind = if store.current().is_some() { "renewal" } else { "first" },
                failed_before = failed_before.load(Ordering::Relaxed),
                serial = tracing::field::Empty,
                error = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            let recorded = span.clone();
            async move {
                let result = client.certify().await;
                match &result {
                    Ok(issued) => {
                        failed_before.store(0, Ordering::Relaxed);
                        recorded.record("serial", issued.info.serial.as_str());
                    }
                    Err(error) => {
                        failed_before.fetch_add(1, Ordering::Relaxed);
                        recorded.record("error", tracing::field::display(error));
                        recorded.record("otel.status_code", "ERROR");
                    }
                }
                match result {
                    Ok(issued) => {
                        let lifetime = issued
                            .info
                            .not_after
                            .duration_since(SystemTime::now())
                            .unwrap_or(Duration::ZERO);
                        info!(
                            identity = %client.name(),
                            serial = %issued.info.serial,
                            not_after = %crate::cert::rfc3339(issued.info.not_after),
                            "certificate issued"
                        );
                        store.set(issued.chain, issued.info, issued.key);
                        store.renewals_ok.inc();
                        Ok(lifetime)
                    }
                    Err(error) => {
                        store.renewals_failed.inc();
                        warn!(identity = %client.name(), %error, "certificate renewal failed");
                        Err(error.to_string())
                    }
                }
            }
            .instrument(span)
        },
        move || {
            remaining_store.current().map(|h| {
                h.info
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            })
        },
        move |delay| next_store.set_next_renewal(SystemTime::now() + delay),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn renews_between_65_and_75_percent() {
        let l = Duration::from_secs(100);
        assert_eq!(renewal_delay(l, 0.0), Duration::from_secs(65));
        assert_eq!(renewal_delay(l, 0.5), Duration::from_secs(70));
        assert_eq!(renewal_delay(l, 1.0), Duration::from_secs(75));
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let remaining = Some(Duration::from_secs(600));
        let d: Vec<Duration> = (1..=10).map(|a| retry_delay(a, remaining, 1.0)).collect();
        assert_eq!(d[0], Duration::from_millis(250));
        assert_eq!(d[1], Duration::from_millis(500));
        assert_eq!(d[3], Duration::from_secs(2));
        // Capped at a tenth of the 600 s left.
        assert_eq!(d[9], Duration::from_secs(60));
        // Little time left: a tighter cap, never below a second.
        assert_eq!(
            retry_delay(10, Some(Duration::from_secs(20)), 1.0),
            Duration::from_secs(2)
        );
        assert_eq!(
            retry_delay(10, Some(Duration::from_secs(3)), 1.0),
            Duration::from_secs(1)
        );
        // Expired: as with no certificate.
        assert_eq!(
            retry_delay(10, Some(Duration::ZERO), 1.0),
            Duration::from_secs(5)
        );
        // Jitter takes off up to half.
        assert_eq!(retry_delay(3, remaining, 0.0), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn renews_on_schedule_and_backs_off_while_the_issuer_is_down() {
        // The issuer answers the first two calls, fails the next three, then answers.
        let calls = Arc::new(Mutex::new(Vec::<tokio::time::Instant>::new()));
        let start = tokio::time::Instant::now();
        let c = calls.clone();
        let task = tokio::spawn(renew_loop(
            move || {
                let c = c.clone();
                async move {
                    let n = {
                        let mut c = c.lock().unwrap();
                        c.push(tokio::time::Instant::now());
                        c.len()
                    };
                    if (3..=5).contains(&n) {
                        Err("issuer down".to_string())
                    } else {
                        Ok(Duration::from_secs(100))
                    }
                }
            },
            || Some(Duration::from_secs(30)),
            |_| {},
        ));
        tokio::time::sleep(Duration::from_secs(400)).await;
        task.abort();
        let at: Vec<f64> = calls
            .lock()
            .unwrap()
            .iter()
            .map(|t| (*t - start).as_secs_f64())
            .collect();
        assert_eq!(at[0], 0.0);
        // Renewal at 65-75 s after each success.
        assert!((65.0..=75.0).contains(&(at[1] - at[0])), "{at:?}");
        assert!((65.0..=75.0).contains(&(at[2] - at[1])), "{at:?}");
        // Failures: 125-250 ms, 250-500 ms, 500 ms-1 s later each.
        assert!((0.125..=0.25).contains(&(at[3] - at[2])), "{at:?}");
        assert!((0.25..=0.5).contains(&(at[4] - at[3])), "{at:?}");
        assert!((0.5..=1.0).contains(&(at[5] - at[4])), "{at:?}");
        // Then back on the renewal schedule.
        assert!((65.0..=75.0).contains(&(at[6] - at[5])), "{at:?}");
    }
}
