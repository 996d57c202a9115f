//! Engine unit tests, all on the injected clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use patchbay_protocol::payload::{
    AgentProfile, AgentSkill, AgentState, CallHangup, CallRouted, Channel, OfferAnswer,
    OverflowTarget, QueueMembership, RelaxationStep, SetAgentState, SkillRequirement, WrapupDone,
};
use patchbay_protocol::{AgentEvent, CallEvent};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;

const S: u64 = 1000;

fn config() -> EngineConfig {
    EngineConfig {
        offer_timeout_ms: 10 * S,
        wrap_up_ms: 30 * S,
        aging_secs_per_priority: 60,
        ..EngineConfig::default()
    }
}

fn profile(skills: &[(&str, u8)], queues: &[(&str, u32, u64)]) -> AgentProfile {
    AgentProfile {
        skills: skills
            .iter()
            .map(|(s, l)| AgentSkill {
                skill: (*s).to_string(),
                level: *l,
            })
            .collect(),
        queues: queues
            .iter()
            .map(|(q, p, d)| QueueMembership {
                queue: (*q).to_string(),
                priority: *p,
                delay_secs: *d,
            })
            .collect(),
        capacity: BTreeMap::new(),
    }
}

fn routed(id: &str, queue: &str) -> CallRouted {
    CallRouted {
        call_id: id.to_string(),
        seq: 2,
        queue: queue.to_string(),
        priority: 0,
        requirements: Vec::new(),
        relaxation: Vec::new(),
        overflow: Vec::new(),
        channel: Channel::Voice,
        customer_tier: "standard".to_string(),
        customer_id: None,
        rule: "test".to_string(),
        lookup_ok: true,
        routed_at_ms: 0,
    }
}

fn req(skill: &str, min_level: u8) -> SkillRequirement {
    SkillRequirement {
        skill: skill.to_string(),
        min_level,
    }
}

struct Harness {
    engine: Engine,
}

impl Harness {
    fn new(config: EngineConfig) -> Self {
        Self {
            engine: Engine::new(config),
        }
    }

    fn apply(&mut self, now: u64, input: Input) -> Applied {
        let applied = self.engine.apply(now, input).unwrap();
        self.engine.check_invariants().unwrap();
        applied
    }

    fn login(&mut self, now: u64, agent: &str, profile: AgentProfile) -> Vec<Output> {
        self.apply(
            now,
            Input::SetState(SetAgentState {
                agent_id: agent.to_string(),
                state: AgentState::Available,
                profile: Some(profile),
            }),
        )
        .outputs
    }

    fn set_state(&mut self, now: u64, agent: &str, state: AgentState) -> Applied {
        self.apply(
            now,
            Input::SetState(SetAgentState {
                agent_id: agent.to_string(),
                state,
                profile: None,
            }),
        )
    }

    fn route(&mut self, now: u64, call: CallRouted) -> Vec<Output> {
        self.apply(now, Input::Routed(call)).outputs
    }

    fn accept(&mut self, now: u64, agent: &str, call: &str) -> Applied {
        self.apply(now, Input::Accept(answer(agent, call)))
    }

    fn reject(&mut self, now: u64, agent: &str, call: &str) -> Applied {
        self.apply(now, Input::Reject(answer(agent, call)))
    }

    fn hangup(&mut self, now: u64, call: &str) -> Applied {
        self.apply(
            now,
            Input::Hangup(CallHangup {
                call_id: call.to_string(),
                reason: None,
            }),
        )
    }

    fn tick(&mut self, now: u64) -> Vec<Output> {
        let out = self.engine.tick(now);
        self.engine.check_invariants().unwrap();
        out
    }

    /// Accept the offer `call` → `agent` and check it was indeed offered.
    fn take(&mut self, now: u64, agent: &str, call: &str) {
        let applied = self.accept(now, agent, call);
        assert_eq!(applied.ignored, None, "{agent} could not accept {call}");
        assert!(
            events(&applied.outputs, CallEvent::Assigned)
                .contains(&(call.to_string(), agent.to_string()))
        );
    }
}

fn answer(agent: &str, call: &str) -> OfferAnswer {
    OfferAnswer {
        agent_id: agent.to_string(),
        call_id: call.to_string(),
    }
}

/// (call, agent) of every call event of kind `event`.
fn events(outputs: &[Output], event: CallEvent) -> Vec<(String, String)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Call { event: e, update } if *e == event => Some((
                update.call_id.clone(),
                update.agent.clone().unwrap_or_default(),
            )),
            _ => None,
        })
        .collect()
}

