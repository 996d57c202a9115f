//! `patchbay-bench`: throughput and latency of a function on a `subject` trigger beside a
//! native async-nats echo responder, measured in the same run, on the same nats-server,
//! with mutual TLS and the same tokio flavour on both sides — plus the engine's median
//! instantiate+call time. Rounds alternate (native, function, native, …) and the median
//! round is reported, because this hardware varies ±15–20 % run to run. The gateway
//! benchmark is [`crate::bench_gateway`].
//!
//! `--suite tracing` measures what tracing costs the same function: a `patchbay-runtime`
//! node with trace context only (the default: spans get ids and propagate, nothing is
//! exported) against the same node exporting every span (100 % sampling) over OTLP/HTTP
//! to a sink in this process that accepts and discards. Both phases run the real binary
//! as a child process, restarted per phase with only the `OTEL_*` variables changed:
//! telemetry is process-global (`patchbay_telemetry::init` installs it once, and this CLI
//! already has its own log subscriber), so an in-process node could not switch it off
//! again, and a node that never installed the OpenTelemetry layer would not be the
//! "tracing off" a deployment runs. Phases alternate round by round; medians are
//! compared.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures::StreamExt as _;
use patchbay_bus::{BusConfig, CloudEvent};

use crate::bench_gateway::{Killed, http_get, micros, sibling};
use patchbay_cli::function::{DeployArgs, FnCommand};
use patchbay_control::certs::Identity;
use patchbay_control::local::{self, NatsPlan, StateDir};

/// `patchbay-bench` flags.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The nats-server binary.
    #[arg(
        long,
        env = "PATCHBAY_NATS_SERVER",
        default_value = ".tools/venv/bin/nats-server"
    )]
    pub nats_server: PathBuf,
    /// Directory with the `echo` component.
    #[arg(long, env = "PATCHBAY_COMPONENTS", default_value = "build/components")]
    pub components: PathBuf,
    /// Directory with `access.toml` and `streams.toml`.
    #[arg(long, default_value = "deploy")]
    pub deploy_dir: PathBuf,
    /// Concurrent requesters.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Length of each measured round.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Rounds per side (the median round is reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Payload bytes per request.
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// Tokio flavour of the responders and the load generator: `current` or `multi`.
    #[arg(long, default_value = "current", value_parser = ["current", "multi"])]
    pub flavour: String,
    /// Instantiate+call iterations for the engine micro-benchmark.
    #[arg(long, default_value_t = 20_000)]
    pub iterations: usize,
    /// Which benchmarks: `functions` (event function vs native responder), `gateway`
    /// (HTTP function through the gateway vs `wasmtime serve`), `tracing` (the function
    /// with OTLP export at 100 % sampling vs without), `breaker` (routing's latency under
    /// a hung customer lookup, with and without a circuit breaker), `topology` (call
    /// latency and memory of the monolith vs the split layout), `agents` (the agents
    /// service's decisions/s and latency through the bus, atomic batches vs pipelined
    /// single publishes), or `all`.
    #[arg(long, default_value = "all", value_parser = ["all", "functions", "gateway", "tracing", "breaker", "topology", "agents"])]
    pub suite: String,
    /// The `wasmtime` CLI (48.0.8, the engine Patchbay embeds) for the gateway baseline.
    #[arg(
        long,
        env = "PATCHBAY_WASMTIME",
        default_value = "~/.cache/patchbay/wasmtime-cli/bin/wasmtime",
        value_parser = expand_home
    )]
    pub wasmtime: PathBuf,
    /// The `wrk` load generator for the gateway benchmark.
    #[arg(long, env = "PATCHBAY_WRK", default_value = "wrk")]
    pub wrk: PathBuf,
    /// `--suite agents`: agents logged in, every desktop played by one load generator.
    #[arg(long, default_value_t = 500)]
    pub agents_count: usize,
    /// `--suite agents`: calls of the max-rate phase (atomic batches).
    #[arg(long, default_value_t = 2_000)]
    pub agents_calls: usize,
    /// `--suite agents`: calls of the max-rate phase with atomic batches off (the
    /// baseline); default: as many as `--agents-calls`.
    #[arg(long)]
    pub agents_baseline_calls: Option<usize>,
    /// `--suite agents`: how long the paced phase (half the measured maximum) publishes.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub agents_paced_for: Duration,
    /// `--suite agents`: how long the load generator waits for more messages before it
    /// commits a batch (0: it commits what is queued as soon as the previous commit is
    /// answered).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub agents_linger: Duration,
    /// `perf`, which counts the nats-server's fsyncs for `--suite agents`.
    #[arg(long, env = "PATCHBAY_PERF", default_value = "perf")]
    pub perf: PathBuf,
}

