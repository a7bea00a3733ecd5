//! The end-to-end world: "pods" are network namespaces joined by veths to a bridge in a
//! namespace of their own; a pod with a sidecar gets `gofe init`'s rules and a real
//! `gofe proxy` running as UID 2102, and its applications run as UID 3000.
//!
//! Isolation: before any test thread starts, the test process moves into a private
//! mount and network namespace and mounts a tmpfs on /run. Every namespace a test
//! makes is therefore named under that private /run/netns (names carry the test's
//! name, so tests run in parallel), and none of it outlives the process: a test's
//! `World` kills its processes and deletes its namespaces when dropped, and if the
//! process dies, its mount namespace and everything named in it go with it.

mod capture;
mod http;
mod pod;
mod setup;
mod world;

pub use capture::Capture;
pub use http::{Metrics, raw_http};
pub use pod::{App, Pod, PodBuilder};
pub use setup::{eventually, gofe_bin, has_tool, init, sh, testapp_bin};
pub use world::{ISSUER_PORT, Issuer, World};

pub const PROXY_UID: u32 = 2102;
pub const APP_UID: u32 = 3000;
pub const ADMIN_PORT: u16 = 4191;
