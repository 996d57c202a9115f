//! The NATS adapter: one task owns the [`Engine`], feeds it the inputs of two durable
//! consumers, publishes what it decides, persists it, and only then acknowledges.
//!
//! # Inputs
//!
//! Two durable pull consumers named `agents`, declared in `deploy/streams.toml` and created
//! by the admin bootstrap (this identity may only bind, pull and ack): on `CC_CALLS`
//! (`cc.v1.calls.*.routed`, `.hangup`; a `.closed` is acknowledged and counted, since a
//! closed call is never queued) and on `CC_AGENT_CMDS` (`cc.v1.agents.*.cmd.>`). Both
//! message streams are merged into one; the engine task takes a **batch** — everything
//! already delivered, up to [`AgentsConfig::max_batch`] — and applies it input by input at
//! the injected clock's `now`. A timer wakes the task at [`Engine::next_due`] to
//! [`Engine::tick`] (offer timeouts, wrap-up ends, overflow, relaxation).
//!
//! # Persistence: snapshot, then publish
//!
//! For each batch (and each timer tick), in this order:
//!
//! 1. **apply** every input, collecting the outputs;
//! 2. **snapshot**: write the whole engine ([`crate::store::Stored`]: engine state, the
//!    stream sequences applied per consumer, and the batch's outputs as its **outbox**),
//!    zlib-compressed, to KV `cc-agents` key `engine`, as an update *at the revision this
//!    instance last wrote*;
//! 3. **publish** the outputs as one **atomic batch per stream** (`CC_CALLS`, `CC_AGENTS`,
//!    both at once; [`patchbay_bus::batch`]) and wait for each commit: the stream stores a
//!    batch whole or not at all, with about four fsyncs however long it is, where single
//!    publishes cost one fsync per output. `Nats-Msg-Id` = [`crate::engine::Output::id`], deterministic
//!    (`call-<call>-<seq>`), so a re-publish is stored once (a batch holding an id already
//!    stored is published output by output, so each duplicate is still known);
//! 4. **ack** the batch's inputs (and terminate its bad ones).
//!
//! Why a whole snapshot rather than a log of changes: the engine's state is small (a few
//! hundred KiB compressed for 5,000 agents), a snapshot is one atomic KV write, and restore
//! is [`Engine::restore`] — offers with their deadlines, wrap-up deadlines, queue order and
//! counters, all in one value. Batching amortises it: under load one snapshot covers up to
//! `max_batch` inputs, and the batch's outputs cost one commit per stream — a whole engine
//! batch is about nine fsyncs (snapshot, and two atomic batches of about four each)
//! however many inputs it held: 1.3 fsyncs per decision instead of 10.8.
//!
//! ## Why the snapshot comes before the publish
//!
//! The engine is deterministic, but what it decides depends on the *order* of its inputs,
//! and that order cannot be reproduced after a crash: two consumers are merged, and the
//! inputs a dead process held come back only after the consumer's `ack_wait`, behind newer
//! ones. With the opposite order (publish, then snapshot) a restarted engine re-decided a
//! batch that was already in the stream, from the snapshot before it, in another order.
//! Issue 12 caught it: an accept and a hangup, the hangup redelivered first; the new engine
//! decided "abandoned" where the stream said "assigned"; its events reused the stored ids,
//! so the stream kept "assigned" and never got "ended", and the agent was then offered a new
//! call while the stream showed it still holding the old one.
//!
//! So a decision is persisted before anyone can see it: every published event was decided
//! by a state already in the bucket, and a restarted engine starts from a state that
//! contains everything the stream shows. It cannot contradict the stream, and its own
//! events continue each call's and agent's sequence past the stored ones, so their ids are
//! new. The alternatives were worse here: rebuilding the original input order from the
//! published outputs needs the service to read its output streams (it may not — see
//! `deploy/access.toml`), and a journal of the input order costs a second write per batch
//! and replay logic, where this only reorders the two writes.
//!
//! What a crash (kill -9) at each point does:
//!
//! * before 2 finishes: nothing of the batch was published or acked; the inputs are
//!   redelivered (after `ack_wait`) and applied to the last snapshot, maybe in another
//!   order and with other results — which contradicts nothing, since nobody saw the first.
//! * during 3: the snapshot holds the batch's state and outbox. The restarted engine first
//!   publishes the outbox again, before taking any input; what had landed is de-duplicated
//!   by id (`patchbay_agents_replayed_outputs_total`). The redelivered inputs' stream
//!   sequences are in the snapshot, so they are acked without being applied.
//! * between 3 and 4: as above; the whole outbox is de-duplicated.
//! * after 4: nothing to redo.
//!
//! An outbox published long ago must not be published again past the streams'
//! `duplicate_window` (2 minutes; it would then be stored twice): the next snapshot clears
//! it, and when no batch comes within [`AgentsConfig::stats_interval`] a snapshot of its
//! own does (so does shutdown).
//!
//! **Divergence**: a freshly decided output whose first publish the stream reports as a
//! duplicate means the stream held *another* decision under its id — the engine went back
//! behind what it had published (a snapshot written by a build that published first, a
//! bucket restored from a backup). It is logged as an error and counted in
//! `patchbay_agents_replay_divergence_total`, which therefore stays 0, crashes included.
//!
//! So no queued call, reservation deadline or wrap-up deadline is lost, no published
//! decision is contradicted, and a call is never offered to two agents: only the engine
//! makes offers, and the engine that restarts is the one that was persisted. Inputs
//! redelivered after a crash can arrive *after* newer ones; the applied sequences are
//! therefore a set above the consumer's ack floor, not a single high-water mark (see
//! [`crate::store::AppliedSeqs`]).
//!
//! **Fencing**: every snapshot write is a compare-and-set on the KV revision. If it fails,
//! another instance wrote since — two engines are running. This one logs loudly and stops
//! before publishing anything of the batch (its unacked inputs are redelivered to the
//! other); it never overwrites. Only the writer of the latest revision publishes.
//!
//! # Bad input and redeliveries
//!
//! A message that is not a CloudEvent, is not the JSON its subject calls for, names another
//! call or agent than its subject, or that the engine refuses ([`crate::EngineError`]) is
//! dead-lettered to `patchbay.v1.dlq.agents` with its reason and stream position (then
//! terminated, never redelivered forever), logged and counted in
//! `patchbay_agents_rejected_total{reason}`; the rest of the batch goes on. An
//! input the engine [ignores](crate::Ignored) (a redelivery already reflected, a race) is
//! acked, logged at debug level and counted.
//!
//! Each input enters its hop chain as `service/agents` ([`crate::batch`]): every output it
//! decides is published with that chain (`patchbay-hops`), a timer's outputs with
//! `service/agents` alone, and the outbox keeps the chains so a re-publish after a restart
//! carries them too. An input whose chain is already at the hop limit (`--max-hops`) is a
//! loop: dead-lettered with the chain, reason `hop-limit`. A panic while applying one input
//! does not stop the service (which would be handed the same input again on restart): the
//! engine goes back to the last persisted state, the batch is applied again without that
//! input, and the input is dead-lettered with the panic message, reason `panic`.
//!
//! # Traces, statistics, shutdown
//!
//! Each input is handled in a `process` span continuing the trace it carries, and each of
//! its outputs is published inside that span; outputs of timers get a root span `tick`.
//! Queue statistics ([`crate::stats::QueueStats`]) are exported as `patchbay_cc_queue_*`
//! gauges every [`AgentsConfig::stats_interval`] and after each batch, and answered on
//! `cc.v1.queues.stats` (request-reply, a CloudEvent whose data is the JSON array). On
//! shutdown the task stops pulling, finishes the batch in hand — plus whatever was already
//! delivered — (snapshot, publish, ack), clears the outbox and returns, all within
//! [`AgentsConfig::drain_timeout`]; past it the rest stays unacked and is redelivered, as
//! after a crash. Delivered inputs are applied rather than nak'ed: a redelivery would come
//! after newer inputs.
//!
//! Not here: the decisions (the engine), the stored format (`store`), message decoding
//! (`input`), creating streams, consumers or the bucket (the admin bootstrap).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures::{FutureExt as _, Stream, StreamExt as _};
use patchbay_bus::batch::{BatchPublisher, Durable};
use patchbay_bus::discovery::{self, NoEndpoints, Registration};
use patchbay_bus::dlq::{self, DeadLetter};
use patchbay_bus::hops::HopChain;
use patchbay_bus::trace;
use patchbay_bus::{Bus, BusConfig, Clock, CloudEvent, SystemClock, Token};
use patchbay_protocol::CcSubjects;
use patchbay_telemetry::{Metrics, ReadyFlag};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::batch::{self, Delivery, HOP_HANDLER, State, Verdict};
use crate::engine::{Aggregate, EngineConfig, Ignored, Output};
use crate::input;
use crate::metrics::AgentsMetrics;
use crate::store::{SNAPSHOT_KEY, SnapshotStore, StoreError, Stored};