fn expand_home(text: &str) -> Result<PathBuf, String> {
    match text.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(rest))
            .ok_or_else(|| "HOME is not set".to_owned()),
        None => Ok(PathBuf::from(text)),
    }
}

/// One measured round.
#[derive(Debug, Clone, Copy)]
struct Round {
    rps: f64,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    errors: u64,
}

fn runtime(flavour: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    let rt = if flavour == "multi" {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    rt.context("cannot build a tokio runtime")
}

/// Run `future` on its own thread with its own runtime of `flavour`.
fn spawn_on_own_runtime<F>(
    flavour: &str,
    name: &str,
    future: F,
) -> anyhow::Result<std::thread::JoinHandle<()>>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = runtime(flavour)?;
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || rt.block_on(future))
        .context("cannot start a thread")
}

/// The native baseline: echo every request's payload and headers back.
async fn native_echo(
    config: BusConfig,
    subject: String,
    stop: Arc<AtomicBool>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let Ok(bus) = patchbay_bus::connect(&config).await else {
        return;
    };
    let client = bus.client().clone();
    let Ok(mut sub) = client.queue_subscribe(subject, "bench".into()).await else {
        return;
    };
    let _ = client.flush().await;
    let _ = ready.send(());
    while let Some(msg) = sub.next().await {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if let Some(reply) = msg.reply {
            let headers = msg.headers.unwrap_or_default();
            let _ = client
                .publish_with_headers(reply, headers, msg.payload)
                .await;
        }
    }
}

/// Requests each load generator sends before it measures.
const WARM_UP_REQUESTS: usize = 200;

/// A warmed-up connection sending the same CloudEvent (binary mode) to one subject.
#[derive(Clone)]
struct Requester {
    client: async_nats::Client,
    subject: String,
    headers: async_nats::HeaderMap,
    body: Bytes,
}

impl Requester {
    async fn connect(config: BusConfig, subject: String, payload: usize) -> anyhow::Result<Self> {
        let bus = patchbay_bus::connect(&config).await?;
        let event = CloudEvent::new("/patchbay/bench", "bench.echo.v1")
            .data("application/octet-stream", vec![b'x'; payload]);
        let requester = Self {
            client: bus.client().clone(),
            subject,
            headers: event.to_headers(),
            body: event.data,
        };
        // Warm up: connections, subscriptions, the instance pool.
        for _ in 0..WARM_UP_REQUESTS {
            let _ = requester.request().await;
        }
        Ok(requester)
    }

    async fn request(&self) -> Result<async_nats::Message, async_nats::RequestError> {
        self.client
            .request_with_headers(
                self.subject.clone(),
                self.headers.clone(),
                self.body.clone(),
            )
            .await
    }
}

