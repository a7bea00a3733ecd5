//! The process's logging: a `tracing` subscriber whose filter comes from `GOFE_LOG` and
//! can be changed at run time, writing plain text or JSON lines to stderr.

use std::str::FromStr;
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
}

impl LogHandle {
    pub fn current(&self) -> String {
        self.current.lock().clone()
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
    let registry = tracing_subscriber::registry().with(filter_layer);
    match format {
        LogFormat::Plain => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(true),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    Ok(LogHandle {
        reload,
        current: std::sync::Arc::new(parking_lot::Mutex::new(filter.to_string())),
    })
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
