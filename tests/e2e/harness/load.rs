//! Steady legitimate traffic from inside a pod, for the attack and chaos cases: a fixed
//! rate of HTTP/1.1 GETs over a few keep-alive connections (reconnecting after an
//! error), each request counted as a success or a failure (an error, a 5xx, or no
//! answer within its deadline).

use super::pod::Pod;
use anyhow::anyhow;
use std::fs::File;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long one request may take before it counts as failed.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Keep-alive connections the load is spread over (by default).
const CONNECTIONS: u32 = 8;

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// Traffic running on a thread of its own, in a pod's network namespace.
pub struct Steady {
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    started: Instant,
}

/// What the traffic came to.
#[derive(Debug)]
pub struct Outcome {
    pub ok: u64,
    pub failed: u64,
    /// The first few failures, for the report.
    pub errors: Vec<String>,
    /// How long the traffic ran.
    pub elapsed: Duration,
}

impl Outcome {
    pub fn success_ratio(&self) -> f64 {
        self.ok as f64 / (self.ok + self.failed).max(1) as f64
    }

    /// Requests sent, answered or not.
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }

    /// Requests a second, on average.
    pub fn rate(&self) -> f64 {
        self.total() as f64 / self.elapsed.as_secs_f64().max(0.001)
    }
}

impl Steady {
    /// `rate` requests a second from `pod` to `target`, for `path` with `host`.
    pub fn start(
        pod: &Pod<'_>,
        target: (Ipv4Addr, u16),
        rate: u32,
        host: &str,
        path: &str,
    ) -> anyhow::Result<Steady> {
        Self::start_with(pod, target, rate, host, path, CONNECTIONS)
    }

    /// As `start`, over `connections` keep-alive connections (a rate that one
    /// connection's round trips cannot carry, or slow answers, need more).
    pub fn start_with(
        pod: &Pod<'_>,
        target: (Ipv4Addr, u16),
        rate: u32,
        host: &str,
        path: &str,
        connections: u32,
    ) -> anyhow::Result<Steady> {
        let netns = File::open(format!("/run/netns/{}", pod.ns))?;
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counts.clone(), stop.clone());
        let (host, path) = (host.to_string(), path.to_string());
        let thread = std::thread::spawn(move || {
            if nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                return;
            }
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let every = Duration::from_secs_f64(f64::from(connections) / f64::from(rate));
                let tasks: Vec<_> = (0..connections)
                    .map(|_| {
                        let (c, s) = (c.clone(), s.clone());
                        let (host, path) = (host.clone(), path.clone());
                        tokio::spawn(async move {
                            connection(target, every, &host, &path, &c, &s).await
                        })
                    })
                    .collect();
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        Ok(Steady {
            counts,
            stop,
            thread: Some(thread),
            started: Instant::now(),
        })
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.counts.ok.load(Ordering::Relaxed)
    }

    /// Requests failed so far.
    pub fn failed(&self) -> u64 {
        self.counts.failed.load(Ordering::Relaxed)
    }

    pub fn stop(mut self) -> anyhow::Result<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .map_err(|_| anyhow!("the load thread panicked"))?;
        Ok(Outcome {
            ok: self.counts.ok.load(Ordering::Relaxed),
            failed: self.counts.failed.load(Ordering::Relaxed),
            errors: self.counts.errors.lock().unwrap().clone(),
            elapsed: self.started.elapsed(),
        })
    }
}

impl Drop for Steady {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One keep-alive connection's share of the load.
async fn connection(
    target: (Ipv4Addr, u16),
    every: Duration,
    host: &str,
    path: &str,
    counts: &Counts,
    stop: &AtomicBool,
) {
    use http_body_util::BodyExt;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tx: Option<
        hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    > = None;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let attempt = async {
            if tx.as_ref().is_none_or(|t| t.is_closed()) {
                let tcp = tokio::net::TcpStream::connect(target).await?;
                let (t, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                        .await?;
                tokio::spawn(conn);
                tx = Some(t);
            }
            let t = tx.as_mut().expect("connected");
            t.ready().await?;
            let req = http::Request::get(path)
                .header("host", host)
                .body(http_body_util::Empty::new())?;
            let rsp = t.send_request(req).await?;
            let status = rsp.status();
            let body = rsp.into_body().collect().await?.to_bytes();
            anyhow::ensure!(
                !status.is_server_error(),
                "status {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(120)]).trim()
            );
            anyhow::Ok(())
        };
        match tokio::time::timeout(REQUEST_DEADLINE, attempt).await {
            Ok(Ok(())) => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
            }
            failed => {
                tx = None;
                counts.failed.fetch_add(1, Ordering::Relaxed);
                let why = match failed {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => "no answer within 5 s".into(),
                };
                let mut errors = counts.errors.lock().unwrap();
                if errors.len() < 5 {
                    errors.push(why);
                }
            }
        }
    }
}
