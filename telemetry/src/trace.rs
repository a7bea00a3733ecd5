//! Traces: a span per proxied request (SERVER inbound, CLIENT outbound) named and
//! described by the OpenTelemetry HTTP semantic conventions, its context read from W3C
//! `traceparent`/`tracestate` or B3 (single or multi header) and written on, sampled
//! parent-based with a ratio for new traces, and exported over OTLP (gRPC or
//! HTTP/protobuf) in batches from a bounded queue whose drops are counted.
//!
//! Each proxy has its own tracer provider (its own `service.name`), so several proxies
//! can run in one process, as the demo runs them.

use crate::metrics::Counter;
use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, Status, TraceContextExt, TraceFlags, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter, SpanProcessor,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

pub use opentelemetry::trace::SpanKind;
pub use opentelemetry_sdk::trace::SpanData as ExportedSpan;

/// B3 as it came: one `b3` header, or `x-b3-*` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum B3 {
    Single,
    Multi,
}

/// The B3 propagator of opentelemetry-zipkin, the OpenTelemetry Rust project's one
/// implementation of B3. The crate is marked deprecated as a whole because its Zipkin
/// *exporter* is (Zipkin now takes OTLP); its propagator has no successor yet.
#[allow(deprecated)]
fn b3_propagator(b3: B3) -> opentelemetry_zipkin::Propagator {
    opentelemetry_zipkin::Propagator::with_encoding(match b3 {
        B3::Single => opentelemetry_zipkin::B3Encoding::SingleHeader,
        B3::Multi => opentelemetry_zipkin::B3Encoding::MultipleHeader,
    })
}

/// Spans waiting for export at most; beyond it new spans are dropped and counted.
pub const QUEUE_SIZE: usize = 2048;
const BATCH_SIZE: usize = 512;
/// How long a span waits at most before its batch is sent.
const EXPORT_DELAY: Duration = Duration::from_millis(1000);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" => Ok(Protocol::HttpProtobuf),
            _ => Err("expected grpc or http/protobuf".into()),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        })
    }
}

/// Checks a collector URL: `http://host:port` or `https://host:port` (then with a CA
/// file to verify it), optionally with a path for HTTP/protobuf.
pub fn parse_collector(s: &str) -> Result<String, String> {
    const EXPECTED: &str = "expected a URL such as http://jaeger-collector.observability:4317 (or https:// with GOFE_TRACE_COLLECTOR_CA)";
    let uri: http::Uri = s.parse().map_err(|_| EXPECTED)?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(s.to_string()),
        _ => Err(EXPECTED.into()),
    }
}

/// Whether a collector URL asks for TLS.
pub fn is_https(collector: &str) -> bool {
    collector.starts_with("https://")
}

/// Checks a PEM bundle of CA certificates for an https collector: at least one
/// certificate, every one of them parsing.
pub fn parse_ca_pem(pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("a PEM file of CA certificates ({e})"))?;
        roots
            .add(cert)
            .map_err(|e| format!("a PEM file of CA certificates ({e})"))?;
    }
    if roots.is_empty() {
        return Err("a PEM file holding at least one CA certificate".into());
    }
    Ok(roots)
}

/// Spans kept in memory for the demo to show (besides any collector).
#[derive(Clone, Debug, Default)]
pub struct LocalSpans {
    spans: Arc<parking_lot::Mutex<std::collections::VecDeque<SpanData>>>,
}

const LOCAL_SPANS: usize = 10_000;

impl LocalSpans {
    /// The spans exported so far (the newest `LOCAL_SPANS`).
    pub fn spans(&self) -> Vec<SpanData> {
        self.spans.lock().iter().cloned().collect()
    }
}

impl SpanExporter for LocalSpans {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut spans = self.spans.lock();
        for s in batch {
            if spans.len() == LOCAL_SPANS {
                spans.pop_front();
            }
            spans.push_back(s);
        }
        Ok(())
    }
}

