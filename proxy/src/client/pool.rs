//! The connections requests reuse, per endpoint: idle HTTP/1 connections (most recently
//! used first), one multiplexed HTTP/2 connection in plaintext, and one over mesh mTLS
//! to the endpoint's proxy. Pools nobody used for the idle timeout are forgotten.

use crate::addrs::EndpointAddr;
use crate::body::request::RequestBody;
use crate::connect::error::ConnectError;
use bytes::Bytes;
use gofe_identity::SpiffeId;
use hyper::client::conn::http1;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A connection between proxies is replaced after this long, so that both ends present
/// (and check) current certificates and identities at least this often.
const MESH_CONNECTION_MAX_AGE: Duration = Duration::from_secs(300);

/// HTTP/2 connections to one endpoint at most: another is opened when every one is at
/// the peer's stream limit, and past this many a request fails at once (503,
/// gofe-overloaded) rather than queue without bound inside the client.
pub const MAX_H2_CONNECTIONS: usize = 8;

/// Idle HTTP/1 connections kept per endpoint: enough for a burst to find warm ones,
/// few enough that a burst's aftermath does not hold hundreds of sockets.
const MAX_IDLE_H1: usize = 64;

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
            let mut idle = self.pool.h1_idle.lock();
            if idle.len() < MAX_IDLE_H1 {
                idle.push(IdleH1 {
                    tx: self.tx,
                    since: Instant::now(),
                });
            }
        }
    }
}

struct IdleH1 {
    tx: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// One HTTP/2 connection's handle for opening streams (the h2 crate's), and whether
/// the connection is known to be gone (its task ended, or it refused a new stream:
/// GOAWAY).
#[derive(Clone)]
pub struct H2Sender {
    pub tx: h2::client::SendRequest<Bytes>,
    pub closed: Arc<AtomicBool>,
}

impl H2Sender {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// An HTTP/2 connection, the identity its peer presented, when it was made, and its
/// streams open.
struct H2Conn {
    tx: H2Sender,
    peer: Peer,
    made: Instant,
    streams: Arc<AtomicUsize>,
}

/// A stream counted against its connection's limit until dropped (with the response
/// body, or the failed request).
pub struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the pool has for a request.
pub enum H2Pick {
    /// A connection with room for one more stream.
    Ready(H2Sender, Peer, StreamSlot),
    /// None with room: another connection may be made.
    Connect,
    /// Every connection it may have is at the stream limit.
    Full,
}

/// The connections to one endpoint of one kind.
pub struct Pool {
    pub addr: EndpointAddr,
    h1_idle: Mutex<Vec<IdleH1>>,
    h2: Mutex<Vec<H2Conn>>,
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
            h2: Mutex::new(Vec::new()),
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

    /// A connection for one more stream: open, young enough, made to a peer that
    /// presented `expected` (when given), and under `max_streams` streams. Connections
    /// that are closed, too old or made for another identity are forgotten (requests in
    /// flight finish on them).
    pub fn pick_h2(&self, expected: Option<&SpiffeId>, max_streams: u32) -> H2Pick {
        let mut conns = self.h2.lock();
        conns.retain(|c| {
            !c.tx.is_closed()
                && self.max_age.is_none_or(|max| c.made.elapsed() < max)
                && expected.is_none_or(|e| c.peer.as_deref() == Some(e))
        });
        for c in conns.iter() {
            if c.streams.fetch_add(1, Ordering::AcqRel) < max_streams as usize {
                let slot = StreamSlot(c.streams.clone());
                return H2Pick::Ready(c.tx.clone(), c.peer.clone(), slot);
            }
            c.streams.fetch_sub(1, Ordering::AcqRel);
        }
        if conns.len() < MAX_H2_CONNECTIONS {
            H2Pick::Connect
        } else {
            H2Pick::Full
        }
    }

    /// Adds a new connection, with its first stream taken.
    pub fn add_h2(&self, tx: H2Sender, peer: Peer) -> (H2Sender, Peer, StreamSlot) {
        let streams = Arc::new(AtomicUsize::new(1));
        let slot = StreamSlot(streams.clone());
        self.h2.lock().push(H2Conn {
            tx: tx.clone(),
            peer: peer.clone(),
            made: Instant::now(),
            streams,
        });
        (tx, peer, slot)
    }

    /// Forgets the HTTP/2 connections that have closed.
    pub fn drop_closed_h2(&self) {
        self.h2.lock().retain(|c| !c.tx.is_closed());
    }

    fn touch(&self) {
        self.last_used.store(now_ms(), Ordering::Relaxed);
    }
}

/// Every endpoint's pools.
pub struct Pools {
    idle_timeout: Duration,
    pools: RwLock<HashMap<(EndpointAddr, Kind), Arc<Pool>, foldhash::fast::RandomState>>,
}

impl Pools {
    pub fn new(idle_timeout: Duration) -> Self {
        Self {
            idle_timeout,
            pools: RwLock::new(HashMap::default()),
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
                pool.h2.lock().clear();
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