/// `concurrency` requesters sending CloudEvents to `subject` for `duration`.
async fn load(
    config: BusConfig,
    subject: String,
    concurrency: usize,
    duration: Duration,
    payload: usize,
) -> anyhow::Result<Round> {
    let requester = Requester::connect(config, subject, payload).await?;
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let requester = requester.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(16 * 1024);
            let mut errors = 0u64;
            // Bounded by time and by count.
            for _ in 0..10_000_000u64 {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                match requester.request().await {
                    Ok(_) => latencies.push(now.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Round {
        rps: all.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        errors,
    })
}

/// One requester, one request at a time: the unloaded round trip (p50, p99).
async fn sequential(
    config: BusConfig,
    subject: String,
    count: usize,
    payload: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let requester = Requester::connect(config, subject, payload).await?;
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        requester
            .request()
            .await
            .context("sequential request failed")?;
        latencies.push(start.elapsed());
    }
    latencies.sort_unstable();
    Ok((latencies[count / 2], latencies[count * 99 / 100]))
}

/// The table of median rounds, one row per measured side.
fn print_rounds(rows: &[(&str, Round)]) {
    let width = rows
        .iter()
        .map(|(name, _)| name.chars().count())
        .max()
        .unwrap_or(0);
    println!();
    println!(
        "{:<width$} {:>10} {:>9} {:>9} {:>9} {:>7}",
        "", "req/s", "p50", "p90", "p99", "errors"
    );
    for (name, r) in rows {
        println!(
            "{:<width$} {:>10.0} {:>9} {:>9} {:>9} {:>7}",
            name,
            r.rps,
            micros(r.p50),
            micros(r.p90),
            micros(r.p99),
            r.errors
        );
    }
}

fn median_round(mut rounds: Vec<Round>) -> Round {
    rounds.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    rounds[rounds.len() / 2]
}

/// Run the benchmark and print the table.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this is a debug build; figures are only meaningful from `make bench` (release)"
        );
    }
    if matches!(args.suite.as_str(), "all" | "functions") {
        functions(&args).await?;
    }
    if matches!(args.suite.as_str(), "all" | "gateway") {
        println!();
        crate::bench_gateway::run(&args).await?;
    }
    if matches!(args.suite.as_str(), "all" | "tracing") {
        println!();
        tracing_cost(&args).await?;
    }
    if matches!(args.suite.as_str(), "all" | "breaker") {
        println!();
        crate::bench_breaker::run(&args).await?;
    }
    if matches!(args.suite.as_str(), "all" | "topology") {
        println!();
        crate::bench_topology::run(&args).await?;
    }
    if matches!(args.suite.as_str(), "all" | "agents") {
        println!();
        crate::bench_agents::run(&args).await?;
    }
    Ok(())
}

/// A fresh nats-server (mutual TLS, JetStream, bootstrapped assets) in a temporary state
/// directory. Fields drop in order: the server stops before its directory goes.
pub(crate) struct Testbed {
    pub(crate) nats: local::NatsProcess,
    pub(crate) admin: patchbay_bus::Bus,
    pub(crate) prepared: local::PreparedNats,
    pub(crate) dir: tempfile::TempDir,
}

impl Testbed {
    pub(crate) async fn start(args: &BenchArgs) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let plan = NatsPlan {
            state: StateDir(dir.path().to_owned()),
            deploy_dir: args.deploy_dir.clone(),
            port: 0,
            http_port: None,
            extra_identities: vec![],
            subject_prefix: String::new(),
        };
        let prepared = local::prepare(&plan)?;
        let nats = local::start_nats(&args.nats_server, &prepared).await?;
        let admin =
            patchbay_bus::connect(&prepared.bus_config(&nats.url, &Identity::admin())).await?;
        local::bootstrap(&admin, &args.deploy_dir).await?;
        Ok(Self {
            nats,
            admin,
            prepared,
            dir,
        })
    }
}

/// Deploy `file` as function `name` for a benchmark: publishes on `cc.v1.bench.>`, 1 s
/// timeout, no concurrency cap to speak of; waits up to `wait` for a node to serve it.
pub(crate) async fn deploy_bench(
    admin: patchbay_bus::Bus,
    file: PathBuf,
    name: String,
    trigger: String,
    wait: Duration,
) -> anyhow::Result<()> {
    patchbay_cli::function::run(
        FnCommand::Deploy(DeployArgs {
            publish: vec!["cc.v1.bench.>".into()],
            max_deliver: 1,
            memory_mib: 16,
            concurrency: 1024,
            wait,
            json: true,
            ..DeployArgs::new(file, name, trigger)
        }),
        admin,
    )
    .await
}