fn offers(outputs: &[Output]) -> Vec<(String, String)> {
    events(outputs, CallEvent::Offered)
}

fn offer(call: &str, agent: &str) -> Vec<(String, String)> {
    vec![(call.to_string(), agent.to_string())]
}

fn state_changes(outputs: &[Output], agent: &str) -> Vec<(AgentState, AgentState, String)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::AgentState(c) if c.agent_id == agent => Some((c.from, c.to, c.reason.clone())),
            _ => None,
        })
        .collect()
}

fn everyone(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("a{i}")).collect()
}

#[test]
fn offers_the_longest_idle_eligible_agent() {
    let mut h = Harness::new(config());
    for (i, a) in everyone(3).iter().enumerate() {
        h.login(i as u64 * S, a, profile(&[], &[]));
    }
    // a1 has been idle longest.
    assert_eq!(
        offers(&h.route(10 * S, routed("c1", "q"))),
        offer("c1", "a1")
    );
    h.take(11 * S, "a1", "c1");
    // Then a2.
    assert_eq!(
        offers(&h.route(12 * S, routed("c2", "q"))),
        offer("c2", "a2")
    );
    h.take(13 * S, "a2", "c2");
    // a1 ends at 20 s, wrap-up ends at 50 s; a2 ends at 25 s and ends wrap-up early at 45 s.
    h.hangup(20 * S, "c1");
    h.hangup(25 * S, "c2");
    h.apply(
        45 * S,
        Input::WrapupDone(WrapupDone {
            agent_id: "a2".into(),
        }),
    );
    h.tick(50 * S);
    // a3 has been idle since 2 s: longest. Then a2 (idle since 45 s) before a1 (50 s):
    // idle time counts from the end of wrap-up, not from the end of the call.
    assert_eq!(
        offers(&h.route(60 * S, routed("c3", "q"))),
        offer("c3", "a3")
    );
    assert_eq!(
        offers(&h.route(61 * S, routed("c4", "q"))),
        offer("c4", "a2")
    );
    assert_eq!(
        offers(&h.route(62 * S, routed("c5", "q"))),
        offer("c5", "a1")
    );
}

#[test]
fn prefers_experts_and_relaxes_to_less_proficient_agents_over_time() {
    let mut h = Harness::new(config());
    h.login(0, "novice", profile(&[("billing", 4)], &[]));
    h.login(S, "expert", profile(&[("billing", 9)], &[]));
    let mut call = routed("c1", "q");
    call.requirements = vec![req("billing", 8)];
    call.relaxation = vec![RelaxationStep {
        after_secs: 30,
        requirements: vec![req("billing", 3)],
    }];
    // The novice has been idle longer, but only the expert qualifies at first.
    assert_eq!(
        offers(&h.route(10 * S, call.clone())),
        offer("c1", "expert")
    );
    h.take(10 * S, "expert", "c1");
    let mut call2 = call.clone();
    call2.call_id = "c2".into();
    assert!(offers(&h.route(12 * S, call2)).is_empty());
    assert_eq!(
        h.engine.next_due(),
        Some(42 * S),
        "relaxation step is scheduled"
    );
    assert!(offers(&h.tick(41 * S)).is_empty());
    assert_eq!(offers(&h.tick(42 * S)), offer("c2", "novice"));
}

#[test]
fn most_proficient_selection_prefers_the_expert_over_the_longest_idle() {
    for (selection, winner) in [
        (AgentSelection::LongestIdle, "novice"),
        (AgentSelection::MostProficient, "expert"),
    ] {
        let mut h = Harness::new(EngineConfig {
            selection,
            ..config()
        });
        h.login(0, "novice", profile(&[("billing", 4)], &[]));
        h.login(S, "expert", profile(&[("billing", 9)], &[]));
        let mut call = routed("c1", "q");
        call.requirements = vec![req("billing", 3)];
        assert_eq!(
            offers(&h.route(10 * S, call)),
            offer("c1", winner),
            "{selection:?}"
        );
    }
}

#[test]
fn serves_higher_priority_first_then_first_come_first_served() {
    let mut h = Harness::new(EngineConfig {
        aging_secs_per_priority: 3600,
        wrap_up_ms: 0,
        ..config()
    });
    let c = |id: &str, priority: u32| {
        let mut call = routed(id, "q");
        call.priority = priority;
        call
    };
    h.route(0, c("low", 0));
    h.route(S, c("high-1", 5));
    h.route(2 * S, c("high-2", 5));
    h.route(3 * S, c("mid", 2));
    let mut order = Vec::new();
    let mut out = h.login(10 * S, "a1", profile(&[], &[]));
    for t in 0..4 {
        // Each offer was made one second before it is accepted.
        let now = (11 + t * 2) * S;
        let (call, _) = offers(&out).pop().expect("an offer");
        h.take(now, "a1", &call);
        out = h.hangup(now + S, &call).outputs;
        order.push(call);
    }
    assert_eq!(order, ["high-1", "high-2", "mid", "low"]);
}

