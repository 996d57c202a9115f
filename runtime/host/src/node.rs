//! A runtime node: connects with its own identity, watches the registry, keeps the
//! active version of every function loaded, and runs its triggers.
//!
//! Hot swap: the function table maps a name to the [`Deployed`] version serving it. A
//! message picks the version when it is dispatched and holds it until done, so a deploy
//! or rollback replaces the entry without a restart, in-flight invocations of the old
//! version finish on it (drain), and no message is handled by both. A trigger's
//! subscription is replaced only when the trigger itself changes. While a canary runs the
//! node serves its version too, and the trigger picks per message (see [`crate::canary`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt as _;
use patchbay_bus::{Bus, BusConfig, CloudEvent, ConnectError, Deadline, Token};
use patchbay_telemetry::{Metrics, ReadyFlag};
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::metrics::HostMetrics;
use crate::reply::{ErrorKind, FailureReply};
use crate::triggers;
use patchbay_engine::engine::{Engine, EngineConfig, FunctionCode};
use patchbay_engine::limits::{BudgetError, MemoryReservation};
use patchbay_registry::{Change, FunctionSpec, Registry, RegistryError, Trigger, VersionSpec};

/// How to run a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's name; its identity is `runtime/<node>`.
    pub node: String,
    /// The bus connection (its certificate must be the node's identity).
    pub bus: BusConfig,
    /// The wasm engine.
    pub engine: EngineConfig,
    /// How long shutdown waits for in-flight invocations.
    pub drain_timeout: Duration,
    /// Most outputs of stream and schedule triggers stored in one atomic batch (group
    /// commit across the invocations that finish together); 0: each output with its own
    /// durable publish.
    pub output_batch: usize,
}

/// Why a node stopped.
#[derive(Debug, Error)]
pub enum NodeError {
    /// The bus connection failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The registry is unavailable.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The engine could not start.
    #[error("wasm engine: {0}")]
    Engine(String),
    /// Metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] patchbay_telemetry::TelemetryError),
    /// A bus operation failed.
    #[error("{operation} failed: {reason}")]
    Nats {
        /// What was being done.
        operation: &'static str,
        /// The underlying message.
        reason: String,
    },
}

/// The version of a function this node serves.
pub(crate) struct Deployed {
    pub name: Token,
    pub spec: VersionSpec,
    pub code: FunctionCode,
    /// One permit per invocation running at once: [`Deployed::concurrency`] of them.
    pub limiter: Arc<Semaphore>,
    /// Invocations of this version the node runs at once: the version's
    /// `max_concurrency`, capped by how many of its memory reservations fit in the
    /// node's memory budget.
    pub concurrency: u32,
    /// What each invocation reserves from the node's memory budget, bytes: the version's
    /// memory limit, cut to the engine's per-instance ceiling.
    pub memory_bytes: u64,
    /// The version's limits in the engine's terms.
    pub limits: patchbay_engine::limits::Limits,
    /// The version's configuration, shared by every invocation.
    pub config: Arc<std::collections::BTreeMap<String, String>>,
    /// The version's publish allow-list.
    pub allow: patchbay_engine::capabilities::PublishAllowList,
    /// Its metric children.
    pub metrics: crate::metrics::VersionMetrics,
}

/// What came of running a function on one event.
pub(crate) enum Outcome {
    /// Output events with the subject each goes to (prefix applied).
    Ok(Vec<(String, CloudEvent)>),
    /// The function declined.
    Failure(FailureReply),
    /// The platform could not complete the invocation.
    Error(ErrorKind, String),
}

impl Outcome {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::Ok(_) => "ok",
            Self::Failure(FailureReply::Retry { .. }) => "retry",
            Self::Failure(FailureReply::DeadLetter { .. }) => "dead-letter",
            Self::Failure(FailureReply::Drop { .. }) => "drop",
            Self::Error(kind, _) => error_label(*kind),
        }
    }
}

pub(crate) fn error_label(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::UnknownFunction => "unknown-function",
        ErrorKind::BadInput => "bad-input",
        ErrorKind::DeadlineExceeded => "deadline-exceeded",
        ErrorKind::Timeout => "timeout",
        ErrorKind::OutOfMemory => "out-of-memory",
        ErrorKind::Trap => "trap",
        ErrorKind::Overloaded => "overloaded",
        ErrorKind::ForbiddenOutput => "forbidden-output",
        ErrorKind::Internal => "internal",
    }
}

