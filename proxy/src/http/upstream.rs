//! The endpoint service at the bottom of the outbound policy stack: sends one attempt
//! to the endpoint the balancer picked, over mTLS to meshed peers (requiring mTLS,
//! and the identity discovery named, when it named one), in plaintext otherwise.

use super::forward::prepare_http1;
use super::mesh;
use crate::State;
use crate::addrs::Direction;
use crate::endpoint::{HttpVersion, SendError, SendFailure};
use crate::policy::call::{Answer, BoxFuture, Call, Failure};
use http::Version;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

#[derive(Clone)]
pub(crate) struct Upstream {
    pub state: Arc<State>,
    /// The client is an explicit proxy client (its requests name their origin).
    pub explicit: bool,
    /// The request body has no announced length.
    pub streaming_body: bool,
}

impl Service<Call> for Upstream {
    type Response = Answer;
    type Error = Failure;
    type Future = BoxFuture<Result<Answer, Failure>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        Box::pin(send(self.clone(), call))
    }
}

async fn send(up: Upstream, call: Call) -> Result<Answer, Failure> {
    let endpoint = call
        .endpoint
        .expect("the balancer picks an endpoint before the endpoint service is called");
    let addr = endpoint.addr;
    let state = &up.state;
    let mut req = call.req;
    let (tls, may_fall_back) = match &endpoint.identity {
        Some(_) => state.required_tls(),
        None => state.outbound_tls(Direction::Outbound, addr),
    };
    let failed = |f: SendFailure| {
        if let SendError::Connect(e) = &f.error {
            state.metrics.connect_error(Direction::Outbound, e.reason());
        }
        if f.error.is_client_side() {
            return Failure::Client { error: f.error };
        }
        match f.unsent {
            Some(req) => Failure::Unsent {
                error: f.error,
                req,
                endpoint: Some(addr),
            },
            None => Failure::Lost {
                refused: f.error.is_refused_stream(),
                error: f.error,
                endpoint: Some(addr),
            },
        }
    };
    if let Some(tls) = tls {
        mesh::to_mesh(&mut req, &addr.to_string());
        match state
            .http
            .send_mesh(addr, req, tls, endpoint.identity.as_ref())
            .await
        {
            Ok((rsp, peer)) => {
                let mut a = Answer::new(rsp, Some(addr));
                a.peer = Some(peer);
                return Ok(a);
            }
            Err(mut f) => {
                // Back to the application's form: for plaintext, or another endpoint.
                if let Some(unsent) = f.unsent.as_mut()
                    && mesh::from_mesh(unsent)
                {
                    prepare_http1(up.explicit, unsent, &addr.to_string(), up.streaming_body);
                }
                let not_meshed = matches!(&f.error, SendError::Connect(e) if e.not_meshed());
                match f.unsent {
                    Some(unsent) if may_fall_back && not_meshed => {
                        if let SendError::Connect(e) = &f.error {
                            state.plaintext_from_now(addr, e);
                        }
                        req = *unsent;
                    }
                    _ => return Err(failed(f)),
                }
            }
        }
    }
    let version = match req.version() {
        Version::HTTP_2 => HttpVersion::Http2,
        _ => HttpVersion::Http1,
    };
    match state.http.send(addr, version, req).await {
        Ok((rsp, checkin)) => {
            let mut a = Answer::new(rsp, Some(addr));
            a.checkin = checkin;
            Ok(a)
        }
        Err(f) => Err(failed(f)),
    }
}
