//! The one invocation path every trigger uses: CloudEvent in, the engine in between,
//! outputs out — plus the NATS implementation of the function's imports.
//!
//! Functions see subjects without the installation prefix (so a component runs
//! unchanged in any installation); the prefix is added back on everything they publish.
//! Output events a function leaves without an id get `<input id>.<index>` (stable across
//! redeliveries), and without a source `/patchbay/fn/<name>`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use patchbay_bus::resilience::{AttemptError, CallError, Rejected};
use patchbay_bus::{CloudEvent, Deadline, RequestErrorKind, Subjects};
use serde::{Deserialize, Serialize};

use crate::node::{Deployed, Node, Outcome};
use crate::reply::{ErrorKind, FailureReply};
use patchbay_engine::capabilities::{HostCapabilities, validate_kv_key};
use patchbay_engine::engine::{Invocation, InvokeErrorKind};
use patchbay_engine::limits::MemoryReservation;
use patchbay_engine::world::{BusError, Event, Failure, KvError, Level};

/// Longest a function's `kv.keys()` may take (less when its deadline is sooner).
const KEYS_LIMIT: Duration = Duration::from_secs(5);

/// A `patchbay.v1.fn.<name>.logs` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// When, ms since the Unix epoch.
    pub time_ms: u64,
    /// Function name.
    pub function: String,
    /// Version.
    pub version: u32,
    /// Node that ran it.
    pub node: String,
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// The message.
    pub message: String,
    /// The event being handled.
    pub event_id: String,
    /// Trace id of the invocation, when traced.
    pub trace_id: Option<String>,
}

/// The guest's view of `event`, which arrived on `subject`.
fn to_guest(subjects: &Subjects, subject: &str, event: CloudEvent) -> Event {
    Event {
        subject: subjects.strip(subject).unwrap_or(subject).to_owned(),
        time: event.time_millis(),
        id: event.id,
        source: event.source,
        type_: event.ty,
        content_type: event.data_content_type,
        data: event.data.to_vec(),
        extensions: event.extensions.into_iter().collect(),
    }
}

/// The bus form of a guest event, with the prefixed subject it goes to. Built field by
/// field: an output always gets an id (its own or `fallback_id`), so no UUID or clock
/// read is spent on one that would be replaced.
fn from_guest(
    subjects: &Subjects,
    function: &str,
    fallback_id: impl FnOnce() -> String,
    e: Event,
) -> (String, CloudEvent) {
    let event = CloudEvent {
        id: if e.id.is_empty() { fallback_id() } else { e.id },
        source: if e.source.is_empty() {
            format!("/patchbay/fn/{function}")
        } else {
            e.source
        },
        ty: e.type_,
        time: None,
        data_content_type: e.content_type,
        data_schema: None,
        subject: None,
        extensions: e.extensions.into_iter().collect::<BTreeMap<_, _>>(),
        data: Bytes::from(e.data),
    }
    .with_time_millis(e.time);
    (subjects.full(&e.subject), event)
}

