//! Self-registration: once the proxy is ready, this pod's GOFE_REGISTER endpoints are
//! written to etcd, each signed with the mesh key, on one lease kept alive every third
//! of its TTL. The keep-alives run on a thread and runtime of their own, so that a data
//! plane busy to its last core cannot make a live pod's lease expire. A lost lease is
//! registered again, a renewed certificate signs the entries again, and draining
//! revokes the lease (every entry gone at once) before the listeners close.

use crate::config::{RegisterConfig, RegistryConfig};
use crate::ctx::Ctx;
use crate::route::discovery::entry::{self, Claim};
use crate::route::discovery::registry::{self, RegistryError, RegistryStats, within};
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use gofe_identity::SpiffeId;
use gofe_identity::store::CertStore;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// After the entries are deleted, how long the listeners stay open: watchers apply a
/// change within a second, so by then no client picks this pod for a new request.
pub const PROPAGATION: Duration = Duration::from_secs(1);
/// How long draining waits for the lease to be revoked; past it, the lease's TTL
/// removes the entries.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
enum RegisterError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("cannot sign the entry: {0}")]
    Sign(#[from] gofe_identity::signed::SignError),
    #[error("cannot find the address this host reaches etcd from: {0}")]
    Address(std::io::Error),
}

/// What to register and with what.
struct Plan {
    registry: RegistryConfig,
    register: RegisterConfig,
    identity: SpiffeId,
    store: Arc<CertStore>,
    stats: Arc<RegistryStats>,
}

/// The running registration: stopped (and its entries deleted) by `deregister`;
/// dropped without it (the proxy's run abandoned), it stops keeping the lease alive
/// and the entries expire with it, as a killed process's would.
pub struct Registration {
    stop: CancellationToken,
    abandon: CancellationToken,
    done: tokio::sync::Mutex<Option<oneshot::Receiver<bool>>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.abandon.cancel();
    }
}

impl Registration {
    /// Starts registering, if GOFE_REGISTER says to, on a thread of its own.
    pub fn start(ctx: &Ctx) -> Option<Registration> {
        let register = ctx.config.register.clone()?;
        let registry = ctx.config.registry.clone()?;
        let identity = ctx.identity.as_ref()?;
        let stats = ctx.destinations.registry()?.stats.clone();
        let plan = Plan {
            registry,
            register,
            identity: identity.name().clone(),
            store: identity.store.clone(),
            stats,
        };
        let stop = CancellationToken::new();
        let abandon = CancellationToken::new();
        let (tx, rx) = oneshot::channel();
        let token = stop.clone();
        let abandoned = abandon.clone();
        let spawned = std::thread::Builder::new()
            .name("gofe-register".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the registration's runtime");
                let revoked = rt.block_on(async {
                    tokio::select! {
                        r = run(plan, token) => r,
                        _ = abandoned.cancelled() => false,
                    }
                });
                let _ = tx.send(revoked);
            });
        if let Err(error) = spawned {
            warn!(%error, "cannot start the registration thread: not registering");
            return None;
        }
        Some(Registration {
            stop,
            abandon,
            done: tokio::sync::Mutex::new(Some(rx)),
        })
    }

    /// Deletes the entries (revokes the lease) and stops; true if etcd confirmed it.
    pub async fn deregister(&self) -> bool {
        self.stop.cancel();
        let Some(rx) = self.done.lock().await.take() else {
            return false;
        };
        tokio::time::timeout(REVOKE_TIMEOUT + Duration::from_secs(1), rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false)
    }
}

/// Registers until stopped; returns whether the lease was revoked at the end.
async fn run(plan: Plan, stop: CancellationToken) -> bool {
    tokio::select! {
        _ = plan.store.wait_ready() => {}
        _ = stop.cancelled() => return false,
    }
    let ttl = plan.register.ttl;
    let mut failures = 0u32;
    let mut lease: Option<i64> = None;
    let mut address: Option<IpAddr> = plan.register.address;
    loop {
        let attempt = async {
            let mut client = registry::connect(&plan.registry).await?;
            let ip = match address {
                Some(ip) => ip,
                None => {
                    let ip = local_address(&plan.registry).await?;
                    address = Some(ip);
                    ip
                }
            };
            keep(&plan, &mut client, ip, &mut lease, &mut failures, &stop).await
        };
        let result = tokio::select! {
            r = attempt => r,
            _ = stop.cancelled() => Ok(()),
        };
        if stop.is_cancelled() {
            return revoke(&plan.registry, lease).await;
        }
        if let Err(error) = result {
            plan.stats.renewal("failed");
            warn!(%error, lease = ?lease, "registration: etcd unreachable; trying again");
        }
        failures = failures.saturating_add(1);
        let wait = registry::backoff(failures).min(ttl / 3);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return revoke(&plan.registry, lease).await,
        }
    }
}

