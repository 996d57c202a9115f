//! The engine's command-line flags (feature `cli`), shared by every binary that hosts
//! functions: runtime nodes and gateways take the same three, with the same variables.

use std::path::PathBuf;

use crate::EngineConfig;

/// Instance slots, the memory budget and the compile cache.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Instance slots in the pooling allocator (invocations or HTTP requests served at once,
    /// across functions).
    #[arg(long, env = "PATCHBAY_MAX_INSTANCES", default_value_t = 256)]
    pub max_instances: u32,
    /// Linear memory all invocations of this process may hold together, e.g. `2GiB`,
    /// `512MiB` (a bare number is MiB). Each invocation reserves its version's whole
    /// `--memory` before its instance exists; what does not fit waits (at most half its
    /// deadline, or its timeout) and is then refused as overloaded (counted in
    /// `patchbay_fn_shed_total`). A version whose memory exceeds the budget is not served.
    /// Leave room for the process itself (~150 MiB) within the host's memory.
    #[arg(long, env = "PATCHBAY_MEMORY_BUDGET", default_value = "4GiB", value_parser = crate::limits::parse_budget)]
    pub memory_budget: u64,
    /// Directory for compiled components (keyed by digest and engine), so a restart skips
    /// compilation. Unset: compile into memory only.
    #[arg(long, env = "PATCHBAY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

impl EngineArgs {
    /// The engine configuration these flags describe (defaults for the rest).
    #[must_use]
    pub fn config(self) -> EngineConfig {
        EngineConfig {
            max_concurrent_instances: self.max_instances,
            memory_budget_bytes: self.memory_budget,
            cache_dir: self.cache_dir,
            ..EngineConfig::default()
        }
    }
}
