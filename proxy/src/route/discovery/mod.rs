//! Discovery: where each destination's endpoints come from (`sources`), from DNS
//! (`dns`) or from destinations files kept current (`file`).

pub mod dns;
pub mod file;
pub mod sources;