/// The built component `name` (`build/components/<name>.wasm`).
pub(crate) fn component(args: &BenchArgs, name: &str) -> anyhow::Result<PathBuf> {
    let path = args.components.join(format!("{name}.wasm"));
    if !path.is_file() {
        bail!("{} not found: run `make wasm`", path.display());
    }
    Ok(path)
}

/// The function benchmark: an event function on a `subject` trigger beside a native
/// responder, plus the engine alone.
async fn functions(args: &BenchArgs) -> anyhow::Result<()> {
    let echo = component(args, "echo")?;
    let bed = Testbed::start(args).await?;
    let (prepared, nats, admin) = (&bed.prepared, &bed.nats, &bed.admin);
    let id = |s: &str| s.parse::<Identity>().context("identity");
    // Both responders are runtime identities: same permissions, same TLS.
    let native_config = prepared.bus_config(&nats.url, &id("runtime/node-2")?);
    let node_config = prepared.bus_config(&nats.url, &id("runtime/node-1")?);
    let load_config = prepared
        .bus_config(&nats.url, &id("gateway/gateway")?)
        .name("bench-load");

    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let native_subject = "cc.v1.bench.native".to_owned();
    let function_subject = "cc.v1.bench.function".to_owned();
    let _native = spawn_on_own_runtime(
        &args.flavour,
        "native-echo",
        native_echo(
            native_config,
            native_subject.clone(),
            Arc::clone(&stop),
            ready_tx,
        ),
    )?;
    ready_rx.await.context("native responder failed to start")?;

    let metrics = patchbay_telemetry::Metrics::new();
    let health = patchbay_telemetry::Health::new();
    let ready = health.register("registry");
    let node = patchbay_host::NodeConfig {
        node: "node-1".into(),
        bus: node_config,
        engine: patchbay_engine::EngineConfig::default(),
        drain_timeout: Duration::from_secs(2),
        output_batch: patchbay_bus::batch::MAX_BATCH,
    };
    let node_stop = Arc::new(tokio::sync::Notify::new());
    let node_stop_wait = Arc::clone(&node_stop);
    let _node = spawn_on_own_runtime(&args.flavour, "runtime-node", async move {
        let shutdown = async move { node_stop_wait.notified().await };
        if let Err(e) = patchbay_host::run(node, &metrics, ready, shutdown).await {
            eprintln!("runtime node failed: {e}");
        }
    })?;
    deploy_bench(
        admin.clone(),
        echo.clone(),
        "bench-echo".into(),
        format!("subject:{function_subject}"),
        Duration::from_secs(30),
    )
    .await?;

    println!(
        "patchbay-bench: {} concurrent requesters, {}-byte CloudEvents, mTLS on every connection, \
         tokio {} on both sides, {} rounds × {:?}",
        args.concurrency, args.payload, args.flavour, args.rounds, args.duration
    );
    let mut native_rounds = Vec::new();
    let mut function_rounds = Vec::new();
    for round in 0..args.rounds {
        for (subject, rounds) in [
            (&native_subject, &mut native_rounds),
            (&function_subject, &mut function_rounds),
        ] {
            let (config, target, c, d, p) = (
                load_config.clone(),
                subject.clone(),
                args.concurrency,
                args.duration,
                args.payload,
            );
            let result = tokio::task::spawn_blocking(move || {
                runtime("current")?.block_on(load(config, target, c, d, p))
            })
            .await??;
            eprintln!(
                "  round {} {:<28} {:>9.0} req/s  p50 {}",
                round + 1,
                subject,
                result.rps,
                micros(result.p50)
            );
            rounds.push(result);
        }
    }
    let native = median_round(native_rounds);
    let function = median_round(function_rounds);
    let mut rtt = Vec::new();
    for subject in [&native_subject, &function_subject] {
        let (config, target, p) = (load_config.clone(), subject.clone(), args.payload);
        rtt.push(
            tokio::task::spawn_blocking(move || {
                runtime("current")?.block_on(sequential(config, target, 3000, p))
            })
            .await??,
        );
    }

    // The engine alone: instantiate + call of the same component, one core, no bus.
    let engine = patchbay_engine::Engine::new(patchbay_engine::EngineConfig::default())?;
    let code = engine.load(&std::fs::read(&echo)?)?;
    let event = patchbay_engine::Event {
        id: "bench".into(),
        source: "/bench".into(),
        type_: "bench.echo.v1".into(),
        subject: "cc.v1.bench.function".into(),
        time: None,
        content_type: Some("application/octet-stream".into()),
        data: vec![b'x'; args.payload],
        extensions: vec![],
    };
    let invocation =
        patchbay_engine::Invocation::new(Arc::new(patchbay_engine::MemoryCapabilities::new()))
            .allow_publish(patchbay_engine::PublishAllowList::new(["cc.v1.bench.>"])?);
    let _ =
        patchbay_engine::engine::bench_instantiate_call(&engine, &code, &event, &invocation, 1000)
            .await;
    let mut timings = patchbay_engine::engine::bench_instantiate_call(
        &engine,
        &code,
        &event,
        &invocation,
        args.iterations,
    )
    .await;
    timings.sort_unstable();
    let median = timings[timings.len() / 2];

    print_rounds(&[
        ("native async-nats echo (baseline)", native),
        ("function `echo`, subject trigger", function),
    ]);
    println!();
    println!("one sequential requester (unloaded round trip):");
    println!(
        "  native   p50 {:>8}  p99 {:>8}",
        micros(rtt[0].0),
        micros(rtt[0].1)
    );
    println!(
        "  function p50 {:>8}  p99 {:>8}",
        micros(rtt[1].0),
        micros(rtt[1].1)
    );
    println!();
    println!(
        "throughput ratio {:.2}× (target ≥ 0.70×)   added p50 {} unloaded (target ≤ 50 µs), {} at {} concurrent",
        function.rps / native.rps,
        micros(rtt[1].0.saturating_sub(rtt[0].0)),
        micros(function.p50.saturating_sub(native.p50)),
        args.concurrency
    );
    println!(
        "instantiate+call median {:.2} µs over {} iterations (target ≤ 6 µs; engine alone, no bus)",
        median.as_secs_f64() * 1e6,
        args.iterations
    );
    stop.store(true, Ordering::Relaxed);
    node_stop.notify_one();
    drop(bed);
    Ok(())
}

