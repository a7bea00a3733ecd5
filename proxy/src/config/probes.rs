//! `GOFE_APP_PROBES`: the application's own liveness, readiness and startup probes, as
//! the injector took them off the pod spec when it pointed the kubelet at
//! `/app-health/<container>/<livez|readyz|startupz>` on the admin port instead. The
//! value is JSON in the shape of the Kubernetes probe handlers, keyed by container and
//! kind, with named ports already resolved:
//!
//! ```json
//! {"web": {"livez":  {"httpGet": {"path": "/healthz", "port": 8080}, "timeoutSeconds": 1},
//!          "readyz": {"tcpSocket": {"port": 8080}},
//!          "startupz": {"grpc": {"port": 9090, "service": "web"}}}}
//! ```

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Which of a container's probes: the last segment of its `/app-health/` path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    pub const ALL: [ProbeKind; 3] = [
        ProbeKind::Liveness,
        ProbeKind::Readiness,
        ProbeKind::Startup,
    ];

    /// The path segment: `livez`, `readyz`, `startupz`.
    pub fn segment(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livez",
            ProbeKind::Readiness => "readyz",
            ProbeKind::Startup => "startupz",
        }
    }

    /// The pod spec's field: `livenessProbe`, ...
    pub fn field(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livenessProbe",
            ProbeKind::Readiness => "readinessProbe",
            ProbeKind::Startup => "startupProbe",
        }
    }

    pub fn from_segment(s: &str) -> Option<ProbeKind> {
        ProbeKind::ALL.into_iter().find(|k| k.segment() == s)
    }
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.segment())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpScheme {
    Http,
    Https,
}

/// What a probe does, as the kubelet would have done it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeAction {
    /// GET `path` on `port`; 200-399 passes.
    Http {
        scheme: HttpScheme,
        port: u16,
        path: String,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
    },
    /// A TCP connection to `port` opens.
    Tcp { port: u16 },
    /// grpc.health.v1.Health/Check of `service` on `port` answers SERVING.
    Grpc { port: u16, service: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppProbe {
    pub action: ProbeAction,
    /// The probe's `timeoutSeconds` (the kubelet's default: 1s).
    pub timeout: Duration,
}

/// Every probe the proxy answers for, by container and kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppProbes {
    probes: BTreeMap<(String, ProbeKind), AppProbe>,
    /// The value as given, for `/config`.
    raw: String,
}

/// The kubelet's default `timeoutSeconds`.
const DEFAULT_TIMEOUT_SECONDS: u64 = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawProbe {
    http_get: Option<RawHttp>,
    tcp_socket: Option<RawTcp>,
    grpc: Option<RawGrpc>,
    timeout_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHttp {
    path: Option<String>,
    port: serde_json::Value,
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Vec<RawHeader>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    port: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpc {
    port: serde_json::Value,
    #[serde(default)]
    service: Option<String>,
}

impl AppProbes {
    /// Parses the variable's value; empty means no probes. Errors name the container
    /// and the probe.
    pub fn parse(s: &str) -> Result<AppProbes, String> {
        if s.trim().is_empty() {
            return Ok(AppProbes::default());
        }
        let raw: BTreeMap<String, BTreeMap<String, RawProbe>> = serde_json::from_str(s)
            .map_err(|e| {
                format!("expected JSON {{\"<container>\": {{\"livez|readyz|startupz\": <probe>}}}} ({e})")
            })?;
        let mut probes = BTreeMap::new();
        for (container, kinds) in raw {
            for (segment, p) in kinds {
                let at = format!("{container}/{segment}");
                let kind = ProbeKind::from_segment(&segment).ok_or_else(|| {
                    format!("{at}: expected livez, readyz or startupz as the probe's kind")
                })?;
                probes.insert((container.clone(), kind), p.typed(&at)?);
            }
        }
        Ok(AppProbes {
            probes,
            raw: s.to_string(),
        })
    }

    pub fn get(&self, container: &str, kind: ProbeKind) -> Option<&AppProbe> {
        self.probes.get(&(container.to_string(), kind))
    }

    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.probes.len()
    }

    pub fn raw(&self) -> &str {
        &self.raw
    }
}

impl RawProbe {
    fn typed(self, at: &str) -> Result<AppProbe, String> {
        let timeout = Duration::from_secs(match self.timeout_seconds {
            Some(0) => return Err(format!("{at}: timeoutSeconds must be at least 1")),
            Some(n) => n,
            None => DEFAULT_TIMEOUT_SECONDS,
        });
        let action = match (self.http_get, self.tcp_socket, self.grpc) {
            (Some(h), None, None) => {
                let scheme = match h.scheme.as_deref() {
                    None | Some("HTTP") => HttpScheme::Http,
                    Some("HTTPS") => HttpScheme::Https,
                    Some(other) => {
                        return Err(format!("{at}: scheme {other:?}: expected HTTP or HTTPS"));
                    }
                };
                let path = h.path.unwrap_or_else(|| "/".into());
                if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
                    return Err(format!("{at}: path {path:?}: expected an absolute path"));
                }
                let mut headers = Vec::new();
                for hdr in h.http_headers {
                    let name = http::HeaderName::from_bytes(hdr.name.as_bytes())
                        .map_err(|_| format!("{at}: {:?} is not a header name", hdr.name))?;
                    let value = http::HeaderValue::from_str(&hdr.value)
                        .map_err(|_| format!("{at}: {:?} is not a header value", hdr.value))?;
                    headers.push((name, value));
                }
                ProbeAction::Http {
                    scheme,
                    port: port(&h.port, at)?,
                    path,
                    headers,
                }
            }
            (None, Some(t), None) => ProbeAction::Tcp {
                port: port(&t.port, at)?,
            },
            (None, None, Some(g)) => ProbeAction::Grpc {
                port: port(&g.port, at)?,
                service: g.service.unwrap_or_default(),
            },
            _ => {
                return Err(format!(
                    "{at}: expected exactly one of httpGet, tcpSocket or grpc"
                ));
            }
        };
        Ok(AppProbe { action, timeout })
    }
}

