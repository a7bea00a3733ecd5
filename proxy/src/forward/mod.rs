//! Stage 8: forwarding. The services at the bottom of the stacks that send one attempt
//! to its endpoint (`endpoint`), and the copying of bytes between two connections once
//! they are joined (`tunnel`).

pub mod endpoint;
pub mod tunnel;