pub struct TraceConfig {
    /// The OTLP collector, if any.
    pub collector: Option<(String, Protocol)>,
    /// PEM CA certificates that verify an https collector.
    pub collector_ca: Option<Vec<u8>>,
    /// Also keep spans in memory.
    pub local: Option<LocalSpans>,
    /// For traces this proxy starts (a parent's decision is honoured).
    pub sample_ratio: f64,
    pub service_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot set up the OTLP exporter to {collector}: {reason}")]
    Exporter { collector: String, reason: String },
}

/// Counts of spans by what became of them: every span (`all`), and of them the
/// process's own operations (`crate::ops`); the rest are requests'.
#[derive(Debug, Default)]
pub struct SpanCounts {
    pub all: Outcomes,
    pub operations: Outcomes,
}

/// What became of spans.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Handed to the export queue.
    pub queued: Counter,
    /// Not queued: the queue was full.
    pub dropped: Counter,
    /// Accepted by the collector.
    pub exported: Counter,
    /// Sent to the collector, which failed or did not answer in time.
    pub failed: Counter,
}

/// The instrumentation scope of operation spans.
const OPS_SCOPE: &str = "gofe.ops";

fn is_operation(span: &SpanData) -> bool {
    span.instrumentation_scope.name() == OPS_SCOPE
}

/// A proxy's tracer. Cheap to clone.
#[derive(Clone)]
pub struct Tracer {
    inner: Arc<Inner>,
}

struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    counts: Arc<SpanCounts>,
    /// Decides for a B3 parent that left the decision to us.
    ratio: Sampler,
}

