//! TLS between proxies: TLS 1.3, both sides present their held certificate, both
//! verify the other against the trust anchors. ALPN says what the connection carries,
//! which is also how an inbound proxy tells mesh TLS from an application's own TLS.

use crate::cert;
use crate::spiffe::SpiffeId;
use crate::store::{CertStore, StoreResolver};
use crate::trust::{MeshClientVerifier, MeshServerVerifier, TrustAnchors};
use rustls::client::Resumption;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, CommonState, ServerConfig};
use std::sync::Arc;

/// HTTP between proxies: HTTP/2, one connection per endpoint, multiplexed.
pub const ALPN_H2: &[u8] = b"gofe/h2";
/// An HTTP/1.1 request that takes its connection over (upgrade, CONNECT).
pub const ALPN_HTTP1: &[u8] = b"gofe/http1";
/// An opaque TCP stream.
pub const ALPN_TCP: &[u8] = b"gofe/tcp";

pub fn is_mesh_alpn(protocol: &[u8]) -> bool {
    [ALPN_H2, ALPN_HTTP1, ALPN_TCP].contains(&protocol)
}

/// The mesh's TLS configs, built once: certificates and anchors are looked up per
/// handshake.
pub struct MeshTls {
    server: Arc<ServerConfig>,
    client_h2: Arc<ClientConfig>,
    client_http1: Arc<ClientConfig>,
    client_tcp: Arc<ClientConfig>,
}

impl MeshTls {
    /// Peers must chain to `anchors` and name a SPIFFE ID in `trust_domain`.
    pub fn new(store: Arc<CertStore>, anchors: Arc<TrustAnchors>, trust_domain: &str) -> MeshTls {
        let provider = anchors.provider().clone();
        let resolver = Arc::new(StoreResolver(store));
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported")
            .with_client_cert_verifier(Arc::new(MeshClientVerifier::new(
                anchors.clone(),
                trust_domain,
            )))
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];
        // Every connection presents and verifies the current certificates: no
        // resumption of a session made under an older one.
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let client = |alpn: &[u8]| {
            let mut c = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3 is supported")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(MeshServerVerifier::new(
                    anchors.clone(),
                    trust_domain,
                )))
                .with_client_cert_resolver(resolver.clone());
            c.alpn_protocols = vec![alpn.to_vec()];
            c.resumption = Resumption::disabled();
            Arc::new(c)
        };
        MeshTls {
            server: Arc::new(server),
            client_h2: client(ALPN_H2),
            client_http1: client(ALPN_HTTP1),
            client_tcp: client(ALPN_TCP),
        }
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The client config that asks for `alpn` (one of the mesh protocols).
    pub fn client_config(&self, alpn: &[u8]) -> Arc<ClientConfig> {
        match alpn {
            ALPN_HTTP1 => self.client_http1.clone(),
            ALPN_TCP => self.client_tcp.clone(),
            _ => self.client_h2.clone(),
        }
    }
}

/// The SPIFFE ID the peer of a finished handshake presented.
pub fn peer_identity(state: &CommonState) -> Option<SpiffeId> {
    state
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| cert::peer_identity(leaf))
}
