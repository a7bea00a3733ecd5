//! The access log (`GOFE_ACCESS_LOG=json`): one JSON object per line on stdout for
//! each request, and for each connection that is not HTTP, apart from the process's
//! own log on stderr.

use std::io::Write;

/// Writes one access log entry. A write that fails (stdout closed) is dropped: the
/// access log never fails a request.
pub fn write(entry: &serde_json::Value) {
    let mut line = entry.to_string();
    line.push('\n');
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
}

/// `at` as RFC 3339 UTC with milliseconds, for the entries' `timestamp`.
pub fn timestamp(at: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}
