//! Latency histograms, one per label set, in microseconds: the Prometheus histogram's
//! buckets, sum and count since start (counted exactly, one counter a bucket), and six
//! 10-second windows for the quantiles over the last minute, read from an HdrHistogram
//! of 3 significant figures. Recording takes the label set's own lock, never a global
//! one.
//!
//! Memory follows the traffic, not the number of label sets: a window holds its samples
//! as they are (4 bytes each) up to 2,048 of them (8 KiB), and only past that becomes
//! an HdrHistogram (8 KiB for latencies up to 2 ms, 20 KiB up to 16 ms, 68 KiB up to a
//! minute); a window is allocated only while it has samples. (Every label set used to hold a
//! cumulative HdrHistogram and six window ones: with the 200 label sets a sidecar keeps,
//! 25-30 MiB for a client of many destinations, reached over the first minute.)

use crate::prom::{Exposition, Kind};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const SIGNIFICANT_FIGURES: u8 = 3;
const WINDOW: Duration = Duration::from_secs(10);
/// Windows make up the last minute: the quantiles cover between 50 and 60 seconds.
const WINDOWS: usize = 6;
/// Latencies above a minute are recorded as a minute: a histogram's size grows with
/// the largest value it holds (up to 68 KiB a window).
const MAX_MICROS: u64 = 60_000_000;
/// Samples a window keeps as they are (8 KiB) before it becomes an HdrHistogram.
const MAX_SAMPLES: usize = 2048;

/// The Prometheus histogram's upper bounds, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// The same bounds in microseconds.
const BUCKET_MICROS: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// The quantiles served over the last minute.
pub const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

/// The latencies of one label set.
pub struct Latency {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Samples in each bucket (not cumulative); above the last bound only in `count`.
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum_micros: u64,
    /// Window `i` holds the samples of epoch `epochs[i]`, where `epoch % WINDOWS == i`.
    windows: [Option<Window>; WINDOWS],
    epochs: [u64; WINDOWS],
}

/// One window's samples: as they are while few, an HdrHistogram once many.
enum Window {
    Samples(Vec<u32>),
    Histogram(Box<Histogram<u32>>),
}

impl Window {
    fn record(&mut self, micros: u64) {
        match self {
            Window::Samples(v) if v.len() < MAX_SAMPLES => v.push(micros as u32),
            Window::Samples(v) => {
                let mut h = new_histogram::<u32>();
                for s in v.iter() {
                    let _ = h.record(u64::from(*s));
                }
                let _ = h.record(micros);
                *self = Window::Histogram(Box::new(h));
            }
            // (A u32 count cannot overflow within 10 seconds.) Not saturating_record:
            // it clamps to the current range instead of resizing.
            Window::Histogram(h) => {
                let _ = h.record(micros);
            }
        }
    }

    fn add_to(&self, m: &mut Histogram<u64>) {
        match self {
            Window::Samples(v) => {
                for s in v {
                    let _ = m.record(u64::from(*s));
                }
            }
            Window::Histogram(h) => {
                for v in h.iter_recorded() {
                    let _ = m.record_n(v.value_iterated_to(), u64::from(v.count_at_value()));
                }
            }
        }
    }

    /// Bytes it holds on the heap.
    fn heap_bytes(&self) -> usize {
        match self {
            Window::Samples(v) => v.capacity() * 4,
            Window::Histogram(h) => h.distinct_values() * 4,
        }
    }
}

/// What a scrape reads of one label set.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencySnapshot {
    /// Cumulative counts at or below each of `BUCKETS`.
    pub buckets: [u64; BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
    /// The values at `QUANTILES` over the last minute, in seconds; None without samples
    /// in it.
    pub quantiles: Option<[f64; QUANTILES.len()]>,
}

fn new_histogram<T: hdrhistogram::Counter>() -> Histogram<T> {
    Histogram::new(SIGNIFICANT_FIGURES).expect("3 significant figures is a valid precision")
}

/// The 10-second epoch `at` falls in, counted from the first use.
fn epoch(at: Instant) -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    (at.saturating_duration_since(origin).as_millis() / WINDOW.as_millis()) as u64
}

impl Inner {
    /// Frees the windows older than the minute ending in epoch `e`. (A window newer than
    /// `e`, recorded between the caller's clock read and its lock, is kept.)
    fn free_stale(&mut self, e: u64) {
        for slot in 0..WINDOWS {
            let stale = self.epochs[slot] != u64::MAX
                && e.saturating_sub(self.epochs[slot]) >= WINDOWS as u64;
            if stale || self.epochs[slot] == u64::MAX {
                self.windows[slot] = None;
                self.epochs[slot] = u64::MAX;
            }
        }
    }
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                buckets: [0; BUCKETS.len()],
                count: 0,
                sum_micros: 0,
                windows: Default::default(),
                epochs: [u64::MAX; WINDOWS],
            }),
        }
    }
}

impl Latency {
    /// Records one latency that ended now.
    pub fn record(&self, latency: Duration) {
        self.record_at(latency, Instant::now());
    }