/// The stream of call events.
pub const CALLS_STREAM: &str = "CC_CALLS";
/// The stream of agent commands.
pub const COMMANDS_STREAM: &str = "CC_AGENT_CMDS";
/// The stream call events are stored in (`deploy/streams.toml`, `allow_atomic`).
pub const OUTPUT_CALLS_STREAM: &str = "CC_CALLS";
/// The stream agent events are stored in (`deploy/streams.toml`, `allow_atomic`).
pub const OUTPUT_AGENTS_STREAM: &str = "CC_AGENTS";
/// The durable consumer name on both streams (declared in `deploy/streams.toml`).
pub const CONSUMER: &str = "agents";
/// The KV bucket holding the snapshot.
pub const BUCKET: &str = "cc-agents";
/// The service's short name (dead letters go to `patchbay.v1.dlq.agents`).
pub const SERVICE_NAME: &str = "agents";
/// The name it answers `$SRV.PING|INFO|STATS` under (the binary's name, like every
/// Patchbay component).
pub const DISCOVERY_NAME: &str = "patchbay-agents";
/// CloudEvent type of a `cc.v1.queues.stats` reply (data: JSON array of `QueueStats`).
pub const QUEUE_STATS_TYPE: &str = "cc.queue.stats.v1";
/// Queue group of the statistics responders, so one instance answers each request.
const STATS_QUEUE_GROUP: &str = "agents";

