//! Triggers: what makes a function run. Every trigger has the same shape — a
//! [`TriggerLoop`] with a `KIND` (the metrics label) and a `run` loop that takes messages
//! until its stop token fires — and hands each message to the node's one invocation path.
//!
//! * [`subject`]: core NATS queue group, at most once, lowest latency.
//! * [`stream`]: shared durable consumer, at least once, with retries and dead letters.
//! * [`ordered`]: a `stream` trigger with per-key ordering, one pull loop per partition.
//! * [`schedule`]: cron ticks de-duplicated through a stream, one run per tick cluster-wide.
//! * [`invoke`]: `patchbay.v1.fn.<name>.invoke` request-reply, for every function.
//! * [`status`]: not a trigger; answers `patchbay.v1.runtime.status` scatter-gather.

pub(crate) mod invoke;
pub(crate) mod ordered;
pub(crate) mod schedule;
pub(crate) mod status;
pub(crate) mod stream;
pub(crate) mod subject;

use std::future::Future;
use std::sync::Arc;

use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use patchbay_bus::{CloudEvent, Deadline, Token};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::node::{Deployed, Node, Outcome};
use crate::reply::{ErrorKind, InvokeReply, NODE_HEADER, OUTCOME_HEADER, VERSION_HEADER};
use patchbay_registry::Trigger;

