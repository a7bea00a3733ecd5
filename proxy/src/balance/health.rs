//! Active health checks: a task per destination whose policy has a `health_check`,
//! asking each endpoint every interval (HTTP GET of a path, grpc.health.v1
//! Health/Check, or a TCP connect) through the proxy's own client, so that a meshed
//! endpoint is checked over mTLS like any request to it. An endpoint failing
//! `unhealthy_threshold` checks in a row leaves the balancer until `healthy_threshold`
//! pass; passive outlier ejection goes on beside it. The task ends when its
//! destination's policy changes or the destination is forgotten.

use super::balancer::Balancer;
use super::state::EndpointState;
use crate::addrs::Direction;
use crate::body::request::RequestBody;
use crate::body::source::Source;
use crate::client::send::Client;
use crate::config::rules::{HealthCheck, HealthProtocol};
use crate::metrics::Metrics;
use bytes::{BufMut, Bytes, BytesMut};
use gofe_identity::tls::ALPN_TCP;
use http::{Request, Version, header};
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// What a checker needs.
pub struct Checker {
    pub check: HealthCheck,
    pub balancer: Arc<Balancer>,
    /// The destination's name: the Host (or :authority) of the checks, and its label.
    pub name: Arc<str>,
    pub client: Arc<Client>,
    pub metrics: Arc<Metrics>,
}

impl Checker {
    /// Runs until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.check.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let set = self.balancer.set();
            if set.source.knows() {
                self.balancer.sync(&set);
            }
            let endpoints = self.balancer.endpoints();
            let checks = endpoints.iter().map(|e| self.one(e));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = futures_util::future::join_all(checks) => {}
            }
        }
    }

    async fn one(&self, e: &Arc<EndpointState>) {
        let passed = tokio::time::timeout(self.check.timeout, self.probe(e))
            .await
            .unwrap_or(false);
        let endpoint: Arc<str> = e.endpoint.addr.to_string().into();
        self.metrics.health_checked(
            &self.name,
            &endpoint,
            if passed { "healthy" } else { "unhealthy" },
        );
        if let Some(now) = e.checked(
            passed,
            self.check.unhealthy_threshold,
            self.check.healthy_threshold,
        ) {
            info!(destination = %self.name, %endpoint, healthy = now, "health check state changed");
        }
    }

    async fn probe(&self, e: &Arc<EndpointState>) -> bool {
        let addr = e.endpoint.addr;
        let identity = e.endpoint.identity.as_ref();
        match self.check.protocol {
            HealthProtocol::Tcp => self
                .client
                .connector()
                .connect(Direction::Outbound, addr, identity, ALPN_TCP)
                .await
                .is_ok(),
            HealthProtocol::Http => {
                let path = self.check.path.as_deref().unwrap_or("/");
                let req = Request::get(path)
                    .header(header::HOST, &*self.name)
                    .header("user-agent", "gofe-health-check")
                    .body(RequestBody::empty());
                let Ok(req) = req else { return false };
                match self
                    .client
                    .send(Direction::Outbound, addr, identity, Box::new(req), false)
                    .await
                {
                    Ok((rsp, _)) => {
                        let status = rsp.status().as_u16();
                        // Read to the end, so that the connection goes back to its pool.
                        let _ = rsp.into_body().collect().await;
                        self.check.expected_statuses.contains(&status)
                    }
                    Err(f) => {
                        debug!(destination = %self.name, endpoint = %addr, error = %f.error, "health check failed");
                        false
                    }
                }
            }
            HealthProtocol::Grpc => self.grpc(e).await,
        }
    }

    /// grpc.health.v1.Health/Check: SERVING (1) in a response with grpc-status 0.
    async fn grpc(&self, e: &Arc<EndpointState>) -> bool {
        let service = self.check.service.as_deref().unwrap_or("");
        // HealthCheckRequest { string service = 1; }, in one length-prefixed message.
        let mut msg = BytesMut::new();
        if !service.is_empty() {
            msg.put_u8(0x0a);
            msg.put_u8(service.len().min(127) as u8);
            msg.put_slice(&service.as_bytes()[..service.len().min(127)]);
        }
        let mut frame = BytesMut::with_capacity(5 + msg.len());
        frame.put_u8(0);
        frame.put_u32(msg.len() as u32);
        frame.put_slice(&msg);
        let uri = format!("http://{}/grpc.health.v1.Health/Check", self.name);
        let req = Request::post(uri)
            .version(Version::HTTP_2)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(RequestBody::new(Source::boxed(Full::new(frame.freeze()))));
        let Ok(req) = req else { return false };
        let sent = self
            .client
            .send(
                Direction::Outbound,
                e.endpoint.addr,
                e.endpoint.identity.as_ref(),
                Box::new(req),
                false,
            )
            .await;
        let Ok((rsp, _)) = sent else { return false };
        if rsp.status() != http::StatusCode::OK {
            return false;
        }
        let head_status = crate::proto::grpc::status(rsp.headers());
        let Ok(body) = rsp.into_body().collect().await else {
            return false;
        };
        let status = body
            .trailers()
            .and_then(crate::proto::grpc::status)
            .or(head_status);
        let bytes: Bytes = body.to_bytes();
        // HealthCheckResponse { ServingStatus status = 1; }: SERVING is 1.
        status == Some(0) && bytes.len() >= 7 && bytes[5..7] == [0x08, 0x01]
    }
}
