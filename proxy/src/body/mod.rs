//! Leaf: the bodies the proxy passes on. Requests go upstream as the client's own
//! streaming body, or as one attempt's view of a body kept for retries; responses come
//! back with a hook that runs once when they end.

/// An error of any body, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub mod h2;
pub mod replay;
pub mod request;
pub mod response;
pub mod source;
