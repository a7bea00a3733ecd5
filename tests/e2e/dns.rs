//! A real DNS server for discovery tests: hickory-server, authoritative for one zone,
//! on 127.0.0.1:53 inside a pod (where the harness's resolv.conf sends every lookup),
//! with A records the test changes while it runs.

use hickory_server::Server;
use hickory_server::proto::rr::rdata::{A, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use std::fs::File;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The TTL of the test's records: short, so that changes are seen soon.
pub const TTL: u32 = 1;

pub struct DnsServer {
    origin: Name,
    zone: Arc<InMemoryZoneHandler>,
    serial: AtomicU32,
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsServer {
    /// Serves `origin` (e.g. `dns.test.`) on 127.0.0.1:53 in network namespace `ns`.
    pub fn start(ns: &str, origin: &str) -> anyhow::Result<DnsServer> {
        let netns = File::open(format!("/run/netns/{ns}"))?;
        let origin = Name::from_str(origin)?;
        let mut zone =
            InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            Name::from_str("ns")?.append_domain(&origin)?,
            Name::from_str("admin")?.append_domain(&origin)?,
            1,
            60,
            60,
            600,
            TTL,
        );
        zone.upsert_mut(Record::from_rdata(origin.clone(), TTL, RData::SOA(soa)), 1);
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::new(&origin),
            vec![zone.clone() as Arc<dyn ZoneHandler>],
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ready = ready_tx.clone();
            let result = (move || -> anyhow::Result<()> {
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?;
                let handle = rt.handle().clone();
                rt.block_on(async move {
                    let mut server = Server::new(catalog);
                    server.register_socket(tokio::net::UdpSocket::bind("127.0.0.1:53").await?);
                    server.register_listener(
                        tokio::net::TcpListener::bind("127.0.0.1:53").await?,
                        Duration::from_secs(5),
                        4096,
                    );
                    let _ = ready.send(Ok(handle));
                    let _ = stopped.await;
                    let _ = server.shutdown_gracefully().await;
                    Ok(())
                })
            })();
            if let Err(e) = result {
                let _ = ready_tx.send(Err(e));
            }
        });
        let handle = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow::anyhow!("the DNS server did not start"))??;
        Ok(DnsServer {
            origin,
            zone,
            serial: AtomicU32::new(1),
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Makes `name` (relative to the zone, or absolute with a final dot) resolve to
    /// exactly `ips`; none removes the name.
    pub fn set_a(&self, name: &str, ips: &[Ipv4Addr]) -> anyhow::Result<()> {
        let name = Name::from_str(name)?;
        let name = if name.is_fqdn() {
            name
        } else {
            name.append_domain(&self.origin)?
        };
        let ips = ips.to_vec();
        let serial = self.serial.fetch_add(1, Ordering::SeqCst) + 1;
        let zone = self.zone.clone();
        self.handle.block_on(async move {
            zone.records_mut()
                .await
                .remove(&RrKey::new(LowerName::new(&name), RecordType::A));
            for ip in ips {
                zone.upsert(
                    Record::from_rdata(name.clone(), TTL, RData::A(A(ip))),
                    serial,
                )
                .await;
            }
        });
        Ok(())
    }

    /// Stops answering (the port closes): lookups fail.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
