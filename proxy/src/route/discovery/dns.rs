//! DNS as a discovery source: a name's A and AAAA records through the system's resolver
//! configuration (the pod's /etc/resolv.conf, its search domains and ndots), refreshed
//! when their TTL runs out, within the GOFE_DNS_REFRESH bounds.

use hickory_resolver::TokioResolver;
use hickory_resolver::config::LookupIpStrategy;
use hickory_resolver::net::NetError;
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot read the resolver configuration: {0}")]
    Config(#[source] NetError),
    #[error("cannot start the resolver: {0}")]
    Start(#[source] NetError),
    #[error("lookup of {host} failed: {source}")]
    Lookup { host: String, source: NetError },
}

/// How soon a name without addresses is looked up again.
const NEGATIVE_RECHECK: Duration = Duration::from_secs(5);

pub struct Dns {
    resolver: TokioResolver,
    floor: Duration,
    ceiling: Duration,
}

impl Dns {
    pub fn new(floor: Duration, ceiling: Duration) -> Result<Dns, DnsError> {
        let mut builder = TokioResolver::builder_tokio().map_err(DnsError::Config)?;
        let opts = builder.options_mut();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // The resolver's cache may not keep answers longer than we would re-resolve.
        opts.positive_max_ttl = Some(ceiling);
        opts.negative_max_ttl = Some(floor);
        let resolver = builder.build().map_err(DnsError::Start)?;
        Ok(Dns {
            resolver,
            floor,
            ceiling,
        })
    }

    /// The addresses of `host` and how long they stay valid; None if the name has no
    /// addresses (or does not exist).
    pub async fn resolve(&self, host: &str) -> Result<Option<(Vec<IpAddr>, Duration)>, DnsError> {
        match self.resolver.lookup_ip(host).await {
            Ok(lookup) => {
                let ips: Vec<IpAddr> = lookup.iter().collect();
                if ips.is_empty() {
                    return Ok(None);
                }
                let valid_for = lookup
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                Ok(Some((ips, valid_for)))
            }
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(None),
            Err(source) => Err(DnsError::Lookup {
                host: host.to_string(),
                source,
            }),
        }
    }

    /// When to look again after an answer valid for `ttl`.
    pub fn refresh_after(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.floor, self.ceiling)
    }

    /// When to look again after `failures` failed resolutions in a row: the floor,
    /// doubling, up to the ceiling.
    pub fn after_failures(&self, failures: u32) -> Duration {
        self.floor
            .saturating_mul(
                1u32.checked_shl(failures.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.ceiling)
    }

    /// When to look again for a name that has no addresses.
    pub fn negative_recheck(&self) -> Duration {
        NEGATIVE_RECHECK.clamp(self.floor, self.ceiling)
    }
}
