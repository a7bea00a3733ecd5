//! A real etcd for the registry's cases: Debian's etcd-server, one member per pod (so a
//! member can be killed alone, as a leader is), its data under the test's directory,
//! killed with the world; optionally over TLS with client certificates. A test talks
//! to it with etcd-client from inside a member's pod.

use crate::cases::Skip;
use crate::harness::{Pod, World, eventually, raw_http};
use anyhow::Context;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

pub const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
/// A member (or a whole cluster) takes a few seconds to elect a leader.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What a test does with a client.
pub type ClientJob<T> = Box<
    dyn FnOnce(etcd_client::Client) -> Pin<Box<dyn Future<Output = anyhow::Result<T>> + Send>>
        + Send,
>;

pub struct Etcd<'w> {
    w: &'w World,
    pub pods: Vec<Pod<'w>>,
    cluster: String,
    pids: Mutex<Vec<Option<u32>>>,
    pub tls: Option<Tls>,
}

/// etcd's TLS: a CA of the test's, a serving certificate for the members' addresses,
/// and the client certificate etcd requires.
pub struct Tls {
    pub ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Tls {
    fn make(dir: &std::path::Path, ips: &[std::net::Ipv4Addr]) -> anyhow::Result<Tls> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, SanType,
        };
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "e2e etcd CA");
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |name: &str, server: bool| -> anyhow::Result<(String, String)> {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(vec![name.to_string()])?;
            p.distinguished_name.push(DnType::CommonName, name);
            if server {
                p.subject_alt_names
                    .extend(ips.iter().map(|ip| SanType::IpAddress((*ip).into())));
                p.subject_alt_names
                    .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
            }
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &issuer)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (cert, key) = leaf("etcd", true)?;
        let (client_cert, client_key) = leaf("gofe", false)?;
        let tls = Tls {
            ca: dir.join("ca.pem"),
            cert: dir.join("etcd.pem"),
            key: dir.join("etcd-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        for (path, text) in [
            (&tls.ca, ca_cert.pem()),
            (&tls.cert, cert),
            (&tls.key, key),
            (&tls.client_cert, client_cert),
            (&tls.client_key, client_key),
        ] {
            std::fs::write(path, text)?;
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        }
        Ok(tls)
    }

    fn options(&self) -> anyhow::Result<etcd_client::ConnectOptions> {
        let read = |p: &PathBuf| std::fs::read(p);
        Ok(etcd_client::ConnectOptions::new().with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)?))
                .identity(etcd_client::Identity::from_pem(
                    read(&self.client_cert)?,
                    read(&self.client_key)?,
                )),
        ))
    }
}