/// Run `f` on `event` (arrived on `subject`) in `memory` reserved from the node's budget
/// (released once the instance is gone).
pub(crate) async fn run(
    node: &Arc<Node>,
    f: &Arc<Deployed>,
    subject: &str,
    event: CloudEvent,
    deadline: Option<Deadline>,
    memory: MemoryReservation,
) -> Outcome {
    let input_id = event.id.clone();
    let capabilities = Arc::new(NatsCapabilities {
        node: Arc::clone(node),
        function: Arc::clone(f),
        deadline,
        span: tracing::Span::current(),
        logs: Mutex::default(),
    });
    let mut invocation = Invocation::new(Arc::clone(&capabilities) as Arc<dyn HostCapabilities>)
        .limits(f.limits)
        .config(Arc::clone(&f.config))
        .allow_publish(f.allow.clone())
        .memory(memory);
    if let Some(d) = deadline {
        match d.remaining(node.bus.clock()) {
            Some(left) => invocation = invocation.deadline(Instant::now() + left),
            None => {
                return Outcome::Error(
                    ErrorKind::DeadlineExceeded,
                    "the event's deadline passed before it could start".into(),
                );
            }
        }
    }
    let guest = to_guest(node.bus.subjects(), subject, event);
    let outcome = f.code.invoke(&node.engine, guest, invocation).await;
    f.metrics
        .instantiate
        .observe(outcome.stats.instantiate.as_secs_f64());
    f.metrics.duration.observe_in(
        (outcome.stats.instantiate + outcome.stats.call).as_secs_f64(),
        &tracing::Span::current(),
    );
    capabilities.flush_logs(&input_id).await;
    match outcome.result {
        Ok(Ok(outputs)) => Outcome::Ok(
            outputs
                .into_iter()
                .enumerate()
                .map(|(i, e)| {
                    from_guest(
                        node.bus.subjects(),
                        f.name.as_str(),
                        || format!("{input_id}.{i}"),
                        e,
                    )
                })
                .collect(),
        ),
        Ok(Err(failure)) => Outcome::Failure(match failure {
            Failure::Retry(r) => FailureReply::Retry {
                after_ms: r.after_ms,
                reason: r.reason,
            },
            Failure::DeadLetter(reason) => FailureReply::DeadLetter { reason },
            Failure::Drop(reason) => FailureReply::Drop { reason },
        }),
        Err(e) => {
            let kind = match e.kind() {
                InvokeErrorKind::DeadlineAlreadyPassed => ErrorKind::DeadlineExceeded,
                InvokeErrorKind::Timeout | InvokeErrorKind::OutOfFuel => ErrorKind::Timeout,
                InvokeErrorKind::OutOfMemory => ErrorKind::OutOfMemory,
                InvokeErrorKind::Trap => ErrorKind::Trap,
                InvokeErrorKind::AtCapacity => ErrorKind::Overloaded,
                InvokeErrorKind::ForbiddenOutput => ErrorKind::ForbiddenOutput,
                InvokeErrorKind::ForeignCode | InvokeErrorKind::Instantiate => ErrorKind::Internal,
            };
            Outcome::Error(kind, e.to_string())
        }
    }
}

/// The function's imports over NATS, for one invocation.
struct NatsCapabilities {
    node: Arc<Node>,
    function: Arc<Deployed>,
    deadline: Option<Deadline>,
    span: tracing::Span,
    logs: Mutex<Vec<(Level, String)>>,
}

impl NatsCapabilities {
    fn event(&self, e: Event) -> (String, CloudEvent) {
        let id = || uuid::Uuid::now_v7().to_string();
        from_guest(self.node.bus.subjects(), self.function.name.as_str(), id, e)
    }

    /// Publish the invocation's log records, in order, after it ran.
    async fn flush_logs(&self, event_id: &str) {
        let logs = std::mem::take(&mut *self.logs.lock().unwrap_or_else(PoisonError::into_inner));
        if logs.is_empty() {
            return;
        }
        let trace_id = patchbay_bus::trace::span_trace_id(&self.span);
        let subject = self.node.bus.subjects().fn_logs(&self.function.name);
        for (level, message) in logs {
            let record = LogRecord {
                time_ms: self.node.bus.clock().now_millis(),
                function: self.function.name.to_string(),
                version: self.function.spec.version,
                node: self.node.name.clone(),
                level: level.as_str().to_owned(),
                message,
                event_id: event_id.to_owned(),
                trace_id: trace_id.clone(),
            };
            if let Ok(body) = serde_json::to_vec(&record)
                && let Err(e) = self
                    .node
                    .bus
                    .client()
                    .publish(subject.clone(), body.into())
                    .await
            {
                tracing::debug!(error = %e, "cannot publish log record");
            }
        }
    }

    async fn kv(&self) -> Result<async_nats::jetstream::kv::Store, KvError> {
        self.node.bucket().await.map_err(KvError::Other)
    }

    /// Where the function's `key` is stored in the shared state bucket: under its own
    /// prefix, `<function>.<key>`. The key is checked here too (not only by the import), so
    /// nothing but a valid key ever follows the prefix: no wildcard, no empty token.
    fn state_key(&self, key: &str) -> Result<String, KvError> {
        validate_kv_key(key)?;
        Ok(patchbay_registry::state_key(&self.function.name, key))
    }
}

fn bus_error(e: &patchbay_bus::PublishError) -> BusError {
    match e {
        patchbay_bus::PublishError::TooLarge { size, .. } => BusError::TooLarge(*size as u64),
        other => BusError::Other(other.to_string()),
    }
}

