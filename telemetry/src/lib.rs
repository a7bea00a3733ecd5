//! gofe's telemetry: a metrics registry whose label sets are bounded, the Prometheus
//! text exposition of it, and the process's logging setup. The proxy calls into this
//! crate; this crate knows nothing of the proxy.
#![forbid(unsafe_code)]

pub mod logs;
pub mod metrics;
pub mod process;
pub mod prom;