impl<'w> Etcd<'w> {
    /// A cluster of `members` (1 or 3), started and healthy.
    pub fn start(w: &'w World, members: usize) -> anyhow::Result<Etcd<'w>> {
        Self::start_with(w, members, false)
    }

    /// One member serving TLS only, requiring a client certificate.
    pub fn start_tls(w: &'w World) -> anyhow::Result<Etcd<'w>> {
        Self::start_with(w, 1, true)
    }

    fn start_with(w: &'w World, members: usize, tls: bool) -> anyhow::Result<Etcd<'w>> {
        if !crate::harness::has_tool("etcd") {
            return Err(Skip("etcd is not installed (Debian's etcd-server)".into()).into());
        }
        let mut pods = Vec::new();
        for i in 1..=members {
            pods.push(w.pod(&format!("etcd{i}")).start()?);
        }
        let cluster = pods
            .iter()
            .enumerate()
            .map(|(i, p)| format!("e{}=http://{}:{PEER_PORT}", i + 1, p.ip4))
            .collect::<Vec<_>>()
            .join(",");
        let tls = if tls {
            let ips: Vec<_> = pods.iter().map(|p| p.ip4).collect();
            Some(Tls::make(&w.dir().join("etcd-tls"), &ips)?)
        } else {
            None
        };
        let etcd = Etcd {
            w,
            pods,
            cluster,
            pids: Mutex::new(vec![None; members]),
            tls,
        };
        for i in 0..members {
            etcd.run(i)?;
        }
        for i in 0..members {
            etcd.wait_healthy(i)?;
        }
        Ok(etcd)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Starts member `i` (again, on its data: it rejoins).
    pub fn run(&self, i: usize) -> anyhow::Result<()> {
        let pod = &self.pods[i];
        let ip = pod.ip4;
        let scheme = self.scheme();
        let data = self.w.dir().join(format!("etcd-e{}", i + 1));
        let mut args = vec![
            format!("--name=e{}", i + 1),
            format!("--data-dir={}", data.display()),
            format!(
                "--listen-client-urls={scheme}://{ip}:{CLIENT_PORT},{scheme}://127.0.0.1:{CLIENT_PORT}"
            ),
            format!("--advertise-client-urls={scheme}://{ip}:{CLIENT_PORT}"),
            format!("--listen-peer-urls=http://{ip}:{PEER_PORT}"),
            format!("--initial-advertise-peer-urls=http://{ip}:{PEER_PORT}"),
            format!("--initial-cluster={}", self.cluster),
            "--initial-cluster-state=new".into(),
            "--initial-cluster-token=gofe-e2e".into(),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ];
        if let Some(t) = &self.tls {
            args.extend([
                format!("--cert-file={}", t.cert.display()),
                format!("--key-file={}", t.key.display()),
                format!("--trusted-ca-file={}", t.ca.display()),
                "--client-cert-auth".into(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = pod.spawn_as_app("etcd", "etcd", &args)?;
        self.pids.lock().unwrap()[i] = Some(pid);
        Ok(())
    }

    /// How a test's client connects: with the client certificate under TLS.
    fn options(&self) -> anyhow::Result<Option<etcd_client::ConnectOptions>> {
        self.tls.as_ref().map(Tls::options).transpose()
    }

    pub fn wait_healthy(&self, i: usize) -> anyhow::Result<()> {
        let pod = &self.pods[i];
        let what = format!("etcd member {} healthy", i + 1);
        if self.tls.is_some() {
            let url = format!("https://{}:{CLIENT_PORT}", pod.ip4);
            return eventually(&what, START_TIMEOUT, || {
                let opts = self.options()?;
                let url = url.clone();
                let up = pod.block_on(move || async move {
                    let mut c = etcd_client::Client::connect([url], opts).await?;
                    c.status().await?;
                    anyhow::Ok(())
                })?;
                Ok(up.ok())
            });
        }
        let addr = SocketAddr::from((pod.ip4, CLIENT_PORT));
        eventually(&what, START_TIMEOUT, || {
            Ok(pod
                .in_ns(|| raw_http(addr, "GET", "/health"))?
                .ok()
                .filter(|(s, body)| *s == 200 && body.contains("true"))
                .map(|_| ()))
        })
    }

    /// SIGKILL of member `i`.
    pub fn kill(&self, i: usize) -> anyhow::Result<()> {
        if let Some(pid) = self.pids.lock().unwrap()[i].take() {
            self.w.kill(pid)?;
        }
        Ok(())
    }

    /// GOFE_REGISTRY for this cluster.
    pub fn endpoints(&self) -> String {
        self.pods
            .iter()
            .map(|p| format!("{}://{}:{CLIENT_PORT}", self.scheme(), p.ip4))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `f` with a client of the cluster, from inside member `via`'s pod.
    pub fn with_client<T: Send + 'static>(&self, via: usize, f: ClientJob<T>) -> anyhow::Result<T> {
        self.with_client_as(via, None, f)
    }

    /// As `with_client`, authenticated as `user` (name, password) when given.
    pub fn with_client_as<T: Send + 'static>(
        &self,
        via: usize,
        user: Option<(&str, &str)>,
        f: ClientJob<T>,
    ) -> anyhow::Result<T> {
        let endpoints: Vec<String> = self.endpoints().split(',').map(str::to_string).collect();
        let mut opts = self.options()?;
        if let Some((name, password)) = user {
            opts = Some(
                opts.unwrap_or_default()
                    .with_user(name.to_string(), password.to_string()),
            );
        }
        self.pods[via].block_on(move || async move {
            let client = tokio::time::timeout(
                Duration::from_secs(10),
                etcd_client::Client::connect(&endpoints, opts),
            )
            .await
            .context("connecting to etcd")??;
            tokio::time::timeout(Duration::from_secs(20), f(client))
                .await
                .context("etcd request timed out")?
        })?
    }

    /// The index of the member that leads now.
    pub fn leader(&self) -> anyhow::Result<usize> {
        for (i, pod) in self.pods.iter().enumerate() {
            let url = format!("{}://{}:{CLIENT_PORT}", self.scheme(), pod.ip4);
            let opts = self.options()?;
            let led = pod.block_on(move || async move {
                let mut c = etcd_client::Client::connect([url], opts).await?;
                let s = c.status().await?;
                anyhow::Ok(s.header().map(|h| h.member_id()) == Some(s.leader()))
            })?;
            if led.unwrap_or(false) {
                return Ok(i);
            }
        }
        anyhow::bail!("no member leads")
    }
}
