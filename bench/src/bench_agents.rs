//! `patchbay-bench --suite agents`: the agents service's durable throughput through the
//! real bus — a `patchbay-agents` process on a fresh local stack (nats-server with mutual
//! TLS, JetStream under `sync_interval: always`, bootstrapped from `deploy/`), nothing
//! else running (routing is not needed: the load generator publishes the `routed` events
//! routing would).
//!
//! The load generator is one bus connection (`cli/admin`) playing every agent's desktop:
//! it logs [`BenchArgs::agents_count`] agents in to one queue, publishes `routed` events,
//! accepts each offer, hangs up each assigned call and ends wrap-up at each `ended`. It
//! stores what it publishes with [`BatchPublisher`], one committer per stream (CC_CALLS,
//! CC_AGENT_CMDS), each committing everything queued as one atomic batch (up to
//! [`MAX_GENERATOR_BATCH`], up to [`GENERATOR_IN_FLIGHT`] commits in flight) — so the
//! generator pays one commit per batch, not per message, and is not what limits the
//! figures. The suite also times single commits on the idle stack (atomic batches of 1,
//! 10 and 100 messages beside the same messages pipelined), the floor under every figure.
//!
//! Phases, one stack, one run:
//!
//! 1. **max rate** — every `routed` event of [`BenchArgs::agents_calls`] calls queued at
//!    once; decisions/s is offers over the time from the first publish to the last offer;
//!    latency runs from a call's `routed` event being handed to the generator (so its own
//!    batching is inside the figure) to its `offered` event arriving on core NATS. There
//!    are more calls than agents, so most calls also wait for an agent to come free.
//! 2. **paced** at half the measured maximum for [`BenchArgs::agents_paced_for`].
//! 3. **baseline**: CC_CALLS and CC_AGENTS updated to `allow_atomic: false` as the admin,
//!    the service restarted (its publisher remembers per stream what a stream allows), the
//!    max-rate phase again: every output stored by its own pipelined publish and ack. The
//!    generator's CC_CALLS messages go pipelined too (the same stream).
//!
//! Fsyncs are counted with `perf stat` on the nats-server's syscall tracepoints
//! (`fsync`, `fdatasync`) from a phase's first publish until it is quiet again (every
//! call ended, every agent available): every fsync of the server — the generator's own
//! commits, the service's outputs, its snapshot writes and whatever consumer acks cost.
//! The service's own counters (`patchbay_agents_*` on its admin listener) break that down
//! and show where its batch time goes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{Stream, StreamExt as _};
use patchbay_bus::batch::{BatchPublisher, Durable};
use patchbay_bus::{Bus, CloudEvent};
use patchbay_control::certs::Identity;
use serde_json::json;
use tokio::sync::mpsc;

use crate::bench_gateway::{Killed, free_port, http_get};
use crate::bench_topology::wait_ready;
use crate::suites::{BenchArgs, Testbed, spawn_workload};

/// The queue every agent serves and every call is routed to.
const QUEUE: &str = "bench-agents";
/// The most messages the generator commits at once (below the server's 1,000).
const MAX_GENERATOR_BATCH: usize = 500;
/// Offers and wrap-up never time out during the run: only the desktops move agents on.
const AGENTS_CONFIG: &str = "offer_timeout_ms = 600000\nwrap_up_ms = 600000\n";
/// Unmeasured calls first: connections, caches, the service's first batches.
const WARM_UP_CALLS: usize = 200;
/// Every agent logged in (or back to available) within this.
const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// Every call offered within this after the last `routed` publish.
const OFFER_LIMIT: Duration = Duration::from_secs(120);
/// Most calls of the paced phase, whatever the rate.
const MAX_PACED_CALLS: usize = 100_000;
/// Commits each generator committer may have in flight (the server allows 50 batches in
/// flight per stream).
const GENERATOR_IN_FLIGHT: usize = 4;
/// Attempts of one generator commit before its messages are given up.
const COMMIT_ATTEMPTS: usize = 5;

/// What one phase measured.
struct Row {
    label: &'static str,
    calls: usize,
    /// Offers per second, first publish to last offer.
    rate: f64,
    /// Routed → offered, ms.
    p50: f64,
    p99: f64,
    max: f64,
    /// Routed handed to the generator → its commit answered, p50, ms.
    stored_p50: f64,
    /// The nats-server's fsync + fdatasync calls, or why they are not known.
    fsyncs: Result<u64, String>,
    /// The generator's commits and messages during the phase.
    generator_commits: u64,
    /// Of those, atomic batches.
    generator_atomic: u64,
    generator_messages: u64,
    /// The service's counters over the phase.
    service: Scrape,
    /// First publish until quiet.
    span: Duration,
    /// CPU seconds (user, system) over the phase: the nats-server, the service, this
    /// process (the load generator).
    cpu: [(f64, f64); 3],
}

