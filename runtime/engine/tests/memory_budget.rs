//! An instance never holds more linear memory than it reserved from the engine's memory
//! budget, and the reservation comes back once the instance is gone. Runs the `misbehave`
//! fixture's `oom` mode (build/components/misbehave.wasm) in-process, no bus.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use patchbay_engine::{
    Engine, EngineConfig, Event, Invocation, InvokeError, Limits, MemoryCapabilities,
};

mod common;

const MIB: u64 = 1 << 20;

fn misbehave() -> Vec<u8> {
    common::component("misbehave")
}

fn oom_event() -> Event {
    Event {
        id: "oom-1".into(),
        source: "/tests/memory_budget".into(),
        type_: "oom".into(),
        subject: "test.in".into(),
        time: None,
        content_type: None,
        data: vec![],
        extensions: vec![],
    }
}

#[tokio::test]
async fn an_instance_is_held_to_its_reservation_and_gives_it_back_when_done() {
    let engine = Engine::new(EngineConfig {
        max_concurrent_instances: 4,
        memory_budget_bytes: 256 * MIB,
        ..EngineConfig::default()
    })
    .unwrap();
    let code = engine.load(&misbehave()).unwrap();
    let budget = engine.memory_budget().clone();
    assert_eq!(budget.total_bytes(), 256 * MIB);

    // Its own limit would allow 128 MiB; it reserved only 32 MiB, so 32 MiB is its limit.
    let limits = Limits {
        max_memory_bytes: 128 << 20,
        timeout: Duration::from_secs(10),
        ..Limits::default()
    };
    let reservation = budget.try_reserve(32 * MIB).unwrap();
    assert_eq!(budget.reserved_bytes(), 32 * MIB);
    let invocation = Invocation::new(Arc::new(MemoryCapabilities::new()))
        .limits(limits)
        .memory(reservation);
    let outcome = code.invoke(&engine, oom_event(), invocation).await;
    match outcome.result {
        Err(InvokeError::OutOfMemory { limit_bytes, .. }) => assert_eq!(limit_bytes, 32 << 20),
        other => panic!("expected out-of-memory at the reservation, got {other:?}"),
    }
    assert!(outcome.stats.peak_memory_bytes <= 32 << 20);
    assert_eq!(
        budget.reserved_bytes(),
        0,
        "the reservation outlived the call"
    );
}

#[tokio::test]
async fn the_engine_cuts_a_limit_to_its_per_instance_ceiling() {
    let engine = Engine::new(EngineConfig {
        max_concurrent_instances: 2,
        max_memory_bytes: 16 << 20,
        ..EngineConfig::default()
    })
    .unwrap();
    let limits = Limits {
        max_memory_bytes: 64 << 20,
        ..Limits::default()
    };
    assert_eq!(engine.instance_memory_bytes(&limits), 16 << 20);
    assert_eq!(
        engine.memory_budget().total_bytes(),
        patchbay_engine::limits::DEFAULT_MEMORY_BUDGET_BYTES
    );
}
