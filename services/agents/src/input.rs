//! Turning a consumed NATS message into an engine [`Input`] — or a [`BadInput`] saying why
//! not.
//!
//! Owns the mapping subject → input kind → payload type, and the checks that the subject
//! and the body agree (the call or agent id). Does not own the subjects themselves
//! (`patchbay-protocol`) or what the engine makes of the input.

use async_nats::HeaderMap;
use bytes::Bytes;
use patchbay_bus::{CloudEvent, Token};
use patchbay_protocol::payload::{CallHangup, CallRouted, OfferAnswer, SetAgentState, WrapupDone};
use patchbay_protocol::{AgentCommand, CallEvent, CcSubject, CcSubjects};
use serde::de::DeserializeOwned;

use crate::engine::{EngineError, Input};

/// Why a message is not an input, or an input the engine refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadInput {
    /// The subject is none of the inputs the engine consumes.
    #[error("not an input subject of the agents service: {0}")]
    Subject(String),
    /// The message is not a CloudEvent.
    #[error("not a CloudEvent: {0}")]
    Envelope(String),
    /// The data is not the JSON the subject calls for.
    #[error("data is not a valid {expected}: {reason}")]
    Json {
        /// The payload type expected.
        expected: &'static str,
        /// The parser's reason.
        reason: String,
    },
    /// The subject names another call or agent than the body.
    #[error("subject names {what} {subject:?} but the data names {body:?}")]
    Mismatch {
        /// `call` or `agent`.
        what: &'static str,
        /// The id in the subject.
        subject: String,
        /// The id in the body.
        body: String,
    },
    /// The engine refused it.
    #[error("refused by the engine: {0}")]
    Engine(#[from] EngineError),
    /// It has passed through as many handlers as the hop limit allows: a loop. The
    /// reason names the whole chain.
    #[error("{0}")]
    HopLimit(String),
    /// Handling it panicked (a bug): dead-lettered with the panic message rather than
    /// redelivered into the same panic until the server gives up on it.
    #[error("{0}")]
    Panicked(String),
}

impl BadInput {
    /// The `reason` label of `patchbay_agents_rejected_total`.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::Subject(_) => "subject",
            Self::Envelope(_) => "envelope",
            Self::Json { .. } => "json",
            Self::Mismatch { .. } => "mismatch",
            Self::Engine(e) => match e {
                EngineError::UnknownAgent { .. } => "unknown-agent",
                EngineError::ProfileRequired { .. } => "profile-required",
                EngineError::EngineOwnedState { .. } => "engine-owned-state",
                EngineError::UnknownCall { .. } => "unknown-call",
                EngineError::NotOffered { .. } => "not-offered",
                EngineError::InvalidCall { .. } => "invalid-call",
            },
            Self::HopLimit(_) => "hop-limit",
            Self::Panicked(_) => "panic",
        }
    }
}

/// What a well-formed message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// An engine input.
    Input(Input),
    /// `cc.v1.calls.<call>.closed`: closed treatment, nothing for the engine (the call was
    /// never queued). Acknowledged and counted.
    NotForEngine(&'static str),
}

/// The metrics label of an input subject (`routed`, `hangup`, `state`, …), `other` for
/// anything else.
#[must_use]
pub fn kind(cc: &CcSubjects, subject: &str) -> &'static str {
    match cc.parse(subject) {
        Ok(CcSubject::Call { event, .. }) => event.as_str(),
        Ok(CcSubject::AgentCommand { command, .. }) => command.as_str(),
        _ => "other",
    }
}

fn json<T: DeserializeOwned>(event: &CloudEvent, expected: &'static str) -> Result<T, BadInput> {
    event.data_json().map_err(|e| BadInput::Json {
        expected,
        reason: e.to_string(),
    })
}

fn same(what: &'static str, subject: &Token, body: &str) -> Result<(), BadInput> {
    if subject.as_str() == body {
        Ok(())
    } else {
        Err(BadInput::Mismatch {
            what,
            subject: subject.to_string(),
            body: body.to_owned(),
        })
    }
}