/// Run the agents benchmark and print atomic batches beside pipelined single publishes.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let baseline_calls = args.agents_baseline_calls.unwrap_or(args.agents_calls);
    println!(
        "agents bench: patchbay-agents on a fresh stack (mTLS, JetStream sync_interval: always), \
         {} agents on `{QUEUE}` played by one load generator (cli/admin) committing atomic \
         batches per stream (≤ {MAX_GENERATOR_BATCH} messages, ≤ {GENERATOR_IN_FLIGHT} in \
         flight, linger {:?}); max rate: {} \
         calls routed at once (after {WARM_UP_CALLS} warm-up calls); paced: half the maximum \
         for {:?}; baseline: CC_CALLS and CC_AGENTS without allow_atomic, service restarted, \
         {} calls at max rate; latency = routed handed to the generator → offered seen",
        args.agents_count,
        args.agents_linger,
        args.agents_calls,
        args.agents_paced_for,
        baseline_calls
    );
    if args.agents_count == 0 || args.agents_calls == 0 || baseline_calls == 0 {
        bail!("--agents-count, --agents-calls and --agents-baseline-calls must be at least 1");
    }
    let bed = Testbed::start(args).await?;
    let result = measure(args, &bed, baseline_calls).await;
    if result.is_err() {
        eprintln!(
            "  agents bench: logs are in {} and {} (kept)",
            bed.dir.path().display(),
            bed.prepared.state.logs().display()
        );
        let _ = bed.dir.keep();
        return result.map(|_| ());
    }
    drop(bed);
    let (floor, rows) = result?;
    report(args, &floor, &rows);
    Ok(())
}

/// Every phase, in order: max rate, paced, baseline.
async fn measure(
    args: &BenchArgs,
    bed: &Testbed,
    baseline_calls: usize,
) -> anyhow::Result<(Floor, Vec<Row>)> {
    let config = bed.dir.path().join("agents.toml");
    std::fs::write(&config, AGENTS_CONFIG)
        .with_context(|| format!("cannot write {}", config.display()))?;
    let floor = commit_floor(&bed.admin).await?;
    let mut service = Service::start(bed, &config).await?;
    let generator = Generator::start(args, bed).await?;
    generator.log_in(args.agents_count).await?;
    eprintln!("  {} agents available", args.agents_count);
    let perf = Perf {
        binary: args.perf.clone(),
        pid: bed.nats.pid(),
        dir: bed.dir.path().to_owned(),
    };

    let warm = generator
        .phase("warm-up", "pw-", WARM_UP_CALLS, None, &service, &perf)
        .await?;
    eprintln!("  warm-up: {:.0} decisions/s", warm.rate);
    let max = generator
        .phase(
            "atomic batches, max rate",
            "pa-",
            args.agents_calls,
            None,
            &service,
            &perf,
        )
        .await?;
    progress(&max);
    let half = max.rate / 2.0;
    let paced_calls =
        ((half * args.agents_paced_for.as_secs_f64()) as usize).clamp(1, MAX_PACED_CALLS);
    let paced = generator
        .phase(
            "atomic batches, paced at half max",
            "pb-",
            paced_calls,
            Some(half),
            &service,
            &perf,
        )
        .await?;
    progress(&paced);

    // The baseline: the outputs' streams without atomic batches, a service that has not
    // learned otherwise.
    for stream in ["CC_CALLS", "CC_AGENTS"] {
        allow_atomic(&bed.admin, stream, false).await?;
    }
    service.restart(bed, &config).await?;
    generator.wait_idle(args.agents_count).await?;
    let baseline = generator
        .phase(
            "pipelined per message (baseline)",
            "pc-",
            baseline_calls,
            None,
            &service,
            &perf,
        )
        .await?;
    progress(&baseline);
    let failures = generator.counters.failures.load(Ordering::Relaxed);
    if failures > 0 {
        bail!("the load generator gave up on {failures} messages (see the errors above)");
    }
    drop(generator);
    drop(service);
    Ok((floor, vec![max, paced, baseline]))
}

/// Per batch size: p50 ms of one atomic commit, of the same messages pipelined.
type Floor = Vec<(usize, f64, f64)>;

/// Sizes of the batches [`commit_floor`] stores.
const FLOOR_SIZES: [usize; 3] = [1, 10, 100];
/// Commits per size and mode.
const FLOOR_ROUNDS: usize = 30;