/// How to run the agents service.
#[derive(Clone)]
pub struct AgentsConfig {
    /// Bus connection (identity `service/agents`).
    pub bus: BusConfig,
    /// Engine settings (`deploy/agents.toml`).
    pub engine: EngineConfig,
    /// `(stream, consumer)` of call events.
    pub calls: (String, String),
    /// `(stream, consumer)` of agent commands.
    pub commands: (String, String),
    /// KV bucket of the snapshot.
    pub bucket: String,
    /// Most inputs applied per batch (one snapshot per batch).
    pub max_batch: usize,
    /// How often the queue gauges are refreshed and the consumers' ack floors read.
    pub stats_interval: Duration,
    /// The engine's clock (milliseconds since the epoch).
    pub clock: Arc<dyn Clock>,
    /// How long shutdown may spend finishing the batch in hand and what was already
    /// delivered; past it the rest is left unacked (redelivered, outputs de-duplicated).
    pub drain_timeout: Duration,
}

impl std::fmt::Debug for AgentsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentsConfig")
            .field("bus", &self.bus)
            .field("engine", &self.engine)
            .field("calls", &self.calls)
            .field("commands", &self.commands)
            .field("bucket", &self.bucket)
            .field("max_batch", &self.max_batch)
            .field("stats_interval", &self.stats_interval)
            .field("drain_timeout", &self.drain_timeout)
            .finish_non_exhaustive()
    }
}

