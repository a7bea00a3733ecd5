//! Header and URI rules for passing a request or response on: hop-by-hop headers stay
//! on their hop, the request target takes the form the next hop's HTTP version wants,
//! and the authority is read the same way everywhere.

use crate::addrs::well_formed;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
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

/// Removes hop-by-hop headers, including any the `Connection` header names. `TE:
/// trailers` is end-to-end in practice (gRPC needs it) and is kept; other TE values go.
/// With `keep_upgrade`, `Connection: upgrade` and `Upgrade` survive for a protocol
/// switch.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = if keep_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    let named: Vec<HeaderName> = tokens(headers, header::CONNECTION)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .filter(|n| n != header::TE)
        .collect();
    for n in named {
        headers.remove(n);
    }
    // A message framed by Transfer-Encoding has no meaningful Content-Length (RFC 9112
    // §6.3); the next hop frames it afresh.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    if headers.contains_key(header::TE) {
        let trailers = tokens(headers, header::TE).any(|t| t.eq_ignore_ascii_case("trailers"));
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
