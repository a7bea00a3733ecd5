//! Stage 5: where traffic goes. A connection's target (`target`); outbound, the
//! destination a request or connection is for (`destinations`, each a `destination`
//! with its endpoints from `discovery`, its policy from `policies`, and its stacks);
//! inbound, the application's port (`inbound`).

pub mod destination;
pub mod destinations;
pub mod discovery;
pub mod inbound;
pub mod policies;
pub mod routes;
pub mod split;
pub mod target;