/// Whether a phase of the tracing benchmark exports spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tracing {
    /// Trace context only: spans get ids and propagate, nothing is exported (the default
    /// of every binary without `OTEL_EXPORTER_OTLP_ENDPOINT`).
    Off,
    /// Every span exported over OTLP/HTTP, 100 % sampling.
    On,
}

/// An OTLP/HTTP traces endpoint that accepts every export request and discards it, counting
/// requests and bytes so the report can show that export really happened.
struct OtlpSink {
    endpoint: String,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl OtlpSink {
    async fn start() -> anyhow::Result<Self> {
        let requests = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (seen, size) = (Arc::clone(&requests), Arc::clone(&bytes));
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(move |body: axum::body::Bytes| {
                    seen.fetch_add(1, Ordering::Relaxed);
                    size.fetch_add(body.len() as u64, Ordering::Relaxed);
                    // An empty 200 is an empty ExportTraceServiceResponse: all accepted.
                    async { axum::http::StatusCode::OK }
                }),
            )
            // A full batch is a few hundred KiB; never refuse one for its size.
            .layer(axum::extract::DefaultBodyLimit::disable());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the OTLP sink")?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("OTLP sink failed: {e}");
            }
        });
        Ok(Self {
            endpoint,
            requests,
            bytes,
        })
    }
}

