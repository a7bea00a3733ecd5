//! `gofe`: the one binary. The proxy, the iptables setup and the demo live behind one
//! CLI (the commands are the `gofe` library's modules); the data path itself is the
//! `gofe-proxy` crate.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use gofe::{
    BadConfig, await_ready, demo, identity_cmd, init, inject, registry_cmd, runtime, signal,
};
use gofe_proxy::Proxy;
use gofe_proxy::config::{self, Config};
use std::process::ExitCode;
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(name = "gofe", version, about = "A sidecar service-mesh data plane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the sidecar proxy; every setting comes from GOFE_* environment variables.
    Proxy,
    /// Install the rules that send this network namespace's TCP traffic through the proxy.
    Init(init::InitArgs),
    /// Run the mesh's certificate issuer (or --bootstrap a new trust anchor and issuer).
    Identity(identity_cmd::IdentityArgs),
    /// Wait until the local proxy is ready (for a postStart hook).
    Await(await_ready::AwaitArgs),
    /// Add the sidecar to Kubernetes workloads (YAML in, YAML out), or serve as the
    /// mutating admission webhook that does it (--webhook).
    Inject(inject::InjectArgs),
    /// Read and write the etcd registry: endpoints, and policy checked before it is
    /// written (GOFE_REGISTRY and friends say where etcd is).
    Registry(registry_cmd::RegistryArgs),
    /// Run a small mesh on this machine, without root, and show what it does.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    gofe_telemetry::process::mark_start();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Proxy => return proxy(),
        Cmd::Init(args) => init::run(&args),
        Cmd::Identity(args) => identity_cmd::run(&args),
        Cmd::Await(args) => await_ready::run(&args),
        Cmd::Inject(args) => inject::run(&args),
        Cmd::Registry(args) => registry_cmd::run(&args),
        Cmd::Demo(args) => demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gofe: {e:#}");
            if e.downcast_ref::<BadConfig>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn proxy() -> ExitCode {
    let config = match Config::from_process_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gofe proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let log = match gofe_telemetry::logs::init(&config.log, config.log_format) {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("gofe proxy: {e}");
            return ExitCode::from(2);
        }
    };
    warn_unknown_variables();
    warn_if_not_proxy_uid();
    let rt = match runtime(config.worker_threads) {
        Ok(rt) => rt,
        Err(error) => {
            error!(%error, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async move {
        let proxy = match Proxy::bind(config) {
            Ok(p) => p,
            Err(error @ gofe_proxy::BindError::Identity(_)) => {
                // A trust anchors file that is missing or does not parse is a bad
                // setting, reported as one.
                error!(%error, "cannot start");
                eprintln!("gofe proxy: invalid configuration: {error}");
                return ExitCode::from(2);
            }
            Err(error) => {
                error!(%error, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        proxy.set_log_handle(log);
        let shutdown = proxy.shutdown();
        tokio::spawn(async move {
            signal().await;
            info!("signal received");
            shutdown.trigger();
        });
        proxy.run().await;
        ExitCode::SUCCESS
    });
    // Drained: do not wait on a blocking DNS lookup or anything else still running.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// `gofe init` exempts GOFE_PROXY_UID's connections from redirection; a proxy running
/// as anyone else would have its own upstream connections sent back to it.
fn warn_if_not_proxy_uid() {
    let mut env = config::Env::from_process();
    let proxy_uid = env.get(&config::PROXY_UID, |s| {
        s.parse::<u32>().map_err(|e| e.to_string())
    });
    let uid = nix::unistd::getuid().as_raw();
    if env.finish().is_ok() && uid != proxy_uid {
        warn!(
            uid,
            proxy_uid,
            "running as a user other than GOFE_PROXY_UID: where `gofe init` rules are installed, the proxy's own connections will loop back to it"
        );
    }
}

/// A misspelt variable would otherwise be silently ignored.
fn warn_unknown_variables() {
    let known: Vec<&str> = config::PROXY_VARS
        .iter()
        .chain(config::INIT_VARS)
        .chain(config::ISSUER_VARS)
        .chain(config::POLICY_VARS)
        .chain(config::REGISTRY_VARS)
        .map(|v| v.name)
        .collect();
    for (name, _) in std::env::vars() {
        if name.starts_with("GOFE_") && !known.contains(&name.as_str()) {
            warn!(variable = %name, "unknown GOFE_ variable is ignored");
        }
    }
}
