//! Running one event: a fresh store and instance per call, limits, and the outcome.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{PoolConcurrencyLimitError, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::{Engine, FunctionCode};
use crate::capabilities::{CallContext, HostCapabilities, PublishAllowList};
use crate::limits::{CallLimiter, Limits, MemoryReservation};
use crate::world::{Event, Failure, Level};

/// Everything one invocation runs with besides the event: limits, deadline, the
/// function's configuration and publish allow-list, and the bus behind its imports.
///
/// Built once per function version and cloned per event (clones share the config, the
/// allow-list and the capabilities, but not a memory reservation).
pub struct Invocation {
    capabilities: Arc<dyn HostCapabilities>,
    limits: Limits,
    deadline: Option<Instant>,
    config: Arc<BTreeMap<String, String>>,
    allow_publish: PublishAllowList,
    memory: Option<MemoryReservation>,
}

impl Clone for Invocation {
    /// A clone without the memory reservation: one reservation backs one instance.
    fn clone(&self) -> Self {
        Self {
            capabilities: Arc::clone(&self.capabilities),
            limits: self.limits,
            deadline: self.deadline,
            config: Arc::clone(&self.config),
            allow_publish: self.allow_publish.clone(),
            memory: None,
        }
    }
}

impl Invocation {
    /// Default [`Limits`], no upstream deadline, empty config, nothing publishable.
    #[must_use]
    pub fn new(capabilities: Arc<dyn HostCapabilities>) -> Self {
        Self {
            capabilities,
            limits: Limits::default(),
            deadline: None,
            config: Arc::default(),
            allow_publish: PublishAllowList::deny_all(),
            memory: None,
        }
    }

    /// Run under these limits.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The deadline the event carries (`patchbay-deadline`). The invocation ends at the
    /// earlier of it and start + `Limits::timeout`; if it has already passed, the
    /// invocation does not start.
    #[must_use]
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The function version's configuration (`config.get` / `config.get-all`).
    #[must_use]
    pub fn config(mut self, config: impl Into<Arc<BTreeMap<String, String>>>) -> Self {
        self.config = config.into();
        self
    }

    /// Subjects the function may publish and request on, and name in its outputs.
    #[must_use]
    pub fn allow_publish(mut self, allow_publish: PublishAllowList) -> Self {
        self.allow_publish = allow_publish;
        self
    }

    /// Run on memory reserved from the engine's budget
    /// ([`Engine::memory_budget`](super::Engine::memory_budget)): the instance may grow
    /// to no more than the reservation (nor its own limit), and the reservation is
    /// released only after the instance has been dropped.
    #[must_use]
    pub fn memory(mut self, reservation: MemoryReservation) -> Self {
        self.memory = Some(reservation);
        self
    }
}

impl std::fmt::Debug for Invocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invocation")
            .field("limits", &self.limits)
            .field("deadline", &self.deadline)
            .field("config_keys", &self.config.keys().collect::<Vec<_>>())
            .field("allow_publish", &self.allow_publish)
            .field(
                "reserved_bytes",
                &self.memory.as_ref().map(MemoryReservation::bytes),
            )
            .finish_non_exhaustive()
    }
}

