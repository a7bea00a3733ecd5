//! `gofe registry`: the operator's view of the etcd registry, with the proxy's own
//! variables (GOFE_REGISTRY, TLS, user, prefix). `ls` lists what is registered (checked
//! against the trust anchors when GOFE_IDENTITY_TRUST_ANCHORS is set); `apply` checks
//! a policy file with the proxy's own parser and writes one document per destination,
//! all at once; `get` and `delete` work on one destination's document.

use anyhow::{Context, bail};
use gofe_proxy::addrs::DestKey;
use gofe_proxy::config::file::{FileError, Problem};
use gofe_proxy::config::policy::Policy;
use gofe_proxy::config::registry::{PolicyDocError, split_policy_file};
use gofe_proxy::config::{self, Env, RegistryConfig};
use gofe_proxy::route::discovery::entry;
use gofe_proxy::route::discovery::registry::{connect, within};
use std::io::Read;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct RegistryArgs {
    #[command(subcommand)]
    cmd: RegistryCmd,
}

#[derive(clap::Subcommand, Debug)]
enum RegistryCmd {
    /// List registered endpoints (of SERVICE, or all) and the pushed policies.
    Ls { service: Option<String> },
    /// Check a policy file (the policy file's schema) and push each destination's
    /// policy; nothing is written unless all of it is valid.
    Apply {
        /// The policy file; - reads standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Print the pushed policy document of a destination.
    Get {
        #[arg(value_enum)]
        kind: DocKind,
        name: String,
    },
    /// Delete the pushed policy document of a destination.
    Delete {
        #[arg(value_enum)]
        kind: DocKind,
        name: String,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum DocKind {
    Policy,
}

pub fn run(args: &RegistryArgs) -> anyhow::Result<()> {
    let mut env = Env::from_process();
    let registry = RegistryConfig::read(&mut env);
    let base = Policy::base_vars(|name| std::env::var(name).ok());
    env.finish().map_err(crate::BadConfig)?;
    let Some(registry) = registry else {
        let mut env = Env::from_process();
        env.reject(
            &config::REGISTRY,
            "",
            "etcd endpoints, http://127.0.0.1:2379 (required by gofe registry)",
        );
        return Err(crate::BadConfig(env.finish().unwrap_err()).into());
    };
    if let RegistryCmd::Apply { file } = &args.cmd {
        // Checked before anything connects: a bad file never reaches etcd.
        let text = read_input(file)?;
        let docs =
            split_policy_file(&text, &base).map_err(|e| anyhow::anyhow!(locate(&text, &e)))?;
        return crate::runtime(1)?.block_on(apply(&registry, docs));
    }
    let rt = crate::runtime(1)?;
    rt.block_on(async {
        match &args.cmd {
            RegistryCmd::Ls { service } => ls(&registry, service.as_deref()).await,
            RegistryCmd::Get { name, .. } => get(&registry, name).await,
            RegistryCmd::Delete { name, .. } => delete(&registry, name).await,
            RegistryCmd::Apply { .. } => unreachable!("handled above"),
        }
    })
}

fn read_input(file: &PathBuf) -> anyhow::Result<String> {
    if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
    }
}

fn dest(name: &str) -> anyhow::Result<DestKey> {
    DestKey::parse(name).map_err(|e| anyhow::anyhow!("destination: {e}"))
}

async fn apply(registry: &RegistryConfig, docs: Vec<(DestKey, String)>) -> anyhow::Result<()> {
    use etcd_client::{Txn, TxnOp};
    let mut client = connect(registry).await?;
    let ops = docs
        .iter()
        .map(|(d, text)| TxnOp::put(format!("{}{d}", registry.policy_root()), text.clone(), None))
        .collect::<Vec<_>>();
    within(client.txn(Txn::new().and_then(ops))).await?;
    for (d, _) in &docs {
        println!("policy/{d} applied");
    }
    Ok(())
}

async fn get(registry: &RegistryConfig, name: &str) -> anyhow::Result<()> {
    let key = format!("{}{}", registry.policy_root(), dest(name)?);
    let mut client = connect(registry).await?;
    let resp = within(client.get(key.clone(), None)).await?;
    match resp.kvs().first() {
        Some(kv) => {
            print!("{}", String::from_utf8_lossy(kv.value()));
            Ok(())
        }
        None => bail!("no policy document at {key}"),
    }
}

async fn delete(registry: &RegistryConfig, name: &str) -> anyhow::Result<()> {
    let key = format!("{}{}", registry.policy_root(), dest(name)?);
    let mut client = connect(registry).await?;
    let resp = within(client.delete(key.clone(), None)).await?;
    if resp.deleted() == 0 {
        bail!("no policy document at {key}");
    }
    println!("policy/{} deleted", dest(name)?);
    Ok(())
}

async fn ls(registry: &RegistryConfig, service: Option<&str>) -> anyhow::Result<()> {
    use etcd_client::GetOptions;
    let prefix = match service {
        Some(s) => registry.service_prefix(&dest(s)?),
        None => registry.services_root(),
    };
    // With the trust anchors at hand, say which entries a sidecar would believe.
    let mut env = Env::from_process();
    let anchors_path = env.get(&config::IDENTITY_TRUST_ANCHORS, |s| {
        Ok::<_, String>(s.to_string())
    });
    let trust_domain = env.get(&config::TRUST_DOMAIN, config::parse_trust_domain);
    env.finish().map_err(crate::BadConfig)?;
    let anchors = if anchors_path.is_empty() {
        None
    } else {
        Some(
            gofe_identity::trust::TrustAnchors::load(std::path::Path::new(&anchors_path))
                .map_err(|e| anyhow::anyhow!("GOFE_IDENTITY_TRUST_ANCHORS: {e}"))?,
        )
    };
    let mut client = connect(registry).await?;
    let resp = within(client.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
    println!("SERVICE\tADDRESS\tIDENTITY\tWEIGHT\tMETADATA\tLEASE\tCHECK");
    let now = std::time::SystemTime::now();
    for kv in resp.kvs() {
        let key = kv.key_str().unwrap_or_default();
        let rest = &key[registry.services_root().len().min(key.len())..];
        let service = rest.rsplit_once('/').map_or(rest, |(s, _)| s);
        let check = match &anchors {
            None => "-".to_string(),
            Some(a) => match entry::verify(key, kv.value(), a, &trust_domain, now) {
                Ok(_) => "verified".into(),
                Err(e) => format!("REJECTED ({}): {e}", e.reason()),
            },
        };
        match entry::claim(kv.value()) {
            Ok(c) => println!(
                "{service}\t{}\t{}\t{}\t{}\t{:x}\t{check}",
                c.address,
                c.identity,
                c.weight,
                c.metadata
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                kv.lease(),
            ),
            Err(e) => println!(
                "{service}\t{key}\t-\t-\t-\t{:x}\tMALFORMED: {e}",
                kv.lease()
            ),
        }
    }
    if service.is_none() {
        let resp = within(client.get(
            registry.policy_root(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ))
        .await?;
        for kv in resp.kvs() {
            let key = kv.key_str().unwrap_or_default();
            println!("policy\t{}", &key[registry.policy_root().len()..]);
        }
    }
    Ok(())
}

/// An error in a policy file, with the line it is on and the field it is about:
/// "line 4: destinations[api.demo:80].policy.retry_on: ...".
pub fn locate(text: &str, err: &PolicyDocError) -> String {
    let lines: Vec<&str> = text.lines().collect();
    // The first line at or after `from` that has `needle` as a key (or a name).
    let find = |from: usize, needle: &str| {
        lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| {
                let l = l
                    .trim_start()
                    .trim_start_matches("- ")
                    .trim_start_matches('{');
                l.contains(&format!("{needle}:")) || l.contains(needle)
            })
            .map(|(i, _)| i)
    };
    // Whether line `l` names destination `d` (`- name: d`, or `{name: d, ...}`).
    let names = |l: &str, d: &str| {
        l.split_once("name:").is_some_and(|(_, v)| {
            v.split([',', '}'])
                .next()
                .unwrap_or_default()
                .trim()
                .trim_matches(['"', '\''])
                == d
        })
    };
    let dest_line = |d: &str| {
        lines
            .iter()
            .position(|l| names(l, d))
            .or_else(|| find(0, d))
    };
    let at = |line: Option<usize>, field: String, msg: String| match line {
        Some(i) => format!("line {}: {field}: {msg}", i + 1),
        None => format!("{field}: {msg}"),
    };
    match err {
        PolicyDocError::File(FileError::Yaml(e)) => match e.location() {
            Some(l) => format!("line {} column {}: {e}", l.line(), l.column()),
            None => e.to_string(),
        },
        PolicyDocError::File(FileError::Destination {
            destination,
            problem,
        }) => {
            let start = dest_line(destination);
            let keys: Vec<String> = match problem {
                Problem::Values(bad) => bad
                    .iter()
                    .map(|b| b.name.trim_start_matches("GOFE_").to_ascii_lowercase())
                    .collect(),
                Problem::UnknownSetting(k) | Problem::NotScalar(k) | Problem::NotList(k) => {
                    vec![k.clone()]
                }
                _ => vec!["endpoints".into()],
            };
            let key = keys.first().cloned().unwrap_or_default();
            let line = start.and_then(|s| find(s, &key).or(Some(s)));
            let section = if key == "endpoints" { "" } else { "policy." };
            at(
                line,
                format!("destinations[{destination}].{section}{key}"),
                problem.to_string(),
            )
        }
        PolicyDocError::File(FileError::Duplicate(name)) => {
            let first = dest_line(name);
            let second = first.and_then(|f| {
                lines
                    .iter()
                    .enumerate()
                    .skip(f + 1)
                    .find(|(_, l)| names(l, name))
                    .map(|(i, _)| i)
            });
            at(
                second.or(first),
                format!("destinations[{name}]"),
                err.to_string(),
            )
        }
        PolicyDocError::File(FileError::Name(bad)) => at(
            dest_line(&bad.0),
            "destinations[].name".into(),
            err.to_string(),
        ),
        PolicyDocError::Endpoints(d) => {
            let line = dest_line(d).and_then(|s| find(s, "endpoints"));
            at(
                line,
                format!("destinations[{d}].endpoints"),
                err.to_string(),
            )
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn error(text: &str) -> String {
        locate(text, &split_policy_file(text, &HashMap::new()).unwrap_err())
    }

    #[test]
    fn errors_name_their_line_and_field() {
        let text = "destinations:\n  - name: web.demo\n    policy:\n      retry_on: 5xx\n  - name: api.demo:80\n    policy:\n      retry_limit: 2\n      retry_on: sometimes\n";
        let e = error(text);
        assert!(
            e.starts_with("line 8: destinations[api.demo:80].policy.retry_on:"),
            "{e}"
        );
        assert!(e.contains("GOFE_RETRY_ON"), "{e}");
        let e = error("destinations:\n  - name: a\n    policy:\n      colour: blue\n");
        assert!(
            e.starts_with("line 4: destinations[a].policy.colour:"),
            "{e}"
        );
        let e = error("destinations:\n  - name: a\n    polcy: {}\n");
        assert!(e.starts_with("line 3 column"), "{e}");
        let e = error("destinations:\n  - name: a\n  - name: b\n  - name: a\n");
        assert!(e.starts_with("line 4: destinations[a]"), "{e}");
    }
}
