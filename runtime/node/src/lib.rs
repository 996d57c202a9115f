//! `patchbay-node`: any set of Patchbay services in one process, chosen by configuration.
//!
//! The gateway, routing, agents and runtime-node services are libraries with one entry
//! point of the same shape (`serve(args, context, shutdown)`); this crate runs the ones a
//! [`topology`] or `--services` list names, each:
//!
//! * with **its own identity** — its own certificate and mTLS connection, so it has in
//!   this process exactly the permissions it has alone; merging services never widens
//!   anyone's access and extracting one never narrows it ([`launch`]);
//! * in **its own runtime**, supervised — a panic or failure ends that service's run
//!   only: it is reported unready, restarted with backoff, and the others keep serving
//!   ([`supervisor`]);
//! * with **its own metrics and readiness** — series labelled `service="<name>"`,
//!   readiness checks named `<service>/<check>` on the one admin listener.
//!
//! It owns no business logic and no wire format: subjects remain the only contract
//! between services, in one process or many.

pub mod launch;
pub mod supervisor;
pub mod topology;

use std::time::Duration;

use anyhow::Context as _;
use patchbay_telemetry::{Health, Metrics, ServiceContext};
use tokio_util::sync::CancellationToken;

pub use launch::Service;
pub use supervisor::{Backoff, Exit};
pub use topology::{ServiceKind, Topologies};

/// What a node process runs.
#[derive(Debug, Clone)]
pub struct NodePlan {
    /// The services, each configured.
    pub services: Vec<Service>,
    /// Fault injection: services whose first run panics after the given time.
    pub faults: Vec<(ServiceKind, Duration)>,
    /// Restart policy.
    pub backoff: Backoff,
}

impl NodePlan {
    /// Configure `kinds` from their `--service-arg`s and the certificates in `certs_dir`.
    pub fn new(
        kinds: &[ServiceKind],
        service_args: &[(ServiceKind, String)],
        certs_dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let services = kinds
            .iter()
            .map(|&kind| {
                let extra: Vec<String> = service_args
                    .iter()
                    .filter(|(k, _)| *k == kind)
                    .map(|(_, flag)| flag.clone())
                    .collect();
                Service::configure(kind, &extra, certs_dir)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            services,
            faults: Vec::new(),
            backoff: Backoff::default(),
        })
    }
}

/// Run every service of `plan` until `shutdown` resolves, then stop them all (each drains
/// as it would alone) and return. Errors only if a service was still failing at shutdown.
pub async fn run(
    plan: NodePlan,
    metrics: &Metrics,
    health: &Health,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let restarts = metrics
        .counter_vec(
            "patchbay_node_service_restarts_total",
            "Runs of a service that ended unasked (panic, error, early return) and were restarted.",
            &["service"],
        )
        .context("cannot register the node metrics")?;
    let stop = CancellationToken::new();
    let mut supervisors = Vec::new();
    for service in plan.services {
        let kind = service.kind();
        tracing::info!(service = %kind, identity = %service.identity(), "starting service");
        let fault = plan
            .faults
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, d)| *d);
        let (metrics, health) = (metrics.clone(), health.clone());
        let threads = service.threads();
        supervisors.push(tokio::spawn(supervisor::supervise(
            kind.name(),
            threads,
            plan.backoff,
            stop.clone(),
            restarts.clone(),
            move |attempt, stop: CancellationToken| {
                let context = ServiceContext::shared(kind.name(), &metrics, health.clone())?;
                let fault = fault.filter(|_| attempt == 0);
                Ok(supervisor::Run {
                    service: service
                        .clone()
                        .serve(context.clone(), stop.cancelled_owned(), fault),
                    context,
                })
            },
        )));
    }
    shutdown.await;
    tracing::info!("shutting down every service");
    stop.cancel();
    let mut failed = Vec::new();
    for (supervisor, index) in supervisors.into_iter().zip(0..) {
        match supervisor.await {
            Ok(Exit::Stopped) => {}
            Ok(exit) => failed.push(format!("service {index}: {exit:?}")),
            Err(join) => failed.push(join.to_string()),
        }
    }
    anyhow::ensure!(
        failed.is_empty(),
        "services ended badly: {}",
        failed.join("; ")
    );
    Ok(())
}
