//! The connections requests reuse, per endpoint: idle HTTP/1 connections (most recently
//! used first), one multiplexed HTTP/2 connection in plaintext, and one over mesh mTLS
//! to the endpoint's proxy. Pools nobody used for the idle timeout are forgotten.

use crate::addrs::EndpointAddr;
use crate::body::request::RequestBody;
use crate::connect::error::ConnectError;
use gofe_identity::SpiffeId;
use hyper::client::conn::{http1, http2};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A connection between proxies is replaced after this long, so that both ends present
/// (and check) current certificates and identities at least this often.
const MESH_CONNECTION_MAX_AGE: Duration = Duration::from_secs(300);

/// The identity of the peer proxy a connection reaches, when it is meshed.
pub type Peer = Option<Arc<SpiffeId>>;

/// Which pool a connection lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Http1,
    Http2,
    /// HTTP/2 over mesh TLS to another proxy.
    Mesh,
}

/// An HTTP/1 connection lent to one request; `release` gives it back to its pool once
/// the response body has been read to the end, if the request body was sent to the end
/// too (otherwise the connection is mid-message and is closed instead).
pub struct Checkin {
    pool: Arc<Pool>,
    tx: http1::SendRequest<RequestBody>,
    request_ended: Arc<AtomicBool>,
}

impl Checkin {
    pub fn new(
        pool: Arc<Pool>,
        tx: http1::SendRequest<RequestBody>,
        request_ended: Arc<AtomicBool>,
    ) -> Self {
        Self {
            pool,
            tx,
            request_ended,
        }
    }

    pub fn release(self) {
        if self.request_ended.load(Ordering::Acquire) && !self.tx.is_closed() {
            self.pool.h1_idle.lock().push(IdleH1 {
                tx: self.tx,
                since: Instant::now(),
            });
        }
    }
}

struct IdleH1 {
    tx: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// An HTTP/2 connection, the identity its peer presented, and when it was made.
type H2Conn = (http2::SendRequest<RequestBody>, Peer, Instant);

/// The connections to one endpoint of one kind.
pub struct Pool {
    pub addr: EndpointAddr,
    h1_idle: Mutex<Vec<IdleH1>>,
    h2: Mutex<Option<H2Conn>>,
    /// Connections older than this are not used for new requests.
    max_age: Option<Duration>,
    /// Held while an HTTP/2 connection is being made, so concurrent requests share it.
    pub h2_connecting: tokio::sync::Mutex<()>,
    /// When the last HTTP/2 connect failed, and why: requests that waited for it fail
    /// with it rather than each trying again for a whole connect timeout.
    pub h2_failed: Mutex<Option<(Instant, ConnectError)>>,
    /// Milliseconds since `EPOCH` of the last request: an atomic, as every request
    /// stores it.
    last_used: AtomicU64,
}

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

impl Pool {
    fn new(addr: EndpointAddr, kind: Kind) -> Self {
        Self {
            addr,
            h1_idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            max_age: (kind == Kind::Mesh).then_some(MESH_CONNECTION_MAX_AGE),
            h2_connecting: tokio::sync::Mutex::new(()),
            h2_failed: Mutex::new(None),
            last_used: AtomicU64::new(now_ms()),
        }
    }

    /// The most recently used idle connection that is still open and fresh. LIFO keeps
    /// a few connections hot and lets the rest age out.
    pub fn take_idle(&self, idle_timeout: Duration) -> Option<http1::SendRequest<RequestBody>> {
        let mut idle = self.h1_idle.lock();
        while let Some(conn) = idle.pop() {
            if !conn.tx.is_closed() && conn.since.elapsed() < idle_timeout {
                return Some(conn.tx);
            }
        }
        None
    }

    /// The HTTP/2 connection to use, if there is one that is open, young enough, and
    /// (when `expected` is given) made to a peer that presented that identity.
    pub fn cached_h2(
        &self,
        expected: Option<&SpiffeId>,
    ) -> Option<(http2::SendRequest<RequestBody>, Peer)> {
        let mut h2 = self.h2.lock();
        match h2.as_ref() {
            Some((tx, peer, made))
                if !tx.is_closed()
                    && self.max_age.is_none_or(|max| made.elapsed() < max)
                    && expected.is_none_or(|e| peer.as_deref() == Some(e)) =>
            {
                Some((tx.clone(), peer.clone()))
            }
            // Closed, too old, or made for another identity than the one now expected:
            // requests in flight finish on it; new ones get a new connection.
            Some(_) => {
                *h2 = None;
                None
            }
            None => None,
        }
    }

    pub fn set_h2(&self, tx: http2::SendRequest<RequestBody>, peer: Peer) {
        *self.h2.lock() = Some((tx, peer, Instant::now()));
    }

    /// Forgets the HTTP/2 connection if it has closed.
    pub fn drop_closed_h2(&self) {
        let mut h2 = self.h2.lock();
        if h2.as_ref().is_some_and(|(cur, _, _)| cur.is_closed()) {
            *h2 = None;
        }
    }

    fn touch(&self) {
        self.last_used.store(now_ms(), Ordering::Relaxed);
    }
}

/// Every endpoint's pools.
pub struct Pools {
    idle_timeout: Duration,
    pools: RwLock<HashMap<(EndpointAddr, Kind), Arc<Pool>>>,
}

impl Pools {
    pub fn new(idle_timeout: Duration) -> Self {
        Self {
            idle_timeout,
            pools: RwLock::new(HashMap::new()),
        }
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    pub fn get(&self, addr: EndpointAddr, kind: Kind) -> Arc<Pool> {
        // The read guard must be gone before the write lock is taken.
        let found = self.pools.read().get(&(addr, kind)).cloned();
        let pool = match found {
            Some(p) => p,
            None => self
                .pools
                .write()
                .entry((addr, kind))
                .or_insert_with(|| Arc::new(Pool::new(addr, kind)))
                .clone(),
        };
        pool.touch();
        pool
    }

    /// Closes idle connections past the idle timeout and forgets pools unused for as
    /// long.
    pub fn sweep(&self) {
        let now = Instant::now();
        let idle_ms = self.idle_timeout.as_millis() as u64;
        self.pools.write().retain(|_, pool| {
            pool.h1_idle
                .lock()
                .retain(|c| !c.tx.is_closed() && now.duration_since(c.since) < self.idle_timeout);
            let unused = now_ms().saturating_sub(pool.last_used.load(Ordering::Relaxed)) >= idle_ms;
            if unused {
                // Requests still streaming keep their connection; no new ones will come.
                pool.h2.lock().take();
            }
            !(unused && pool.h1_idle.lock().is_empty())
        });
    }

    /// How often `sweep` should run.
    pub fn sweep_interval(&self) -> Duration {
        (self.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(15))
    }

    /// Idle HTTP/1 connections to `addr`.
    pub fn idle_count(&self, addr: EndpointAddr) -> usize {
        self.pools
            .read()
            .get(&(addr, Kind::Http1))
            .map(|p| p.h1_idle.lock().len())
            .unwrap_or(0)
    }
}
