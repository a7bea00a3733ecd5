//! Header and URI rules for passing a request or response on: hop-by-hop headers stay
//! on their hop, the request target takes the form the next hop's HTTP version wants,
//! and the authority is read the same way everywhere.

use crate::addrs::well_formed;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Version};

/// Headers that describe one connection (RFC 9110 §7.6.1), not the message.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The headers a proxy must act on that a message carries, found in one pass over its
/// names. Most messages carry none of them (beyond a gRPC `TE`), and then nothing
/// else needs to look: each `HeaderMap` lookup hashes a name and probes, and a request
/// and its response would otherwise take a dozen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Found(u16);

impl Found {
    pub const CONNECTION: Found = Found(1);
    pub const KEEP_ALIVE: Found = Found(1 << 1);
    pub const PROXY_CONNECTION: Found = Found(1 << 2);
    pub const TRANSFER_ENCODING: Found = Found(1 << 3);
    pub const UPGRADE: Found = Found(1 << 4);
    pub const TE: Found = Found(1 << 5);
    /// `gofe-client-id` or `gofe_client_id`.
    pub const CLIENT_ID: Found = Found(1 << 6);
    pub const ORIG_PROTO: Found = Found(1 << 7);
    /// Those `strip_hop_by_hop` acts on.
    const HOP_BY_HOP: Found = Found(0b11_1111);

    /// One pass over the names of `headers`.
    pub fn scan(headers: &HeaderMap) -> Found {
        let mut found = 0;
        for name in headers.keys() {
            found |= match name.as_str() {
                "connection" => Self::CONNECTION.0,
                "keep-alive" => Self::KEEP_ALIVE.0,
                "proxy-connection" => Self::PROXY_CONNECTION.0,
                "transfer-encoding" => Self::TRANSFER_ENCODING.0,
                "upgrade" => Self::UPGRADE.0,
                "te" => Self::TE.0,
                "gofe-client-id" | "gofe_client_id" => Self::CLIENT_ID.0,
                "gofe-orig-proto" => Self::ORIG_PROTO.0,
                _ => 0,
            };
        }
        Found(found)
    }

    /// Whether any of `these` was found.
    pub fn any(self, these: Found) -> bool {
        self.0 & these.0 != 0
    }
}

impl std::ops::BitOr for Found {
    type Output = Found;
    fn bitor(self, other: Found) -> Found {
        Found(self.0 | other.0)
    }
}

/// A copy of a request's head, extensions included (what its route put there: the
/// route's retry settings, its `per_try_timeout`), for sending it again.
pub fn copy_head<B>(r: &Request<B>) -> Parts {
    let mut c = Request::new(());
    *c.method_mut() = r.method().clone();
    *c.uri_mut() = r.uri().clone();
    *c.version_mut() = r.version();
    *c.headers_mut() = r.headers().clone();
    *c.extensions_mut() = r.extensions().clone();
    c.into_parts().0
}

