//! The end-to-end world: "pods" are network namespaces joined by veths to a bridge in a
//! namespace of their own; a pod with a sidecar gets `gofe init`'s rules and a real
//! `gofe proxy` running as UID 2102, and its applications run as UID 3000.
//!
//! Isolation: before any test thread starts, the test process moves into a private
//! mount and network namespace and mounts a tmpfs on /run. Every namespace a test
//! makes is therefore named under that private /run/netns (names carry the test's
//! name, so tests run in parallel), and none of it outlives the process: a test's
//! `World` kills its processes and deletes its namespaces when dropped, and if the
//! process dies, its mount namespace and everything named in it go with it.

use anyhow::{Context, anyhow, bail, ensure};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

pub const PROXY_UID: u32 = 2102;
pub const APP_UID: u32 = 3000;
pub const ADMIN_PORT: u16 = 4191;

/// How long a proxy or an application may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

struct Setup {
    gofe: PathBuf,
    self_exe: PathBuf,
    root: PathBuf,
}

static SETUP: OnceLock<Result<Setup, String>> = OnceLock::new();

fn find_tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub fn has_tool(name: &str) -> bool {
    find_tool(name).is_some()
}

/// Enters the private namespaces and stages the binaries. Must run before any other
/// thread exists. Returns why end-to-end tests cannot run here, if they cannot.
pub fn init() -> Option<String> {
    let setup = SETUP.get_or_init(setup);
    setup.as_ref().err().cloned()
}

fn setup() -> Result<Setup, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (network namespaces, iptables, running as other UIDs)".into());
    }
    for tool in ["ip", "curl"] {
        if !has_tool(tool) {
            return Err(format!("{tool} is not installed"));
        }
    }
    if !has_tool("iptables-nft") && !has_tool("iptables-legacy") && !has_tool("iptables") {
        return Err("iptables is not installed".into());
    }
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("cannot create private namespaces: {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make mounts private: {e}"))?;
    mount(
        Some("tmpfs"),
        "/run",
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=755"),
    )
    .map_err(|e| format!("cannot mount a private /run: {e}"))?;
    let root = PathBuf::from("/run/gofe-e2e");
    let bin = root.join("bin");
    fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
    private_resolv_conf(&root)?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    // Copies the other UIDs can execute, whatever the permissions of the build
    // directory's parents.
    let stage = |src: &Path, name: &str| -> Result<PathBuf, String> {
        let dst = bin.join(name);
        fs::copy(src, &dst).map_err(|e| format!("cannot copy {}: {e}", src.display()))?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        Ok(dst)
    };
    let gofe = stage(Path::new(env!("CARGO_BIN_EXE_gofe")), "gofe")?;
    let self_exe = stage(&std::env::current_exe().map_err(|e| e.to_string())?, "e2e")?;
    let out = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "ip link set lo up: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Setup {
        gofe,
        self_exe,
        root,
    })
}

/// Name lookups from the tests' pods go to 127.0.0.1 in the pod's own namespace
/// (where a test may run a DNS server), never to the host's resolver.
fn private_resolv_conf(root: &Path) -> Result<(), String> {
    use nix::mount::{MsFlags, mount};
    let conf = root.join("resolv.conf");
    fs::write(
        &conf,
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )
    .map_err(|e| e.to_string())?;
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).map_err(|e| e.to_string())?;
    let mut target = PathBuf::from("/etc/resolv.conf");
    // A link (to systemd-resolved's file under /run, now hidden) is mounted over at
    // its target.
    if let Ok(link) = fs::read_link(&target) {
        target = Path::new("/etc").join(link);
        if !target.exists() {
            if let Some(dir) = target.parent() {
                fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            }
            fs::write(&target, "").map_err(|e| e.to_string())?;
        }
    }
    if !target.exists() {
        // No resolver configuration at all: the proxies run without DNS discovery.
        return Ok(());
    }
    mount(
        Some(&conf),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("cannot mount a private resolv.conf: {e}"))
}

fn setup_ref() -> &'static Setup {
    SETUP
        .get()
        .and_then(|s| s.as_ref().ok())
        .expect("harness initialised")
}

pub fn gofe_bin() -> &'static Path {
    &setup_ref().gofe
}

/// Runs `cmd`, failing with its output if it fails.
pub fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    sh(Command::new("ip").args(args))
}

/// Polls `f` until it yields a value or `timeout` passes; the error names `what` and
/// the last thing `f` said.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "condition not met".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?} ({last})");
        }
        std::thread::sleep(POLL);
    }
}

