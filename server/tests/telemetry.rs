//! Traces and metrics reach an OTLP/gRPC receiver: an in-process tonic
//! server implementing OTLP's TraceService and MetricsService receives the
//! span of an Identify call with its child spans, and the service's metrics.
//! Alone in its binary: it installs the process-wide subscriber and meter
//! provider.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestServer, checkpoint, settings, wait_for_health};
use handid_proto::v1 as pb;
use handid_server::settings::TelemetrySettings;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::trace::v1::Span;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;

/// What the receiver got.
#[derive(Debug, Default, Clone)]
struct Received {
    spans: Arc<Mutex<Vec<Span>>>,
    metrics: Arc<Mutex<Vec<String>>>,
    /// The `rpc.method` labels of `handid.rpc.duration`.
    methods: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut names = self.metrics.lock().expect("lock");
        let mut methods = self.methods.lock().expect("lock");
        for resource in request.into_inner().resource_metrics {
            for scope in resource.scope_metrics {
                for metric in scope.metrics {
                    if let Some(Data::Histogram(histogram)) = &metric.data
                        && metric.name == "handid.rpc.duration"
                    {
                        for point in &histogram.data_points {
                            for label in &point.attributes {
                                if let Some(Value::StringValue(v)) =
                                    label.value.as_ref().and_then(|v| v.value.as_ref())
                                    && label.key == "rpc.method"
                                {
                                    methods.push(v.clone());
                                }
                            }
                        }
                    }
                    names.push(metric.name);
                }
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// The ancestors of `span` among `spans` (parent first).
fn ancestors<'a>(span: &'a Span, by_id: &HashMap<&[u8], &'a Span>) -> Vec<&'a Span> {
    let mut out = Vec::new();
    let mut current = span;
    while let Some(parent) = by_id.get(current.parent_span_id.as_slice()) {
        out.push(*parent);
        current = parent;
    }
    out
}

#[sqlx::test(migrations = false)]
async fn an_identify_call_is_traced_with_its_child_spans(_: PgPoolOptions, options: PgConnectOptions) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let collector = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .add_service(MetricsServiceServer::new(received.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let telemetry = handid_server::telemetry::init(
        &TelemetrySettings {
            otlp_endpoint: Some(format!("http://{collector}")),
            metrics_interval_ms: 200,
            ..TelemetrySettings::default()
        },
        "info",
    )
    .expect("telemetry");
    let telemetry = Arc::new(telemetry);

    let dir = checkpoint();
    let server = TestServer::start(settings(&options, dir.path())).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photos = common::people(1, 2).remove(0).1;
    client
        .enroll(pb::EnrollRequest {
            gallery_id: "g".to_owned(),
            subject_id: "a".to_owned(),
            images: vec![pb::Image {
                data: photos[0].clone(),
            }],
            idempotency_key: String::new(),
        })
        .await
        .expect("enroll");
    client
        .identify(pb::IdentifyRequest {
            gallery_id: "g".to_owned(),
            image: Some(pb::Image {
                data: photos[1].clone(),
            }),
            top_k: 1,
            rule: None,
        })
        .await
        .expect("identify");

    // The span of the call, and every child the brief names, in one trace.
    let wanted = ["decode", "batch_wait", "forward", "search", "database"];
    let mut found = None;
    for _ in 0..100 {
        // Flushing blocks on the export, which this runtime's tasks drive.
        let flushing = Arc::clone(&telemetry);
        tokio::task::spawn_blocking(move || flushing.flush())
            .await
            .expect("flush");
        let spans = received.spans.lock().expect("lock").clone();
        if let Some(root) = spans.iter().find(|s| s.name == "handid.v1.HandId/Identify") {
            let by_id: HashMap<&[u8], &Span> = spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();
            let children: Vec<&str> = spans
                .iter()
                .filter(|s| s.trace_id == root.trace_id)
                .filter(|s| ancestors(s, &by_id).iter().any(|a| a.span_id == root.span_id))
                .map(|s| s.name.as_str())
                .collect();
            if wanted.iter().all(|w| children.contains(w)) {
                found = Some((
                    root.clone(),
                    children.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>(),
                    spans.clone(),
                ));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (root, children, spans) = found.unwrap_or_else(|| {
        let names: Vec<String> = received
            .spans
            .lock()
            .expect("lock")
            .iter()
            .map(|s| s.name.clone())
            .collect();
        panic!("no Identify span with children {wanted:?}; received {names:?}")
    });
    assert!(root.parent_span_id.is_empty(), "the call's span is a root");
    eprintln!("[telemetry] Identify span children: {children:?}");
    // Only ids, sizes and scores are recorded: no long attribute anywhere
    // (an image or an embedding would be thousands of characters).
    for span in &spans {
        for attribute in &span.attributes {
            if let Some(Value::StringValue(text)) = attribute.value.as_ref().and_then(|v| v.value.as_ref()) {
                assert!(
                    text.len() < 200,
                    "span {} attribute {} is {} chars",
                    span.name,
                    attribute.key,
                    text.len()
                );
            }
        }
    }

    // The metrics arrive too.
    let wanted = [
        "handid.rpc.duration",
        "handid.batch.size",
        "handid.batch.queue_depth",
        "handid.match.score",
        "handid.gallery.templates",
    ];
    let mut names = Vec::new();
    for _ in 0..100 {
        names = received.metrics.lock().expect("lock").clone();
        if wanted.iter().all(|w| names.iter().any(|n| n == w)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in wanted {
        assert!(
            names.iter().any(|n| n == w),
            "metric {w} not received; got {names:?}"
        );
    }

    // Invented paths do not invent label values: they are all `unknown`.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .expect("url")
        .connect()
        .await
        .expect("channel");
    for path in ["/handid.v1.HandId/Invented1", "/x.Y/Z", "/handid.v1.Admin/Nope"] {
        let (code, _) = common::raw_call(channel.clone(), path, Vec::new()).await;
        assert_eq!(code, tonic::Code::Unimplemented, "{path}");
    }
    let mut methods = Vec::new();
    for _ in 0..100 {
        let flushing = Arc::clone(&telemetry);
        tokio::task::spawn_blocking(move || flushing.flush())
            .await
            .expect("flush");
        methods = received.methods.lock().expect("lock").clone();
        if methods.iter().any(|m| m == "unknown") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(methods.iter().any(|m| m == "unknown"), "{methods:?}");
    assert!(
        methods
            .iter()
            .all(|m| m == "unknown" || m.starts_with("handid.v1.") || m.starts_with("grpc.health.v1.")),
        "{methods:?}"
    );
    assert!(
        !methods
            .iter()
            .any(|m| m.contains("Invented") || m.contains("x.Y")),
        "{methods:?}"
    );
    server.stop().await.expect("graceful stop");
}
