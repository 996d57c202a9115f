//! `patchbay-routing`: the call-routing core service — a pure routing engine behind a thin
//! NATS adapter.
//!
//! * [`rules`]: the declarative rules file (TOML; schedules, queues with overflow, tier
//!   boosts, ordered rules and a default), parsed strictly and validated with errors that
//!   name the rule and field;
//! * [`schedule`]: business hours and holidays in an IANA time zone (`chrono-tz`, so
//!   daylight saving is handled; the zone is per schedule);
//! * [`engine`]: [`Rules::decide`] — call, optional customer, instant in; [`Decision`]
//!   out. No I/O and no clock;
//! * [`reload`]: hot reload of the rules file (poll; a broken edit keeps the old rules);
//! * [`nats`]: the adapter — binds (never creates) the durable consumer `routing` on
//!   `CC_CALLS`, looks the customer up on `cc.v1.customers.lookup` within a timeout that
//!   never outlives the incoming `patchbay-deadline` (falling back to the default tier
//!   when the lookup is slow, absent or broken), publishes `cc.v1.calls.<call>.routed` or
//!   `.closed` (seq 1, `partitionkey` = call id, trace continued, id derived from the
//!   input so redeliveries are stored once), then acks;
//! * [`run`]: the service as a library, so one process can host several services;
//!   [`service`]: its flags and entry point, the shape every Patchbay service shares.
//!
//! Not here: queueing, agent selection, overflow execution and relaxation timers (the
//! agents service acts on what routing decides); stream and consumer creation (the admin
//! bootstrap, `deploy/streams.toml`); the customer data itself (the `customer-lookup`
//! function).

pub mod engine;
pub mod metrics;
pub mod nats;
pub mod reload;
pub mod rules;
pub mod schedule;
pub mod service;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::PullConsumer;
use patchbay_bus::discovery::{EndpointReport, Registration};
use patchbay_bus::resilience::Resilience;
use patchbay_bus::{BusConfig, Token};
use patchbay_protocol::{CallEvent, CcSubjects};
use patchbay_telemetry::{Metrics, ReadyFlag};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use engine::{Closure, Decision, DecisionEvent, Routing};
pub use metrics::RoutingMetrics;
pub use reload::{RulesHandle, RulesWatcher};
pub use rules::{Problem, Rules, RulesError};

/// The stream routing consumes.
pub const STREAM: &str = "CC_CALLS";
/// The durable consumer routing binds to (declared in `deploy/streams.toml`).
pub const CONSUMER: &str = "routing";
/// The service's own name: dead letters it writes go to `patchbay.v1.dlq.routing`.
pub const SERVICE_NAME: &str = "routing";
/// The NATS micro service name (answers `$SRV.PING|INFO|STATS.patchbay-routing`), the
/// binary's name like every Patchbay component's.
pub const DISCOVERY_NAME: &str = "patchbay-routing";

/// How to run the routing service.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    /// Bus connection (identity `service/routing`).
    pub bus: BusConfig,
    /// The rules file; it must be valid at start, and is reloaded when it changes.
    pub rules_path: PathBuf,
    /// How often the rules file is checked for changes.
    pub reload_interval: Duration,
    /// How long the customer lookup may take (cut further by an incoming deadline).
    pub lookup_timeout: Duration,
    /// The stream holding incoming calls.
    pub stream: String,
    /// The durable consumer to bind to; it must exist.
    pub consumer: String,
    /// Calls handled at once (also the pull batch size).
    pub max_in_flight: usize,
    /// How long shutdown waits for in-flight calls.
    pub drain_timeout: Duration,
    /// The process's metric registry.
    pub metrics: Metrics,
    /// Set ready once bound to the consumer, and not ready again on shutdown.
    pub ready: Option<ReadyFlag>,
}

impl RoutingConfig {
    /// Defaults: reload every 2 s, lookup timeout 250 ms, `CC_CALLS`/`routing`, 64 calls
    /// in flight, 10 s drain, a fresh registry, no readiness flag.
    #[must_use]
    pub fn new(bus: BusConfig, rules_path: impl Into<PathBuf>) -> Self {
        Self {
            bus,
            rules_path: rules_path.into(),
            reload_interval: Duration::from_secs(2),
            lookup_timeout: Duration::from_millis(250),
            stream: STREAM.into(),
            consumer: CONSUMER.into(),
            max_in_flight: 64,
            drain_timeout: Duration::from_secs(10),
            metrics: Metrics::new(),
            ready: None,
        }
    }
}