/// One kind of trigger.
pub(crate) trait TriggerLoop: Send + 'static {
    /// Label used in metrics and spans.
    const KIND: &'static str;

    /// Take messages until `stop` fires, then stop taking new ones and return.
    fn run(
        self,
        node: Arc<Node>,
        stop: CancellationToken,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

fn spawn<T: TriggerLoop>(node: Arc<Node>, function: Token, trigger: T, stop: CancellationToken) {
    // Tracked with the invocations, so shutdown also waits for each loop to hand back or
    // hand off what it had buffered after its stop token fired.
    let tasks = node.tasks.clone();
    tasks.spawn(async move {
        if let Err(e) = trigger.run(node, stop).await {
            tracing::error!(function = %function, trigger = T::KIND, error = %e, "trigger stopped");
        }
    });
}

/// Start the trigger of `function`.
pub(crate) fn start(node: Arc<Node>, function: Token, trigger: Trigger, stop: CancellationToken) {
    let subjects = node.bus.subjects().clone();
    match trigger {
        Trigger::Subject { subject } => spawn(
            node,
            function.clone(),
            subject::SubjectTrigger {
                function,
                subject: subjects.full(&subject),
            },
            stop,
        ),
        Trigger::Stream {
            ordered: Some(order),
            ..
        } => spawn(
            node,
            function.clone(),
            ordered::OrderedTrigger {
                function,
                partitions: order.partitions,
            },
            stop,
        ),
        Trigger::Stream { stream, .. } => spawn(
            node,
            function.clone(),
            stream::StreamTrigger {
                function,
                stream,
                kind: "stream",
            },
            stop,
        ),
        Trigger::Schedule { cron } => spawn(
            node,
            function.clone(),
            schedule::ScheduleTrigger { function, cron },
            stop,
        ),
        // Direct invocation is served for every function by one shared subscription;
        // HTTP functions by gateways (the node never gets this far with one).
        Trigger::Invoke | Trigger::Http { .. } => {}
    }
}

/// Handle a core NATS message (subject trigger or direct invoke): run the function, then
/// reply with the outcome if the sender asked for one, else publish the outputs.
pub(crate) async fn handle_core(
    node: Arc<Node>,
    f: Arc<Deployed>,
    msg: Message,
    kind: &'static str,
) {
    let span = node.bus.process_span(&msg.subject, msg.headers.as_ref());
    async move {
        let chain = enter_hop(&node, &f, msg.headers.as_ref());
        let event = match chain.and_then(|chain| Ok((chain, decode(&msg)?))) {
            Ok(decoded) => decoded,
            Err(reason) => {
                node.metrics
                    .bad_input
                    .with_label_values(&[f.name.as_str(), kind])
                    .inc();
                tracing::warn!(%reason, "refused malformed message");
                if let Some(reply) = &msg.reply {
                    let body = InvokeReply::Error {
                        function: f.name.to_string(),
                        version: Some(f.spec.version),
                        kind: ErrorKind::BadInput,
                        message: reason,
                    };
                    send_reply(&node, reply, &body).await;
                }
                return;
            }
        };
        let (chain, (event, deadline)) = event;
        let handled = patchbay_bus::pull::contain_panic(patchbay_bus::hops::scope(chain, async {
            let outcome = node.invoke(&f, &msg.subject, event, deadline, kind).await;
            match (&msg.reply, outcome) {
                (Some(reply), outcome) => {
                    send_reply(&node, reply, &reply_body(&f, outcome)).await;
                }
                (None, Outcome::Ok(outputs)) => publish_core(&node, &outputs, deadline).await,
                (None, Outcome::Failure(failure)) => {
                    tracing::info!(?failure, "function declined a fire-and-forget event");
                }
                (None, Outcome::Error(kind, message)) => {
                    tracing::warn!(?kind, %message, "invocation failed");
                }
            }
        }))
        .await;
        if let Err(reason) = handled {
            // At most once: nothing to redeliver, but the sender hears why.
            tracing::error!(%reason, "handling a message panicked");
            if let Some(reply) = &msg.reply {
                let body = InvokeReply::Error {
                    function: f.name.to_string(),
                    version: Some(f.spec.version),
                    kind: ErrorKind::Internal,
                    message: reason,
                };
                send_reply(&node, reply, &body).await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// The hop chain for running `f` on a message with `headers` (see
/// [`patchbay_bus::hops`]), or why the message is refused: it has passed through as many
/// handlers as the bus allows, which means a loop.
pub(crate) fn enter_hop(
    node: &Node,
    f: &Deployed,
    headers: Option<&HeaderMap>,
) -> Result<patchbay_bus::hops::HopChain, String> {
    node.bus
        .enter_hop(headers, &format!("fn/{}", f.name))
        .map_err(|refused| refused.to_string())
}

/// The CloudEvent and deadline a message carries, or why it is unusable.
pub(crate) fn decode(msg: &Message) -> Result<(CloudEvent, Option<Deadline>), String> {
    let event = CloudEvent::from_message(msg.headers.as_ref(), &msg.payload)
        .map_err(|e| format!("malformed event: {e}"))?;
    let deadline = Deadline::from_headers(msg.headers.as_ref()).map_err(|e| e.to_string())?;
    Ok((event, deadline))
}

/// The reply body for `outcome`.
pub(crate) fn reply_body(f: &Deployed, outcome: Outcome) -> InvokeReply {
    let function = f.name.to_string();
    let version = f.spec.version;
    match outcome {
        Outcome::Ok(outputs) => InvokeReply::Ok {
            function,
            version,
            outputs: outputs
                .into_iter()
                .map(|(subject, event)| {
                    let mut json = event.to_structured();
                    json["natssubject"] = subject.into();
                    json
                })
                .collect(),
        },
        Outcome::Failure(failure) => InvokeReply::Failure {
            function,
            version,
            failure,
        },
        Outcome::Error(kind, message) => InvokeReply::Error {
            function,
            version: Some(version),
            kind,
            message,
        },
    }
}

/// Send `body` to `reply`.
pub(crate) async fn send_reply(node: &Node, reply: &async_nats::Subject, body: &InvokeReply) {
    let mut headers = HeaderMap::new();
    headers.insert(OUTCOME_HEADER, body.outcome());
    if let Some(v) = body.version() {
        headers.insert(VERSION_HEADER, v.to_string().as_str());
    }
    headers.insert(NODE_HEADER, node.name.as_str());
    headers.insert("Content-Type", "application/json");
    patchbay_bus::trace::inject_span(&tracing::Span::current(), &mut headers);
    let payload = match serde_json::to_vec(body) {
        Ok(p) => Bytes::from(p),
        Err(e) => return tracing::error!(error = %e, "cannot encode reply"),
    };
    if let Err(e) = node
        .bus
        .client()
        .publish_with_headers(reply.clone(), headers, payload)
        .await
    {
        tracing::warn!(error = %e, "cannot send reply");
    }
}

/// Publish outputs with core NATS (at most once, like the trigger that produced them).
pub(crate) async fn publish_core(
    node: &Node,
    outputs: &[(String, CloudEvent)],
    deadline: Option<Deadline>,
) {
    for (subject, event) in outputs {
        if let Err(e) = node.bus.publish(subject, event, deadline).await {
            tracing::warn!(%subject, error = %e, "cannot publish output");
        }
    }
}

/// Publish outputs durably: into the stream that captures each subject with a
/// `Nats-Msg-Id` derived from the function, the input (its source and id) and the
/// output's index ([`CloudEvent::output_dedup_id`]), so a redelivered input stores each
/// output once while two functions fed the same input never drop each other's outputs.
/// Subjects no stream captures go out with core NATS.
///
/// Stored outputs go through the node's group commit ([`patchbay_bus::batch::GroupCommit`]):
/// the outputs of every invocation that finishes while a commit is in flight share the
/// next atomic batch per stream, so a busy trigger pays one fsync per batch rather than
/// per output, and this returns (and the input is acked) only once they are stored.
/// With `--output-batch 0` each output is its own durable publish.
///
/// Which subjects a stream captures comes from the version's spec, resolved by `fn
/// deploy` (workloads may not list streams). Trying JetStream first is no substitute: on
/// a subject without a stream that someone core-subscribes to, the publish is never
/// acknowledged, so it would stall, retry and deliver the output again and again.
pub(crate) async fn publish_durable(
    node: &Node,
    f: &Deployed,
    input: &CloudEvent,
    outputs: &[(String, CloudEvent)],
    deadline: Option<Deadline>,
) -> Result<(), String> {
    // Per stream (named by the filter that captures it), the outputs it stores.
    let mut groups: Vec<(&str, Vec<patchbay_bus::batch::Durable>)> = Vec::new();
    let mut spans = Vec::new();
    for (index, (subject, event)) in outputs.iter().enumerate() {
        let filter = f
            .spec
            .stream_subjects
            .iter()
            .find(|filter| patchbay_engine::capabilities::subject_matches(filter, subject));
        let Some(filter) = filter else {
            node.bus
                .publish(subject, event, deadline)
                .await
                .map_err(|e| e.to_string())?;
            continue;
        };
        let msg_id = input.output_dedup_id(f.name.as_str(), index);
        if node.outputs.is_none() {
            node.bus
                .publish_durable_with_id(subject, event, &msg_id, deadline)
                .await
                .map_err(|e| e.to_string())?;
            continue;
        }
        let span = patchbay_bus::trace::publish_span(subject, &event.id);
        let durable = node
            .bus
            .durable(subject, event, &msg_id, &span, deadline)
            .map_err(|e| e.to_string())?;
        spans.push(span);
        match groups.iter_mut().find(|(g, _)| g == filter) {
            Some((_, members)) => members.push(durable),
            None => groups.push((filter.as_str(), vec![durable])),
        }
    }
    let Some(committer) = &node.outputs else {
        return Ok(());
    };
    let stored = futures::future::join_all(
        groups
            .into_iter()
            .map(|(group, messages)| committer.store(group, messages)),
    )
    .await;
    drop(spans);
    for result in stored {
        result.map_err(|e| e.to_string())?;
    }
    Ok(())
}