/// Why an invocation produced neither outputs nor a [`Failure`]. Each fails that one
/// invocation only: the [`FunctionCode`] stays usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvokeError {
    /// The event's deadline had passed before the invocation started; nothing ran.
    #[error("the deadline had passed before the invocation started")]
    DeadlineAlreadyPassed,
    /// The code was loaded by another engine than the one asked to run it.
    #[error("function code {digest} was loaded by another engine")]
    ForeignCode {
        /// The code's sha256.
        digest: String,
    },
    /// Every instance slot of the pooling allocator is in use; try again later.
    #[error("no free instance slot: {reason}")]
    AtCapacity {
        /// Which pool ran out.
        reason: String,
    },
    /// Instantiation failed for another reason.
    #[error("failed to instantiate: {reason}")]
    Instantiate {
        /// wasmtime's explanation.
        reason: String,
    },
    /// The guest trapped (including a Rust panic, which aborts with `unreachable`).
    #[error("function trapped: {message}")]
    Trap {
        /// The trap with its wasm backtrace, preceded by what the guest wrote to stderr
        /// (a panic message), if anything.
        message: String,
    },
    /// The invocation was still running (or waiting on the bus) at its deadline.
    #[error("function ran past its deadline (stopped after {elapsed:?})")]
    Timeout {
        /// Time from start until it was stopped.
        elapsed: Duration,
    },
    /// The guest wanted more linear memory than its limit and trapped.
    #[error("function exceeded its memory limit of {limit_bytes} bytes (wanted {requested_bytes})")]
    OutOfMemory {
        /// `Limits::max_memory_bytes` in force.
        limit_bytes: usize,
        /// The total it asked for when refused.
        requested_bytes: usize,
    },
    /// The guest used up its fuel.
    #[error("function used up its fuel ({fuel})")]
    OutOfFuel {
        /// The fuel it was given.
        fuel: u64,
    },
    /// The handler returned an output for a subject outside the publish allow-list.
    #[error("output {index} is addressed to {subject:?}, which the function may not publish")]
    ForbiddenOutput {
        /// Position of the output in the returned list.
        index: usize,
        /// Its subject.
        subject: String,
    },
}

/// [`InvokeError`] without its fields, for branching and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvokeErrorKind {
    /// [`InvokeError::DeadlineAlreadyPassed`]
    DeadlineAlreadyPassed,
    /// [`InvokeError::ForeignCode`]
    ForeignCode,
    /// [`InvokeError::AtCapacity`]
    AtCapacity,
    /// [`InvokeError::Instantiate`]
    Instantiate,
    /// [`InvokeError::Trap`]
    Trap,
    /// [`InvokeError::Timeout`]
    Timeout,
    /// [`InvokeError::OutOfMemory`]
    OutOfMemory,
    /// [`InvokeError::OutOfFuel`]
    OutOfFuel,
    /// [`InvokeError::ForbiddenOutput`]
    ForbiddenOutput,
}

impl InvokeError {
    /// The kind of error.
    #[must_use]
    pub fn kind(&self) -> InvokeErrorKind {
        match self {
            InvokeError::DeadlineAlreadyPassed => InvokeErrorKind::DeadlineAlreadyPassed,
            InvokeError::ForeignCode { .. } => InvokeErrorKind::ForeignCode,
            InvokeError::AtCapacity { .. } => InvokeErrorKind::AtCapacity,
            InvokeError::Instantiate { .. } => InvokeErrorKind::Instantiate,
            InvokeError::Trap { .. } => InvokeErrorKind::Trap,
            InvokeError::Timeout { .. } => InvokeErrorKind::Timeout,
            InvokeError::OutOfMemory { .. } => InvokeErrorKind::OutOfMemory,
            InvokeError::OutOfFuel { .. } => InvokeErrorKind::OutOfFuel,
            InvokeError::ForbiddenOutput { .. } => InvokeErrorKind::ForbiddenOutput,
        }
    }
}

impl InvokeErrorKind {
    /// A stable snake_case name (`"out_of_memory"`), e.g. for an `outcome` label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            InvokeErrorKind::DeadlineAlreadyPassed => "deadline_already_passed",
            InvokeErrorKind::ForeignCode => "foreign_code",
            InvokeErrorKind::AtCapacity => "at_capacity",
            InvokeErrorKind::Instantiate => "instantiate",
            InvokeErrorKind::Trap => "trap",
            InvokeErrorKind::Timeout => "timeout",
            InvokeErrorKind::OutOfMemory => "out_of_memory",
            InvokeErrorKind::OutOfFuel => "out_of_fuel",
            InvokeErrorKind::ForbiddenOutput => "forbidden_output",
        }
    }
}

/// Measurements of one invocation, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InvocationStats {
    /// Store setup and instantiation from the pre-linked code.
    pub instantiate: Duration,
    /// The `handle` call, including time spent awaiting the bus.
    pub call: Duration,
    /// Most linear memory the instance held at once.
    pub peak_memory_bytes: usize,
    /// Fuel used, when the engine meters fuel.
    pub fuel_consumed: Option<u64>,
    /// Log records dropped because `Limits::max_log_records` was reached.
    pub logs_dropped: u32,
}