/// What one commit costs on the idle stack, one client, one at a time: per size in
/// [`FLOOR_SIZES`], the p50 ms of storing that many messages as one atomic batch (to
/// CC_RECORDINGS, `allow_atomic`) and pipelined one by one (to PATCHBAY_LOGS, which has
/// no `allow_atomic`, so the batch publisher falls back).
async fn commit_floor(admin: &Bus) -> anyhow::Result<Floor> {
    let publisher = BatchPublisher::new(admin);
    let message = |subject: String| -> anyhow::Result<Durable> {
        let event = CloudEvent::new(admin.source(), "bench.floor.v1").json(&json!({ "n": 1 }))?;
        let span = patchbay_bus::trace::publish_span(&subject, &event.id);
        let mut headers = Bus::headers(&event, &span, None);
        admin.stamp_sender(&mut headers);
        Ok(Durable {
            id: event.dedup_id(),
            payload: event.data.clone(),
            headers,
            subject,
        })
    };
    // The fallback is learned on the first publish: not measured.
    publisher
        .publish(
            "PATCHBAY_LOGS",
            &[message("patchbay.v1.fn.bench-floor.logs".into())?],
        )
        .await
        .context("commit floor: pipelined publish")?;
    let mut floor = Vec::new();
    for size in FLOOR_SIZES {
        let mut times = [Vec::new(), Vec::new()];
        for round in 0..FLOOR_ROUNDS {
            for (mode, (stream, subject)) in [
                ("CC_RECORDINGS", "cc.v1.recordings.bench-floor.completed"),
                ("PATCHBAY_LOGS", "patchbay.v1.fn.bench-floor.logs"),
            ]
            .into_iter()
            .enumerate()
            {
                let messages = (0..size)
                    .map(|_| message(subject.to_owned()))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let started = Instant::now();
                let stored = publisher
                    .publish(stream, &messages)
                    .await
                    .with_context(|| format!("commit floor: {size} messages to {stream}"))?;
                times[mode].push(started.elapsed().as_secs_f64() * 1e3);
                let expected = if mode == 0 {
                    (1, size, 0)
                } else {
                    (size, 0, size)
                };
                if (stored.commits, stored.atomic, stored.pipelined) != expected && round == 0 {
                    eprintln!("  commit floor: {stream} stored {stored:?} for {size} messages");
                }
            }
        }
        for t in &mut times {
            t.sort_by(f64::total_cmp);
        }
        floor.push((size, quantile(&times[0], 0.5), quantile(&times[1], 0.5)));
    }
    Ok(floor)
}

fn progress(row: &Row) {
    eprintln!(
        "  {}: {} calls, {:.0} decisions/s, p50 {:.1} ms, p99 {:.1} ms",
        row.label, row.calls, row.rate, row.p50, row.p99
    );
}

/// Set `allow_atomic` of `stream` as the admin.
async fn allow_atomic(admin: &Bus, stream: &str, allow: bool) -> anyhow::Result<()> {
    let js = admin.jetstream();
    let mut handle = js
        .get_stream(stream)
        .await
        .with_context(|| format!("cannot read stream {stream}"))?;
    let mut config = handle
        .info()
        .await
        .with_context(|| format!("cannot read stream {stream}"))?
        .config
        .clone();
    config.allow_atomic_publish = allow;
    let info = js
        .update_stream(&config)
        .await
        .with_context(|| format!("cannot update stream {stream}"))?;
    if info.config.allow_atomic_publish != allow {
        bail!("stream {stream} kept allow_atomic = {}", !allow);
    }
    Ok(())
}

/// The `patchbay-agents` process and its admin listener.
struct Service {
    child: Option<Killed>,
    admin: String,
}

impl Service {
    async fn start(bed: &Testbed, config: &Path) -> anyhow::Result<Self> {
        let mut service = Self {
            child: None,
            admin: String::new(),
        };
        service.restart(bed, config).await?;
        Ok(service)
    }

    /// Stop the running process (if any) and start a fresh one; ready when it is.
    async fn restart(&mut self, bed: &Testbed, config: &Path) -> anyhow::Result<()> {
        drop(self.child.take());
        self.admin = format!("127.0.0.1:{}", free_port()?);
        let config = config.to_string_lossy();
        self.child = Some(spawn_workload(
            bed,
            "patchbay-agents",
            ("service", "agents"),
            &[
                ("PATCHBAY_AGENTS_CONFIG", &config),
                ("PATCHBAY_ADMIN_LISTEN", &self.admin),
                ("PATCHBAY_DRAIN_TIMEOUT", "1s"),
            ],
        )?);
        wait_ready(&self.admin, "patchbay-agents").await
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.0.id())
    }

    async fn scrape(&self) -> Scrape {
        let body = http_get(&format!("http://{}/metrics", self.admin), None)
            .await
            .map(|(_, body)| body)
            .unwrap_or_default();
        Scrape::of(&body)
    }
}

/// The service counters the report uses (differences over a phase once subtracted).
#[derive(Debug, Clone, Copy, Default)]
struct Scrape {
    outputs: f64,
    commits: f64,
    batches: f64,
    inputs: f64,
    apply: f64,
    snapshot: f64,
    snapshots: f64,
    publish: f64,
    /// Atomic batches the service's connection committed.
    atomic: f64,
}

impl Scrape {
    fn of(body: &str) -> Self {
        let stage = |suffix: &str, stage: &str| {
            metric(
                body,
                &format!("patchbay_agents_batch_duration_seconds_{suffix}"),
                &[("stage", stage)],
            )
        };
        Self {
            outputs: metric(body, "patchbay_agents_outputs_total", &[]),
            commits: metric(body, "patchbay_agents_output_commits_total", &[]),
            batches: metric(body, "patchbay_agents_batch_inputs_count", &[]),
            inputs: metric(body, "patchbay_agents_batch_inputs_sum", &[]),
            apply: stage("sum", "apply"),
            snapshot: stage("sum", "snapshot"),
            snapshots: stage("count", "snapshot"),
            publish: stage("sum", "publish"),
            atomic: metric(
                body,
                "patchbay_bus_stored_per_commit_count",
                &[("mode", "atomic")],
            ),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            outputs: self.outputs - before.outputs,
            commits: self.commits - before.commits,
            batches: self.batches - before.batches,
            inputs: self.inputs - before.inputs,
            apply: self.apply - before.apply,
            snapshot: self.snapshot - before.snapshot,
            snapshots: self.snapshots - before.snapshots,
            publish: self.publish - before.publish,
            atomic: self.atomic - before.atomic,
        }
    }
}

