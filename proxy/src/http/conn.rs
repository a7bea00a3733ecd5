//! One accepted HTTP connection: where its requests go, who its client is, and the
//! caches that spare its requests a lookup each (the destination and the metrics of
//! the last authority, which a connection's requests nearly always share).

use super::activity::Activity;
use crate::addrs::{ClientAddr, ClientKey, DestKey, Direction};
use crate::call::Routed;
use crate::ctx::Ctx;
use crate::endpoint::Endpoint;
use crate::metrics::{RequestLabels, RequestStats};
use crate::policy::share::SourceSlot;
use crate::proto::headers;
use crate::proto::mesh::CLIENT_ID;
use crate::route::destination::Destination;
use crate::route::target::ConnTarget;
use gofe_identity::SpiffeId;
use http::HeaderValue;
use http::uri::Authority;
use parking_lot::Mutex;
use std::sync::Arc;

/// The HTTP version a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// The port an authority without one means, for plain HTTP.
const HTTP_PORT: u16 = 80;

/// The longest Host header a connection keeps parsed: a DNS name (253) and a port.
const MAX_CACHED_HOST: usize = 253 + 6;

/// The labels that pick a connection's last request counters.
type StatsKey = (Arc<str>, Option<Arc<SpiffeId>>, Option<Routed>);

pub struct HttpConn {
    pub ctx: Arc<Ctx>,
    /// Its requests in flight and its heads, for its timers.
    pub activity: Arc<Activity>,
    pub direction: Direction,
    pub client: ClientAddr,
    pub target: ConnTarget,
    /// Inbound: the application, as an endpoint for the inbound stack.
    pub app: Option<Arc<Endpoint>>,
    /// Inbound: the `authority` label of its requests, where the client reached the
    /// application (the pod address and port), whatever its Host header says: a client
    /// cannot grow the metrics by naming hosts.
    inbound_label: Option<Arc<str>>,
    /// Inbound: where the client's address counts against its share of a port.
    pub source_slot: Option<SourceSlot>,
    /// The mesh identity of the client, for an inbound connection over mTLS.
    pub peer: Option<Arc<SpiffeId>>,
    /// The peer's identity as its requests carry it to the application and to the
    /// rate limits, made once for the connection rather than once a request.
    peer_header: Option<HeaderValue>,
    peer_key: Option<Arc<str>>,
    /// Why requests on this connection are refused (inbound policy), if they are.
    pub refused: Option<String>,
    last_stats: Mutex<Option<(StatsKey, Arc<RequestStats>)>>,
    last_destination: Mutex<Option<(Option<Authority>, Arc<Destination>)>>,
    last_host: LastHost,
}

impl HttpConn {
    pub fn new(
        ctx: Arc<Ctx>,
        direction: Direction,
        client: ClientAddr,
        target: ConnTarget,
        version: HttpVersion,
    ) -> Self {
        let (app, inbound_label, source_slot) = match target {
            ConnTarget::Inbound { app, orig_dst } => (
                Some(Arc::new(Endpoint::bare(app))),
                Some(orig_dst.map_or(app.to_string(), |o| o.to_string()).into()),
                Some(SourceSlot::of(client.ip())),
            ),
            _ => (None, None, None),
        };
        Self {
            ctx,
            activity: Activity::new(version == HttpVersion::Http1),
            direction,
            client,
            target,
            app,
            inbound_label,
            source_slot,
            peer: None,
            peer_header: None,
            peer_key: None,
            refused: None,
            last_stats: Mutex::new(None),
            last_destination: Mutex::new(None),
            last_host: LastHost::default(),
        }
    }

    pub fn with_peer(mut self, peer: Option<Arc<SpiffeId>>) -> Self {
        let text = peer.as_ref().map(|p| p.to_string());
        self.peer_header = text.as_deref().and_then(|t| HeaderValue::from_str(t).ok());
        self.peer_key = text.map(Arc::from);
        self.peer = peer;
        self
    }

    pub fn refusing(mut self, reason: Option<String>) -> Self {
        self.refused = reason;
        self
    }

    /// Tells the application who the client is: the identity the client's proxy
    /// presented over mTLS. Inbound only; called once the hop-by-hop headers, which a
    /// client could use to name it, are gone.
    pub fn identify_client(&self, headers: &mut http::HeaderMap) {
        if self.direction == Direction::Inbound
            && let Some(v) = &self.peer_header
        {
            headers.insert(CLIENT_ID, v.clone());
        }
    }

    /// Who the client is for rate limits: its mesh identity, else its address.
    pub fn client_key(&self) -> Option<ClientKey> {
        Some(match &self.peer_key {
            Some(p) => ClientKey::Identity(p.clone()),
            None => ClientKey::Ip(self.client.addr().ip()),
        })
    }

    /// The request's authority, as `headers::authority` reads it (the URI's, else the
    /// Host header's).
    pub fn authority<B>(&self, req: &http::Request<B>) -> Option<Authority> {
        self.last_host.authority(req)
    }