/// What [`FunctionCode::invoke`] returns: the handler's verdict (or why there is none)
/// and the measurements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvokeOutcome {
    /// `Ok(Ok(outputs))`: events to publish; `Ok(Err(failure))`: the handler declined the
    /// event; `Err(error)`: the invocation itself failed.
    pub result: Result<Result<Vec<Event>, Failure>, InvokeError>,
    /// Measurements, zero where the invocation did not get that far.
    pub stats: InvocationStats,
}

/// The data of one store: WASI state, the memory limiter and what the imports see.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: CallLimiter,
    pub(crate) call: CallContext,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl FunctionCode {
    /// Run `event` through the function in a fresh instance.
    ///
    /// CPU is bounded by the epoch deadline (a busy guest also yields to the async
    /// runtime every epoch tick), waiting on the bus by a timer at the same deadline
    /// (outside a tokio runtime only the former applies); memory by the invocation's
    /// limit. None of those failures affect other invocations of the same code.
    pub async fn invoke(
        &self,
        engine: &Engine,
        event: Event,
        invocation: Invocation,
    ) -> InvokeOutcome {
        let mut stats = InvocationStats::default();
        let result = self.run(engine, &event, invocation, &mut stats).await;
        InvokeOutcome { result, stats }
    }

    async fn run(
        &self,
        engine: &Engine,
        event: &Event,
        invocation: Invocation,
        stats: &mut InvocationStats,
    ) -> Result<Result<Vec<Event>, Failure>, InvokeError> {
        let start = Instant::now();
        if !wasmtime::Engine::same(&engine.inner.wasmtime, self.inner.pre.engine()) {
            return Err(InvokeError::ForeignCode {
                digest: self.inner.digest.clone(),
            });
        }
        // `reservation` is declared before the store, so it is dropped after it: the memory
        // goes back to the budget only once the instance no longer holds it.
        let Invocation {
            capabilities,
            limits,
            deadline: upstream,
            config,
            allow_publish,
            memory: reservation,
        } = invocation;
        // An unrepresentable timeout (Duration::MAX) means "no timeout of our own".
        let own = start.checked_add(limits.timeout);
        let deadline = match (upstream, own) {
            (Some(upstream), _) if upstream <= start => {
                return Err(InvokeError::DeadlineAlreadyPassed);
            }
            (Some(upstream), Some(own)) => upstream.min(own),
            (Some(only), None) | (None, Some(only)) => only,
            (None, None) => start + Duration::from_secs(365 * 24 * 3600),
        };
        let max_memory_bytes = match &reservation {
            Some(reserved) => engine
                .instance_memory_bytes(&limits)
                .min(usize::try_from(reserved.bytes()).unwrap_or(usize::MAX)),
            None => engine.instance_memory_bytes(&limits),
        };
        let fuel = engine
            .inner
            .config
            .fuel
            .map(|default| limits.fuel.unwrap_or(default));

        let capture = engine.inner.config.max_captured_output_bytes;
        let output = (capture > 0).then(|| {
            (
                MemoryOutputPipe::new(capture),
                MemoryOutputPipe::new(capture),
            )
        });
        let mut wasi = WasiCtxBuilder::new();
        wasi.allow_tcp(false).allow_udp(false);
        if let Some((stdout, stderr)) = &output {
            wasi.stdout(stdout.clone()).stderr(stderr.clone());
        }
        let state = HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: CallLimiter::new(max_memory_bytes),
            call: CallContext {
                deadline,
                config,
                publish: allow_publish,
                capabilities,
                logs_left: limits.max_log_records,
                logs_dropped: 0,
            },
        };
        let mut store = Store::new(&engine.inner.wasmtime, state);
        store.limiter(|state| &mut state.limiter);
        // Check the real clock at every epoch tick: trap once past the deadline, otherwise
        // yield so that a busy guest cannot starve other tasks on this runtime thread.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|store| {
            Ok(if Instant::now() >= store.data().call.deadline {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        if let Some(fuel) = fuel {
            store.set_fuel(fuel).map_err(|e| InvokeError::Instantiate {
                reason: format!("{e:#}"),
            })?;
        }

        let pre = &self.inner.pre;
        let run = async {
            let instance = pre
                .instantiate_async(&mut store)
                .await
                .map_err(Stage::Instantiate)?;
            let instantiated = Instant::now();
            stats.instantiate = instantiated - start;
            let result = instance
                .patchbay_function_handler()
                .call_handle(&mut store, event)
                .await;
            stats.call = instantiated.elapsed();
            result.map_err(Stage::Call)
        };
        let ran = match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::time::timeout_at(deadline.into(), run)
                .await
                .unwrap_or(Err(Stage::Deadline)),
            Err(_) => run.await,
        };

        let state = store.data();
        stats.peak_memory_bytes = state.limiter.peak_memory_bytes();
        stats.fuel_consumed =
            fuel.and_then(|fuel| store.get_fuel().ok().map(|left| fuel.saturating_sub(left)));
        let stderr = output
            .as_ref()
            .map(|(_, stderr)| String::from_utf8_lossy(&stderr.contents()).into_owned())
            .unwrap_or_default();
        let result = match ran {
            Ok(Ok(outputs)) => match outputs
                .iter()
                .position(|output| !state.call.publish.allows(&output.subject))
            {
                Some(index) => Err(InvokeError::ForbiddenOutput {
                    index,
                    subject: outputs[index].subject.clone(),
                }),
                None => Ok(Ok(outputs)),
            },
            Ok(Err(failure)) => Ok(Err(failure)),
            Err(stage) => Err(classify(stage, &store, start, fuel, &stderr)),
        };

        if let Some((stdout, _)) = &output {
            let call = &mut store.data_mut().call;
            forward_lines(
                call,
                Level::Info,
                &String::from_utf8_lossy(&stdout.contents()),
            );
            forward_lines(call, Level::Warn, &stderr);
        }
        stats.logs_dropped = store.data().call.logs_dropped;
        result
    }
}