/// Removes hop-by-hop headers, including any the `Connection` header names. `TE:
/// trailers` is end-to-end in practice (gRPC needs it) and is kept; other TE values go.
/// With `keep_upgrade`, `Connection: upgrade` and `Upgrade` survive for a protocol
/// switch.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let found = Found::scan(headers);
    if !found.any(Found::HOP_BY_HOP) {
        return;
    }
    if found == Found::TE {
        // gRPC's `TE: trailers` alone, as it should be: the common case among requests
        // that have any of these.
        let mut te = headers.get_all(header::TE).iter();
        if let (Some(v), None) = (te.next(), te.next())
            && v == "trailers"
        {
            return;
        }
    }
    let upgrade = if keep_upgrade && found.any(Found::UPGRADE) {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    if found.any(Found::CONNECTION) {
        // The headers `Connection` names go too, except `TE` (below); those removed
        // anyway (`keep-alive`, nginx's every response) spare a parse and a lookup.
        let named: Vec<HeaderName> = token_strs(headers, &header::CONNECTION)
            .filter(|t| {
                !t.eq_ignore_ascii_case("te")
                    && !HOP_BY_HOP
                        .iter()
                        .any(|h| t.eq_ignore_ascii_case(h.as_str()))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    // A message framed by Transfer-Encoding has no meaningful Content-Length (RFC 9112
    // §6.3); the next hop frames it afresh.
    if found.any(Found::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let bits = [
        Found::CONNECTION,
        Found::KEEP_ALIVE,
        Found::PROXY_CONNECTION,
        Found::TRANSFER_ENCODING,
        Found::UPGRADE,
    ];
    for (h, bit) in HOP_BY_HOP.iter().zip(bits) {
        if found.any(bit) {
            headers.remove(h);
        }
    }
    if found.any(Found::TE) && headers.contains_key(header::TE) {
        let trailers = token_strs(headers, &header::TE).any(|t| t.eq_ignore_ascii_case("trailers"));
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// The comma-separated tokens of every `name` header line, trimmed, none empty.
fn token_strs<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The comma-separated tokens of every `name` header line.
fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// An HTTP/1.1 request asking to switch protocols (WebSocket, h2c upgrade...).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// An upgrade request naming `protocol` among its Upgrade tokens.
pub fn is_upgrade_to<B>(req: &Request<B>, protocol: &str) -> bool {
    is_upgrade(req)
        && tokens(req.headers(), header::UPGRADE).any(|t| t.eq_ignore_ascii_case(protocol))
}

/// Turns an upgrade request back into a plain one.
pub fn drop_upgrade(headers: &mut HeaderMap) {
    headers.remove(header::UPGRADE);
    headers.remove(HeaderName::from_static("http2-settings"));
    let others: Vec<String> = tokens(headers, header::CONNECTION)
        .filter(|t| !t.eq_ignore_ascii_case("upgrade") && !t.eq_ignore_ascii_case("http2-settings"))
        .collect();
    headers.remove(header::CONNECTION);
    if !others.is_empty()
        && let Ok(v) = HeaderValue::from_str(&others.join(", "))
    {
        headers.insert(header::CONNECTION, v);
    }
}

/// The request's authority: from the URI (HTTP/2, absolute-form, CONNECT), else the
/// Host header; none when the one it has is not well formed (`api.demo:t43`).
pub fn authority<B>(req: &Request<B>) -> Option<Authority> {
    if let Some(a) = req.uri().authority() {
        return well_formed(a).then(|| a.clone());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .filter(well_formed)
}

/// The request target an HTTP/1 upstream expects: origin-form (`/path?q`), except
/// CONNECT's authority-form and `OPTIONS *`.
pub fn origin_form(uri: &Uri, method: &Method) -> Uri {
    if method == Method::CONNECT || (uri.scheme().is_none() && uri.authority().is_none()) {
        return uri.clone();
    }
    let pq = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(pq)
}

/// The absolute URI an HTTP/2 upstream needs (`:scheme`, `:authority`, `:path`).
pub fn absolute_form(uri: &Uri, authority: Option<&Authority>) -> Uri {
    if uri.scheme().is_some() && uri.authority().is_some() {
        return uri.clone();
    }
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = authority.cloned();
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("te", "trailers, deflate".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        names.sort();
        assert_eq!(names, vec!["te", "x-keep"]);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn every_connection_line_counts_and_te_drops_content_length() {
        let mut h = HeaderMap::new();
        h.append("connection", "keep-alive".parse().unwrap());
        h.append("connection", "x-internal".parse().unwrap());
        h.insert("x-internal", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("content-length", "10".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn one_pass_finds_what_the_proxy_acts_on() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "text/plain".parse().unwrap());
        h.insert("x-a", "1".parse().unwrap());
        assert_eq!(Found::scan(&h), Found::default());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("gofe_client_id", "x".parse().unwrap());
        h.insert("gofe-orig-proto", "HTTP/1.1".parse().unwrap());
        let found = Found::scan(&h);
        assert!(found.any(Found::TE) && found.any(Found::CLIENT_ID));
        assert!(found.any(Found::ORIG_PROTO) && !found.any(Found::CONNECTION));
        // `TE: trailers` alone stays as it is; any other TE is reduced or goes.
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
        h.append("te", "deflate".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get_all("te").iter().collect::<Vec<_>>(), ["trailers"]);
        h.insert("te", "deflate".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("te"));
    }

    /// Both HTTP/2 sides (`client::h2::open`, `http::h2_server`) rely on this: h2
    /// refuses to send a head that still has any of these (RFC 9113 §8.2.2).
    #[test]
    fn the_fields_http2_forbids_all_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-end-to-end", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-end-to-end"]);

        let mut h = HeaderMap::new();
        h.insert(header::TE, "gzip".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "TE other than trailers is not HTTP/2's");
    }

    #[test]
    fn upgrade_headers_survive_when_asked() {
        let mut h = HeaderMap::new();
        h.insert("connection", "Upgrade".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }

    #[test]
    fn absolute_form_becomes_origin_form_for_http1() {
        let uri: Uri = "http://a.b:8080/x/y?z=1".parse().unwrap();
        assert_eq!(origin_form(&uri, &Method::GET), "/x/y?z=1");
        let connect: Uri = "a.b:443".parse().unwrap();
        assert_eq!(origin_form(&connect, &Method::CONNECT), "a.b:443");
        let star: Uri = "*".parse().unwrap();
        assert_eq!(origin_form(&star, &Method::OPTIONS), "*");
    }

    #[test]
    fn authority_prefers_uri_then_host() {
        let req = Request::get("/p")
            .header("host", "web:8080")
            .body(())
            .unwrap();
        assert_eq!(authority(&req).unwrap(), "web:8080");
        let req = Request::get("http://api:80/p")
            .header("host", "web:8080")
            .body(())
            .unwrap();
        assert_eq!(authority(&req).unwrap(), "api:80");
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let req = Request::get("/")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(is_upgrade(&req));
        let req = Request::get("/")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(!is_upgrade(&req));
    }
}