struct Proc {
    label: String,
    child: Child,
    log: PathBuf,
}

/// One test's namespaces and processes, removed when dropped.
pub struct World {
    name: String,
    dir: PathBuf,
    bridge: String,
    namespaces: Mutex<Vec<String>>,
    procs: Mutex<Vec<Proc>>,
    next_host: AtomicU8,
    issuer: Mutex<Option<Arc<Issuer>>>,
    /// Signs the workloads' service-account tokens, as a cluster's API server would.
    token_key: rcgen::KeyPair,
}

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const ISSUER_PORT: u16 = 8443;
const ISSUER_ADMIN_PORT: u16 = 9990;

/// The world's `gofe identity`, in a pod of its own.
pub struct Issuer {
    pub ip: Ipv4Addr,
    ns: String,
    pub dir: PathBuf,
    lifetime: Duration,
    pid: Mutex<Option<u32>>,
}

impl Issuer {
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

    fn write_jwks(&self) -> anyhow::Result<()> {
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
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let claims = serde_json::json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": format!("system:serviceaccount:default:{pod}"),
            "aud": [gofe_identity::api::TOKEN_AUDIENCE],
            "exp": now + 3600,
            "iat": now,
            "nbf": now,
            "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": pod, "uid": "e2e"}},
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

    fn spawn(&self, label: &str, mut cmd: Command) -> anyhow::Result<u32> {
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

    fn register(&self, label: &str, child: Child, log: PathBuf) {
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

pub struct PodBuilder<'w> {
    world: &'w World,
    name: String,
    sidecar: bool,
    identity: bool,
    env: Vec<(String, String)>,
}

impl<'w> PodBuilder<'w> {
    /// Runs `gofe init` and `gofe proxy` in the pod.
    pub fn sidecar(mut self) -> Self {
        self.sidecar = true;
        self
    }

    /// Runs the sidecar without an identity: plaintext only.
    pub fn no_identity(mut self) -> Self {
        self.identity = false;
        self
    }

    /// Sets a variable for `gofe init` and `gofe proxy`.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.retain(|(key, _)| key != k);
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    pub fn start(self) -> anyhow::Result<Pod<'w>> {
        let w = self.world;
        let host = w.next_host.fetch_add(1, Ordering::Relaxed);
        let ns = format!("{}-{}", w.name, self.name);
        ip(&["netns", "add", &ns])?;
        w.namespaces.lock().unwrap().push(ns.clone());
        let peer = format!("v{host}");
        let ip4 = Ipv4Addr::new(10, 77, 0, host);
        let ip6: Ipv6Addr = format!("fd77::{host}").parse()?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &peer, "netns",
            &w.bridge,
        ])?;
        ip(&["-n", &w.bridge, "link", "set", &peer, "master", "br0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip4}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        let mut pod = Pod {
            world: w,
            name: self.name,
            ns,
            ip4,
            ip6,
            proxy_pid: None,
            env: self.env,
        };
        if self.sidecar {
            if self.identity {
                let issuer = w.issuer()?;
                let token = w.dir.join(format!("{}.token", pod.name));
                fs::write(&token, w.token(&pod.name)?)?;
                let identity = [
                    ("GOFE_IDENTITY_ADDR", format!("{}:{ISSUER_PORT}", issuer.ip)),
                    ("GOFE_IDENTITY_NAME", Issuer::identity(&pod.name)),
                    (
                        "GOFE_IDENTITY_TRUST_ANCHORS",
                        w.anchors_file().display().to_string(),
                    ),
                    ("GOFE_IDENTITY_TOKEN_FILE", token.display().to_string()),
                ];
                for (k, v) in identity {
                    if !pod.env.iter().any(|(key, _)| key == k) {
                        pod.env.push((k.to_string(), v));
                    }
                }
            } else {
                pod.env
                    .push(("GOFE_IDENTITY_DISABLED".into(), "true".into()));
            }
            pod.init(&[])?;
            pod.start_proxy()?;
        }
        Ok(pod)
    }
}

/// A network namespace with an address on the test's bridge, and maybe a sidecar.
pub struct Pod<'w> {
    world: &'w World,
    pub name: String,
    pub ns: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub proxy_pid: Option<u32>,
    env: Vec<(String, String)>,
}

