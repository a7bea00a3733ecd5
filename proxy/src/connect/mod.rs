//! Stage 10: connections to endpoints. The one outbound-TLS decision (`tls`), TCP
//! (`tcp`), and the connector that carries the decision out and counts its failures.

pub mod connector;
pub mod error;
pub mod tcp;
pub mod tls;
