//! Logs, traces and metrics.
//!
//! Logs are `tracing` events written to stderr, as text or JSON lines.
//! When `telemetry.otlp_endpoint` is set, the same `tracing` spans are also
//! exported as OpenTelemetry traces, and the [`Metrics`] instruments are
//! pushed, both over OTLP/gRPC; without it nothing leaves the process and
//! the instruments are no-ops.
//!
//! Spans: one per call (`grpc`, named after the method), with children
//! `decode`, `batch_wait`, `forward`, `search` and `database`. Only
//! identifiers, sizes and scores are recorded: never an image, never an
//! embedding.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, ObservableGauge, UpDownCounter};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::TelemetrySettings;

/// The instrumentation scope of every span and instrument.
pub const SCOPE: &str = "handid-server";

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("building the OTLP exporter for {endpoint}: {message}")]
    Exporter {
        /// The collector.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// A global subscriber was installed already.
    #[error("installing the log subscriber: {0}")]
    Subscriber(String),
}

/// The exporters; flushes what is pending when shut down.
#[derive(Debug, Default)]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
    metrics: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Exports the spans and metrics still buffered.
    pub fn flush(&self) {
        if let Some(traces) = &self.traces
            && let Err(e) = traces.force_flush()
        {
            tracing::warn!(error = %e, "flushing traces");
        }
        if let Some(metrics) = &self.metrics
            && let Err(e) = metrics.force_flush()
        {
            tracing::warn!(error = %e, "flushing metrics");
        }
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(self) {
        if let Some(traces) = self.traces {
            let _ = traces.shutdown();
        }
        if let Some(metrics) = self.metrics {
            let _ = metrics.shutdown();
        }
    }
}

/// Installs the global `tracing` subscriber (stderr logs filtered by
/// `RUST_LOG`, default `default_filter`) and, when an endpoint is set, the
/// OTLP trace and metric exporters. Call inside the Tokio runtime (the
/// exporter's channel needs it) and before the server starts, so the
/// [`metrics`] instruments bind to the exporting provider.
pub fn init(settings: &TelemetrySettings, default_filter: &str) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = if settings.json_logs {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    let mut telemetry = Telemetry::default();
    let traces = match &settings.otlp_endpoint {
        Some(endpoint) => {
            let resource = Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build();
            let failed = |e: opentelemetry_otlp::ExporterBuildError| TelemetryError::Exporter {
                endpoint: endpoint.clone(),
                message: e.to_string(),
            };
            let spans = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(failed)?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(spans)
                .with_resource(resource.clone())
                .build();
            let measurements = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(failed)?;
            let reader = PeriodicReader::builder(measurements)
                .with_interval(Duration::from_millis(settings.metrics_interval_ms))
                .build();
            let meters = SdkMeterProvider::builder()
                .with_reader(reader)
                .with_resource(resource)
                .build();
            opentelemetry::global::set_meter_provider(meters.clone());
            let tracer = provider.tracer(SCOPE);
            telemetry.traces = Some(provider);
            telemetry.metrics = Some(meters);
            // Only this crate's spans are exported: the exporter's own gRPC
            // client (tonic, h2, hyper) would otherwise trace its exports.
            Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(
                tracing_subscriber::filter::filter_fn(|meta| meta.target().starts_with("handid_server")),
            ))
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    if let Some(endpoint) = &settings.otlp_endpoint {
        tracing::info!(%endpoint, "exporting traces and metrics over OTLP/gRPC");
    }
    Ok(telemetry)
}

/// A caller's text as a span or log field: recorded before the call is
/// validated, so bounded and escaped. An identifier as the API allows it
/// (printable ASCII, at most [`FIELD_CHARS`] characters) is written as it
/// is; anything else is cut to that many characters, escaped (no line
/// break or control character reaches a log line or a trace backend), and
/// followed by its length in bytes. A caller cannot make a span hold
/// megabytes of its text.
pub fn caller_text(text: &str) -> CallerText<'_> {
    CallerText(text)
}

/// The characters of a caller's text a field keeps (an identifier's
/// longest).
pub const FIELD_CHARS: usize = 128;

/// See [`caller_text`].
#[derive(Debug, Clone, Copy)]
pub struct CallerText<'a>(&'a str);

impl std::fmt::Display for CallerText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.0;
        if text.len() <= FIELD_CHARS && text.bytes().all(|b| b.is_ascii_graphic()) {
            return f.write_str(text);
        }
        let mut chars = text.chars();
        for c in chars.by_ref().take(FIELD_CHARS) {
            write!(f, "{}", c.escape_debug())?;
        }
        if chars.next().is_some() {
            write!(f, "... ({} bytes)", text.len())?;
        }
        Ok(())
    }
}

/// The service's instruments. Names follow the OpenTelemetry semantic
/// conventions' style (`handid.<thing>`, seconds for durations).
#[derive(Debug, Clone)]
pub struct Metrics {
    calls: Histogram<f64>,
    batch_size: Histogram<u64>,
    queue_depth: UpDownCounter<i64>,
    scores: Histogram<f64>,
    reloads: Counter<u64>,
    forward_failures: Counter<u64>,
    follower_restarts: Counter<u64>,
    failed_changes: Counter<u64>,
    replication_lag: Gauge<f64>,
    audit_dropped: Counter<u64>,
    audit_unrecorded: Counter<u64>,
    pending_changes: Gauge<u64>,
    gallery_sizes: Arc<OnceLock<ObservableGauge<u64>>>,
}