impl<'w> Pod<'w> {
    /// A command that runs in this pod, as `uid` (root when None).
    pub fn command(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        uid: Option<u32>,
    ) -> anyhow::Result<Command> {
        let netns = File::open(format!("/run/netns/{}", self.ns))?;
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/nonexistent")
            .current_dir("/")
            .stdin(Stdio::null());
        // SAFETY: only async-signal-safe system calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                if let Some(uid) = uid {
                    setgroups(&[])?;
                    setgid(Gid::from_raw(uid))?;
                    setuid(Uid::from_raw(uid))?;
                }
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs `gofe init` with the pod's variables and `args`.
    pub fn init(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.command(gofe_bin(), None)?;
        cmd.arg("init")
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        sh(&mut cmd)
    }

    fn start_proxy(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.command(gofe_bin(), Some(PROXY_UID))?;
        cmd.arg("proxy").envs(self.env.iter().map(|(k, v)| (k, v)));
        let pid = self.world.spawn(&format!("{}-proxy", self.name), cmd)?;
        self.proxy_pid = Some(pid);
        eventually(
            &format!("proxy in {} ready", self.name),
            START_TIMEOUT,
            || {
                if let Some(status) = self.world.try_wait(pid)? {
                    bail!("proxy exited: {status}");
                }
                Ok(self
                    .admin("GET", "/ready")
                    .ok()
                    .filter(|(s, _)| *s == 200)
                    .map(|_| ()))
            },
        )
    }

    /// Starts a test application of `kind` listening on `port`, as the app UID.
    pub fn app(&self, kind: &str, port: u16) -> anyhow::Result<App> {
        self.app_with(kind, port, &[])
    }

    /// As `app`, with variables for the app (GOFE_TESTAPP_STATUS, ...).
    pub fn app_with(&self, kind: &str, port: u16, env: &[(&str, &str)]) -> anyhow::Result<App> {
        let mut cmd = self.command(&setup_ref().self_exe, Some(APP_UID))?;
        cmd.envs(env.iter().copied())
            .env("GOFE_TESTAPP", kind)
            .env("GOFE_TESTAPP_PORT", port.to_string())
            .env("GOFE_TESTAPP_NAME", &self.name)
            .stdout(Stdio::piped());
        let label = format!("{}-{kind}-{port}", self.name);
        let log = self.world.dir.join(format!("{label}.log"));
        cmd.stderr(File::create(&log)?);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {label}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line == "READY" {
                        let _ = ready_tx.send(());
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        self.world.register(&label, child, log);
        ready_rx
            .recv_timeout(START_TIMEOUT)
            .map_err(|_| anyhow!("{label} did not become ready: {}", self.world.logs()))?;
        Ok(App { lines })
    }

    /// Runs `f` on a thread inside this pod's network namespace.
    pub fn in_ns<R: Send>(&self, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
        let netns = File::open(format!("/run/netns/{}", self.ns))?;
        std::thread::scope(|s| {
            s.spawn(move || -> anyhow::Result<R> {
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow!("thread in {} panicked", self.ns))?
        })
    }

    /// Runs an async client inside this pod on a runtime of its own (sockets are
    /// created on the runtime's one thread, which is in the pod).
    pub fn block_on<F: std::future::Future>(
        &self,
        f: impl FnOnce() -> F + Send,
    ) -> anyhow::Result<F::Output>
    where
        F::Output: Send,
    {
        self.in_ns(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f())
        })
    }

    /// An HTTP/1.0 request to this pod's admin server, from inside the pod.
    pub fn admin(&self, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
        self.admin_with_body(method, path, "")
    }

