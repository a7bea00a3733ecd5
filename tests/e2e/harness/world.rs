//! One test's world: its namespaces, bridge and processes, torn down when dropped;
//! and the world's issuer.

use super::setup::*;
use super::*;
use anyhow::{Context, anyhow, bail};
use std::fs::{self, File};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(super) struct Proc {
    pub(super) label: String,
    pub(super) child: Child,
    pub(super) log: PathBuf,
}

/// One test's namespaces and processes, removed when dropped.
pub struct World {
    pub(super) name: String,
    pub(super) dir: PathBuf,
    pub(super) bridge: String,
    pub(super) namespaces: Mutex<Vec<String>>,
    pub(super) procs: Mutex<Vec<Proc>>,
    pub(super) next_host: AtomicU8,
    pub(super) issuer: Mutex<Option<Arc<Issuer>>>,
    /// Signs the workloads' service-account tokens, as a cluster's API server would.
    pub(super) token_key: rcgen::KeyPair,
}

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const ISSUER_PORT: u16 = 8443;
pub(super) const ISSUER_ADMIN_PORT: u16 = 9990;

/// The world's `gofe identity`, in a pod of its own.
pub struct Issuer {
    pub ip: Ipv4Addr,
    pub(super) ns: String,
    pub dir: PathBuf,
    pub(super) lifetime: Duration,
    pub(super) pid: Mutex<Option<u32>>,
}

impl Issuer {
    /// The issuer process's resident memory, in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let pid = self
            .pid
            .lock()
            .unwrap()
            .ok_or_else(|| anyhow!("the issuer is not running"))?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS for the issuer"))
    }

    /// The SPIFFE ID a pod named `pod` gets.
    pub fn identity(pod: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{pod}")
    }
}

