//! A client's share of an inbound port: one source address without a mesh identity
//! holds at most half of the port's GOFE_MAX_CONCURRENT_REQUESTS at once, so a single
//! host (a slow reader opening every stream it may and reading nothing, say) cannot
//! take the port from everyone else. Meshed clients are not held to it: they are
//! named, and their traffic is shaped by identity (rate limits, shedding).
//!
//! Counts live in a fixed table of slots, picked by a keyed hash of the address: no
//! entry per client to grow or evict, and an attacker cannot choose which slot a
//! victim's address lands in. Two addresses that share a slot share its count, which
//! can only make the bound tighter for them. The hash's keys are the process's, so a
//! connection finds its source's slot once (`SourceSlot::of`), whatever table its port
//! has when each of its requests comes.

use crate::call::Permit;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, LazyLock};

/// Slots in the table.
const SLOTS: usize = 1024;

/// The keys of the slot hash (SipHash, random for each process).
static KEYS: LazyLock<RandomState> = LazyLock::new(RandomState::new);

/// Where a source address's count lives, in every port's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceSlot(usize);

impl SourceSlot {
    pub fn of(source: IpAddr) -> Self {
        SourceSlot(KEYS.hash_one(source) as usize % SLOTS)
    }
}

pub struct SourceShares {
    slots: Box<[Arc<AtomicUsize>]>,
    max: usize,
}

impl SourceShares {
    /// Shares of a port that takes `port_limit` requests at once.
    pub fn new(port_limit: usize) -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Arc::default()).collect(),
            max: (port_limit / 2).max(1),
        }
    }

    /// The most one source may hold.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A place for one more request from the source at `slot`, unless it holds its
    /// share already.
    pub fn take(&self, slot: SourceSlot) -> Option<Permit> {
        Permit::take(&self.slots[slot.0], self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_holds_half_and_others_keep_theirs() {
        let shares = SourceShares::new(8);
        let attacker: IpAddr = "10.0.0.66".parse().unwrap();
        let held: Vec<_> = (0..4)
            .map(|_| shares.take(SourceSlot::of(attacker)).unwrap())
            .collect();
        assert!(
            shares.take(SourceSlot::of(attacker)).is_none(),
            "half of 8 is the share"
        );
        // Another address is not charged for the attacker's (unless it shares a slot,
        // which a keyed hash over 1024 slots makes unlikely for any one pair; try a few).
        let others = (1..=20u8)
            .filter(|i| {
                shares
                    .take(SourceSlot::of(IpAddr::from([10, 0, 1, *i])))
                    .is_some()
            })
            .count();
        assert!(others >= 19, "{others} of 20 other sources got a slot");
        drop(held);
        assert!(
            shares.take(SourceSlot::of(attacker)).is_some(),
            "slots come back when dropped"
        );
    }
}
