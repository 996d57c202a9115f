//! The routing engine: from an incoming call, what the customer lookup said (if it
//! answered) and the time, decide where the call waits — or that it gets the closed
//! treatment.
//!
//! Pure and deterministic: no I/O, no clock (the instant is an argument), so the same
//! engine serves the NATS adapter, tests and replays of recorded days. Rules are tried in
//! file order and the first whose conditions all hold wins; none matching means the
//! default rule. The winning rule's schedule (if any) then decides open or closed.

use chrono::{DateTime, Utc};
use patchbay_protocol::payload::{
    CallClosed, CallIncoming, CallRouted, CustomerInfo, OverflowTarget, RelaxationStep,
    SkillRequirement,
};

use crate::rules::{Conditions, Rule, Rules};
use crate::schedule::Openness;

/// The per-call sequence number of routing's decision: the first event routing emits
/// about a call (the agents service continues from here).
pub const DECISION_SEQ: u64 = 1;

/// Where a call waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// The rule that matched.
    pub rule: String,
    /// The queue.
    pub queue: String,
    /// Base priority plus the tier boost.
    pub priority: u32,
    /// Required skills at the start.
    pub requirements: Vec<SkillRequirement>,
    /// Relaxation steps by routing age.
    pub relaxation: Vec<RelaxationStep>,
    /// Overflow targets of the queue by task age.
    pub overflow: Vec<OverflowTarget>,
    /// The customer tier used (looked up, or the default).
    pub customer_tier: String,
    /// The customer id, when the lookup knew the caller.
    pub customer_id: Option<String>,
}

/// Closed treatment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closure {
    /// The rule that matched.
    pub rule: String,
    /// `outside-hours` or `holiday:<name>`.
    pub reason: String,
    /// What to play or do.
    pub treatment: String,
}

/// What routing decided for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The call waits in a queue.
    Routed(Routing),
    /// The call gets the closed treatment.
    Closed(Closure),
}

impl Decision {
    /// The rule that decided.
    #[must_use]
    pub fn rule(&self) -> &str {
        match self {
            Self::Routed(r) => &r.rule,
            Self::Closed(c) => &c.rule,
        }
    }

    /// `routed` or `closed` (the metrics label).
    #[must_use]
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Routed(_) => "routed",
            Self::Closed(_) => "closed",
        }
    }
}

/// What the adapter publishes for a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionEvent {
    /// `cc.v1.calls.<call>.routed`.
    Routed(CallRouted),
    /// `cc.v1.calls.<call>.closed`.
    Closed(CallClosed),
}

impl Decision {
    /// The event for `call`: seq [`DECISION_SEQ`], `lookup_ok` and the decision time
    /// `at_ms` (ms since the Unix epoch) as given.
    #[must_use]
    pub fn into_event(self, call: &CallIncoming, lookup_ok: bool, at_ms: u64) -> DecisionEvent {
        match self {
            Self::Routed(r) => DecisionEvent::Routed(CallRouted {
                call_id: call.call_id.clone(),
                seq: DECISION_SEQ,
                queue: r.queue,
                priority: r.priority,
                requirements: r.requirements,
                relaxation: r.relaxation,
                overflow: r.overflow,
                channel: call.channel,
                customer_tier: r.customer_tier,
                customer_id: r.customer_id,
                rule: r.rule,
                lookup_ok,
                routed_at_ms: at_ms,
            }),
            Self::Closed(c) => DecisionEvent::Closed(CallClosed {
                call_id: call.call_id.clone(),
                seq: DECISION_SEQ,
                rule: c.rule,
                reason: c.reason,
                treatment: c.treatment,
            }),
        }
    }
}

/// What the conditions are evaluated against.
struct Facts<'a> {
    call: &'a CallIncoming,
    tier: &'a str,
    language: Option<String>,
}

