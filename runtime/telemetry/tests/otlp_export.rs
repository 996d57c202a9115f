//! `init` with OTLP on exports spans over HTTP/protobuf to a collector, with the configured
//! headers and resource attributes, and the guard's shutdown flushes them. The collector is a
//! tiny axum app on 127.0.0.1 in its own runtime; its own test binary, because `init` sets
//! process globals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::mpsc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use patchbay_telemetry::{OtlpConfig, TelemetryConfig, init};

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[test]
fn spans_reach_an_otlp_http_collector_with_headers_and_resource() {
    let collector = tokio::runtime::Runtime::new().unwrap();
    let (tx, rx) = mpsc::channel::<(HeaderMap, Bytes)>();
    let listener = collector
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/v1/traces",
        post(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((headers, body));
                StatusCode::OK
            }
        }),
    );
    collector.spawn(async move { axum::serve(listener, app).await });

    let mut cfg = TelemetryConfig::new("patchbay-export-test", "9.9.9", "node-export");
    let mut otlp = OtlpConfig::new(format!("http://{addr}/v1/traces"));
    // A decoded value with a literal '%' must arrive unchanged.
    otlp.headers
        .insert("x-patchbay-test".to_owned(), "a%41b".to_owned());
    cfg.otlp = Some(otlp);

    // The binaries call init and drop the guard inside their tokio runtime; do the same.
    let app_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    app_runtime.block_on(async {
        let guard = init(&cfg).unwrap();
        assert!(guard.is_exporting());
        tracing::info_span!("otlp-export-span").in_scope(|| tracing::info!("inside"));
        guard.shutdown().unwrap();
    });

    // The bound only limits how long a broken exporter can hang the test.
    let (headers, body) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(headers["content-type"], "application/x-protobuf");
    assert_eq!(headers["x-patchbay-test"], "a%41b");
    for needle in [
        "otlp-export-span",
        "service.name",
        "patchbay-export-test",
        "service.version",
        "9.9.9",
        "service.instance.id",
        "node-export",
    ] {
        assert!(contains(&body, needle), "export body lacks {needle:?}");
    }
}
