//! HTTP between proxies travels as HTTP/2 and comes out as what the application sent.
//! An HTTP/1.1 request is carried as HTTP/2 with `gofe-orig-proto` naming its version
//! (and `absolute-form` when its request-target was an absolute URI, meant for a
//! forward proxy); the far proxy turns it back. Requests the application sent as
//! HTTP/2 cross unchanged.

use super::headers;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Version};

/// Names the HTTP version a request had before it crossed the mesh.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("gofe-orig-proto");
/// The peer identity handed to the application on inbound requests.
pub const CLIENT_ID: HeaderName = HeaderName::from_static("gofe-client-id");
/// The same name as CGI-style stacks (PHP, WSGI) would read it: removed from clients'
/// requests too, so it cannot stand in for the real one.
pub const CLIENT_ID_UNDERSCORED: HeaderName = HeaderName::from_static("gofe_client_id");

const HTTP11: &str = "HTTP/1.1";
const HTTP11_ABSOLUTE: &str = "HTTP/1.1; absolute-form";

/// An application's request, made fit for the HTTP/2 hop between proxies. A request
/// without a usable Host is given `fallback` (the endpoint's address) as its
/// authority, as HTTP/2 requires one (formatted only then).
pub fn to_mesh<B>(req: &mut Request<B>, fallback: impl std::fmt::Display) {
    if req.version() == Version::HTTP_2 {
        return;
    }
    let absolute = req.uri().scheme().is_some() && req.uri().authority().is_some();
    let authority = if absolute {
        req.uri().authority().cloned()
    } else {
        // The Host header travels as :authority.
        req.headers_mut()
            .remove(header::HOST)
            .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
            .or_else(|| http::uri::Authority::try_from(fallback.to_string()).ok())
    };
    *req.uri_mut() = headers::absolute_form(req.uri(), authority.as_ref());
    *req.version_mut() = Version::HTTP_2;
    // HTTP/2 frames bodies itself.
    req.headers_mut().remove(header::TRANSFER_ENCODING);
    req.headers_mut().insert(
        ORIG_PROTO,
        HeaderValue::from_static(if absolute { HTTP11_ABSOLUTE } else { HTTP11 }),
    );
}

/// A request that crossed the mesh, as the application sent it. True if it was
/// HTTP/1.1.
pub fn from_mesh<B>(req: &mut Request<B>) -> bool {
    let Some(orig) = req.headers_mut().remove(ORIG_PROTO) else {
        return false;
    };
    *req.version_mut() = Version::HTTP_11;
    if orig != HTTP11_ABSOLUTE {
        if let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        *req.uri_mut() = headers::origin_form(req.uri(), req.method());
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_round_trips_through_the_mesh() {
        let mut req = Request::post("/a?b=1")
            .header("host", "web:8080")
            .header("transfer-encoding", "chunked")
            .header("x-app", "1")
            .body(())
            .unwrap();
        to_mesh(&mut req, "10.0.0.1:80");
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.uri(), "http://web:8080/a?b=1");
        assert!(!req.headers().contains_key("host"));
        assert!(!req.headers().contains_key("transfer-encoding"));
        assert_eq!(req.headers()[ORIG_PROTO], "HTTP/1.1");
        assert!(from_mesh(&mut req));
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers()["host"], "web:8080");
        assert_eq!(req.headers()["x-app"], "1");
        assert!(!req.headers().contains_key(ORIG_PROTO));
    }

    #[test]
    fn absolute_form_survives_the_mesh() {
        let mut req = Request::get("http://example.test/x")
            .header("host", "squid:3128")
            .body(())
            .unwrap();
        to_mesh(&mut req, "10.0.0.1:80");
        assert_eq!(req.headers()[ORIG_PROTO], "HTTP/1.1; absolute-form");
        assert!(from_mesh(&mut req));
        assert_eq!(req.uri(), "http://example.test/x");
        assert_eq!(req.headers()["host"], "squid:3128");
    }

    #[test]
    fn a_request_without_host_gets_the_endpoint_as_authority() {
        let mut req = Request::get("/x")
            .version(Version::HTTP_11)
            .body(())
            .unwrap();
        to_mesh(&mut req, "10.0.0.9:8080");
        assert_eq!(req.uri(), "http://10.0.0.9:8080/x");
        assert!(from_mesh(&mut req));
        assert_eq!(req.headers()["host"], "10.0.0.9:8080");
    }

    #[test]
    fn http2_crosses_unchanged() {
        let mut req = Request::get("http://api:80/")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        to_mesh(&mut req, "10.0.0.1:80");
        assert!(!req.headers().contains_key(ORIG_PROTO));
        assert!(!from_mesh(&mut req));
        assert_eq!(req.version(), Version::HTTP_2);
    }
}