impl AgentsConfig {
    /// Defaults: `CC_CALLS`/`agents`, `CC_AGENT_CMDS`/`agents`, bucket `cc-agents`, batches
    /// of 256, statistics every second, the system clock, a 10 s drain.
    #[must_use]
    pub fn new(bus: BusConfig, engine: EngineConfig) -> Self {
        Self {
            bus,
            engine,
            calls: (CALLS_STREAM.into(), CONSUMER.into()),
            commands: (COMMANDS_STREAM.into(), CONSUMER.into()),
            bucket: BUCKET.into(),
            max_batch: 256,
            stats_interval: Duration::from_secs(1),
            clock: Arc::new(SystemClock),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// One bound consumer: its key in the snapshot (`STREAM/consumer`) and handle.
struct Source {
    key: String,
    consumer: PullConsumer,
}

type Inputs = Pin<Box<dyn Stream<Item = (usize, Result<Message, String>)> + Send>>;

/// Run the agents service until `shutdown` resolves: then stop pulling, finish the batch
/// in hand and what was already delivered (publish, snapshot, ack) within the drain
/// timeout — past it, leave the rest unacked for redelivery — and return. Errors: cannot
/// connect, bind or load the snapshot; another instance wrote the snapshot (fenced); the
/// snapshot outgrew the server's max payload.
pub async fn run(
    config: AgentsConfig,
    metrics: &Metrics,
    ready: ReadyFlag,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = AgentsMetrics::register(metrics).context("cannot register the agents metrics")?;
    let bus = patchbay_bus::connect(&config.bus)
        .await
        .context("agents cannot connect to NATS")?
        .with_clock(Arc::clone(&config.clock));
    let cc = CcSubjects::new(bus.subjects().clone());
    let js = bus.jetstream();

    let mut store = SnapshotStore::open(&js, &config.bucket, SNAPSHOT_KEY, bus.max_payload())
        .await
        .context("cannot open the snapshot bucket")?;
    let (state, outbox) = match store.load().await.context("cannot load the snapshot")? {
        Some(stored) => {
            tracing::info!(
                revision = store.revision(),
                format = stored.format,
                saved_at_ms = stored.saved_at_ms,
                calls = stored.engine.active_calls(),
                outbox = stored.outbox.len(),
                "engine restored from the snapshot"
            );
            let outbox = restored_outbox(&bus, stored.outbox, &stored.outbox_hops);
            (
                State::restore(config.engine.clone(), stored.engine, stored.applied),
                outbox,
            )
        }
        None => {
            tracing::info!("no snapshot yet: starting with an empty engine");
            (State::new(config.engine.clone()), Vec::new())
        }
    };

    let mut sources = Vec::new();
    let mut streams: Vec<Inputs> = Vec::new();
    for (index, (stream, name)) in [&config.calls, &config.commands].into_iter().enumerate() {
        let mut consumer: PullConsumer = js
            .get_consumer_from_stream(name, stream)
            .await
            .with_context(|| {
                format!(
                    "cannot bind to consumer {name:?} on stream {stream:?} (it is created by the admin bootstrap, `patchbay up` / `patchbay bootstrap`)"
                )
            })?;
        if index == 0 {
            check_calls_filter(&mut consumer, &cc).await;
        }
        let messages = patchbay_bus::pull::messages(&consumer, config.max_batch)
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot pull from consumer {name:?} on {stream:?}: {e}")
            })?;
        streams.push(Box::pin(
            messages.map(move |m| (index, m.map_err(|e| e.to_string()))),
        ));
        sources.push(Source {
            key: format!("{stream}/{name}"),
            consumer,
        });
    }
    let mut inputs: Inputs = Box::pin(futures::stream::select_all(streams));

    let mut stats_requests = bus
        .client()
        .queue_subscribe(cc.queue_stats(), STATS_QUEUE_GROUP.into())
        .await
        .map_err(|e| anyhow::anyhow!("cannot subscribe to {}: {e}", cc.queue_stats()))?;

    // Discovery is a convenience: a refused subscription must not stop the engine.
    let service = discovery::register(
        &bus,
        Registration::new(
            DISCOVERY_NAME,
            env!("CARGO_PKG_VERSION"),
            "Patchbay agent assignment",
        ),
        NoEndpoints,
    )
    .await;

    let stop = CancellationToken::new();
    let mut worker = Worker {
        batches: BatchPublisher::new(&bus),
        bus: bus.clone(),
        cc,
        state,
        store,
        sources,
        metrics,
        clock: Arc::clone(&config.clock),
        stop: stop.clone(),
        dlq_owner: Token::new(SERVICE_NAME).context("service name")?,
        instance: bus.source().to_owned(),
        stale_outbox: false,
    };
    worker.refresh_gauges();

    let max_batch = config.max_batch.max(1);
    let drain_timeout = config.drain_timeout;
    let mut refresh = tokio::time::interval(config.stats_interval);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let result: anyhow::Result<()> = async {
        // The restored state's decisions reach their streams before any new one (a
        // shutdown meanwhile leaves them in the snapshot for the next start).
        tokio::select! {
            biased;
            () = &mut shutdown => {
                tracing::info!("shutting down before the restored outbox was published");
                return Ok(());
            }
            done = worker.recover(outbox) => done?,
        }
        ready.set_ready(true);
        tracing::info!(
            calls = %worker.sources[0].key,
            commands = %worker.sources[1].key,
            "bound to the consumers; assigning calls"
        );
        // `stop` is cancelled only when the drain ends, so a batch retrying its publish or
        // snapshot keeps trying until then.
        let drain_until = loop {
            let wait = worker.time_to_next_due();
            tokio::select! {
                biased;
                () = &mut shutdown => break draining(drain_timeout),
                first = inputs.next() => {
                    let Some(first) = first else {
                        anyhow::bail!("the consumers' message streams ended");
                    };
                    let batch = collect_batch(first, &mut inputs, max_batch);
                    // SIGTERM with a batch in hand: finish it within the drain timeout.
                    let work = worker.process(batch);
                    tokio::pin!(work);
                    tokio::select! {
                        biased;
                        done = &mut work => done?,
                        () = &mut shutdown => {
                            let until = draining(drain_timeout);
                            if !within(until, work).await? {
                                return Ok(());
                            }
                            break until;
                        }
                    }
                }
                () = sleep_or_forever(wait) => worker.tick().await?,
                Some(request) = stats_requests.next() => worker.answer_stats(request).await,
                _ = refresh.tick() => {
                    worker.refresh_gauges();
                    worker.refresh_floors().await;
                    worker.clear_outbox().await?;
                }
            }
        };
        // What was already delivered is applied, persisted and acked rather than left to
        // time out: a redelivery after `ack_wait` would come after newer inputs.
        let mut rest = Vec::new();
        while let Some(Some(item)) = inputs.next().now_or_never() {
            rest.push(item);
        }
        within(drain_until, async {
            while !rest.is_empty() {
                let chunk: Vec<_> = rest.drain(..rest.len().min(max_batch)).collect();
                worker.process(chunk).await?;
            }
            worker.clear_outbox().await
        })
        .await?;
        Ok(())
    }
    .await;

    stop.cancel();
    ready.set_ready(false);
    if let Some(service) = service {
        service.stop().await;
    }
    if let Err(e) = bus.client().flush().await {
        tracing::warn!(error = %e, "flush on shutdown failed");
    }
    match &result {
        Ok(()) => tracing::info!("agents stopped"),
        Err(e) => tracing::error!(error = %format!("{e:#}"), "agents stopped on an error"),
    }
    result
}

/// Log that the drain begins; when it must end.
fn draining(timeout: Duration) -> tokio::time::Instant {
    tracing::info!(
        ?timeout,
        "shutting down: no new inputs are pulled; finishing what was delivered"
    );
    tokio::time::Instant::now() + timeout
}

/// Run `work` until `until`: whether it finished (or its error). Past `until` it is
/// dropped mid-way, which is what a crash at that point would do: its inputs stay
/// unacked and are redelivered; its outputs were either not published yet or are in the
/// snapshot's outbox, published again (de-duplicated by id) on the next start.
async fn within(
    until: tokio::time::Instant,
    work: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<bool> {
    match tokio::time::timeout_at(until, work).await {
        Ok(done) => done.map(|()| true),
        Err(_) => {
            tracing::warn!(
                "drain timeout: abandoning the inputs in hand unacked; they will be redelivered (outputs already decided are in the snapshot's outbox)"
            );
            Ok(false)
        }
    }
}

/// The first message plus whatever else is already delivered, up to `max`.
fn collect_batch(
    first: (usize, Result<Message, String>),
    inputs: &mut Inputs,
    max: usize,
) -> Vec<(usize, Result<Message, String>)> {
    let mut batch = vec![first];
    while batch.len() < max {
        match inputs.next().now_or_never() {
            Some(Some(item)) => batch.push(item),
            _ => break,
        }
    }
    batch
}

async fn sleep_or_forever(wait: Option<Duration>) {
    match wait {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Warn when the calls consumer does not filter on what the engine consumes: it would
/// then terminate every other call event it is handed.
async fn check_calls_filter(consumer: &mut PullConsumer, cc: &CcSubjects) {
    use patchbay_protocol::CallEvent;
    let info = match consumer.info().await {
        Ok(info) => info.clone(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the calls consumer's configuration");
            return;
        }
    };
    let mut filters = info.config.filter_subjects.clone();
    if !info.config.filter_subject.is_empty() {
        filters.push(info.config.filter_subject.clone());
    }
    let wanted = [
        cc.call_all(CallEvent::Routed),
        cc.call_all(CallEvent::Hangup),
    ];
    let extra: Vec<&String> = filters
        .iter()
        .filter(|f| !wanted.contains(f) && **f != cc.call_all(CallEvent::Closed))
        .collect();
    if filters.is_empty() || !extra.is_empty() || !wanted.iter().all(|w| filters.contains(w)) {
        tracing::warn!(
            ?filters,
            expected = ?wanted,
            "the agents consumer on the calls stream does not filter on routed and hangup events only; other events will be rejected"
        );
    }
}

/// An output on its way to its stream: the span it is published under and the hop chain
/// it carries (its input's, extended by this service).
struct Pending {
    output: Output,
    span: tracing::Span,
    hops: HopChain,
}

/// The restored snapshot's outbox with the chains stored beside it (an output stored
/// without one carries this service alone, as a timer's output does).
fn restored_outbox(bus: &Bus, outbox: Vec<Output>, hops: &[String]) -> Vec<(Output, HopChain)> {
    outbox
        .into_iter()
        .enumerate()
        .map(|(i, output)| {
            let hops = hops
                .get(i)
                .map_or_else(|| own_chain(bus), |text| batch::chain_of(text));
            (output, hops)
        })
        .collect()
}

/// The chain of an output no input led to (a timer's): this service alone.
fn own_chain(bus: &Bus) -> HopChain {
    // An empty chain plus one handler is within any limit (the bus keeps it at least 1).
    bus.enter_hop(None, HOP_HANDLER).unwrap_or_default()
}

/// The engine task's state.
struct Worker {
    bus: Bus,
    /// Stores each commit's outputs as one atomic batch per stream.
    batches: BatchPublisher,
    cc: CcSubjects,
    /// The engine, the inputs it reflects and the state last persisted.
    state: State,
    store: SnapshotStore,
    sources: Vec<Source>,
    metrics: AgentsMetrics,
    clock: Arc<dyn Clock>,
    stop: CancellationToken,
    /// `agents`: dead letters go to `patchbay.v1.dlq.agents`.
    dlq_owner: Token,
    /// This process, as recorded on its dead letters.
    instance: String,
    /// The stored snapshot's outbox is published: write it empty before a restart could
    /// publish it again past the streams' duplicate window.
    stale_outbox: bool,
}

/// Where the outputs being published come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Just decided: no earlier process can have published them, so a duplicate on the
    /// first attempt is a divergence.
    Decided,
    /// The restored snapshot's outbox: some may be stored already (harmless duplicates).
    Restored,
}

/// The stream an output is stored in: one atomic batch per stream and engine batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputStream {
    /// Call events (`cc.v1.calls.<call>.<event>`).
    Calls,
    /// Agent events (`cc.v1.agents.<agent>.evt.<event>`).
    Agents,
}

/// An output encoded as the event it is published as.
struct Outgoing<'p> {
    subject: String,
    /// The stream it is stored in.
    stream: OutputStream,
    event: CloudEvent,
    span: &'p tracing::Span,
    hops: &'p HopChain,
    label: &'static str,
}

impl Worker {
    fn time_to_next_due(&self) -> Option<Duration> {
        let due = self.state.engine.next_due()?;
        let now = self.clock.now_millis();
        Some(Duration::from_millis(due.saturating_sub(now)))
    }

