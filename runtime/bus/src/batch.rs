//! Durable batch publish: many messages to one stream, stored with one commit instead of
//! one per message. Under `sync_interval: always` a single publish costs the server one
//! fsync; an atomic batch costs about four whatever its length (nats-server 2.15 stages an
//! R1 file stream's batch in a temporary store: two directory fsyncs and one of the staged
//! block, then the commit's), and about 5 ms against 0.75 ms for one message on an idle
//! server, so batches pay off from about ten messages (`patchbay-bench --suite agents`).
//!
//! # The protocol (ADR-50, nats-server ≥ 2.12)
//!
//! Every message of a batch carries `Nats-Batch-Id` (one random id per attempt) and
//! `Nats-Batch-Sequence` (1, 2, …). All but the last go out as plain publishes — the
//! server stages them and answers nothing when there is no reply subject — and the last
//! one, with `Nats-Batch-Commit: 1`, is a request: the server checks and stores the whole
//! batch, or none of it, and answers one publish ack (`{"stream", "seq", "batch",
//! "count"}`) or one error. The stream must have `allow_atomic: true`
//! (`deploy/streams.toml`). Because every message is sent on the same connection, the
//! staged messages reach the server before their commit.
//!
//! # What is kept from single publishes
//!
//! * **De-duplication.** Every message has its `Nats-Msg-Id`. A batch holding an id the
//!   stream already stored is refused whole (`10201`, "contains duplicate message id");
//!   that happens when an earlier attempt of the same messages was stored after all (a
//!   commit whose ack was lost) or partly stored through another path. Such a batch is
//!   then published message by message, pipelined, where each duplicate is reported on
//!   its own — so a retried batch never stores anything twice, and the caller still learns
//!   exactly which messages the stream held already.
//! * **Trace context per message.** Headers are the caller's; each message keeps its own
//!   `traceparent` (see [`Durable`]).
//!
//! # Limits and refusals
//!
//! * At most [`MAX_BATCH`] messages per commit (the server's default limit); longer lists
//!   are split into consecutive batches, stored in order. A server configured with a
//!   lower limit refuses with `10199`; the batch is split in halves and the lower size is
//!   kept for the rest of the publisher's life.
//! * Too many batches in flight (`10210`, 50 per stream / 1,000 per server by default):
//!   retried after a short pause, a few times, then reported.
//! * A stream without `allow_atomic` (`10174`): the messages are published pipelined
//!   instead (one ack each), and the stream is remembered as such, so later calls go
//!   straight to the pipelined path.
//! * Anything else the server refuses (incomplete batch, unsupported header, limits) is a
//!   [`BatchError::Refused`] with the server's code and description; a commit that is not
//!   answered in time is a [`BatchError::Timeout`] (stored or not: retry the same
//!   messages, the ids make it safe). Nothing is dropped silently: the caller keeps its
//!   messages until [`BatchPublisher::publish`] returns `Ok`.
//!
//! # Group commit
//!
//! [`GroupCommit`] is for callers that each have a few messages at a time — a runtime
//! node's stream triggers, each invocation with its outputs. Each caller hands its
//! messages over and waits; one task takes everything handed over while the previous
//! commit was in flight (up to a size), stores it as one batch per group, and answers
//! every caller with its own share. Under load batches grow by themselves; unloaded, a
//! lone caller's messages go out at once, with no timer in the way. A batch the server
//! refuses is split: each caller's messages are tried on their own, so one caller's bad
//! message never fails another's.
//!
//! Not here: which messages form a batch, or when to retry — the caller decides (the
//! agents service publishes each engine batch's outputs as one batch per stream and
//! retries until they are stored; a runtime node groups its stream triggers' outputs
//! through a [`GroupCommit`] and naks an input whose outputs were not stored).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{HeaderMap, Request, RequestErrorKind};
use bytes::Bytes;
use serde::Deserialize;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::Bus;

/// The most messages one atomic batch may hold (the server's default `max_batch_size`).
pub const MAX_BATCH: usize = 1000;

/// Header naming the batch of a message.
pub const BATCH_ID: &str = "Nats-Batch-Id";
/// Header giving a message's position in its batch, from 1.
pub const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
/// Header marking the last message of a batch: store the batch.
pub const BATCH_COMMIT: &str = "Nats-Batch-Commit";

/// Server error codes this module acts on (nats-server `errors.json`).
mod code {
    /// `allow_atomic` is off on the stream.
    pub const DISABLED: u64 = 10174;
    /// The batch holds a `Nats-Msg-Id` already stored (or twice).
    pub const DUPLICATE_ID: u64 = 10201;
    /// The batch is longer than the server allows.
    pub const TOO_LARGE: u64 = 10199;
    /// Too many batches in flight on the stream or the server.
    pub const TOO_MANY_INFLIGHT: u64 = 10210;
}

