//! A micro-benchmark of the per-event path: instantiate from pre-linked code, call,
//! tear down.

use std::time::{Duration, Instant};

use super::{Engine, FunctionCode, Invocation};
use crate::world::Event;

/// Invoke `code` with `event` `n` times in a row and return each invocation's wall time
/// (store setup, instantiation, the call and the store's teardown), in order.
///
/// Clones of `event` and `invocation` are made outside the timed region. Failed
/// invocations are timed like the others; run it with a function that succeeds (the
/// `echo` fixture) for meaningful figures, in a release build.
pub async fn bench_instantiate_call(
    engine: &Engine,
    code: &FunctionCode,
    event: &Event,
    invocation: &Invocation,
    n: usize,
) -> Vec<Duration> {
    let mut timings = Vec::with_capacity(n);
    for _ in 0..n {
        let (event, invocation) = (event.clone(), invocation.clone());
        let start = Instant::now();
        let outcome = code.invoke(engine, event, invocation).await;
        let elapsed = start.elapsed();
        // Dropping the outputs is part of what every real invocation pays.
        drop(outcome);
        timings.push(elapsed);
    }
    timings
}
