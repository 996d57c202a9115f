//! Supervision: each service in its own tokio runtime, restarted with backoff when its
//! task panics or fails, unready meanwhile, while the others keep serving.
//!
//! A fresh runtime per run is what makes a restart clean: when a run ends, its runtime
//! is shut down and every task the service spawned (subscriptions, pull loops, timers)
//! goes with it, so the next run never meets a half-alive predecessor. What one process
//! cannot contain — an abort, a stack overflow, memory exhaustion, a blocking loop that
//! starves a shared allocator — needs process isolation (`--topology split`).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt as _;
use patchbay_telemetry::ServiceContext;
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;

/// How long to wait before restarting a service that ended unasked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Longest delay; each further consecutive failure doubles it up to here.
    pub max: Duration,
    /// A run that lasted this long resets the count of consecutive failures.
    pub reset_after: Duration,
}

impl Default for Backoff {
    /// 200 ms doubling to 30 s; a minute of good running forgives the past.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay before restarting after `failures` consecutive failures (1 = the first).
    #[must_use]
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        self.initial.saturating_mul(1 << doublings).min(self.max)
    }
}

/// How a run of a service ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Returned after the shutdown signal: done.
    Stopped,
    /// Returned an error, or returned without being asked to.
    Failed(String),
    /// Panicked (the message, when it was a string).
    Panicked(String),
}

/// One run of a service: its context (whose checks are marked unready when the run ends)
/// and the future that is the service.
pub struct Run<F> {
    /// The context the run was given.
    pub context: ServiceContext,
    /// The service itself; resolves when it stops.
    pub service: F,
}

/// Runs a service until `shutdown` is cancelled: each run on a fresh runtime with
/// `threads` worker threads, restarted after `backoff` whenever it ends unasked (panic,
/// error, or an early return), counting restarts in `restarts{service}`. `start(attempt,
/// shutdown)` builds each run. Returns how the last run ended.
pub async fn supervise<S, F>(
    name: &str,
    threads: usize,
    backoff: Backoff,
    shutdown: CancellationToken,
    restarts: IntCounterVec,
    mut start: S,
) -> Exit
where
    S: FnMut(u32, CancellationToken) -> anyhow::Result<Run<F>>,
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut failures = 0_u32;
    for attempt in 0_u32.. {
        let began = tokio::time::Instant::now();
        let exit = match start(attempt, shutdown.clone()) {
            Err(error) => Exit::Failed(format!("{error:#}")),
            Ok(run) => {
                let exit = run_once(name, threads, run.service, &shutdown).await;
                run.context.set_unready();
                exit
            }
        };
        if shutdown.is_cancelled() {
            return exit;
        }
        failures = if began.elapsed() >= backoff.reset_after {
            1
        } else {
            failures + 1
        };
        let delay = backoff.delay(failures);
        match &exit {
            Exit::Panicked(message) => {
                tracing::error!(service = name, panic = %message, ?delay, "service panicked; restarting it");
            }
            Exit::Failed(error) => {
                tracing::error!(service = name, %error, ?delay, "service stopped; restarting it");
            }
            Exit::Stopped => {}
        }
        restarts.with_label_values(&[name]).inc();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return exit,
        }
    }
    Exit::Stopped
}

