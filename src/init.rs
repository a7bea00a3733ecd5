//! `gofe init`: the nat rules that send a pod's TCP traffic through the proxy, in
//! chains of gofe's own so that they can be replaced and removed as a unit.
//!
//! Inbound (PREROUTING → GOFE_INBOUND): every TCP connection to the pod goes to the
//! inbound listener, except to skipped ports and the admin port.
//! Outbound (OUTPUT → GOFE_OUTPUT): every TCP connection the pod opens goes to the
//! outbound listener, except the proxy's own (by UID), to skipped ports and networks,
//! and to loopback addresses other than the pod's own IPs.

use anyhow::{Context, bail};
use gofe_proxy::config::{self, Cidr, Env, PortSet, Var};
use std::collections::HashMap;
use std::net::IpAddr;
use std::process::Command;

const INBOUND: &str = "GOFE_INBOUND";
const INBOUND_REDIRECT: &str = "GOFE_INBOUND_REDIRECT";
const OUTPUT: &str = "GOFE_OUTPUT";
const OUTBOUND_REDIRECT: &str = "GOFE_OUTBOUND_REDIRECT";

/// The chains in an order that lets each be deleted after those that jump to it.
const CHAINS: [&str; 4] = [INBOUND, OUTPUT, INBOUND_REDIRECT, OUTBOUND_REDIRECT];

/// Where gofe's chains hook into the nat table.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", INBOUND), ("OUTPUT", OUTPUT)];

/// iptables' multiport match takes at most 15 ports, a range counting as two.
const MULTIPORT_MAX: usize = 15;

#[derive(clap::Args, Debug, Default)]
pub struct InitArgs {
    /// Print the commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove gofe's rules and chains.
    #[arg(long, conflicts_with = "dry_run")]
    pub cleanup: bool,
    /// The proxy's user id (GOFE_PROXY_UID).
    #[arg(long)]
    pub proxy_uid: Option<String>,
    /// The outbound listener's port (the port of GOFE_OUTBOUND_LISTEN).
    #[arg(long)]
    pub outbound_port: Option<u16>,
    /// The inbound listener's port (the port of GOFE_INBOUND_LISTEN).
    #[arg(long)]
    pub inbound_port: Option<u16>,
    /// The admin port, never redirected (the port of GOFE_ADMIN_LISTEN).
    #[arg(long)]
    pub admin_port: Option<u16>,
    /// GOFE_SKIP_INBOUND_PORTS
    #[arg(long)]
    pub skip_inbound_ports: Option<String>,
    /// GOFE_SKIP_OUTBOUND_PORTS
    #[arg(long)]
    pub skip_outbound_ports: Option<String>,
    /// GOFE_SKIP_OUTBOUND_CIDRS
    #[arg(long)]
    pub skip_outbound_cidrs: Option<String>,
    /// GOFE_IPV6: auto, true or false.
    #[arg(long)]
    pub ipv6: Option<String>,
    /// GOFE_IPTABLES_MODE: auto, nft or legacy.
    #[arg(long)]
    pub iptables_mode: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Mode {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Auto,
    Nft,
    Legacy,
}

#[derive(Clone, Debug)]
pub struct InitConfig {
    pub proxy_uid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub admin_port: u16,
    pub skip_inbound_ports: PortSet,
    pub skip_outbound_ports: PortSet,
    pub skip_outbound_cidrs: Vec<Cidr>,
    pub ipv6: Ipv6Mode,
    pub backend: Backend,
}

impl InitConfig {
    /// Reads the variables, with flags standing in for them where given, so that a bad
    /// value is reported under the variable's name either way.
    pub fn read(args: &InitArgs) -> Result<InitConfig, config::ConfigError> {
        let vars: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("GOFE_"))
            .collect();
        Self::from_vars(vars, args)
    }

