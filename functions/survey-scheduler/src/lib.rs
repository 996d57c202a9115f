//! `survey-scheduler`: schedules a post-call satisfaction survey when a call ends.
//!
//! Trigger: `cc.v1.calls.<call>.ended` (stream CC_CALLS), JSON data such as
//!
//! ```json
//! { "call_id": "c-42", "queue": "billing", "agent": "a-7", "duration_s": 312,
//!   "ended_at_ms": 1767225912000, "customer_id": "cu-9", "language": "en" }
//! ```
//!
//! (every field optional; `duration_ms` is accepted instead of `duration_s`). It emits
//! `cc.v1.surveys.<call>.scheduled` (type `cc.survey.scheduled.v1`) with
//! `send_at_ms = end time + delay_minutes`, where the end time is `ended_at_ms` or else
//! the event's `ce-time`. Publish allow-list: `cc.v1.surveys.*.scheduled`.
//!
//! Config: `delay_minutes` (default 30), `min_duration_s` (default 0): calls shorter than
//! that are dropped (acknowledged and counted, no survey). A call of unknown duration is
//! surveyed. No end time at all, malformed JSON or unparsable config → dead-letter.
//!
//! The computation is a pure function of the event and config (no clock read), so a
//! redelivered event schedules the same survey with the same output id.
//!
//! Payload types are local serde structs until `services/protocol` offers them.

use patchbay_sdk::prelude::*;
use serde::{Deserialize, Serialize};

const MS_PER_MINUTE: u64 = 60_000;

/// `cc.v1.calls.<call>.ended` data (the fields this function reads).
#[derive(Debug, Default, Deserialize)]
struct CallEnded {
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    duration_s: Option<u64>,
    #[serde(default)]
    duration_ms: Option<u64>,
    #[serde(default)]
    ended_at_ms: Option<u64>,
    #[serde(default)]
    customer_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
}

impl CallEnded {
    fn duration_s(&self) -> Option<u64> {
        self.duration_s.or(self.duration_ms.map(|ms| ms / 1000))
    }
}

/// `cc.v1.surveys.<call>.scheduled` data.
#[derive(Debug, PartialEq, Serialize)]
struct SurveyScheduled {
    call_id: String,
    send_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    customer_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    language: Option<String>,
}

/// The deployment's settings.
#[derive(Debug, Clone, Copy)]
struct Settings {
    delay_minutes: u64,
    min_duration_s: u64,
}

/// Decides whether and when to survey the call that `ended` describes. `call` is the call
/// token from the subject; `event_time_ms` the event's `ce-time`.
fn schedule(
    call: &str,
    ended: CallEnded,
    event_time_ms: Option<u64>,
    settings: Settings,
) -> Result<SurveyScheduled, Failure> {
    if let Some(duration) = ended.duration_s()
        && duration < settings.min_duration_s
    {
        return Err(Failure::drop(format!(
            "call {call} lasted {duration} s, under min_duration_s={}",
            settings.min_duration_s
        )));
    }
    let ended_at = ended.ended_at_ms.or(event_time_ms).ok_or_else(|| {
        Failure::dead_letter(format!("call {call} ended without ended_at_ms or ce-time"))
    })?;
    let send_at_ms = ended_at.saturating_add(settings.delay_minutes.saturating_mul(MS_PER_MINUTE));
    Ok(SurveyScheduled {
        call_id: ended.call_id.unwrap_or_else(|| call.to_string()),
        send_at_ms,
        customer_id: ended.customer_id,
        queue: ended.queue,
        agent: ended.agent,
        language: ended.language,
    })
}

struct SurveyScheduler;

impl Handler for SurveyScheduler {
    fn handle(e: Event) -> Result<Vec<Event>, Failure> {
        let settings = Settings {
            delay_minutes: config::parse_or("delay_minutes", 30)?,
            min_duration_s: config::parse_or("min_duration_s", 0)?,
        };
        // Subject tokens are valid subject tokens by construction; payload ids may not be.
        let call = e
            .subject_token_from_end(1)
            .ok_or_else(|| Failure::dead_letter(format!("unexpected subject {}", e.subject)))?
            .to_string();
        let ended: CallEnded = if e.data.is_empty() {
            CallEnded::default()
        } else {
            e.json()?
        };
        let survey = schedule(&call, ended, e.time, settings)?;
        info!("survey for call {call} at {} ms", survey.send_at_ms);
        let subject = format!("{}.surveys.{call}.scheduled", e.subject_head(3));
        Ok(vec![
            Event::new(subject, "cc.survey.scheduled.v1")
                .follows(&e)
                .with_json(&survey)?,
        ])
    }
}

patchbay_sdk::export!(SurveyScheduler);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SETTINGS: Settings = Settings {
        delay_minutes: 30,
        min_duration_s: 20,
    };

    #[test]
    fn sends_the_survey_delay_minutes_after_the_call_ended() {
        let ended = CallEnded {
            duration_s: Some(300),
            ended_at_ms: Some(1_000_000),
            ..CallEnded::default()
        };
        let s = schedule("c-42", ended, Some(5), SETTINGS).unwrap();
        assert_eq!(s.send_at_ms, 1_000_000 + 30 * 60_000);
        assert_eq!(s.call_id, "c-42");
    }

    #[test]
    fn falls_back_to_the_event_time_when_the_payload_has_none() {
        let s = schedule("c-1", CallEnded::default(), Some(7), SETTINGS).unwrap();
        assert_eq!(s.send_at_ms, 7 + 30 * 60_000);
    }

    #[test]
    fn drops_calls_shorter_than_min_duration() {
        let ended = CallEnded {
            duration_ms: Some(19_999),
            ended_at_ms: Some(1),
            ..CallEnded::default()
        };
        let failure = schedule("c-2", ended, None, SETTINGS).unwrap_err();
        assert!(matches!(failure, Failure::Drop(_)), "{failure:?}");
    }

    #[test]
    fn dead_letters_a_call_without_any_end_time() {
        let failure = schedule("c-3", CallEnded::default(), None, SETTINGS).unwrap_err();
        assert!(matches!(failure, Failure::DeadLetter(_)));
    }

    #[test]
    fn builds_the_survey_subject_under_the_same_prefix() {
        let e = Event::new("acme.cc.v1.calls.c-42.ended", "t");
        assert_eq!(
            format!("{}.surveys.c-42.scheduled", e.subject_head(3)),
            "acme.cc.v1.surveys.c-42.scheduled"
        );
    }
}
