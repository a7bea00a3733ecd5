//! Forwarding one request: make it fit for the next hop (the client's identity set
//! inbound and only there, hop-by-hop headers off, the target in the form the next
//! hop's HTTP version wants), then send it through its stack: outbound, its
//! destination's (limit, timeouts, retries, balancer, the endpoint over mTLS to meshed
//! peers); inbound, its port's (limit, timeout, the application). Requests that take
//! their connection over go to `upgrade`.

use super::conn::HttpConn;
use super::errors::ProxyError;
use super::routed;
use super::upgrade;
use crate::addrs::Direction;
use crate::body::request::RequestBody;
use crate::body::source::ClientBody;
use crate::call::{Call, Failure, HttpAnswer};
use crate::endpoint::Endpoint;
use crate::metrics::Limit;
use crate::policy::share::SourceSlot;
use crate::proto::headers::{self, Found};
use crate::proto::mesh::{self, CLIENT_ID, CLIENT_ID_UNDERSCORED, ORIG_PROTO};
use crate::route::destination::Destination;
use crate::route::target::ConnTarget;
use http::uri::Authority;
use http::{HeaderValue, Method, Request, Version, header};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tower::ServiceExt;

/// Where a request goes.
enum Target {
    /// Inbound: the application in this pod.
    App,
    /// Outbound: a destination, through its stack.
    Destination(Arc<Destination>),
}

/// The forwarding of one request, boxed: every HTTP/2 stream's future is allocated and
/// moved (`h2_server`), and hyper's HTTP/1 dispatcher moves it too, so what it holds
/// inline is paid per request.
pub type Forwarding = Pin<Box<dyn Future<Output = Result<HttpAnswer, ProxyError>> + Send>>;

/// Forwards `req`, which came on `conn`; `authority` is the request's
/// (`HttpConn::authority`). What can be done at once is (the headers, the target, the
/// framing), so the future that waits holds the request boxed: an `async fn` would hold
/// it by value (~270 bytes), twice, and move it at every step.
pub fn forward(
    conn: Arc<HttpConn>,
    mut req: Request<ClientBody>,
    authority: Option<Authority>,
) -> Forwarding {
    if let Some(reason) = &conn.refused {
        // Its body is read to the end, not reset (`ClientBody`).
        drop(req);
        return failed(ProxyError::Forbidden(reason.clone()));
    }
    // What below acts on, in one pass over the names instead of a lookup each.
    let found = Found::scan(req.headers());
    if conn.direction == Direction::Inbound && found.any(Found::CLIENT_ID) {
        // Only this proxy says who the client is (set below, once the hop-by-hop
        // headers, which a client could use to name it, are gone).
        req.headers_mut().remove(CLIENT_ID);
        req.headers_mut().remove(CLIENT_ID_UNDERSCORED);
    }
    if found.any(Found::ORIG_PROTO) {
        // A request that crossed the mesh is turned back; anyone else's claim to have
        // is dropped.
        if conn.direction == Direction::Inbound && conn.peer.is_some() {
            mesh::from_mesh(&mut req);
        } else {
            req.headers_mut().remove(ORIG_PROTO);
        }
    }

    let explicit = conn.target == ConnTarget::Explicit;
    let target = match conn.target {
        ConnTarget::Inbound { .. } => Target::App,
        ConnTarget::Explicit if req.method() == Method::CONNECT => {
            return Box::pin(async move { upgrade::connect_explicit(&conn, req).await });
        }
        ConnTarget::Explicit | ConnTarget::Outbound(_) => {
            match conn.destination(authority.as_ref()) {
                Some(d) => Target::Destination(d),
                None => return failed(ProxyError::NoAuthority),
            }
        }
    };

    // An h2c upgrade would turn the connection into HTTP/2 the proxies never see: the
    // request goes on as a plain HTTP/1.1 request instead.
    let upgrade = found.any(Found::UPGRADE);
    if upgrade && headers::is_upgrade_to(&req, "h2c") {
        headers::drop_upgrade(req.headers_mut());
    }
    if req.method() == Method::CONNECT || (upgrade && headers::is_upgrade(&req)) {
        let via = match target {
            Target::App => upgrade::Via::App,
            Target::Destination(d) => upgrade::Via::Destination(d),
        };
        return Box::pin(async move { upgrade::forward(&conn, req, via).await });
    }

    headers::strip_hop_by_hop(req.headers_mut(), false);
    conn.identify_client(req.headers_mut());
    let mut req = Box::new(req.map(RequestBody::from));
    match req.version() {
        Version::HTTP_2 => {
            *req.uri_mut() = headers::absolute_form(req.uri(), authority.as_ref());
        }
        _ => {
            // Formatted only for the rare request that needs it (an address to text
            // is about a thousand instructions, 2% of what a request costs here).
            let default_host = || match &target {
                Target::App => conn.app.as_ref().map(|a| a.addr.to_string()),
                Target::Destination(d) => Some(d.name.to_string()),
            };
            prepare_http1(explicit, &mut req, default_host);
        }
    }

    match target {
        Target::App => {
            let app = conn
                .app
                .clone()
                .expect("an inbound connection has an application");
            Box::pin(async move {
                let answer = to_app(&conn, req, app).await?;
                Ok(hop_by_hop_off(answer))
            })
        }
        Target::Destination(d) => Box::pin(async move {
            let call = Call::new(req).with_orig_dst(conn.target.orig_dst());
            let routes = d.routes();
            let answer = match routes.pick(&call.req) {
                // Boxed: a route's future is large, and the plain path's is not.
                Some(i) => Box::pin(routed::forward(&conn, &d, routes.clone(), i, call)).await?,
                None => d.http_stack().oneshot(call).await?,
            };
            Ok(hop_by_hop_off(answer))
        }),
    }
}