/// Check and decode one consumed message.
pub fn decode(
    cc: &CcSubjects,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &Bytes,
) -> Result<Decoded, BadInput> {
    let parsed = cc
        .parse(subject)
        .map_err(|_| BadInput::Subject(subject.to_owned()))?;
    // The subject is checked before the envelope: a message on a subject the engine does
    // not consume says more about the consumer's filter than about the message.
    match &parsed {
        CcSubject::Call {
            event: CallEvent::Routed | CallEvent::Hangup | CallEvent::Closed,
            ..
        }
        | CcSubject::AgentCommand { .. } => {}
        _ => return Err(BadInput::Subject(subject.to_owned())),
    }
    let event = CloudEvent::from_message(headers, payload)
        .map_err(|e| BadInput::Envelope(e.to_string()))?;
    let input = match parsed {
        CcSubject::Call { call, event: kind } => match kind {
            CallEvent::Routed => {
                let routed: CallRouted = json(&event, "routed call")?;
                same("call", &call, &routed.call_id)?;
                Input::Routed(routed)
            }
            CallEvent::Hangup => {
                let hangup: CallHangup = json(&event, "hangup")?;
                same("call", &call, &hangup.call_id)?;
                Input::Hangup(hangup)
            }
            _ => return Ok(Decoded::NotForEngine("closed-call")),
        },
        CcSubject::AgentCommand { agent, command } => match command {
            AgentCommand::State => {
                let cmd: SetAgentState = json(&event, "state command")?;
                same("agent", &agent, &cmd.agent_id)?;
                Input::SetState(cmd)
            }
            AgentCommand::Accept | AgentCommand::Reject => {
                let answer: OfferAnswer = json(&event, "offer answer")?;
                same("agent", &agent, &answer.agent_id)?;
                if command == AgentCommand::Accept {
                    Input::Accept(answer)
                } else {
                    Input::Reject(answer)
                }
            }
            AgentCommand::WrapupDone => {
                let cmd: WrapupDone = json(&event, "wrapup-done command")?;
                same("agent", &agent, &cmd.agent_id)?;
                Input::WrapupDone(cmd)
            }
        },
        _ => return Err(BadInput::Subject(subject.to_owned())),
    };
    Ok(Decoded::Input(input))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use patchbay_protocol::payload::AgentState;

    fn msg(subject: &str, data: &str) -> Result<Decoded, BadInput> {
        let event = CloudEvent::new("/test", "t").data("application/json", data.to_owned());
        decode(
            &CcSubjects::default(),
            subject,
            Some(&event.to_headers()),
            &event.data,
        )
    }

    #[test]
    fn commands_and_call_events_decode_into_inputs() {
        let state = msg(
            "cc.v1.agents.a-1.cmd.state",
            r#"{"agent_id":"a-1","state":"available"}"#,
        )
        .unwrap();
        assert!(matches!(
            state,
            Decoded::Input(Input::SetState(SetAgentState {
                state: AgentState::Available,
                ..
            }))
        ));
        let reject = msg(
            "cc.v1.agents.a-1.cmd.reject",
            r#"{"agent_id":"a-1","call_id":"c-1"}"#,
        )
        .unwrap();
        assert!(matches!(reject, Decoded::Input(Input::Reject(_))));
        let hangup = msg("cc.v1.calls.c-1.hangup", r#"{"call_id":"c-1"}"#).unwrap();
        assert!(matches!(hangup, Decoded::Input(Input::Hangup(_))));
        assert_eq!(
            msg("cc.v1.calls.c-1.closed", "{}").unwrap(),
            Decoded::NotForEngine("closed-call")
        );
    }

    #[test]
    fn malformed_messages_are_classified() {
        assert_eq!(
            msg("cc.v1.calls.c-1.routed", "{oops").unwrap_err().label(),
            "json"
        );
        assert_eq!(
            msg("cc.v1.calls.c-1.hangup", r#"{"call_id":"c-2"}"#).unwrap_err(),
            BadInput::Mismatch {
                what: "call",
                subject: "c-1".into(),
                body: "c-2".into()
            }
        );
        assert_eq!(
            msg("cc.v1.agents.a-1.cmd.wrapup-done", r#"{"agent_id":"b"}"#)
                .unwrap_err()
                .label(),
            "mismatch"
        );
        assert_eq!(
            msg("cc.v1.calls.c-1.queued", "{}").unwrap_err().label(),
            "subject"
        );
        assert_eq!(msg("elsewhere", "{}").unwrap_err().label(), "subject");
        let bare = decode(
            &CcSubjects::default(),
            "cc.v1.calls.c-1.hangup",
            None,
            &Bytes::from_static(br#"{"call_id":"c-1"}"#),
        );
        assert_eq!(bare.unwrap_err().label(), "envelope");
    }
}
