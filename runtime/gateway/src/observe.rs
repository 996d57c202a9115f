//! One server span and one set of metrics per HTTP request, for every route.
//!
//! The span continues the caller's W3C `traceparent` (or starts a root), follows the
//! OpenTelemetry HTTP server conventions, and is the parent of every bus publish or
//! request the handler makes — so the `traceparent` the response carries names the trace
//! the whole call went into. Metrics are labelled by route template (`/v1/events/{subject}`,
//! or `fn:<function>` for HTTP functions), never by raw path, so cardinality stays bounded.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderValue;
use opentelemetry::propagation::{Extractor, Injector};
use patchbay_telemetry::{DURATION_BUCKETS_SECONDS, ExemplarHistogramVec, Metrics};
use prometheus::{GaugeVec, IntCounterVec};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The gateway's metrics.
#[derive(Clone)]
pub struct GatewayMetrics {
    /// Requests by route and status code.
    pub requests: IntCounterVec,
    /// Time to response head by route; OpenMetrics carries the request's trace id as
    /// exemplar.
    pub duration: ExemplarHistogramVec,
    /// Requests in flight by route.
    pub in_flight: GaugeVec,
    /// Requests refused before a handler ran, by reason (auth, rate, size…).
    pub refused: IntCounterVec,
    /// HTTP functions served, by function and version.
    pub functions: GaugeVec,
}

impl GatewayMetrics {
    /// Register the gateway's metrics.
    pub fn new(metrics: &Metrics) -> Result<Self, patchbay_telemetry::TelemetryError> {
        Ok(Self {
            requests: metrics.counter_vec(
                "patchbay_gateway_requests_total",
                "HTTP requests answered, by route template, method and status code",
                &["route", "method", "status"],
            )?,
            duration: metrics.histogram_vec_with_exemplars(
                "patchbay_gateway_request_duration_seconds",
                "Time from request to response head, by route template",
                &["route", "method"],
                DURATION_BUCKETS_SECONDS,
            )?,
            in_flight: metrics.gauge_vec(
                "patchbay_gateway_requests_in_flight",
                "HTTP requests being served, by route template",
                &["route"],
            )?,
            refused: metrics.counter_vec(
                "patchbay_gateway_refused_total",
                "Requests refused before reaching the bus or a function, by reason",
                &["reason"],
            )?,
            functions: metrics.gauge_vec(
                "patchbay_gateway_http_functions",
                "HTTP functions this gateway serves (1 per function, active version and route)",
                &["function", "version", "route"],
            )?,
        })
    }
}

/// The route label a handler set for itself (HTTP functions: `fn:<name>`), read by
/// [`observe`] instead of the matched path.
#[derive(Debug, Clone)]
pub struct RouteLabel(pub String);

struct HttpHeaders<'a>(&'a http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HttpHeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HttpHeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Middleware: server span (continuing `traceparent`), metrics, `traceparent` on the
/// response.
pub async fn observe(
    State(metrics): State<GatewayMetrics>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let template = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "fallback".to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!(
        "http",
        otel.name = format!("{method} {template}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %template,
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let _ = span.set_parent(patchbay_bus::trace::extract_from(&HttpHeaders(
        request.headers(),
    )));
    let gauge = metrics.in_flight.with_label_values(&[template.as_str()]);
    gauge.inc();
    let mut response = next.run(request).instrument(span.clone()).await;
    gauge.dec();
    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map_or(template, |l| l.0.clone());
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    patchbay_bus::trace::inject_into(&span.context(), &mut HttpHeadersMut(response.headers_mut()));
    metrics
        .requests
        .with_label_values(&[route.as_str(), method.as_str(), status.as_str()])
        .inc();
    metrics
        .duration
        .with_label_values(&[route.as_str(), method.as_str()])
        .observe_in(started.elapsed().as_secs_f64(), &span);
    response
}
