//! The engine against real components from `build/components/` (built by `make wasm`):
//! loading checks, every invocation outcome of the `misbehave` fixture, the capabilities
//! through `MemoryCapabilities`, and the compile caches.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use patchbay_engine::engine::{CodeOrigin, bench_instantiate_call};
use patchbay_engine::{
    BusError, Engine, EngineConfig, Event, Failure, FunctionCode, HostCapabilities, Invocation,
    InvokeError, InvokeOutcome, KvError, Level, Limits, LoadError, MemoryCapabilities,
    PublishAllowList, Retry,
};

mod common;

fn test_config() -> EngineConfig {
    EngineConfig {
        // Small pools: several engines live at once in this test binary.
        max_concurrent_instances: 16,
        ..EngineConfig::default()
    }
}

struct Fixtures {
    engine: Engine,
    echo: FunctionCode,
    misbehave: FunctionCode,
}

/// One engine and one compilation per fixture for the whole binary: compiling is the slow
/// part, and sharing the code also proves that failures do not poison it.
static FIXTURES: LazyLock<Fixtures> = LazyLock::new(|| {
    let engine = Engine::new(test_config()).unwrap();
    let echo = engine.load(&common::component("echo")).unwrap();
    let misbehave = engine.load(&common::component("misbehave")).unwrap();
    Fixtures {
        engine,
        echo,
        misbehave,
    }
});

fn event(ty: &str, data: &[u8]) -> Event {
    Event {
        id: "evt-1".into(),
        source: "/tests/engine".into(),
        type_: ty.into(),
        subject: "test.in".into(),
        time: Some(1_700_000_000_000),
        content_type: Some("application/json".into()),
        data: data.to_vec(),
        extensions: vec![("partitionkey".into(), "call-7".into())],
    }
}

fn invocation(caps: &Arc<MemoryCapabilities>) -> Invocation {
    Invocation::new(caps.clone()).allow_publish(PublishAllowList::new(["test.>"]).unwrap())
}

async fn misbehave(ty: &str, data: &[u8], invocation: Invocation) -> InvokeOutcome {
    let f = &*FIXTURES;
    f.misbehave
        .invoke(&f.engine, event(ty, data), invocation)
        .await
}

/// A following good call on the same code succeeds: the failure stayed in its instance.
async fn assert_code_still_works() {
    let caps = Arc::new(MemoryCapabilities::new());
    let outcome = misbehave("ok", b"{}", invocation(&caps)).await;
    let outputs = outcome.result.unwrap().unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].subject, "test.out");
}

#[tokio::test]
async fn echo_returns_the_event_unchanged() {
    let f = &*FIXTURES;
    let caps = Arc::new(MemoryCapabilities::new());
    let input = event("cc.call.ended.v1", b"\x00\x01binary\xff");
    let outcome = f
        .echo
        .invoke(&f.engine, input.clone(), invocation(&caps))
        .await;
    assert_eq!(outcome.result, Ok(Ok(vec![input])));
    assert!(outcome.stats.peak_memory_bytes > 0);
    assert!(outcome.stats.instantiate > Duration::ZERO);
    assert_eq!(outcome.stats.fuel_consumed, None);
}

#[tokio::test]
async fn ok_addresses_the_output_to_the_default_subject() {
    assert_code_still_works().await;
}

