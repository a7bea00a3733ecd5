//! The endpoint services at the bottom of the stacks: one attempt of a request sent to
//! the endpoint picked for it (`Forward`), or one connection made to it (`Connect`).

use crate::addrs::Direction;
use crate::call::{
    Answer, BoxFuture, ConnectCall, ConnectFailure, Failure, HttpAnswer, HttpCall, HttpFailure,
    Reply,
};
use crate::client::error::SendError;
use crate::client::send::Client;
use crate::connect::connector::{Connected, Connector};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// Sends each attempt to its endpoint over the client's pools: mTLS to meshed peers
/// (with the identity discovery named, when it named one), plaintext otherwise.
#[derive(Clone)]
pub struct Forward {
    client: Arc<Client>,
    direction: Direction,
}

impl Forward {
    pub fn new(client: Arc<Client>, direction: Direction) -> Self {
        Self { client, direction }
    }
}

impl Service<HttpCall> for Forward {
    type Response = HttpAnswer;
    type Error = HttpFailure;
    type Future = BoxFuture<Result<HttpAnswer, HttpFailure>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), HttpFailure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: HttpCall) -> Self::Future {
        let client = self.client.clone();
        let direction = self.direction;
        Box::pin(async move {
            let endpoint = call
                .endpoint
                .expect("an endpoint is picked before the endpoint service is called");
            let addr = endpoint.addr;
            match client
                .send(
                    direction,
                    addr,
                    endpoint.identity.as_ref(),
                    call.req,
                    call.resend_refused,
                )
                .await
            {
                Ok((rsp, peer)) => {
                    let mut a = Answer::new(rsp, Some(addr));
                    a.peer = peer;
                    Ok(a)
                }
                Err(f) => Err(Failure::from_send(f.error, f.unsent, addr)),
            }
        })
    }
}

/// Makes a connection of its own to each attempt's endpoint (outbound).
#[derive(Clone)]
pub struct Connect {
    connector: Arc<Connector>,
}

impl Connect {
    pub fn new(connector: Arc<Connector>) -> Self {
        Self { connector }
    }
}

impl Reply for Connected {
    fn server_error(&self) -> Option<u16> {
        None
    }
}

impl Service<ConnectCall> for Connect {
    type Response = Answer<Connected>;
    type Error = ConnectFailure;
    type Future = BoxFuture<Result<Answer<Connected>, ConnectFailure>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectFailure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: ConnectCall) -> Self::Future {
        let connector = self.connector.clone();
        Box::pin(async move {
            let endpoint = call
                .endpoint
                .expect("an endpoint is picked before the endpoint service is called");
            let addr = endpoint.addr;
            match connector
                .connect(
                    Direction::Outbound,
                    addr,
                    endpoint.identity.as_ref(),
                    call.req.alpn,
                )
                .await
            {
                Ok(connected) => {
                    let mut a = Answer::new(connected, Some(addr));
                    a.peer = a.value.peer.clone();
                    Ok(a)
                }
                Err(e) => Err(Failure::Unsent {
                    error: SendError::Connect(e),
                    req: call.req,
                    endpoint: Some(addr),
                }),
            }
        })
    }
}
