//! End-to-end tests: real `gofe` processes in network namespaces behind real iptables
//! rules, real applications, real clients (curl, h2load, tonic, tungstenite).
//!
//! Needs root and iptables. Without them every case prints SKIPPED and why, unless
//! GOFE_E2E=require, which makes them fail instead. The binary is its own test
//! application server too: with GOFE_TESTAPP set it runs one (see apps.rs).

mod apps;
mod cases;
mod dns;
mod grpc;
mod harness;
mod otlp;

use cases::Skip;
use harness::World;
use libtest_mimic::{Arguments, Failed, Trial};
use std::process::ExitCode;

type Case = fn(&World) -> anyhow::Result<()>;

macro_rules! cases {
    ($($module:ident :: $name:ident),* $(,)?) => {
        vec![$((stringify!($name), cases::$module::$name as Case)),*]
    };
}

fn all() -> Vec<(&'static str, Case)> {
    cases![
        http::http1_keepalive_reuses_connections,
        http::http1_chunked_bodies_pass_both_ways,
        http::http1_0_clients_and_forward_proxy_requests,
        http::http1_64mib_bodies_stream_without_proxy_memory_growth,
        http::http2_prior_knowledge_with_curl,
        http::grpc_unary_and_bidirectional_streaming,
        http::websocket_echo,
        http::explicit_proxy_mode_routes_by_authority,
        http::connect_to_an_application_proxy_is_tunnelled,
        http::ipv6_original_destination,
        http::h2load_through_two_sidecars,
        tcp::server_speaks_first_on_an_opaque_port,
        tcp::half_close_is_honoured_both_ways,
        tcp::application_tls_passes_through_with_sni,
        tcp::closed_port_fails_fast,
        tcp::skipped_ports_bypass_the_proxy,
        tcp::proxy_own_connections_are_not_redirected,
        tcp::connection_to_own_listener_is_refused,
        identity::traffic_is_mtls_on_the_wire_and_the_app_sees_the_client_identity,
        identity::a_client_cannot_forge_its_identity,
        identity::strict_inbound_refuses_plaintext,
        identity::strict_inbound_refuses_a_foreign_ca_and_an_expired_certificate,
        identity::inbound_authorize_admits_only_listed_identities,
        identity::renewals_under_load_fail_no_request,
        identity::issuer_outage_keeps_traffic_flowing_and_renewal_resumes,
        identity::trust_anchor_rotation_fails_no_request,
        identity::auto_mode_reaches_an_unmeshed_pod_in_plaintext_and_remembers,
        identity::the_issuer_refuses_bad_tokens_and_names,
        lifecycle::sigterm_drains_an_in_flight_request,
        lifecycle::admin_endpoints_and_loopback_only_shutdown,
        iptables::init_rules_nft_backend,
        iptables::init_rules_legacy_backend,
        iptables::traffic_flows_with_legacy_backend,
        resilience::a_failing_endpoint_is_retried_around_ejected_and_returns,
        resilience::retries_stay_within_the_budget,
        resilience::only_safe_requests_are_replayed,
        resilience::timeouts_fire_on_time_for_http_and_grpc,
        resilience::ewma_sends_less_to_a_slow_endpoint_round_robin_does_not,
        resilience::ejection_never_exceeds_the_max_percent,
        resilience::dns_discovery_follows_a_changing_record_set,
        resilience::policy_file_changes_apply_at_run_time_and_a_broken_file_changes_nothing,
        resilience::a_destination_at_its_limit_answers_503_at_once,
        resilience::endpoints_come_and_go_under_load_without_failing_requests,
        resilience::discovery_names_the_identity_each_endpoint_must_present,
        resilience::a_streaming_upload_is_replayed_whole_after_an_early_503,
        telemetry::a_request_through_two_sidecars_is_one_trace_in_w3c_and_b3,
        telemetry::sampling_follows_the_ratio_and_the_parent,
        telemetry::a_dead_or_black_holed_collector_costs_requests_nothing,
        telemetry::latency_histogram_agrees_with_the_client,
        telemetry::promtool_accepts_a_real_scrape,
        telemetry::access_log_lines_and_log_level_changes,
    ]
}

fn main() -> ExitCode {
    if let Ok(kind) = std::env::var("GOFE_TESTAPP") {
        return apps::main(&kind);
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
    let trials = all()
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
