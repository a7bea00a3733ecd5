//! Stage 4: HTTP. An accepted connection (`conn`) served (`server`: HTTP/1 with hyper,
//! HTTP/2 with h2 directly in `h2_server`); each request observed (`observe`) and
//! forwarded (`request`; `routed` for those a traffic rule's route takes, and `upgrade`
//! for those that take their connection over, an HTTP/2 CONNECT's stream through
//! `h2_tunnel`); what the client is told when that fails (`errors`); the connection's
//! timers (`activity`).

pub mod activity;
pub mod conn;
pub mod errors;
pub mod h2_server;
pub mod h2_tunnel;
pub mod observe;
pub mod request;
pub mod routed;
pub mod server;
pub mod upgrade;
