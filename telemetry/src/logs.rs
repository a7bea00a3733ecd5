//! The process's logging: a `tracing` subscriber whose filter comes from `GOFE_LOG` and
//! can be changed at run time, writing plain text or JSON lines to stderr; beside it,
//! the layer that turns operation spans (`crate::ops`) into OpenTelemetry spans. Each
//! has a filter of its own, so `GOFE_LOG=warn` quiets the log without losing the spans.

use crate::ops::OpsTracer;
use std::str::FromStr;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(LogFormat::Plain),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected plain or json".into()),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Plain => "plain",
            LogFormat::Json => "json",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log filter {filter:?}: {reason}")]
    Filter { filter: String, reason: String },
    #[error("the log filter can no longer be changed: {0}")]
    Reload(String),
}

/// Checks a filter directive string (`info,gofe_proxy=debug`) without installing it.
pub fn parse_filter(filter: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::builder()
        .parse(filter)
        .map_err(|e| LogError::Filter {
            filter: filter.to_string(),
            reason: e.to_string(),
        })
}

/// Changes the installed filter at run time (the admin server's `/log-level`).
#[derive(Clone)]
pub struct LogHandle {
    reload: reload::Handle<EnvFilter, Registry>,
    current: std::sync::Arc<parking_lot::Mutex<String>>,
    ops: OpsTracer,
}

impl LogHandle {
    pub fn current(&self) -> String {
        self.current.lock().clone()
    }

    /// Exports operation spans with `tracer` (its pipeline, its `service.name`) from now
    /// on; false when another tracer was installed first.
    pub fn trace_operations(&self, tracer: &crate::trace::Tracer) -> bool {
        self.ops.install(tracer.operations())
    }

    pub fn set(&self, filter: &str) -> Result<(), LogError> {
        let parsed = parse_filter(filter)?;
        self.reload
            .reload(parsed)
            .map_err(|e| LogError::Reload(e.to_string()))?;
        *self.current.lock() = filter.to_string();
        Ok(())
    }
}

/// Installs the global subscriber. Call once, early in `main`.
pub fn init(filter: &str, format: LogFormat) -> Result<LogHandle, LogError> {
    let (filter_layer, reload) = reload::Layer::new(parse_filter(filter)?);
    let ops = OpsTracer::new();
    let fmt = match format {
        LogFormat::Plain => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(true)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter_layer))
        .with(ops_layer(ops.clone()))
        .init();
    Ok(LogHandle {
        reload,
        current: std::sync::Arc::new(parking_lot::Mutex::new(filter.to_string())),
        ops,
    })
}

/// Operation spans, and the events at info or above inside them (debug events stay
/// out: those are the hot path's, and must cost nothing when the log is quiet).
fn ops_layer<S>(tracer: OpsTracer) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            if meta.is_span() {
                meta.target() == crate::ops::TARGET
            } else {
                *meta.level() <= tracing::Level::INFO
            }
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_filter_is_refused_with_its_text() {
        let err = parse_filter("info,gofe=notalevel").unwrap_err();
        assert!(err.to_string().contains("gofe=notalevel"), "{err}");
        assert!(parse_filter("info,gofe_proxy=debug").is_ok());
    }

    #[test]
    fn log_format_parses_both_names() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!("plain".parse::<LogFormat>().unwrap(), LogFormat::Plain);
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