/// Holds the registration on one connection: the lease (kept if it is still alive,
/// granted anew if not), the entries on it, keep-alives every third of the TTL. Returns
/// when the connection fails (or never, until stopped).
async fn keep(
    plan: &Plan,
    client: &mut Client,
    ip: IpAddr,
    lease: &mut Option<i64>,
    failures: &mut u32,
    stop: &CancellationToken,
) -> Result<(), RegisterError> {
    let ttl = plan.register.ttl;
    loop {
        let id = match *lease {
            Some(id) => id,
            None => {
                let granted = within(client.lease_grant(ttl.as_secs().max(1) as i64, None)).await?;
                let id = granted.id();
                put_entries(plan, client, ip, id).await?;
                *lease = Some(id);
                info!(lease = id, services = plan.register.services.len(), %ip, "registered");
                id
            }
        };
        let mut signed_with = serial(&plan.store);
        let (mut keeper, mut responses) = within(client.lease_keep_alive(id)).await?;
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if stop.is_cancelled() {
                return Ok(());
            }
            within(keeper.keep_alive()).await?;
            let answer = tokio::time::timeout(ttl / 3, responses.message()).await;
            match answer {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    plan.stats.renewal("ok");
                    *failures = 0;
                    debug!(lease = id, ttl = r.ttl(), "lease renewed");
                }
                Ok(Ok(Some(_))) => {
                    // The lease ran out while etcd was away: register again.
                    plan.stats.renewal("expired");
                    warn!(lease = id, "registration lease expired; registering again");
                    *lease = None;
                    break;
                }
                Ok(Ok(None)) => return Err(RegistryError::WatchEnded.into()),
                Ok(Err(e)) => return Err(RegistryError::from(e).into()),
                Err(_) => return Err(RegistryError::Timeout(ttl / 3).into()),
            }
            let now = serial(&plan.store);
            if now != signed_with {
                // A renewed certificate: the entries carry the new chain before the
                // old one expires.
                put_entries(plan, client, ip, id).await?;
                info!(
                    lease = id,
                    "entries signed again with the renewed certificate"
                );
                signed_with = now;
            }
        }
    }
}

fn serial(store: &CertStore) -> Option<String> {
    store.current().map(|h| h.info.serial.clone())
}

/// Writes every entry, signed, on `lease`, in one transaction.
async fn put_entries(
    plan: &Plan,
    client: &mut Client,
    ip: IpAddr,
    lease: i64,
) -> Result<(), RegisterError> {
    let mut ops = Vec::new();
    for r in &plan.register.services {
        let address = SocketAddr::new(ip, r.port);
        let key = format!("{}{address}", plan.registry.service_prefix(&r.service));
        let claim = Claim {
            address,
            identity: plan.identity.to_string(),
            weight: r.weight,
            metadata: plan.register.metadata.clone(),
        };
        let value = entry::sign(&key, &claim, &plan.store)?;
        ops.push(TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease)),
        ));
    }
    within(client.txn(Txn::new().and_then(ops))).await?;
    Ok(())
}

/// Revokes the lease (deleting every entry on it); true if etcd confirmed.
async fn revoke(cfg: &RegistryConfig, lease: Option<i64>) -> bool {
    let Some(id) = lease else { return false };
    let attempt = async {
        let mut client = registry::connect(cfg).await?;
        within(client.lease_revoke(id)).await?;
        Ok::<_, RegistryError>(())
    };
    match tokio::time::timeout(REVOKE_TIMEOUT, attempt).await {
        Ok(Ok(())) => {
            info!(lease = id, "deregistered");
            true
        }
        Ok(Err(error)) => {
            warn!(%error, lease = id, "cannot deregister: the entries go when the lease expires");
            false
        }
        Err(_) => {
            warn!(
                lease = id,
                "deregistration timed out: the entries go when the lease expires"
            );
            false
        }
    }
}

/// The address this host uses to reach etcd's first endpoint: the pod's address on
/// the network etcd is on (a UDP connect sends nothing; it only picks the route).
async fn local_address(cfg: &RegistryConfig) -> Result<IpAddr, RegisterError> {
    let first = &cfg.endpoints[0];
    let authority = first
        .split_once("://")
        .map_or(first.as_str(), |(_, rest)| rest)
        .trim_end_matches('/');
    let target = tokio::net::lookup_host(authority)
        .await
        .map_err(RegisterError::Address)?
        .next()
        .ok_or_else(|| {
            RegisterError::Address(std::io::Error::other(format!("{authority} has no address")))
        })?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("an address")
    } else {
        "[::]:0".parse().expect("an address")
    };
    let socket = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(RegisterError::Address)?;
    socket
        .connect(target)
        .await
        .map_err(RegisterError::Address)?;
    Ok(socket.local_addr().map_err(RegisterError::Address)?.ip())
}