struct RunningTrigger {
    trigger: Trigger,
    stop: CancellationToken,
}

/// Shared state of a running node.
pub(crate) struct Node {
    pub name: String,
    pub bus: Bus,
    pub engine: Engine,
    pub registry: Registry,
    pub metrics: HostMetrics,
    /// Resilience policies of the functions' own requests (`request` import).
    pub resilience: patchbay_bus::resilience::Resilience,
    /// In-flight work, waited for at shutdown.
    pub tasks: TaskTracker,
    /// Cancelled at shutdown: every trigger stops taking new work.
    pub shutdown: CancellationToken,
    functions: RwLock<HashMap<String, Arc<Deployed>>>,
    code_cache: Mutex<HashMap<String, FunctionCode>>,
    /// The function state bucket, opened on first use.
    state: tokio::sync::OnceCell<kv::Store>,
    triggers: Mutex<HashMap<String, RunningTrigger>>,
    /// Canary versions served beside the active ones (see [`crate::canary`]).
    pub(crate) canaries: crate::canary::Canaries,
    /// Trigger subscriptions the server refused (see [`triggers::status`]).
    pub(crate) refusals: triggers::status::Refusals,
    /// Stores durable outputs in shared atomic batches (none: one publish per output).
    pub(crate) outputs: Option<patchbay_bus::batch::GroupCommit>,
}

/// Run a node until `shutdown` resolves, then drain: every trigger stops taking new work
/// at once (core subscriptions unsubscribe so queue-group peers get the next requests, and
/// stream triggers nak what they pulled but did not start), in-flight invocations finish
/// and ack within `drain_timeout`, and what is still running then is abandoned unacked
/// (redelivered; its outputs are de-duplicated by `Nats-Msg-Id`).
pub async fn run(
    config: NodeConfig,
    metrics: &Metrics,
    ready: ReadyFlag,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let bus = patchbay_bus::connect(&config.bus).await?;
    let engine =
        Engine::new(config.engine.clone()).map_err(|e| NodeError::Engine(e.to_string()))?;
    let registry = Registry::open(&bus.jetstream()).await?;
    let resilience = patchbay_bus::resilience::Resilience::start(&bus, metrics).await?;
    // Before any trigger subscribes, so that no refusal is missed.
    let refusals = triggers::status::Refusals::watch(&bus);
    let outputs = (config.output_batch > 0).then(|| {
        patchbay_bus::batch::GroupCommit::start(
            patchbay_bus::batch::BatchPublisher::new(&bus),
            config.output_batch,
        )
    });
    let node = Arc::new(Node {
        name: config.node.clone(),
        bus,
        engine,
        registry,
        metrics: HostMetrics::register(metrics)?,
        resilience,
        tasks: TaskTracker::new(),
        shutdown: CancellationToken::new(),
        functions: RwLock::default(),
        code_cache: Mutex::default(),
        state: tokio::sync::OnceCell::new(),
        triggers: Mutex::default(),
        canaries: crate::canary::Canaries::default(),
        refusals,
        outputs,
    });

    node.load_verdicts().await;
    for spec in node.registry.list().await? {
        node.apply(spec).await;
    }
    let invoke = node.tasks.spawn(triggers::invoke::run(Arc::clone(&node)));
    let status = tokio::spawn(triggers::status::run(Arc::clone(&node)));
    let instances = tokio::spawn(sample_instances(Arc::clone(&node)));
    let discovery = crate::discovery::register(&node).await;
    let watcher = tokio::spawn(Arc::clone(&node).watch_registry());
    let verdicts = tokio::spawn(Arc::clone(&node).watch_verdicts());
    ready.set_ready(true);
    tracing::info!(node = %node.name, "runtime node ready");

    tokio::select! {
        () = shutdown => tracing::info!("shutting down: draining in-flight invocations"),
        result = watcher => {
            tracing::error!(?result, "registry watch ended");
        }
    }
    ready.set_ready(false);
    node.shutdown.cancel();
    node.tasks.close();
    if tokio::time::timeout(config.drain_timeout, node.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = node.tasks.len(),
            timeout = ?config.drain_timeout,
            "drain timeout: abandoning in-flight invocations unacked (stream messages will be redelivered; outputs already stored are de-duplicated by Nats-Msg-Id)"
        );
    } else {
        tracing::info!("drained: every in-flight invocation finished");
    }
    invoke.abort();
    status.abort();
    instances.abort();
    verdicts.abort();
    if let Some(discovery) = discovery {
        discovery.stop().await;
    }
    let _ = node.bus.client().flush().await;
    Ok(())
}

