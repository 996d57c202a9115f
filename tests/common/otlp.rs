//! A tiny OTLP/HTTP trace receiver for tests: it listens on 127.0.0.1, decodes every
//! `ExportTraceServiceRequest` the binaries send to `<endpoint>/v1/traces` (protobuf, as
//! `OTEL_EXPORTER_OTLP_ENDPOINT` makes them do), and keeps each span with the
//! `service.name` of the resource that exported it, so tests can assert trace ids,
//! parentage and links across processes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;

/// One exported span and the service that exported it.
#[derive(Debug, Clone)]
pub struct Exported {
    /// `service.name` of the exporting resource (`patchbay-runtime`, `patchbay-gateway`…).
    pub service: String,
    /// The span as received.
    pub span: Span,
}

impl Exported {
    /// The span name (`process cc.v1.calls.c-1.routed`, `invoke echo`, …).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.span.name
    }

    /// Trace id, 32 lower-case hex digits.
    #[must_use]
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// Span id, 16 lower-case hex digits.
    #[must_use]
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// Parent span id, or `None` for a root span.
    #[must_use]
    pub fn parent_id(&self) -> Option<String> {
        (!self.span.parent_span_id.is_empty()).then(|| hex(&self.span.parent_span_id))
    }

    /// The string form of attribute `key`.
    #[must_use]
    pub fn attribute(&self, key: &str) -> Option<String> {
        attribute(&self.span.attributes, key)
    }
}

/// Lower-case hex of `bytes` (OTLP carries ids as raw bytes).
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The string form of an OTLP attribute value.
#[must_use]
pub fn any_value_text(value: Option<&AnyValue>) -> Option<String> {
    match value?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

/// The string form of attribute `key` in `attributes`.
#[must_use]
pub fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| any_value_text(kv.value.as_ref()))
}

/// The receiver; it runs until the test's runtime ends.
pub struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Exported>>>,
}

impl Collector {
    /// Listen on a free port of 127.0.0.1.
    pub async fn start() -> Self {
        use axum::body::Bytes;
        use axum::http::StatusCode;
        use prost::Message as _;

        let spans: Arc<Mutex<Vec<Exported>>> = Arc::default();
        let sink = Arc::clone(&spans);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let sink = Arc::clone(&sink);
                async move {
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let mut sink = sink.lock().unwrap();
                    for resource in request.resource_spans {
                        let service = resource
                            .resource
                            .as_ref()
                            .and_then(|r| attribute(&r.attributes, "service.name"))
                            .unwrap_or_default();
                        for scope in resource.scope_spans {
                            sink.extend(scope.spans.into_iter().map(|span| Exported {
                                service: service.clone(),
                                span,
                            }));
                        }
                    }
                    // An empty body is an empty ExportTraceServiceResponse: all accepted.
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, spans }
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` is appended by the
    /// binaries).
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    #[must_use]
    pub fn spans(&self) -> Vec<Exported> {
        self.spans.lock().unwrap().clone()
    }

    /// The spans of trace `trace_id` received so far.
    #[must_use]
    pub fn trace(&self, trace_id: &str) -> Vec<Exported> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id() == trace_id)
            .collect()
    }
}
