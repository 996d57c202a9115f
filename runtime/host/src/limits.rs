//! Per-invocation resource limits: how long, how much memory, how much fuel, how many
//! log records.
//!
//! [`Limits`] is the plain value a function version is deployed with; [`CallLimiter`] is
//! the wasmtime `ResourceLimiter` that enforces the memory part inside one store and
//! remembers whether it refused memory, so that the trap a guest raises after an
//! allocation failure (Rust aborts) is reported as out-of-memory rather than as a generic
//! trap. Time is enforced by the engine (epoch deadline + async timeout), not here.

use std::time::Duration;

/// The limits one invocation runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget of one invocation, from the moment it starts; a deadline carried
    /// by the event can only shorten it. Default 1 s.
    pub timeout: Duration,
    /// Total linear memory (all memories of the component instance together) the guest
    /// may hold; growth beyond it fails as it would on a full machine. Capped by the
    /// engine's `max_memory_bytes`. Default 64 MiB.
    pub max_memory_bytes: usize,
    /// Fuel (roughly, wasm instructions) per invocation when the engine meters fuel;
    /// `None` uses the engine's default. Ignored by an engine without fuel metering.
    pub fuel: Option<u64>,
    /// Log records (explicit `log` calls plus captured stdout/stderr lines) kept per
    /// invocation; the rest are counted and dropped. Default 1000.
    pub max_log_records: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(1),
            max_memory_bytes: 64 << 20,
            fuel: None,
            max_log_records: 1000,
        }
    }
}

/// Enforces [`Limits::max_memory_bytes`] inside one store and records refusals.
#[derive(Debug)]
pub(crate) struct CallLimiter {
    max_memory_bytes: usize,
    memory_bytes: usize,
    peak_memory_bytes: usize,
    /// The growth approved last, taken back if the grow then fails.
    last_growth: usize,
    /// The total the guest asked for when memory was last refused (by this limiter or by
    /// the pool's own ceiling).
    refused_at: Option<usize>,
}

impl CallLimiter {
    pub(crate) fn new(max_memory_bytes: usize) -> Self {
        Self {
            max_memory_bytes,
            memory_bytes: 0,
            peak_memory_bytes: 0,
            last_growth: 0,
            refused_at: None,
        }
    }

    /// The total memory asked for when growth was refused, if it ever was.
    pub(crate) fn refused_at(&self) -> Option<usize> {
        self.refused_at
    }

    /// The most linear memory the instance held at once.
    pub(crate) fn peak_memory_bytes(&self) -> usize {
        self.peak_memory_bytes
    }

    pub(crate) fn max_memory_bytes(&self) -> usize {
        self.max_memory_bytes
    }
}

impl wasmtime::ResourceLimiter for CallLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Creation counts as growth from 0, so the running total covers every memory of
        // every core instance in the component, not just the largest one.
        let growth = desired.saturating_sub(current);
        let total = self.memory_bytes.saturating_add(growth);
        if total > self.max_memory_bytes {
            self.refused_at = Some(total);
            return Ok(false);
        }
        self.memory_bytes = total;
        self.last_growth = growth;
        self.peak_memory_bytes = self.peak_memory_bytes.max(total);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // The pool's per-memory ceiling (or the OS) said no after we said yes. To the guest
        // it is the same as our refusal, and so it is to the caller.
        self.refused_at = Some(self.memory_bytes);
        self.memory_bytes -= self.last_growth;
        self.last_growth = 0;
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables are bounded by the pool's `table_elements`; a few hundred KiB at most.
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use wasmtime::ResourceLimiter;

    const PAGE: usize = 64 << 10;

    #[test]
    fn limiter_counts_all_memories_together() {
        let mut limiter = CallLimiter::new(10 * PAGE);
        assert!(limiter.memory_growing(0, 6 * PAGE, None).unwrap());
        assert!(limiter.memory_growing(0, 3 * PAGE, None).unwrap());
        assert!(!limiter.memory_growing(3 * PAGE, 5 * PAGE, None).unwrap());
        assert_eq!(limiter.refused_at(), Some(11 * PAGE));
        assert_eq!(limiter.peak_memory_bytes(), 9 * PAGE);
    }

    #[test]
    fn limiter_allows_growth_up_to_the_limit_exactly() {
        let mut limiter = CallLimiter::new(4 * PAGE);
        assert!(limiter.memory_growing(0, 2 * PAGE, None).unwrap());
        assert!(limiter.memory_growing(2 * PAGE, 4 * PAGE, None).unwrap());
        assert_eq!(limiter.refused_at(), None);
    }

    #[test]
    fn failed_growth_after_approval_counts_as_refusal() {
        let mut limiter = CallLimiter::new(4 * PAGE);
        assert!(limiter.memory_growing(0, 2 * PAGE, None).unwrap());
        limiter
            .memory_grow_failed(wasmtime::format_err!("pool ceiling"))
            .unwrap();
        assert_eq!(limiter.refused_at(), Some(2 * PAGE));
    }
}