impl Tracer {
    /// Builds the exporters and the provider. Must be called within a Tokio runtime,
    /// which then runs the exports.
    pub fn new(config: TraceConfig) -> Result<Tracer, TraceError> {
        let counts = Arc::new(SpanCounts::default());
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| TraceError::Exporter {
            collector: "(any)".into(),
            reason: format!("not within a Tokio runtime: {e}"),
        })?;
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let mut builder = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource);
        if let Some((collector, protocol)) = &config.collector {
            let failed = |e: &dyn std::fmt::Display| TraceError::Exporter {
                collector: collector.clone(),
                reason: e.to_string(),
            };
            let tls = match (is_https(collector), &config.collector_ca) {
                (false, _) => None,
                (true, Some(pem)) => Some(pem.clone()),
                (true, None) => {
                    return Err(failed(&"an https collector needs GOFE_TRACE_COLLECTOR_CA"));
                }
            };
            let exporter = match protocol {
                Protocol::Grpc => {
                    use opentelemetry_otlp::WithTonicConfig;
                    let mut builder = opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(collector.clone())
                        .with_timeout(EXPORT_TIMEOUT);
                    if let Some(pem) = &tls {
                        use opentelemetry_otlp::tonic_types::transport::{
                            Certificate, ClientTlsConfig,
                        };
                        let host = collector
                            .parse::<http::Uri>()
                            .ok()
                            .and_then(|u| u.host().map(str::to_string))
                            .unwrap_or_default();
                        builder = builder.with_tls_config(
                            ClientTlsConfig::new()
                                .ca_certificate(Certificate::from_pem(pem))
                                .domain_name(host.trim_start_matches('[').trim_end_matches(']')),
                        );
                    }
                    builder.build().map_err(|e| failed(&e))?
                }
                Protocol::HttpProtobuf => {
                    use opentelemetry_otlp::WithHttpConfig;
                    let mut builder = opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                        .with_endpoint(http_traces_url(collector))
                        .with_timeout(EXPORT_TIMEOUT);
                    if let Some(pem) = &tls {
                        builder =
                            builder.with_http_client(https_client(pem).map_err(|e| failed(&e))?);
                    }
                    builder.build().map_err(|e| failed(&e))?
                }
            };
            builder = builder.with_span_processor(Bounded::new(
                OnRuntime::new(exporter, runtime.clone(), Some(counts.clone())),
                counts.clone(),
            ));
        }
        if let Some(local) = config.local {
            builder = builder.with_span_processor(Bounded::new(
                OnRuntime::new(local, runtime, None),
                Arc::new(SpanCounts::default()),
            ));
        }
        let provider = builder.build();
        let tracer = provider.tracer("gofe");
        Ok(Tracer {
            inner: Arc::new(Inner {
                provider,
                tracer,
                counts,
                ratio: Sampler::TraceIdRatioBased(config.sample_ratio),
            }),
        })
    }

    pub fn counts(&self) -> &SpanCounts {
        &self.inner.counts
    }

    /// A tracer for the process's own operations (`crate::ops`), exporting through the
    /// same pipeline under the same `service.name`.
    pub fn operations(&self) -> SdkTracer {
        self.inner.provider.tracer(OPS_SCOPE)
    }

    /// Starts the span of a request that came in with `headers`, as a child of the
    /// context they carry (W3C first, else B3), or as the root of a new trace.
    pub fn start(&self, request: &RequestInfo<'_>, headers: &HeaderMap) -> RequestSpan {
        let (parent, b3) = extract(headers);
        let parent = if request.trust_sampling {
            self.decide_for_b3(parent)
        } else {
            self.decide_by_ratio(parent)
        };
        let method = known_method(request.method);
        let mut span = self
            .inner
            .tracer
            .span_builder(method.unwrap_or("HTTP"))
            .with_kind(request.kind.clone())
            .with_start_time(request.start)
            .start_with_context(&self.inner.tracer, &parent);
        // An unsampled span costs no attributes.
        if span.is_recording() {
            span.set_attributes(request_attributes(request, method));
        }
        RequestSpan {
            span,
            kind: request.kind.clone(),
            b3,
        }
    }

    /// An untrusted parent: its trace goes on, sampled as the ratio decides for its
    /// trace id, whatever it asked for.
    fn decide_by_ratio(&self, parent: Context) -> Context {
        let sc = parent.span().span_context().clone();
        if !sc.is_valid() {
            return parent;
        }
        let flags = if self.ratio_samples(sc.trace_id()) {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            sc.trace_id(),
            sc.span_id(),
            flags,
            true,
            sc.trace_state().clone(),
        ))
    }

    fn ratio_samples(&self, trace_id: opentelemetry::trace::TraceId) -> bool {
        use opentelemetry_sdk::trace::ShouldSample;
        let r = self
            .inner
            .ratio
            .should_sample(None, trace_id, "", &SpanKind::Server, &[], &[]);
        r.decision == opentelemetry_sdk::trace::SamplingDecision::RecordAndSample
    }

    /// A B3 parent may carry no sampling decision ("deferred": `b3: trace-span`, or no
    /// `x-b3-sampled`) or ask for one ("debug", `-d` / `x-b3-flags: 1`): debug is
    /// sampled, and deferred is decided here by the ratio, as for a new trace.
    fn decide_for_b3(&self, parent: Context) -> Context {
        const DEFERRED: u8 = 0x02;
        const DEBUG: u8 = 0x04;
        let sc = parent.span().span_context().clone();
        let flags = sc.trace_flags().to_u8();
        if !sc.is_valid() || flags & (DEFERRED | DEBUG) == 0 {
            return parent;
        }
        let sampled = flags & DEBUG != 0 || self.ratio_samples(sc.trace_id());
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            sc.trace_id(),
            sc.span_id(),
            flags,
            true,
            sc.trace_state().clone(),
        ))
    }

    /// Exports what is queued and stops; blocks up to `timeout`.
    pub fn shutdown(&self, timeout: Duration) {
        let _ = self.inner.provider.shutdown_with_timeout(timeout);
    }
}

