//! What every durable consumer loop of the platform does the same way: hand back messages
//! it pulled but will not start (so another instance takes them at once), and pace
//! redeliveries of failed ones.

use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use futures::{FutureExt as _, Stream, StreamExt as _};

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
    use super::*;

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