    /// The outbound destination a request to `authority` goes to: the authority's
    /// when it has one, else the original destination's.
    pub fn destination(&self, authority: Option<&Authority>) -> Option<Arc<Destination>> {
        let mut last = self.last_destination.lock();
        // The same bytes, not `Authority`'s case-insensitive equality (a byte at a time,
        // ~250 instructions a request): a host spelled in another case is only a miss.
        if let Some((a, d)) = last.as_ref()
            && a.as_ref().map(Authority::as_str) == authority.map(Authority::as_str)
            && !d.is_removed()
        {
            d.touch();
            return Some(d.clone());
        }
        let orig_dst = self.target.orig_dst();
        let key = match (authority, orig_dst) {
            // An authority without a port means the port the application connected to
            // (80 for an explicit proxy request).
            (Some(a), _) => DestKey::from_authority(a, orig_dst.map_or(HTTP_PORT, |o| o.port())),
            (None, Some(o)) => DestKey::orig_dst(o),
            (None, None) => return None,
        };
        let d = self.ctx.destinations.get(key);
        *last = Some((authority.cloned(), d.clone()));
        Some(d)
    }

    /// The request counters for a request to `authority` (the original destination
    /// when the request has none) answered by `upstream_peer` (outbound, over mTLS);
    /// inbound requests count under where they came in and their client's identity.
    pub fn stats(
        &self,
        authority: Option<&Authority>,
        upstream_peer: Option<&Arc<SpiffeId>>,
        routed: Option<&Routed>,
    ) -> Arc<RequestStats> {
        let peer = match self.direction {
            Direction::Inbound => self.peer.as_ref(),
            Direction::Outbound => upstream_peer,
        };
        let fallback;
        let label = match (&self.inbound_label, authority) {
            (Some(inbound), _) => inbound.as_ref(),
            (None, Some(a)) => a.as_str(),
            (None, None) => {
                fallback = self
                    .target
                    .orig_dst()
                    .map(|o| o.to_string())
                    .unwrap_or_default();
                fallback.as_str()
            }
        };
        let mut last = self.last_stats.lock();
        if let Some(((a, p, r), s)) = last.as_ref()
            && a.as_ref() == label
            && p.as_ref() == peer
            && r.as_ref() == routed
        {
            return s.clone();
        }
        let label: Arc<str> = label.into();
        let stats = self.ctx.metrics.requests.get(&RequestLabels {
            direction: self.direction,
            authority: label.clone(),
            tls: peer.is_some(),
            peer_identity: peer
                .map(|p| Arc::from(p.to_string()))
                .unwrap_or_else(|| Arc::from("")),
            route: routed.map_or_else(|| Arc::from(""), |r| r.route.clone()),
            backend: routed.map_or_else(|| Arc::from(""), |r| r.backend.clone()),
        });
        *last = Some(((label, peer.cloned(), routed.cloned()), stats.clone()));
        stats
    }
}

/// The last Host header a connection's requests named, read as an authority: an
/// HTTP/1 connection's requests nearly always name the same host, and a parse is
/// ~1,000 instructions.
#[derive(Default)]
struct LastHost(Mutex<Option<(HeaderValue, Option<Authority>)>>);

impl LastHost {
    /// What `headers::authority` says of `req`, the Host header parsed again only when
    /// it differs from the last one.
    fn authority<B>(&self, req: &http::Request<B>) -> Option<Authority> {
        let host = match req.uri().authority() {
            None => req.headers().get(http::header::HOST),
            Some(_) => None,
        };
        let Some(host) = host else {
            return headers::authority(req);
        };
        let mut last = self.0.lock();
        if let Some((h, a)) = last.as_ref()
            && h == host
        {
            return a.clone();
        }
        let a = headers::authority(req);
        // A copy, not a share of hyper's read buffer; and no longer than a name with
        // a port can be, so an idle connection holds little.
        if host.len() <= MAX_CACHED_HOST {
            *last = HeaderValue::from_bytes(host.as_bytes())
                .ok()
                .map(|h| (h, a.clone()));
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn req(uri: &str, host: Option<&[u8]>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", HeaderValue::from_bytes(h).unwrap());
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_last_host_gives_what_a_fresh_read_gives() {
        let last = LastHost::default();
        let long = format!("{}.example:80", "a".repeat(300));
        let cases: Vec<Request<()>> = vec![
            req("/", Some(b"api.demo:8080")),
            req("/", Some(b"api.demo:8080")),
            req("/", Some(b"api.demo:t43")),
            req("/", Some(b"api.demo:t43")),
            req("/", Some(b"other.demo")),
            req("http://uri.demo:81/", Some(b"other.demo")),
            req("/", None),
            req("/", Some(long.as_bytes())),
            req("/", Some(long.as_bytes())),
            req("/", Some(b"other.demo")),
            req("/", Some(b"api.demo:8080")),
        ];
        for r in &cases {
            assert_eq!(
                last.authority(r),
                headers::authority(r),
                "{:?} {:?}",
                r.uri(),
                r.headers().get("host")
            );
        }
        // It does keep the last host it could: asked again, it answers from there.
        let kept = last.0.lock().as_ref().map(|(h, _)| h.clone());
        assert_eq!(kept, Some(HeaderValue::from_static("api.demo:8080")));
    }

    #[test]
    fn a_host_too_long_for_a_name_is_not_kept() {
        let last = LastHost::default();
        let long = format!("{}.example", "a".repeat(300));
        let r = req("/", Some(long.as_bytes()));
        assert_eq!(last.authority(&r), headers::authority(&r));
        assert!(last.0.lock().is_none());
    }
}
