//! Discovery: where each destination's endpoints come from (`sources`): the etcd
//! registry's signed entries (`registry`, each checked by `entry`), DNS (`dns`), or
//! destinations files kept current (`file`).

pub mod dns;
pub mod entry;
pub mod file;
pub mod registry;
pub mod sources;