/// A port number; a named port is the injector's to resolve, not the proxy's.
fn port(v: &serde_json::Value, at: &str) -> Result<u16, String> {
    v.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{at}: port {v}: expected a number from 1 to 65535"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_kinds_of_handler_parse() {
        let p = AppProbes::parse(
            r#"{"web": {"livez": {"httpGet": {"path": "/healthz", "port": 8080, "httpHeaders": [{"name": "x-probe", "value": "1"}]}, "timeoutSeconds": 3},
                        "readyz": {"tcpSocket": {"port": 8080}},
                        "startupz": {"grpc": {"port": 9090}}}}"#,
        )
        .unwrap();
        assert_eq!(p.len(), 3);
        let live = p.get("web", ProbeKind::Liveness).unwrap();
        assert_eq!(live.timeout, Duration::from_secs(3));
        assert!(
            matches!(&live.action, ProbeAction::Http { port: 8080, path, headers, .. }
            if path == "/healthz" && headers.len() == 1)
        );
        assert_eq!(
            p.get("web", ProbeKind::Readiness).unwrap().timeout,
            Duration::from_secs(1)
        );
        assert_eq!(
            p.get("web", ProbeKind::Startup).unwrap().action,
            ProbeAction::Grpc {
                port: 9090,
                service: String::new()
            }
        );
        assert!(p.get("db", ProbeKind::Liveness).is_none());
    }

    #[test]
    fn a_bad_probe_is_refused_naming_its_container_and_kind() {
        for (value, needle) in [
            (
                r#"{"web": {"livez": {"httpGet": {"port": "http"}}}}"#,
                "web/livez: port \"http\"",
            ),
            (
                r#"{"web": {"alive": {"tcpSocket": {"port": 1}}}}"#,
                "web/alive",
            ),
            (
                r#"{"web": {"readyz": {"exec": {"command": ["true"]}}}}"#,
                "expected JSON",
            ),
            (
                r#"{"web": {"readyz": {"tcpSocket": {"port": 1}, "grpc": {"port": 2}}}}"#,
                "exactly one",
            ),
            (
                r#"{"web": {"readyz": {"httpGet": {"port": 1, "scheme": "FTP"}}}}"#,
                "FTP",
            ),
            (
                r#"{"web": {"readyz": {"tcpSocket": {"port": 0}}}}"#,
                "port 0",
            ),
            ("[1]", "expected JSON"),
        ] {
            let err = AppProbes::parse(value).unwrap_err();
            assert!(err.contains(needle), "{value}: {err}");
        }
        assert!(AppProbes::parse("").unwrap().is_empty());
    }
}
