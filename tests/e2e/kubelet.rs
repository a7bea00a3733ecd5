//! A kubelet for tests: it takes a pod as `gofe inject` (or the webhook) wrote it and
//! runs it as a kubelet would, so that whatever the YAML gets wrong fails here.
//!
//! What it does, from the YAML alone:
//! - the pod is a network namespace on the test's bridge, its address the pod IP;
//! - volumes become directories: the projected service-account token (a JWT for the
//!   pod's namespace and service account with the volume's audience, signed by the key
//!   whose JWKS the world's real `gofe identity` trusts), ConfigMaps and projected
//!   ClusterTrustBundles (from the objects the test gives it, selected by name or by
//!   signer and label selector, as the API server would hold them), emptyDirs; each
//!   container sees its `volumeMounts` at their `mountPath` (a mount namespace of its
//!   own with bind mounts, read-only where asked);
//! - env: `value`s with the kubelet's `$(VAR)` expansion (earlier variables only, `$$`
//!   for `$`, unknown references left as they are), and `fieldRef`s from the downward
//!   API (namespace, name, service account, pod IP); command and args expanded alike;
//! - init containers in order, each to a zero exit; a native sidecar (`restartPolicy:
//!   Always`) started and, when it has a startup probe, gated on it before the next
//!   container; then the app containers, each `postStart` exec hook awaited before the
//!   next starts; containers run as their `runAsUser`;
//! - probes sent from a "node" namespace as the kubelet sends them (HTTP/1.1 GET with
//!   `kube-probe/1.37`, `Accept: */*`, `Connection: close`, 200-399 passing; TCP
//!   connect; gRPC `grpc.health.v1` with tonic-health's client), within `timeoutSeconds`;
//! - termination in the kubelet's order: `preStop` exec hooks and SIGTERM for the app
//!   containers, then (once they have exited) the sidecars in reverse order, SIGKILL
//!   for whatever outlives the grace period; a Job's pod ends its sidecars once its app
//!   containers have exited.
//!
//! What it does not reproduce of a real kubelet: images (a table maps each image to
//! the gofe binary, a test application or a host program), the container runtime's
//! isolation beyond network and mount namespaces (no cgroups, no capability sets: the
//! init container runs as full root rather than with NET_ADMIN and NET_RAW only; no
//! seccomp, no read-only root filesystem, no pid namespace), file ownership of
//! projected volumes (files are 0644), restarts (a failing liveness probe is reported,
//! not acted on; a crashed container stays down), periodic probing (probes run when
//! the test asks, or in a loop while gating a start), the API server itself (ConfigMaps
//! and bundles are given by the test; pod status is not written anywhere), DNS and
//! Services (pods are reached by IP), token rotation, and `httpGet` lifecycle hooks.

use crate::harness::{APP_UID, Pod, World, eventually, gofe_bin, testapp_bin};
use anyhow::{Context, anyhow, bail, ensure};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The namespace the test's pods live in (the world's tokens and identities use it).
pub const NAMESPACE: &str = "default";
/// Where a container's volume sources are held while they are bound (above what the
/// test process opens).
const BIND_FD: i32 = 900;
/// The kubelet version its probes announce.
const USER_AGENT: &str = "kube-probe/1.37";

/// What an image runs here.
#[derive(Clone, Debug)]
pub enum Image {
    /// The gofe binary (`/gofe` in the image).
    Gofe,
    /// The e2e binary as test application `kind`, on the container's first port.
    TestApp(&'static str),
    /// A program of the host (absolute path), given the container's command and args.
    Host(String),
}

/// What the API server would hold for the pods: ConfigMaps (name → key → content) and
/// ClusterTrustBundles.
#[derive(Default)]
pub struct Cluster {
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    pub trust_bundles: Vec<TrustBundle>,
    pub images: BTreeMap<String, Image>,
}

pub struct TrustBundle {
    pub name: String,
    pub signer: String,
    pub labels: BTreeMap<String, String>,
    pub pem: String,
}

/// The node: a namespace on the bridge from which probes come.
pub struct Kubelet<'w> {
    world: &'w World,
    node: Pod<'w>,
    cluster: Cluster,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    fn field(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livenessProbe",
            ProbeKind::Readiness => "readinessProbe",
            ProbeKind::Startup => "startupProbe",
        }
    }
}