impl World {
    pub fn new(test: &str) -> anyhow::Result<World> {
        let dir = setup_ref().root.join("tests").join(test);
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
        let bridge = format!("{test}-br");
        let world = World {
            name: test.to_string(),
            dir,
            bridge: bridge.clone(),
            namespaces: Mutex::new(Vec::new()),
            procs: Mutex::new(Vec::new()),
            next_host: AtomicU8::new(2),
            issuer: Mutex::new(None),
            token_key: rcgen::KeyPair::generate()?,
        };
        ip(&["netns", "add", &bridge])?;
        world.namespaces.lock().unwrap().push(bridge.clone());
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        Ok(world)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The trust anchors every proxy of this world reads (a test may rewrite them).
    pub fn anchors_file(&self) -> PathBuf {
        self.dir.join("anchors.pem")
    }

    /// The world's issuer, started with certificates of `lifetime` if it is not
    /// running yet.
    pub fn issuer_with_lifetime(&self, lifetime: Duration) -> anyhow::Result<Arc<Issuer>> {
        let mut slot = self.issuer.lock().unwrap();
        if let Some(i) = slot.as_ref() {
            return Ok(i.clone());
        }
        let dir = self.dir.join("issuer");
        sh(Command::new(gofe_bin())
            .arg("identity")
            .arg("--bootstrap")
            .arg(&dir))?;
        fs::copy(dir.join("ca.crt"), self.anchors_file())?;
        self.write_jwks()?;
        let pod = self.pod("identity").start()?;
        let issuer = Arc::new(Issuer {
            ip: pod.ip4,
            ns: pod.ns.clone(),
            dir,
            lifetime,
            pid: Mutex::new(None),
        });
        self.start_issuer(&issuer)?;
        *slot = Some(issuer.clone());
        Ok(issuer)
    }

    pub fn issuer(&self) -> anyhow::Result<Arc<Issuer>> {
        self.issuer_with_lifetime(Duration::from_secs(3600))
    }

    /// (Re)starts the issuer process, from what its directory holds now.
    pub fn start_issuer(&self, issuer: &Issuer) -> anyhow::Result<()> {
        let pod = Pod {
            world: self,
            name: "identity".into(),
            ns: issuer.ns.clone(),
            ip4: issuer.ip,
            ip6: Ipv6Addr::UNSPECIFIED,
            proxy_pid: None,
            env: Vec::new(),
        };
        let mut cmd = pod.command(gofe_bin(), None)?;
        cmd.arg("identity").envs([
            ("GOFE_ISSUER_DIR", issuer.dir.display().to_string()),
            ("GOFE_ISSUER_LISTEN", format!("0.0.0.0:{ISSUER_PORT}")),
            (
                "GOFE_ISSUER_ADMIN_LISTEN",
                format!("0.0.0.0:{ISSUER_ADMIN_PORT}"),
            ),
            (
                "GOFE_ISSUER_CERT_LIFETIME",
                format!("{}ms", issuer.lifetime.as_millis()),
            ),
            (
                "GOFE_ISSUER_JWKS",
                self.dir.join("jwks.json").display().to_string(),
            ),
            ("GOFE_LOG", "info".into()),
        ]);
        let pid = self.spawn("identity-issuer", cmd)?;
        *issuer.pid.lock().unwrap() = Some(pid);
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, ISSUER_ADMIN_PORT));
        eventually("the issuer is ready", START_TIMEOUT, || {
            if let Some(status) = self.try_wait(pid)? {
                bail!("issuer exited: {status}");
            }
            Ok(pod
                .in_ns(|| raw_http(admin, "GET", "/ready"))?
                .ok()
                .filter(|(s, _)| *s == 200)
                .map(|_| ()))
        })
    }

    /// Stops the issuer process (it can be started again).
    pub fn stop_issuer(&self, issuer: &Issuer) -> anyhow::Result<()> {
        if let Some(pid) = issuer.pid.lock().unwrap().take() {
            self.kill(pid)?;
        }
        Ok(())
    }

    /// Kills process `pid` and reaps it.
    pub fn kill(&self, pid: u32) -> anyhow::Result<()> {
        let mut procs = self.procs.lock().unwrap();
        let p = procs
            .iter_mut()
            .find(|p| p.child.id() == pid)
            .ok_or_else(|| anyhow!("no process {pid}"))?;
        let _ = p.child.kill();
        p.child.wait()?;
        Ok(())
    }

    pub(super) fn write_jwks(&self) -> anyhow::Result<()> {
        use base64::Engine;
        let raw = rcgen::PublicKeyData::der_bytes(&self.token_key);
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "e2e", "alg": "ES256", "use": "sig",
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        }]});
        fs::write(self.dir.join("jwks.json"), jwks.to_string())?;
        Ok(())
    }

    /// A projected service-account token for `pod`, as the kubelet would write it.
    pub fn token(&self, pod: &str) -> anyhow::Result<String> {
        self.service_account_token("default", pod, gofe_identity::api::TOKEN_AUDIENCE)
    }

    /// A token for service account `sa` of `namespace` with `audience`, signed by the
    /// key the issuer's JWKS trusts, as the API server signs projected tokens.
    pub fn service_account_token(
        &self,
        namespace: &str,
        sa: &str,
        audience: &str,
    ) -> anyhow::Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let claims = serde_json::json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": format!("system:serviceaccount:{namespace}:{sa}"),
            "aud": [audience],
            "exp": now + 3600,
            "iat": now,
            "nbf": now,
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": sa, "uid": "e2e"}},
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("e2e".into());
        let key =
            jsonwebtoken::EncodingKey::from_ec_pem(self.token_key.serialize_pem().as_bytes())?;
        Ok(jsonwebtoken::encode(&header, &claims, &key)?)
    }
    /// A pod to be configured and started.
    pub fn pod(&self, name: &str) -> PodBuilder<'_> {
        PodBuilder {
            world: self,
            name: name.to_string(),
            sidecar: false,
            identity: true,
            env: vec![("GOFE_LOG".into(), "info,gofe_proxy=debug".into())],
        }
    }

    /// Starts `cmd`, its output logged under `label`; killed when the world ends.
    pub fn spawn(&self, label: &str, mut cmd: Command) -> anyhow::Result<u32> {
        let log = self.dir.join(format!("{label}.log"));
        let file = File::create(&log)?;
        cmd.stderr(file.try_clone()?).stdout(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {label}"))?;
        let pid = child.id();
        self.procs.lock().unwrap().push(Proc {
            label: label.to_string(),
            child,
            log,
        });
        Ok(pid)
    }

    pub(super) fn register(&self, label: &str, child: Child, log: PathBuf) {
        self.procs.lock().unwrap().push(Proc {
            label: label.to_string(),
            child,
            log,
        });
    }

    /// The exit status of process `pid`, once it has exited; None while it runs.
    pub fn try_wait(&self, pid: u32) -> anyhow::Result<Option<ExitStatus>> {
        let mut procs = self.procs.lock().unwrap();
        let p = procs
            .iter_mut()
            .find(|p| p.child.id() == pid)
            .ok_or_else(|| anyhow!("no process {pid}"))?;
        Ok(p.child.try_wait()?)
    }

    /// The last lines of every process's log, for a failure report.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in self.procs.lock().unwrap().iter() {
            let text = fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            out.push_str(&format!("---- {} ({}) ----\n", p.label, p.log.display()));
            for l in tail {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let mut procs = self.procs.lock().unwrap();
        for p in procs.iter_mut() {
            let _ = p.child.kill();
        }
        for p in procs.iter_mut() {
            let _ = p.child.wait();
        }
        for ns in self.namespaces.lock().unwrap().iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