/// Start `patchbay-runtime` as `runtime/node-1` with `tracing`, its admin listener on
/// `admin_listen`. Inherited `OTEL_*` variables are removed so only `tracing` decides.
fn spawn_node(
    bed: &Testbed,
    admin_listen: &str,
    tracing: Tracing,
    otlp_endpoint: &str,
) -> anyhow::Result<Killed> {
    let cache = bed.dir.path().join("component-cache");
    let cache = cache.to_string_lossy();
    let mut env = vec![
        ("PATCHBAY_NODE", "node-1"),
        // The binaries' default filter: the host's spans are at info level, so they exist
        // in both phases and only their export differs.
        ("PATCHBAY_LOG", "info"),
        ("PATCHBAY_ADMIN_LISTEN", admin_listen),
        ("PATCHBAY_DRAIN_TIMEOUT", "1s"),
        // A restarted node loads the compiled component instead of compiling it again.
        ("PATCHBAY_CACHE_DIR", &cache),
    ];
    if tracing == Tracing::On {
        env.extend([
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_endpoint),
            ("OTEL_TRACES_SAMPLER", "always_on"),
        ]);
    }
    spawn_workload(bed, "patchbay-runtime", ("runtime", "node-1"), &env)
}

/// Start the Patchbay binary `binary` (beside this one) as workload `identity` (kind,
/// name) on the testbed's bus, with `env` added; its output goes to `<name>.log` in the
/// testbed's directory. Inherited `OTEL_*` variables are removed so only `env` decides.
pub(crate) fn spawn_workload(
    bed: &Testbed,
    binary: &str,
    (kind, name): (&str, &str),
    env: &[(&str, &str)],
) -> anyhow::Result<Killed> {
    let identity = Identity::new(kind, name)?;
    let files = bed.prepared.state.identity(&identity);
    let log = bed.dir.path().join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut command = std::process::Command::new(sibling(binary)?);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OTEL_") {
            command.env_remove(key);
        }
    }
    command
        .env(patchbay_cli::envfile::NATS_URL, &bed.nats.url)
        .env(patchbay_cli::envfile::NATS_CA, bed.prepared.state.ca())
        .env(patchbay_cli::envfile::NATS_CERT, &files.cert)
        .env(patchbay_cli::envfile::NATS_KEY, &files.key)
        .envs(env.iter().copied());
    let child = command
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {binary}"))?;
    Ok(Killed(child))
}