    /// Apply, snapshot, publish, ack — see the module documentation. Each input is
    /// applied inside its hop chain and with a panic contained to it ([`crate::batch`]).
    async fn process(
        &mut self,
        batch: Vec<(usize, Result<Message, String>)>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let now = self.clock.now_millis();
        self.metrics
            .batch_inputs
            .with_label_values::<&str>(&[])
            .observe(batch.len() as f64);
        let mut messages = Vec::with_capacity(batch.len());
        for (source, msg) in batch {
            match msg {
                Ok(msg) => messages.push((source, msg)),
                Err(e) => {
                    tracing::warn!(consumer = %self.sources[source].key, error = %e, "pull error");
                }
            }
        }
        // One span per message (counting it as received once, however often a panic makes
        // the batch be applied again).
        let spans: Vec<tracing::Span> = messages
            .iter()
            .map(|(_, msg)| self.bus.process_delivery(msg))
            .collect();
        let deliveries: Vec<Delivery<'_>> = messages
            .iter()
            .map(|(source, msg)| Delivery {
                consumer: &self.sources[*source].key,
                seq: msg.info().ok().map(|i| i.stream_sequence),
                subject: msg.subject.as_str(),
                headers: msg.headers.as_ref(),
                payload: &msg.payload,
            })
            .collect();
        let bus = &self.bus;
        let outcome = self
            .state
            .apply_batch(
                now,
                &self.cc,
                &deliveries,
                |headers| bus.enter_hop(headers, HOP_HANDLER),
                |engine, now, input| engine.apply(now, input),
            )
            .await;
        drop(deliveries);
        for (((_, msg), span), verdict) in messages.iter().zip(&spans).zip(&outcome.verdicts) {
            self.account(msg, span, verdict);
        }
        self.observe("apply", started);
        let outputs: Vec<Pending> = outcome
            .outputs
            .into_iter()
            .map(|decided| Pending {
                output: decided.output,
                span: spans[decided.delivery].clone(),
                hops: decided.hops,
            })
            .collect();
        if outcome.changed || !outputs.is_empty() {
            self.commit(now, &outputs).await?;
        }
        for (((_, msg), span), verdict) in messages.into_iter().zip(spans).zip(outcome.verdicts) {
            match verdict {
                Verdict::Rejected(bad) => {
                    self.dead_letter(&msg, &bad.to_string())
                        .instrument(span)
                        .await;
                }
                Verdict::Duplicate | Verdict::NotForEngine(_) | Verdict::Applied(_) => {
                    // A lost ack means a redelivery, which the applied sequences absorb.
                    if let Err(e) = msg.ack_with(AckKind::Ack).await {
                        tracing::warn!(error = %e, "ack failed; the input will be redelivered and recognised");
                    }
                }
            }
        }
        self.refresh_gauges();
        Ok(())
    }