/// Run the routing service until `shutdown` resolves: then stop pulling, let in-flight
/// calls finish (each stored and acked) within the drain timeout, and return.
pub async fn run(config: RoutingConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics =
        RoutingMetrics::register(&config.metrics).context("cannot register the routing metrics")?;
    let (watcher, rules) = RulesWatcher::load(&config.rules_path)
        .with_context(|| format!("cannot use rules file {}", config.rules_path.display()))?;
    {
        let r = rules.current();
        tracing::info!(
            path = %config.rules_path.display(),
            rules = r.rules.len(),
            queues = r.queues.len(),
            schedules = r.schedules.len(),
            "rules loaded"
        );
    }
    let bus = patchbay_bus::connect(&config.bus)
        .await
        .context("routing cannot connect to NATS")?;
    let cc = CcSubjects::new(bus.subjects().clone());
    let mut consumer: PullConsumer = bus
        .jetstream()
        .get_consumer_from_stream(&config.consumer, &config.stream)
        .await
        .with_context(|| {
            format!(
                "cannot bind to consumer {:?} on stream {:?} (it is created by the admin bootstrap, `patchbay up` / `patchbay bootstrap`)",
                config.consumer, config.stream
            )
        })?;
    check_filter(&mut consumer, &cc.call_all(CallEvent::Incoming)).await;

    // Discovery is a convenience: `register` warns instead of failing, so calls are routed
    // even when the subscriptions are refused.
    let service = {
        let metrics = metrics.clone();
        let subject = cc.call_all(CallEvent::Incoming);
        let consumer = config.consumer.clone();
        patchbay_bus::discovery::register(
            &bus,
            Registration::new(
                DISCOVERY_NAME,
                env!("CARGO_PKG_VERSION"),
                "Patchbay call routing",
            ),
            move || vec![calls_endpoint(&metrics, &subject, &consumer)],
        )
        .await
    };

    // The lookup's timeout, retries and breaker; without policies it is asked once with
    // `--lookup-timeout`.
    let resilience = Resilience::start(&bus, &config.metrics)
        .await
        .context("cannot register the resilience metrics")?;

    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tokio::spawn(watcher.run(
        config.reload_interval,
        metrics.reloads.clone(),
        stop.child_token(),
    ));
    let router = Arc::new(nats::Router {
        bus: bus.clone(),
        dlq_owner: Token::new(SERVICE_NAME).context("service name")?,
        cc,
        rules,
        metrics,
        lookup_timeout: config.lookup_timeout,
        resilience,
    });
    let ready = config.ready.clone();
    let bound = {
        let ready = ready.clone();
        let consumer_name = config.consumer.clone();
        move || {
            tracing::info!(consumer = %consumer_name, "bound to the consumer; routing calls");
            if let Some(ready) = ready {
                ready.set_ready(true);
            }
        }
    };
    let mut consuming = tokio::spawn(router.consume(
        consumer,
        config.max_in_flight,
        tasks.clone(),
        stop.clone(),
        bound,
    ));
    tokio::pin!(shutdown);
    let result = tokio::select! {
        joined = &mut consuming => joined.context("the consume loop panicked").and_then(|r| r),
        () = &mut shutdown => {
            tracing::info!("shutting down: no new calls are pulled");
            stop.cancel();
            consuming.await.context("the consume loop panicked").and_then(|r| r)
        }
    };
    stop.cancel();
    if let Some(ready) = &ready {
        ready.set_ready(false);
    }
    tasks.close();
    if tokio::time::timeout(config.drain_timeout, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?config.drain_timeout,
            "calls still in flight after the drain timeout are abandoned unacked; they will be redelivered (decisions already stored are de-duplicated by id)"
        );
    }
    if let Some(service) = service {
        service.stop().await;
    }
    if let Err(e) = bus.client().flush().await {
        tracing::warn!(error = %e, "flush on shutdown failed");
    }
    tracing::info!("routing stopped");
    result
}

/// The `calls` discovery endpoint: calls decided (plus decisions that could not be
/// stored) since start; errors are rejected calls and failed stores.
fn calls_endpoint(metrics: &RoutingMetrics, subject: &str, consumer: &str) -> EndpointReport {
    use prometheus::core::Collector as _;
    let sum = |vec: &prometheus::IntCounterVec, outcome: Option<&str>| -> u64 {
        vec.collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter(|m| {
                outcome.is_none_or(|o| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == "outcome" && l.value() == o)
                })
            })
            // Counters are integers kept as f64 by the exposition model.
            .map(|m| {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let value = m.get_counter().get_value().max(0.0) as u64;
                value
            })
            .sum()
    };
    let time: f64 = metrics
        .decision_duration
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_histogram().get_sample_sum())
        .sum();
    let (routed, closed, rejected) = (
        sum(&metrics.decisions, Some("routed")),
        sum(&metrics.decisions, Some("closed")),
        sum(&metrics.decisions, Some("rejected")),
    );
    let unstored = sum(&metrics.publish_errors, None);
    EndpointReport {
        name: "calls".into(),
        subject: subject.into(),
        queue_group: consumer.into(),
        requests: sum(&metrics.decisions, None) + unstored,
        errors: rejected + unstored,
        processing_time: Duration::try_from_secs_f64(time).unwrap_or_default(),
        data: Some(serde_json::json!({
            "routed": routed,
            "closed": closed,
            "rejected": rejected,
            "unstored": unstored,
            "lookup_fallbacks": sum(&metrics.lookup_fallbacks, None),
        })),
        ..EndpointReport::default()
    }
}

/// Warn when the consumer does not filter on incoming calls only: routing would then
/// reject every other call event it is handed.
async fn check_filter(consumer: &mut PullConsumer, incoming: &str) {
    let info = match consumer.info().await {
        Ok(info) => info.clone(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the consumer's configuration");
            return;
        }
    };
    let mut filters = info.config.filter_subjects.clone();
    if !info.config.filter_subject.is_empty() {
        filters.push(info.config.filter_subject.clone());
    }
    if filters != [incoming.to_owned()] {
        tracing::warn!(
            ?filters,
            expected = incoming,
            "the routing consumer does not filter on incoming calls only; other events will be rejected"
        );
    }
}
