//! Parsers for the values variables take: addresses, durations, sizes, port sets,
//! networks, SPIFFE IDs. Each error says what was expected.

use gofe_identity::SpiffeId;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

pub fn parse_trust_domain(s: &str) -> Result<String, String> {
    SpiffeId::new(s, "x", "x")
        .map(|_| s.to_string())
        .map_err(|_| "expected a trust domain such as cluster.local (lowercase letters, digits, '.', '-', '_')".into())
}

pub fn parse_spiffe_ids(s: &str) -> Result<Vec<SpiffeId>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<SpiffeId>().map_err(|e| e.to_string()))
        .collect()
}

/// A host:port address, the host a name or an IP literal.
pub fn parse_host_port(s: &str) -> Result<String, String> {
    const EXPECTED: &str = "expected host:port such as gofe-identity.gofe-system.svc:8443";
    let (host, port) = s.rsplit_once(':').ok_or(EXPECTED)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(EXPECTED.into());
    }
    Ok(s.to_string())
}

pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| "expected an address and port such as 0.0.0.0:4143 or [::]:4143".into())
}

/// The longest duration any setting takes. Deadlines are `now + duration`: a bound far
/// beyond any sensible timeout keeps that arithmetic from overflowing, whatever a
/// hot-reloaded file says.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|_| "expected a duration such as 10s, 250ms or 1m (0 for none)".to_string())?;
    if d > MAX_DURATION {
        return Err("expected a duration of at most 366d".into());
    }
    Ok(d)
}

pub fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s) {
        Ok(d) if d.is_zero() => Err("expected a duration above zero such as 10s or 250ms".into()),
        other => other,
    }
}

pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// A set of TCP ports written as a list of ports and ranges: `25,8000-8100`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet(Vec<RangeInclusive<u16>>);

impl PortSet {
    pub fn parse(s: &str) -> Result<PortSet, String> {
        const EXPECTED: &str = "expected ports and ranges such as 25,8000-8100 (1-65535)";
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (lo.trim(), hi.trim()),
                None => (part, part),
            };
            let lo: u16 = lo.parse().map_err(|_| EXPECTED.to_string())?;
            let hi: u16 = hi.parse().map_err(|_| EXPECTED.to_string())?;
            if lo == 0 || hi < lo {
                return Err(EXPECTED.into());
            }
            ranges.push(lo..=hi);
        }
        Ok(PortSet(ranges))
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(&port))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn ranges(&self) -> &[RangeInclusive<u16>] {
        &self.0
    }

    pub fn with(mut self, port: u16) -> PortSet {
        if !self.contains(port) {
            self.0.push(port..=port);
        }
        self
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if r.start() == r.end() {
                write!(f, "{}", r.start())?;
            } else {
                write!(f, "{}-{}", r.start(), r.end())?;
            }
        }
        Ok(())
    }
}

/// An IP network: `10.0.0.0/8`, `fd00::/8`, or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        const EXPECTED: &str = "expected networks such as 10.0.0.0/8,fd00::/8";
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| EXPECTED.to_string())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| EXPECTED.to_string())?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(Cidr::from_str)
        .collect()
}

/// `25ms..250ms`: a lower and an upper bound.
pub fn parse_range(s: &str) -> Result<(Duration, Duration), String> {
    const EXPECTED: &str = "expected a range of durations such as 25ms..250ms";
    let (lo, hi) = s.split_once("..").ok_or(EXPECTED)?;
    let lo = parse_duration(lo.trim()).map_err(|_| EXPECTED.to_string())?;
    let hi = parse_duration(hi.trim()).map_err(|_| EXPECTED.to_string())?;
    if hi < lo || hi.is_zero() {
        return Err(EXPECTED.into());
    }
    Ok((lo, hi))
}

/// `64KiB`, `1MiB`, `512`: a size in bytes.
pub fn parse_size(s: &str) -> Result<usize, String> {
    const EXPECTED: &str = "expected a size such as 64KiB, 1MiB or 65536";
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits.parse().map_err(|_| EXPECTED.to_string())?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "Ki" => 1024,
        "MiB" | "Mi" => 1024 * 1024,
        "KB" | "kB" | "K" => 1000,
        "MB" | "M" => 1_000_000,
        _ => return Err(EXPECTED.into()),
    };
    n.checked_mul(mult).ok_or_else(|| EXPECTED.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bounded() {
        assert_eq!(parse_duration("366d").unwrap(), MAX_DURATION);
        let err = parse_duration("1000000000s").unwrap_err();
        assert!(err.contains("at most 366d"), "{err}");
        assert!(parse_range("1ms..400d").is_err());
    }

    #[test]
    fn port_sets_parse_lists_and_ranges() {
        let p = PortSet::parse("25, 8000-8100,9090").unwrap();
        assert!(p.contains(25) && p.contains(8050) && p.contains(9090));
        assert!(!p.contains(8101));
        assert_eq!(p.to_string(), "25,8000-8100,9090");
        assert!(PortSet::parse("").unwrap().is_empty());
        for bad in ["0", "100-50", "http", "1-", "65536"] {
            assert!(PortSet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_parse_both_families() {
        let c = parse_cidrs("10.0.0.0/8, fd00::/8,192.168.1.1").unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[2].to_string(), "192.168.1.1/32");
        assert!(parse_cidrs("10.0.0.0/33").is_err());
        assert!(parse_cidrs("ten/8").is_err());
    }
}
