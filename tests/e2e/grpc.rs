//! A gRPC echo service (unary and bidirectional streaming) written against tonic's
//! server and client building blocks: what tonic-build would generate for
//!
//! ```proto
//! package gofe.test;
//! message EchoMsg { string text = 1; uint32 seq = 2; }
//! service Echo { rpc Unary(EchoMsg) returns (EchoMsg); rpc Bidi(stream EchoMsg) returns (stream EchoMsg); }
//! ```
//!
//! without a protoc at build time.

use futures_util::{Stream, StreamExt};
use std::pin::Pin;
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoMsg {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(uint32, tag = "2")]
    pub seq: u32,
}

pub const UNARY: &str = "/gofe.test.Echo/Unary";
pub const BIDI: &str = "/gofe.test.Echo/Bidi";
pub const FAIL: &str = "/gofe.test.Echo/Fail";

type BoxFut<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;
type EchoStream = Pin<Box<dyn Stream<Item = Result<EchoMsg, Status>> + Send>>;

struct Unary;
impl tonic::codegen::Service<Request<EchoMsg>> for Unary {
    type Response = Response<EchoMsg>;
    type Error = Status;
    type Future = BoxFut<Result<Response<EchoMsg>, Status>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Status>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<EchoMsg>) -> Self::Future {
        Box::pin(async move { Ok(Response::new(req.into_inner())) })
    }
}

struct Fail;
impl tonic::codegen::Service<Request<EchoMsg>> for Fail {
    type Response = Response<EchoMsg>;
    type Error = Status;
    type Future = BoxFut<Result<Response<EchoMsg>, Status>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Status>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<EchoMsg>) -> Self::Future {
        Box::pin(async move { Err(Status::resource_exhausted(req.into_inner().text)) })
    }
}

struct Bidi;
impl tonic::codegen::Service<Request<Streaming<EchoMsg>>> for Bidi {
    type Response = Response<EchoStream>;
    type Error = Status;
    type Future = BoxFut<Result<Response<EchoStream>, Status>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Status>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Streaming<EchoMsg>>) -> Self::Future {
        Box::pin(async move {
            let out: EchoStream = Box::pin(req.into_inner().map(|m| m));
            Ok(Response::new(out))
        })
    }
}

/// Serves one gRPC request whose path is one of the Echo methods.
pub async fn serve(req: http::Request<hyper::body::Incoming>) -> http::Response<tonic::body::Body> {
    let codec = tonic_prost::ProstCodec::<EchoMsg, EchoMsg>::default();
    let mut grpc = tonic::server::Grpc::new(codec);
    match req.uri().path() {
        UNARY => grpc.unary(Unary, req).await,
        FAIL => grpc.unary(Fail, req).await,
        BIDI => grpc.streaming(Bidi, req).await,
        _ => Status::unimplemented("no such method").into_http(),
    }
}

pub const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// grpc.health.v1 as tonic-health (tonic's own implementation) serves it: the server
/// as a whole ("") and the Echo service are SERVING, or NOT_SERVING when the app was
/// told to fail.
pub async fn health(
    req: http::Request<hyper::body::Incoming>,
    serving: bool,
) -> http::Response<tonic::body::Body> {
    use tonic::codegen::Service;
    use tonic_health::ServingStatus;
    let (reporter, mut server) = tonic_health::server::health_reporter();
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in ["", "gofe.test.Echo"] {
        reporter.set_service_status(service, status).await;
    }
    match server.call(req).await {
        Ok(rsp) => rsp,
        Err(e) => match e {},
    }
}

/// A client for the Echo service over a tonic channel.
pub struct EchoClient {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
}

impl EchoClient {
    pub async fn connect(uri: String) -> anyhow::Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(uri)?
            .connect()
            .await?;
        Ok(Self {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    /// Connects to `uri` with requests naming `origin` (`http://host:port`) as their
    /// authority, as a client of a service name would.
    pub async fn connect_as(uri: String, origin: &str) -> anyhow::Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(uri)?
            .origin(origin.parse()?)
            .connect()
            .await?;
        Ok(Self {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    pub async fn unary(&mut self, msg: EchoMsg) -> Result<EchoMsg, Status> {
        self.call(UNARY, msg).await
    }

    pub async fn fail(&mut self, msg: EchoMsg) -> Result<EchoMsg, Status> {
        self.call(FAIL, msg).await
    }

    async fn call(&mut self, path: &'static str, msg: EchoMsg) -> Result<EchoMsg, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let codec = tonic_prost::ProstCodec::<EchoMsg, EchoMsg>::default();
        let path = http::uri::PathAndQuery::from_static(path);
        Ok(self
            .grpc
            .unary(Request::new(msg), path, codec)
            .await?
            .into_inner())
    }

    pub async fn bidi(
        &mut self,
        input: impl Stream<Item = EchoMsg> + Send + 'static,
    ) -> Result<Streaming<EchoMsg>, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let codec = tonic_prost::ProstCodec::<EchoMsg, EchoMsg>::default();
        let path = http::uri::PathAndQuery::from_static(BIDI);
        Ok(self
            .grpc
            .streaming(Request::new(input), path, codec)
            .await?
            .into_inner())
    }
}