/// One message to store: its subject, its headers (CloudEvent attributes, trace context,
/// hop chain, sender — whatever the caller writes) and payload, and its de-duplication id
/// (written as `Nats-Msg-Id`).
#[derive(Debug, Clone)]
pub struct Durable {
    /// Target subject (the stream is the one capturing it).
    pub subject: String,
    /// Headers as the caller built them.
    pub headers: HeaderMap,
    /// Payload.
    pub payload: Bytes,
    /// `Nats-Msg-Id`: stable across retries, unique per message.
    pub id: String,
}

/// How a list of messages was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In atomic batches: one commit per batch.
    Atomic,
    /// One publish and one ack per message (no `allow_atomic`, or a batch with a
    /// duplicate id).
    Pipelined,
}

impl Mode {
    /// The `mode` label of `patchbay_bus_stored_per_commit`.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Atomic => "atomic",
            Self::Pipelined => "pipelined",
        }
    }
}

/// What the stream reported for one [`BatchPublisher::publish`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// Commits made: one per atomic batch, one per pipelined message.
    pub commits: usize,
    /// Messages stored in atomic batches.
    pub atomic: usize,
    /// Messages published one by one.
    pub pipelined: usize,
    /// Indices (into the list given) of messages the stream already held, by their id.
    pub duplicates: Vec<usize>,
}

/// Why a batch was not stored. The caller still has every message: retrying the same
/// list is safe (ids de-duplicate).
#[derive(Debug, Error)]
pub enum BatchError {
    /// The server refused the batch, with its reason.
    #[error("stream {stream} refused a batch of {messages} messages: {description} (code {code})")]
    Refused {
        /// The stream, as the server named it (or the first subject when it did not).
        stream: String,
        /// Messages in the refused batch.
        messages: usize,
        /// The JetStream error code (`err_code`).
        code: u64,
        /// The server's description.
        description: String,
    },
    /// The commit was not answered in time; the batch may or may not be stored.
    #[error(
        "no answer to the commit of a batch to {subject} within {timeout:?}: it may or may not be stored"
    )]
    Timeout {
        /// Subject of the committing message.
        subject: String,
        /// How long the commit was waited for.
        timeout: Duration,
    },
    /// No stream captures the subject.
    #[error("no stream captures {subject}")]
    NoStream {
        /// The subject.
        subject: String,
    },
    /// A message is larger than the server accepts.
    #[error("message to {subject} is {size} bytes, over the {max}-byte limit")]
    TooLarge {
        /// The subject.
        subject: String,
        /// Size in bytes (payload plus headers, approximately).
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The connection failed, or an ack could not be read.
    #[error("batch publish to {subject} failed: {reason}")]
    Nats {
        /// The subject.
        subject: String,
        /// The underlying message.
        reason: String,
    },
}

/// The answer to a commit (or to a pipelined publish).
#[derive(Debug, Deserialize)]
struct Ack {
    #[serde(default)]
    stream: String,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// Publishes lists of [`Durable`] messages as atomic batches. Cheap to clone; clones share
/// what they learned about the streams.
#[derive(Debug, Clone)]
pub struct BatchPublisher {
    bus: Bus,
    timeout: Duration,
    learned: Arc<Mutex<Learned>>,
}

/// What the server taught this publisher.
#[derive(Debug)]
struct Learned {
    /// Streams (by name) that refused atomic publish.
    not_atomic: HashSet<String>,
    /// The largest batch the server accepts.
    max_batch: usize,
}

/// Pauses before a batch refused for too many in flight is sent again.
const INFLIGHT_RETRIES: [Duration; 4] = [
    Duration::from_millis(5),
    Duration::from_millis(20),
    Duration::from_millis(80),
    Duration::from_millis(250),
];

impl BatchPublisher {
    /// A publisher on `bus`, waiting up to 10 s for each commit.
    #[must_use]
    pub fn new(bus: &Bus) -> Self {
        Self {
            bus: bus.clone(),
            timeout: Duration::from_secs(10),
            learned: Arc::new(Mutex::new(Learned {
                not_atomic: HashSet::new(),
                max_batch: MAX_BATCH,
            })),
        }
    }

