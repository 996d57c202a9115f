//! The wasmtime engine that loads and runs event functions.
//!
//! [`Engine`] owns the wasmtime engine (pooling allocator, epoch interruption, optional
//! fuel), the linker with WASI p2 and the Patchbay imports, the compiled-code caches and
//! the epoch thread. [`Engine::load`] turns component bytes into a [`FunctionCode`]
//! (checked, compiled, pre-linked); [`FunctionCode::invoke`] runs one event in a fresh
//! instance under an [`Invocation`]'s limits and capabilities. [`Engine::load_http`] and
//! [`HttpCode::handle`] do the same for `wasi:http/proxy` components (the gateway's HTTP
//! functions).
//!
//! Not here: where components come from (registry, object store), what triggers an
//! invocation, how outputs are published or acknowledged, and metrics registration — the
//! node does those with the plain values this module returns.

mod bench;
mod config;
mod http;
mod invoke;
mod load;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Enabled, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use bench::bench_instantiate_call;
pub use config::EngineConfig;
pub use http::{HttpCode, HttpInvokeError, HttpResponse, INCOMING_HANDLER_EXPORT};
pub use invoke::{Invocation, InvocationStats, InvokeError, InvokeErrorKind, InvokeOutcome};
pub use load::{CodeOrigin, FunctionCode, LoadError};

use crate::capabilities::CallContext;
use crate::limits::{Limits, MemoryBudget};
use crate::world::EventHandler;
use invoke::HostState;

/// Why the engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// wasmtime rejected the configuration (e.g. a pool larger than the address space).
    #[error("invalid engine configuration: {reason}")]
    Config {
        /// wasmtime's explanation.
        reason: String,
    },
    /// The compile cache directory could not be created.
    #[error("failed to create compile cache directory {path:?}")]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The epoch thread could not be started.
    #[error("failed to start the epoch thread")]
    EpochThread(#[source] std::io::Error),
}

/// The function engine. Cheap to clone; every clone shares the same wasmtime engine,
/// caches and epoch thread, which stops when the last clone is dropped.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    wasmtime: wasmtime::Engine,
    linker: Linker<HostState>,
    /// WASI p2 + `wasi:http`, for `wasi:http/proxy` components.
    http_linker: Linker<http::HttpState>,
    config: EngineConfig,
    memory_budget: MemoryBudget,
    pagemap_scan: bool,
    /// Distinguishes cache files of incompatible engines (wasmtime version, settings).
    compatibility: String,
    /// Code by sha256, as long as somebody holds it.
    loaded: Mutex<HashMap<String, Weak<load::CodeInner>>>,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.inner.config)
            .field("pagemap_scan", &self.inner.pagemap_scan)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Build the engine and start its epoch thread.
    pub fn new(config: EngineConfig) -> Result<Self, EngineError> {
        let pagemap_scan =
            config.pagemap_scan && PoolingAllocationConfig::is_pagemap_scan_available();
        let wasmtime =
            wasmtime::Engine::new(&wasmtime_config(&config, pagemap_scan)).map_err(|e| {
                EngineError::Config {
                    reason: format!("{e:#}"),
                }
            })?;
        let config_error = |e: wasmtime::Error| EngineError::Config {
            reason: format!("{e:#}"),
        };
        let linker = linker(&wasmtime).map_err(config_error)?;
        let mut http_linker = Linker::new(&wasmtime);
        http::add_to_linker(&mut http_linker).map_err(config_error)?;
        if let Some(dir) = &config.cache_dir {
            create_private_dir(dir).map_err(|source| EngineError::CacheDir {
                path: dir.clone(),
                source,
            })?;
        }
        let compatibility = {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            wasmtime.precompile_compatibility_hash().hash(&mut hasher);
            format!("{:016x}", hasher.finish())
        };
        let ticker =
            EpochTicker::start(&wasmtime, config.epoch_tick).map_err(EngineError::EpochThread)?;
        Ok(Self {
            inner: Arc::new(Inner {
                wasmtime,
                linker,
                http_linker,
                memory_budget: MemoryBudget::new(config.memory_budget_bytes),
                config,
                pagemap_scan,
                compatibility,
                loaded: Mutex::default(),
                _ticker: ticker,
            }),
        })
    }

    /// The configuration the engine was built with.
    #[must_use]
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The memory all instances together may hold, shared by every clone of the engine.
    /// Callers reserve from it ([`Invocation::memory`]) before invoking.
    #[must_use]
    pub fn memory_budget(&self) -> &MemoryBudget {
        &self.inner.memory_budget
    }

    /// The linear memory an invocation under `limits` may hold, and so what it must
    /// reserve: its own limit, cut to the engine's per-instance ceiling.
    #[must_use]
    pub fn instance_memory_bytes(&self, limits: &Limits) -> usize {
        limits
            .max_memory_bytes
            .min(self.inner.config.max_memory_bytes)
    }

    /// Whether slot resets use `PAGEMAP_SCAN` (asked for and supported by the kernel).
    #[must_use]
    pub fn pagemap_scan(&self) -> bool {
        self.inner.pagemap_scan
    }

    /// Whether invocations are fuel-metered.
    #[must_use]
    pub fn meters_fuel(&self) -> bool {
        self.inner.config.fuel.is_some()
    }

    /// The underlying wasmtime engine (e.g. for `pooling_allocator_metrics`).
    #[must_use]
    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner.wasmtime
    }

    fn cache_path(&self, dir: &Path, digest: &str) -> PathBuf {
        dir.join(format!("{digest}-{}.cwasm", self.inner.compatibility))
    }
}

fn wasmtime_config(config: &EngineConfig, pagemap_scan: bool) -> wasmtime::Config {
    let instances = config.max_concurrent_instances.max(1);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(instances)
        // A Rust wasip2 component is a handful of core instances (main module plus the
        // canonical-ABI shims) with one memory and a couple of tables; leave headroom for
        // components built by other toolchains (adapters bring their own memory).
        .total_core_instances(instances.saturating_mul(8))
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(4))
        .total_stacks(instances)
        .max_memory_size(config.max_memory_bytes)
        .linear_memory_keep_resident(config.linear_memory_keep_resident)
        .table_keep_resident(config.table_keep_resident)
        .async_stack_keep_resident(config.async_stack_keep_resident)
        .pagemap_scan(if pagemap_scan {
            Enabled::Yes
        } else {
            Enabled::No
        });
    let mut wasmtime = wasmtime::Config::new();
    wasmtime
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        .consume_fuel(config.fuel.is_some());
    wasmtime
}

fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    // WASI p2 because every wasm32-wasip2 guest imports parts of it (clocks, random,
    // stdio, environment) even when the function never touches them. What it may reach
    // is decided per store: no preopens, no network, no environment, no arguments.
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    EventHandler::add_to_linker::<HostState, HasSelf<CallContext>>(&mut linker, |state| {
        &mut state.call
    })?;
    Ok(linker)
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// Advances the engine's epoch every tick until dropped.
struct EpochTicker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: &wasmtime::Engine, tick: Duration) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        // A weak handle, so that the thread never keeps the engine's code and pools alive.
        let engine = engine.weak();
        let tick = tick.max(Duration::from_millis(1));
        let thread = std::thread::Builder::new()
            .name("patchbay-epoch".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                    match engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread at once.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
