//! `patchbay fn …`: deploy, inspect, invoke, roll back and remove functions, read their
//! logs, dead letters and KV state. Every command takes `--json` for scripting.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, consumer, kv};
use bytes::Bytes;
use futures::StreamExt as _;
use patchbay_bus::reply::InvokeReply;
use patchbay_bus::{Bus, CloudEvent, RequestOptions, Token};
use patchbay_host::dispatch::LogRecord;
use patchbay_host::{NodeStatus, dlq};
use patchbay_registry::canary::Verdict;
use patchbay_registry::{
    self as registry, DLQ_STREAM, FunctionSpec, LOGS_STREAM, Limits, Registry, TICKS_STREAM,
    Trigger, VersionSpec,
};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `patchbay fn` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum FnCommand {
    /// Deploy a component as a new version of a function (and make it active).
    Deploy(DeployArgs),
    /// List deployed functions.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show every version of a function.
    Describe {
        /// Function name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Invoke a function directly and print its outputs.
    Invoke(InvokeArgs),
    /// Print a function's log records.
    Logs {
        /// Function name.
        name: String,
        /// Keep printing new records.
        #[arg(long, short)]
        follow: bool,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// End a canary (all new traffic back to the active version at once), or without one,
    /// make an earlier version active again.
    Rollback {
        /// Function name.
        name: String,
        /// Version to activate (default: the one before the active one; with a canary
        /// running: the active one).
        #[arg(long)]
        to: Option<u32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make the running canary the active version (all traffic on it).
    Promote {
        /// Function name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a function (its versions, trigger consumer and, with --purge, its data).
    Rm {
        /// Function name.
        name: String,
        /// Also delete the function's KV state (its keys in bucket `patchbay-fn-state`).
        #[arg(long)]
        purge: bool,
    },
    /// Dead letters: list, show, replay.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// A function's KV state (its keys `<name>.<key>` in bucket `patchbay-fn-state`), read-only.
    #[command(subcommand)]
    Kv(KvCommand),
}

/// `patchbay fn kv` subcommands. Read-only on purpose: the state belongs to the function,
/// and an operator who must change it can still use any NATS KV tool as admin.
#[derive(Debug, clap::Subcommand)]
pub enum KvCommand {
    /// Print the value of one key (raw bytes; with --json, an object with the revision).
    Get {
        /// Function name.
        name: String,
        /// The key.
        key: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the keys, sorted.
    Ls {
        /// Function name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `patchbay fn deploy` flags.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The component (`.wasm`, WASI p2, world `patchbay:function/event-handler`).
    pub file: PathBuf,
    /// Function name (letters, digits, `-`, `_`).
    #[arg(long)]
    pub name: String,
    /// `subject:<s>`, `stream:<stream>:<subject>`, `schedule:<cron>` or `invoke`.
    #[arg(long, default_value = "invoke")]
    pub trigger: String,
    /// Subjects (NATS patterns) the function may publish or request on; repeatable.
    #[arg(long = "publish")]
    pub publish: Vec<String>,
    /// Configuration `key=value`; repeatable.
    #[arg(long = "config", value_parser = parse_key_value)]
    pub config: Vec<(String, String)>,
    /// Deliveries of one stream message before it is dead-lettered.
    #[arg(long, default_value_t = Limits::default().max_deliver)]
    pub max_deliver: u32,
    /// Time limit per invocation, e.g. `1s`, `250ms`.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Memory cap per instance in MiB, 1 to 512. Each invocation reserves all of it from
    /// the runtime node's memory budget; a node runs at most budget / memory at once.
    #[arg(long = "memory", default_value_t = 64)]
    pub memory_mib: u64,
    /// Concurrent invocations per node (at least 1; a node with too small a memory budget
    /// for all of them runs fewer).
    #[arg(long, default_value_t = Limits::default().max_concurrency)]
    pub concurrency: u32,
    /// With a `stream` trigger: handle the events of each key (the first `*` token of the
    /// trigger's subject, e.g. the call id) one at a time and in order, across all nodes.
    #[arg(long)]
    pub ordered: bool,
    /// Partitions of an `--ordered` trigger: the most keys handled at once (default 16).
    #[arg(long, requires = "ordered")]
    pub partitions: Option<u32>,
    /// Deploy as a canary: this percentage of interactions (sticky per `partitionkey`,
    /// else per event id) goes to the new version, the rest stays on the active one. A
    /// running canary is replaced; a deploy without `--canary` ends it.
    #[arg(long, value_name = "PERCENT")]
    pub canary: Option<f64>,
    /// With `--canary`: runtime nodes stop routing to the canary by themselves when its
    /// error rate exceeds the active version's by more than this fraction (0.05 = 5 points).
    #[arg(long, requires = "canary", value_name = "FRACTION")]
    pub auto_rollback_margin: Option<f64>,
    /// With `--auto-rollback-margin`: events the canary must have handled on a node
    /// before that node judges it.
    #[arg(
        long,
        requires = "auto_rollback_margin",
        default_value_t = 100,
        value_name = "N"
    )]
    pub auto_rollback_min_events: u64,
    /// The function's resilience policy for its callers (the gateway, other functions):
    /// the fields of a `[targets."function:<name>"]` table of deploy/resilience.toml on
    /// one line, e.g. `timeout = "2s", retry = { max_attempts = 3 }, concurrency = 16`.
    /// An empty string removes it. Stored in `patchbay-resilience`; without the flag the
    /// function's policy is left as it is.
    #[arg(long, value_name = "FIELDS")]
    pub resilience: Option<String>,
    /// Wait this long for a runtime node to serve the new version (0 = don't wait).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl DeployArgs {
    /// The flags of `patchbay fn deploy <file> --name <name> --trigger <trigger>` with
    /// every other flag at its command-line default (for commands that deploy on a user's
    /// behalf: `up`, `bench`).
    #[must_use]
    pub fn new(file: PathBuf, name: impl Into<String>, trigger: impl Into<String>) -> Self {
        let limits = Limits::default();
        Self {
            file,
            name: name.into(),
            trigger: trigger.into(),
            publish: vec![],
            config: vec![],
            max_deliver: limits.max_deliver,
            timeout: Duration::from_secs(1),
            memory_mib: 64,
            concurrency: limits.max_concurrency,
            ordered: false,
            partitions: None,
            canary: None,
            auto_rollback_margin: None,
            auto_rollback_min_events: 100,
            resilience: None,
            wait: Duration::from_secs(30),
            json: false,
        }
    }
}

/// `patchbay fn invoke` flags.
#[derive(Debug, clap::Args)]
pub struct InvokeArgs {
    /// Function name.
    pub name: String,
    /// Event data: JSON text, or `@file`.
    #[arg(long, default_value = "{}")]
    pub data: String,
    /// CloudEvents type.
    #[arg(long = "type", default_value = "patchbay.invoke.v1")]
    pub ty: String,
    /// Interaction key (`partitionkey`).
    #[arg(long = "key")]
    pub partition_key: Option<String>,
    /// How long to wait for the reply.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print the whole reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `patchbay fn dlq` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters (of one function, or all).
    Ls {
        /// Function name.
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: headers and body.
    Show {
        /// Its sequence number in PATCHBAY_DLQ.
        seq: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back on the subject they first arrived on, then remove them.
    Replay {
        /// Sequence numbers to replay.
        seqs: Vec<u64>,
        /// Replay every dead letter of this function instead.
        #[arg(long)]
        all: Option<String>,
    },
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, got {text:?}"))?;
    if k.is_empty() {
        return Err(format!("empty key in {text:?}"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// Run a `patchbay fn` command.
pub async fn run(command: FnCommand, bus: Bus) -> anyhow::Result<()> {
    let registry = Registry::open(&bus.jetstream())
        .await
        .context("failed to open the function registry (did `patchbay up` bootstrap it?)")?;
    match command {
        FnCommand::Deploy(args) => deploy(&bus, &registry, args).await,
        FnCommand::Ls { json } => ls(&bus, &registry, json).await,
        FnCommand::Describe { name, json } => describe(&bus, &registry, &name, json).await,
        FnCommand::Invoke(args) => invoke(&bus, args).await,
        FnCommand::Logs { name, follow, json } => logs(&bus, &name, follow, json).await,
        FnCommand::Rollback { name, to, json } => rollback(&bus, &registry, &name, to, json).await,
        FnCommand::Promote { name, json } => promote(&bus, &registry, &name, json).await,
        FnCommand::Rm { name, purge } => rm(&bus, &registry, &name, purge).await,
        FnCommand::Dlq(cmd) => dlq_command(&bus, cmd).await,
        FnCommand::Kv(cmd) => kv_command(&bus, &registry, cmd).await,
    }
}

fn token(name: &str) -> anyhow::Result<Token> {
    Token::new(name).with_context(|| format!("invalid function name {name:?}"))
}

/// RFC 3339 for milliseconds since the Unix epoch (the raw number if out of range).
fn format_millis(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

async fn deploy(bus: &Bus, registry: &Registry, args: DeployArgs) -> anyhow::Result<()> {
    let name = token(&args.name)?;
    let mut trigger = Trigger::parse(&args.trigger)?;
    if args.ordered {
        trigger = trigger.with_ordering(patchbay_registry::ordering::Ordered {
            partitions: args
                .partitions
                .unwrap_or(patchbay_registry::ordering::DEFAULT_PARTITIONS),
        })?;
    }
    for p in &args.publish {
        if !patchbay_bus::subject::is_valid_pattern(p) {
            bail!("--publish {p:?} is not a valid subject pattern");
        }
    }
    // Refuse a bad policy before anything is uploaded.
    if let Some(fields) = args.resilience.as_deref().filter(|f| !f.trim().is_empty()) {
        let target = patchbay_bus::resilience::Target::Function(name.to_string());
        patchbay_bus::resilience::TargetPolicy::from_inline(&target, fields)
            .with_context(|| format!("--resilience for {target}"))?;
    }
    // Would the hosts be allowed to do what this deploy asks? Checked against the policy
    // the bootstrap stored, before anything is uploaded or created.
    let js = bus.jetstream();
    let notes = patchbay_control::admission::load(&js)
        .await?
        .check(&name, &trigger, &args.publish)
        .with_context(|| format!("refusing to deploy {name}"))?;
    check_streams_exist(&js, &trigger)
        .await
        .with_context(|| format!("refusing to deploy {name}"))?;
    // Checked, so that no --memory wraps around to a 0-byte limit.
    let memory_bytes = patchbay_engine::limits::instance_memory_bytes(args.memory_mib)
        .context("invalid --memory")?;
    if args.concurrency == 0 {
        bail!("invalid --concurrency: at least 1 invocation per node");
    }
    let size = std::fs::metadata(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?
        .len();
    // The engine that validates is configured like a runtime node's, with one slot.
    let engine_config = patchbay_engine::EngineConfig {
        max_concurrent_instances: 1,
        ..patchbay_engine::EngineConfig::default()
    };
    let max = engine_config.max_component_bytes as u64;
    if size > max {
        bail!(
            "{} is {size} bytes, over the {max}-byte limit for a component",
            args.file.display()
        );
    }
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;

    // Validate before anything is stored: a refused component changes nothing.
    let started = Instant::now();
    let http = trigger.is_http();
    let validated = tokio::task::spawn_blocking(move || {
        let engine = patchbay_engine::Engine::new(engine_config)?;
        // An HTTP function must target wasi:http/proxy; every other one the event world.
        if http {
            engine.load_http(&bytes).map_err(anyhow::Error::from)?;
        } else {
            engine.load(&bytes).map_err(anyhow::Error::from)?;
        }
        Ok::<_, anyhow::Error>(bytes)
    })
    .await
    .context("validation task failed")?;
    let bytes = validated.with_context(|| format!("refusing to deploy {}", args.file.display()))?;
    if !args.json {
        eprintln!(
            "validated {} ({} KiB) in {:?}",
            args.file.display(),
            bytes.len() / 1024,
            started.elapsed()
        );
    }

    let limits = Limits {
        timeout_ms: u64::try_from(args.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1),
        memory_bytes,
        max_concurrency: args.concurrency,
        max_deliver: args.max_deliver.max(1),
    };
    let canary = args
        .canary
        .map(|percent| registry::Canary {
            version: 0,
            percent,
            auto_rollback: args
                .auto_rollback_margin
                .map(|margin| registry::AutoRollback {
                    margin,
                    min_events: args.auto_rollback_min_events,
                }),
            started_at: now_rfc3339(),
        })
        .map(|c| c.validate().map(|()| c))
        .transpose()?;
    let digest = registry::digest(&bytes);
    let version = VersionSpec {
        version: 0,
        digest: digest.clone(),
        size: bytes.len() as u64,
        deployed_at: now_rfc3339(),
        trigger: trigger.clone(),
        publish: args.publish.clone(),
        config: args.config.into_iter().collect::<BTreeMap<_, _>>(),
        limits,
        stream_subjects: stream_subjects(&js).await?,
    };
    let mut unchanged = false;
    let mut ended_canary = None;
    let mut change = |current: Option<FunctionSpec>| {
        let mut spec = current.unwrap_or_else(|| FunctionSpec {
            name: name.to_string(),
            active: 0,
            versions: vec![],
            canary: None,
        });
        // Deploying exactly what already serves (same component, trigger, allow-list,
        // config and limits — and canary share) is a no-op, so scripts can re-run.
        let same = |deployed: &VersionSpec| {
            VersionSpec {
                version: deployed.version,
                deployed_at: deployed.deployed_at.clone(),
                ..version.clone()
            } == *deployed
        };
        ended_canary = None;
        match &canary {
            None => {
                unchanged = spec.canary.is_none() && spec.active_version().is_ok_and(same);
                if !unchanged {
                    ended_canary = spec.canary.as_ref().map(|c| c.version);
                    spec.push(version.clone());
                }
            }
            Some(new) => {
                if spec.active_version().is_ok_and(same) {
                    return Err(registry::RegistryError::Invalid(format!(
                        "{name} v{} is already this component with these settings; \
                         nothing to canary",
                        spec.active
                    )));
                }
                unchanged = spec.canary.as_ref().is_some_and(|c| {
                    c.percent.to_bits() == new.percent.to_bits()
                        && c.auto_rollback == new.auto_rollback
                        && spec.version(c.version).is_ok_and(same)
                });
                if !unchanged {
                    ended_canary = spec.canary.as_ref().map(|c| c.version);
                    spec.start_canary(version.clone(), new.clone())?;
                }
            }
        }
        Ok(spec)
    };
    // The registry's own checks (a canary's trigger, nothing to canary, ...) on what is
    // stored now, before the upload; the update below runs them again under CAS.
    let current = registry.get(name.as_str()).await?.map(|(spec, _)| spec);
    change(current).with_context(|| format!("refusing to deploy {name}"))?;

    // Everything is validated: store.
    let started = Instant::now();
    let uploaded = registry.put_artifact(&bytes).await?;
    debug_assert_eq!(uploaded, digest);
    if !args.json {
        eprintln!("uploaded sha256:{digest} in {:?}", started.elapsed());
    }
    // A canary shares the active version's trigger, hence its consumer: that keeps the
    // stable version's settings until `fn promote`.
    if canary.is_none() {
        ensure_consumer(bus, &name, &trigger, &limits).await?;
    }
    let spec = registry.update(name.as_str(), &mut change).await?;
    if !args.json {
        for note in &notes {
            eprintln!("note: {note}");
        }
    }
    if let Some(fields) = &args.resilience {
        let change = crate::resilience::put_deployed(bus, name.as_str(), fields).await?;
        if !args.json {
            eprintln!("resilience policy: {change}");
        }
    }
    let deployed = spec.canary.as_ref().map_or(spec.active, |c| c.version);
    // HTTP functions are served by gateways, which do not answer the node status query.
    let serving = if args.wait.is_zero() || http {
        vec![]
    } else if spec.canary.is_some() {
        wait_for_canary(bus, name.as_str(), deployed, args.wait).await
    } else {
        wait_for_version(bus, name.as_str(), spec.active, args.wait).await?
    };
    if args.json {
        println!(
            "{}",
            json!({ "name": name.as_str(), "version": deployed, "active": spec.active,
                    "canary": spec.canary, "ended_canary": ended_canary, "digest": digest,
                    "trigger": trigger.to_string(), "nodes": serving, "unchanged": unchanged })
        );
    } else {
        match &spec.canary {
            Some(c) => println!(
                "deployed {name} v{deployed} (sha256:{}) as a canary: {}% of interactions, \
                 the rest on v{}",
                &digest[..12],
                c.percent,
                spec.active
            ),
            None => println!(
                "deployed {name} v{deployed} (sha256:{}) trigger {trigger}",
                &digest[..12]
            ),
        }
        if let Some(old) = ended_canary {
            println!("note: this deploy replaced the running canary v{old}");
        }
        if http {
            println!("served by every gateway on {trigger}");
        } else if serving.is_empty() && !args.wait.is_zero() {
            println!("warning: no runtime node serves v{deployed} yet");
        } else if !serving.is_empty() {
            println!("serving on {}", serving.join(", "));
        }
    }
    Ok(())
}

/// The subject filters of every stream, for the version spec: nodes may not list streams
/// themselves, and must know which outputs a stream stores (see `VersionSpec`).
async fn stream_subjects(js: &jetstream::Context) -> anyhow::Result<Vec<String>> {
    use futures::TryStreamExt as _;
    let mut subjects: Vec<String> = js
        .streams()
        .map_ok(|info| info.config.subjects)
        .try_concat()
        .await
        .context("failed to list the streams")?;
    // KV and object-store subjects are never function outputs.
    subjects.retain(|s| !s.starts_with('$'));
    subjects.sort();
    subjects.dedup();
    Ok(subjects)
}

/// The streams a `stream` or `schedule` trigger reads must exist (refused before anything
/// is stored; `ensure_consumer` creates the consumers afterwards).
async fn check_streams_exist(js: &jetstream::Context, trigger: &Trigger) -> anyhow::Result<()> {
    let mut needed: Vec<&str> = Vec::new();
    match trigger {
        Trigger::Stream {
            stream, ordered, ..
        } => {
            needed.push(stream);
            if ordered.is_some() {
                needed.push(patchbay_registry::ordering::ORDERED_STREAM);
            }
        }
        Trigger::Schedule { .. } => needed.push(TICKS_STREAM),
        Trigger::Subject { .. } | Trigger::Invoke | Trigger::Http { .. } => {}
    }
    for stream in needed {
        if js.get_stream(stream).await.is_err() {
            bail!(
                "stream {stream} does not exist (declare it in deploy/streams.toml and run \
                 `patchbay bootstrap`)"
            );
        }
    }
    Ok(())
}

/// How long a trigger's consumer waits for an ack: the whole invocation plus publishing
/// outputs; a crashed node's messages come back to the others after it.
fn ack_wait(limits: &Limits) -> Duration {
    Duration::from_millis(limits.timeout_ms.saturating_mul(2)).max(Duration::from_secs(3))
}

/// Create or update the durable consumer a `stream` or `schedule` trigger reads (for an
/// ordered one, its partitioned copy and partition consumers).
async fn ensure_consumer(
    bus: &Bus,
    name: &Token,
    trigger: &Trigger,
    limits: &Limits,
) -> anyhow::Result<()> {
    if let Trigger::Stream {
        stream,
        subject,
        ordered: Some(ordered),
    } = trigger
    {
        let ack_wait = ack_wait(limits);
        return crate::ordering::ensure(
            bus,
            name,
            stream,
            subject,
            *ordered,
            ack_wait,
            limits.max_deliver,
        )
        .await;
    }
    // Not (or no longer) ordered: drop any partitioned copy of the input.
    crate::ordering::remove(bus, name).await?;
    let subjects = bus.subjects();
    let (stream, filter) = match trigger {
        Trigger::Stream {
            stream, subject, ..
        } => (stream.clone(), subjects.full(subject)),
        Trigger::Schedule { .. } => (
            TICKS_STREAM.to_owned(),
            registry::tick_subject(subjects, name),
        ),
        Trigger::Subject { .. } | Trigger::Invoke | Trigger::Http { .. } => return Ok(()),
    };
    let js = bus.jetstream();
    let stream_handle = js.get_stream(&stream).await.with_context(|| {
        format!("stream {stream} does not exist (declare it in deploy/streams.toml)")
    })?;
    let ack_wait = ack_wait(limits);
    let durable = registry::consumer_name(name);
    stream_handle
        .create_consumer(consumer::pull::Config {
            durable_name: Some(durable.clone()),
            description: Some(format!("trigger of function {name}")),
            filter_subject: filter,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            max_deliver: i64::from(limits.max_deliver),
            max_ack_pending: i64::from(limits.max_concurrency.saturating_mul(4)),
            ..Default::default()
        })
        .await
        .with_context(|| format!("failed to create consumer {durable} on {stream}"))?;
    Ok(())
}

/// The nodes that serve `version` of `name` now (each node answers within `window`); a
/// node whose trigger for it failed does not count.
pub async fn serving_nodes(bus: &Bus, name: &str, version: u32, window: Duration) -> Vec<String> {
    let (serving, _) = version_on_nodes(&node_statuses(bus, window).await, name, version);
    serving
}

/// Of `statuses`: the nodes serving `version` of `name`, and `node: why` for each node
/// where its trigger failed.
fn version_on_nodes(
    statuses: &[NodeStatus],
    name: &str,
    version: u32,
) -> (Vec<String>, Vec<String>) {
    let mut serving = Vec::new();
    let mut failed = Vec::new();
    for status in statuses {
        for f in &status.functions {
            if f.name != name || f.version != version {
                continue;
            }
            match &f.failed {
                Some(why) => failed.push(format!("{}: {why}", status.node)),
                None => serving.push(status.node.clone()),
            }
        }
    }
    (serving, failed)
}

/// Ask every node what it serves until one serves `version` of `name`; the nodes that do.
/// Fails as soon as a node reports the version's trigger failed (the server refused it).
async fn wait_for_version(
    bus: &Bus,
    name: &str,
    version: u32,
    wait: Duration,
) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + wait;
    loop {
        let statuses = node_statuses(bus, Duration::from_millis(300)).await;
        let (serving, failed) = version_on_nodes(&statuses, name, version);
        if !failed.is_empty() {
            bail!(
                "{name} v{version} is stored but its trigger failed on {}",
                failed.join("; ")
            );
        }
        if !serving.is_empty() || Instant::now() >= deadline {
            return Ok(serving);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scatter-gather `patchbay.v1.runtime.status`: every node's answer within `window`.
pub async fn node_statuses(bus: &Bus, window: Duration) -> Vec<NodeStatus> {
    let client = bus.client();
    let inbox = client.new_inbox();
    let Ok(mut sub) = client.subscribe(inbox.clone()).await else {
        return vec![];
    };
    if client
        .publish_with_reply(bus.subjects().runtime_status(), inbox, Bytes::new())
        .await
        .is_err()
    {
        return vec![];
    }
    let mut statuses = Vec::new();
    let end = tokio::time::Instant::now() + window;
    while let Ok(Some(msg)) = tokio::time::timeout_at(end, sub.next()).await {
        if let Ok(status) = serde_json::from_slice::<NodeStatus>(&msg.payload) {
            statuses.push(status);
        }
    }
    statuses.sort_by(|a, b| a.node.cmp(&b.node));
    statuses
}

/// A function's canary with its verdict, as `fn ls --json`/`fn describe --json` print it.
async fn canary_json(store: Option<&kv::Store>, spec: &FunctionSpec) -> serde_json::Value {
    let Some(c) = &spec.canary else {
        return serde_json::Value::Null;
    };
    let verdict = verdict(store, &spec.name, c.version).await;
    json!({ "version": c.version, "percent": c.percent, "auto_rollback": c.auto_rollback,
            "started_at": c.started_at, "verdict": verdict })
}

/// A function's canary in one phrase for the tables: `v2 10%`, `v2 10% rolled back`.
async fn canary_text(store: Option<&kv::Store>, spec: &FunctionSpec) -> String {
    let Some(c) = &spec.canary else {
        return "-".into();
    };
    match verdict(store, &spec.name, c.version).await {
        Some(v) => format!(
            "v{} {}% rolled back by {} ({:.1}% vs {:.1}% errors)",
            c.version,
            c.percent,
            v.node,
            v.canary_error_rate * 100.0,
            v.stable_error_rate * 100.0
        ),
        None => format!("v{} {}%", c.version, c.percent),
    }
}

/// How long `fn ls` and `fn describe` collect the nodes' answers.
const NODES_WINDOW: Duration = Duration::from_millis(300);

/// The nodes that have `name` loaded, each with what it reports of it (by node name).
fn nodes_of<'a>(
    statuses: &'a [NodeStatus],
    name: &str,
) -> Vec<(&'a str, &'a patchbay_host::ServedFunction)> {
    statuses
        .iter()
        .flat_map(|s| {
            s.functions
                .iter()
                .filter(move |f| f.name == name)
                .map(move |f| (s.node.as_str(), f))
        })
        .collect()
}

/// `name` on every node, as `fn ls --json`/`fn describe --json` print it: `state` is
/// `serving`, or `failed` with the `reason` (the server refused the trigger's subscription).
fn nodes_json(statuses: &[NodeStatus], name: &str) -> serde_json::Value {
    nodes_of(statuses, name)
        .into_iter()
        .map(|(node, f)| {
            json!({ "node": node, "version": f.version, "trigger": f.trigger, "canary": f.canary,
                    "state": if f.failed.is_some() { "failed" } else { "serving" },
                    "reason": f.failed })
        })
        .collect()
}

/// `name` on every node in one phrase for `fn ls`: `node-1,node-2 FAILED`, a node serving
/// another version than `active` with it (`node-3 v1`), `-` when no node has it.
fn nodes_text(statuses: &[NodeStatus], name: &str, active: u32) -> String {
    let nodes: Vec<String> = nodes_of(statuses, name)
        .into_iter()
        .map(|(node, f)| {
            let mut text = node.to_owned();
            if f.version != active {
                text.push_str(&format!(" v{}", f.version));
            }
            if f.failed.is_some() {
                text.push_str(" FAILED");
            }
            text
        })
        .collect();
    if nodes.is_empty() {
        "-".into()
    } else {
        nodes.join(",")
    }
}

async fn ls(bus: &Bus, registry: &Registry, json: bool) -> anyhow::Result<()> {
    let specs = registry.list().await?;
    let store = verdict_store(bus).await;
    let nodes = node_statuses(bus, NODES_WINDOW).await;
    if json {
        let mut rows = Vec::new();
        for s in &specs {
            let Ok(v) = s.active_version() else { continue };
            rows.push(
                json!({ "name": s.name, "version": v.version, "digest": v.digest,
                        "trigger": v.trigger.to_string(), "deployed_at": v.deployed_at,
                        "versions": s.versions.len(),
                        "canary": canary_json(store.as_ref(), s).await,
                        "nodes": nodes_json(&nodes, &s.name) }),
            );
        }
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<24} {:>7} {:<14} {:<48} {:<26} {:<24} CANARY",
        "NAME", "VERSION", "DIGEST", "TRIGGER", "DEPLOYED", "NODES"
    );
    for s in &specs {
        if let Ok(v) = s.active_version() {
            println!(
                "{:<24} {:>7} {:<14} {:<48} {:<26} {:<24} {}",
                s.name,
                format!("v{}", v.version),
                &v.digest[..12],
                v.trigger.to_string(),
                v.deployed_at,
                nodes_text(&nodes, &s.name, v.version),
                canary_text(store.as_ref(), s).await
            );
        }
    }
    Ok(())
}

async fn describe(bus: &Bus, registry: &Registry, name: &str, json: bool) -> anyhow::Result<()> {
    let (spec, revision) =
        registry
            .get(name)
            .await?
            .ok_or_else(|| registry::RegistryError::UnknownFunction {
                name: name.to_owned(),
            })?;
    let nodes = node_statuses(bus, NODES_WINDOW).await;
    if json {
        let mut value = serde_json::to_value(&spec)?;
        value["revision"] = revision.into();
        value["canary"] = canary_json(verdict_store(bus).await.as_ref(), &spec).await;
        value["nodes"] = nodes_json(&nodes, &spec.name);
        println!("{value}");
        return Ok(());
    }
    println!(
        "{} (active v{}, registry revision {revision})",
        spec.name, spec.active
    );
    let on_nodes = nodes_of(&nodes, &spec.name);
    if on_nodes.is_empty() {
        println!("nodes    none has it loaded");
    }
    for (node, f) in on_nodes {
        match &f.failed {
            Some(why) => println!(
                "node     {node}  v{}  FAILED  trigger {}: {why}",
                f.version, f.trigger
            ),
            None => println!("node     {node}  v{}  serving", f.version),
        }
    }
    if spec.canary.is_some() {
        println!(
            "canary {}",
            canary_text(verdict_store(bus).await.as_ref(), &spec).await
        );
    }
    for v in spec.versions.iter().rev() {
        let marker = if v.version == spec.active { "*" } else { " " };
        println!(
            "{marker} v{:<4} sha256:{}  {} bytes  deployed {}",
            v.version, v.digest, v.size, v.deployed_at
        );
        println!("        trigger  {}", v.trigger);
        println!(
            "        limits   timeout {}ms, memory {} MiB, concurrency {}, max deliver {}",
            v.limits.timeout_ms,
            v.limits.memory_bytes >> 20,
            v.limits.max_concurrency,
            v.limits.max_deliver
        );
        if !v.publish.is_empty() {
            println!("        publish  {}", v.publish.join(", "));
        }
        for (k, val) in &v.config {
            println!("        config   {k}={val}");
        }
    }
    Ok(())
}

async fn invoke(bus: &Bus, args: InvokeArgs) -> anyhow::Result<()> {
    let name = token(&args.name)?;
    let data = match args.data.strip_prefix('@') {
        Some(path) => std::fs::read(path).with_context(|| format!("cannot read {path}"))?,
        None => args.data.into_bytes(),
    };
    let content_type = if serde_json::from_slice::<serde_json::Value>(&data).is_ok() {
        "application/json"
    } else {
        "application/octet-stream"
    };
    let mut event = CloudEvent::new("/patchbay/cli", args.ty).data(content_type, data);
    if let Some(key) = args.partition_key {
        event = event.partition_key(key);
    }
    let reply = bus
        .request(
            &bus.subjects().fn_invoke(&name),
            &event,
            RequestOptions::timeout(args.timeout),
        )
        .await
        .with_context(|| format!("failed to invoke {name}"))?;
    let body: InvokeReply =
        serde_json::from_slice(&reply.payload).context("unreadable reply from the runtime")?;
    if args.json {
        println!("{}", serde_json::to_string(&body)?);
    } else {
        match &body {
            InvokeReply::Ok {
                version, outputs, ..
            } => {
                eprintln!("{name} v{version}: {} output(s)", outputs.len());
                for o in outputs {
                    println!("{}", serde_json::to_string_pretty(o)?);
                }
            }
            InvokeReply::Failure {
                version, failure, ..
            } => {
                eprintln!(
                    "{name} v{version} declined the event: {}",
                    serde_json::to_string(failure)?
                );
            }
            InvokeReply::Error { kind, message, .. } => {
                eprintln!("{name}: {kind:?}: {message}");
            }
        }
    }
    match body {
        InvokeReply::Ok { .. } => Ok(()),
        InvokeReply::Failure { .. } => std::process::exit(3),
        InvokeReply::Error { .. } => std::process::exit(4),
    }
}

async fn logs(bus: &Bus, name: &str, follow: bool, json: bool) -> anyhow::Result<()> {
    let name = token(name)?;
    let js = bus.jetstream();
    let stream = js
        .get_stream(LOGS_STREAM)
        .await
        .context("no PATCHBAY_LOGS stream")?;
    let filter = bus.subjects().fn_logs(&name);
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .context("cannot read the logs stream")?;
    let mut pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await?;
    let mut out = std::io::stdout().lock();
    while follow || pending > 0 {
        let Some(msg) = messages.next().await else {
            break;
        };
        let msg = msg?;
        pending = msg.info().map(|i| i.pending).unwrap_or(0);
        match serde_json::from_slice::<LogRecord>(&msg.payload) {
            Ok(r) if json => writeln!(out, "{}", serde_json::to_string(&r)?)?,
            Ok(r) => writeln!(
                out,
                "{} {:<5} {} v{} [{}] {}",
                format_millis(r.time_ms),
                r.level,
                r.node,
                r.version,
                r.event_id,
                r.message
            )?,
            Err(_) => writeln!(out, "{}", String::from_utf8_lossy(&msg.payload))?,
        }
        out.flush()?;
    }
    Ok(())
}

async fn rollback(
    bus: &Bus,
    registry: &Registry,
    name: &str,
    to: Option<u32>,
    json: bool,
) -> anyhow::Result<()> {
    let mut dropped = None;
    let spec = registry
        .update(name, |current| {
            let mut spec = current.ok_or_else(|| registry::RegistryError::UnknownFunction {
                name: name.to_owned(),
            })?;
            dropped = spec.canary.as_ref().map(|c| c.version);
            spec.rollback(to)?;
            Ok(spec)
        })
        .await?;
    let version = spec.active_version()?;
    let name_token = token(name)?;
    ensure_consumer(bus, &name_token, &version.trigger, &version.limits).await?;
    let serving = wait_for_version(bus, name, spec.active, Duration::from_secs(10)).await;
    if let Some(canary) = dropped {
        clear_verdict(bus, name, canary).await;
        wait_until_no_canary(bus, name, canary, Duration::from_secs(10)).await;
    }
    let serving = serving?;
    if json {
        println!(
            "{}",
            json!({ "name": name, "version": spec.active, "dropped_canary": dropped,
                    "nodes": serving })
        );
    } else {
        if let Some(canary) = dropped {
            println!("{name}: canary v{canary} dropped");
        }
        println!(
            "{name} now serves v{} (sha256:{})",
            spec.active,
            &version.digest[..12]
        );
    }
    Ok(())
}

async fn promote(bus: &Bus, registry: &Registry, name: &str, json: bool) -> anyhow::Result<()> {
    let spec = registry
        .update(name, |current| {
            let mut spec = current.ok_or_else(|| registry::RegistryError::UnknownFunction {
                name: name.to_owned(),
            })?;
            spec.promote()?;
            Ok(spec)
        })
        .await?;
    let version = spec.active_version()?;
    // The consumer now follows the promoted version's limits.
    ensure_consumer(bus, &token(name)?, &version.trigger, &version.limits).await?;
    clear_verdict(bus, name, spec.active).await;
    let serving = wait_for_version(bus, name, spec.active, Duration::from_secs(10)).await?;
    if json {
        println!(
            "{}",
            json!({ "name": name, "version": spec.active, "nodes": serving })
        );
    } else {
        println!(
            "{name}: canary v{} promoted, it now serves all traffic (sha256:{})",
            spec.active,
            &version.digest[..12]
        );
    }
    Ok(())
}

/// The canary verdicts bucket, when the bootstrap created it.
async fn verdict_store(bus: &Bus) -> Option<kv::Store> {
    bus.jetstream()
        .get_key_value(patchbay_registry::canary::VERDICTS_BUCKET)
        .await
        .ok()
}

/// The auto-rollback verdict on `version` of `name`, if any.
async fn verdict(store: Option<&kv::Store>, name: &str, version: u32) -> Option<Verdict> {
    let entry = store?
        .get(patchbay_registry::canary::verdict_key(name, version))
        .await
        .ok()??;
    serde_json::from_slice(&entry).ok()
}

/// Forget the verdict on `version` of `name` (its canary ended).
async fn clear_verdict(bus: &Bus, name: &str, version: u32) {
    if let Some(store) = verdict_store(bus).await {
        let _ = store
            .purge(patchbay_registry::canary::verdict_key(name, version))
            .await;
    }
}

/// Ask every node until none routes to canary `version` of `name` any more.
async fn wait_until_no_canary(bus: &Bus, name: &str, version: u32, wait: Duration) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let statuses = node_statuses(bus, Duration::from_millis(300)).await;
        if !statuses
            .iter()
            .flat_map(|s| &s.functions)
            .any(|f| f.name == name && f.canary == Some(version))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ask every node until one routes to canary `version` of `name`; the nodes that do.
async fn wait_for_canary(bus: &Bus, name: &str, version: u32, wait: Duration) -> Vec<String> {
    let deadline = Instant::now() + wait;
    loop {
        let serving: Vec<String> = node_statuses(bus, Duration::from_millis(300))
            .await
            .into_iter()
            .filter(|s| {
                s.functions
                    .iter()
                    .any(|f| f.name == name && f.canary == Some(version))
            })
            .map(|s| s.node)
            .collect();
        if !serving.is_empty() || Instant::now() >= deadline {
            return serving;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn rm(bus: &Bus, registry: &Registry, name: &str, purge: bool) -> anyhow::Result<()> {
    let name = token(name)?;
    let spec = registry.get(name.as_str()).await?.map(|(s, _)| s);
    registry.remove(name.as_str()).await?;
    let js = bus.jetstream();
    if let Some(spec) = spec {
        for stream in spec
            .versions
            .iter()
            .filter_map(|v| match &v.trigger {
                Trigger::Stream { stream, .. } => Some(stream.clone()),
                Trigger::Schedule { .. } => Some(TICKS_STREAM.to_owned()),
                _ => None,
            })
            .collect::<std::collections::BTreeSet<_>>()
        {
            if let Ok(s) = js.get_stream(&stream).await {
                let _ = s.delete_consumer(&registry::consumer_name(&name)).await;
            }
        }
    }
    crate::ordering::remove(bus, &name).await?;
    if purge {
        // Its keys only: the bucket holds every function's state.
        registry::purge_state(&js, &name)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    println!("removed {name}");
    Ok(())
}

/// One dead letter as listed.
fn dlq_row(seq: u64, headers: Option<&async_nats::HeaderMap>) -> serde_json::Value {
    let get = |n: &str| {
        headers
            .and_then(|h| h.get(n))
            .map(|v| v.as_str().to_owned())
    };
    json!({
        "seq": seq,
        "function": get(dlq::FUNCTION),
        "version": get(dlq::VERSION),
        "attempts": get(dlq::ATTEMPTS),
        "error": get(dlq::ERROR),
        "subject": get(dlq::SUBJECT),
        "trace_id": get(dlq::TRACE_ID),
        "time_ms": get(dlq::TIME),
        "event_id": get("ce-id"),
    })
}

/// Every dead letter of `function` (or all), oldest first.
async fn dead_letters(
    bus: &Bus,
    function: Option<&Token>,
) -> anyhow::Result<Vec<(u64, async_nats::jetstream::message::StreamMessage)>> {
    let js = bus.jetstream();
    let stream = js
        .get_stream(DLQ_STREAM)
        .await
        .context("no PATCHBAY_DLQ stream")?;
    let filter = match function {
        Some(f) => bus.subjects().dlq(f),
        None => bus.subjects().dlq_all(),
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter,
            ..Default::default()
        })
        .await?;
    let mut pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::new();
    while pending > 0 {
        let Some(msg) = messages.next().await else {
            break;
        };
        let msg = msg?;
        let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        pending = info.pending;
        let seq = info.stream_sequence;
        let raw = stream.get_raw_message(seq).await?;
        out.push((seq, raw));
    }
    Ok(out)
}

async fn dlq_command(bus: &Bus, command: DlqCommand) -> anyhow::Result<()> {
    let js = bus.jetstream();
    match command {
        DlqCommand::Ls { name, json } => {
            let function = name.as_deref().map(token).transpose()?;
            let rows: Vec<_> = dead_letters(bus, function.as_ref())
                .await?
                .iter()
                .map(|(seq, m)| dlq_row(*seq, Some(&m.headers)))
                .collect();
            if json {
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:>6} {:<20} {:>8} {:<36} ERROR",
                    "SEQ", "FUNCTION", "ATTEMPTS", "EVENT"
                );
                for r in rows {
                    let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
                    println!(
                        "{:>6} {:<20} {:>8} {:<36} {}",
                        r["seq"],
                        s("function"),
                        s("attempts"),
                        s("event_id"),
                        s("error")
                    );
                }
            }
        }
        DlqCommand::Show { seq, json } => {
            let stream = js.get_stream(DLQ_STREAM).await?;
            let m = stream
                .get_raw_message(seq)
                .await
                .with_context(|| format!("no dead letter with sequence {seq}"))?;
            let headers: BTreeMap<String, String> = m
                .headers
                .iter()
                .map(|(k, v)| {
                    let k: &str = k.as_ref();
                    (
                        k.to_owned(),
                        v.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(", "),
                    )
                })
                .collect();
            let body = String::from_utf8_lossy(&m.payload).into_owned();
            if json {
                println!(
                    "{}",
                    json!({ "seq": seq, "subject": m.subject.as_str(), "headers": headers, "body": body })
                );
            } else {
                println!("seq {seq} on {}", m.subject);
                for (k, v) in &headers {
                    println!("{k}: {v}");
                }
                println!("\n{body}");
            }
        }
        DlqCommand::Replay { seqs, all } => {
            let stream = js.get_stream(DLQ_STREAM).await?;
            let targets: Vec<(u64, async_nats::jetstream::message::StreamMessage)> = match all {
                Some(name) => dead_letters(bus, Some(&token(&name)?)).await?,
                None => {
                    let mut v = Vec::new();
                    for seq in seqs {
                        let m = stream
                            .get_raw_message(seq)
                            .await
                            .with_context(|| format!("no dead letter with sequence {seq}"))?;
                        v.push((seq, m));
                    }
                    v
                }
            };
            for (seq, m) in targets {
                let subject = m
                    .headers
                    .get(dlq::SUBJECT)
                    .map(|v| v.as_str().to_owned())
                    .with_context(|| {
                        format!("dead letter {seq} does not say where it came from")
                    })?;
                let mut headers = dlq::original_headers(&m.headers);
                // A fresh de-duplication id: the original one would be dropped as a
                // duplicate if it is still inside the stream's window.
                headers.insert(
                    async_nats::header::NATS_MESSAGE_ID,
                    format!("replay:{seq}").as_str(),
                );
                let ack = js
                    .publish_with_headers(subject.clone(), headers, m.payload.clone())
                    .await;
                match ack {
                    Ok(ack) => {
                        ack.await.with_context(|| {
                            format!("replay of {seq} to {subject} was not stored")
                        })?;
                    }
                    Err(e) => bail!("failed to replay {seq} to {subject}: {e}"),
                }
                stream.delete_message(seq).await.with_context(|| {
                    format!("replayed {seq} but could not remove it from the DLQ")
                })?;
                println!("replayed {seq} to {subject}");
            }
        }
    }
    Ok(())
}

/// The bucket holding every function's state (declared in deploy/streams.toml).
async fn state_store(bus: &Bus) -> anyhow::Result<kv::Store> {
    let bucket = registry::FUNCTION_STATE_BUCKET;
    bus.jetstream()
        .get_key_value(bucket)
        .await
        .with_context(|| format!("no function state bucket {bucket} (run `patchbay bootstrap`)"))
}

/// How long `fn kv ls` may take to list a function's keys.
const KV_LIST_LIMIT: Duration = Duration::from_secs(10);

async fn kv_command(bus: &Bus, registry: &Registry, command: KvCommand) -> anyhow::Result<()> {
    match command {
        KvCommand::Get { name, key, json } => {
            let name = token(&name)?;
            patchbay_engine::capabilities::validate_kv_key(&key).map_err(|_| {
                anyhow::anyhow!(
                    "invalid key {key:?}: keys are letters, digits and `-_=.`, without a \
                     leading, trailing or doubled dot"
                )
            })?;
            let store = state_store(bus).await?;
            let entry = store
                .entry(registry::state_key(&name, &key))
                .await
                .with_context(|| format!("failed to read key {key:?} of function {name}"))?
                .filter(|e| e.operation == kv::Operation::Put)
                .with_context(|| format!("function {name} has no key {key:?}"))?;
            if json {
                // Text stays readable; anything else is hex so no byte is lost.
                let value = match std::str::from_utf8(&entry.value) {
                    Ok(text) => json!({ "value": text }),
                    Err(_) => json!({ "value_hex": hex::encode(&entry.value) }),
                };
                let mut row = json!({ "function": name.as_str(), "key": key,
                                      "revision": entry.revision, "bytes": entry.value.len() });
                if let (Some(row), Some(value)) = (row.as_object_mut(), value.as_object()) {
                    row.extend(value.clone());
                }
                println!("{row}");
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(&entry.value)?;
                if !entry.value.ends_with(b"\n") {
                    writeln!(out)?;
                }
                out.flush()?;
            }
        }
        KvCommand::Ls { name, json } => {
            let name = token(&name)?;
            let store = state_store(bus).await?;
            let keys = registry::state_keys(bus.client(), &store, &name, KV_LIST_LIMIT)
                .await
                .map_err(anyhow::Error::msg)?;
            // A removed function's state stays readable until `fn rm --purge`; a name
            // that was never deployed is a mistake worth saying.
            if keys.is_empty() && registry.get(name.as_str()).await?.is_none() {
                bail!(
                    "function {name} is not deployed and has no keys in {}",
                    registry::FUNCTION_STATE_BUCKET
                );
            }
            if json {
                println!("{}", json!(keys));
            } else {
                for key in keys {
                    println!("{key}");
                }
            }
        }
    }
    Ok(())
}
