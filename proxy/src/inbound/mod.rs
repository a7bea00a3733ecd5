//! Stage 3b: inbound connections from the mesh. Who may come in (`authorize`), and
//! the termination of another proxy's mTLS (`tls`).

pub mod authorize;
pub mod tls;
