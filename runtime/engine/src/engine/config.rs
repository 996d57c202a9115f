//! [`EngineConfig`]: how the wasmtime engine behind every function is set up.

use std::path::PathBuf;
use std::time::Duration;

/// How the engine is built. One engine serves every function on a node.
///
/// Defaults follow the project's performance baselines (tuned pooling allocator: 4.8 µs instantiate +
/// call for a trivial component, against 11.4 µs with the pooling defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Component instances that may be alive at once (= concurrent invocations across all
    /// functions). Sizes the pooling allocator: twice as many linear memories, four times
    /// as many tables, eight times as many core instances, one async stack each. An
    /// invocation beyond it fails with `InvokeError::AtCapacity` instead of allocating.
    /// Default 256.
    pub max_concurrent_instances: u32,
    /// Ceiling for one instance's linear memory: the pooling allocator's per-memory
    /// slot size, and the most an invocation reserves from the memory budget (a
    /// per-invocation `Limits::max_memory_bytes` above it is cut to it, so an instance
    /// never holds more than it reserved). Default
    /// [`MAX_INSTANCE_MEMORY_BYTES`](crate::limits::MAX_INSTANCE_MEMORY_BYTES), 512 MiB,
    /// the largest `--memory` a deploy accepts.
    pub max_memory_bytes: usize,
    /// Linear memory all instances together may hold (the [`crate::limits::MemoryBudget`]
    /// behind [`Engine::memory_budget`](super::Engine::memory_budget)): an invocation
    /// reserves its memory limit from it before it starts and returns it when its
    /// instance is gone. Default 4 GiB
    /// ([`DEFAULT_MEMORY_BUDGET_BYTES`](crate::limits::DEFAULT_MEMORY_BUDGET_BYTES)).
    pub memory_budget_bytes: u64,
    /// Largest component `Engine::load` accepts, in bytes (a componentize-py function is
    /// ~18 MB). Default 64 MiB.
    pub max_component_bytes: usize,
    /// How often the background thread advances the epoch; the granularity of timeouts and
    /// of the yields that keep a busy guest from starving the async runtime. Default 10 ms.
    pub epoch_tick: Duration,
    /// Meter fuel, giving every invocation this much unless its `Limits::fuel` says
    /// otherwise. Costs a little on every wasm instruction; `None` (the default) leaves
    /// CPU bounded by deadlines alone.
    pub fuel: Option<u64>,
    /// Directory for compiled components (`<sha256>-<engine>.cwasm`), so a restart skips
    /// Cranelift. Must be private to this runtime: its files are loaded as trusted native
    /// code. `None` (the default) keeps compiled code in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Bytes of each linear memory reset with `memset` instead of `madvise` when a slot is
    /// reused. Default 4 MiB.
    pub linear_memory_keep_resident: usize,
    /// Same as `linear_memory_keep_resident`, for tables. Default 1 MiB.
    pub table_keep_resident: usize,
    /// Bytes of each async stack kept resident across reuse. Default 1 MiB.
    pub async_stack_keep_resident: usize,
    /// Use the Linux `PAGEMAP_SCAN` ioctl (kernel ≥ 6.7) to reset only the pages a guest
    /// touched. Silently off where the kernel lacks it (see `Engine::pagemap_scan`).
    /// Default true.
    pub pagemap_scan: bool,
    /// Bytes of guest stdout and of stderr kept per invocation (each); the lines are
    /// forwarded as log records (stdout `info`, stderr `warn`) and stderr is quoted in
    /// trap messages, which is where a Rust guest's panic message ends up. 0 discards
    /// both. Default 8 KiB.
    pub max_captured_output_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_concurrent_instances: 256,
            max_memory_bytes: crate::limits::MAX_INSTANCE_MEMORY_BYTES,
            memory_budget_bytes: crate::limits::DEFAULT_MEMORY_BUDGET_BYTES,
            max_component_bytes: 64 << 20,
            epoch_tick: Duration::from_millis(10),
            fuel: None,
            cache_dir: None,
            linear_memory_keep_resident: 4 << 20,
            table_keep_resident: 1 << 20,
            async_stack_keep_resident: 1 << 20,
            pagemap_scan: true,
            max_captured_output_bytes: 8 << 10,
        }
    }
}