/// The sum of every sample of `name` whose labels include `labels` in a Prometheus or
/// OpenMetrics text body (0 when there is none).
fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, rest) = match line.find('{') {
                Some(open) if line[..open].trim() == name => {
                    let close = line[open..].find('}')? + open;
                    (&line[open + 1..close], &line[close + 1..])
                }
                Some(_) => return None,
                None => {
                    let rest = line.strip_prefix(name)?;
                    if !rest.starts_with(' ') {
                        return None;
                    }
                    ("", rest)
                }
            };
            let wanted = labels.iter().all(|(k, v)| {
                series
                    .split(',')
                    .any(|l| l.trim() == format!("{k}=\"{v}\""))
            });
            if !wanted {
                return None;
            }
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// One message for a generator committer.
struct Item {
    durable: Durable,
    /// For a `routed` event: when it was handed to the generator.
    routed: Option<Instant>,
}

/// Which stream a message goes to.
#[derive(Debug, Clone, Copy)]
enum Target {
    Calls,
    Commands,
}

/// The generator's totals.
#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    /// Of those, atomic batches.
    atomic_commits: AtomicU64,
    messages: AtomicU64,
    failures: AtomicU64,
}

/// What the desktops saw, shared by the event loop, the committers and the phases.
#[derive(Debug, Default)]
struct Tracker {
    /// Call-id prefix of the phase being measured.
    prefix: String,
    /// Routed calls of the phase not offered yet: when they were handed to the generator.
    sent: HashMap<String, Instant>,
    /// Routed → offered of the phase's calls.
    latencies: Vec<Duration>,
    /// Routed handed to the generator → committed.
    stored: Vec<Duration>,
    last_offer: Option<Instant>,
    /// Calls of the phase ended.
    ended: usize,
    /// Every agent's last reported state.
    states: HashMap<String, String>,
}

type Shared = Arc<Mutex<Tracker>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Tracker> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Hands messages to the committers; cheap to clone.
#[derive(Clone)]
struct Outbox {
    bus: Bus,
    calls: mpsc::UnboundedSender<Item>,
    commands: mpsc::UnboundedSender<Item>,
}

impl Outbox {
    /// Queue a CloudEvent of `ty` with `data` on `subject`, partitioned by `key`.
    fn send(
        &self,
        target: Target,
        subject: String,
        ty: &str,
        data: &serde_json::Value,
        key: &str,
        routed: Option<Instant>,
    ) -> anyhow::Result<()> {
        let event = CloudEvent::new(self.bus.source(), ty)
            .json(data)
            .with_context(|| format!("cannot encode {subject}"))?
            .partition_key(key);
        let span = patchbay_bus::trace::publish_span(&subject, &event.id);
        let mut headers = Bus::headers(&event, &span, None);
        self.bus.stamp_sender(&mut headers);
        let item = Item {
            durable: Durable {
                id: event.dedup_id(),
                payload: event.data.clone(),
                headers,
                subject,
            },
            routed,
        };
        let queue = match target {
            Target::Calls => &self.calls,
            Target::Commands => &self.commands,
        };
        queue
            .send(item)
            .map_err(|_| anyhow::anyhow!("the load generator's committer stopped"))
    }

    fn command(
        &self,
        agent: &str,
        command: &str,
        ty: &str,
        data: &serde_json::Value,
    ) -> anyhow::Result<()> {
        self.send(
            Target::Commands,
            format!("cc.v1.agents.{agent}.cmd.{command}"),
            ty,
            data,
            agent,
            None,
        )
    }
}

