//! Property test of component loading: whatever bytes `fn deploy` is handed — truncated,
//! bit-flipped or spliced components, core modules, random data — the engine answers with
//! a loaded function or a [`LoadError`] that says what is wrong, never a panic, and a
//! refused load leaves the engine able to load a good component afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::LazyLock;

use patchbay_engine::{Engine, EngineConfig, LoadError};
use proptest::prelude::*;

mod common;

static ECHO: LazyLock<Vec<u8>> = LazyLock::new(|| common::component("echo"));
static ENGINE: LazyLock<Engine> = LazyLock::new(|| {
    Engine::new(EngineConfig {
        max_concurrent_instances: 4,
        ..EngineConfig::default()
    })
    .unwrap()
});

/// A valid component damaged in one of the ways a broken upload or a hostile one would be.
fn damaged() -> impl Strategy<Value = Vec<u8>> {
    let len = ECHO.len();
    prop_oneof![
        // Truncated anywhere (headers, section boundaries, the middle of code).
        (0..len).prop_map(|at| ECHO[..at].to_vec()),
        // A few bytes overwritten.
        prop::collection::vec((0..len, any::<u8>()), 1..6).prop_map(|edits| {
            let mut bytes = ECHO.clone();
            for (at, b) in edits {
                bytes[at] = b;
            }
            bytes
        }),
        // Random bytes behind a valid component or core-module header.
        prop::collection::vec(any::<u8>(), 0..256).prop_map(|tail| {
            let mut bytes = b"\0asm\x0d\0\x01\0".to_vec();
            bytes.extend(tail);
            bytes
        }),
        prop::collection::vec(any::<u8>(), 0..256).prop_map(|tail| {
            let mut bytes = b"\0asm\x01\0\0\0".to_vec();
            bytes.extend(tail);
            bytes
        }),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    // Each case may compile a component: keep the default run short (`make fuzz` and
    // PROPTEST_CASES run more).
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(48)
    ))]

    #[test]
    fn any_bytes_load_or_are_refused_with_a_reason(bytes in damaged()) {
        match ENGINE.load(&bytes) {
            Ok(_) => {}
            Err(e) => {
                let reason = e.to_string();
                prop_assert!(!reason.is_empty());
                if bytes.len() < 8 || !bytes.starts_with(b"\0asm") {
                    prop_assert!(matches!(e, LoadError::NotWasm { .. }), "{e:?}");
                }
            }
        }
    }
}

#[test]
fn the_engine_still_loads_a_good_component_after_refusals() {
    for cut in [0, 4, 8, ECHO.len() / 2] {
        assert!(ENGINE.load(&ECHO[..cut]).is_err());
    }
    assert!(ENGINE.load(&ECHO).is_ok());
}