/// Every second, the pooling allocator's slots in use as `patchbay_runtime_instances`
/// and the memory budget's reservations as `patchbay_runtime_memory_reserved_bytes`.
async fn sample_instances(node: Arc<Node>) {
    let pool = node.engine.wasmtime().pooling_allocator_metrics();
    let budget = node.engine.memory_budget();
    node.metrics.memory_budget.set(budget.total_bytes() as f64);
    let gauge = |kind: &str| node.metrics.instances.with_label_values(&[kind]);
    let (components, cores, memories) = (gauge("component"), gauge("core"), gauge("memory"));
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        node.metrics
            .memory_reserved
            .set(budget.reserved_bytes() as f64);
        if let Some(pool) = &pool {
            components.set(pool.component_instances() as f64);
            cores.set(pool.core_instances() as f64);
            memories.set(pool.memories() as f64);
        }
    }
}

impl Node {
    /// The version serving `name`, if any.
    pub(crate) fn function(&self, name: &str) -> Option<Arc<Deployed>> {
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Every function served, with its version.
    pub(crate) fn served(&self) -> Vec<Arc<Deployed>> {
        let mut all: Vec<_> = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    async fn watch_registry(self: Arc<Self>) -> Result<(), NodeError> {
        let changes = self.registry.changes().await.map_err(|e| NodeError::Nats {
            operation: "watch the function registry",
            reason: e.to_string(),
        })?;
        let mut changes = std::pin::pin!(changes);
        while let Some(change) = changes.next().await {
            match change {
                Change::Stored(spec) => self.apply(spec).await,
                Change::Removed(name) => self.remove(&name),
            }
        }
        Ok(())
    }

    /// Serve the active version of `spec` (a no-op when already served), and its canary.
    async fn apply(self: &Arc<Self>, spec: FunctionSpec) {
        self.apply_active(&spec).await;
        self.apply_canary(&spec).await;
    }

    /// Serve the active version of `spec` (a no-op when already served).
    async fn apply_active(self: &Arc<Self>, spec: &FunctionSpec) {
        let span = tracing::info_span!("apply", function = %spec.name, version = spec.active);
        async {
            let name = match Token::new(spec.name.clone()) {
                Ok(n) => n,
                Err(e) => return tracing::error!(error = %e, "ignoring function with invalid name"),
            };
            let version = match spec.active_version() {
                Ok(v) => v.clone(),
                Err(e) => return tracing::error!(error = %e, "ignoring function spec"),
            };
            if version.trigger.is_http() {
                // Gateways run wasi:http components; a function that became one stops here.
                tracing::debug!("not serving an HTTP function (gateways do)");
                return self.remove(name.as_str());
            }
            let current = self.function(name.as_str());
            if current.as_ref().is_some_and(|c| c.spec == version) {
                return;
            }
            let Some(deployed) = self.deploy_version(&name, &version).await else {
                return;
            };
            self.functions
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(name.to_string(), Arc::clone(&deployed));
            if let Some(old) = &current {
                let _ = self
                    .metrics
                    .loaded
                    .remove_label_values(&[name.as_str(), &old.spec.version.to_string()]);
            }
            self.metrics
                .loaded
                .with_label_values(&[name.as_str(), &deployed.spec.version.to_string()])
                .set(1.0);
            self.metrics
                .concurrency_limit
                .with_label_values(&[name.as_str()])
                .set(f64::from(deployed.concurrency));
            tracing::info!(version = deployed.spec.version, digest = %deployed.spec.digest, trigger = %deployed.spec.trigger, "serving");
            self.ensure_trigger(&name, &deployed.spec.trigger);
        }
        .instrument(span)
        .await;
    }

    /// Load `version` of `name` for serving; `None` (logged) when it cannot be.
    pub(crate) async fn deploy_version(
        &self,
        name: &Token,
        version: &VersionSpec,
    ) -> Option<Arc<Deployed>> {
        let code = match self.load(&version.digest).await {
            Ok(code) => code,
            Err(e) => {
                tracing::error!(version = version.version, error = %e, "cannot load function version; keeping the previous one");
                return None;
            }
        };
        let allow = match patchbay_engine::capabilities::PublishAllowList::new(&version.publish) {
            Ok(allow) => allow,
            Err(e) => {
                tracing::error!(version = version.version, error = %e, "ignoring function version with an invalid allow-list");
                return None;
            }
        };
        let limits = patchbay_engine::limits::Limits {
            timeout: version.limits.timeout(),
            max_memory_bytes: usize::try_from(version.limits.memory_bytes).unwrap_or(usize::MAX),
            ..patchbay_engine::limits::Limits::default()
        };
        let (memory_bytes, concurrency) = self.memory_plan(version, &limits)?;
        Some(Arc::new(Deployed {
            metrics: crate::metrics::VersionMetrics::new(
                &self.metrics,
                name.as_str(),
                version.version,
            ),
            name: name.clone(),
            limiter: Arc::new(Semaphore::new(concurrency as usize)),
            concurrency,
            memory_bytes,
            limits,
            config: Arc::new(version.config.clone()),
            allow,
            spec: version.clone(),
            code,
        }))
    }

    /// What each invocation of `version` reserves from the memory budget and how many may
    /// run at once; `None` (logged) when not even one fits in the budget.
    fn memory_plan(
        &self,
        version: &VersionSpec,
        limits: &patchbay_engine::limits::Limits,
    ) -> Option<(u64, u32)> {
        let budget = self.engine.memory_budget();
        let memory_bytes = self.engine.instance_memory_bytes(limits) as u64;
        let (memory_mib, budget_mib) = (memory_bytes >> 20, budget.total_bytes() >> 20);
        if memory_bytes < version.limits.memory_bytes {
            tracing::warn!(
                version = version.version,
                limit_mib = version.limits.memory_bytes >> 20,
                ceiling_mib = memory_mib,
                "memory limit above this node's per-instance ceiling: instances get the ceiling"
            );
        }
        let wanted = version.limits.max_concurrency.max(1);
        let Some(concurrency) =
            patchbay_engine::limits::effective_concurrency(budget, memory_bytes, wanted)
        else {
            tracing::error!(
                version = version.version,
                memory_mib,
                budget_mib,
                "cannot serve function version: one instance's memory limit exceeds this node's whole memory budget; keeping the previous one"
            );
            return None;
        };
        if concurrency < wanted {
            tracing::warn!(
                version = version.version,
                concurrency,
                wanted,
                memory_mib,
                budget_mib,
                "concurrency capped by the node's memory budget: {concurrency} × {memory_mib} MiB fit in {budget_mib} MiB, not {wanted}"
            );
        }
        Some((memory_bytes, concurrency))
    }

    fn remove(&self, name: &str) {
        self.clear_canary(name);
        let removed = self
            .functions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        if let Some(old) = removed {
            let _ = self
                .metrics
                .loaded
                .remove_label_values(&[name, &old.spec.version.to_string()]);
            let _ = self.metrics.concurrency_limit.remove_label_values(&[name]);
        }
        if let Some(t) = self
            .triggers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
        {
            t.stop.cancel();
        }
        tracing::info!(function = name, "removed");
    }

    /// Start the trigger for `name`, replacing a different one.
    fn ensure_trigger(self: &Arc<Self>, name: &Token, trigger: &Trigger) {
        let mut running = self.triggers.lock().unwrap_or_else(PoisonError::into_inner);
        if running
            .get(name.as_str())
            .is_some_and(|t| &t.trigger == trigger)
        {
            return;
        }
        if let Some(old) = running.remove(name.as_str()) {
            old.stop.cancel();
        }
        let stop = self.shutdown.child_token();
        triggers::start(
            Arc::clone(self),
            name.clone(),
            trigger.clone(),
            stop.clone(),
        );
        running.insert(
            name.to_string(),
            RunningTrigger {
                trigger: trigger.clone(),
                stop,
            },
        );
    }

    /// The compiled component for `digest`, from cache or the artifact store.
    async fn load(&self, digest: &str) -> Result<FunctionCode, String> {
        if let Some(code) = self
            .code_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(digest)
            .cloned()
        {
            return Ok(code);
        }
        let bytes = self
            .registry
            .get_artifact(digest)
            .await
            .map_err(|e| e.to_string())?;
        let engine = self.engine.clone();
        let code = tokio::task::spawn_blocking(move || engine.load(&bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.code_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(digest.to_owned(), code.clone());
        Ok(code)
    }

    /// The bucket holding every function's state ([`patchbay_registry::FUNCTION_STATE_BUCKET`],
    /// declared in deploy/streams.toml), opened once; a function reaches only its own keys
    /// in it (see [`patchbay_registry::state_key`]).
    pub(crate) async fn bucket(&self) -> Result<kv::Store, String> {
        let bucket = patchbay_registry::FUNCTION_STATE_BUCKET;
        self.state
            .get_or_try_init(|| async {
                self.bus
                    .jetstream()
                    .get_key_value(bucket)
                    .await
                    .map_err(|e| format!("open bucket {bucket} (run `patchbay bootstrap`): {e}"))
            })
            .await
            .cloned()
    }

    /// Wait until the memory budget has room for an invocation of `function`'s served
    /// version, keeping nothing: a pull consumer calls it so that it does not take a
    /// message off its queue that could not start yet (the invocation still reserves, and
    /// may wait its turn, in [`Node::invoke`]).
    pub(crate) async fn wait_for_memory(&self, function: &str) {
        if let Some(f) = self.function(function) {
            self.engine
                .memory_budget()
                .wait_for_room(f.memory_bytes)
                .await;
        }
    }

    /// Reserve `f`'s memory from the node's budget, waiting in line at most half the time
    /// left before the event's deadline — past that it could do little of its work, and
    /// the refusal still reaches a caller who gives up at the deadline — or, without a
    /// deadline, for the version's timeout (so a stream message that waited the longest
    /// still finishes within its `ack_wait` of twice the timeout). What cannot start in
    /// time is shed: counted, and answered `overloaded`.
    async fn reserve_memory(
        &self,
        f: &Deployed,
        deadline: Option<Deadline>,
    ) -> Result<MemoryReservation, Outcome> {
        let budget = self.engine.memory_budget();
        // The common case: free now, no clock read.
        let refused = match budget.try_reserve(f.memory_bytes) {
            Ok(memory) => return Ok(memory),
            Err(refused @ BudgetError::TooLarge { .. }) => refused,
            Err(BudgetError::Exhausted { .. }) => {
                let wait = match deadline {
                    Some(d) => match d.remaining(self.bus.clock()) {
                        Some(left) => left / 2,
                        None => {
                            return Err(Outcome::Error(
                                ErrorKind::DeadlineExceeded,
                                "the event's deadline passed before it could start".into(),
                            ));
                        }
                    },
                    None => f.limits.timeout,
                };
                let now = tokio::time::Instant::now();
                // A timeout too long to represent waits as good as forever.
                let until = now
                    .checked_add(wait)
                    .unwrap_or(now + Duration::from_secs(365 * 24 * 3600));
                match budget.reserve(f.memory_bytes, until).await {
                    Ok(memory) => return Ok(memory),
                    Err(refused) => refused,
                }
            }
        };
        f.metrics.shed_memory.inc();
        tracing::warn!(error = %refused, "shed an invocation: no memory to run it in time");
        Err(Outcome::Error(ErrorKind::Overloaded, refused.to_string()))
    }

    /// Run `f` on `event` (which arrived on `subject`) and account for it.
    pub(crate) async fn invoke(
        self: &Arc<Self>,
        f: &Arc<Deployed>,
        subject: &str,
        event: CloudEvent,
        deadline: Option<Deadline>,
        trigger: &'static str,
    ) -> Outcome {
        let version = f.spec.version.to_string();
        let span = tracing::info_span!(
            "invoke",
            otel.name = format!("invoke {}", f.name),
            faas.name = %f.name,
            faas.version = f.spec.version,
            faas.trigger = trigger,
            faas.invocation_id = %event.id,
            patchbay.outcome = tracing::field::Empty,
        );
        let outcome = async {
            let Ok(_permit) = f.limiter.acquire().await else {
                return Outcome::Error(ErrorKind::Overloaded, "function is shutting down".into());
            };
            let memory = match self.reserve_memory(f, deadline).await {
                Ok(memory) => memory,
                Err(refused) => return refused,
            };
            f.metrics.inflight.inc();
            let outcome = crate::dispatch::run(self, f, subject, event, deadline, memory).await;
            f.metrics.inflight.dec();
            outcome
        }
        .instrument(span.clone())
        .await;
        span.record("patchbay.outcome", outcome.label());
        self.metrics
            .invocations
            .with_label_values(&[f.name.as_str(), &version, trigger, outcome.label()])
            .inc();
        self.observe_canary(f, &outcome);
        outcome
    }
}