/// One container's process.
struct Running {
    name: String,
    spec: Value,
    pid: u32,
    sidecar: bool,
    /// When the kubelet saw it exit, and how.
    exit: Option<(Instant, std::process::ExitStatus)>,
}

/// A pod the kubelet runs.
pub struct KubePod<'k, 'w> {
    kubelet: &'k Kubelet<'w>,
    pub name: String,
    pub netns: Pod<'w>,
    spec: Value,
    service_account: String,
    dir: PathBuf,
    containers: Vec<Running>,
}

/// A container's view of a volume: where its directory is bound.
struct Mount {
    source: PathBuf,
    target: PathBuf,
    read_only: bool,
}

impl<'w> Kubelet<'w> {
    pub fn new(world: &'w World, cluster: Cluster) -> anyhow::Result<Kubelet<'w>> {
        let node = world.pod("node").start()?;
        Ok(Kubelet {
            world,
            node,
            cluster,
        })
    }

    pub fn node(&self) -> &Pod<'w> {
        &self.node
    }

    /// Boots a pod (`metadata` and `spec`, as a pod template or a Pod has them) named
    /// `name`: volumes, init containers, sidecars gated on their startup probes, app
    /// containers with their postStart hooks. Returns once every container started.
    pub fn run_pod<'k>(&'k self, name: &str, pod: &Value) -> anyhow::Result<KubePod<'k, 'w>> {
        let spec = pod["spec"].clone();
        let netns = self.world.pod(name).start()?;
        let dir = self.world.dir().join(format!("kubelet-{name}"));
        fs::create_dir_all(&dir)?;
        let service_account = spec["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let mut p = KubePod {
            kubelet: self,
            name: name.to_string(),
            netns,
            spec: spec.clone(),
            service_account,
            dir,
            containers: Vec::new(),
        };
        p.make_volumes()?;
        for c in spec["initContainers"].as_array().into_iter().flatten() {
            let cname = c["name"].as_str().unwrap_or_default().to_string();
            if c["restartPolicy"] == "Always" {
                p.start(c, true)?;
                if c.get("startupProbe").is_some() {
                    p.wait_probe(&cname, ProbeKind::Startup)
                        .with_context(|| format!("sidecar {cname} of {name} never started"))?;
                }
            } else {
                let pid = p.start(c, false)?;
                let status = eventually(
                    &format!("init container {cname} of {name} exits"),
                    Duration::from_secs(30),
                    || self.world.try_wait(pid),
                )?;
                ensure!(
                    status.success(),
                    "init container {cname} of {name} failed: {status}"
                );
                p.containers.retain(|r| r.pid != pid);
            }
        }
        for c in spec["containers"].as_array().into_iter().flatten() {
            p.start(c, false)?;
            if let Some(cmd) = c["lifecycle"]["postStart"]["exec"]["command"].as_array() {
                let cname = c["name"].as_str().unwrap_or_default();
                p.exec(c, cmd, "postStart")
                    .with_context(|| format!("postStart of {cname} in {name}"))?;
            }
        }
        Ok(p)
    }

    /// Sends `probe` (a pod spec's probe object) to `ip` from the node, as the kubelet
    /// does; Ok with the answer's summary when it passes.
    pub fn probe(&self, ip: Ipv4Addr, probe: &Value) -> anyhow::Result<String> {
        let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1));
        if let Some(h) = probe.get("httpGet") {
            ensure!(
                h["scheme"].as_str().unwrap_or("HTTP") == "HTTP",
                "only HTTP probes are sent by this kubelet"
            );
            let port = h["port"]
                .as_u64()
                .ok_or_else(|| anyhow!("probe port {} is not a number", h["port"]))?;
            let path = h["path"].as_str().unwrap_or("/").to_string();
            let addr = SocketAddr::from((ip, port as u16));
            let (status, body) = self.node.in_ns(|| http_probe(addr, &path, timeout))??;
            ensure!(
                (200..400).contains(&status),
                "GET {path} answered {status}: {}",
                body.trim()
            );
            Ok(format!("{status} {}", body.trim()))
        } else if let Some(t) = probe.get("tcpSocket") {
            let port = t["port"].as_u64().ok_or_else(|| anyhow!("no port"))? as u16;
            let addr = SocketAddr::from((ip, port));
            self.node
                .in_ns(|| TcpStream::connect_timeout(&addr, timeout))??;
            Ok(format!("connected to {addr}"))
        } else if let Some(g) = probe.get("grpc") {
            let port = g["port"].as_u64().ok_or_else(|| anyhow!("no port"))? as u16;
            let service = g["service"].as_str().unwrap_or("").to_string();
            let url = format!("http://{ip}:{port}");
            let status = self.node.block_on(|| async move {
                use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
                let check = async {
                    let channel = tonic::transport::Endpoint::from_shared(url)?
                        .connect()
                        .await?;
                    let mut client = HealthClient::new(channel);
                    let rsp = client.check(HealthCheckRequest { service }).await?;
                    anyhow::Ok(rsp.into_inner().status)
                };
                tokio::time::timeout(timeout, check).await
            })?;
            let status = status.map_err(|_| anyhow!("no answer within {timeout:?}"))??;
            ensure!(status == 1, "gRPC health status {status}, not SERVING");
            Ok("SERVING".into())
        } else {
            bail!("this kubelet sends httpGet, tcpSocket and grpc probes only: {probe}")
        }
    }
}

