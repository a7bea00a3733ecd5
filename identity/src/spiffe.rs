//! SPIFFE IDs as Kubernetes workloads have them (the SPIFFE ID standard, restricted to
//! the `/ns/<namespace>/sa/<serviceaccount>` path Istio and Linkerd use).

use std::fmt;
use std::str::FromStr;

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    #[error(
        "{0:?} is not a workload SPIFFE ID: expected spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>"
    )]
    Path(String),
    #[error("invalid trust domain {0:?}: lowercase letters, digits, '.', '-' and '_' only")]
    TrustDomain(String),
    #[error("invalid {what} {value:?}: letters, digits, '.', '-' and '_' only, not '.' or '..'")]
    Segment { what: &'static str, value: String },
}

fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        if !valid_trust_domain(trust_domain) {
            return Err(SpiffeIdError::TrustDomain(trust_domain.into()));
        }
        for (what, value) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if !valid_segment(value) {
                return Err(SpiffeIdError::Segment {
                    what,
                    value: value.into(),
                });
            }
        }
        Ok(Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, SpiffeIdError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.into()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeIdError::Path(s.into()))?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa),
            _ => Err(SpiffeIdError::Path(s.into())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
    }

    #[test]
    fn refuses_what_is_not_a_workload_id() {
        for bad in [
            "https://cluster.local/ns/default/sa/web",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns/default/sa/web/extra",
            "spiffe://Cluster.Local/ns/default/sa/web",
            "spiffe://cluster.local/ns/../sa/web",
            "spiffe://cluster.local/ns/default/sa/",
            "spiffe://cluster.local/ns/de fault/sa/web",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_say_what_was_expected() {
        let e = "spiffe://cluster.local/team/x"
            .parse::<SpiffeId>()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("/ns/<namespace>/sa/<serviceaccount>"),
            "{e}"
        );
    }
}
