//! Leaf: an endpoint as discovery knows it, and the set of endpoints a destination has
//! at one moment, with where that set came from.

use crate::addrs::EndpointAddr;
use gofe_identity::SpiffeId;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One endpoint of a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: EndpointAddr,
    pub weight: u32,
    /// The identity its proxy must present, when discovery knows it: mTLS is then
    /// required, never a plaintext fallback.
    pub identity: Option<SpiffeId>,
    /// Labels its registration carries (`version=v2`), shown in `/endpoints`.
    pub metadata: Arc<BTreeMap<String, String>>,
}

impl Endpoint {
    /// An endpoint nothing is known about but its address.
    pub fn bare(addr: EndpointAddr) -> Endpoint {
        Endpoint {
            addr,
            weight: 1,
            identity: None,
            metadata: Default::default(),
        }
    }
}

/// Where a destination's endpoints came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Not known yet: the first resolution is under way.
    Pending,
    File,
    Dns,
    /// The etcd registry's signed entries.
    Registry,
    /// No source knew the destination: its original destination (or its address).
    Fallback,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Pending => "pending",
            Source::File => "file",
            Source::Dns => "dns",
            Source::Registry => "registry",
            Source::Fallback => "original-destination",
        }
    }

    /// Whether a source named the endpoints (rather than nothing being known).
    pub fn knows(self) -> bool {
        !matches!(self, Source::Pending | Source::Fallback)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSet {
    pub endpoints: Vec<Endpoint>,
    pub source: Source,
}

impl EndpointSet {
    pub fn pending() -> EndpointSet {
        EndpointSet {
            endpoints: Vec::new(),
            source: Source::Pending,
        }
    }
}