#[tokio::test]
async fn trap_fails_only_that_call() {
    let caps = Arc::new(MemoryCapabilities::new());
    let outcome = misbehave("trap", b"", invocation(&caps)).await;
    match outcome.result {
        Err(InvokeError::Trap { message }) => assert!(message.contains("unreachable"), "{message}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    assert_code_still_works().await;
}

#[tokio::test]
async fn panic_is_a_trap_quoting_the_panic_message() {
    let caps = Arc::new(MemoryCapabilities::new());
    let outcome = misbehave("panic", b"", invocation(&caps)).await;
    match outcome.result {
        Err(InvokeError::Trap { message }) => {
            assert!(
                message.contains("misbehave was asked to panic"),
                "{message}"
            );
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    // The panic message, written to stderr, is also a warn log record.
    assert!(
        caps.logs()
            .iter()
            .any(|(level, line)| *level == Level::Warn
                && line.contains("misbehave was asked to panic")),
        "{:?}",
        caps.logs()
    );
    assert_code_still_works().await;
}

#[tokio::test]
async fn infinite_loop_times_out_at_the_deadline() {
    let caps = Arc::new(MemoryCapabilities::new());
    let limits = Limits {
        timeout: Duration::from_millis(50),
        ..Limits::default()
    };
    let outcome = misbehave("loop", b"", invocation(&caps).limits(limits)).await;
    assert!(
        matches!(outcome.result, Err(InvokeError::Timeout { .. })),
        "{:?}",
        outcome.result
    );
    assert_code_still_works().await;
}

#[tokio::test]
async fn upstream_deadline_shortens_the_timeout() {
    let caps = Arc::new(MemoryCapabilities::new());
    let deadline = Instant::now() + Duration::from_millis(30);
    let outcome = misbehave("loop", b"", invocation(&caps).deadline(deadline)).await;
    assert!(
        matches!(outcome.result, Err(InvokeError::Timeout { .. })),
        "{:?}",
        outcome.result
    );
}

#[tokio::test]
async fn passed_deadline_does_not_start_the_call() {
    let caps = Arc::new(MemoryCapabilities::new());
    let passed = Instant::now()
        .checked_sub(Duration::from_millis(1))
        .unwrap();
    let outcome = misbehave("log", b"", invocation(&caps).deadline(passed)).await;
    assert_eq!(outcome.result, Err(InvokeError::DeadlineAlreadyPassed));
    assert!(caps.logs().is_empty(), "the guest ran: {:?}", caps.logs());
}

#[tokio::test]
async fn memory_hog_fails_with_out_of_memory_only() {
    let caps = Arc::new(MemoryCapabilities::new());
    let limits = Limits {
        max_memory_bytes: 32 << 20,
        ..Limits::default()
    };
    let outcome = misbehave("oom", b"", invocation(&caps).limits(limits)).await;
    match outcome.result {
        Err(InvokeError::OutOfMemory {
            limit_bytes,
            requested_bytes,
        }) => {
            assert_eq!(limit_bytes, 32 << 20);
            assert!(requested_bytes > limit_bytes);
        }
        other => panic!("expected out-of-memory, got {other:?}"),
    }
    assert!(outcome.stats.peak_memory_bytes <= 32 << 20);
    assert_code_still_works().await;
}

#[tokio::test]
async fn forbidden_publish_is_refused_before_the_bus() {
    let caps = Arc::new(MemoryCapabilities::new());
    let outcome = misbehave("forbidden-publish", b"", invocation(&caps)).await;
    assert_eq!(
        outcome.result,
        Ok(Err(Failure::DeadLetter(
            "publish failed: forbidden: forbidden.subject".into()
        )))
    );
    assert!(caps.published().is_empty());
}

#[tokio::test]
async fn allowed_publish_reaches_the_capabilities() {
    let caps = Arc::new(MemoryCapabilities::new());
    let data = br#"{"subject": "test.side", "body": "hi"}"#;
    let outcome = misbehave("publish", data, invocation(&caps)).await;
    assert_eq!(outcome.result, Ok(Ok(vec![])));
    let published = caps.published();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].subject, "test.side");
    assert_eq!(published[0].data, b"hi");
    assert_eq!(published[0].id, "evt-1-out");
}

#[tokio::test]
async fn output_outside_the_allow_list_fails_the_invocation() {
    let f = &*FIXTURES;
    let caps = Arc::new(MemoryCapabilities::new());
    let only_other = Invocation::new(caps.clone())
        .allow_publish(PublishAllowList::new(["elsewhere.>"]).unwrap());
    let outcome = f.echo.invoke(&f.engine, event("x", b""), only_other).await;
    assert_eq!(
        outcome.result,
        Err(InvokeError::ForbiddenOutput {
            index: 0,
            subject: "test.in".into()
        })
    );
}

#[tokio::test]
async fn retry_dead_letter_and_drop_map_to_failures() {
    let caps = Arc::new(MemoryCapabilities::new());
    let first = misbehave("retry", b"", invocation(&caps)).await;
    assert_eq!(
        first.result,
        Ok(Err(Failure::Retry(Retry {
            after_ms: 10,
            reason: "attempt 1 of 2".into()
        })))
    );
    let second = misbehave("retry", b"", invocation(&caps)).await;
    assert_eq!(second.result.unwrap().unwrap().len(), 1);

    let dead = misbehave("dead-letter", b"", invocation(&caps)).await;
    assert_eq!(
        dead.result,
        Ok(Err(Failure::DeadLetter(
            "misbehave was asked to dead-letter".into()
        )))
    );
    let dropped = misbehave("drop", b"", invocation(&caps)).await;
    assert_eq!(
        dropped.result,
        Ok(Err(Failure::Drop("misbehave was asked to drop".into())))
    );
}

#[tokio::test]
async fn config_values_are_visible_to_the_guest() {
    let caps = Arc::new(MemoryCapabilities::new());
    let config = BTreeMap::from([
        ("out".to_owned(), "test.configured".to_owned()),
        ("region".to_owned(), "eu".to_owned()),
    ]);
    let outcome = misbehave("config", b"", invocation(&caps).config(config)).await;
    let outputs = outcome.result.unwrap().unwrap();
    assert_eq!(outputs[0].subject, "test.configured");
    let seen: serde_json::Value = serde_json::from_slice(&outputs[0].data).unwrap();
    assert_eq!(
        seen,
        serde_json::json!({"out": "test.configured", "region": "eu"})
    );
}

#[tokio::test]
async fn kv_goes_through_the_capabilities() {
    let caps = Arc::new(MemoryCapabilities::new());
    let set = misbehave(
        "kv-set",
        br#"{"key": "greeting", "value": "hello"}"#,
        invocation(&caps),
    )
    .await;
    let outputs = set.result.unwrap().unwrap();
    assert_eq!(outputs[0].data, br#"{"revision":1}"#);
    assert_eq!(caps.kv_value("greeting").as_deref(), Some(&b"hello"[..]));

    let get = misbehave("kv-get", br#"{"key": "greeting"}"#, invocation(&caps)).await;
    assert_eq!(get.result.unwrap().unwrap()[0].data, b"hello");

    let missing = misbehave("kv-get", br#"{"key": "nothing"}"#, invocation(&caps)).await;
    assert_eq!(
        missing.result,
        Ok(Err(Failure::Drop("no such key: nothing".into())))
    );
}

#[tokio::test]
async fn malformed_kv_key_is_refused_by_the_host() {
    let caps = Arc::new(MemoryCapabilities::new());
    let outcome = misbehave(
        "kv-set",
        br#"{"key": "a..b", "value": "x"}"#,
        invocation(&caps),
    )
    .await;
    assert_eq!(
        outcome.result,
        Ok(Err(Failure::DeadLetter(
            "kv set failed: invalid-key: a..b".into()
        )))
    );
    assert_eq!(caps.kv_value("a..b"), None);
}

#[tokio::test]
async fn log_calls_are_recorded() {
    let caps = Arc::new(MemoryCapabilities::new());
    let outcome = misbehave("log", b"", invocation(&caps)).await;
    assert!(outcome.result.is_ok());
    assert_eq!(
        caps.logs(),
        vec![(Level::Info, "hello from misbehave".to_owned())]
    );
}

#[tokio::test]
async fn log_records_beyond_the_budget_are_counted_not_kept() {
    let caps = Arc::new(MemoryCapabilities::new());
    let limits = Limits {
        max_log_records: 0,
        ..Limits::default()
    };
    let outcome = misbehave("log", b"", invocation(&caps).limits(limits)).await;
    assert!(outcome.result.is_ok());
    assert!(caps.logs().is_empty());
    assert_eq!(outcome.stats.logs_dropped, 1);
}

#[tokio::test]
async fn request_gets_the_reply_within_the_deadline() {
    let caps = Arc::new(MemoryCapabilities::with_responder(|request| {
        let mut reply = request.clone();
        reply.data = b"pong".to_vec();
        Ok(reply)
    }));
    let data = br#"{"subject": "test.lookup", "body": "ping", "timeout_ms": 5000}"#;
    let limits = Limits {
        timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let outcome = misbehave("request", data, invocation(&caps).limits(limits)).await;
    let outputs = outcome.result.unwrap().unwrap();
    assert_eq!(outputs[0].data, b"pong");
    assert_eq!(outputs[0].subject, "test.out");
    let requests = caps.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].0.subject, "test.lookup");
    // Never longer than the invocation's own deadline, whatever the guest asked for.
    assert!(requests[0].1 <= Duration::from_millis(800));
}

#[tokio::test]
async fn request_without_responders_reports_it() {
    let caps = Arc::new(MemoryCapabilities::new());
    let data = br#"{"subject": "test.lookup"}"#;
    let outcome = misbehave("request", data, invocation(&caps)).await;
    assert_eq!(
        outcome.result,
        Ok(Err(Failure::DeadLetter(
            "request failed: no-responders".into()
        )))
    );
}

/// Capabilities whose requests never complete, like a responder that died mid-request.
struct Hanging;

impl HostCapabilities for Hanging {
    fn publish(&self, _: Event) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(std::future::pending())
    }
    fn request(&self, _: Event, _: Duration) -> BoxFuture<'_, Result<Event, BusError>> {
        Box::pin(std::future::pending())
    }
    fn kv_get(&self, _: String) -> BoxFuture<'_, Result<Option<Vec<u8>>, KvError>> {
        Box::pin(std::future::pending())
    }
    fn kv_set(&self, _: String, _: Vec<u8>) -> BoxFuture<'_, Result<u64, KvError>> {
        Box::pin(std::future::pending())
    }
    fn kv_delete(&self, _: String) -> BoxFuture<'_, Result<(), KvError>> {
        Box::pin(std::future::pending())
    }
    fn kv_keys(&self) -> BoxFuture<'_, Result<Vec<String>, KvError>> {
        Box::pin(std::future::pending())
    }
    fn log(&self, _: Level, _: String) {}
}

