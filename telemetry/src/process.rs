//! The standard `process_*` metrics (as the Prometheus client libraries export them),
//! read from `/proc/self`.

use crate::prom::{Exposition, Kind};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// The kernel reports CPU times in USER_HZ ticks, 100 a second on every Linux
/// architecture that gofe runs on.
const TICKS_PER_SECOND: f64 = 100.0;
const PAGE_SIZE: u64 = 4096;

static START: OnceLock<f64> = OnceLock::new();

/// Records the process start time; call early in `main`.
pub fn mark_start() {
    START.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    });
}

/// Writes CPU time, resident memory, open file descriptors and start time.
pub fn render(e: &mut Exposition) {
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name, which is parenthesised and may hold spaces.
        if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let cpu = (ticks(11) + ticks(12)) as f64 / TICKS_PER_SECOND;
            e.family(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                Kind::Counter,
            );
            e.sample("process_cpu_seconds_total", &[], cpu);
            // rss (pages) is field 24.
            let rss = ticks(21) * PAGE_SIZE;
            e.family(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                Kind::Gauge,
            );
            e.sample("process_resident_memory_bytes", &[], rss);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        e.family(
            "process_open_fds",
            "Number of open file descriptors.",
            Kind::Gauge,
        );
        e.sample("process_open_fds", &[], fds.count());
    }
    if let Some(start) = START.get() {
        e.family(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            Kind::Gauge,
        );
        e.sample("process_start_time_seconds", &[], start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        mark_start();
        let mut e = Exposition::new();
        render(&mut e);
        let text = e.finish();
        let rss: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .expect("rss line")
            .parse()
            .unwrap();
        assert!(rss > 0.0, "{text}");
        assert!(text.contains("process_open_fds "), "{text}");
        assert!(text.contains("process_start_time_seconds "), "{text}");
    }
}