impl Rules {
    /// Decide for `call` at `now`. `customer` is the lookup's answer, `None` when it
    /// failed (timeout, no responders, error): the default tier applies then, and a
    /// customer without a tier gets it too.
    #[must_use]
    pub fn decide(
        &self,
        call: &CallIncoming,
        customer: Option<&CustomerInfo>,
        now: DateTime<Utc>,
    ) -> Decision {
        let tier = customer
            .map(|c| c.tier.as_str())
            .filter(|t| !t.trim().is_empty())
            .unwrap_or(&self.default_tier);
        let language = call
            .language
            .as_deref()
            .or_else(|| customer.and_then(|c| c.language.as_deref()))
            .filter(|l| !l.is_empty())
            .map(str::to_lowercase);
        let facts = Facts {
            call,
            tier,
            language,
        };
        let rule = self
            .rules
            .iter()
            .find(|r| r.conditions.hold(&facts))
            .unwrap_or(&self.default);
        if let Some(closure) = self.closure(rule, now) {
            return Decision::Closed(closure);
        }
        let action = &rule.action;
        let boost = self.tier_boost.get(tier).copied().unwrap_or(0);
        Decision::Routed(Routing {
            rule: rule.name.clone(),
            queue: action.queue.clone(),
            priority: action.priority.saturating_add(boost),
            requirements: action.requirements.clone(),
            relaxation: action.relaxation.clone(),
            overflow: self
                .queues
                .get(&action.queue)
                .map(|q| q.overflow.clone())
                .unwrap_or_default(),
            customer_tier: tier.to_owned(),
            customer_id: customer.and_then(|c| c.customer_id.clone()),
        })
    }

    fn closure(&self, rule: &Rule, now: DateTime<Utc>) -> Option<Closure> {
        let schedule = self.schedules.get(rule.action.schedule.as_deref()?)?;
        match schedule.openness(now) {
            Openness::Open => None,
            Openness::Closed { reason } => Some(Closure {
                rule: rule.name.clone(),
                reason,
                // Validation guarantees a treatment for every rule with a schedule.
                treatment: rule.action.closed_treatment.clone().unwrap_or_default(),
            }),
        }
    }
}

impl Conditions {
    fn hold(&self, facts: &Facts<'_>) -> bool {
        let call = facts.call;
        let any = |want: &Option<Vec<String>>, got: Option<&str>| {
            want.as_ref()
                .is_none_or(|want| got.is_some_and(|got| want.iter().any(|w| w == got)))
        };
        any(&self.dialled, Some(call.dialled.as_str()))
            && any(&self.ivr, call.ivr.as_deref())
            && any(&self.tier, Some(facts.tier))
            && self.language.as_ref().is_none_or(|want| {
                facts
                    .language
                    .as_deref()
                    .is_some_and(|got| want.iter().any(|w| language_matches(w, got)))
            })
            && self
                .channel
                .as_ref()
                .is_none_or(|want| want.contains(&call.channel))
            && self.attributes.iter().all(|(key, want)| {
                call.attributes
                    .get(key)
                    .is_some_and(|got| want.iter().any(|w| w == got))
            })
    }
}