    pub fn record_at(&self, latency: Duration, now: Instant) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
        let bucket = BUCKET_MICROS.iter().position(|le| micros <= *le);
        let e = epoch(now);
        let slot = (e % WINDOWS as u64) as usize;
        let mut inner = self.inner.lock();
        if let Some(b) = bucket {
            inner.buckets[b] += 1;
        }
        inner.count += 1;
        inner.sum_micros = inner.sum_micros.saturating_add(micros);
        if inner.epochs[slot] != e {
            inner.epochs[slot] = e;
            // Samples again, from nothing: a label set gone quiet gives back what its
            // busier window held (samples or histogram).
            inner.windows[slot] = Some(Window::Samples(Vec::new()));
            // Windows past the minute are freed now, not only when scraped.
            inner.free_stale(e);
        }
        if let Some(w) = &mut inner.windows[slot] {
            w.record(micros);
        }
    }

    /// Bytes its windows hold on the heap.
    pub fn heap_bytes(&self) -> usize {
        let inner = self.inner.lock();
        inner.windows.iter().flatten().map(Window::heap_bytes).sum()
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        self.snapshot_at(Instant::now())
    }

    pub fn snapshot_at(&self, now: Instant) -> LatencySnapshot {
        let e = epoch(now);
        let mut inner = self.inner.lock();
        let mut buckets = inner.buckets;
        for i in 1..buckets.len() {
            buckets[i] += buckets[i - 1];
        }
        let count = inner.count;
        let sum_seconds = inner.sum_micros as f64 / 1e6;

        // The windows of the last minute, merged; windows older than that are freed.
        inner.free_stale(e);
        let mut minute: Option<Histogram<u64>> = None;
        for w in inner.windows.iter().flatten() {
            w.add_to(minute.get_or_insert_with(new_histogram));
        }
        drop(inner);
        let quantiles = minute
            .filter(|m| !m.is_empty())
            .map(|m| QUANTILES.map(|q| m.highest_equivalent(m.value_at_quantile(q)) as f64 / 1e6));
        LatencySnapshot {
            buckets,
            count,
            sum_seconds,
            quantiles,
        }
    }
}