#[test]
fn aging_lets_a_long_waiting_low_priority_call_go_first() {
    // One priority step is worth 60 s of waiting.
    let mut h = Harness::new(config());
    h.route(0, routed("old-low", "q"));
    let mut high = routed("new-high", "q");
    high.priority = 2; // worth 120 s, but old-low has waited 200 s
    h.route(200 * S, high);
    let mut urgent = routed("newer-urgent", "q");
    urgent.priority = 5; // worth 300 s: ahead of old-low (250 s waited)
    h.route(250 * S, urgent);
    let out = h.login(251 * S, "a1", profile(&[], &[]));
    assert_eq!(offers(&out), offer("newer-urgent", "a1"));
    h.set_state(252 * S, "a1", AgentState::Offline);
    let out = h.login(253 * S, "a2", profile(&[], &[]));
    assert_eq!(offers(&out), offer("newer-urgent", "a2"));
    h.take(253 * S, "a2", "newer-urgent");
    let out = h.set_state(254 * S, "a1", AgentState::Available).outputs;
    assert_eq!(
        offers(&out),
        offer("old-low", "a1"),
        "aging put old-low before new-high"
    );
}

#[test]
fn reject_reoffers_to_another_agent_keeping_the_enqueue_time() {
    let mut h = Harness::new(config());
    h.login(0, "a1", profile(&[], &[]));
    h.login(S, "a2", profile(&[], &[]));
    assert_eq!(
        offers(&h.route(5 * S, routed("c1", "q"))),
        offer("c1", "a1")
    );
    let out = h.reject(8 * S, "a1", "c1").outputs;
    let missed: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::AgentMissed(m) => Some((m.agent_id.as_str(), m.reason.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(missed, [("a1", "rejected")]);
    assert_eq!(h.engine.agent_state("a1"), Some(AgentState::NotResponding));
    let reoffer = out
        .iter()
        .find_map(|o| match o {
            Output::Call {
                event: CallEvent::Offered,
                update,
            } => Some(update.clone()),
            _ => None,
        })
        .expect("re-offered");
    assert_eq!(reoffer.agent.as_deref(), Some("a2"));
    assert_eq!(reoffer.enqueued_at_ms, 5 * S);
    h.take(9 * S, "a2", "c1");
    // The wait counts from the first enqueue: 4 s.
    assert_eq!(h.engine.total_counters().answer_wait_ms_total, 4 * S);
    // The not-responding agent is offered nothing until it is available again.
    assert!(offers(&h.route(10 * S, routed("c2", "q"))).is_empty());
    let out = h.set_state(11 * S, "a1", AgentState::Available).outputs;
    assert_eq!(offers(&out), offer("c2", "a1"));
}

#[test]
fn offer_timeout_marks_the_agent_not_responding_and_reoffers() {
    let mut h = Harness::new(config());
    h.login(0, "a1", profile(&[], &[]));
    h.login(S, "a2", profile(&[], &[]));
    let out = h.route(5 * S, routed("c1", "q"));
    let update = out
        .iter()
        .find_map(|o| match o {
            Output::Call {
                event: CallEvent::Offered,
                update,
            } => Some(update.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(update.offer_expires_ms, Some(15 * S));
    assert_eq!(h.engine.next_due(), Some(15 * S));
    assert!(h.tick(15 * S - 1).is_empty());
    let out = h.tick(15 * S);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::AgentMissed(m) if m.reason == "timeout"))
    );
    assert_eq!(offers(&out), offer("c1", "a2"));
    assert_eq!(h.engine.agent_state("a1"), Some(AgentState::NotResponding));
    // A late accept from a1 is a race, not an error, and changes nothing.
    let late = h.accept(16 * S, "a1", "c1");
    assert_eq!(late.ignored, Some(Ignored::OfferExpired));
    assert!(late.outputs.is_empty());
    h.take(16 * S, "a2", "c1");
}

#[test]
fn an_agent_logging_out_during_a_reservation_cancels_it_at_once() {
    let mut h = Harness::new(config());
    h.login(0, "a1", profile(&[], &[]));
    h.login(S, "a2", profile(&[], &[]));
    assert_eq!(
        offers(&h.route(5 * S, routed("c1", "q"))),
        offer("c1", "a1")
    );
    let out = h.set_state(6 * S, "a1", AgentState::Offline).outputs;
    assert_eq!(
        state_changes(&out, "a1"),
        [(
            AgentState::Reserved,
            AgentState::Offline,
            "command".to_string()
        )]
    );
    assert!(!out.iter().any(|o| matches!(o, Output::AgentMissed(_))));
    assert_eq!(offers(&out), offer("c1", "a2"));
    assert_eq!(
        h.engine.next_due(),
        Some(16 * S),
        "only a2's offer deadline is left"
    );
}

/// Why the adapter persists a batch before publishing it: the same state fed the same two
/// inputs in the other order — what redelivery after a crash does across the two
/// consumers — decides otherwise under the same event id.
#[test]
fn an_accept_and_a_hangup_in_either_order_give_one_id_two_meanings() {
    let mut before = Harness::new(config());
    before.login(0, "a-1", profile(&[], &[("sales", 1, 0)]));
    before.route(S, routed("c-1", "sales"));
    let saved = before.engine.snapshot();
    let call_events = |first: Input, second: Input| {
        let mut h = Harness {
            engine: Engine::restore(config(), saved.clone()),
        };
        let mut out = h.apply(2 * S, first).outputs;
        out.extend(h.apply(2 * S, second).outputs);
        out.iter()
            .filter_map(|o| Some((o.id(), o.call_event()?)))
            .collect::<Vec<_>>()
    };
    let accept = || Input::Accept(answer("a-1", "c-1"));
    let hangup = || {
        Input::Hangup(CallHangup {
            call_id: "c-1".to_string(),
            reason: None,
        })
    };
    assert_eq!(
        call_events(accept(), hangup()),
        [
            ("call-c-1-5".to_string(), CallEvent::Assigned),
            ("call-c-1-6".to_string(), CallEvent::Ended)
        ]
    );
    assert_eq!(
        call_events(hangup(), accept()),
        [("call-c-1-5".to_string(), CallEvent::Abandoned)]
    );
}

#[test]
fn a_caller_abandoning_while_reserved_frees_the_agent_at_once() {
    let mut h = Harness::new(config());
    h.login(0, "a1", profile(&[], &[]));
    assert_eq!(
        offers(&h.route(5 * S, routed("c1", "q"))),
        offer("c1", "a1")
    );
    let out = h.hangup(7 * S, "c1").outputs;
    assert_eq!(events(&out, CallEvent::Abandoned).len(), 1);
    assert_eq!(
        state_changes(&out, "a1"),
        [(
            AgentState::Reserved,
            AgentState::Available,
            "offer-cancelled".to_string()
        )]
    );
    assert_eq!(h.engine.next_due(), None, "the offer timer is gone");
    let late = h.accept(8 * S, "a1", "c1");
    assert_eq!(late.ignored, Some(Ignored::CallFinished));
    let c = h.engine.total_counters();
    assert_eq!(
        (c.abandoned, c.abandoned_within_threshold, c.answered),
        (1, 1, 0)
    );
    // The agent is free for the next call straight away.
    assert_eq!(
        offers(&h.route(9 * S, routed("c2", "q"))),
        offer("c2", "a1")
    );
}

#[test]
fn wrap_up_is_one_timer_shared_across_the_agents_queues() {
    let mut h = Harness::new(config());
    h.login(0, "a1", profile(&[], &[("q1", 1, 0), ("q2", 1, 0)]));
    assert_eq!(offers(&h.route(S, routed("c1", "q1"))), offer("c1", "a1"));
    h.take(2 * S, "a1", "c1");
    let out = h.hangup(10 * S, "c1").outputs;
    assert_eq!(
        state_changes(&out, "a1"),
        [(
            AgentState::Busy,
            AgentState::WrapUp,
            "call-ended".to_string()
        )]
    );
    // A call in the other queue waits for the same wrap-up to end.
    assert!(offers(&h.route(11 * S, routed("c2", "q2"))).is_empty());
    assert_eq!(h.engine.next_due(), Some(40 * S));
    let out = h.tick(40 * S);
    assert_eq!(
        state_changes(&out, "a1"),
        [
            (
                AgentState::WrapUp,
                AgentState::Available,
                "wrap-up-timeout".to_string()
            ),
            (
                AgentState::Available,
                AgentState::Reserved,
                "offer".to_string()
            ),
        ]
    );
    assert_eq!(offers(&out), offer("c2", "a1"));
}

#[test]
fn wrapup_done_ends_wrap_up_early() {
    let mut h = Harness::new(config());
    h.login(0, "a1", profile(&[], &[]));
    h.route(S, routed("c1", "q"));
    h.take(2 * S, "a1", "c1");
    h.hangup(10 * S, "c1");
    h.route(11 * S, routed("c2", "q"));
    let out = h
        .apply(
            12 * S,
            Input::WrapupDone(WrapupDone {
                agent_id: "a1".into(),
            }),
        )
        .outputs;
    assert_eq!(offers(&out), offer("c2", "a1"));
    let again = h.apply(
        13 * S,
        Input::WrapupDone(WrapupDone {
            agent_id: "a1".into(),
        }),
    );
    assert_eq!(again.ignored, Some(Ignored::NotInWrapUp));
}

#[test]
fn overflows_on_task_age_keeping_the_enqueue_time() {
    let mut h = Harness::new(config());
    h.login(0, "backup", profile(&[], &[("q2", 1, 0)]));
    let mut call = routed("c1", "q1");
    call.overflow = vec![OverflowTarget {
        after_secs: 60,
        queue: "q2".into(),
    }];
    assert!(offers(&h.route(5 * S, call)).is_empty());
    assert_eq!(h.engine.next_due(), Some(65 * S));
    let out = h.tick(65 * S);
    let overflowed = out
        .iter()
        .find_map(|o| match o {
            Output::Call {
                event: CallEvent::Overflowed,
                update,
            } => Some(update.clone()),
            _ => None,
        })
        .expect("overflowed");
    assert_eq!(overflowed.queue, "q2");
    assert_eq!(overflowed.from_queue.as_deref(), Some("q1"));
    assert_eq!(overflowed.enqueued_at_ms, 5 * S);
    assert_eq!(offers(&out), offer("c1", "backup"));
    let stats = h.engine.stats(65 * S);
    let q1 = stats.iter().find(|s| s.queue == "q1").unwrap();
    assert_eq!(q1.counters.overflowed_out, 1);
    assert_eq!(q1.waiting, 0);
}

#[test]
fn a_chat_agent_takes_chats_up_to_its_capacity_and_no_voice_meanwhile() {
    let mut h = Harness::new(EngineConfig {
        wrap_up_ms: 0,
        ..config()
    });
    let mut p = profile(&[], &[]);
    p.capacity.insert(Channel::Chat, 2);
    h.login(0, "a1", p);
    let chat = |id: &str| {
        let mut c = routed(id, "chat");
        c.channel = Channel::Chat;
        c
    };
    assert_eq!(offers(&h.route(S, chat("ch1"))), offer("ch1", "a1"));
    // One offer at a time: the second chat waits for the first answer.
    assert!(offers(&h.route(S, chat("ch2"))).is_empty());
    let out = h.accept(2 * S, "a1", "ch1").outputs;
    assert_eq!(offers(&out), offer("ch2", "a1"));
    h.take(3 * S, "a1", "ch2");
    assert_eq!(h.engine.agent_state("a1"), Some(AgentState::Busy));
    assert!(
        offers(&h.route(4 * S, chat("ch3"))).is_empty(),
        "at capacity"
    );
    assert!(
        offers(&h.route(4 * S, routed("v1", "voice"))).is_empty(),
        "voice is exclusive"
    );
    let out = h.hangup(5 * S, "ch1").outputs;
    assert_eq!(offers(&out), offer("ch3", "a1"));
}

#[test]
fn a_queue_delay_holds_a_backup_agent_until_the_call_has_waited() {
    let mut h = Harness::new(config());
    h.login(0, "backup", profile(&[], &[("sales", 1, 30)]));
    assert!(offers(&h.route(10 * S, routed("c1", "sales"))).is_empty());
    assert_eq!(h.engine.next_due(), Some(40 * S));
    assert_eq!(offers(&h.tick(40 * S)), offer("c1", "backup"));
}

#[test]
fn an_agent_serves_its_first_priority_queue_before_older_calls_of_its_second() {
    let mut h = Harness::new(config());
    h.route(0, routed("old-q2", "q2"));
    h.route(10 * S, routed("new-q1", "q1"));
    let out = h.login(20 * S, "a1", profile(&[], &[("q2", 2, 0), ("q1", 1, 0)]));
    assert_eq!(offers(&out), offer("new-q1", "a1"));
}

#[test]
fn redelivered_inputs_are_ignored_without_output() {
    let mut h = Harness::new(config());
    h.login(0, "a1", profile(&[], &[]));
    h.route(S, routed("c1", "q"));
    let dup = h.apply(2 * S, Input::Routed(routed("c1", "q")));
    assert_eq!(
        (dup.ignored, dup.outputs.len()),
        (Some(Ignored::DuplicateCall), 0)
    );
    h.take(3 * S, "a1", "c1");
    let second = h.accept(4 * S, "a1", "c1");
    assert_eq!(
        (second.ignored, second.outputs.len()),
        (Some(Ignored::AlreadyAccepted), 0)
    );
    h.hangup(5 * S, "c1");
    let before = h.engine.snapshot();
    let hangup = h.hangup(6 * S, "c1");
    assert_eq!(
        (hangup.ignored, hangup.outputs.len()),
        (Some(Ignored::CallFinished), 0)
    );
    let routed_again = h.apply(6 * S, Input::Routed(routed("c1", "q")));
    assert_eq!(routed_again.ignored, Some(Ignored::DuplicateCall));
    assert_eq!(h.engine.snapshot().calls, before.calls);
    let same = h.set_state(6 * S, "a1", AgentState::Available);
    assert_eq!(same.ignored, Some(Ignored::NoChange));
}

#[test]
fn sequence_numbers_continue_per_call_and_start_at_one_per_agent() {
    let mut h = Harness::new(config());
    let mut all = h.login(0, "a1", profile(&[], &[]));
    all.extend(h.route(S, routed("c1", "q"))); // routed.seq = 2
    all.extend(h.accept(2 * S, "a1", "c1").outputs);
    all.extend(h.hangup(3 * S, "c1").outputs);
    let call: Vec<_> = all
        .iter()
        .filter(|o| o.aggregate() == Aggregate::Call("c1"))
        .map(|o| (o.type_(), o.seq(), o.id()))
        .collect();
    assert_eq!(
        call,
        [
            (CallUpdate::QUEUED, 3, "call-c1-3".to_string()),
            (CallUpdate::OFFERED, 4, "call-c1-4".to_string()),
            (CallUpdate::ASSIGNED, 5, "call-c1-5".to_string()),
            (CallUpdate::ENDED, 6, "call-c1-6".to_string()),
        ]
    );
    let agent: Vec<u64> = all
        .iter()
        .filter(|o| o.aggregate() == Aggregate::Agent("a1"))
        .map(Output::seq)
        .collect();
    assert_eq!(agent, [1, 2, 3, 4]);
    assert!(
        all.iter()
            .filter(|o| matches!(o.aggregate(), Aggregate::Agent(_)))
            .all(|o| o.agent_event() == Some(AgentEvent::StateChanged)
                && o.id().starts_with("agent-a1-"))
    );
}

#[test]
fn invalid_commands_are_typed_errors_that_change_nothing() {
    let mut h = Harness::new(config());
    h.login(0, "a1", profile(&[], &[]));
    h.login(0, "a2", profile(&[], &[]));
    h.route(S, routed("c1", "q"));
    let before = h.engine.snapshot();
    let mut e = h.engine.clone();
    // The offer to a1 is due at 11 s; errors must not fire it either.
    let cases = [
        (
            Input::Accept(answer("ghost", "c1")),
            EngineError::UnknownAgent {
                agent: "ghost".into(),
            },
        ),
        (
            Input::Accept(answer("a2", "c1")),
            EngineError::NotOffered {
                agent: "a2".into(),
                call: "c1".into(),
            },
        ),
        (
            Input::Reject(answer("a1", "nope")),
            EngineError::UnknownCall {
                agent: "a1".into(),
                call: "nope".into(),
            },
        ),
        (
            Input::SetState(SetAgentState {
                agent_id: "new".into(),
                state: AgentState::Available,
                profile: None,
            }),
            EngineError::ProfileRequired {
                agent: "new".into(),
            },
        ),
        (
            Input::SetState(SetAgentState {
                agent_id: "a1".into(),
                state: AgentState::Busy,
                profile: None,
            }),
            EngineError::EngineOwnedState {
                agent: "a1".into(),
                state: "busy",
            },
        ),
        (
            Input::Routed(routed("c9", "")),
            EngineError::InvalidCall {
                call: "c9".into(),
                reason: "empty queue",
            },
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(e.apply(20 * S, input), Err(expected));
        assert_eq!(e.snapshot(), before);
    }
}

#[test]
fn statistics_report_waiting_agents_and_service_level() {
    let mut h = Harness::new(EngineConfig {
        wrap_up_ms: 0,
        ..config()
    });
    h.login(0, "a1", profile(&[], &[("q", 1, 0)]));
    h.route(0, routed("c1", "q"));
    h.take(5 * S, "a1", "c1"); // within 20 s
    h.route(10 * S, routed("c2", "q"));
    h.route(11 * S, routed("c3", "q"));
    h.hangup(40 * S, "c1"); // a1 free → c2 offered at 40 s
    h.take(41 * S, "a1", "c2"); // waited 31 s
    h.hangup(50 * S, "c3"); // abandoned after 39 s
    h.route(55 * S, routed("c4", "q"));
    let stats = h.engine.stats(60 * S);
    let q = stats.iter().find(|s| s.queue == "q").unwrap();
    assert_eq!(q.waiting, 1);
    assert_eq!(q.longest_wait_ms, 5 * S);
    assert_eq!((q.agents.busy, q.agents.available), (1, 0));
    assert_eq!(q.counters.answered, 2);
    assert_eq!(q.counters.abandoned, 1);
    assert_eq!(q.service_level.of_offered, Some(1.0 / 3.0));
    assert_eq!(q.service_level.of_answered, Some(0.5));
    assert_eq!(q.asa_secs, Some(18.0));
    assert_eq!(q.occupancy, Some(1.0));
}

#[test]
fn snapshot_and_restore_mid_queue_loses_nothing() {
    let mut h = Harness::new(config());
    h.login(0, "busy", profile(&[("x", 5)], &[]));
    h.login(S, "wrapping", profile(&[("x", 5)], &[]));
    h.login(2 * S, "reserved", profile(&[("x", 5)], &[]));
    h.route(3 * S, routed("c-busy", "q"));
    h.take(3 * S, "busy", "c-busy");
    h.route(4 * S, routed("c-wrap", "q"));
    h.take(4 * S, "wrapping", "c-wrap");
    h.hangup(6 * S, "c-wrap"); // wrap-up until 36 s
    h.route(7 * S, routed("c-offer", "q")); // offered to "reserved" until 17 s
    let mut queued = routed("c-queued", "q");
    queued.requirements = vec![req("x", 9)];
    queued.relaxation = vec![RelaxationStep {
        after_secs: 50,
        requirements: vec![req("x", 1)],
    }]; // relaxes at 58 s
    h.route(8 * S, queued);
    let mut original = h.engine.clone();
    let json = serde_json::to_string(&original.snapshot()).unwrap();
    let mut restored = Engine::restore(config(), serde_json::from_str(&json).unwrap());
    restored.check_invariants().unwrap();
    assert_eq!(restored.snapshot(), original.snapshot());
    assert_eq!(
        restored.next_due(),
        Some(17 * S),
        "the reservation deadline survived"
    );
    // Both engines must now behave identically, timer by timer.
    let mut fired = Vec::new();
    while let Some(due) = original.next_due() {
        assert_eq!(restored.next_due(), Some(due));
        let a = original.tick(due);
        let b = restored.tick(due);
        assert_eq!(a, b);
        restored.check_invariants().unwrap();
        fired.push((due, a));
        if due > 200 * S {
            break;
        }
    }
    let times: Vec<u64> = fired.iter().map(|(t, _)| *t / S).collect();
    // 17 s offer timeout (re-offered to nobody: the others are busy/wrapping), 36 s end of
    // wrap-up (c-offer goes to "wrapping"), 46 s its offer times out, 58 s relaxation.
    assert_eq!(&times[..4], [17, 36, 46, 58]);
    assert!(
        fired[0]
            .1
            .iter()
            .any(|o| matches!(o, Output::AgentMissed(m) if m.agent_id == "reserved"))
    );
    assert_eq!(offers(&fired[1].1), offer("c-offer", "wrapping"));
    assert!(
        fired
            .iter()
            .all(|(_, out)| events(out, CallEvent::Queued).is_empty())
    );
    // The busy agent's call is still there to end.
    let end = restored.apply(
        300 * S,
        Input::Hangup(CallHangup {
            call_id: "c-busy".into(),
            reason: None,
        }),
    );
    assert_eq!(
        events(&end.unwrap().outputs, CallEvent::Ended),
        offer("c-busy", "busy")
    );
}

/// Random interleavings of every input against a small centre; after every step the
/// invariants hold (no call offered or assigned to two agents, no agent over capacity,
/// every waiting call in exactly one queue, nothing left matchable), no event id repeats,
/// each aggregate's sequence rises by one, and an error changes nothing.
#[test]
fn random_interleavings_never_double_assign_a_call() {
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let agents = ["a1", "a2", "a3"];
    let mut total_assigned = 0;
    for round in 0..10_000 {
        let mut engine = Engine::new(EngineConfig {
            offer_timeout_ms: 5 * S,
            wrap_up_ms: rng.random_range(0..3) * 2 * S,
            aging_secs_per_priority: 10,
            ..EngineConfig::default()
        });
        let mut now = 0;
        let mut seen_ids = BTreeSet::new();
        let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
        let mut assigned: BTreeMap<String, String> = BTreeMap::new();
        let mut open_offers: Vec<(String, String)> = Vec::new();
        for (i, a) in agents.iter().enumerate() {
            let mut p = profile(&[], if *a == "a3" { &[("q2", 1, 2)] } else { &[] });
            p.capacity.insert(Channel::Chat, 2);
            let login = SetAgentState {
                agent_id: (*a).into(),
                state: AgentState::Available,
                profile: Some(p),
            };
            engine.apply(i as u64, Input::SetState(login)).unwrap();
        }
        let crash_at = rng.random_range(0..24);
        for step in 0..24 {
            let mut agent = agents[rng.random_range(0..agents.len())].to_string();
            let mut call = format!("c{}", rng.random_range(0..6));
            // Mostly answer a real offer (possibly stale), sometimes a random pair.
            if !open_offers.is_empty() && rng.random_bool(0.8) {
                (call, agent) = open_offers[rng.random_range(0..open_offers.len())].clone();
            }
            let input = match rng.random_range(0..10) {
                0 | 1 => {
                    let mut r = routed(&call, ["q1", "q2"][rng.random_range(0..2)]);
                    r.priority = rng.random_range(0..3);
                    r.channel = [Channel::Voice, Channel::Chat][rng.random_range(0..2)];
                    if rng.random_bool(0.3) {
                        r.overflow = vec![OverflowTarget {
                            after_secs: 4,
                            queue: "q1".into(),
                        }];
                    }
                    Some(Input::Routed(r))
                }
                2 => Some(Input::Hangup(CallHangup {
                    call_id: call.clone(),
                    reason: None,
                })),
                3 => {
                    let state = [
                        AgentState::Available,
                        AgentState::Available,
                        AgentState::Break,
                        AgentState::Offline,
                    ][rng.random_range(0..4)];
                    let mut p = profile(&[], if agent == "a3" { &[("q2", 1, 2)] } else { &[] });
                    p.capacity.insert(Channel::Chat, 2);
                    Some(Input::SetState(SetAgentState {
                        agent_id: agent.clone(),
                        state,
                        profile: rng.random_bool(0.5).then_some(p),
                    }))
                }
                4 | 5 => Some(Input::Accept(answer(&agent, &call))),
                6 => Some(Input::Reject(answer(&agent, &call))),
                7 => Some(Input::WrapupDone(WrapupDone {
                    agent_id: agent.clone(),
                })),
                _ => None,
            };
            now += rng.random_range(0..3) * S;
            let outputs = match input {
                Some(input) => {
                    // Comparing whole snapshots is slow in debug builds: every 8th round.
                    let before = (round % 8 == 0).then(|| engine.snapshot());
                    match engine.apply(now, input) {
                        Ok(applied) => applied.outputs,
                        Err(_) => {
                            if let Some(before) = before {
                                assert_eq!(engine.snapshot(), before, "an error changed the state");
                            }
                            Vec::new()
                        }
                    }
                }
                None => engine.tick(now),
            };
            open_offers.extend(offers(&outputs));
            for o in &outputs {
                assert!(seen_ids.insert(o.id()), "event id {} emitted twice", o.id());
                let key = match o.aggregate() {
                    Aggregate::Call(c) => format!("call {c}"),
                    Aggregate::Agent(a) => format!("agent {a}"),
                };
                let previous = last_seq.insert(key.clone(), o.seq());
                if let Some(p) = previous {
                    assert_eq!(o.seq(), p + 1, "{key} skipped a sequence number");
                }
                if let Output::Call {
                    event: CallEvent::Assigned,
                    update,
                } = o
                {
                    let agent = update.agent.clone().unwrap();
                    assert!(
                        assigned.insert(update.call_id.clone(), agent).is_none(),
                        "{} assigned twice",
                        update.call_id
                    );
                    total_assigned += 1;
                }
            }
            if let Err(e) = engine.check_invariants() {
                panic!("step {step}: {e}");
            }
            if step == crash_at {
                // Survive a crash: continue on a restored copy.
                let json = serde_json::to_string(&engine.snapshot()).unwrap();
                engine = Engine::restore(
                    engine.config().clone(),
                    serde_json::from_str(&json).unwrap(),
                );
                engine.check_invariants().unwrap();
            }
        }
    }
    assert!(
        total_assigned > 5_000,
        "the interleavings exercise assignment ({total_assigned})"
    );
}