    /// As `read`, from a map of variables (the injector checks annotations with it).
    pub fn from_vars(
        mut vars: HashMap<String, String>,
        args: &InitArgs,
    ) -> Result<InitConfig, config::ConfigError> {
        let flags: [(&Var, &Option<String>); 6] = [
            (&config::PROXY_UID, &args.proxy_uid),
            (&config::SKIP_INBOUND_PORTS, &args.skip_inbound_ports),
            (&config::SKIP_OUTBOUND_PORTS, &args.skip_outbound_ports),
            (&config::SKIP_OUTBOUND_CIDRS, &args.skip_outbound_cidrs),
            (&config::IPV6, &args.ipv6),
            (&config::IPTABLES_MODE, &args.iptables_mode),
        ];
        for (var, flag) in flags {
            if let Some(v) = flag {
                vars.insert(var.name.to_string(), v.clone());
            }
        }
        let mut env = Env::from_map(&vars);
        let port = |env: &mut Env<'_>, var: &Var, flag: Option<u16>| {
            let listen = env.get(var, config::parse_socket_addr);
            flag.unwrap_or(listen.port())
        };
        let cfg = InitConfig {
            proxy_uid: env.get(&config::PROXY_UID, |s| {
                s.parse::<u32>()
                    .map_err(|_| "expected a numeric user id".into())
            }),
            outbound_port: port(&mut env, &config::OUTBOUND_LISTEN, args.outbound_port),
            inbound_port: port(&mut env, &config::INBOUND_LISTEN, args.inbound_port),
            admin_port: port(&mut env, &config::ADMIN_LISTEN, args.admin_port),
            skip_inbound_ports: env.get(&config::SKIP_INBOUND_PORTS, PortSet::parse),
            skip_outbound_ports: env.get(&config::SKIP_OUTBOUND_PORTS, PortSet::parse),
            skip_outbound_cidrs: env.get(&config::SKIP_OUTBOUND_CIDRS, config::parse_cidrs),
            ipv6: env.get(&config::IPV6, |s| match s {
                "auto" => Ok(Ipv6Mode::Auto),
                "true" => Ok(Ipv6Mode::On),
                "false" => Ok(Ipv6Mode::Off),
                _ => Err("expected auto, true or false".into()),
            }),
            backend: env.get(&config::IPTABLES_MODE, |s| match s {
                "auto" => Ok(Backend::Auto),
                "nft" => Ok(Backend::Nft),
                "legacy" => Ok(Backend::Legacy),
                _ => Err("expected auto, nft or legacy".into()),
            }),
        };
        env.finish().map(|()| cfg)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The rules for one address family, as iptables arguments after `-t nat -A`.
pub fn chain_rules(cfg: &InitConfig, family: Family, pod_ips: &[IpAddr]) -> Vec<Vec<String>> {
    let mut rules = Vec::new();
    let mut rule =
        |parts: &[&str]| rules.push(parts.iter().map(|s| s.to_string()).collect::<Vec<_>>());

    let inbound_port = cfg.inbound_port.to_string();
    let outbound_port = cfg.outbound_port.to_string();
    rule(&[
        INBOUND_REDIRECT,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &inbound_port,
    ]);
    let inbound_skips = cfg.skip_inbound_ports.clone().with(cfg.admin_port);
    for ports in multiport_lists(&inbound_skips) {
        rule(&[
            INBOUND,
            "-p",
            "tcp",
            "-m",
            "multiport",
            "--dports",
            &ports,
            "-j",
            "RETURN",
        ]);
    }
    rule(&[INBOUND, "-p", "tcp", "-j", INBOUND_REDIRECT]);

    rule(&[
        OUTBOUND_REDIRECT,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &outbound_port,
    ]);
    let uid = cfg.proxy_uid.to_string();
    rule(&[OUTPUT, "-m", "owner", "--uid-owner", &uid, "-j", "RETURN"]);
    for ports in multiport_lists(&cfg.skip_outbound_ports) {
        rule(&[
            OUTPUT,
            "-p",
            "tcp",
            "-m",
            "multiport",
            "--dports",
            &ports,
            "-j",
            "RETURN",
        ]);
    }
    let v4 = family == Family::V4;
    for cidr in cfg
        .skip_outbound_cidrs
        .iter()
        .filter(|c| c.addr.is_ipv4() == v4)
    {
        rule(&[OUTPUT, "-d", &cidr.to_string(), "-j", "RETURN"]);
    }
    for ip in pod_ips.iter().filter(|ip| ip.is_ipv4() == v4) {
        let own = Cidr {
            addr: *ip,
            prefix: if v4 { 32 } else { 128 },
        };
        rule(&[
            OUTPUT,
            "-o",
            "lo",
            "-d",
            &own.to_string(),
            "-p",
            "tcp",
            "-j",
            OUTBOUND_REDIRECT,
        ]);
    }
    rule(&[OUTPUT, "-o", "lo", "-j", "RETURN"]);
    rule(&[OUTPUT, "-p", "tcp", "-j", OUTBOUND_REDIRECT]);
    rules
}

/// Ports and ranges in `multiport --dports` syntax, split to fit its limit.
fn multiport_lists(ports: &PortSet) -> Vec<String> {
    let mut lists = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut weight = 0;
    for r in ports.ranges() {
        let (item, w) = if r.start() == r.end() {
            (r.start().to_string(), 1)
        } else {
            (format!("{}:{}", r.start(), r.end()), 2)
        };
        if weight + w > MULTIPORT_MAX {
            lists.push(current.join(","));
            current.clear();
            weight = 0;
        }
        current.push(item);
        weight += w;
    }
    if !current.is_empty() {
        lists.push(current.join(","));
    }
    lists
}

/// One iptables binary for one family.
struct Iptables {
    bin: String,
    dry_run: bool,
}

impl Iptables {
    fn nat(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("-w").arg("-t").arg("nat").args(args);
        c
    }

