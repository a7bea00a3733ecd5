//! The injector's probe rewriting: the application containers' httpGet, tcpSocket and
//! grpc probes become httpGet probes on the proxy's admin port at
//! `/app-health/<container>/<livez|readyz|startupz>`, and the originals go to the proxy
//! in `GOFE_APP_PROBES`, which runs them from inside the pod. The kubelet's plaintext
//! probes would otherwise be refused by strict inbound mTLS (or, for TCP, answered by
//! the proxy's listener whatever the application's state).
//!
//! Left alone: exec probes, probes naming a `host` (the kubelet does not send those to
//! the pod), probes on ports in `skip-inbound-ports` (they reach the application
//! directly). `restore` undoes a rewrite, so that injecting twice gives what injecting
//! once gives.

use gofe_proxy::config::{AppProbes, PortSet, ProbeKind};
use serde_json::{Map, Value, json};

/// The handlers the proxy can run; `exec` runs in the container and needs no network.
const HANDLERS: [&str; 3] = ["httpGet", "tcpSocket", "grpc"];

/// The path the kubelet is sent to instead.
pub fn path(container: &str, kind: ProbeKind) -> String {
    format!("/app-health/{container}/{}", kind.segment())
}

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error(
        "container {container}: {probe} names port {port}, which the container does not declare"
    )]
    UnknownPort {
        container: String,
        probe: &'static str,
        port: String,
    },
    #[error("the rewritten probes do not parse as GOFE_APP_PROBES: {0}")]
    Unparsable(String),
}

/// Rewrites the probes of `containers` (in place) and returns the originals as
/// `GOFE_APP_PROBES`'s JSON, or None when no probe was rewritten.
pub fn rewrite(
    containers: &mut [Value],
    admin_port: u16,
    skip_inbound: &PortSet,
) -> Result<Option<String>, RewriteError> {
    let mut originals = Map::new();
    for c in containers.iter_mut() {
        let Some(name) = c["name"].as_str().map(str::to_string) else {
            continue;
        };
        let ports = c["ports"].clone();
        for kind in ProbeKind::ALL {
            let Some(probe) = c.get_mut(kind.field()).and_then(Value::as_object_mut) else {
                continue;
            };
            let Some(handler) = HANDLERS.iter().find(|h| probe.contains_key(**h)).copied() else {
                continue;
            };
            let mut action = probe[handler].clone();
            if action.get("host").is_some_and(|h| !h.is_null()) {
                continue;
            }
            let port =
                resolve_port(&action["port"], &ports).ok_or_else(|| RewriteError::UnknownPort {
                    container: name.clone(),
                    probe: kind.field(),
                    port: action["port"].to_string(),
                })?;
            if skip_inbound.contains(port) {
                continue;
            }
            action["port"] = json!(port);
            let mut original = Map::new();
            original.insert(handler.into(), action);
            if let Some(t) = probe.get("timeoutSeconds") {
                original.insert("timeoutSeconds".into(), t.clone());
            }
            probe.remove(handler);
            probe.insert(
                "httpGet".into(),
                json!({"path": path(&name, kind), "port": admin_port, "scheme": "HTTP"}),
            );
            originals
                .entry(name.clone())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("an object")
                .insert(kind.segment().into(), Value::Object(original));
        }
    }
    if originals.is_empty() {
        return Ok(None);
    }
    let text = Value::Object(originals).to_string();
    // The proxy must accept what it will be given.
    AppProbes::parse(&text).map_err(RewriteError::Unparsable)?;
    Ok(Some(text))
}

/// Puts back the probes a rewrite took (`app_probes` is the JSON it returned): each
/// probe still pointing at its `/app-health/` path gets its original handler again.
pub fn restore(containers: &mut [Value], app_probes: &str) {
    let Ok(Value::Object(originals)) = serde_json::from_str::<Value>(app_probes) else {
        return;
    };
    for c in containers.iter_mut() {
        let Some(name) = c["name"].as_str().map(str::to_string) else {
            continue;
        };
        let Some(kinds) = originals.get(&name).and_then(Value::as_object) else {
            continue;
        };
        for kind in ProbeKind::ALL {
            let Some(Value::Object(original)) = kinds.get(kind.segment()) else {
                continue;
            };
            let Some(probe) = c.get_mut(kind.field()).and_then(Value::as_object_mut) else {
                continue;
            };
            if probe["httpGet"]["path"].as_str() != Some(path(&name, kind).as_str()) {
                continue;
            }
            probe.remove("httpGet");
            for (k, v) in original {
                probe.insert(k.clone(), v.clone());
            }
        }
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
fn resolve_port(port: &Value, ports: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(s) => s.parse().ok().or_else(|| {
            ports.as_array()?.iter().find_map(|p| {
                (p["name"].as_str() == Some(s.as_str()))
                    .then(|| {
                        p["containerPort"]
                            .as_u64()
                            .and_then(|n| u16::try_from(n).ok())
                    })
                    .flatten()
            })
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> Value {
        json!({
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 7, "timeoutSeconds": 2},
            "readinessProbe": {"tcpSocket": {"port": 8080}},
            "startupProbe": {"grpc": {"port": 9090, "service": "web"}, "failureThreshold": 30},
        })
    }

    #[test]
    fn each_kind_of_probe_points_at_the_admin_port_with_its_original_kept() {
        let mut cs = vec![app()];
        let json = rewrite(&mut cs, 4191, &PortSet::default())
            .unwrap()
            .unwrap();
        let c = &cs[0];
        assert_eq!(
            c["livenessProbe"],
            json!({"httpGet": {"path": "/app-health/web/livez", "port": 4191, "scheme": "HTTP"}, "periodSeconds": 7, "timeoutSeconds": 2})
        );
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"],
            "/app-health/web/readyz"
        );
        assert_eq!(c["startupProbe"]["failureThreshold"], 30);
        assert!(c["startupProbe"].get("grpc").is_none());
        let parsed: Value = serde_json::from_str(&json).unwrap();
        // The named port is resolved for the proxy.
        assert_eq!(parsed["web"]["livez"]["httpGet"]["port"], 8080);
        assert_eq!(parsed["web"]["livez"]["timeoutSeconds"], 2);
        assert_eq!(parsed["web"]["startupz"]["grpc"]["service"], "web");
        assert_eq!(AppProbes::parse(&json).unwrap().len(), 3);

        restore(&mut cs, &json);
        let mut expected = app();
        expected["livenessProbe"]["httpGet"]["port"] = json!(8080);
        assert_eq!(cs[0], expected);
    }

    #[test]
    fn exec_host_and_skipped_port_probes_are_left_alone() {
        let mut cs = vec![json!({
            "name": "db",
            "livenessProbe": {"exec": {"command": ["true"]}},
            "readinessProbe": {"httpGet": {"host": "10.0.0.1", "port": 80}},
            "startupProbe": {"tcpSocket": {"port": 5432}},
        })];
        let before = cs.clone();
        let skip = PortSet::parse("5432").unwrap();
        assert_eq!(rewrite(&mut cs, 4191, &skip).unwrap(), None);
        assert_eq!(cs, before);
    }

    #[test]
    fn an_undeclared_named_port_is_refused() {
        let mut cs =
            vec![json!({"name": "web", "livenessProbe": {"httpGet": {"port": "metrics"}}})];
        let err = rewrite(&mut cs, 4191, &PortSet::default()).unwrap_err();
        assert!(err.to_string().contains("\"metrics\""), "{err}");
    }
}