/// The kubelet's HTTP probe request, on a connection of its own.
fn http_probe(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: {USER_AGENT}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP answer: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// The kubelet's `$(VAR)` expansion: `$$` is `$`, a defined `$(NAME)` its value, and
/// anything else as written.
pub fn expand(s: &str, vars: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(end) = rest.strip_prefix("$(").and_then(|r| r.find(')')) {
            let name = &rest[2..2 + end];
            match vars.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&rest[..3 + end]),
            }
            rest = &rest[3 + end..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

impl<'k, 'w> KubePod<'k, 'w> {
    fn volume_dir(&self, name: &str) -> PathBuf {
        self.dir.join("volumes").join(name)
    }

    /// Every volume as a directory, filled as the kubelet fills it.
    fn make_volumes(&self) -> anyhow::Result<()> {
        let cluster = &self.kubelet.cluster;
        for v in self.spec["volumes"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().unwrap_or_default();
            let dir = self.volume_dir(name);
            fs::create_dir_all(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
            let write = |file: &str, content: &str| -> anyhow::Result<()> {
                let path = dir.join(file);
                fs::write(&path, content)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
                Ok(())
            };
            if let Some(cm) = v.get("configMap") {
                let cm_name = cm["name"].as_str().unwrap_or_default();
                let data = cluster
                    .config_maps
                    .get(cm_name)
                    .ok_or_else(|| anyhow!("volume {name}: no ConfigMap {cm_name}"))?;
                for (k, content) in data {
                    write(k, content)?;
                }
            } else if v.get("emptyDir").is_some() {
            } else if let Some(sources) = v["projected"]["sources"].as_array() {
                for s in sources {
                    if let Some(t) = s.get("serviceAccountToken") {
                        let audience = t["audience"]
                            .as_str()
                            .ok_or_else(|| anyhow!("volume {name}: a token without audience"))?;
                        let token = self.kubelet.world.service_account_token(
                            NAMESPACE,
                            &self.service_account,
                            audience,
                        )?;
                        write(t["path"].as_str().unwrap_or("token"), &token)?;
                    } else if let Some(b) = s.get("clusterTrustBundle") {
                        write(
                            b["path"].as_str().unwrap_or_default(),
                            &self.trust_bundle(b)?,
                        )?;
                    } else {
                        bail!("volume {name}: projected source {s} is not reproduced here");
                    }
                }
            } else {
                bail!("volume {name}: {v} is not reproduced here");
            }
        }
        Ok(())
    }

    /// A projected ClusterTrustBundle: the named bundle, or every bundle of the signer
    /// whose labels match, concatenated.
    fn trust_bundle(&self, b: &Value) -> anyhow::Result<String> {
        let bundles = &self.kubelet.cluster.trust_bundles;
        let picked: Vec<&TrustBundle> = if let Some(name) = b["name"].as_str() {
            bundles.iter().filter(|t| t.name == name).collect()
        } else {
            let signer = b["signerName"].as_str().unwrap_or_default();
            // An absent selector matches nothing, as in the API.
            let Some(selector) = b["labelSelector"]["matchLabels"].as_object() else {
                bail!("clusterTrustBundle of signer {signer} without a labelSelector");
            };
            bundles
                .iter()
                .filter(|t| t.signer == signer)
                .filter(|t| {
                    selector
                        .iter()
                        .all(|(k, v)| t.labels.get(k).map(String::as_str) == v.as_str())
                })
                .collect()
        };
        if picked.is_empty() && b["optional"] != true {
            bail!("no ClusterTrustBundle matches {b}");
        }
        Ok(picked.iter().map(|t| t.pem.as_str()).collect::<String>())
    }

    /// The container's environment: its `env` in order, expanded and resolved.
    fn env(&self, c: &Value) -> anyhow::Result<Vec<(String, String)>> {
        let mut vars: Vec<(String, String)> = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap_or_default().to_string();
            let value = if let Some(v) = e.get("value") {
                expand(v.as_str().unwrap_or_default(), &vars)
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match path {
                    "metadata.namespace" => NAMESPACE.to_string(),
                    "metadata.name" => self.name.clone(),
                    "spec.serviceAccountName" => self.service_account.clone(),
                    "status.podIP" => self.netns.ip4.to_string(),
                    other => bail!("env {name}: fieldRef {other} is not reproduced here"),
                }
            } else {
                bail!("env {name}: {e} is not reproduced here");
            };
            vars.push((name, value));
        }
        Ok(vars)
    }

    fn mounts(&self, c: &Value) -> anyhow::Result<Vec<Mount>> {
        let mut mounts = Vec::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let volume = m["name"].as_str().unwrap_or_default();
            let source = self.volume_dir(volume);
            ensure!(source.exists(), "volumeMount of {volume}: no such volume");
            mounts.push(Mount {
                source,
                target: PathBuf::from(m["mountPath"].as_str().unwrap_or_default()),
                read_only: m["readOnly"] == true,
            });
        }
        // Parents before children, so that a mount on /run does not hide one below.
        mounts.sort_by_key(|m| m.target.components().count());
        Ok(mounts)
    }

    fn uid(&self, c: &Value, image: &Image) -> Option<u32> {
        let uid = c["securityContext"]["runAsUser"]
            .as_u64()
            .or(self.spec["securityContext"]["runAsUser"].as_u64());
        match (uid, image) {
            (Some(0), _) => None,
            (Some(u), _) => Some(u as u32),
            // The gofe image's USER (k8s/Dockerfile); test apps run as the app user.
            (None, Image::Gofe) => Some(2102),
            (None, _) => Some(APP_UID),
        }
    }

    /// A command for container `c`: its image's program with its args, its env, its
    /// user and its mounts, in the pod's network namespace.
    fn command(&self, c: &Value, argv: Option<&[Value]>) -> anyhow::Result<Command> {
        let cname = c["name"].as_str().unwrap_or_default();
        let image_name = c["image"].as_str().unwrap_or_default();
        let image = self
            .kubelet
            .cluster
            .images
            .get(image_name)
            .cloned()
            .ok_or_else(|| anyhow!("container {cname}: no image {image_name} on this node"))?;
        let env = self.env(c)?;
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|s| expand(s.as_str().unwrap_or_default(), &env))
                .collect()
        };
        let words: Vec<String> = match argv {
            Some(argv) => argv
                .iter()
                .map(|s| expand(s.as_str().unwrap_or_default(), &env))
                .collect(),
            None => strings(&c["command"])
                .into_iter()
                .chain(strings(&c["args"]))
                .collect(),
        };
        let (program, args): (PathBuf, Vec<String>) = match &image {
            Image::Gofe => {
                let (first, rest) = words
                    .split_first()
                    .ok_or_else(|| anyhow!("container {cname}: no command"))?;
                ensure!(
                    first == "/gofe",
                    "container {cname}: the gofe image has /gofe, not {first}"
                );
                (gofe_bin().to_path_buf(), rest.to_vec())
            }
            Image::TestApp(_) => (testapp_bin().to_path_buf(), Vec::new()),
            // A command (or a hook's argv) names the program, as an entrypoint
            // override does; args alone go to the image's own program.
            Image::Host(program) => {
                let has_command =
                    argv.is_some() || c["command"].as_array().is_some_and(|a| !a.is_empty());
                match words.split_first() {
                    Some((first, rest)) if has_command => (PathBuf::from(first), rest.to_vec()),
                    _ => (PathBuf::from(program), words.clone()),
                }
            }
        };
        let mut cmd = self.container_command(&program, self.uid(c, &image), &self.mounts(c)?)?;
        cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
        if let Image::TestApp(kind) = image {
            let port = c["ports"][0]["containerPort"].as_u64().unwrap_or(8080);
            cmd.env("GOFE_TESTAPP", kind)
                .env("GOFE_TESTAPP_PORT", port.to_string())
                .env("GOFE_TESTAPP_NAME", &self.name);
        }
        Ok(cmd)
    }

    /// As the harness's pod commands, with a mount namespace of the container's own.
    fn container_command(
        &self,
        program: &Path,
        uid: Option<u32>,
        mounts: &[Mount],
    ) -> anyhow::Result<Command> {
        let netns: OwnedFd = fs::File::open(format!("/run/netns/{}", self.netns.ns))?.into();
        // The sources are under /run, which a mount may cover: each is opened in the
        // child's new mount namespace (a bind from a descriptor of the parent's
        // namespace is refused) and kept at a fixed descriptor, bound from there.
        let mut binds = Vec::new();
        for (i, m) in mounts.iter().enumerate() {
            ensure!(m.source.is_dir(), "no volume at {}", m.source.display());
            // The mount point must exist; kubelets create it in the container's root.
            fs::create_dir_all(&m.target)
                .with_context(|| format!("cannot create {}", m.target.display()))?;
            let source = std::ffi::CString::new(m.source.as_os_str().as_encoded_bytes())?;
            let fd = BIND_FD + i as i32;
            binds.push((
                source,
                fd,
                format!("/proc/self/fd/{fd}"),
                m.target.clone(),
                m.read_only,
            ));
        }
        // The program too may be under a covered /run: exec'd from a descriptor.
        let exe: OwnedFd = fs::File::open(program)?.into();
        ensure!(exe.as_raw_fd() < BIND_FD, "descriptors reach {BIND_FD}");
        let exe_path = format!("/proc/self/fd/{}", exe.as_raw_fd());
        let mut cmd = Command::new(&exe_path);
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/nonexistent")
            .current_dir("/")
            .stdin(Stdio::null());
        // SAFETY: system calls only between fork and exec (the strings are made above).
        unsafe {
            cmd.pre_exec(move || {
                use nix::mount::{MsFlags, mount};
                use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
                let _keep = &exe;
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )?;
                for (path, fd, _, _, _) in &binds {
                    let opened = libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                    if opened < 0 || libc::dup3(opened, *fd, libc::O_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(opened);
                }
                for (_, _, source, target, read_only) in &binds {
                    mount(
                        Some(source.as_str()),
                        target,
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    )?;
                    if *read_only {
                        mount(
                            None::<&str>,
                            target,
                            None::<&str>,
                            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                            None::<&str>,
                        )?;
                    }
                }
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

    /// Starts container `c`.
    fn start(&mut self, c: &Value, sidecar: bool) -> anyhow::Result<u32> {
        let cname = c["name"].as_str().unwrap_or_default().to_string();
        let cmd = self.command(c, None)?;
        let pid = self
            .kubelet
            .world
            .spawn(&format!("{}-{cname}", self.name), cmd)?;
        self.containers.push(Running {
            name: cname,
            spec: c.clone(),
            pid,
            sidecar,
            exit: None,
        });
        Ok(pid)
    }

    /// Runs an exec hook in container `c`'s context, to a zero exit.
    fn exec(&self, c: &Value, argv: &[Value], hook: &str) -> anyhow::Result<()> {
        let mut cmd = self.command(c, Some(argv))?;
        let cname = c["name"].as_str().unwrap_or_default();
        cmd.stdin(Stdio::null());
        let pid = self
            .kubelet
            .world
            .spawn(&format!("{}-{cname}-{hook}", self.name), cmd)?;
        let status = eventually(
            &format!("{hook} of {cname}"),
            Duration::from_secs(60),
            || self.kubelet.world.try_wait(pid),
        )?;
        ensure!(status.success(), "{hook} hook of {cname} failed: {status}");
        Ok(())
    }

    fn container(&self, name: &str) -> anyhow::Result<&Running> {
        self.containers
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| anyhow!("no container {name} running in {}", self.name))
    }

    /// The probe of `kind` container `name` declares, as written in the pod spec.
    pub fn probe_spec(&self, name: &str, kind: ProbeKind) -> anyhow::Result<Value> {
        let c = self.container(name)?;
        c.spec
            .get(kind.field())
            .cloned()
            .ok_or_else(|| anyhow!("container {name} has no {}", kind.field()))
    }

    /// Sends container `name`'s probe of `kind` once, from the node.
    pub fn probe(&self, name: &str, kind: ProbeKind) -> anyhow::Result<String> {
        let probe = self.probe_spec(name, kind)?;
        self.kubelet.probe(self.netns.ip4, &probe)
    }

    /// Probes every `periodSeconds` until the probe passes, for at most
    /// `failureThreshold` tries, as the kubelet gates a start or readiness.
    pub fn wait_probe(&self, name: &str, kind: ProbeKind) -> anyhow::Result<String> {
        let probe = self.probe_spec(name, kind)?;
        let period = probe["periodSeconds"].as_u64().unwrap_or(10);
        let threshold = probe["failureThreshold"].as_u64().unwrap_or(3);
        let limit = Duration::from_secs((period * threshold).clamp(5, 60));
        let pid = self.container(name)?.pid;
        eventually(
            &format!("{} of {name} in {} passes", kind.field(), self.name),
            limit,
            || {
                if let Some(status) = self.kubelet.world.try_wait(pid)? {
                    bail!("container {name} exited: {status}");
                }
                Ok(self.kubelet.probe(self.netns.ip4, &probe).ok())
            },
        )
    }

    /// Waits until every probe of every running container passes once: startup, then
    /// readiness and liveness.
    pub fn wait_ready(&self) -> anyhow::Result<()> {
        for r in &self.containers {
            for kind in [
                ProbeKind::Startup,
                ProbeKind::Readiness,
                ProbeKind::Liveness,
            ] {
                if r.spec.get(kind.field()).is_some() {
                    self.wait_probe(&r.name, kind)?;
                }
            }
        }
        Ok(())
    }

    /// Checks for exits; returns whether every app container has exited.
    fn reap(&mut self) -> anyhow::Result<bool> {
        for r in &mut self.containers {
            if r.exit.is_none()
                && let Some(status) = self.kubelet.world.try_wait(r.pid)?
            {
                r.exit = Some((Instant::now(), status));
            }
        }
        Ok(self
            .containers
            .iter()
            .filter(|r| !r.sidecar)
            .all(|r| r.exit.is_some()))
    }

    /// What file `file` of volume `volume` holds now.
    pub fn volume_file(&self, volume: &str, file: &str) -> anyhow::Result<String> {
        Ok(fs::read_to_string(self.volume_dir(volume).join(file))?)
    }

    /// The exit status of container `name`, once it has exited.
    pub fn exit_status(&self, name: &str) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.container(name)?.exit.map(|(_, s)| s))
    }

    /// When container `a` exited relative to container `b` (both must have).
    pub fn exited_before(&self, a: &str, b: &str) -> anyhow::Result<bool> {
        let at = |n: &str| -> anyhow::Result<Instant> {
            Ok(self
                .container(n)?
                .exit
                .ok_or_else(|| anyhow!("{n} has not exited"))?
                .0)
        };
        Ok(at(a)? < at(b)?)
    }

    /// A Job's pod: waits until its app containers exit, then ends its sidecars as the
    /// kubelet does, and returns once everything has exited.
    pub fn wait_completed(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let name = self.name.clone();
        eventually(
            &format!("the app containers of {name} exit"),
            timeout,
            || Ok(self.reap()?.then_some(())),
        )?;
        self.stop_sidecars()
    }

    /// Terminates the pod in the kubelet's order: preStop hooks and SIGTERM for the app
    /// containers; once they have exited (or the grace period is over: SIGKILL), the
    /// sidecars, last started first.
    pub fn terminate(&mut self) -> anyhow::Result<()> {
        let grace = self.grace();
        let apps: Vec<(Value, u32)> = self
            .containers
            .iter()
            .filter(|r| !r.sidecar && r.exit.is_none())
            .map(|r| (r.spec.clone(), r.pid))
            .collect();
        for (spec, pid) in &apps {
            if let Some(cmd) = spec["lifecycle"]["preStop"]["exec"]["command"].as_array() {
                self.exec(spec, cmd, "preStop")?;
            }
            self.signal(*pid, nix::sys::signal::Signal::SIGTERM);
        }
        let name = self.name.clone();
        if eventually(&format!("the app containers of {name} exit"), grace, || {
            Ok(self.reap()?.then_some(()))
        })
        .is_err()
        {
            for (_, pid) in &apps {
                self.signal(*pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        eventually("killed apps exit", Duration::from_secs(5), || {
            Ok(self.reap()?.then_some(()))
        })?;
        self.stop_sidecars()
    }

    fn grace(&self) -> Duration {
        Duration::from_secs(
            self.spec["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30),
        )
    }

    fn signal(&self, pid: u32, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
    }

    /// SIGTERM to each sidecar, in reverse start order, each awaited within the grace
    /// period before the next.
    fn stop_sidecars(&mut self) -> anyhow::Result<()> {
        let grace = self.grace();
        let sidecars: Vec<(String, Value, u32)> = self
            .containers
            .iter()
            .rev()
            .filter(|r| r.sidecar && r.exit.is_none())
            .map(|r| (r.name.clone(), r.spec.clone(), r.pid))
            .collect();
        for (name, spec, pid) in sidecars {
            if let Some(cmd) = spec["lifecycle"]["preStop"]["exec"]["command"].as_array() {
                self.exec(&spec, cmd, "preStop")?;
            }
            self.signal(pid, nix::sys::signal::Signal::SIGTERM);
            let exited = eventually(&format!("sidecar {name} exits"), grace, || {
                self.reap()?;
                Ok(self.container(&name)?.exit.map(|_| ()))
            });
            if exited.is_err() {
                self.signal(pid, nix::sys::signal::Signal::SIGKILL);
                eventually("killed sidecar exits", Duration::from_secs(5), || {
                    self.reap()?;
                    Ok(self.container(&name)?.exit.map(|_| ()))
                })?;
            }
        }
        Ok(())
    }

    /// Kills container `name` at once (a crash).
    pub fn crash(&mut self, name: &str) -> anyhow::Result<()> {
        let pid = self.container(name)?.pid;
        self.kubelet.world.kill(pid)?;
        self.reap()?;
        Ok(())
    }
}
