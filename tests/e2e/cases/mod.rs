//! The end-to-end cases, each a function of a fresh `World`.

pub mod http;
pub mod identity;
pub mod iptables;
pub mod lifecycle;
pub mod resilience;
pub mod tcp;
pub mod telemetry;

use crate::harness::{Pod, World};

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
