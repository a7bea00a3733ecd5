//! Leaf: the proxy's settings. Every `GOFE_*` variable is declared once (`vars`), read
//! in one pass into typed values (`proxy`, `policy`, `issuer`), and every bad value is
//! reported together before start-up (`env`). The destinations files (`file`) are
//! parsed by the same code at start-up and on every reload; the registry's settings
//! (`registry`) serve the proxy and `gofe registry` alike.

pub mod env;
pub mod file;
pub mod issuer;
pub mod parse;
pub mod policy;
pub mod probes;
pub mod proxy;
pub mod registry;
pub mod retry;
pub mod rules;
pub mod vars;

pub use env::{BadVar, ConfigError, Env};
pub use issuer::read_issuer;
pub use parse::{
    Cidr, PortSet, parse_bool, parse_cidrs, parse_duration, parse_host_port,
    parse_nonzero_duration, parse_socket_addr, parse_trust_domain,
};
pub use probes::{AppProbe, AppProbes, HttpScheme, ProbeAction, ProbeKind};
pub use proxy::{
    Config, DiscoverySource, IdentityConfig, InboundMtls, InboundTarget, Limits, LogFormat,
    OutboundMtls, TraceProtocol, TraceTrust,
};
pub use registry::{RegisterConfig, Registered, RegistryConfig, RegistryTls};
pub use vars::*;
