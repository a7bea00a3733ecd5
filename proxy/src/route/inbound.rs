//! Inbound, where requests go: the application in this pod, on the port the client
//! connected to, through that port's stack (its concurrency limit shared by every
//! connection to the port, of which one unmeshed source address holds at most half).

use crate::client::send::Client;
use crate::config::policy::Policy;
use crate::policy::share::SourceShares;
use crate::policy::stack::{self, InboundStack};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

pub struct InboundRoutes {
    client: Arc<Client>,
    policy: Arc<Policy>,
    ports: Mutex<HashMap<u16, (InboundStack, Arc<SourceShares>)>>,
}

impl InboundRoutes {
    pub fn new(client: Arc<Client>, policy: Arc<Policy>) -> Self {
        Self {
            client,
            policy,
            ports: Mutex::new(HashMap::new()),
        }
    }

    /// The stack requests to the application's `port` go through, and the shares its
    /// unmeshed clients hold of it.
    pub fn port(&self, port: u16) -> (InboundStack, Arc<SourceShares>) {
        let mut ports = self.ports.lock();
        if let Some(s) = ports.get(&port) {
            return s.clone();
        }
        let s = stack::inbound(
            format!("inbound:{port}").into(),
            Default::default(),
            self.policy.max_concurrent_requests,
            self.policy.request_timeout,
            self.client.clone(),
        );
        let shares = Arc::new(SourceShares::new(self.policy.max_concurrent_requests));
        // (A port number is 16 bits: the table is bounded.)
        ports.insert(port, (s.clone(), shares.clone()));
        (s, shares)
    }
}