/// Writes `name` as a Prometheus histogram (`_bucket`, `_sum`, `_count`) and
/// `name_quantile` as a summary: the last minute's quantiles, with the same
/// (cumulative) sum and count, for each label set.
pub fn render(
    e: &mut Exposition,
    name: &str,
    help: &str,
    series: &[(Vec<(&str, &str)>, LatencySnapshot)],
) {
    e.family(name, help, Kind::Histogram);
    let bucket = format!("{name}_bucket");
    let sum = format!("{name}_sum");
    let count = format!("{name}_count");
    let les: Vec<String> = BUCKETS.iter().map(|b| b.to_string()).collect();
    for (labels, s) in series {
        let mut with_le = labels.clone();
        with_le.push(("le", ""));
        let last = with_le.len() - 1;
        for (le, n) in les.iter().zip(s.buckets) {
            with_le[last].1 = le;
            e.sample(&bucket, &with_le, n);
        }
        with_le[last].1 = "+Inf";
        e.sample(&bucket, &with_le, s.count);
        e.sample(&sum, labels, s.sum_seconds);
        e.sample(&count, labels, s.count);
    }
    let quantile = format!("{name}_quantile");
    e.family(
        &quantile,
        &format!("{help} Quantiles over the last minute (NaN without requests in it)."),
        Kind::Summary,
    );
    let quantile_sum = format!("{quantile}_sum");
    let quantile_count = format!("{quantile}_count");
    let qs: Vec<String> = QUANTILES.iter().map(|q| q.to_string()).collect();
    for (labels, s) in series {
        let mut with_q = labels.clone();
        with_q.push(("quantile", ""));
        let last = with_q.len() - 1;
        for (i, q) in qs.iter().enumerate() {
            with_q[last].1 = q;
            match s.quantiles {
                Some(v) => e.sample(&quantile, &with_q, v[i]),
                None => e.sample(&quantile, &with_q, "NaN"),
            }
        }
        e.sample(&quantile_sum, labels, s.sum_seconds);
        e.sample(&quantile_count, labels, s.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn buckets_count_and_sum_add_up() {
        let l = Latency::default();
        for d in [ms(1), ms(3), ms(3), ms(40), ms(20_000)] {
            l.record(d);
        }
        let s = l.snapshot();
        assert_eq!(s.count, 5);
        assert!((s.sum_seconds - 20.047).abs() < 1e-9, "{}", s.sum_seconds);
        // le 0.001 holds the 1 ms sample; le 0.005 the two 3 ms ones; 20 s is only in +Inf.
        assert_eq!(s.buckets[1], 1);
        assert_eq!(s.buckets[3], 3);
        assert_eq!(s.buckets[6], 4);
        assert_eq!(*s.buckets.last().unwrap(), 4);
    }

    /// A bucket holds what is at or below its bound, exactly: 2,501 µs is above 2.5 ms
    /// (an HdrHistogram of 3 significant figures rounded it down into le=0.0025).
    #[test]
    fn bucket_bounds_are_exact() {
        let l = Latency::default();
        l.record(Duration::from_micros(2_500));
        l.record(Duration::from_micros(2_501));
        let s = l.snapshot();
        assert_eq!(s.buckets[2], 1, "le=0.0025: {:?}", s.buckets);
        assert_eq!(s.buckets[3], 2, "le=0.005: {:?}", s.buckets);
    }

    #[test]
    fn quantiles_are_within_three_significant_figures() {
        let l = Latency::default();
        // 1..=1000 ms: p50 is 500 ms, p99 990 ms, p99.9 999 ms.
        for i in 1..=1000 {
            l.record(ms(i));
        }
        let q = l.snapshot().quantiles.unwrap();
        for (got, want) in q.iter().zip([0.5, 0.9, 0.99, 0.999]) {
            assert!((got - want).abs() <= want * 0.001 + 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn a_busy_window_becomes_a_histogram_and_keeps_three_significant_figures() {
        let l = Latency::default();
        let start = Instant::now();
        // 10,000 samples in one window, 1..=10,000 µs: past the samples a window keeps.
        for i in 1..=10_000u64 {
            l.record_at(Duration::from_micros(i), start);
        }
        let q = l.snapshot_at(start).quantiles.unwrap();
        for (got, want) in q.iter().zip([0.005, 0.009, 0.0099, 0.00999]) {
            assert!((got - want).abs() <= want * 0.001 + 1e-6, "{got} vs {want}");
        }
        // An HdrHistogram of that range (20 KiB), not 10,000 samples (40 KiB).
        let held = l.heap_bytes();
        assert!(held <= 24 * 1024, "{held} bytes");
    }

    /// The memory a label set holds follows its traffic: a few requests in each window
    /// of the minute cost bytes, not six histograms.
    #[test]
    fn a_quiet_label_set_holds_its_few_samples_only() {
        let l = Latency::default();
        let start = Instant::now();
        for w in 0..6u64 {
            for i in 0..20u64 {
                l.record_at(ms(1 + i), start + Duration::from_secs(10 * w));
            }
        }
        let held = l.heap_bytes();
        assert!(held <= 6 * 32 * 4, "{held} bytes");
        let s = l.snapshot_at(start + Duration::from_secs(55));
        assert_eq!(s.count, 120);
        let q = s.quantiles.unwrap();
        assert!((q[0] - 0.010).abs() <= 0.010 * 0.001 + 1e-6, "{q:?}");
        // A window that was busy gives its histogram back when it is next reused
        // quietly.
        for i in 0..5_000u64 {
            l.record_at(
                Duration::from_micros(1 + i),
                start + Duration::from_secs(60),
            );
        }
        assert!(l.heap_bytes() > 16 * 1024);
        l.record_at(ms(1), start + Duration::from_secs(120));
        assert!(l.heap_bytes() <= 6 * 32 * 4, "{}", l.heap_bytes());
    }

    #[test]
    fn the_quantile_window_forgets_samples_older_than_a_minute() {
        let l = Latency::default();
        let start = Instant::now();
        l.record_at(ms(900), start);
        l.record_at(ms(5), start + Duration::from_secs(30));
        let q = l
            .snapshot_at(start + Duration::from_secs(35))
            .quantiles
            .unwrap();
        assert!(
            q[3] > 0.8,
            "the slow sample is still in the last minute: {q:?}"
        );
        let q = l
            .snapshot_at(start + Duration::from_secs(75))
            .quantiles
            .unwrap();
        assert!(q[3] < 0.006, "the slow sample left the window: {q:?}");
        assert!(
            l.snapshot_at(start + Duration::from_secs(200))
                .quantiles
                .is_none()
        );
        // Everything stays in the cumulative counts.
        assert_eq!(l.snapshot_at(start + Duration::from_secs(200)).count, 2);
    }

    #[test]
    fn exposition_has_buckets_sum_count_and_quantiles() {
        let l = Latency::default();
        l.record(ms(2));
        let mut e = Exposition::new();
        render(
            &mut e,
            "x_seconds",
            "X.",
            &[(vec![("a", "b")], l.snapshot())],
        );
        let text = e.finish();
        assert!(text.contains("# TYPE x_seconds histogram"), "{text}");
        assert!(
            text.contains("x_seconds_bucket{a=\"b\",le=\"0.001\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{a=\"b\",le=\"0.0025\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{a=\"b\",le=\"+Inf\"} 1"),
            "{text}"
        );
        assert!(text.contains("x_seconds_count{a=\"b\"} 1"), "{text}");
        assert!(text.contains("x_seconds_sum{a=\"b\"} 0.002"), "{text}");
        assert!(
            text.contains("x_seconds_quantile{a=\"b\",quantile=\"0.99\"} 0.002"),
            "{text}"
        );
    }
}
