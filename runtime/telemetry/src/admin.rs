//! The admin listener: `/metrics`, `/healthz`, `/readyz`, served apart from any public API so
//! scrapes and probes never compete with (or get exposed alongside) user traffic.

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::{Health, Metrics, Result, TelemetryError};

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    health: Health,
}

/// The admin routes:
///
/// * `GET /metrics` — [`Metrics::encode`] negotiated on the `Accept` header;
/// * `GET /healthz` — liveness: `200 ok` while the process can answer at all;
/// * `GET /readyz` — readiness: `200` when every [`Health`] check is ready, else `503`; the
///   JSON body is `{"ready": bool, "not_ready": [names], "checks": {name: bool}}` either
///   way (a process running several services names each service's checks after it).
///
/// No tracing or logging layer: probes and scrapes every few seconds would drown real spans.
pub fn admin_router(metrics: Metrics, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics, health })
}

async fn metrics_handler(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok());
    let (content_type, body) = state.metrics.encode(accept);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let not_ready = state.health.not_ready();
    let status = if not_ready.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let checks: serde_json::Map<String, serde_json::Value> = state
        .health
        .checks()
        .into_iter()
        .map(|(name, ready)| (name, ready.into()))
        .collect();
    let body = serde_json::json!({
        "ready": not_ready.is_empty(),
        "not_ready": not_ready,
        "checks": checks,
    });
    (status, axum::Json(body)).into_response()
}

/// Serves `router` on `listener` (bound by the binary) until `shutdown` completes, then
/// finishes in-flight requests and returns.
pub async fn serve_admin(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let address = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_owned(), |addr| addr.to_string());
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| TelemetryError::AdminServe { address, source })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use axum::body::{Body, to_bytes};
    use axum::http::Request;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    async fn get_path(
        router: Router,
        path: &str,
        accept: Option<&str>,
    ) -> (StatusCode, String, String) {
        let mut request = Request::get(path);
        if let Some(accept) = accept {
            request = request.header(header::ACCEPT, accept);
        }
        let response = router
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    fn router_with_a_counter() -> Router {
        let metrics = Metrics::new();
        metrics
            .counter_vec("patchbay_test_events_total", "Test events.", &[])
            .unwrap()
            .with_label_values::<&str>(&[])
            .inc();
        admin_router(metrics, Health::new())
    }

    #[tokio::test]
    async fn metrics_serves_classic_text_by_default() {
        let (status, content_type, body) =
            get_path(router_with_a_counter(), "/metrics", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, crate::CLASSIC_TEXT_CONTENT_TYPE);
        assert!(body.contains("# TYPE patchbay_test_events_total counter\n"));
        assert!(!body.contains("# EOF"));
    }

    #[tokio::test]
    async fn metrics_serves_openmetrics_when_asked() {
        let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        let (status, content_type, body) =
            get_path(router_with_a_counter(), "/metrics", Some(accept)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, crate::OPENMETRICS_CONTENT_TYPE);
        assert!(
            body.contains("# TYPE patchbay_test_events counter\npatchbay_test_events_total 1\n")
        );
        assert!(body.ends_with("# EOF\n"));
    }

    #[tokio::test]
    async fn healthz_answers_ok() {
        let router = admin_router(Metrics::new(), Health::new());
        let (status, _, body) = get_path(router, "/healthz", None).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }

    #[tokio::test]
    async fn readyz_flips_from_503_naming_the_check_to_200() {
        let health = Health::new();
        let nats = health.register("nats");
        let router = admin_router(Metrics::new(), health);

        let (status, content_type, body) = get_path(router.clone(), "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(content_type, "application/json");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({ "ready": false, "not_ready": ["nats"], "checks": { "nats": false } })
        );

        nats.set_ready(true);
        let (status, _, body) = get_path(router, "/readyz", None).await;
        assert_eq!(status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({ "ready": true, "not_ready": [], "checks": { "nats": true } })
        );
    }

    #[tokio::test]
    async fn serve_admin_answers_on_a_socket_and_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_admin(
            listener,
            admin_router(Metrics::new(), Health::new()),
            async {
                let _ = stopped.await;
            },
        ));

        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\nok"), "{response}");

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
