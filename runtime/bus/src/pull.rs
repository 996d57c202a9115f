//! The platform's durable consumer loop, and what every durable consumer does the same
//! way: pull with one configuration ([`messages`]), take a message only when it can start
//! ([`serve`]: routing's calls, a runtime node's stream triggers), hand back messages it
//! pulled but will not start (so another instance takes them at once), pace redeliveries
//! of failed ones, and contain a panic in the handling of one delivery so that it ends as
//! a dead letter instead of a silent loss after the last redelivery.
//!
//! The agents service pulls with [`messages`] too but applies what was delivered in
//! batches, merged from two consumers, in one task (its order matters; see its adapter).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::Stream as PullStream;
use async_nats::jetstream::{AckKind, Message};
use futures::{FutureExt as _, Stream, StreamExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How long one pull request waits on the server before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// Idle heartbeat of a pull request: a missing one means the connection or consumer is
/// gone, reported as an error on the stream.
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);

/// The message stream of `consumer`, pulling up to `batch` messages per request (at least
/// 1), each request renewed every 30 s with 5 s heartbeats.
pub async fn messages(consumer: &PullConsumer, batch: usize) -> Result<PullStream, String> {
    consumer
        .stream()
        .max_messages_per_batch(batch.max(1))
        .heartbeat(PULL_HEARTBEAT)
        .expires(PULL_EXPIRES)
        .messages()
        .await
        .map_err(|e| e.to_string())
}

/// What the handler of [`serve`] says after taking a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Take the next one.
    Continue,
    /// Stop taking messages (the handler has dealt with this one, e.g. nak'ed it).
    Stop,
}

/// Why [`serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// `stop` fired.
    Stopped,
    /// The handler said [`Next::Stop`].
    Halted,
    /// The message stream ended (the consumer is gone).
    StreamEnded,
}

/// Take messages from `messages` while at most `in_flight` are being handled, until
/// `stop` fires: for each, first a slot (so nothing is pulled off the stream before it
/// can start), then `admit()` (e.g. room in a memory budget), then the message, handed
/// to `handle` with its slot — `handle` starts the work (spawned, holding the slot until
/// it is done) and says whether to go on. A pull error is logged and skipped. On return,
/// every message pulled but not started is handed back at once ([`release_unstarted`]);
/// work already started keeps running on the caller's tasks.
pub async fn serve<A, AF, H, HF>(
    name: &str,
    messages: &mut PullStream,
    in_flight: usize,
    stop: &CancellationToken,
    mut admit: A,
    mut handle: H,
) -> Ended
where
    A: FnMut() -> AF,
    AF: Future<Output = ()>,
    H: FnMut(Message, OwnedSemaphorePermit) -> HF,
    HF: Future<Output = Next>,
{
    let slots = Arc::new(Semaphore::new(in_flight.max(1)));
    let ended = loop {
        let slot = tokio::select! {
            () = stop.cancelled() => break Ended::Stopped,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break Ended::Stopped,
            },
        };
        tokio::select! {
            () = stop.cancelled() => break Ended::Stopped,
            () = admit() => {}
        }
        let msg = tokio::select! {
            () = stop.cancelled() => break Ended::Stopped,
            msg = messages.next() => match msg {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    tracing::warn!(consumer = name, error = %e, "pull error");
                    continue;
                }
                None => break Ended::StreamEnded,
            },
        };
        if handle(msg, slot).await == Next::Stop {
            break Ended::Halted;
        }
    };
    // In-flight messages finish and ack on their own; the ones pulled but not started go
    // back now rather than after ack_wait. Anything the server sends after this is
    // redelivered after ack_wait.
    let released = release_unstarted(messages).await;
    if released > 0 {
        tracing::info!(
            consumer = name,
            released,
            "handed back messages pulled but not started"
        );
    }
    ended
}

/// Nak, without delay, every message already buffered in `messages` — pulled from the
/// server but not started — so the server redelivers them at once to another consumer
/// instance instead of after `ack_wait`. Returns how many were handed back. Called when a
/// loop stops taking work (drain).
pub async fn release_unstarted<S, E>(messages: &mut S) -> usize
where
    S: Stream<Item = Result<Message, E>> + Unpin,
{
    let mut released = 0;
    while let Some(Some(Ok(msg))) = messages.next().now_or_never() {
        match msg.ack_with(AckKind::Nak(None)).await {
            Ok(()) => released += 1,
            Err(e) => {
                tracing::warn!(error = %e, "nak failed; the message will be redelivered after ack_wait");
            }
        }
    }
    released
}

/// Run the handling of one delivery, turning a panic into `Err(message)`.
///
/// A panic would otherwise kill the handler's task with the message unacked: the server
/// redelivers it, the handler panics again, and after the last allowed delivery the
/// message is gone with no dead letter. Callers dead-letter on `Err` (with the panic
/// message as the reason), so "a bug in the handler" costs that one message a place in
/// the DLQ, where it can be inspected and replayed once fixed.
///
/// Unwind safety: the future's state is dropped on a panic and never observed again;
/// what it shares with the rest of the process (metrics, the bus) is either lock-free or
/// behind locks that poison, so nothing half-updated is read as if whole.
pub async fn contain_panic<F: Future>(handling: F) -> Result<F::Output, String> {
    AssertUnwindSafe(handling)
        .catch_unwind()
        .await
        .map_err(|panic| panic_message(panic.as_ref()))
}

/// The text of a panic payload (`panic!("…")` gives a `&str` or a `String`).
#[must_use]
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-text payload".to_owned());
    format!("panicked while handling the delivery: {text}")
}

/// Delay before redelivering a failed message on its `delivered`-th delivery: at least
/// `requested` (what the handler asked for), at least 100 ms doubling per delivery, at
/// most 30 s.
#[must_use]
pub fn redelivery_backoff(delivered: u64, requested: Duration) -> Duration {
    let exp =
        Duration::from_millis(100u64.saturating_mul(1 << delivered.saturating_sub(1).min(10)));
    requested.max(exp).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_panic_in_handling_becomes_an_error_with_its_message() {
        let calm = contain_panic(async { 7 }).await;
        assert_eq!(calm, Ok(7));
        let panicked = contain_panic(async {
            if calm.is_ok() {
                panic!("bad header {:?}", "x\ny");
            }
        })
        .await;
        let message = panicked.unwrap_err();
        assert!(message.contains("bad header"), "{message}");
    }

    #[test]
    fn backoff_doubles_per_delivery_within_bounds_and_honours_requests() {
        let ms = Duration::from_millis;
        assert_eq!(redelivery_backoff(1, Duration::ZERO), ms(100));
        assert_eq!(redelivery_backoff(2, Duration::ZERO), ms(200));
        assert_eq!(redelivery_backoff(4, Duration::ZERO), ms(800));
        assert_eq!(redelivery_backoff(1, ms(5_000)), ms(5_000));
        assert_eq!(
            redelivery_backoff(40, Duration::ZERO),
            Duration::from_secs(30)
        );
        assert_eq!(
            redelivery_backoff(1, Duration::MAX),
            Duration::from_secs(30)
        );
    }
}
