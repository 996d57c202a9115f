//! [`ServiceContext`]: what a process hands each service it runs, so that one entry-point
//! shape (`serve(args, context, shutdown)`) works whether the service has a process of its
//! own or shares one with others.

use crate::{Health, Metrics, ReadyFlag};

/// The process-side half of a service's entry point: where its metrics go and where its
/// readiness is reported.
///
/// Alone in a process the service gets the process's registry as is; sharing one, it gets
/// a [`Metrics::for_service`] registry (every series labelled `service="<name>"`) and its
/// readiness checks are named after it, so `/metrics` and `/readyz` tell the services apart.
#[derive(Debug, Clone)]
pub struct ServiceContext {
    service: String,
    metrics: Metrics,
    health: Health,
    /// Sharing a process (`None` alone): the `<service>` check, ready once the service has registered
    /// its own (so `/readyz` is not ready before a slow starter has said what it waits for).
    started: Option<ReadyFlag>,
}

impl ServiceContext {
    /// The only service of its process: metrics unlabelled, readiness checks as named.
    #[must_use]
    pub fn alone(service: impl Into<String>, metrics: Metrics, health: Health) -> Self {
        Self {
            service: service.into(),
            metrics,
            health,
            started: None,
        }
    }

    /// One of several services in a process: its own labelled registry inside `process`
    /// (replacing the one an earlier run of the same service had, as a restarted process
    /// would start its counters afresh) and readiness checks named `<service>/<check>`,
    /// plus `<service>` itself, not ready until the service has registered a check.
    pub fn shared(
        service: impl Into<String>,
        process: &Metrics,
        health: Health,
    ) -> crate::Result<Self> {
        let service = service.into();
        Ok(Self {
            metrics: process.for_service(&service)?,
            started: Some(health.check(&service)),
            service,
            health,
        })
    }

    /// The service's name (`gateway`, `routing`, `agents`, `runtime`).
    #[must_use]
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The registry the service registers its metrics in.
    #[must_use]
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A readiness check of this service, initially not ready. `check` names it when the
    /// service runs alone (what `/readyz` always called it); sharing a process it is
    /// `<service>/<check>`.
    #[must_use]
    pub fn readiness(&self, check: &str) -> ReadyFlag {
        match &self.started {
            Some(started) => {
                let flag = self.health.check(&format!("{}/{check}", self.service));
                started.set_ready(true);
                flag
            }
            None => self.health.register(check),
        }
    }

    /// Marks every readiness check of this service not ready (its task has ended).
    pub fn set_unready(&self) {
        if let Some(started) = &self.started {
            started.set_ready(false);
            self.health.set_unready_below(&format!("{}/", self.service));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn services_sharing_a_process_name_their_checks_and_label_their_metrics() {
        let (process, health) = (Metrics::new(), Health::new());
        let routing = ServiceContext::shared("routing", &process, health.clone()).unwrap();
        let alone = ServiceContext::alone("agents", Metrics::new(), health.clone());
        let _ = routing.readiness("consumer");
        let _ = alone.readiness("agents-consumers");
        assert_eq!(health.not_ready(), ["routing/consumer", "agents-consumers"]);
        let gateway = ServiceContext::shared("gateway", &process, health.clone()).unwrap();
        assert_eq!(
            health.not_ready().last().map(String::as_str),
            Some("gateway"),
            "a service that has not registered its checks yet is not ready"
        );
        let _ = gateway.readiness("registry");
        assert!(!health.not_ready().contains(&"gateway".to_owned()));
        routing
            .metrics()
            .counter_vec("patchbay_x_total", "X.", &[])
            .unwrap()
            .with_label_values::<&str>(&[])
            .inc();
        let (_, body) = process.encode(None);
        assert!(
            body.contains("patchbay_x_total{service=\"routing\"} 1"),
            "{body}"
        );
    }
}
