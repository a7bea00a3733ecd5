//! `gofe init`'s rules on both iptables backends: idempotent, printable, removable, and
//! carrying traffic.

use crate::harness::{World, sh};
use anyhow::ensure;

crate::cases::register![
    init_rules_nft_backend,
    init_rules_legacy_backend,
    traffic_flows_with_legacy_backend,
];

fn save(pod: &crate::harness::Pod<'_>, bin: &str) -> anyhow::Result<String> {
    let mut cmd = pod.command(bin, None)?;
    cmd.args(["-t", "nat"]);
    sh(&mut cmd)
}

fn rules_are_idempotent_printable_and_removable(w: &World, mode: &str) -> anyhow::Result<()> {
    let pod = w.pod("pod").env("GOFE_IPTABLES_MODE", mode).start()?;
    for family in ["iptables", "ip6tables"] {
        let saver = format!("{family}-{mode}-save");
        let dry = pod.init(&["--dry-run"])?;
        ensure!(
            dry.contains(&format!(
                "{family}-{mode} -t nat -A GOFE_OUTPUT -m owner --uid-owner 2102 -j RETURN"
            )),
            "{dry}"
        );
        ensure!(
            !save(&pod, &saver)?.contains("GOFE"),
            "a dry run changes nothing"
        );

        pod.init(&[])?;
        let once = save(&pod, &saver)?;
        pod.init(&[])?;
        let twice = save(&pod, &saver)?;
        let rules = |s: &str| {
            s.lines()
                .filter(|l| l.starts_with("-A"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        ensure!(
            rules(&once) == rules(&twice),
            "a second run leaves one copy:\n{once}\n---\n{twice}"
        );
        ensure!(
            rules(&once)
                .iter()
                .filter(|l| *l == "-A PREROUTING -p tcp -j GOFE_INBOUND")
                .count()
                == 1
                && rules(&once)
                    .iter()
                    .filter(|l| *l == "-A OUTPUT -p tcp -j GOFE_OUTPUT")
                    .count()
                    == 1,
            "{once}"
        );
        let own_ip = if family == "iptables" {
            format!("{}/32", pod.ip4)
        } else {
            format!("{}/128", pod.ip6)
        };
        ensure!(
            once.contains(&format!(
                "-A GOFE_OUTPUT -d {own_ip} -o lo -p tcp -j GOFE_OUTBOUND_REDIRECT"
            )),
            "{once}"
        );

        pod.init(&["--cleanup"])?;
        let after = save(&pod, &saver)?;
        ensure!(
            !after.contains("GOFE"),
            "cleanup removes everything: {after}"
        );
        // Re-install for the next family's dry run to see a clean v6 table only.
        pod.init(&["--cleanup"])?;
    }
    Ok(())
}

pub fn init_rules_nft_backend(w: &World) -> anyhow::Result<()> {
    rules_are_idempotent_printable_and_removable(w, "nft")
}

pub fn init_rules_legacy_backend(w: &World) -> anyhow::Result<()> {
    rules_are_idempotent_printable_and_removable(w, "legacy")
}

/// Legacy iptables, and proxies without identity (plaintext, GOFE_IDENTITY_DISABLED).
pub fn traffic_flows_with_legacy_backend(w: &World) -> anyhow::Result<()> {
    let client = w
        .pod("client")
        .sidecar()
        .no_identity()
        .env("GOFE_IPTABLES_MODE", "legacy")
        .start()?;
    let server = w
        .pod("server")
        .sidecar()
        .no_identity()
        .env("GOFE_IPTABLES_MODE", "legacy")
        .start()?;
    server.app("http", super::HTTP_PORT)?;
    let out = client.curl(&[&format!("http://{}:{}/", server.ip4, super::HTTP_PORT)])?;
    ensure!(out == "hello from server\n", "{out}");
    ensure!(
        client
            .metrics()?
            .sum("gofe_requests_total", &[("direction", "outbound")])
            == 1.0
    );
    ensure!(
        server
            .metrics()?
            .sum("gofe_requests_total", &[("direction", "inbound")])
            == 1.0
    );
    Ok(())
}