impl HostCapabilities for NatsCapabilities {
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            let (subject, event) = self.event(event);
            self.node
                .bus
                .publish(&subject, &event, self.deadline)
                .await
                .map_err(|e| bus_error(&e))
        })
    }

    fn request(&self, event: Event, timeout: Duration) -> BoxFuture<'_, Result<Event, BusError>> {
        Box::pin(async move {
            let (subject, event) = self.event(event);
            // Under the target's resilience policy (timeout, retries, breaker), if any. The
            // function waits at most `timeout` for the whole call, retries included: that
            // (or the invocation's own deadline, if sooner) is the call's deadline.
            let deadline = Deadline::effective(self.deadline, self.node.bus.clock(), timeout);
            let result = self
                .node
                .bus
                .request_resilient(
                    &self.node.resilience,
                    &subject,
                    &event,
                    timeout,
                    Some(deadline),
                )
                .await;
            let reply = match result {
                Ok(reply) => reply,
                // The last attempt's error answer is the function's to read.
                Err(CallError::Failed {
                    error: AttemptError::Answered { reply, .. },
                    ..
                }) => *reply,
                Err(CallError::Failed {
                    error: AttemptError::Request(e),
                    ..
                }) => {
                    return Err(match e.kind {
                        RequestErrorKind::TimedOut | RequestErrorKind::DeadlineExceeded => {
                            BusError::Timeout
                        }
                        RequestErrorKind::NoResponders => BusError::NoResponders,
                        RequestErrorKind::TooLarge => BusError::TooLarge(event.data.len() as u64),
                        RequestErrorKind::Other => BusError::Other(e.reason),
                    });
                }
                Err(CallError::Rejected(Rejected::DeadlinePassed)) => {
                    return Err(BusError::Timeout);
                }
                Err(CallError::Rejected(rejected)) => {
                    return Err(BusError::Other(format!(
                        "not sent to {subject}: {rejected}"
                    )));
                }
            };
            // A CloudEvent reply is passed on as such; anything else becomes the data of a
            // reply event, so a function can call plain NATS services too.
            let reply_subject = reply.subject.to_string();
            let event = CloudEvent::from_message(reply.headers.as_ref(), &reply.payload)
                .unwrap_or_else(|_| {
                    let ct = reply
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Content-Type"))
                        .map(|v| v.as_str().to_owned());
                    let mut e = CloudEvent::new("/patchbay/reply", "patchbay.reply.v1");
                    e.data_content_type = ct;
                    e.data = reply.payload.clone();
                    e
                });
            Ok(to_guest(self.node.bus.subjects(), &reply_subject, event))
        })
    }

    fn kv_get(&self, key: String) -> BoxFuture<'_, Result<Option<Vec<u8>>, KvError>> {
        Box::pin(async move {
            let key = self.state_key(&key)?;
            let kv = self.kv().await?;
            kv.get(key)
                .await
                .map(|v| v.map(|b| b.to_vec()))
                .map_err(|e| KvError::Other(e.to_string()))
        })
    }

    fn kv_set(&self, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<u64, KvError>> {
        Box::pin(async move {
            let key = self.state_key(&key)?;
            let kv = self.kv().await?;
            kv.put(key, value.into())
                .await
                .map_err(|e| KvError::Other(e.to_string()))
        })
    }

    fn kv_delete(&self, key: String) -> BoxFuture<'_, Result<(), KvError>> {
        Box::pin(async move {
            let key = self.state_key(&key)?;
            let kv = self.kv().await?;
            kv.delete(key)
                .await
                .map_err(|e| KvError::Other(e.to_string()))
        })
    }

    fn kv_keys(&self) -> BoxFuture<'_, Result<Vec<String>, KvError>> {
        Box::pin(async move {
            let kv = self.kv().await?;
            // Only the function's own keys, without the prefix; within its deadline.
            let limit = match self.deadline {
                Some(d) => d.remaining(self.node.bus.clock()).unwrap_or_default(),
                None => KEYS_LIMIT,
            }
            .min(KEYS_LIMIT);
            patchbay_registry::state_keys(self.node.bus.client(), &kv, &self.function.name, limit)
                .await
                .map_err(KvError::Other)
        })
    }

    fn log(&self, level: Level, message: String) {
        // A span event of the invocation (exported with the trace) ...
        self.span.in_scope(|| match level {
            Level::Trace => tracing::trace!(target: "patchbay::fn", %message),
            Level::Debug => tracing::debug!(target: "patchbay::fn", %message),
            Level::Info => tracing::info!(target: "patchbay::fn", %message),
            Level::Warn => tracing::warn!(target: "patchbay::fn", %message),
            Level::Error => tracing::error!(target: "patchbay::fn", %message),
        });
        // ... and a record on the logs subject, published in order after the call.
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((level, message));
    }
}
