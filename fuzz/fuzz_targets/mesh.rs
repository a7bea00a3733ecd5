//! The mesh hop's request rewriting (`gofe_proxy::proto::mesh`) on requests built from
//! fuzzed parts rather than parsed: any method, any request target `http::Uri` accepts
//! (origin-, absolute-, authority-form, `*`), HTTP/1.0 or 1.1, any header values. After
//! `to_mesh` and `from_mesh` the method, the request target, the Host and the
//! end-to-end headers are what they were (`gofe_fuzz::check_mesh_round_trip`), whichever
//! endpoint address stands in for a missing Host.
//!
//! Input, one part a line: the method, the request target, the version (`1.0` or
//! `1.1`), then header lines `name: value`.
#![no_main]

use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use libfuzzer_sys::fuzz_target;

fn build(data: &[u8]) -> Option<Request<()>> {
    let mut lines = data.split(|b| *b == b'\n');
    let mut req = Request::new(());
    *req.method_mut() = Method::from_bytes(lines.next()?).ok()?;
    *req.uri_mut() = Uri::try_from(lines.next()?).ok()?;
    *req.version_mut() = match lines.next()? {
        b"1.0" => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    for line in lines {
        let colon = line.iter().position(|b| *b == b':')?;
        let value = line[colon + 1..].trim_ascii();
        req.headers_mut().append(
            HeaderName::from_bytes(&line[..colon]).ok()?,
            HeaderValue::from_bytes(value).ok()?,
        );
    }
    Some(req)
}

fuzz_target!(|data: &[u8]| {
    let Some(mut req) = build(data) else {
        return;
    };
    req.headers_mut().remove(gofe_fuzz::mesh::ORIG_PROTO);
    if !gofe_fuzz::goes_over_mesh(&req) {
        return;
    }
    gofe_fuzz::headers::strip_hop_by_hop(req.headers_mut(), false);
    for fallback in ["10.0.0.9:8080", "[fd00::9]:80"] {
        gofe_fuzz::check_mesh_round_trip(&req, fallback);
    }
});
