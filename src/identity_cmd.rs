//! `gofe identity`: the mesh's certificate issuer, or with `--bootstrap DIR`, a fresh
//! trust anchor and issuer for development.

use anyhow::Context;
use gofe_identity::issuer::{Bound, material};
use gofe_proxy::config::{self, Env, Var};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Default)]
pub struct IdentityArgs {
    /// Write a new trust anchor (ca.crt), issuer certificate (tls.crt) and key
    /// (tls.key) into DIR, then exit.
    #[arg(long, value_name = "DIR")]
    pub bootstrap: Option<PathBuf>,
    /// GOFE_ISSUER_DIR: where ca.crt, tls.crt and tls.key are.
    #[arg(long)]
    pub issuer_dir: Option<String>,
    /// GOFE_ISSUER_LISTEN
    #[arg(long)]
    pub listen: Option<String>,
    /// GOFE_ISSUER_ADMIN_LISTEN
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// GOFE_ISSUER_CERT_LIFETIME (e.g. 24h, 10m)
    #[arg(long)]
    pub cert_lifetime: Option<String>,
    /// GOFE_ISSUER_JWKS: a JWKS file or URL
    #[arg(long)]
    pub jwks: Option<String>,
    /// GOFE_ISSUER_INSECURE_DEV: accept any token (demo only)
    #[arg(long)]
    pub insecure_dev: bool,
    /// GOFE_TRUST_DOMAIN
    #[arg(long)]
    pub trust_domain: Option<String>,
}

/// The process environment with the flags given standing in for their variables.
fn vars(args: &IdentityArgs) -> HashMap<String, String> {
    let mut vars: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("GOFE_"))
        .collect();
    let flags: [(&Var, Option<String>); 7] = [
        (&config::ISSUER_DIR, args.issuer_dir.clone()),
        (&config::ISSUER_LISTEN, args.listen.clone()),
        (&config::ISSUER_ADMIN_LISTEN, args.admin_listen.clone()),
        (&config::ISSUER_CERT_LIFETIME, args.cert_lifetime.clone()),
        (&config::ISSUER_JWKS, args.jwks.clone()),
        (
            &config::ISSUER_INSECURE_DEV,
            args.insecure_dev.then(|| "true".to_string()),
        ),
        (&config::TRUST_DOMAIN, args.trust_domain.clone()),
    ];
    for (var, value) in flags {
        if let Some(v) = value {
            vars.insert(var.name.to_string(), v);
        }
    }
    vars
}

pub fn run(args: &IdentityArgs) -> anyhow::Result<()> {
    let vars = vars(args);
    let mut env = Env::from_map(&vars);
    if let Some(dir) = &args.bootstrap {
        let trust_domain = env.get(&config::TRUST_DOMAIN, config::parse_trust_domain);
        env.finish().map_err(crate::BadConfig)?;
        material::bootstrap(dir, &trust_domain)?;
        println!(
            "wrote {dir}/{}, {dir}/{} and {dir}/{} for trust domain {trust_domain}",
            material::ANCHORS_FILE,
            material::CERT_FILE,
            material::KEY_FILE,
            dir = dir.display()
        );
        return Ok(());
    }
    let issuer = config::read_issuer(&mut env);
    let log = env.get(&config::LOG, |s| {
        gofe_telemetry::logs::parse_filter(s)
            .map(|_| s.to_string())
            .map_err(|e| e.to_string())
    });
    let format = env.get(&config::LOG_FORMAT, |s| {
        s.parse::<gofe_telemetry::logs::LogFormat>()
    });
    env.finish().map_err(crate::BadConfig)?;
    gofe_telemetry::logs::init(&log, format)?;
    let rt = crate::runtime(0)?;
    rt.block_on(async move {
        let bound = Bound::bind(issuer)
            .await
            .context("cannot start the issuer")?;
        bound.run(crate::signal()).await;
        anyhow::Ok(())
    })
}