/// The load generator: one connection, the desktops' event loop, one committer per stream.
struct Generator {
    outbox: Outbox,
    tracker: Shared,
    counters: Arc<Counters>,
    /// Agents logged in.
    agents: usize,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Generator {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

type Events = Pin<Box<dyn Stream<Item = (Kind, async_nats::Message)> + Send>>;

/// What a desktop reacts to.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Offered,
    Assigned,
    Ended,
    State,
}

impl Generator {
    async fn start(args: &BenchArgs, bed: &Testbed) -> anyhow::Result<Self> {
        let config = bed
            .prepared
            .bus_config(&bed.nats.url, &Identity::admin())
            .name("bench-agents-load");
        let bus = patchbay_bus::connect(&config)
            .await
            .context("the load generator cannot connect")?;
        let mut streams: Vec<Events> = Vec::new();
        for (subject, kind) in [
            ("cc.v1.calls.*.offered", Kind::Offered),
            ("cc.v1.calls.*.assigned", Kind::Assigned),
            ("cc.v1.calls.*.ended", Kind::Ended),
            ("cc.v1.agents.*.evt.state-changed", Kind::State),
        ] {
            let subscription = bus
                .client()
                .subscribe(subject)
                .await
                .with_context(|| format!("cannot subscribe to {subject}"))?;
            streams.push(Box::pin(subscription.map(move |m| (kind, m))));
        }
        bus.client().flush().await.context("flush")?;

        let (calls, calls_rx) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let outbox = Outbox {
            bus: bus.clone(),
            calls,
            commands,
        };
        let tracker = Shared::default();
        let counters = Arc::new(Counters::default());
        let publisher = BatchPublisher::new(&bus).max_batch(MAX_GENERATOR_BATCH);
        let mut tasks = Vec::new();
        for (stream, rx) in [("CC_CALLS", calls_rx), ("CC_AGENT_CMDS", commands_rx)] {
            tasks.push(tokio::spawn(commit_loop(
                stream,
                publisher.clone(),
                rx,
                Arc::clone(&tracker),
                Arc::clone(&counters),
                args.agents_linger,
            )));
        }
        tasks.push(tokio::spawn(desktops(
            futures::stream::select_all(streams),
            outbox.clone(),
            Arc::clone(&tracker),
        )));
        Ok(Self {
            outbox,
            tracker,
            counters,
            agents: args.agents_count,
            tasks,
        })
    }

    /// Log `agents` agents in to [`QUEUE`] and wait until each is available.
    async fn log_in(&self, agents: usize) -> anyhow::Result<()> {
        let profile = json!({ "skills": [], "queues": [{ "queue": QUEUE }] });
        for n in 0..agents {
            let agent = agent_id(n);
            self.outbox.command(
                &agent,
                "state",
                "cc.agent.set-state.v1",
                &json!({ "agent_id": agent, "state": "available", "profile": profile }),
            )?;
        }
        self.wait_idle(agents).await
    }

