//! Counters, gauges and families of them keyed by label sets. A family holds at most a
//! fixed number of label sets: past the cap, new label sets are folded into one
//! overflow label set (the caller says which) and counted, so an unbounded authority or
//! identity cardinality cannot exhaust memory.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Metrics of one kind keyed by label set `L`.
///
/// Lookups take a read lock; callers on hot paths keep the returned `Arc` (per
/// connection, say) rather than looking it up for every event.
pub struct Family<L, M> {
    metrics: RwLock<HashMap<L, Arc<M>>>,
    max_label_sets: usize,
    overflow: fn(&L) -> L,
    overflowed: Counter,
}

impl<L: Eq + Hash + Clone, M: Default> Family<L, M> {
    /// A family that holds at most `max_label_sets` label sets; a label set beyond that
    /// is replaced by `overflow(labels)`, which must map every label set onto a small
    /// fixed set (typically: the unbounded labels set to `"other"`).
    pub fn new(max_label_sets: usize, overflow: fn(&L) -> L) -> Self {
        Self {
            metrics: RwLock::new(HashMap::new()),
            max_label_sets,
            overflow,
            overflowed: Counter::default(),
        }
    }

    /// The metric for `labels`, created on first use.
    pub fn get(&self, labels: &L) -> Arc<M> {
        if let Some(m) = self.metrics.read().get(labels) {
            return m.clone();
        }
        let mut map = self.metrics.write();
        if let Some(m) = map.get(labels) {
            return m.clone();
        }
        if map.len() >= self.max_label_sets {
            self.overflowed.inc();
            let folded = (self.overflow)(labels);
            return map.entry(folded).or_default().clone();
        }
        map.entry(labels.clone()).or_default().clone()
    }

    /// How many lookups were folded into the overflow label set.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.get()
    }

    /// A snapshot of every label set and its metric, in no particular order.
    pub fn snapshot(&self) -> Vec<(L, Arc<M>)> {
        self.metrics
            .read()
            .iter()
            .map(|(l, m)| (l.clone(), m.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.metrics.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_folds_label_sets_past_the_cap() {
        let f: Family<String, Counter> = Family::new(2, |_| "other".to_string());
        f.get(&"a".into()).inc();
        f.get(&"b".into()).inc();
        f.get(&"c".into()).inc();
        f.get(&"d".into()).add(2);
        f.get(&"a".into()).inc();
        let mut snap: Vec<_> = f
            .snapshot()
            .into_iter()
            .map(|(l, c)| (l, c.get()))
            .collect();
        snap.sort();
        assert_eq!(
            snap,
            vec![("a".into(), 2), ("b".into(), 1), ("other".into(), 3)]
        );
        assert_eq!(f.overflowed(), 2);
    }

    #[test]
    fn same_labels_share_one_metric() {
        let f: Family<u8, Gauge> = Family::new(10, |_| 0);
        let a = f.get(&1);
        let b = f.get(&1);
        a.inc();
        b.inc();
        assert_eq!(f.get(&1).get(), 2);
        assert_eq!(f.len(), 1);
    }
}