#[tokio::test]
async fn waiting_on_the_bus_past_the_deadline_times_out() {
    let limits = Limits {
        timeout: Duration::from_millis(50),
        ..Limits::default()
    };
    let invocation = Invocation::new(Arc::new(Hanging))
        .allow_publish(PublishAllowList::new(["test.>"]).unwrap())
        .limits(limits);
    let outcome = misbehave("request", br#"{"subject": "test.lookup"}"#, invocation).await;
    assert!(
        matches!(outcome.result, Err(InvokeError::Timeout { .. })),
        "{:?}",
        outcome.result
    );
    assert_code_still_works().await;
}

#[tokio::test]
async fn fuel_metering_stops_a_loop_and_counts_use() {
    let engine = Engine::new(EngineConfig {
        fuel: Some(50_000_000),
        ..test_config()
    })
    .unwrap();
    let code = engine.load(&common::component("misbehave")).unwrap();
    let caps = Arc::new(MemoryCapabilities::new());
    let looping = code
        .invoke(&engine, event("loop", b""), invocation(&caps))
        .await;
    assert_eq!(
        looping.result,
        Err(InvokeError::OutOfFuel { fuel: 50_000_000 })
    );
    let ok = code
        .invoke(&engine, event("ok", b""), invocation(&caps))
        .await;
    assert!(ok.result.is_ok());
    assert!(ok.stats.fuel_consumed.unwrap() > 0);
}

#[tokio::test]
async fn code_from_another_engine_is_refused() {
    let other = Engine::new(test_config()).unwrap();
    let caps = Arc::new(MemoryCapabilities::new());
    let f = &*FIXTURES;
    let outcome = f
        .echo
        .invoke(&other, event("x", b""), invocation(&caps))
        .await;
    assert_eq!(
        outcome.result,
        Err(InvokeError::ForeignCode {
            digest: f.echo.digest().to_owned()
        })
    );
}

#[test]
fn other_world_is_a_world_mismatch_naming_its_exports() {
    let error = FIXTURES
        .engine
        .load(&common::component("other-world"))
        .unwrap_err();
    assert_eq!(
        error,
        LoadError::WorldMismatch {
            expected: "patchbay:function/handler@0.1.0".into(),
            found: vec!["test:other/thing@0.1.0".into()],
        }
    );
}

#[test]
fn core_module_is_refused_as_not_a_component() {
    let error = FIXTURES
        .engine
        .load(&common::component("core-module"))
        .unwrap_err();
    assert_eq!(error, LoadError::CoreModule);
    assert!(error.to_string().contains("not a component"));
}

#[test]
fn random_bytes_are_not_wasm() {
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert!(matches!(
        FIXTURES.engine.load(&noise),
        Err(LoadError::NotWasm { .. })
    ));
}

#[test]
fn truncated_component_is_invalid() {
    let echo = common::component("echo");
    assert!(matches!(
        FIXTURES.engine.load(&echo[..echo.len() / 2]),
        Err(LoadError::Invalid { .. })
    ));
}

#[test]
fn oversized_component_is_too_large() {
    let engine = Engine::new(EngineConfig {
        max_component_bytes: 1000,
        ..test_config()
    })
    .unwrap();
    let echo = common::component("echo");
    assert_eq!(
        engine.load(&echo).unwrap_err(),
        LoadError::TooLarge {
            size: echo.len(),
            max: 1000
        }
    );
}

#[test]
fn loading_the_same_bytes_again_reuses_the_compiled_code() {
    let f = &*FIXTURES;
    let again = f.engine.load(&common::component("echo")).unwrap();
    assert_eq!(again.digest(), f.echo.digest());
    assert_eq!(again.digest().len(), 64);
    assert_eq!(
        f.engine.loaded(f.echo.digest()).map(|c| c.size()),
        Some(f.echo.size())
    );
    assert!(f.engine.loaded(&"0".repeat(64)).is_none());
}

#[tokio::test]
async fn disk_cache_survives_an_engine_restart_and_ignores_corrupt_entries() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        cache_dir: Some(dir.path().join("compiled")),
        ..test_config()
    };
    let echo = common::component("echo");

    let first = Engine::new(config.clone()).unwrap();
    assert_eq!(first.load(&echo).unwrap().origin(), CodeOrigin::Compiled);
    drop(first);

    let second = Engine::new(config.clone()).unwrap();
    let code = second.load(&echo).unwrap();
    assert_eq!(code.origin(), CodeOrigin::DiskCache);
    let caps = Arc::new(MemoryCapabilities::new());
    let input = event("x", b"cached");
    let outcome = code.invoke(&second, input.clone(), invocation(&caps)).await;
    assert_eq!(outcome.result, Ok(Ok(vec![input])));
    drop((code, second));

    let entries: Vec<_> = std::fs::read_dir(dir.path().join("compiled"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    std::fs::write(&entries[0], b"not machine code").unwrap();
    let third = Engine::new(config).unwrap();
    assert_eq!(third.load(&echo).unwrap().origin(), CodeOrigin::Compiled);
}

#[tokio::test]
async fn benchmark_entry_point_times_every_iteration() {
    let f = &*FIXTURES;
    let caps = Arc::new(MemoryCapabilities::new());
    let timings =
        bench_instantiate_call(&f.engine, &f.echo, &event("x", b""), &invocation(&caps), 20).await;
    assert_eq!(timings.len(), 20);
}
