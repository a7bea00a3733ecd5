//! A real etcd for the registry's cases: Debian's etcd-server, one member per pod (so a
//! member can be killed alone, as a leader is), its data under the test's directory,
//! killed with the world. A test talks to it with etcd-client from inside a member's
//! pod.

use crate::cases::Skip;
use crate::harness::{Pod, World, eventually, raw_http};
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

pub const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
/// A member (or a whole cluster) takes a few seconds to elect a leader.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Etcd<'w> {
    w: &'w World,
    pub pods: Vec<Pod<'w>>,
    cluster: String,
    pids: Mutex<Vec<Option<u32>>>,
}

impl<'w> Etcd<'w> {
    /// A cluster of `members` (1 or 3), started and healthy.
    pub fn start(w: &'w World, members: usize) -> anyhow::Result<Etcd<'w>> {
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
        let etcd = Etcd {
            w,
            pods,
            cluster,
            pids: Mutex::new(vec![None; members]),
        };
        for i in 0..members {
            etcd.run(i)?;
        }
        for i in 0..members {
            etcd.wait_healthy(i)?;
        }
        Ok(etcd)
    }

    /// Starts member `i` (again, on its data: it rejoins).
    pub fn run(&self, i: usize) -> anyhow::Result<()> {
        let pod = &self.pods[i];
        let ip = pod.ip4;
        let data = self.w.dir().join(format!("etcd-e{}", i + 1));
        let args = [
            format!("--name=e{}", i + 1),
            format!("--data-dir={}", data.display()),
            format!(
                "--listen-client-urls=http://{ip}:{CLIENT_PORT},http://127.0.0.1:{CLIENT_PORT}"
            ),
            format!("--advertise-client-urls=http://{ip}:{CLIENT_PORT}"),
            format!("--listen-peer-urls=http://{ip}:{PEER_PORT}"),
            format!("--initial-advertise-peer-urls=http://{ip}:{PEER_PORT}"),
            format!("--initial-cluster={}", self.cluster),
            "--initial-cluster-state=new".into(),
            "--initial-cluster-token=gofe-e2e".into(),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = pod.spawn_as_app("etcd", "etcd", &args)?;
        self.pids.lock().unwrap()[i] = Some(pid);
        Ok(())
    }

    pub fn wait_healthy(&self, i: usize) -> anyhow::Result<()> {
        let pod = &self.pods[i];
        let addr = SocketAddr::from((pod.ip4, CLIENT_PORT));
        eventually(
            &format!("etcd member {} healthy", i + 1),
            START_TIMEOUT,
            || {
                Ok(pod
                    .in_ns(|| raw_http(addr, "GET", "/health"))?
                    .ok()
                    .filter(|(s, body)| *s == 200 && body.contains("true"))
                    .map(|_| ()))
            },
        )
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
            .map(|p| format!("http://{}:{CLIENT_PORT}", p.ip4))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `f` with a client of the cluster, from inside member `via`'s pod.
    pub fn with_client<T: Send, F>(&self, via: usize, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(
                etcd_client::Client,
            )
                -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<T>> + Send>>
            + Send,
    {
        let endpoints: Vec<String> = self.endpoints().split(',').map(str::to_string).collect();
        self.pods[via].block_on(move || async move {
            let client = tokio::time::timeout(
                Duration::from_secs(10),
                etcd_client::Client::connect(&endpoints, None),
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
            let url = format!("http://{}:{CLIENT_PORT}", pod.ip4);
            let led = pod.block_on(move || async move {
                let mut c = etcd_client::Client::connect([url], None).await?;
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
