//! gofe's telemetry: a metrics registry whose label sets are bounded, latency
//! histograms over hdrhistogram, the Prometheus text exposition of them, OpenTelemetry
//! traces with W3C and B3 context propagation, access logs, and the process's logging
//! setup. The proxy calls into this crate; this crate knows nothing of the proxy.
#![forbid(unsafe_code)]

pub mod access;
pub mod latency;
pub mod logs;
pub mod metrics;
pub mod ops;
pub mod process;
pub mod prom;
pub mod trace;
