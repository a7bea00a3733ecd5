//! `gofe`: the commands behind the one binary's CLI, and the Kubernetes-facing glue:
//! `init` (iptables), `inject` (and its `webhook`, and `app_probes`, the probe
//! rewriting), `await_ready`, `identity_cmd` (the issuer), `registry_cmd` (the etcd
//! registry), `demo` (and `demo_rules`, its traffic-rules stories, and `demo_limits`, a
//! flood held off). The binary (main.rs) only parses the command line and runs them.
#![forbid(unsafe_code)]

pub mod app_probes;
pub mod await_ready;
pub mod demo;
pub mod demo_limits;
pub mod demo_rules;
pub mod identity_cmd;
pub mod init;
pub mod inject;
pub mod registry_cmd;
pub mod webhook;

use gofe_proxy::config::ConfigError;

/// A configuration error: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct BadConfig(#[from] pub ConfigError);

/// Builds the runtime: one worker thread runs a single-threaded runtime (no work
/// stealing, no cross-thread wakeups), which is cheapest per request.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = match worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Waits for SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C).
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