/// The value of the Prometheus sample `series` in a /metrics body (0 when absent).
fn sample(body: &str, series: &str) -> u64 {
    body.lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Spans the node has exported and dropped, from its /metrics, once the counts have
/// stopped moving for longer than the export interval (the last batch has left), at most
/// 30 s.
async fn settled_span_counts(admin_listen: &str) -> (u64, u64) {
    let started = Instant::now();
    let mut last = span_counts(admin_listen).await;
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_secs(6) && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = span_counts(admin_listen).await;
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    last
}

/// Spans the node exported and dropped so far, from its /metrics.
async fn span_counts(admin_listen: &str) -> (u64, u64) {
    let body = http_get(&format!("{admin_listen}/metrics"), None)
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    let dropped = sample(
        &body,
        r#"patchbay_telemetry_spans_dropped_total{reason="queue_full"}"#,
    ) + sample(
        &body,
        r#"patchbay_telemetry_spans_dropped_total{reason="export_failed"}"#,
    );
    (
        sample(&body, "patchbay_telemetry_spans_exported_total"),
        dropped,
    )
}

/// The tracing benchmark: the function benchmark's load against a node with trace
/// context only and against the same node exporting every span, alternating.
async fn tracing_cost(args: &BenchArgs) -> anyhow::Result<()> {
    let echo = component(args, "echo")?;
    let bed = Testbed::start(args).await?;
    let sink = OtlpSink::start().await?;
    let load_config = bed
        .prepared
        .bus_config(&bed.nats.url, &"gateway/gateway".parse::<Identity>()?)
        .name("bench-load");
    let subject = "cc.v1.bench.traced".to_owned();
    let admin_listen = format!("127.0.0.1:{}", {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    });

    println!(
        "tracing bench: function `echo` on a subject trigger in a patchbay-runtime child \
         process, {} concurrent requesters, {}-byte CloudEvents, mTLS; tracing off (trace \
         context only) vs OTLP/HTTP export at 100 % sampling to a local sink that discards; \
         {} rounds × {:?}, phases alternating",
        args.concurrency, args.payload, args.rounds, args.duration
    );
    let mut deployed = false;
    let mut off_rounds = Vec::new();
    let mut on_rounds = Vec::new();
    let mut exported = 0u64;
    let mut dropped = 0u64;
    let mut requests_on = 0u64;
    for round in 0..args.rounds {
        for tracing in [Tracing::Off, Tracing::On] {
            let node = spawn_node(&bed, &admin_listen, tracing, &sink.endpoint)?;
            if deployed {
                wait_serving(&bed.admin, "bench-traced").await?;
            } else {
                deploy_bench(
                    bed.admin.clone(),
                    echo.clone(),
                    "bench-traced".into(),
                    format!("subject:{subject}"),
                    Duration::from_secs(60),
                )
                .await?;
                deployed = true;
            }
            let (config, target, c, d, p) = (
                load_config.clone(),
                subject.clone(),
                args.concurrency,
                args.duration,
                args.payload,
            );
            let result = tokio::task::spawn_blocking(move || {
                runtime("current")?.block_on(load(config, target, c, d, p))
            })
            .await??;
            let label = match tracing {
                Tracing::Off => "off",
                Tracing::On => {
                    // Measured requests plus the warm-up, all of which were traced.
                    requests_on +=
                        (result.rps * args.duration.as_secs_f64()) as u64 + WARM_UP_REQUESTS as u64;
                    let (e, d) = settled_span_counts(&admin_listen).await;
                    exported += e;
                    dropped += d;
                    "on (OTLP export)"
                }
            };
            eprintln!(
                "  round {} tracing {:<17} {:>9.0} req/s  p50 {}",
                round + 1,
                label,
                result.rps,
                micros(result.p50)
            );
            match tracing {
                Tracing::Off => off_rounds.push(result),
                Tracing::On => on_rounds.push(result),
            }
            drop(node);
        }
    }
    let off = median_round(off_rounds);
    let on = median_round(on_rounds);
    print_rounds(&[
        ("tracing off (context only, no export)", off),
        ("tracing on (OTLP/HTTP, 100 % sampled)", on),
    ]);
    println!();
    println!(
        "tracing cost {:.1} % throughput (target ≤ 10 %); during the on phases the node \
         exported {} spans (~{:.1} per request) and dropped {}; the sink took {} \
         requests, {} KiB",
        (1.0 - on.rps / off.rps) * 100.0,
        exported,
        exported as f64 / requests_on.max(1) as f64,
        dropped,
        sink.requests.load(Ordering::Relaxed),
        sink.bytes.load(Ordering::Relaxed) / 1024
    );
    if dropped > 0 {
        println!(
            "warning: spans were dropped, so the on figure understates the cost of exporting \
             everything"
        );
    }
    drop(bed);
    Ok(())
}

/// Wait until a node serves version 1 of `name` (a restarted node reads the registry).
async fn wait_serving(admin: &patchbay_bus::Bus, name: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    while patchbay_cli::function::serving_nodes(admin, name, 1, Duration::from_millis(300))
        .await
        .is_empty()
    {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("no node serves {name} after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
