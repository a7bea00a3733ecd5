//! The access log (`GOFE_ACCESS_LOG=json`): one JSON object per line on stdout for
//! each request, and for each connection that is not HTTP, apart from the process's
//! own log on stderr.

use crate::metrics::Counter;
use std::io::Write;
use std::sync::OnceLock;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

/// Lines waiting for the writer at most; past that (stdout blocked) they are dropped.
const QUEUE: usize = 4096;

struct Writer {
    lines: SyncSender<String>,
    dropped: Counter,
}

/// The writer thread, started on first use: a blocked stdout (a log reader that stops
/// reading) blocks it, never a request.
fn writer() -> &'static Writer {
    static WRITER: OnceLock<Writer> = OnceLock::new();
    WRITER.get_or_init(|| {
        let (lines, rx) = sync_channel::<String>(QUEUE);
        let _ = std::thread::Builder::new()
            .name("gofe-access-log".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                for line in rx {
                    let mut out = stdout.lock();
                    // A write that fails (stdout closed) loses the line, nothing more.
                    let _ = out.write_all(line.as_bytes());
                    let _ = out.flush();
                }
            });
        Writer {
            lines,
            dropped: Counter::default(),
        }
    })
}

/// Queues one access log entry for stdout.
pub fn write(entry: &serde_json::Value) {
    let mut line = entry.to_string();
    line.push('\n');
    let w = writer();
    match w.lines.try_send(line) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => w.dropped.inc(),
    }
}

/// Entries dropped because stdout did not keep up.
pub fn dropped() -> u64 {
    writer().dropped.get()
}

/// `at` as RFC 3339 UTC with milliseconds, for the entries' `timestamp`.
pub fn timestamp(at: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}
