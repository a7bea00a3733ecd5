//! Stage 4: HTTP. An accepted connection (`conn`) served with hyper (`server`); each
//! request observed (`observe`) and forwarded (`request`; `routed` for those a traffic
//! rule's route takes, and `upgrade` for those that take their connection over); what the client is told when that fails (`errors`);
//! the connection's timers (`activity`).

pub mod activity;
pub mod conn;
pub mod errors;
pub mod observe;
pub mod request;
pub mod routed;
pub mod server;
pub mod upgrade;
