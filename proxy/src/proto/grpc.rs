//! gRPC as the proxy sees it: HTTP/2 requests with an `application/grpc` content type,
//! whose outcome is the `grpc-status` of the trailers (or of the headers, for a
//! trailers-only response).

use http::{HeaderMap, Request, header};

pub const CANCELLED: u16 = 1;
pub const INVALID_ARGUMENT: u16 = 3;
pub const DEADLINE_EXCEEDED: u16 = 4;
pub const PERMISSION_DENIED: u16 = 7;
pub const RESOURCE_EXHAUSTED: u16 = 8;
pub const UNAVAILABLE: u16 = 14;

pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The `grpc-status` in `headers`, if there is one.
pub fn status(headers: &HeaderMap) -> Option<u16> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_and_status() {
        let req = Request::post("/x")
            .header("content-type", "application/grpc+proto")
            .body(())
            .unwrap();
        assert!(is_grpc(&req));
        let mut h = HeaderMap::new();
        assert_eq!(status(&h), None);
        h.insert("grpc-status", " 14".parse().unwrap());
        assert_eq!(status(&h), Some(14));
    }
}