/// A request that failed before it went anywhere.
fn failed(error: ProxyError) -> Forwarding {
    Box::pin(std::future::ready(Err(error)))
}

/// The upstream's answer, its hop-by-hop headers gone.
fn hop_by_hop_off(mut answer: HttpAnswer) -> HttpAnswer {
    headers::strip_hop_by_hop(answer.value.headers_mut(), false);
    answer
}

/// Inbound: the request to the application, through its port's stack, within the
/// client's share of the port if it has no mesh identity.
async fn to_app(
    conn: &HttpConn,
    req: Box<Request<RequestBody>>,
    app: Arc<Endpoint>,
) -> Result<HttpAnswer, ProxyError> {
    let (stack, shares) = conn.ctx.inbound.port(app.addr.port());
    let share = match conn.peer {
        Some(_) => None,
        None => {
            let source = conn.client.ip();
            let slot = conn.source_slot.unwrap_or_else(|| SourceSlot::of(source));
            let Some(share) = shares.take(slot) else {
                let at = Direction::Inbound.as_str();
                conn.ctx.metrics.limit_tripped(Limit::SourceShare, at);
                return Err(ProxyError::Call(Failure::Overloaded {
                    destination: format!("port {} for {source}", app.addr.port()).into(),
                    limit: shares.max(),
                }));
            };
            Some(share)
        }
    };
    let call = Call::new(req).to(app).from_client(conn.client_key());
    let mut answer = stack.oneshot(call).await?;
    if let (Some(permit), Some(share)) = (answer.permit.as_mut(), share) {
        permit.join(share);
    }
    Ok(answer)
}

/// An HTTP/1 request as an HTTP/1 upstream should get it. `default_host` gives the
/// Host an HTTP/1.0 request without one is given.
fn prepare_http1(
    explicit: bool,
    req: &mut Request<RequestBody>,
    default_host: impl FnOnce() -> Option<String>,
) {
    if explicit {
        // The proxy is the target: the URI's authority names the origin and replaces
        // any Host header (RFC 9112 §3.2.2). A redirected connection keeps its
        // request-target, which may be meant for a forward proxy.
        if let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        *req.uri_mut() = headers::origin_form(req.uri(), req.method());
    }
    // An intermediary speaks its own version upstream (RFC 9110 §6.2), so an HTTP/1.0
    // client's requests reuse pooled HTTP/1.1 connections too; such a request needs
    // the Host header HTTP/1.1 requires.
    if req.version() == Version::HTTP_10 {
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(header::HOST)
            && let Some(host) = default_host().and_then(|h| HeaderValue::from_str(&h).ok())
        {
            req.headers_mut().insert(header::HOST, host);
        }
    }
    // A body of unknown length still to come; hyper would send one on a GET as empty
    // unless the framing is spelled out.
    if req.body().is_streaming() {
        req.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
}
