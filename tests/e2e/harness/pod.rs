//! Pods: network namespaces on the test's bridge, with or without a sidecar, and the
//! applications they run.

use super::http::*;
use super::setup::*;
use super::world::*;
use super::*;
use anyhow::{Context, anyhow, bail, ensure};
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

pub struct PodBuilder<'w> {
    pub(super) world: &'w World,
    pub(super) name: String,
    pub(super) sidecar: bool,
    pub(super) identity: bool,
    pub(super) env: Vec<(String, String)>,
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
    pub(super) world: &'w World,
    pub name: String,
    pub ns: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub proxy_pid: Option<u32>,
    pub(super) env: Vec<(String, String)>,
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

    pub(super) fn start_proxy(&mut self) -> anyhow::Result<()> {
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
        let pid = child.id();
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
        Ok(App { lines, pid })
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

    /// The proxy's CPU time so far (user + system, every thread), in seconds.
    pub fn proxy_cpu_seconds(&self) -> anyhow::Result<f64> {
        let pid = self
            .proxy_pid
            .ok_or_else(|| anyhow!("no proxy in {}", self.name))?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow!("stat"))? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
        Ok(ticks as f64 / 100.0)
    }

    /// A memory `field` of the proxy's /proc status, in bytes.
    pub(super) fn proxy_memory(&self, field: &str) -> anyhow::Result<u64> {
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
    pub(super) lines: Arc<Mutex<Vec<String>>>,
    /// The application's process (`World::kill` ends it).
    pub pid: u32,
}

impl App {
    /// Every line the application printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

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
