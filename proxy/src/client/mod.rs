//! Stage 9: clients of endpoints. Requests reuse pooled connections (`pool`): HTTP/1
//! one request at a time (`h1`), HTTP/2 multiplexed (`h2`), between proxies HTTP/2 over
//! mTLS; `send` picks the pool by the outbound-TLS decision.

pub mod body;
pub mod error;
pub mod h1;
pub mod h2;
pub mod pool;
pub mod send;
