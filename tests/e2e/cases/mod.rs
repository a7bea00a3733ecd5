//! The end-to-end cases, each a function of a fresh `World`. Each module registers its
//! own cases (`register!`, next to them); `all` gathers them, and `unregistered` finds
//! any case function a module forgot to list.

pub mod attacks;
pub mod chaos;
pub mod http;
pub mod identity;
pub mod iptables;
pub mod kubernetes;
pub mod lifecycle;
pub mod registry;
pub mod resilience;
pub mod rules;
pub mod tcp;
pub mod telemetry;
pub mod trust;

use crate::Case;
use crate::harness::{Pod, World};

/// Lists a module's cases: `cases()` returns them with their names.
macro_rules! register {
    ($($name:ident),* $(,)?) => {
        pub fn cases() -> Vec<(&'static str, crate::Case)> {
            vec![$((stringify!($name), $name as crate::Case)),*]
        }
    };
}
pub(crate) use register;

/// A module's name, its registered cases, and its source.
type Module = (&'static str, Vec<(&'static str, Case)>, &'static str);

/// Every module's cases, and its source (to check nothing was left out).
fn modules() -> Vec<Module> {
    vec![
        ("attacks", attacks::cases(), include_str!("attacks.rs")),
        ("http", http::cases(), include_str!("http.rs")),
        ("tcp", tcp::cases(), include_str!("tcp.rs")),
        ("identity", identity::cases(), include_str!("identity.rs")),
        (
            "lifecycle",
            lifecycle::cases(),
            include_str!("lifecycle.rs"),
        ),
        ("iptables", iptables::cases(), include_str!("iptables.rs")),
        (
            "resilience",
            resilience::cases(),
            include_str!("resilience.rs"),
        ),
        (
            "telemetry",
            telemetry::cases(),
            include_str!("telemetry.rs"),
        ),
        (
            "kubernetes",
            kubernetes::cases(),
            include_str!("kubernetes.rs"),
        ),
        ("trust", trust::cases(), include_str!("trust.rs")),
        ("registry", registry::cases(), include_str!("registry.rs")),
        ("chaos", chaos::cases(), include_str!("chaos.rs")),
        ("rules", rules::cases(), include_str!("rules.rs")),
    ]
}

pub fn all() -> Vec<(&'static str, Case)> {
    modules()
        .into_iter()
        .flat_map(|(_, cases, _)| cases)
        .collect()
}

/// Case functions (`pub fn name(w: &World)`) a module defines but did not register.
pub fn unregistered() -> Vec<String> {
    let mut missing = Vec::new();
    for (module, cases, source) in modules() {
        let mut rest = source;
        while let Some(at) = rest.find("\npub fn ") {
            rest = &rest[at + "\npub fn ".len()..];
            let name_end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_'));
            let Some(name_end) = name_end else { break };
            let name = &rest[..name_end];
            let params = rest[name_end..].split(')').next().unwrap_or_default();
            let is_case = params.contains("&World") && !params.contains('<');
            if is_case && !cases.iter().any(|(n, _)| *n == name) {
                missing.push(format!("{module}::{name}"));
            }
        }
    }
    missing
}

/// The port the HTTP test application listens on.
pub const HTTP_PORT: u16 = 8080;

/// A client pod and a server pod, both meshed, the server running the HTTP test app.
pub fn meshed_pair<'w>(w: &'w World, env: &[(&str, &str)]) -> anyhow::Result<(Pod<'w>, Pod<'w>)> {
    let mut client = w.pod("client").sidecar();
    let mut server = w.pod("server").sidecar();
    for (k, v) in env {
        client = client.env(k, v);
        server = server.env(k, v);
    }
    let client = client.start()?;
    let server = server.start()?;
    server.app("http", HTTP_PORT)?;
    Ok((client, server))
}

/// Why a test could not run here (a tool missing): skipped, or failed when
/// GOFE_E2E=require.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Skip(pub String);

pub fn require_tool(name: &str) -> anyhow::Result<()> {
    if crate::harness::has_tool(name) {
        Ok(())
    } else {
        Err(Skip(format!("{name} is not installed")).into())
    }
}