    /// Log and count what became of one input.
    fn account(&self, msg: &Message, span: &tracing::Span, verdict: &Verdict) {
        let kind = input::kind(&self.cc, &msg.subject);
        let (seq, delivered) = msg
            .info()
            .map_or((None, 1), |i| (Some(i.stream_sequence), i.delivered));
        let outcome = match verdict {
            Verdict::Duplicate => {
                span.in_scope(|| {
                    tracing::debug!(seq, delivered, "redelivered input already applied; acking");
                });
                "duplicate"
            }
            Verdict::NotForEngine(reason) => {
                span.in_scope(|| tracing::debug!(reason, "not an engine input; acking"));
                self.metrics.ignored.with_label_values(&[reason]).inc();
                "ignored"
            }
            Verdict::Applied(Some(why)) => {
                let reason = ignored_label(*why);
                span.in_scope(|| tracing::debug!(reason, "input changed nothing"));
                self.metrics.ignored.with_label_values(&[reason]).inc();
                "ignored"
            }
            Verdict::Applied(None) => "applied",
            Verdict::Rejected(bad) => {
                span.in_scope(|| {
                    tracing::warn!(
                        seq,
                        subject = %msg.subject,
                        reason = bad.label(),
                        error = %bad,
                        "rejecting input (dead-lettered, not redelivered)"
                    );
                });
                self.metrics
                    .rejected
                    .with_label_values(&[bad.label()])
                    .inc();
                "rejected"
            }
        };
        self.metrics
            .inputs
            .with_label_values(&[kind, outcome])
            .inc();
    }

    /// Move a refused input to `patchbay.v1.dlq.agents` with its reason (terminated once
    /// stored; nak'ed for a retry when the dead-letter stream is unavailable).
    async fn dead_letter(&self, msg: &Message, reason: &str) {
        let (attempts, source) = msg.info().map_or((1, None), |i| {
            (
                u64::try_from(i.delivered).unwrap_or(1),
                Some(format!("{}:{}", i.stream, i.stream_sequence)),
            )
        });
        let record = DeadLetter {
            function: SERVICE_NAME,
            version: None,
            digest: None,
            attempts,
            error: reason,
            subject: &msg.subject,
            source,
            node: &self.instance,
            time_millis: self.clock.now_millis(),
        };
        dlq::dead_letter(&self.bus, &self.dlq_owner, msg, &record).await;
    }

