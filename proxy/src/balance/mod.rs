//! Stage 7: balancing a destination's attempts over its endpoints (`balancer`, as a
//! layer in `layer`), from each endpoint's state (`state`): its latency estimate
//! (`ewma`) and its outlier record (`outlier`); active health checks (`health`).

pub mod balancer;
pub mod ewma;
pub mod health;
pub mod layer;
pub mod outlier;
pub mod state;
