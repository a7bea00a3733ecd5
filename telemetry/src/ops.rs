//! The process's own operations as spans: certificate requests and renewals,
//! discovery refreshes, configuration reloads, drains. Code anywhere makes them as
//! `tracing` spans with target [`TARGET`] (`info_span!(target: gofe_telemetry::ops::TARGET,
//! "identity.certify", ...)`), its events inside them becoming span events; the logging
//! subscriber hands them, through tracing-opentelemetry, to the tracer a proxy installs
//! with [`crate::logs::LogHandle::trace_operations`], so that they leave through the
//! same OTLP pipeline as request spans, under the same `service.name`. Until a tracer
//! is installed (or without a collector) they cost a span in the registry and nothing
//! is exported.

use opentelemetry::trace::{SpanBuilder, TracerProvider as _};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use std::sync::{Arc, OnceLock};

/// The target of operation spans.
pub const TARGET: &str = "gofe::ops";

/// The tracer operation spans go to: the proxy's, once it is installed; a tracer that
/// records nothing before that.
#[derive(Clone, Debug)]
pub struct OpsTracer {
    installed: Arc<OnceLock<SdkTracer>>,
    off: SdkTracer,
}

impl OpsTracer {
    pub(crate) fn new() -> OpsTracer {
        let off = SdkTracerProvider::builder()
            .with_sampler(Sampler::AlwaysOff)
            .build()
            .tracer("gofe.ops");
        OpsTracer {
            installed: Arc::new(OnceLock::new()),
            off,
        }
    }

    /// Sends operation spans to `tracer` from now on. The first one installed stays
    /// (a process runs one proxy; the demo's several share the first one's).
    pub(crate) fn install(&self, tracer: SdkTracer) -> bool {
        self.installed.set(tracer).is_ok()
    }
}

impl opentelemetry::trace::Tracer for OpsTracer {
    type Span = opentelemetry_sdk::trace::Span;

    fn build_with_context(
        &self,
        builder: SpanBuilder,
        parent_cx: &opentelemetry::Context,
    ) -> Self::Span {
        self.installed
            .get()
            .unwrap_or(&self.off)
            .build_with_context(builder, parent_cx)
    }
}