    /// Fire due timers: their outputs are published under a root span `tick`.
    async fn tick(&mut self) -> anyhow::Result<()> {
        let now = self.clock.now_millis();
        let before = self.state.engine.next_due();
        let outputs = self.state.engine.tick(now);
        if outputs.is_empty() {
            if before.is_some_and(|due| due <= now) && self.state.engine.next_due() == before {
                // Never spin on a timer that does not move.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            return Ok(());
        }
        let span =
            tracing::info_span!(parent: None, "tick", otel.name = "tick", outputs = outputs.len());
        let hops = own_chain(&self.bus);
        let outputs: Vec<Pending> = outputs
            .into_iter()
            .map(|output| Pending {
                output,
                span: span.clone(),
                hops: hops.clone(),
            })
            .collect();
        self.commit(now, &outputs).await?;
        self.refresh_gauges();
        Ok(())
    }

    /// Persist the state with `outputs` as its outbox, then publish them — in that order,
    /// so nothing is published that a restarted engine would not know (module docs).
    async fn commit(&mut self, now: u64, outputs: &[Pending]) -> anyhow::Result<()> {
        let outbox = outputs.iter().map(|p| p.output.clone()).collect();
        let hops = outputs.iter().map(|p| p.hops.to_string()).collect();
        self.snapshot(now, outbox, hops).await?;
        self.publish(outputs, Origin::Decided).await?;
        self.stale_outbox = !outputs.is_empty();
        Ok(())
    }

    /// Publish the restored snapshot's outbox (under a root span `recover`), each output
    /// with the hop chain it was decided with.
    async fn recover(&mut self, outbox: Vec<(Output, HopChain)>) -> anyhow::Result<()> {
        if outbox.is_empty() {
            return Ok(());
        }
        let span = tracing::info_span!(
            parent: None,
            "recover",
            otel.name = "recover",
            outputs = outbox.len()
        );
        tracing::info!(
            outputs = outbox.len(),
            "publishing the restored snapshot's outbox (decided before the restart, maybe not all stored)"
        );
        let outputs: Vec<Pending> = outbox
            .into_iter()
            .map(|(output, hops)| Pending {
                output,
                span: span.clone(),
                hops,
            })
            .collect();
        self.publish(&outputs, Origin::Restored).await?;
        self.stale_outbox = true;
        Ok(())
    }

    /// Rewrite the snapshot without its outbox once that outbox is published.
    async fn clear_outbox(&mut self) -> anyhow::Result<()> {
        if !self.stale_outbox {
            return Ok(());
        }
        self.snapshot(self.clock.now_millis(), Vec::new(), Vec::new())
            .await?;
        self.stale_outbox = false;
        Ok(())
    }

    fn observe(&self, stage: &str, since: Instant) {
        self.metrics
            .batch_duration
            .with_label_values(&[stage])
            .observe(since.elapsed().as_secs_f64());
    }

    /// The subject, stream and CloudEvent of an output.
    fn event(&self, output: &Output) -> Result<(String, OutputStream, CloudEvent), String> {
        let (subject, stream, key) = match output.aggregate() {
            Aggregate::Call(call) => {
                let token = Token::new(call).map_err(|e| e.to_string())?;
                let event = output.call_event().ok_or("call output without event")?;
                (self.cc.call(&token, event), OutputStream::Calls, call)
            }
            Aggregate::Agent(agent) => {
                let token = Token::new(agent).map_err(|e| e.to_string())?;
                let event = output.agent_event().ok_or("agent output without event")?;
                (
                    self.cc.agent_event(&token, event),
                    OutputStream::Agents,
                    agent,
                )
            }
        };
        let data = output.data_json().map_err(|e| e.to_string())?;
        let event = CloudEvent::new(self.bus.source(), output.type_())
            .id(output.id())
            .data("application/json", data)
            .partition_key(key);
        event.validate().map_err(|e| e.to_string())?;
        Ok((subject, stream, event))
    }

    /// Store every output (in order, pipelined), retrying the whole list until it is
    /// stored or the service stops; ids make the retries idempotent. Duplicates of
    /// [`Origin::Decided`] outputs on the first attempt are divergences; any other is a
    /// harmless re-publish.
    async fn publish(&self, outputs: &[Pending], origin: Origin) -> anyhow::Result<()> {
        if outputs.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut events = Vec::with_capacity(outputs.len());
        for Pending { output, span, hops } in outputs {
            match self.event(output) {
                Ok((subject, stream, event)) => {
                    let label = output
                        .call_event()
                        .map(|e| e.as_str())
                        .or_else(|| output.agent_event().map(|e| e.as_str()))
                        .unwrap_or("other");
                    events.push(Outgoing {
                        subject,
                        stream,
                        event,
                        span,
                        hops,
                        label,
                    });
                }
                // Ids come from validated subjects, so this is a bug, not an input problem.
                Err(e) => {
                    tracing::error!(error = %e, id = %output.id(), "cannot encode an output; skipped")
                }
            }
        }
        let mut attempt = 0u32;
        loop {
            match self.publish_once(&events).await {
                Ok(duplicates) => {
                    for outgoing in &events {
                        self.metrics
                            .outputs
                            .with_label_values(&[outgoing.label])
                            .inc();
                    }
                    let first_decided = origin == Origin::Decided && attempt == 0;
                    if !duplicates.is_empty() && first_decided {
                        self.metrics
                            .divergence
                            .with_label_values::<&str>(&[])
                            .inc_by(duplicates.len() as u64);
                        tracing::error!(
                            ids = ?duplicates,
                            "freshly decided outputs reuse ids the stream already holds: the engine is behind what was published (restored from an older state?) and the stream keeps the earlier decisions"
                        );
                    } else if !duplicates.is_empty() {
                        self.metrics
                            .replayed
                            .with_label_values::<&str>(&[])
                            .inc_by(duplicates.len() as u64);
                        tracing::info!(
                            replayed = duplicates.len(),
                            "outputs published again were already stored (de-duplicated)"
                        );
                    }
                    self.observe("publish", started);
                    return Ok(());
                }
                Err(e) => {
                    attempt += 1;
                    let delay = Duration::from_millis(100u64 << attempt.min(8))
                        .min(Duration::from_secs(10));
                    tracing::warn!(error = %e, attempt, ?delay, "cannot store outputs; retrying the batch's outputs");
                    tokio::select! {
                        () = self.stop.cancelled() => {
                            anyhow::bail!("stopping with unstored outputs ({e}); their inputs were not acked and will be redelivered");
                        }
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Store every event as one atomic batch per stream (calls, agent events — both at
    /// once), each message with its own trace context and hop chain; returns the ids of
    /// the duplicates. A stream without atomic batches, or a batch holding an id already
    /// stored, is published message by message instead ([`patchbay_bus::batch`]).
    async fn publish_once<'e>(&self, events: &'e [Outgoing<'_>]) -> Result<Vec<&'e str>, String> {
        let mut calls = Vec::new();
        let mut agents = Vec::new();
        let mut spans = Vec::with_capacity(events.len());
        for (index, outgoing) in events.iter().enumerate() {
            let span = outgoing
                .span
                .in_scope(|| trace::publish_span(&outgoing.subject, &outgoing.event.id));
            let mut durable = self
                .bus
                .durable(
                    &outgoing.subject,
                    &outgoing.event,
                    &outgoing.event.id,
                    &span,
                    None,
                )
                .map_err(|e| e.to_string())?;
            outgoing.hops.write(&mut durable.headers);
            match outgoing.stream {
                OutputStream::Calls => calls.push((index, durable)),
                OutputStream::Agents => agents.push((index, durable)),
            }
            spans.push(span);
        }
        let (calls_stored, agents_stored) = futures::join!(
            self.publish_group(OUTPUT_CALLS_STREAM, &calls),
            self.publish_group(OUTPUT_AGENTS_STREAM, &agents),
        );
        drop(spans);
        let mut duplicates = calls_stored?;
        duplicates.extend(agents_stored?);
        duplicates.sort_unstable();
        Ok(duplicates
            .into_iter()
            .map(|index| events[index].event.id.as_str())
            .collect())
    }

    /// One stream's share of [`Worker::publish_once`]: the indices (into the events) of
    /// its duplicates.
    async fn publish_group(
        &self,
        stream: &str,
        group: &[(usize, Durable)],
    ) -> Result<Vec<usize>, String> {
        if group.is_empty() {
            return Ok(Vec::new());
        }
        let messages: Vec<Durable> = group.iter().map(|(_, d)| d.clone()).collect();
        let stored = self
            .batches
            .publish(stream, &messages)
            .await
            .map_err(|e| e.to_string())?;
        self.metrics
            .commits
            .with_label_values::<&str>(&[])
            .inc_by(stored.commits as u64);
        Ok(stored
            .duplicates
            .into_iter()
            .map(|position| group[position].0)
            .collect())
    }

    /// Write the snapshot with `outbox`; a fenced or oversized snapshot stops the service,
    /// a failing bucket is retried until it works or the service stops.
    async fn snapshot(
        &mut self,
        now: u64,
        outbox: Vec<Output>,
        outbox_hops: Vec<String>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let stored = Stored {
            format: Stored::FORMAT,
            saved_at_ms: now,
            applied: self.state.applied.clone(),
            outbox,
            outbox_hops,
            engine: self.state.engine.snapshot(),
        };
        loop {
            match self.store.save(&stored, 3).await {
                Ok(saved) => {
                    self.metrics
                        .snapshot_bytes
                        .with_label_values(&["compressed"])
                        .set(saved.compressed as f64);
                    self.metrics
                        .snapshot_bytes
                        .with_label_values(&["json"])
                        .set(saved.uncompressed as f64);
                    self.observe("snapshot", started);
                    // What a panic in a later batch goes back to.
                    self.state.persisted(stored.engine, stored.applied);
                    return Ok(());
                }
                Err(
                    e @ (StoreError::Fenced { .. }
                    | StoreError::TooLarge { .. }
                    | StoreError::Encode(_)),
                ) => {
                    tracing::error!(error = %e, "cannot persist the engine; stopping");
                    return Err(e).context("cannot persist the engine");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write the snapshot; retrying");
                    tokio::select! {
                        () = self.stop.cancelled() => {
                            return Err(e).context("stopping with an unsaved snapshot; the batch's inputs were not acked and will be redelivered");
                        }
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    fn refresh_gauges(&self) {
        let stats = self.state.engine.stats(self.clock.now_millis());
        self.metrics.set_queues(&stats);
    }

    /// Read each consumer's ack floor, so the applied sequences below it are forgotten.
    async fn refresh_floors(&mut self) {
        for source in &mut self.sources {
            match source.consumer.info().await {
                Ok(info) => {
                    let floor = info.ack_floor.stream_sequence;
                    self.state
                        .applied
                        .entry(source.key.clone())
                        .or_default()
                        .advance_floor(floor);
                }
                Err(e) => {
                    tracing::debug!(consumer = %source.key, error = %e, "cannot read the ack floor");
                }
            }
        }
    }

    /// Reply to a `cc.v1.queues.stats` request with every queue's statistics.
    async fn answer_stats(&self, request: async_nats::Message) {
        let span = self
            .bus
            .process_span(&request.subject, request.headers.as_ref());
        let Some(reply) = request.reply.clone() else {
            return;
        };
        let stats = self.state.engine.stats(self.clock.now_millis());
        let event = match CloudEvent::new(self.bus.source(), QUEUE_STATS_TYPE).json(&stats) {
            Ok(event) => event,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode queue statistics");
                return;
            }
        };
        let mut headers = Bus::headers(&event, &span, None);
        self.bus.stamp_sender(&mut headers);
        if let Err(e) = self
            .bus
            .client()
            .publish_with_headers(reply, headers, event.data.clone())
            .instrument(span)
            .await
        {
            tracing::warn!(error = %e, "cannot answer a statistics request");
        }
    }
}

/// The `reason` label of `patchbay_agents_ignored_total`.
#[must_use]
pub fn ignored_label(why: Ignored) -> &'static str {
    match why {
        Ignored::DuplicateCall => "duplicate-call",
        Ignored::CallFinished => "call-finished",
        Ignored::UnknownCall => "unknown-call",
        Ignored::AlreadyAccepted => "already-accepted",
        Ignored::OfferExpired => "offer-expired",
        Ignored::NoChange => "no-change",
        Ignored::NotInWrapUp => "not-in-wrap-up",
    }
}
