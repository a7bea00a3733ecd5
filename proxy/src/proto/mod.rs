//! Leaf: the rules of HTTP messages every stage shares: hop-by-hop headers and request
//! target forms, the form a request takes on the mesh hop between proxies, and gRPC's
//! status.

pub mod grpc;
pub mod headers;
pub mod mesh;