    /// Runs a command that changes the rules (or prints it in a dry run).
    fn apply(&self, args: &[&str]) -> anyhow::Result<()> {
        if self.dry_run {
            println!("{} -t nat {}", self.bin, args.join(" "));
            return Ok(());
        }
        let out = self
            .nat(args)
            .output()
            .with_context(|| format!("cannot run {}", self.bin))?;
        if !out.status.success() {
            bail!(
                "{} -t nat {} failed: {}",
                self.bin,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Runs a query; true if it succeeded. A dry run queries nothing and sees an empty
    /// table.
    fn check(&self, args: &[&str]) -> bool {
        !self.dry_run
            && self
                .nat(args)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
    }

    fn chain_exists(&self, chain: &str) -> bool {
        self.check(&["-S", chain])
    }

    fn install(&self, rules: &[Vec<String>]) -> anyhow::Result<()> {
        for chain in CHAINS {
            if self.chain_exists(chain) {
                self.apply(&["-F", chain])?;
            } else {
                self.apply(&["-N", chain])?;
            }
        }
        for r in rules {
            let mut args = vec!["-A"];
            args.extend(r.iter().map(String::as_str));
            self.apply(&args)?;
        }
        for (hook, chain) in JUMPS {
            let jump = ["-p", "tcp", "-j", chain];
            let mut check = vec!["-C", hook];
            check.extend(jump);
            if !self.check(&check) {
                let mut add = vec!["-A", hook];
                add.extend(jump);
                self.apply(&add)?;
            }
        }
        Ok(())
    }

    fn cleanup(&self) -> anyhow::Result<()> {
        for (hook, chain) in JUMPS {
            // Remove every copy, however many an older version left.
            while self.check(&["-D", hook, "-p", "tcp", "-j", chain]) {}
        }
        for chain in CHAINS {
            if self.chain_exists(chain) {
                self.apply(&["-F", chain])?;
            }
        }
        for chain in CHAINS {
            if self.chain_exists(chain) {
                self.apply(&["-X", chain])?;
            }
        }
        Ok(())
    }
}

fn has_binary(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Lines of rules in a backend's tables: where an older installation lives.
fn rule_count(save: &str) -> usize {
    Command::new(save)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("-A"))
                .count()
        })
        .unwrap_or(0)
}

/// The iptables binary for `family`: the backend asked for, or (auto) the one already
/// holding rules, else nft, else whatever plain `iptables` is.
fn binary(backend: Backend, family: Family) -> anyhow::Result<String> {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    let nft = format!("{base}-nft");
    let legacy = format!("{base}-legacy");
    let chosen = match backend {
        Backend::Nft => nft,
        Backend::Legacy => legacy,
        Backend::Auto => {
            let (has_nft, has_legacy) = (has_binary(&nft), has_binary(&legacy));
            if has_legacy
                && (!has_nft
                    || rule_count(&format!("{legacy}-save")) > rule_count(&format!("{nft}-save")))
            {
                legacy
            } else if has_nft {
                nft
            } else {
                base.to_string()
            }
        }
    };
    if !has_binary(&chosen) {
        bail!("{chosen} is not installed");
    }
    Ok(chosen)
}

fn nat_table_works(bin: &str) -> bool {
    Command::new(bin)
        .args(["-w", "-t", "nat", "-S"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// This namespace's own addresses: every address not on loopback.
fn pod_ips() -> anyhow::Result<Vec<IpAddr>> {
    let mut ips = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().context("cannot list interface addresses")? {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if !ip.is_loopback() && !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// Whether the namespace can carry IPv6 beyond loopback: it has a routable address.
fn has_ipv6(ips: &[IpAddr]) -> bool {
    ips.iter().any(|ip| match ip {
        IpAddr::V6(v6) => !v6.is_unicast_link_local(),
        IpAddr::V4(_) => false,
    })
}

pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    let cfg = InitConfig::read(args).map_err(crate::BadConfig)?;
    let ips = pod_ips()?;
    let mut families = vec![Family::V4];
    let v6 = match cfg.ipv6 {
        Ipv6Mode::On => true,
        Ipv6Mode::Off => false,
        // Only where ip6tables' nat table works here: a kernel without ip6table_nat
        // must not keep the pod from starting.
        Ipv6Mode::Auto => {
            has_ipv6(&ips)
                && match binary(cfg.backend, Family::V6) {
                    Ok(bin) if args.dry_run || nat_table_works(&bin) => true,
                    Ok(bin) => {
                        eprintln!(
                            "gofe init: {bin} has no usable nat table; IPv6 is left alone (GOFE_IPV6=true makes this an error)"
                        );
                        false
                    }
                    Err(_) => false,
                }
        }
    };
    if v6 {
        families.push(Family::V6);
    }
    for family in families {
        let ipt = Iptables {
            bin: binary(cfg.backend, family)?,
            dry_run: args.dry_run,
        };
        if args.cleanup {
            ipt.cleanup()?;
            eprintln!("gofe init: removed {}'s gofe rules", ipt.bin);
        } else {
            ipt.install(&chain_rules(&cfg, family, &ips))?;
            if !args.dry_run {
                eprintln!(
                    "gofe init: {} redirects inbound TCP to :{} and outbound TCP to :{} (proxy uid {})",
                    ipt.bin, cfg.inbound_port, cfg.outbound_port, cfg.proxy_uid
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InitConfig {
        InitConfig::read(&InitArgs {
            skip_inbound_ports: Some("22,9000-9100".into()),
            skip_outbound_ports: Some("25".into()),
            skip_outbound_cidrs: Some("10.96.0.0/12,fd00:96::/64".into()),
            ..Default::default()
        })
        .unwrap()
    }

    fn text(rules: &[Vec<String>]) -> Vec<String> {
        rules.iter().map(|r| r.join(" ")).collect()
    }

    #[test]
    fn v4_rules_exempt_proxy_skips_and_loopback_but_not_own_ip() {
        let ips: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap(), "fd01::5".parse().unwrap()];
        let rules = text(&chain_rules(&cfg(), Family::V4, &ips));
        assert_eq!(
            rules,
            vec![
                "GOFE_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4143",
                "GOFE_INBOUND -p tcp -m multiport --dports 22,9000:9100,4191 -j RETURN",
                "GOFE_INBOUND -p tcp -j GOFE_INBOUND_REDIRECT",
                "GOFE_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4140",
                "GOFE_OUTPUT -m owner --uid-owner 2102 -j RETURN",
                "GOFE_OUTPUT -p tcp -m multiport --dports 25 -j RETURN",
                "GOFE_OUTPUT -d 10.96.0.0/12 -j RETURN",
                "GOFE_OUTPUT -o lo -d 10.1.0.5/32 -p tcp -j GOFE_OUTBOUND_REDIRECT",
                "GOFE_OUTPUT -o lo -j RETURN",
                "GOFE_OUTPUT -p tcp -j GOFE_OUTBOUND_REDIRECT",
            ]
        );
    }

    #[test]
    fn v6_rules_use_v6_networks_and_addresses_only() {
        let ips: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap(), "fd01::5".parse().unwrap()];
        let rules = text(&chain_rules(&cfg(), Family::V6, &ips));
        assert!(rules.contains(&"GOFE_OUTPUT -d fd00:96::/64 -j RETURN".to_string()));
        assert!(rules.contains(
            &"GOFE_OUTPUT -o lo -d fd01::5/128 -p tcp -j GOFE_OUTBOUND_REDIRECT".to_string()
        ));
        assert!(!rules.iter().any(|r| r.contains("10.")), "{rules:?}");
    }

    #[test]
    fn long_port_lists_are_split_for_multiport() {
        let ports = PortSet::parse("1,2,3,4,5,6,7,8,9,10,11,12,13,14,100-200,15").unwrap();
        let lists = multiport_lists(&ports);
        assert_eq!(
            lists,
            vec!["1,2,3,4,5,6,7,8,9,10,11,12,13,14", "100:200,15"]
        );
    }

    #[test]
    fn bad_values_are_named_by_variable() {
        let err = InitConfig::read(&InitArgs {
            proxy_uid: Some("proxy".into()),
            ipv6: Some("maybe".into()),
            ..Default::default()
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("GOFE_PROXY_UID=\"proxy\""), "{text}");
        assert!(text.contains("GOFE_IPV6=\"maybe\""), "{text}");
    }
}