    /// Wait until every agent's last reported state is `available`.
    async fn wait_idle(&self, agents: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let available = {
                let tracker = lock(&self.tracker);
                (0..agents)
                    .filter(|n| {
                        tracker
                            .states
                            .get(&agent_id(*n))
                            .is_some_and(|s| s == "available")
                    })
                    .count()
            };
            if available == agents {
                return Ok(());
            }
            if started.elapsed() > IDLE_LIMIT {
                bail!("only {available} of {agents} agents are available after {IDLE_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Route `calls` calls `<prefix><n>` — all at once, or at `rate` a second — play
    /// every desktop until each is offered and ended and every agent is available again,
    /// and measure.
    async fn phase(
        &self,
        label: &'static str,
        prefix: &str,
        calls: usize,
        rate: Option<f64>,
        service: &Service,
        perf: &Perf,
    ) -> anyhow::Result<Row> {
        {
            let mut tracker = lock(&self.tracker);
            tracker.prefix = prefix.to_owned();
            tracker.sent.clear();
            tracker.latencies.clear();
            tracker.stored.clear();
            tracker.last_offer = None;
            tracker.ended = 0;
        }
        let before = service.scrape().await;
        let (commits, atomic, messages) = (
            self.counters.commits.load(Ordering::Relaxed),
            self.counters.atomic_commits.load(Ordering::Relaxed),
            self.counters.messages.load(Ordering::Relaxed),
        );
        let pids = [Some(perf.pid), service.pid(), Some(std::process::id())];
        let cpu_before = pids.map(cpu_seconds);
        let counting = perf.start().await;
        let started = Instant::now();
        match rate {
            None => {
                for n in 0..calls {
                    self.route(&format!("{prefix}{n}"))?;
                }
            }
            Some(rate) => {
                // Whatever is due every millisecond; bounded by count and by time.
                let limit = Duration::from_secs_f64(calls as f64 / rate) + Duration::from_secs(5);
                let mut every = tokio::time::interval(Duration::from_millis(1));
                let mut n = 0;
                while n < calls && started.elapsed() < limit {
                    every.tick().await;
                    let due = ((started.elapsed().as_secs_f64() * rate) as usize).min(calls);
                    while n < due {
                        self.route(&format!("{prefix}{n}"))?;
                        n += 1;
                    }
                }
                if n < calls {
                    bail!("{label}: only {n} of {calls} calls were routed within {limit:?}");
                }
            }
        }
        let published = Instant::now();
        // Every call offered…
        loop {
            let (offered, failures) = (
                lock(&self.tracker).latencies.len(),
                self.counters.failures.load(Ordering::Relaxed),
            );
            if offered >= calls {
                break;
            }
            if failures > 0 {
                bail!("{label}: the load generator gave up on {failures} messages");
            }
            if published.elapsed() > OFFER_LIMIT {
                bail!(
                    "{label}: only {offered} of {calls} calls were offered within {OFFER_LIMIT:?} \
                     of the last routed publish"
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // …and ended, and every agent free again.
        loop {
            let ended = lock(&self.tracker).ended;
            if ended >= calls {
                break;
            }
            if published.elapsed() > OFFER_LIMIT + IDLE_LIMIT {
                bail!("{label}: only {ended} of {calls} calls ended in time");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.wait_idle(self.agents).await?;
        let span = started.elapsed();
        let cpu_after = pids.map(cpu_seconds);
        let mut cpu = [(0.0, 0.0); 3];
        for (i, used) in cpu.iter_mut().enumerate() {
            *used = (
                cpu_after[i].0 - cpu_before[i].0,
                cpu_after[i].1 - cpu_before[i].1,
            );
        }
        let fsyncs = match counting {
            Ok(counting) => counting.stop().await,
            Err(why) => Err(why),
        };
        let service = service.scrape().await.since(before);
        let tracker = lock(&self.tracker);
        let last = tracker.last_offer.unwrap_or_else(Instant::now);
        let mut latencies: Vec<f64> = tracker
            .latencies
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let mut stored: Vec<f64> = tracker
            .stored
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        stored.sort_by(f64::total_cmp);
        Ok(Row {
            label,
            calls,
            rate: calls as f64
                / last
                    .saturating_duration_since(started)
                    .as_secs_f64()
                    .max(1e-6),
            p50: quantile(&latencies, 0.5),
            p99: quantile(&latencies, 0.99),
            max: quantile(&latencies, 1.0),
            stored_p50: quantile(&stored, 0.5),
            fsyncs,
            generator_commits: self.counters.commits.load(Ordering::Relaxed) - commits,
            generator_atomic: self.counters.atomic_commits.load(Ordering::Relaxed) - atomic,
            generator_messages: self.counters.messages.load(Ordering::Relaxed) - messages,
            service,
            span,
            cpu,
        })
    }

    /// Queue the `routed` event of `call` (what routing would publish).
    fn route(&self, call: &str) -> anyhow::Result<()> {
        let data = json!({
            "call_id": call, "seq": 1, "queue": QUEUE, "priority": 0, "requirements": [],
            "channel": "voice", "customer_tier": "standard", "rule": "bench",
            "lookup_ok": true, "routed_at_ms": 0
        });
        let now = Instant::now();
        lock(&self.tracker).sent.insert(call.to_owned(), now);
        self.outbox.send(
            Target::Calls,
            format!("cc.v1.calls.{call}.routed"),
            "cc.call.routed.v1",
            &data,
            call,
            Some(now),
        )
    }
}

fn agent_id(n: usize) -> String {
    format!("bench-agent-{n}")
}

/// The `q` quantile of sorted `values` (0 when empty).
fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values[((values.len() - 1) as f64 * q).round() as usize]
}

/// The desktops: accept each offer, hang up each assigned call, end wrap-up at each
/// `ended`; note offers, ends and agent states for the phases.
async fn desktops(mut events: futures::stream::SelectAll<Events>, outbox: Outbox, tracker: Shared) {
    while let Some((kind, msg)) = events.next().await {
        let at = Instant::now();
        let Ok(data) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else {
            continue;
        };
        let call = data["call_id"].as_str().unwrap_or_default();
        let agent = data["agent"].as_str().unwrap_or_default();
        let sent = match kind {
            Kind::Offered => {
                {
                    let mut tracker = lock(&tracker);
                    if let Some(sent) = tracker.sent.remove(call) {
                        tracker.latencies.push(at.saturating_duration_since(sent));
                        tracker.last_offer = Some(at);
                    }
                }
                outbox.command(
                    agent,
                    "accept",
                    "cc.agent.accept.v1",
                    &json!({ "agent_id": agent, "call_id": call }),
                )
            }
            Kind::Assigned => outbox.send(
                Target::Calls,
                format!("cc.v1.calls.{call}.hangup"),
                "cc.call.hangup.v1",
                &json!({ "call_id": call }),
                call,
                None,
            ),
            Kind::Ended => {
                {
                    let mut tracker = lock(&tracker);
                    if call.starts_with(tracker.prefix.as_str()) {
                        tracker.ended += 1;
                    }
                }
                outbox.command(
                    agent,
                    "wrapup-done",
                    "cc.agent.wrapup-done.v1",
                    &json!({ "agent_id": agent }),
                )
            }
            Kind::State => {
                if let (Some(agent), Some(to)) = (data["agent_id"].as_str(), data["to"].as_str()) {
                    lock(&tracker)
                        .states
                        .insert(agent.to_owned(), to.to_owned());
                }
                Ok(())
            }
        };
        if let Err(e) = sent {
            eprintln!("  desktop: {e:#}");
            return;
        }
    }
}

/// One stream's committer: everything queued (up to [`MAX_GENERATOR_BATCH`], after
/// waiting `linger` for more) as one batch, with up to [`GENERATOR_IN_FLIGHT`] commits in
/// flight, so a desktop's reaction never waits for an unrelated commit to be answered.
/// Concurrent batches may be stored in any order; nothing here depends on their order
/// (every message a desktop sends answers an event the service published after storing
/// what led to it).
async fn commit_loop(
    stream: &'static str,
    publisher: BatchPublisher,
    mut queue: mpsc::UnboundedReceiver<Item>,
    tracker: Shared,
    counters: Arc<Counters>,
    linger: Duration,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(GENERATOR_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        // What arrives while every slot is busy joins this batch.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut messages = vec![first.durable];
        let mut routed: Vec<Instant> = first.routed.into_iter().collect();
        let until = tokio::time::Instant::now() + linger;
        loop {
            while messages.len() < MAX_GENERATOR_BATCH {
                let Ok(item) = queue.try_recv() else { break };
                messages.push(item.durable);
                routed.extend(item.routed);
            }
            if messages.len() >= MAX_GENERATOR_BATCH || tokio::time::Instant::now() >= until {
                break;
            }
            tokio::time::sleep_until(until).await;
        }
        let (publisher, tracker, counters) = (
            publisher.clone(),
            Arc::clone(&tracker),
            Arc::clone(&counters),
        );
        tokio::spawn(async move {
            commit(stream, &publisher, &messages, &counters).await;
            drop(slot);
            let now = Instant::now();
            lock(&tracker)
                .stored
                .extend(routed.iter().map(|at| now.saturating_duration_since(*at)));
        });
    }
}

/// Store `messages` on `stream`, retrying up to [`COMMIT_ATTEMPTS`] times (the ids make a
/// retry safe); counted as failures when it never succeeds.
async fn commit(
    stream: &str,
    publisher: &BatchPublisher,
    messages: &[Durable],
    counters: &Counters,
) {
    for attempt in 1..=COMMIT_ATTEMPTS {
        match publisher.publish(stream, messages).await {
            Ok(stored) => {
                counters
                    .commits
                    .fetch_add(stored.commits as u64, Ordering::Relaxed);
                counters.atomic_commits.fetch_add(
                    (stored.commits - stored.pipelined) as u64,
                    Ordering::Relaxed,
                );
                counters
                    .messages
                    .fetch_add(messages.len() as u64, Ordering::Relaxed);
                return;
            }
            Err(e) if attempt < COMMIT_ATTEMPTS => {
                eprintln!("  load generator: {e} (attempt {attempt}; retrying)");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                eprintln!(
                    "  load generator: {e}; giving up on {} messages",
                    messages.len()
                );
            }
        }
    }
    counters
        .failures
        .fetch_add(messages.len() as u64, Ordering::Relaxed);
}

/// User and system CPU seconds process `pid` has used (0 when unknown): `/proc/<pid>/stat`
/// fields 14 and 15, in the kernel's `USER_HZ` (100 on every Linux this runs on).
fn cpu_seconds(pid: Option<u32>) -> (f64, f64) {
    let Some(stat) = pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
    else {
        return (0.0, 0.0);
    };
    // The command name may hold spaces: count fields after its closing parenthesis.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of the whole line are 12 and 13 after the name (field 2).
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

/// Counts the nats-server's fsyncs with `perf stat` on its syscall tracepoints.
struct Perf {
    binary: PathBuf,
    pid: u32,
    dir: PathBuf,
}

/// A running `perf stat`.
struct Counting {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

const FSYNC_EVENTS: &str = "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync";

impl Perf {
    /// Attach to the server (every thread, and threads it starts later); why not, if not.
    async fn start(&self) -> Result<Counting, String> {
        let out = self.dir.join("perf-stat.csv");
        let err = self.dir.join("perf-stat.err");
        let _ = std::fs::remove_file(&out);
        let stderr = std::fs::File::create(&err).map_err(|e| format!("{}: {e}", err.display()))?;
        let mut child = Command::new(&self.binary)
            .args([
                "stat",
                "-x",
                ",",
                "-e",
                FSYNC_EVENTS,
                "-p",
                &self.pid.to_string(),
                "-o",
            ])
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        // Attached once it has written its header; a refusal ends it at once.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(2) {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "perf stat exited ({status}): {}",
                    std::fs::read_to_string(&err).unwrap_or_default().trim()
                ));
            }
            if std::fs::metadata(&out).is_ok_and(|m| m.len() > 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Counting { child, out, err })
    }
}

impl Counting {
    /// Stop counting (SIGINT, as perf expects) and read fsync + fdatasync.
    async fn stop(mut self) -> Result<u64, String> {
        let pid = self.child.id().to_string();
        let signalled = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .map_err(|e| format!("cannot signal perf: {e}"))?;
        if !signalled.success() {
            return Err("cannot signal perf".into());
        }
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if started.elapsed() < Duration::from_secs(5) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("perf stat did not stop within 5 s".into());
                }
            }
        }
        let text =
            std::fs::read_to_string(&self.out).map_err(|e| format!("perf wrote nothing: {e}"))?;
        let mut total = 0;
        let mut seen = 0;
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let mut fields = line.split(',');
            let (Some(count), Some(event)) = (fields.next(), fields.nth(1)) else {
                continue;
            };
            if !event.starts_with("syscalls:sys_enter_f") {
                continue;
            }
            total += count
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("perf: {event} {count}"))?;
            seen += 1;
        }
        if seen != 2 {
            return Err(format!(
                "perf reported {seen} of 2 events: {} {}",
                text.trim(),
                std::fs::read_to_string(&self.err)
                    .unwrap_or_default()
                    .trim()
            ));
        }
        Ok(total)
    }
}

/// The table, the targets and where the time went.
fn report(args: &BenchArgs, floor: &Floor, rows: &[Row]) {
    println!();
    println!(
        "{:<36} {:>6} {:>11} {:>7} {:>7} {:>7} {:>8} {:>8} {:>9} {:>10}",
        "agents outputs stored",
        "calls",
        "decisions/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "gen ms",
        "fsyncs",
        "fsync/dec",
        "out/commit"
    );
    for row in rows {
        let (fsyncs, per_decision) = match &row.fsyncs {
            Ok(n) => (
                n.to_string(),
                format!("{:.2}", *n as f64 / row.calls as f64),
            ),
            Err(_) => ("n/a".to_owned(), "n/a".to_owned()),
        };
        println!(
            "{:<36} {:>6} {:>11.0} {:>7.1} {:>7.1} {:>7.1} {:>8.1} {:>8} {:>9} {:>10.1}",
            row.label,
            row.calls,
            row.rate,
            row.p50,
            row.p99,
            row.max,
            row.stored_p50,
            fsyncs,
            per_decision,
            row.service.outputs / row.service.commits.max(1.0),
        );
    }
    let [max, paced, baseline] = rows else {
        return;
    };
    println!();
    println!(
        "decisions = offers; decisions/s from the first routed publish to the last offer; \
         latency = routed handed to the load generator → offered seen (gen ms: → its commit \
         answered, p50), calls > agents in the max-rate rows so it includes waiting for a \
         free agent; fsyncs = every fsync/fdatasync of the nats-server from the first publish \
         until every call ended and every agent was available again, including the load \
         generator's own commits ({} agents' desktops: routed, accept, hangup, wrapup-done)",
        args.agents_count
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "target: ≥ 5000 decisions/s at max rate: {:.0} ({}); p99 ≤ 50 ms at half max: {:.1} ms \
         at {:.0}/s ({})",
        max.rate,
        verdict(max.rate >= 5000.0),
        paced.p99,
        paced.rate,
        verdict(paced.p99 <= 50.0)
    );
    let per = |row: &Row| match &row.fsyncs {
        Ok(n) => format!("{:.2}", *n as f64 / row.calls as f64),
        Err(_) => "n/a".into(),
    };
    println!(
        "atomic vs pipelined at max rate: {:.2}× decisions/s, p99 {:.1} vs {:.1} ms, fsyncs per \
         decision {} vs {}",
        max.rate / baseline.rate.max(1e-9),
        max.p99,
        baseline.p99,
        per(max),
        per(baseline)
    );
    println!();
    println!(
        "one commit on the idle stack (one client, one at a time, p50 of {FLOOR_ROUNDS}): {}",
        floor
            .iter()
            .map(|(size, atomic, pipelined)| format!(
                "{size} message(s): atomic batch {atomic:.2} ms, pipelined {pipelined:.2} ms"
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    println!(
        "where the time and the fsyncs go (service counters over each phase; `other` fsyncs are \
         the server's own: it stages every atomic batch to an R1 file stream in a temporary \
         store, streams/<stream>/batches/<id>, ~3 fsyncs per batch, and writes consumer state):"
    );
    for row in rows {
        let s = &row.service;
        let batches = s.batches.max(1.0);
        let busy = s.apply + s.snapshot + s.publish;
        let fsyncs = match &row.fsyncs {
            Ok(n) => format!(
                "{n} fsyncs = generator commits {} ({} messages) + service output commits {:.0} \
                 ({:.0} outputs) + snapshots {:.0} + other {} (atomic batches: generator {}, \
                 service {:.0})",
                row.generator_commits,
                row.generator_messages,
                s.commits,
                s.outputs,
                s.snapshots,
                *n as i64 - row.generator_commits as i64 - s.commits as i64 - s.snapshots as i64,
                row.generator_atomic,
                s.atomic,
            ),
            Err(why) => format!("fsyncs n/a: {why}"),
        };
        println!(
            "  {}: {:.0} batches, {:.1} inputs each; per batch apply {:.2} ms, snapshot {:.2} ms, \
             publish {:.2} ms; the service was in a batch {:.0} % of {:.2} s; {fsyncs}",
            row.label,
            s.batches,
            s.inputs / batches,
            s.apply / batches * 1e3,
            s.snapshot / s.snapshots.max(1.0) * 1e3,
            s.publish / batches * 1e3,
            busy / row.span.as_secs_f64() * 100.0,
            row.span.as_secs_f64(),
        );
        let cores = |(user, system): (f64, f64)| {
            format!(
                "{:.2} (system {:.2})",
                (user + system) / row.span.as_secs_f64(),
                system / row.span.as_secs_f64()
            )
        };
        println!(
            "    CPU cores used over the phase (of {}): nats-server {}, patchbay-agents {}, load \
             generator {}",
            std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            cores(row.cpu[0]),
            cores(row.cpu[1]),
            cores(row.cpu[2]),
        );
    }
    for row in rows {
        if let Err(why) = &row.fsyncs {
            println!("warning: {}: fsyncs not counted: {why}", row.label);
        }
    }
}