    /// Wait this long for each commit (and each pipelined ack).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// At most `max` messages per atomic batch (clamped to 1..=[`MAX_BATCH`]).
    #[must_use]
    pub fn max_batch(self, max: usize) -> Self {
        self.lock().max_batch = max.clamp(1, MAX_BATCH);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Learned> {
        self.learned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Store `messages`, all captured by the stream named `stream`, in order: in atomic
    /// batches where the stream allows it, pipelined where it does not (see the module
    /// documentation). Returns which messages were duplicates; on an error, nothing is
    /// known to be stored past the last complete batch, and retrying the whole list is
    /// safe.
    pub async fn publish(&self, stream: &str, messages: &[Durable]) -> Result<Stored, BatchError> {
        let mut stored = Stored::default();
        if messages.is_empty() {
            return Ok(stored);
        }
        for m in messages {
            self.check_size(m)?;
        }
        let mut start = 0;
        while start < messages.len() {
            let (not_atomic, max) = {
                let learned = self.lock();
                (learned.not_atomic.contains(stream), learned.max_batch)
            };
            if not_atomic {
                self.pipelined(&messages[start..], start, &mut stored)
                    .await?;
                break;
            }
            let end = (start + max).min(messages.len());
            let chunk = &messages[start..end];
            match self.atomic(chunk).await {
                Ok(()) => {
                    stored.commits += 1;
                    stored.atomic += chunk.len();
                    self.observe(Mode::Atomic, chunk.len());
                    for m in chunk {
                        self.bus.count_published(&m.subject);
                    }
                    start = end;
                }
                Err(Refusal::Server {
                    code,
                    stream: named,
                    description,
                }) if code == code::DISABLED => {
                    tracing::info!(stream = %named_or(&named, stream), %description, "stream does not allow atomic batches; publishing one by one");
                    self.lock().not_atomic.insert(stream.to_owned());
                }
                Err(Refusal::Server { code, .. }) if code == code::DUPLICATE_ID => {
                    // Some of these are stored already: let each one's ack say which.
                    self.pipelined(chunk, start, &mut stored).await?;
                    start = end;
                }
                Err(Refusal::Server { code, .. }) if code == code::TOO_LARGE && chunk.len() > 1 => {
                    let half = chunk.len().div_ceil(2);
                    tracing::info!(limit = half, "the server allows smaller batches; splitting");
                    self.lock().max_batch = half;
                }
                Err(refusal) => return Err(refusal.into_error(stream, chunk)),
            }
        }
        Ok(stored)
    }

    /// Whether the server would take `m` at all (its size against the max payload), so a
    /// caller can refuse one message without failing the batch it would have joined.
    pub fn check(&self, m: &Durable) -> Result<(), BatchError> {
        self.check_size(m)
    }

    /// Send one batch; retried while the server has too many in flight.
    async fn atomic(&self, chunk: &[Durable]) -> Result<(), Refusal> {
        let mut pauses = INFLIGHT_RETRIES.iter();
        loop {
            match self.atomic_once(chunk).await {
                Err(Refusal::Server { code, .. }) if code == code::TOO_MANY_INFLIGHT => {
                    let Some(pause) = pauses.next() else {
                        return self.atomic_once(chunk).await;
                    };
                    tokio::time::sleep(*pause).await;
                }
                other => return other,
            }
        }
    }

    async fn atomic_once(&self, chunk: &[Durable]) -> Result<(), Refusal> {
        let client = self.bus.client();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let last = chunk.len() - 1;
        for (i, m) in chunk.iter().enumerate() {
            let mut headers = m.headers.clone();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, m.id.as_str());
            headers.insert(BATCH_ID, id.as_str());
            headers.insert(BATCH_SEQUENCE, (i + 1).to_string().as_str());
            if i < last {
                client
                    .publish_with_headers(m.subject.clone(), headers, m.payload.clone())
                    .await
                    .map_err(|e| Refusal::Nats(m.subject.clone(), e.to_string()))?;
                continue;
            }
            headers.insert(BATCH_COMMIT, "1");
            let request = Request::new()
                .headers(headers)
                .payload(m.payload.clone())
                .timeout(Some(self.timeout));
            let reply = client
                .send_request(m.subject.clone(), request)
                .await
                .map_err(|e| Refusal::request(&e, &m.subject, self.timeout))?;
            let ack: Ack = serde_json::from_slice(&reply.payload).map_err(|e| {
                Refusal::Nats(m.subject.clone(), format!("unreadable commit ack: {e}"))
            })?;
            if let Some(error) = ack.error {
                return Err(Refusal::Server {
                    code: error.err_code,
                    stream: ack.stream,
                    description: error.description,
                });
            }
            let count = ack.count.unwrap_or(0);
            if count != chunk.len() as u64 {
                return Err(Refusal::Nats(
                    m.subject.clone(),
                    format!(
                        "the commit ack counts {count} messages, the batch held {}",
                        chunk.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Publish every message, then wait for every ack, noting duplicates by their index
    /// (`offset` + position) in the caller's list.
    async fn pipelined(
        &self,
        messages: &[Durable],
        offset: usize,
        stored: &mut Stored,
    ) -> Result<(), BatchError> {
        let client = self.bus.client();
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            let mut headers = m.headers.clone();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, m.id.as_str());
            let request = Request::new()
                .headers(headers)
                .payload(m.payload.clone())
                .timeout(Some(self.timeout));
            pending.push(client.send_request(m.subject.clone(), request));
        }
        // The requests are written in order as they are polled; join them all.
        let replies = futures::future::join_all(pending).await;
        for (i, (m, reply)) in messages.iter().zip(replies).enumerate() {
            let reply = reply.map_err(|e| {
                Refusal::request(&e, &m.subject, self.timeout).into_error(&m.subject, &[])
            })?;
            let ack: Ack =
                serde_json::from_slice(&reply.payload).map_err(|e| BatchError::Nats {
                    subject: m.subject.clone(),
                    reason: format!("unreadable publish ack: {e}"),
                })?;
            if let Some(error) = ack.error {
                return Err(BatchError::Refused {
                    stream: named_or(&ack.stream, &m.subject).to_owned(),
                    messages: 1,
                    code: error.err_code,
                    description: error.description,
                });
            }
            if ack.duplicate {
                stored.duplicates.push(offset + i);
            }
            stored.commits += 1;
            stored.pipelined += 1;
            self.observe(Mode::Pipelined, 1);
            self.bus.count_published(&m.subject);
        }
        Ok(())
    }

    fn check_size(&self, m: &Durable) -> Result<(), BatchError> {
        let max = self.bus.max_payload();
        // Room for the id, batch and commit headers.
        let size = crate::client::message_size(&m.headers, &m.payload) + m.id.len() + 120;
        if max > 0 && size > max {
            return Err(BatchError::TooLarge {
                subject: m.subject.clone(),
                size,
                max,
            });
        }
        Ok(())
    }

    fn observe(&self, mode: Mode, messages: usize) {
        if let Some(metrics) = self.bus.metrics() {
            metrics.stored_per_commit(mode.label(), messages);
        }
    }
}

/// One caller's messages waiting for the next group commit.
struct Submission {
    group: String,
    messages: Vec<Durable>,
    done: oneshot::Sender<Result<Stored, BatchError>>,
}

/// Stores what many callers hand over in shared atomic batches (module documentation,
/// "Group commit"). Cheap to clone; the committing task ends when the last clone is
/// dropped.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    submit: mpsc::Sender<Submission>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("group", &self.group)
            .field("messages", &self.messages.len())
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Start the committing task on the current runtime: each commit takes what is
    /// waiting, up to `max_messages` (a submission is never split across commits).
    #[must_use]
    pub fn start(publisher: BatchPublisher, max_messages: usize) -> Self {
        let (submit, queue) = mpsc::channel(4096);
        tokio::spawn(commit_loop(publisher, queue, max_messages.max(1)));
        Self { submit }
    }

    /// Store `messages`, all in the stream of `group` (any key naming one stream: its
    /// name, or the subject filter that captures them), with whatever else is waiting;
    /// returns when they are stored (duplicates indexed into `messages`) or refused.
    pub async fn store(&self, group: &str, messages: Vec<Durable>) -> Result<Stored, BatchError> {
        if messages.is_empty() {
            return Ok(Stored::default());
        }
        let subject = messages[0].subject.clone();
        let (done, answer) = oneshot::channel();
        let gone = || BatchError::Nats {
            subject: subject.clone(),
            reason: "the group commit task has stopped".into(),
        };
        self.submit
            .send(Submission {
                group: group.to_owned(),
                messages,
                done,
            })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn commit_loop(
    publisher: BatchPublisher,
    mut queue: mpsc::Receiver<Submission>,
    max_messages: usize,
) {
    let mut held: Option<Submission> = None;
    loop {
        let first = match held.take() {
            Some(first) => first,
            None => match queue.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut total = first.messages.len();
        let mut round = vec![first];
        while total < max_messages {
            match queue.try_recv() {
                Ok(next) if total + next.messages.len() > max_messages => {
                    held = Some(next);
                    break;
                }
                Ok(next) => {
                    total += next.messages.len();
                    round.push(next);
                }
                Err(_) => break,
            }
        }
        let mut groups: Vec<(String, Vec<Submission>)> = Vec::new();
        for submission in round {
            match groups.iter_mut().find(|(g, _)| *g == submission.group) {
                Some((_, members)) => members.push(submission),
                None => groups.push((submission.group.clone(), vec![submission])),
            }
        }
        futures::future::join_all(
            groups
                .into_iter()
                .map(|(group, members)| commit_group(&publisher, group, members)),
        )
        .await;
    }
}

/// One group's share of a round: one batch for every member; when refused, each member
/// on its own.
async fn commit_group(publisher: &BatchPublisher, group: String, members: Vec<Submission>) {
    if members.len() == 1 {
        let Some(only) = members.into_iter().next() else {
            return;
        };
        let result = publisher.publish(&group, &only.messages).await;
        let _ = only.done.send(result);
        return;
    }
    let all: Vec<Durable> = members
        .iter()
        .flat_map(|m| m.messages.iter().cloned())
        .collect();
    match publisher.publish(&group, &all).await {
        Ok(stored) => {
            let mut start = 0;
            for member in members {
                let end = start + member.messages.len();
                let mine = Stored {
                    commits: stored.commits,
                    atomic: if stored.atomic > 0 {
                        member.messages.len()
                    } else {
                        0
                    },
                    pipelined: if stored.atomic > 0 {
                        0
                    } else {
                        member.messages.len()
                    },
                    duplicates: stored
                        .duplicates
                        .iter()
                        .filter(|&&i| (start..end).contains(&i))
                        .map(|i| i - start)
                        .collect(),
                };
                let _ = member.done.send(Ok(mine));
                start = end;
            }
        }
        Err(e) => {
            let group = group.as_str();
            tracing::info!(group, members = members.len(), error = %e, "a shared batch was refused; storing each caller's messages on their own");
            futures::future::join_all(members.into_iter().map(|member| async move {
                let result = publisher.publish(group, &member.messages).await;
                let _ = member.done.send(result);
            }))
            .await;
        }
    }
}

/// Why one batch attempt failed, before it becomes the caller's [`BatchError`].
#[derive(Debug)]
enum Refusal {
    Server {
        code: u64,
        stream: String,
        description: String,
    },
    Timeout(String, Duration),
    NoStream(String),
    Nats(String, String),
}

impl Refusal {
    /// A request that got no usable answer (no stream, no answer in time, the connection).
    fn request(e: &async_nats::RequestError, subject: &str, timeout: Duration) -> Self {
        match e.kind() {
            RequestErrorKind::NoResponders => Self::NoStream(subject.to_owned()),
            RequestErrorKind::TimedOut => Self::Timeout(subject.to_owned(), timeout),
            _ => Self::Nats(subject.to_owned(), e.to_string()),
        }
    }

    fn into_error(self, stream: &str, chunk: &[Durable]) -> BatchError {
        match self {
            Self::Server {
                code,
                stream: named,
                description,
            } => BatchError::Refused {
                stream: named_or(&named, stream).to_owned(),
                messages: chunk.len(),
                code,
                description,
            },
            Self::Timeout(subject, timeout) => BatchError::Timeout { subject, timeout },
            Self::NoStream(subject) => BatchError::NoStream { subject },
            Self::Nats(subject, reason) => BatchError::Nats { subject, reason },
        }
    }
}

fn named_or<'a>(named: &'a str, fallback: &'a str) -> &'a str {
    if named.is_empty() { fallback } else { named }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_commit_ack_names_its_stream_and_count() {
        let ack: Ack =
            serde_json::from_slice(br#"{"stream":"CC_CALLS","seq":42,"batch":"b1","count":3}"#)
                .unwrap();
        assert_eq!(
            (ack.stream.as_str(), ack.count, ack.error.is_none()),
            ("CC_CALLS", Some(3), true)
        );
    }

    #[test]
    fn a_refusal_keeps_the_servers_code_and_reason() {
        let ack: Ack = serde_json::from_slice(
            br#"{"stream":"X","error":{"code":400,"err_code":10174,"description":"atomic publish is disabled"}}"#,
        )
        .unwrap();
        let error = ack.error.unwrap();
        assert_eq!(
            (error.err_code, error.description.as_str()),
            (code::DISABLED, "atomic publish is disabled")
        );
        let refusal = Refusal::Server {
            code: error.err_code,
            stream: ack.stream,
            description: error.description,
        };
        let message = refusal.into_error("fallback", &[]).to_string();
        assert_eq!(
            message,
            "stream X refused a batch of 0 messages: atomic publish is disabled (code 10174)"
        );
    }

    #[test]
    fn modes_have_their_metric_labels() {
        assert_eq!(
            (Mode::Atomic.label(), Mode::Pipelined.label()),
            ("atomic", "pipelined")
        );
    }
}
