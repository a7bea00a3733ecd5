//! Stage 6: the policy layers a request passes through, one a module: the concurrency
//! limit (`limit`) and a client's share of an inbound port (`share`), timeouts (`timeout`), retries (`retry`) within a budget
//! (`budget`); and the stacks built of them (`stack`). The settings they carry out are
//! `config::policy`.

pub mod budget;
pub mod limit;
pub mod rate;
pub mod retry;
pub mod share;
pub mod stack;
pub mod timeout;
