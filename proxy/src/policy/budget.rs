//! The retry budget: over a sliding window of 10 s, retries may be at most a share of
//! the destination's requests, plus a reserve of a minimum per second (so that a
//! destination with little traffic can still retry). This is tower's `TpsBudget`
//! scheme (and Linkerd's and Finagle's), kept exact for any ratio: tower counts a
//! ratio below 1 as one retry per whole number of requests (0.4 would allow one in
//! two), so the accounting here is in thousandths of a retry.

use parking_lot::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tower::retry::budget::Budget;

/// How long a request's deposit (and a retry's withdrawal) counts.
pub const WINDOW: Duration = Duration::from_secs(10);
const SLOTS: usize = 10;
/// Units per retry.
const RETRY: i64 = 1000;

#[derive(Debug)]
pub struct RetryBudget {
    /// Added per request: the ratio in thousandths of a retry.
    deposit: i64,
    /// The minimum per second over the window, always available.
    reserve: i64,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// Deposits minus withdrawals per tenth of the window, oldest first after `current`.
    slots: [i64; SLOTS],
    current: usize,
    slot_started: Instant,
}

impl RetryBudget {
    pub fn new(ratio: f32, min_per_sec: u32) -> Self {
        Self {
            deposit: (f64::from(ratio) * RETRY as f64).round() as i64,
            reserve: i64::from(min_per_sec) * WINDOW.as_secs() as i64 * RETRY,
            window: Mutex::new(Window {
                slots: [0; SLOTS],
                current: 0,
                slot_started: Instant::now(),
            }),
        }
    }
}

impl Window {
    /// Moves on to the slot for now, forgetting slots older than the window.
    fn roll(&mut self, now: Instant) {
        let slot = WINDOW / SLOTS as u32;
        let mut elapsed = now.saturating_duration_since(self.slot_started);
        let mut moved = 0;
        while elapsed >= slot && moved < SLOTS {
            self.current = (self.current + 1) % SLOTS;
            self.slots[self.current] = 0;
            elapsed -= slot;
            moved += 1;
        }
        if moved == SLOTS {
            self.slot_started = now;
        } else {
            self.slot_started = now - elapsed;
        }
    }

    fn balance(&self) -> i64 {
        self.slots.iter().sum()
    }
}

impl Budget for RetryBudget {
    fn deposit(&self) {
        let mut w = self.window.lock();
        w.roll(Instant::now());
        let c = w.current;
        w.slots[c] += self.deposit;
    }

    fn withdraw(&self) -> bool {
        let mut w = self.window.lock();
        w.roll(Instant::now());
        if w.balance() + self.reserve >= RETRY {
            let c = w.current;
            w.slots[c] -= RETRY;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retries_for(b: &RetryBudget, requests: usize) -> usize {
        let mut n = 0;
        for _ in 0..requests {
            b.deposit();
            if b.withdraw() {
                n += 1;
            }
        }
        n
    }

    #[test]
    fn the_ratio_is_kept_exactly() {
        for (ratio, expected) in [(0.2, 200), (0.4, 400), (0.3, 300), (0.0, 0), (1.0, 1000)] {
            let b = RetryBudget::new(ratio, 0);
            assert_eq!(retries_for(&b, 1000), expected, "ratio {ratio}");
        }
    }

    #[test]
    fn the_reserve_allows_a_minimum_per_second_over_the_window() {
        let b = RetryBudget::new(0.0, 3);
        let mut n = 0;
        while b.withdraw() {
            n += 1;
            assert!(n <= 1000, "bounded");
        }
        assert_eq!(n, 30, "3 a second over 10 s");
    }

    #[test]
    fn old_slots_are_forgotten() {
        let mut w = Window {
            slots: [5; SLOTS],
            current: 0,
            slot_started: Instant::now(),
        };
        let later = w.slot_started + Duration::from_secs(3);
        w.roll(later);
        assert_eq!(
            w.balance(),
            5 * (SLOTS as i64 - 3),
            "three tenths of the window went by"
        );
        w.roll(later + Duration::from_secs(60));
        assert_eq!(w.balance(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_leave_the_window_with_time() {
        let b = RetryBudget::new(1.0, 0);
        for _ in 0..10 {
            b.deposit();
        }
        tokio::time::advance(WINDOW / 2).await;
        assert!(b.withdraw(), "half a window later the deposits still count");
        tokio::time::advance(WINDOW).await;
        assert!(!b.withdraw(), "a window later they are gone");
    }
}
