//! An HTTP/1 request head as a client sends it, parsed by httparse (hyper's parser) and
//! built into a request the way hyper's server builds it, then through what the proxy
//! does with heads (`gofe_proxy::proto::headers`): the authority read and named as a
//! destination (which names it back the same way: what a request reaches, a policy
//! file can name), hop-by-hop headers stripped (none left, nothing the Connection
//! header named, `TE` only as `trailers`, idempotent), the request target put in
//! origin- and absolute-form (keeping the path and query), and the mesh round trip
//! (`gofe_fuzz::check_mesh_round_trip`).
#![no_main]

use gofe_fuzz::headers::{absolute_form, authority, origin_form, strip_hop_by_hop};
use gofe_proxy::addrs::DestKey;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use libfuzzer_sys::fuzz_target;

/// The request hyper's HTTP/1 server would hand the proxy, if it accepts the head.
fn parse(data: &[u8]) -> Option<Request<()>> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut head = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(_) = head.parse(data).ok()? else {
        return None;
    };
    let mut req = Request::new(());
    *req.method_mut() = Method::from_bytes(head.method?.as_bytes()).ok()?;
    *req.uri_mut() = head.path?.parse::<Uri>().ok()?;
    *req.version_mut() = match head.version? {
        0 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    for h in head.headers.iter() {
        req.headers_mut().append(
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    Some(req)
}

fn tokens(h: &HeaderMap, name: HeaderName) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fn check_stripped(before: &HeaderMap, keep_upgrade: bool) {
    let mut after = before.clone();
    strip_hop_by_hop(&mut after, keep_upgrade);
    let upgrade = keep_upgrade && before.contains_key(header::UPGRADE);
    for hop in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        assert!(!after.contains_key(hop), "{hop} left in {after:?}");
    }
    if upgrade {
        assert_eq!(after[header::CONNECTION], "upgrade");
        assert_eq!(after.get(header::UPGRADE), before.get(header::UPGRADE));
    } else {
        assert!(!after.contains_key(header::CONNECTION));
        assert!(!after.contains_key(header::UPGRADE));
    }
    for named in tokens(before, header::CONNECTION) {
        let Ok(name) = HeaderName::from_bytes(named.as_bytes()) else {
            continue;
        };
        if name == header::TE
            || (upgrade && (name == header::UPGRADE || name == header::CONNECTION))
        {
            continue;
        }
        assert!(
            !after.contains_key(&name),
            "{name} named by Connection, still there"
        );
    }
    if let Some(te) = after.get(header::TE) {
        assert_eq!(te, "trailers");
        assert_eq!(after.get_all(header::TE).iter().count(), 1);
    }
    if before.contains_key(header::TRANSFER_ENCODING) {
        assert!(!after.contains_key(header::CONTENT_LENGTH));
    }
    let mut again = after.clone();
    strip_hop_by_hop(&mut again, keep_upgrade);
    assert_eq!(again, after, "stripping twice strips no more");
}

fn check_forms(uri: &Uri, method: &Method, host: Option<&http::uri::Authority>) {
    let pq = |u: &Uri| {
        u.path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string())
    };
    let origin = origin_form(uri, method);
    if *method == Method::CONNECT || (uri.scheme().is_none() && uri.authority().is_none()) {
        assert_eq!(&origin, uri);
    } else {
        assert!(origin.scheme().is_none() && origin.authority().is_none());
        assert_eq!(pq(&origin), pq(uri));
    }
    let absolute = absolute_form(uri, host);
    if uri.scheme().is_some() && uri.authority().is_some() {
        assert_eq!(&absolute, uri);
    } else if absolute != *uri {
        assert_eq!(absolute.authority(), host);
        assert!(absolute.scheme().is_some());
        assert_eq!(pq(&absolute), pq(uri));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(mut req) = parse(data) else {
        return;
    };
    let authority = authority(&req);
    if let Some(a) = &authority {
        let key = DestKey::from_authority(a, 80);
        let named = key.to_string();
        assert_eq!(
            DestKey::parse(&named).as_ref(),
            Ok(&key),
            "the destination of authority {a:?} shows as {named:?}, which names something else"
        );
    }
    check_stripped(req.headers(), false);
    check_stripped(req.headers(), true);
    check_forms(req.uri(), req.method(), authority.as_ref());

    // As `http::request` passes a request on: its own headers gone, the hop-by-hop
    // ones too.
    req.headers_mut().remove(gofe_fuzz::mesh::ORIG_PROTO);
    if gofe_fuzz::goes_over_mesh(&req) {
        strip_hop_by_hop(req.headers_mut(), false);
        gofe_fuzz::check_mesh_round_trip(&req, "10.0.0.9:8080");
    }
});
