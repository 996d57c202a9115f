//! Request bodies that cannot stall: [`IdleTimeoutBody`] fails a body whose client stops
//! sending (a body shorter than its `Content-Length`, a trickle that pauses) after the
//! configured idle time, with a [`BodyTimeout`] the routes turn into 408.
//!
//! The clock only runs while the handler is waiting for the client: a handler that pauses
//! reading (a function applying back-pressure) is not the client's fault and is never cut
//! off. The total time to read a `/v1` body is bounded separately where it is buffered
//! ([`crate::bus_routes`]).

use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus::IntCounter;
use tokio::time::{Instant, Sleep};

/// The client did not send the rest of the body in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the client sent no more of the request body for {0:?}")]
pub struct BodyTimeout(pub Duration);

impl BodyTimeout {
    /// Whether `error` or any error it wraps is a [`BodyTimeout`].
    #[must_use]
    pub fn is_cause_of(error: &(dyn StdError + 'static)) -> bool {
        let mut next = Some(error);
        while let Some(e) = next {
            if e.is::<Self>() {
                return true;
            }
            next = e.source();
        }
        false
    }
}

/// A request body failing with [`BodyTimeout`] when no data arrives for `idle` while it
/// is being read.
pub struct IdleTimeoutBody {
    inner: Body,
    idle: Duration,
    /// Armed when a read finds nothing to return; `None` until the first wait, so bodies
    /// that arrive at once never create a timer.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether the last poll found nothing (the timer is running).
    waiting: bool,
    timed_out: bool,
    /// Counts the timeouts (`patchbay_gateway_refused_total{reason="body-timeout"}`).
    counter: IntCounter,
}

impl IdleTimeoutBody {
    /// Wrap `inner`.
    #[must_use]
    pub fn new(inner: Body, idle: Duration, counter: IntCounter) -> Self {
        Self {
            inner,
            idle,
            sleep: None,
            waiting: false,
            timed_out: false,
            counter,
        }
    }
}

impl HttpBody for IdleTimeoutBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let idle = this.idle;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        if !this.waiting {
            // The client's clock starts now, not at the previous read.
            this.waiting = true;
            sleep.as_mut().reset(Instant::now() + idle);
        }
        ready!(sleep.as_mut().poll(cx));
        this.timed_out = true;
        this.counter.inc();
        Poll::Ready(Some(Err(BodyTimeout(this.idle).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.timed_out || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    fn counter() -> IntCounter {
        IntCounter::new("t", "t").unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_fails_with_a_timeout_after_the_idle_time() {
        let (tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let mut tx = tx;
        tx.try_send(Ok(Bytes::from_static(b"part"))).unwrap();
        let counted = counter();
        let body = IdleTimeoutBody::new(
            Body::from_stream(rx),
            Duration::from_millis(500),
            counted.clone(),
        );
        let mut stream = Body::new(body).into_data_stream();
        assert_eq!(stream.next().await.unwrap().unwrap(), "part");
        // Nothing more is sent (and `tx` stays open): the paused clock advances to the
        // deadline and the read fails.
        let started = Instant::now();
        let error = stream.next().await.unwrap().unwrap_err();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(500) && waited < Duration::from_millis(600),
            "{waited:?}"
        );
        assert!(BodyTimeout::is_cause_of(&error), "{error}");
        assert_eq!(counted.get(), 1);
        assert!(stream.next().await.is_none());
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_handler_spends_not_reading_does_not_count() {
        let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        tx.try_send(Ok(Bytes::from_static(b"a"))).unwrap();
        let body = IdleTimeoutBody::new(Body::from_stream(rx), Duration::from_secs(1), counter());
        let mut stream = Body::new(body).into_data_stream();
        assert_eq!(stream.next().await.unwrap().unwrap(), "a");
        // The handler is busy for longer than the idle time; the client has sent more
        // meanwhile.
        tokio::time::sleep(Duration::from_secs(5)).await;
        tx.try_send(Ok(Bytes::from_static(b"b"))).unwrap();
        drop(tx);
        assert_eq!(stream.next().await.unwrap().unwrap(), "b");
        assert!(stream.next().await.is_none());
    }

    #[test]
    fn a_wrapped_timeout_is_recognised_and_other_errors_are_not() {
        let wrapped = axum::Error::new(BodyTimeout(Duration::from_secs(1)));
        assert!(BodyTimeout::is_cause_of(&wrapped));
        let other = axum::Error::new(std::io::Error::other("reset"));
        assert!(!BodyTimeout::is_cause_of(&other));
    }
}
