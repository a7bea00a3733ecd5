//! A destinations file kept parsed: read at start-up (where a mistake stops the proxy),
//! then looked at every second; a version that parses replaces the table, one that
//! does not is logged and the last good one stays.

use crate::config::file::{FileError, Table};
use gofe_telemetry::metrics::Counter;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// How often a watched file is looked at.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse { path: PathBuf, source: FileError },
}

/// A number that goes up whenever a source of policy changes (a file reloaded, a
/// document pushed by the registry), waking whoever waits for it: destinations look at
/// their policy again, discovery at the identities a policy allows.
#[derive(Clone, Default)]
pub struct Generation {
    /// Read for every request (a plain atomic load on the hot path)...
    counter: Arc<AtomicU64>,
    /// ...and announced to the few that wait for a change.
    changed: Arc<watch::Sender<()>>,
}

impl Generation {
    pub fn bump(&self) {
        self.counter.fetch_add(1, Ordering::AcqRel);
        self.changed.send_replace(());
    }

    pub fn get(&self) -> u64 {
        self.counter.load(Ordering::Acquire)
    }

    /// Sees every bump after this call.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }
}

/// A file kept parsed: the current table, replaced when the file changes and parses.
pub struct Watched {
    pub path: PathBuf,
    rx: watch::Receiver<Arc<Table>>,
    /// Reloads of a changed file, taken and refused.
    pub reloads: Arc<Reloads>,
}

#[derive(Debug, Default)]
pub struct Reloads {
    pub ok: Counter,
    pub refused: Counter,
}

impl Watched {
    /// Reads `path` now and returns the watcher and the task that keeps it current.
    /// `generation` goes up with every reload.
    pub fn start(
        path: &Path,
        base: HashMap<String, String>,
        generation: Generation,
    ) -> Result<
        (
            Watched,
            impl std::future::Future<Output = ()> + Send + 'static,
        ),
        WatchError,
    > {
        let text = std::fs::read_to_string(path).map_err(|source| WatchError::Read {
            path: path.to_owned(),
            source,
        })?;
        let table = Table::parse(&text, &base).map_err(|source| WatchError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let (tx, rx) = watch::channel(Arc::new(table));
        let owned = path.to_owned();
        let reloads = Arc::new(Reloads::default());
        let counts = reloads.clone();
        let task = async move {
            let mut last = text.into_bytes();
            let mut tick = tokio::time::interval(RELOAD_INTERVAL);
            loop {
                tick.tick().await;
                let Ok(bytes) = tokio::fs::read(&owned).await else {
                    continue;
                };
                if bytes == last {
                    continue;
                }
                // A reload (policy or destinations) is an operation span, with the
                // refusal as its error.
                let span = tracing::info_span!(
                    target: gofe_telemetry::ops::TARGET,
                    "config.reload",
                    path = %owned.display(),
                    otel.status_code = tracing::field::Empty,
                );
                let _entered = span.enter();
                // An empty file is refused, not read as "no policy": a writer that
                // truncates before it writes shows one for a moment (the chaos case
                // lost requests to it). `destinations: []` clears a file on purpose.
                let parsed = match std::str::from_utf8(&bytes) {
                    Err(e) => Err(format!("not UTF-8 text: {e}")),
                    Ok(text) if text.trim().is_empty() => {
                        Err("the file is empty (write `destinations: []` to clear it)".to_string())
                    }
                    Ok(text) => Table::parse(text, &base).map_err(|e| e.to_string()),
                };
                match parsed {
                    Ok(table) => {
                        info!(path = %owned.display(), destinations = table.destinations.len(), "file reloaded");
                        tx.send_replace(Arc::new(table));
                        generation.bump();
                        counts.ok.inc();
                    }
                    Err(error) => {
                        span.record("otel.status_code", "ERROR");
                        counts.refused.inc();
                        warn!(path = %owned.display(), %error, "keeping the last good version of the file")
                    }
                }
                last = bytes;
            }
        };
        Ok((
            Watched {
                path: path.to_owned(),
                rx,
                reloads,
            },
            task,
        ))
    }

    pub fn current(&self) -> Arc<Table> {
        self.rx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Table>> {
        self.rx.clone()
    }
}