/// An HTTP client for OTLP/HTTP over TLS, verifying the collector with `ca_pem`.
fn https_client(
    ca_pem: &[u8],
) -> Result<opentelemetry_http::hyper::HyperClient<HttpsConnector>, String> {
    let roots = parse_ca_pem(ca_pem)?;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(opentelemetry_http::hyper::HyperClient::new(
        connector,
        EXPORT_TIMEOUT,
        None,
    ))
}

type HttpsConnector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// The HTTP/protobuf URL of traces: the collector's, with `/v1/traces` when it names
/// no path.
fn http_traces_url(collector: &str) -> String {
    let trimmed = collector.trim_end_matches('/');
    match trimmed.parse::<http::Uri>() {
        Ok(u) if u.path() == "/" || u.path().is_empty() => format!("{trimmed}/v1/traces"),
        _ => collector.to_string(),
    }
}

/// The HTTP semantic-convention attributes of a request's start.
fn request_attributes(request: &RequestInfo<'_>, method: Option<&'static str>) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(11);
    attributes.push(KeyValue::new(
        "http.request.method",
        method.unwrap_or("_OTHER"),
    ));
    if method.is_none() {
        attributes.push(KeyValue::new(
            "http.request.method_original",
            request.method.to_string(),
        ));
    }
    attributes.push(KeyValue::new("url.path", request.path.to_string()));
    attributes.push(KeyValue::new("url.scheme", "http"));
    if let Some(host) = request.server_host {
        attributes.push(KeyValue::new("server.address", host.to_string()));
    }
    if let Some(port) = request.server_port {
        attributes.push(KeyValue::new("server.port", i64::from(port)));
    }
    attributes.push(KeyValue::new(
        "network.protocol.version",
        request.protocol_version,
    ));
    // Inbound, the peer is the client; outbound, the endpoint (set at the end).
    if let (Some(peer), SpanKind::Server) = (request.client, &request.kind) {
        attributes.push(KeyValue::new("client.address", peer.ip().to_string()));
        attributes.push(KeyValue::new("network.peer.address", peer.ip().to_string()));
        attributes.push(KeyValue::new("network.peer.port", i64::from(peer.port())));
    }
    if let Some(ua) = request.user_agent {
        attributes.push(KeyValue::new("user_agent.original", ua.to_string()));
    }
    attributes
}

fn known_method(m: &http::Method) -> Option<&'static str> {
    Some(match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        http::Method::TRACE => "TRACE",
        http::Method::CONNECT => "CONNECT",
        _ => return None,
    })
}

/// The parent context `headers` carry (W3C when they have a valid `traceparent`,
/// else B3), and which B3 encoding came, if any: B3 is passed on the same way.
fn extract(headers: &HeaderMap) -> (Context, Option<B3>) {
    let empty = Context::new();
    let b3 = if headers.contains_key("b3") {
        Some(B3::Single)
    } else if headers.contains_key("x-b3-traceid") {
        Some(B3::Multi)
    } else {
        None
    };
    if headers.contains_key("traceparent") {
        let cx =
            TraceContextPropagator::new().extract_with_context(&empty, &HeaderExtractor(headers));
        if cx.span().span_context().is_valid() {
            return (cx, b3);
        }
    }
    let Some(encoding) = b3 else {
        return (empty, None);
    };
    let cx = b3_propagator(encoding).extract_with_context(&empty, &HeaderExtractor(headers));
    if cx.span().span_context().is_valid() {
        (cx, b3)
    } else {
        (empty, None)
    }
}

/// What the start of a request tells its span.
pub struct RequestInfo<'a> {
    pub kind: SpanKind,
    pub start: SystemTime,
    pub method: &'a http::Method,
    pub path: &'a str,
    pub server_host: Option<&'a str>,
    pub server_port: Option<u16>,
    /// The application that sent the request.
    pub client: Option<SocketAddr>,
    /// `1.0`, `1.1` or `2`.
    pub protocol_version: &'static str,
    pub user_agent: Option<&'a str>,
    /// Whether the sender may decide sampling: its `traceparent` flags and B3 debug are
    /// honoured. An untrusted sender's trace is continued (same trace id) but sampled by
    /// the ratio, so that no client can force every span out to the collector.
    pub trust_sampling: bool,
}