/// Where an invocation stopped without a result.
enum Stage {
    Instantiate(wasmtime::Error),
    Call(wasmtime::Error),
    /// The async timer fired (the guest was waiting on the bus, or yielding).
    Deadline,
}

fn classify(
    stage: Stage,
    store: &Store<HostState>,
    start: Instant,
    fuel: Option<u64>,
    stderr: &str,
) -> InvokeError {
    let limiter = &store.data().limiter;
    let (error, instantiating) = match stage {
        Stage::Deadline => {
            return InvokeError::Timeout {
                elapsed: start.elapsed(),
            };
        }
        Stage::Instantiate(error) => (error, true),
        Stage::Call(error) => (error, false),
    };
    // A refused growth first: the trap that follows it (Rust aborts on allocation failure)
    // is a symptom, not the cause.
    if let Some(requested_bytes) = limiter.refused_at() {
        return InvokeError::OutOfMemory {
            limit_bytes: limiter.max_memory_bytes(),
            requested_bytes,
        };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => {
            return InvokeError::Timeout {
                elapsed: start.elapsed(),
            };
        }
        Some(Trap::OutOfFuel) => {
            return InvokeError::OutOfFuel {
                fuel: fuel.unwrap_or_default(),
            };
        }
        _ => {}
    }
    if let Some(limit) = error.downcast_ref::<PoolConcurrencyLimitError>() {
        return InvokeError::AtCapacity {
            reason: limit.to_string(),
        };
    }
    let description = format!("{error:?}");
    if instantiating {
        return InvokeError::Instantiate {
            reason: description,
        };
    }
    let stderr = stderr.trim();
    let message = if stderr.is_empty() {
        description
    } else {
        format!("{stderr}\n{description}")
    };
    InvokeError::Trap { message }
}

fn forward_lines(call: &mut CallContext, level: Level, text: &str) {
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        call.record_log(level, line.to_owned());
    }
}
