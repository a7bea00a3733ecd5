//! A real OTLP trace receiver for the tracing tests: the collector's TraceService from
//! the official OpenTelemetry protobuf definitions (opentelemetry-proto's generated
//! tonic server), on port 4317 in a pod of its own, and OTLP/HTTP with protobuf bodies
//! (`POST /v1/traces`, the same ExportTraceServiceRequest message) on port 4318; or both
//! on loopback ports of their own (the CLI tests include this file too). It keeps every
//! span it is sent.

use anyhow::anyhow;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use std::collections::HashMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const GRPC_PORT: u16 = 4317;
pub const HTTP_PORT: u16 = 4318;

/// One span as the receiver got it.
#[derive(Clone, Debug)]
pub struct Span {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP SpanKind: 2 SERVER, 3 CLIENT.
    pub kind: i32,
    pub attributes: HashMap<String, String>,
    /// OTLP StatusCode: 0 unset, 1 ok, 2 error.
    pub status: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    /// "grpc" or "http": how it arrived.
    pub via: &'static str,
}

/// The proxies' own operations (`identity.certify`, ...).
pub const INTERNAL: i32 = 1;
pub const SERVER: i32 = 2;
pub const CLIENT: i32 = 3;

type Store = Arc<Mutex<Vec<Span>>>;

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn keep(store: &Store, req: ExportTraceServiceRequest, via: &'static str) {
    let mut spans = store.lock().unwrap();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
            .map(|a| value(&a.value))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                spans.push(Span {
                    service: service.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name,
                    kind: s.kind,
                    attributes: s
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), value(&a.value)))
                        .collect(),
                    status: s.status.map_or(0, |st| st.code),
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                    via,
                });
            }
        }
    }
}

/// OTLP/HTTP: `POST /v1/traces` with a protobuf ExportTraceServiceRequest.
async fn http_export(
    store: &Store,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, hyper::http::Error> {
    let path_ok = req.uri().path() == "/v1/traces";
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let export = body
        .ok()
        .and_then(|b| ExportTraceServiceRequest::decode(b).ok());
    match (path_ok, export) {
        (true, Some(export)) => {
            keep(store, export, "http");
            let body = ExportTraceServiceResponse {
                partial_success: None,
            }
            .encode_to_vec();
            hyper::Response::builder()
                .header("content-type", "application/x-protobuf")
                .body(Full::new(Bytes::from(body)))
        }
        _ => hyper::Response::builder()
            .status(400)
            .body(Full::new(Bytes::from_static(b"not an OTLP export"))),
    }
}

struct Collector(Store);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.0, request.into_inner(), "grpc");
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

pub struct Receiver {
    /// `https` when it serves TLS.
    scheme: &'static str,
    grpc: SocketAddr,
    http: SocketAddr,
    spans: Store,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Starts the receiver in network namespace `ns` (a pod that needs no sidecar) on
    /// 0.0.0.0 and the standard ports; it is reached at `ip`, the pod's address.
    pub fn start_in_namespace(ns: &str, ip: Ipv4Addr) -> anyhow::Result<Receiver> {
        let netns = File::open(format!("/run/netns/{ns}"))?;
        Self::start(
            Some(netns),
            Ipv4Addr::UNSPECIFIED,
            ip,
            (GRPC_PORT, HTTP_PORT),
            None,
        )
    }

    /// As `start_in_namespace`, serving both ports over TLS with `cert` and `key`
    /// (PEM): the https collector a proxy verifies with a CA file.
    #[allow(dead_code)]
    pub fn start_tls_in_namespace(
        ns: &str,
        ip: Ipv4Addr,
        cert: String,
        key: String,
    ) -> anyhow::Result<Receiver> {
        let netns = File::open(format!("/run/netns/{ns}"))?;
        Self::start(
            Some(netns),
            Ipv4Addr::UNSPECIFIED,
            ip,
            (GRPC_PORT, HTTP_PORT),
            Some((cert, key)),
        )
    }

    /// Starts the receiver on loopback ports of its own (for the CLI tests).
    #[allow(dead_code)]
    pub fn start_on_loopback() -> anyhow::Result<Receiver> {
        Self::start(None, Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, (0, 0), None)
    }

    fn start(
        netns: Option<File>,
        bind: Ipv4Addr,
        ip: Ipv4Addr,
        (grpc_port, http_port): (u16, u16),
        tls: Option<(String, String)>,
    ) -> anyhow::Result<Receiver> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let acceptor = match &tls {
            Some((cert, key)) => {
                use rustls::pki_types::pem::PemObject;
                let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()?;
                let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())?;
                let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(certs, key)?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
            None => None,
        };
        let spans: Store = Arc::default();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<(u16, u16)>>();
        let store = spans.clone();
        let thread = std::thread::spawn(move || {
            let run = || -> anyhow::Result<tokio::runtime::Runtime> {
                if let Some(netns) = &netns {
                    nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                }
                Ok(tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?)
            };
            let rt = match run() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let grpc = tokio::net::TcpListener::bind((bind, grpc_port)).await;
                let http = tokio::net::TcpListener::bind((bind, http_port)).await;
                let bound = |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.port());
                let (grpc, http, ports) = match (grpc, http) {
                    (Ok(g), Ok(h)) => match (bound(&g), bound(&h)) {
                        (Ok(gp), Ok(hp)) => (g, h, (gp, hp)),
                        (Err(e), _) | (_, Err(e)) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    },
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(ports));
                let mut builder = tonic::transport::Server::builder();
                if let Some((cert, key)) = &tls {
                    let config = tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(cert, key));
                    builder = match builder.tls_config(config) {
                        Ok(b) => b,
                        Err(e) => panic!("the receiver's TLS configuration: {e}"),
                    };
                }
                let grpc_server = builder
                    .add_service(TraceServiceServer::new(Collector(store.clone())))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc));
                let http_server = async move {
                    loop {
                        let Ok((stream, _)) = http.accept().await else {
                            continue;
                        };
                        let store = store.clone();
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(
                                move |req: hyper::Request<hyper::body::Incoming>| {
                                    let store = store.clone();
                                    async move { http_export(&store, req).await }
                                },
                            );
                            let http1 = hyper::server::conn::http1::Builder::new();
                            let _ = match acceptor {
                                Some(a) => match a.accept(stream).await {
                                    Ok(tls) => {
                                        http1
                                            .serve_connection(
                                                hyper_util::rt::TokioIo::new(tls),
                                                svc,
                                            )
                                            .await
                                    }
                                    Err(_) => return,
                                },
                                None => {
                                    http1
                                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                        .await
                                }
                            };
                        });
                    }
                };
                let mut stopped = stopped;
                tokio::select! {
                    _ = async { tokio::join!(grpc_server, http_server) } => {}
                    _ = stopped.wait_for(|v| *v) => {}
                }
            });
            // Connections still open (the proxies keep theirs) are cut.
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        let (grpc_port, http_port) = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("the OTLP receiver did not start"))??;
        Ok(Receiver {
            scheme,
            grpc: SocketAddr::from((ip, grpc_port)),
            http: SocketAddr::from((ip, http_port)),
            spans,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn grpc_url(&self) -> String {
        format!("{}://{}", self.scheme, self.grpc)
    }

    pub fn http_url(&self) -> String {
        format!("{}://{}", self.scheme, self.http)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// The spans of trace `trace_id`.
    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