/// What the end of a request tells its span.
#[derive(Default)]
pub struct ResponseInfo<'a> {
    /// None when no response was sent (the connection broke).
    pub status: Option<u16>,
    pub grpc_status: Option<u16>,
    /// The mesh identity of the other proxy.
    pub peer_identity: Option<&'a str>,
    pub retries: u32,
    /// The endpoint the (last) attempt went to, outbound.
    pub endpoint: Option<SocketAddr>,
    /// Why the proxy failed the request, when it did.
    pub error: Option<&'a str>,
    /// The traffic rule's route and backend, when one applied.
    pub route: Option<(&'a str, &'a str)>,
}

/// One request's span, from its start to the end of its response body.
pub struct RequestSpan {
    span: opentelemetry_sdk::trace::Span,
    kind: SpanKind,
    b3: Option<B3>,
}

impl RequestSpan {
    pub fn span_context(&self) -> &SpanContext {
        self.span.span_context()
    }

    /// Writes this span's context into the request going on: W3C always (replacing
    /// what came), and B3 in the encoding it came in.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let cx = Context::new().with_remote_span_context(self.span.span_context().clone());
        headers.remove("traceparent");
        headers.remove("tracestate");
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
        if headers.get("tracestate").is_some_and(|v| v.is_empty()) {
            headers.remove("tracestate");
        }
        if let Some(encoding) = self.b3 {
            for h in [
                "b3",
                "x-b3-traceid",
                "x-b3-spanid",
                "x-b3-parentspanid",
                "x-b3-sampled",
                "x-b3-flags",
            ] {
                headers.remove(h);
            }
            b3_propagator(encoding).inject_context(&cx, &mut HeaderInjector(headers));
            if encoding == B3::Single {
                // The propagator writes the multi headers with the single one.
                for h in ["x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"] {
                    headers.remove(h);
                }
            }
        }
    }

    /// Ends the span now.
    pub fn end(mut self, response: &ResponseInfo<'_>) {
        if !self.span.is_recording() {
            return;
        }
        if let Some(status) = response.status {
            self.span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        if let Some(g) = response.grpc_status {
            self.span
                .set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(g)));
        }
        if let Some(peer) = response.peer_identity {
            self.span
                .set_attribute(KeyValue::new("gofe.peer_identity", peer.to_string()));
        }
        self.span
            .set_attribute(KeyValue::new("gofe.retries", i64::from(response.retries)));
        if let Some((route, backend)) = response.route {
            self.span
                .set_attribute(KeyValue::new("gofe.route", route.to_string()));
            self.span
                .set_attribute(KeyValue::new("gofe.backend", backend.to_string()));
        }
        if let (Some(e), SpanKind::Client) = (response.endpoint, &self.kind) {
            self.span
                .set_attribute(KeyValue::new("network.peer.address", e.ip().to_string()));
            self.span
                .set_attribute(KeyValue::new("network.peer.port", i64::from(e.port())));
        }
        // gRPC statuses that mean the server failed (the semantic conventions' list).
        const GRPC_SERVER_ERRORS: [u16; 6] = [2, 4, 12, 13, 14, 15];
        if let Some(error) = response.error {
            let kind = response
                .status
                .map_or("no response".to_string(), |s| s.to_string());
            self.span.set_attribute(KeyValue::new("error.type", kind));
            self.span.set_status(Status::error(error.to_string()));
        } else if let Some(s) = response.status.filter(|s| *s >= 500) {
            self.span
                .set_attribute(KeyValue::new("error.type", s.to_string()));
            self.span.set_status(Status::error(""));
        } else if let Some(g) = response
            .grpc_status
            .filter(|g| GRPC_SERVER_ERRORS.contains(g))
        {
            self.span
                .set_attribute(KeyValue::new("error.type", format!("grpc {g}")));
            self.span.set_status(Status::error(""));
        }
        self.span.end();
    }
}