async fn run_once<F>(name: &str, threads: usize, service: F, shutdown: &CancellationToken) -> Exit
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(format!("{name}-worker"))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return Exit::Failed(format!("cannot start a runtime: {error}")),
    };
    // Caught inside the task as well, so the message survives (a JoinError's does not
    // print the payload).
    let handle = runtime.spawn(AssertUnwindSafe(service).catch_unwind());
    let exit = match handle.await {
        Ok(Ok(Ok(()))) if shutdown.is_cancelled() => Exit::Stopped,
        Ok(Ok(Ok(()))) => Exit::Failed("returned without being asked to stop".into()),
        Ok(Ok(Err(error))) => Exit::Failed(format!("{error:#}")),
        Ok(Err(payload)) => Exit::Panicked(panic_message(payload.as_ref())),
        Err(join) => Exit::Panicked(join.to_string()),
    };
    // Everything the run spawned goes with its runtime.
    runtime.shutdown_background();
    exit
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use patchbay_telemetry::{Health, Metrics};

    use super::*;

    fn restarts() -> IntCounterVec {
        IntCounterVec::new(prometheus::Opts::new("r_total", "r"), &["service"]).unwrap()
    }

    #[test]
    fn the_delay_doubles_per_consecutive_failure_up_to_the_cap() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            reset_after: Duration::from_secs(60),
        };
        let delays: Vec<u128> = (1..=6).map(|n| backoff.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_service_is_restarted_unready_meanwhile_and_stops_on_shutdown() {
        let (process, health) = (Metrics::new(), Health::new());
        let shutdown = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let counter = restarts();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
        let supervisor = {
            let (runs, shutdown, health) = (Arc::clone(&runs), shutdown.clone(), health.clone());
            let counter = counter.clone();
            tokio::spawn(async move {
                supervise(
                    "routing",
                    1,
                    Backoff::default(),
                    shutdown,
                    counter,
                    move |attempt, stop| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let context = ServiceContext::shared("routing", &process, health.clone())?;
                        let flag = context.readiness("consumer");
                        let ready_tx = ready_tx.clone();
                        Ok(Run {
                            context,
                            service: async move {
                                flag.set_ready(true);
                                let _ = ready_tx.send(attempt);
                                if attempt < 2 {
                                    panic!("boom {attempt}");
                                }
                                stop.cancelled().await;
                                Ok(())
                            },
                        })
                    },
                )
                .await
            })
        };
        assert_eq!(ready_rx.recv().await, Some(0));
        assert_eq!(ready_rx.recv().await, Some(1));
        assert_eq!(ready_rx.recv().await, Some(2));
        assert!(health.is_ready(), "{:?}", health.checks());
        assert_eq!(health.checks().len(), 2, "a restart reuses the checks");
        shutdown.cancel();
        assert_eq!(supervisor.await.unwrap(), Exit::Stopped);
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(counter.with_label_values(&["routing"]).get(), 2);
        assert!(!health.is_ready(), "a stopped service is not ready");
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_returning_early_counts_as_a_failure() {
        let (process, health) = (Metrics::new(), Health::new());
        let shutdown = CancellationToken::new();
        let stop_after = shutdown.clone();
        let counter = restarts();
        let exit = supervise(
            "agents",
            1,
            Backoff::default(),
            shutdown,
            counter.clone(),
            move |attempt, _| {
                if attempt == 1 {
                    stop_after.cancel();
                }
                Ok(Run {
                    context: ServiceContext::shared("agents", &process, health.clone())?,
                    service: async { Ok(()) },
                })
            },
        )
        .await;
        // The first run returned unasked and was restarted; the second returned after
        // shutdown was asked for: a clean stop.
        assert_eq!(counter.with_label_values(&["agents"]).get(), 1);
        assert_eq!(exit, Exit::Stopped);
    }

    #[tokio::test]
    async fn tasks_a_run_spawned_do_not_outlive_it() {
        let (process, health) = (Metrics::new(), Health::new());
        let shutdown = CancellationToken::new();
        let alive = Arc::new(AtomicU32::new(0));
        let (observe, stop) = (Arc::clone(&alive), shutdown.clone());
        let exit = supervise(
            "runtime",
            1,
            Backoff::default(),
            shutdown,
            restarts(),
            move |_, _| {
                let (alive, spawned) = (Arc::clone(&observe), Arc::clone(&observe));
                let stop = stop.clone();
                Ok(Run {
                    context: ServiceContext::shared("runtime", &process, health.clone())?,
                    service: async move {
                        tokio::spawn(async move {
                            let _guard = Counted::new(spawned);
                            std::future::pending::<()>().await;
                        });
                        while alive.load(Ordering::SeqCst) == 0 {
                            tokio::task::yield_now().await;
                        }
                        stop.cancel();
                        anyhow::bail!("lost the connection")
                    },
                })
            },
        )
        .await;
        assert_eq!(exit, Exit::Failed("lost the connection".into()));
        for _ in 0..100 {
            if alive.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            alive.load(Ordering::SeqCst),
            0,
            "the spawned task was dropped with its runtime"
        );
    }

    struct Counted(Arc<AtomicU32>);

    impl Counted {
        fn new(counter: Arc<AtomicU32>) -> Self {
            counter.fetch_add(1, Ordering::SeqCst);
            Self(counter)
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
