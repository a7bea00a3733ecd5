//! End-to-end tests: real `gofe` processes in network namespaces behind real iptables
//! rules, real applications, real clients (curl, h2load, tonic, tungstenite).
//!
//! Needs root and iptables. Without them every case prints SKIPPED and why, unless
//! GOFE_E2E=require, which makes them fail instead. The binary is its own test
//! application server too: with GOFE_TESTAPP set it runs one (see apps.rs).

mod apps;
mod cases;
mod dns;
mod etcd;
mod grpc;
mod harness;
mod kubelet;
mod otlp;

use cases::Skip;
use harness::World;
use libtest_mimic::{Arguments, Failed, Trial};
use std::process::ExitCode;

type Case = fn(&World) -> anyhow::Result<()>;

fn main() -> ExitCode {
    if let Ok(kind) = std::env::var("GOFE_TESTAPP") {
        return apps::main(&kind);
    }
    let forgotten = cases::unregistered();
    if !forgotten.is_empty() {
        eprintln!(
            "case functions not registered in their module's register!: {}",
            forgotten.join(", ")
        );
        return ExitCode::FAILURE;
    }
    let mut args = Arguments::from_args();
    // Cases spend most of their time waiting on processes and timers, not CPU.
    args.test_threads.get_or_insert(6);
    let required = std::env::var("GOFE_E2E").as_deref() == Ok("require");
    // Listing tests needs no namespaces.
    let unavailable = if args.list { None } else { harness::init() };
    if let Some(reason) = &unavailable {
        println!("SKIPPED end-to-end tests: {reason}");
    }
    let trials = cases::all()
        .into_iter()
        .map(|(name, case)| {
            let ignored = unavailable.is_some() && !required;
            let unavailable = unavailable.clone();
            Trial::test(name, move || run(name, case, unavailable, required))
                .with_ignored_flag(ignored)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

fn run(name: &str, case: Case, unavailable: Option<String>, required: bool) -> Result<(), Failed> {
    if let Some(reason) = unavailable {
        return Err(
            format!("GOFE_E2E=require, but end-to-end tests cannot run here: {reason}").into(),
        );
    }
    let world = World::new(name).map_err(|e| format!("cannot build the test world: {e:#}"))?;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&world)));
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.downcast_ref::<Skip>().is_some() && !required => {
            println!("SKIPPED {name}: {e}");
            Ok(())
        }
        Ok(Err(e)) => Err(format!("{e:#}\n{}", world.logs()).into()),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panicked: {msg}\n{}", world.logs()).into())
        }
    }
}