/// Puts a bound on the spans waiting for export, and counts those past it: the
/// batch processor behind it holds more than the bound, so it never drops any itself
/// (its own count of drops is private).
#[derive(Debug)]
struct Bounded {
    batch: BatchSpanProcessor,
    waiting: Arc<AtomicUsize>,
    counts: Arc<SpanCounts>,
}

impl Bounded {
    fn new<E: SpanExporter + 'static>(mut exporter: OnRuntime<E>, counts: Arc<SpanCounts>) -> Self {
        let waiting = Arc::new(AtomicUsize::new(0));
        exporter.waiting = waiting.clone();
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(QUEUE_SIZE + BATCH_SIZE)
                    .with_max_export_batch_size(BATCH_SIZE)
                    .with_scheduled_delay(EXPORT_DELAY)
                    .build(),
            )
            .build();
        Bounded {
            batch,
            waiting,
            counts,
        }
    }
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.batch.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let operation = is_operation(&span);
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= QUEUE_SIZE {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.counts.all.dropped.inc();
            if operation {
                self.counts.operations.dropped.inc();
            }
            return;
        }
        self.counts.all.queued.inc();
        if operation {
            self.counts.operations.queued.inc();
        }
        self.batch.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.batch.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.batch.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.batch.set_resource(resource);
    }
}

/// Runs an exporter's exports on the proxy's Tokio runtime (the batch processor calls
/// it from its own thread, where the gRPC and HTTP clients would find no runtime), and
/// counts what it exported.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    runtime: tokio::runtime::Handle,
    counts: Option<Arc<SpanCounts>>,
    waiting: Arc<AtomicUsize>,
}

