//! Entering the private namespaces, staging the binaries, and the helpers every part
//! of the harness uses: running commands, polling until a condition holds.

use anyhow::{Context, bail};
use std::fs::{self};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a proxy or an application may take to come up.
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(20);
pub(super) const POLL: Duration = Duration::from_millis(20);

pub(super) struct Setup {
    pub(super) gofe: PathBuf,
    pub(super) self_exe: PathBuf,
    pub(super) root: PathBuf,
}

pub(super) static SETUP: OnceLock<Result<Setup, String>> = OnceLock::new();

pub(super) fn find_tool(name: &str) -> Option<PathBuf> {
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

pub(super) fn setup() -> Result<Setup, String> {
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
pub(super) fn private_resolv_conf(root: &Path) -> Result<(), String> {
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

pub(super) fn setup_ref() -> &'static Setup {
    SETUP
        .get()
        .and_then(|s| s.as_ref().ok())
        .expect("harness initialised")
}

/// The test binary, which runs the test applications (GOFE_TESTAPP).
pub fn testapp_bin() -> &'static Path {
    &setup_ref().self_exe
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

pub(super) fn ip(args: &[&str]) -> anyhow::Result<String> {
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