    /// As `admin`, with a request body.
    pub fn admin_with_body(
        &self,
        method: &str,
        path: &str,
        body: &str,
    ) -> anyhow::Result<(u16, String)> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ADMIN_PORT));
        self.in_ns(|| raw_http_body(addr, method, path, body))?
    }

    /// Resident memory of the proxy now, from /proc.
    pub fn proxy_rss(&self) -> anyhow::Result<u64> {
        self.proxy_memory("VmRSS")
    }

    pub fn metrics(&self) -> anyhow::Result<Metrics> {
        let (status, body) = self.admin("GET", "/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(Metrics(body))
    }

    /// curl as the application UID, inside this pod. Returns stdout; fails on a
    /// non-zero exit.
    pub fn curl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.curl_output(args)?;
        if !out.status.success() {
            bail!(
                "curl {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn curl_output(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = self.command("curl", Some(APP_UID))?;
        cmd.args(["-sS", "--max-time", "30"]).args(args);
        Ok(cmd.output()?)
    }

    /// Starts a command in the background as the application UID; the world kills it
    /// at the end.
    pub fn spawn_as_app(&self, label: &str, program: &str, args: &[&str]) -> anyhow::Result<u32> {
        let mut cmd = self.command(program, Some(APP_UID))?;
        cmd.args(args);
        self.world.spawn(&format!("{}-{label}", self.name), cmd)
    }

    /// What the pod's proxy has logged so far.
    pub fn proxy_log(&self) -> anyhow::Result<String> {
        Ok(fs::read_to_string(
            self.world.dir.join(format!("{}-proxy.log", self.name)),
        )?)
    }

    /// A request to the test app on `port` in this pod, from inside the pod (the app's
    /// control routes: `/control/status/503`, `/control/served`, ...).
    pub fn app_get(&self, port: u16, path: &str) -> anyhow::Result<String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let (status, body) = self.in_ns(|| raw_http(addr, "GET", path))??;
        ensure!(status == 200, "{path} in {}: {status} {body}", self.name);
        Ok(body)
    }

    /// Peak resident memory of the proxy, from /proc.
    pub fn proxy_peak_rss(&self) -> anyhow::Result<u64> {
        self.proxy_memory("VmHWM")
    }

    /// A memory `field` of the proxy's /proc status, in bytes.
    fn proxy_memory(&self, field: &str) -> anyhow::Result<u64> {
        let pid = self
            .proxy_pid
            .ok_or_else(|| anyhow!("no proxy in {}", self.name))?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))?;
        Ok(kb * 1024)
    }

    pub fn signal_proxy(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self
            .proxy_pid
            .ok_or_else(|| anyhow!("no proxy in {}", self.name))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }
}

pub struct App {
    lines: Arc<Mutex<Vec<String>>>,
}

impl App {
    /// Waits for the application to print a line starting with `prefix`.
    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        eventually(&format!("a line starting {prefix:?}"), timeout, || {
            Ok(self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with(prefix))
                .cloned())
        })
    }
}

/// A minimal blocking HTTP/1.0 exchange (the admin server and test control routes).
pub fn raw_http(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    raw_http_body(addr, method, path, "")
}

/// As `raw_http`, with a request body.
pub fn raw_http_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad response from {addr}: {head:?}"))?;
    Ok((status, body.to_string()))
}

/// A Prometheus text scrape.
pub struct Metrics(pub String);

impl Metrics {
    /// The sum of the samples of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                continue;
            }
            let have = parse_labels(label_text);
            if labels
                .iter()
                .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
            {
                total += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        total
    }
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').to_string(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

/// Frames captured on one of the bridge's ports, as a packet sniffer would see them.
pub struct Capture {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<Vec<u8>>>>,
}

impl Capture {
    /// Starts capturing every frame on the bridge port of `pod`.
    pub fn start(pod: &Pod<'_>) -> anyhow::Result<Capture> {
        let netns = File::open(format!("/run/netns/{}", pod.world.bridge))?;
        // The bridge-side veth of a pod is v<host>, host being the last octet.
        let port = format!("v{}", pod.ip4.octets()[3]);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> anyhow::Result<Vec<u8>> {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let fd = packet_socket(&port)?;
            let _ = ready_tx.send(());
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: reading into a buffer we own, within its length.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    frames.extend_from_slice(&buf[..n as usize]);
                }
            }
            // SAFETY: closing the descriptor this thread opened.
            unsafe { libc::close(fd) };
            Ok(frames)
        });
        ready_rx
            .recv_timeout(START_TIMEOUT)
            .map_err(|_| anyhow!("capture did not start"))?;
        Ok(Capture {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and returns every byte captured.
    pub fn finish(mut self) -> anyhow::Result<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .map_err(|_| anyhow!("capture thread panicked"))?
    }
}

/// A raw packet socket bound to `ifname`, with a short receive timeout so the capture
/// loop notices when to stop.
fn packet_socket(ifname: &str) -> anyhow::Result<i32> {
    let index = nix::net::if_::if_nametoindex(ifname)?;
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain system calls with arguments built here; errors checked.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol as i32);
        if fd < 0 {
            bail!("packet socket: {}", std::io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = index as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        if libc::bind(fd, (&addr as *const libc::sockaddr_ll).cast(), len) < 0 {
            bail!("bind to {ifname}: {}", std::io::Error::last_os_error());
        }
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        let tlen = std::mem::size_of::<libc::timeval>() as u32;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            tlen,
        );
        Ok(fd)
    }
}