impl<E: SpanExporter + 'static> OnRuntime<E> {
    fn new(inner: E, runtime: tokio::runtime::Handle, counts: Option<Arc<SpanCounts>>) -> Self {
        OnRuntime {
            inner: Arc::new(inner),
            runtime,
            counts,
            waiting: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        let operations = batch.iter().filter(|s| is_operation(s)).count() as u64;
        // Out of the queue: room for new spans.
        self.waiting.fetch_sub(
            n.min(self.waiting.load(Ordering::Acquire)),
            Ordering::AcqRel,
        );
        let inner = self.inner.clone();
        let counts = self.counts.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.runtime.spawn(async move {
            let result = inner.export(batch).await;
            if let Some(c) = &counts {
                let (all, ops) = match &result {
                    Ok(()) => (&c.all.exported, &c.operations.exported),
                    Err(_) => (&c.all.failed, &c.operations.failed),
                };
                all.add(n as u64);
                ops.add(operations);
            }
            let _ = tx.send(result);
        });
        async move {
            rx.await.unwrap_or_else(|_| {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    "the runtime stopped before the export ended".into(),
                ))
            })
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_urls_are_checked() {
        assert!(parse_collector("http://jaeger-collector.observability:4317").is_ok());
        assert!(parse_collector("http://otel:4318/v1/traces").is_ok());
        assert!(parse_collector("https://otel:4318").is_ok());
        assert!(parse_collector("jaeger:4317").is_err());
        assert!(parse_collector("ftp://x:1").is_err());
    }

    #[test]
    fn http_url_gets_the_traces_path_unless_it_names_one() {
        assert_eq!(http_traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            http_traces_url("http://c:4318/custom"),
            "http://c:4318/custom"
        );
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn w3c_wins_over_b3_and_b3_is_read_in_both_encodings() {
        let w3c = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (cx, b3) = extract(&headers(&[
            ("traceparent", w3c),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ]));
        // W3C is the parent; B3 is still written on.
        assert_eq!(b3, Some(B3::Single));
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );

        let (cx, b3) = extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1",
        )]));
        assert_eq!(b3, Some(B3::Single));
        assert_eq!(
            cx.span().span_context().span_id().to_string(),
            "e457b5a2e4d86bd1"
        );
        assert!(cx.span().span_context().is_sampled());

        let (cx, b3) = extract(&headers(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "0"),
        ]));
        assert_eq!(b3, Some(B3::Multi));
        assert!(!cx.span().span_context().is_sampled());

        let (cx, b3) = extract(&headers(&[("traceparent", "garbage")]));
        assert!(!cx.span().span_context().is_valid());
        assert_eq!(b3, None);
    }

    fn tracer(ratio: f64) -> (tokio::runtime::Runtime, Tracer) {
        // Worker threads run the exports (at the provider's shutdown, when dropped).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let t = rt.block_on(async {
            Tracer::new(TraceConfig {
                collector: None,
                collector_ca: None,
                local: Some(LocalSpans::default()),
                sample_ratio: ratio,
                service_name: "test".into(),
            })
            .unwrap()
        });
        (rt, t)
    }

    fn start(t: &Tracer, h: &HeaderMap) -> RequestSpan {
        start_trusting(t, h, true)
    }

    fn start_trusting(t: &Tracer, h: &HeaderMap, trust_sampling: bool) -> RequestSpan {
        t.start(
            &RequestInfo {
                kind: SpanKind::Server,
                start: SystemTime::now(),
                method: &http::Method::GET,
                path: "/",
                server_host: None,
                server_port: None,
                client: None,
                protocol_version: "1.1",
                user_agent: None,
                trust_sampling,
            },
            h,
        )
    }

    #[test]
    fn an_untrusted_sender_cannot_force_sampling_but_its_trace_goes_on() {
        let trace = "80f198ee56343ba864fe8b2a57d3eff7";
        let (_rt, t) = tracer(0.0);
        for h in [
            headers(&[("b3", &format!("{trace}-e457b5a2e4d86bd1-d"))]),
            headers(&[("b3", &format!("{trace}-e457b5a2e4d86bd1-1"))]),
            headers(&[("traceparent", &format!("00-{trace}-e457b5a2e4d86bd1-01"))]),
        ] {
            let span = start_trusting(&t, &h, false);
            assert!(!span.span_context().is_sampled(), "{h:?}");
            assert_eq!(span.span_context().trace_id().to_string(), trace);
            assert!(
                start_trusting(&t, &h, true).span_context().is_sampled(),
                "a trusted sender decides: {h:?}"
            );
        }
        let (_rt, t) = tracer(1.0);
        let h = headers(&[("traceparent", &format!("00-{trace}-e457b5a2e4d86bd1-00"))]);
        assert!(
            start_trusting(&t, &h, false).span_context().is_sampled(),
            "nor keep its trace out of the ratio"
        );
    }

    #[test]
    fn b3_debug_is_sampled_and_a_deferred_decision_follows_the_ratio() {
        let trace = "80f198ee56343ba864fe8b2a57d3eff7";
        for (ratio, header, sampled) in [
            (0.0, format!("{trace}-e457b5a2e4d86bd1-d"), true),
            (0.0, format!("{trace}-e457b5a2e4d86bd1"), false),
            (1.0, format!("{trace}-e457b5a2e4d86bd1"), true),
            (1.0, format!("{trace}-e457b5a2e4d86bd1-0"), false),
            (0.0, format!("{trace}-e457b5a2e4d86bd1-1"), true),
        ] {
            let (_rt, t) = tracer(ratio);
            let span = start(&t, &headers(&[("b3", &header)]));
            assert_eq!(
                span.span_context().is_sampled(),
                sampled,
                "ratio {ratio}, b3 {header}"
            );
            assert_eq!(span.span_context().trace_id().to_string(), trace);
            let mut out = HeaderMap::new();
            span.inject(&mut out);
            let flag = if sampled { "01" } else { "00" };
            assert!(
                out["traceparent"].to_str().unwrap().ends_with(flag),
                "{out:?}"
            );
        }
    }
}