/// `fr` matches `fr` and `fr-ca` (both lower-case already).
fn language_matches(want: &str, got: &str) -> bool {
    got == want
        || got
            .strip_prefix(want)
            .is_some_and(|rest| rest.starts_with('-'))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;

    use patchbay_protocol::payload::Channel;

    use super::*;

    /// Rules that exercise one condition per rule, in a known order. The `always` schedule
    /// is open all week; `closed-all-week` never is; `uk` is 08:00–20:00 weekdays in
    /// London with one holiday.
    const RULES: &str = r#"
        default_tier = "bronze"
        [tier_boost]
        gold = 20

        [[schedules]]
        name = "uk"
        tz = "Europe/London"
        closed_treatment = "msg-closed"
        hours = [{ days = ["mon", "tue", "wed", "thu", "fri"], open = "08:00", close = "20:00" }]
        holidays = [{ date = "2026-12-25", name = "christmas" }]

        [[queues]]
        name = "general"
        [[queues]]
        name = "support"
        overflow = [{ after_secs = 120, queue = "general" }, { after_secs = 300, queue = "sales" }]
        [[queues]]
        name = "sales"
        [[queues]]
        name = "vip"

        [[rules]]
        name = "dialled"
        match = { dialled = ["+441", "+442"] }
        queue = "sales"

        [[rules]]
        name = "ivr-and-channel"
        match = { ivr = "2", channel = "chat" }
        queue = "support"

        [[rules]]
        name = "ivr"
        match = { ivr = ["2", "support"] }
        queue = "support"
        priority = 10
        skills = { support = 5 }
        relax = [{ after_secs = 30, skills = { support = 3 } }, { after_secs = 90, skills = {} }]

        [[rules]]
        name = "french"
        match = { language = "fr" }
        queue = "support"
        skills = { lang-fr = 7 }
        schedule = "uk"

        [[rules]]
        name = "gold"
        match = { tier = "gold" }
        queue = "vip"
        priority = 5

        [[rules]]
        name = "campaign"
        match = { attributes = { campaign = ["winback", "spring"] } }
        queue = "sales"
        priority = 7

        [default]
        queue = "general"
        priority = 1
        schedule = "uk"
        closed_treatment = "msg-general-closed"
    "#;

    fn rules() -> Rules {
        Rules::parse(RULES).unwrap()
    }

    /// A Monday at noon in London (open).
    fn monday_noon() -> DateTime<Utc> {
        "2026-07-06T11:00:00Z".parse().unwrap()
    }

    fn call() -> CallIncoming {
        CallIncoming {
            call_id: "c1".into(),
            dialled: "+449".into(),
            caller: "+44123".into(),
            ..CallIncoming::default()
        }
    }

    fn customer(tier: &str) -> CustomerInfo {
        CustomerInfo {
            customer_id: Some("cu-1".into()),
            tier: tier.into(),
            name: None,
            language: None,
            known: true,
        }
    }

    fn routed(d: Decision) -> Routing {
        match d {
            Decision::Routed(r) => r,
            Decision::Closed(c) => panic!("expected routed, got closed {c:?}"),
        }
    }

    #[test]
    fn dialled_number_matches_any_listed_number() {
        let r = rules();
        let c = CallIncoming {
            dialled: "+442".into(),
            ..call()
        };
        let d = routed(r.decide(&c, None, monday_noon()));
        assert_eq!((d.rule.as_str(), d.queue.as_str()), ("dialled", "sales"));
        let other = routed(r.decide(&call(), None, monday_noon()));
        assert_eq!(other.rule, "default");
    }

    #[test]
    fn ivr_selection_matches_and_carries_skills_and_relaxation() {
        let c = CallIncoming {
            ivr: Some("support".into()),
            ..call()
        };
        let d = routed(rules().decide(&c, None, monday_noon()));
        assert_eq!(d.rule, "ivr");
        assert_eq!(d.priority, 10);
        assert_eq!(
            d.requirements,
            vec![SkillRequirement {
                skill: "support".into(),
                min_level: 5
            }]
        );
        assert_eq!(d.relaxation.len(), 2);
        assert_eq!(d.relaxation[0].after_secs, 30);
        assert_eq!(d.relaxation[0].requirements[0].min_level, 3);
        assert!(d.relaxation[1].requirements.is_empty());
    }

    #[test]
    fn every_condition_of_a_rule_must_hold() {
        let voice = CallIncoming {
            ivr: Some("2".into()),
            ..call()
        };
        assert_eq!(
            routed(rules().decide(&voice, None, monday_noon())).rule,
            "ivr"
        );
        let chat = CallIncoming {
            channel: Channel::Chat,
            ..voice
        };
        assert_eq!(
            routed(rules().decide(&chat, None, monday_noon())).rule,
            "ivr-and-channel"
        );
    }

    #[test]
    fn language_matches_the_call_then_the_customer_and_regional_variants() {
        let r = rules();
        let c = CallIncoming {
            language: Some("FR-ca".into()),
            ..call()
        };
        assert_eq!(routed(r.decide(&c, None, monday_noon())).rule, "french");
        let mut info = customer("bronze");
        info.language = Some("fr".into());
        assert_eq!(
            routed(r.decide(&call(), Some(&info), monday_noon())).rule,
            "french"
        );
        let frisian = CallIncoming {
            language: Some("fry".into()),
            ..call()
        };
        assert_eq!(
            routed(r.decide(&frisian, None, monday_noon())).rule,
            "default"
        );
    }

    #[test]
    fn customer_tier_matches_and_boosts_priority() {
        let d = routed(rules().decide(&call(), Some(&customer("gold")), monday_noon()));
        assert_eq!(d.rule, "gold");
        assert_eq!(d.queue, "vip");
        assert_eq!(d.priority, 5 + 20);
        assert_eq!(d.customer_tier, "gold");
        assert_eq!(d.customer_id.as_deref(), Some("cu-1"));
    }

    #[test]
    fn attribute_must_equal_one_of_the_values() {
        let r = rules();
        let mut c = call();
        c.attributes = BTreeMap::from([("campaign".into(), "spring".into())]);
        assert_eq!(routed(r.decide(&c, None, monday_noon())).rule, "campaign");
        c.attributes = BTreeMap::from([("campaign".into(), "autumn".into())]);
        assert_eq!(routed(r.decide(&c, None, monday_noon())).rule, "default");
    }

    #[test]
    fn first_matching_rule_wins() {
        // Matches "dialled" (first), "ivr" and "gold" too.
        let c = CallIncoming {
            dialled: "+441".into(),
            ivr: Some("2".into()),
            ..call()
        };
        let d = routed(rules().decide(&c, Some(&customer("gold")), monday_noon()));
        assert_eq!(d.rule, "dialled");
        // The tier boost applies whatever rule won.
        assert_eq!(d.priority, 20);
    }

    #[test]
    fn default_rule_applies_when_nothing_matches() {
        let d = routed(rules().decide(&call(), Some(&customer("bronze")), monday_noon()));
        assert_eq!(d.rule, crate::rules::DEFAULT_RULE);
        assert_eq!(d.queue, "general");
        assert_eq!(d.priority, 1);
    }

    #[test]
    fn failed_lookup_routes_with_the_default_tier() {
        let r = rules();
        let d = routed(r.decide(&call(), None, monday_noon()));
        assert_eq!(d.customer_tier, "bronze");
        assert_eq!(d.customer_id, None);
        // A customer record without a tier gets the default too.
        let d = routed(r.decide(&call(), Some(&customer(" ")), monday_noon()));
        assert_eq!(d.customer_tier, "bronze");
    }

    #[test]
    fn outside_hours_gives_the_closed_treatment_of_the_matching_rule() {
        let r = rules();
        // Monday 2026-07-06 20:30 BST = 19:30 UTC.
        let evening: DateTime<Utc> = "2026-07-06T19:30:00Z".parse().unwrap();
        assert_eq!(
            r.decide(&call(), None, evening),
            Decision::Closed(Closure {
                rule: "default".into(),
                reason: "outside-hours".into(),
                treatment: "msg-general-closed".into(),
            })
        );
        // The French rule takes its schedule's treatment.
        let fr = CallIncoming {
            language: Some("fr".into()),
            ..call()
        };
        let saturday: DateTime<Utc> = "2026-07-04T11:00:00Z".parse().unwrap();
        match r.decide(&fr, None, saturday) {
            Decision::Closed(c) => assert_eq!(
                (c.rule.as_str(), c.treatment.as_str()),
                ("french", "msg-closed")
            ),
            other => panic!("expected closed, got {other:?}"),
        }
        // A rule without a schedule is always open.
        let ivr = CallIncoming {
            ivr: Some("2".into()),
            ..call()
        };
        assert_eq!(routed(r.decide(&ivr, None, saturday)).rule, "ivr");
    }

    #[test]
    fn holidays_close_by_local_date() {
        // Friday 2026-12-25 at noon would otherwise be open.
        let christmas: DateTime<Utc> = "2026-12-25T12:00:00Z".parse().unwrap();
        match rules().decide(&call(), None, christmas) {
            Decision::Closed(c) => assert_eq!(c.reason, "holiday:christmas"),
            other => panic!("expected closed, got {other:?}"),
        }
    }

    #[test]
    fn queue_overflow_is_carried_into_the_decision() {
        let c = CallIncoming {
            ivr: Some("2".into()),
            ..call()
        };
        let d = routed(rules().decide(&c, None, monday_noon()));
        assert_eq!(
            d.overflow,
            vec![
                OverflowTarget {
                    after_secs: 120,
                    queue: "general".into()
                },
                OverflowTarget {
                    after_secs: 300,
                    queue: "sales".into()
                },
            ]
        );
    }

    #[test]
    fn decisions_become_seq_one_events_with_the_lookup_flag() {
        let c = CallIncoming {
            ivr: Some("2".into()),
            channel: Channel::Chat,
            ..call()
        };
        let event = rules()
            .decide(&c, None, monday_noon())
            .into_event(&c, false, 42);
        match event {
            DecisionEvent::Routed(r) => {
                assert_eq!(r.seq, 1);
                assert_eq!(r.call_id, "c1");
                assert_eq!(r.channel, Channel::Chat);
                assert!(!r.lookup_ok);
                assert_eq!(r.routed_at_ms, 42);
                assert_eq!(r.rule, "ivr-and-channel");
            }
            DecisionEvent::Closed(c) => panic!("expected routed, got {c:?}"),
        }
    }

    #[test]
    fn the_example_rules_file_validates_and_routes_a_french_vip_sensibly() {
        let text = include_str!("../../../deploy/routing.toml");
        let r = Rules::parse(text).unwrap_or_else(|e| panic!("deploy/routing.toml: {e}"));
        assert!(r.queues.contains_key("support"));
        let fr = CallIncoming {
            language: Some("fr".into()),
            ..call()
        };
        let d = routed(r.decide(&fr, Some(&customer("gold")), monday_noon()));
        assert_eq!(d.rule, "french");
        assert_eq!(d.priority, 10 + 20);
        assert_eq!(d.overflow[0].queue, "general");
        assert_eq!(d.overflow[0].after_secs, 120);
        // Saturday afternoon: the office is closed.
        let saturday: DateTime<Utc> = "2026-07-04T15:00:00Z".parse().unwrap();
        assert!(matches!(
            r.decide(&call(), None, saturday),
            Decision::Closed(_)
        ));
    }
}