/// The instruments, created on first use from the global meter provider.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = opentelemetry::global::meter(SCOPE);
        Metrics {
            calls: meter
                .f64_histogram("handid.rpc.duration")
                .with_unit("s")
                .with_description("Latency of gRPC calls, by method")
                .build(),
            batch_size: meter
                .u64_histogram("handid.batch.size")
                .with_description("Images per forward pass")
                .with_boundaries(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
                .build(),
            queue_depth: meter
                .i64_up_down_counter("handid.batch.queue_depth")
                .with_description("Images waiting for a forward pass")
                .build(),
            scores: meter
                .f64_histogram("handid.match.score")
                .with_description(
                    "Top score of Identify / Verify, by decision (match: genuine side, \
                     no_match: impostor side at the threshold applied)",
                )
                .with_boundaries((0..=20).map(|i| f64::from(i) / 10.0 - 1.0).collect())
                .build(),
            reloads: meter
                .u64_counter("handid.model.reloads")
                .with_description("Model reloads, by outcome")
                .build(),
            forward_failures: meter
                .u64_counter("handid.forward.failures")
                .with_description(
                    "Failed forward passes (kind=batch) and restarts of the forward loop (kind=restart)",
                )
                .build(),
            follower_restarts: meter
                .u64_counter("handid.replication.follower_restarts")
                .with_description("Times the change-feed follower died and was started again")
                .build(),
            failed_changes: meter
                .u64_counter("handid.replication.failed_changes")
                .with_description("Changes that kept failing to apply and were reported and passed over")
                .build(),
            replication_lag: meter
                .f64_gauge("handid.replication.lag")
                .with_unit("s")
                .with_description("Age of the oldest change this replica has not applied (0 when none)")
                .build(),
            pending_changes: meter
                .u64_gauge("handid.replication.pending_changes")
                .with_description("Changes committed that this replica has not applied")
                .build(),
            audit_dropped: meter
                .u64_counter("handid.audit.dropped")
                .with_description("Audit rows of refused calls dropped because the audit queue was full")
                .build(),
            audit_unrecorded: meter
                .u64_counter("handid.audit.unrecorded")
                .with_description(
                    "Calls refused by access control past their address's budget, counted instead of audited",
                )
                .build(),
            gallery_sizes: Arc::new(OnceLock::new()),
        }
    })
}

impl Metrics {
    /// A call to `method` took `elapsed`.
    pub fn call_finished(&self, method: &str, elapsed: Duration) {
        self.calls.record(
            elapsed.as_secs_f64(),
            &[KeyValue::new("rpc.method", method.to_owned())],
        );
    }

    /// A forward pass over `size` images.
    pub fn batch(&self, size: usize) {
        self.batch_size.record(size as u64, &[]);
    }

    /// `delta` images entered (+) or left (-) the batch queue.
    pub fn queued(&self, delta: i64) {
        self.queue_depth.add(delta, &[]);
    }

    /// The top score of an Identify or Verify and its decision.
    pub fn score(&self, operation: &'static str, score: f32, is_match: bool) {
        let decision = if is_match { "match" } else { "no_match" };
        self.scores.record(
            f64::from(score),
            &[
                KeyValue::new("operation", operation),
                KeyValue::new("decision", decision),
            ],
        );
    }

    /// A model reload ended with `outcome` (`ok` or the status code name).
    pub fn model_reloaded(&self, outcome: &str) {
        self.reloads
            .add(1, &[KeyValue::new("outcome", outcome.to_owned())]);
    }

    /// A forward pass failed (`batch`) or the forward loop was restarted
    /// (`restart`).
    pub fn forward_failed(&self, kind: &'static str) {
        self.forward_failures.add(1, &[KeyValue::new("kind", kind)]);
    }

    /// The change-feed follower died and was started again.
    pub fn follower_restarted(&self) {
        self.follower_restarts.add(1, &[]);
    }

    /// A change kept failing and was passed over.
    pub fn change_failed(&self) {
        self.failed_changes.add(1, &[]);
    }

    /// A refused call past its address's budget was not audited.
    pub fn audit_unrecorded(&self) {
        self.audit_unrecorded.add(1, &[]);
    }

    /// A refused call's audit row was dropped (queue full).
    pub fn audit_dropped(&self) {
        self.audit_dropped.add(1, &[]);
    }

    /// How far this replica is behind the change feed.
    pub fn replication(&self, lag_seconds: f64, pending: u64) {
        self.replication_lag.record(lag_seconds, &[]);
        self.pending_changes.record(pending, &[]);
    }

    /// Reports the templates of each gallery, read by `sizes` at every
    /// collection. Registered once per process (the first server wins).
    pub fn observe_gallery_sizes(&self, sizes: impl Fn() -> Vec<(String, usize)> + Send + Sync + 'static) {
        self.gallery_sizes.get_or_init(|| {
            opentelemetry::global::meter(SCOPE)
                .u64_observable_gauge("handid.gallery.templates")
                .with_description("Templates held in memory, by gallery")
                .with_callback(move |observer| {
                    for (gallery, templates) in sizes() {
                        observer.observe(templates as u64, &[KeyValue::new("gallery", gallery)]);
                    }
                })
                .build()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_text_is_bounded_and_escaped() {
        assert_eq!(caller_text("site-a:door.3").to_string(), "site-a:door.3");
        let long = "x".repeat(10 << 20);
        let field = caller_text(&long).to_string();
        assert!(field.len() < 200, "{} bytes", field.len());
        assert!(field.ends_with("... (10485760 bytes)"), "{field}");
        let forged = caller_text("a\ninfo forged line\u{1b}[2J").to_string();
        assert!(!forged.contains('\n') && !forged.contains('\u{1b}'), "{forged}");
        assert!(forged.starts_with("a\\ninfo"), "{forged}");
        // Cut by characters, never inside one.
        let wide = "é".repeat(300);
        let field = caller_text(&wide).to_string();
        assert!(field.ends_with("... (600 bytes)"), "{field}");
        assert_eq!(caller_text("").to_string(), "");
    }
}
