//! Applying one batch of consumed messages to the engine, delivery by delivery, with the
//! two protections every Patchbay handler of deliveries has:
//!
//! * **Hop chains** ([`patchbay_bus::hops`]). Each delivery enters the chain it carries as
//!   [`HOP_HANDLER`]; the outputs it decides are published with that extended chain, so a
//!   loop through this service (an output that, through functions, comes back as one of
//!   its inputs) is counted like any other. A delivery whose chain is already as long as
//!   the hop limit allows is refused without being applied — dead-lettered with the
//!   chain as the reason.
//! * **Panic containment** ([`patchbay_bus::pull::contain_panic`]). A panic while decoding
//!   or applying one delivery must not stop the service: restarted, it would be handed the
//!   same message, panic again, and after the last redelivery the message would be gone
//!   without a dead letter, every input behind it stuck meanwhile. The engine may be
//!   half-way through a change when it panics, so its state is not trusted afterwards: it
//!   goes back to the last one persisted — exactly what a restart would load — and the
//!   batch is applied again without the delivery that panicked, which is dead-lettered
//!   with the panic message. The engine is deterministic, so the deliveries before it
//!   decide the same outputs the second time; nothing of the batch was persisted or
//!   published yet, so nobody saw the first attempt.
//!
//! Not here: pulling, spans, persisting, publishing, acknowledging ([`crate::adapter`]).

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use bytes::Bytes;
use patchbay_bus::hops::{HOPS_HEADER, HopChain, HopLimitExceeded};
use patchbay_protocol::CcSubjects;

use crate::engine::{Applied, Engine, EngineConfig, EngineError, Ignored, Input, Output, Snapshot};
use crate::input::{self, BadInput, Decoded};
use crate::store::AppliedSeqs;

/// The name this service enters hop chains under.
pub const HOP_HANDLER: &str = "service/agents";

/// One consumed message, as applying it needs it.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The consumer it came from (`STREAM/consumer`, the key of its applied sequences).
    pub consumer: &'a str,
    /// Its stream sequence, when the message says.
    pub seq: Option<u64>,
    /// Its subject.
    pub subject: &'a str,
    /// Its headers.
    pub headers: Option<&'a HeaderMap>,
    /// Its body.
    pub payload: &'a Bytes,
}

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Already reflected in the state (a redelivery): acknowledged, not applied again.
    Duplicate,
    /// Well-formed but nothing for the engine (a closed call): acknowledged.
    NotForEngine(&'static str),
    /// Applied; `Some` when it changed nothing. Acknowledged.
    Applied(Option<Ignored>),
    /// Refused, never applied: dead-lettered with the reason.
    Rejected(BadInput),
}

/// An output, the delivery that decided it and the hop chain it is published with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    /// Index of the delivery in the batch.
    pub delivery: usize,
    /// The output.
    pub output: Output,
    /// The delivery's chain with this service appended.
    pub hops: HopChain,
}

/// A batch, applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Per delivery, in the batch's order.
    pub verdicts: Vec<Verdict>,
    /// Every output, in decision order.
    pub outputs: Vec<Decided>,
    /// Whether anything was applied (the state must be persisted).
    pub changed: bool,
    /// How often a panic sent the state back to the last persisted one.
    pub rewinds: usize,
}

/// The engine, the inputs it reflects, and the last persisted copy of both — what a
/// panic sends the state back to.
#[derive(Debug)]
pub struct State {
    config: EngineConfig,
    /// The engine.
    pub engine: Engine,
    /// Per consumer, the inputs `engine` reflects.
    pub applied: BTreeMap<String, AppliedSeqs>,
    /// The state last persisted; `None`: nothing yet (back to an empty engine).
    persisted: Option<(Snapshot, BTreeMap<String, AppliedSeqs>)>,
}

impl State {
    /// An empty engine, nothing persisted yet.
    #[must_use]
    pub fn new(config: EngineConfig) -> Self {
        Self {
            engine: Engine::new(config.clone()),
            config,
            applied: BTreeMap::new(),
            persisted: None,
        }
    }

    /// The state loaded from storage.
    #[must_use]
    pub fn restore(
        config: EngineConfig,
        snapshot: Snapshot,
        applied: BTreeMap<String, AppliedSeqs>,
    ) -> Self {
        Self {
            engine: Engine::restore(config.clone(), snapshot.clone()),
            config,
            applied: applied.clone(),
            persisted: Some((snapshot, applied)),
        }
    }

    /// Record that `snapshot` and `applied` (taken from this state) are persisted now.
    pub fn persisted(&mut self, snapshot: Snapshot, applied: BTreeMap<String, AppliedSeqs>) {
        self.persisted = Some((snapshot, applied));
    }

    /// Back to the state last persisted, as a restart would load it.
    fn rewind(&mut self) {
        match &self.persisted {
            Some((snapshot, applied)) => {
                self.engine = Engine::restore(self.config.clone(), snapshot.clone());
                self.applied = applied.clone();
            }
            None => {
                self.engine = Engine::new(self.config.clone());
                self.applied = BTreeMap::new();
            }
        }
    }

    /// Apply `deliveries` at `now` (module docs): `enter_hop` extends a delivery's chain
    /// or refuses it (`Bus::enter_hop` with [`HOP_HANDLER`]), `apply` runs one input
    /// through the engine ([`Engine::apply`]).
    pub async fn apply_batch<H, A>(
        &mut self,
        now: u64,
        cc: &CcSubjects,
        deliveries: &[Delivery<'_>],
        enter_hop: H,
        mut apply: A,
    ) -> BatchOutcome
    where
        H: Fn(Option<&HeaderMap>) -> Result<HopChain, HopLimitExceeded>,
        A: FnMut(&mut Engine, u64, Input) -> Result<Applied, EngineError>,
    {
        let mut panicked = BTreeMap::new();
        loop {
            match self
                .try_batch(now, cc, deliveries, &panicked, &enter_hop, &mut apply)
                .await
            {
                Ok(mut outcome) => {
                    outcome.rewinds = panicked.len();
                    return outcome;
                }
                Err((index, reason)) => {
                    tracing::error!(
                        delivery = index,
                        subject = deliveries[index].subject,
                        %reason,
                        "applying an input panicked; back to the last persisted state, applying the batch again without it"
                    );
                    self.rewind();
                    panicked.insert(index, reason);
                }
            }
        }
    }

    /// One pass over the batch, skipping (refusing) the deliveries in `panicked`; the
    /// first new panic stops the pass with its delivery's index and message.
    async fn try_batch<H, A>(
        &mut self,
        now: u64,
        cc: &CcSubjects,
        deliveries: &[Delivery<'_>],
        panicked: &BTreeMap<usize, String>,
        enter_hop: &H,
        apply: &mut A,
    ) -> Result<BatchOutcome, (usize, String)>
    where
        H: Fn(Option<&HeaderMap>) -> Result<HopChain, HopLimitExceeded>,
        A: FnMut(&mut Engine, u64, Input) -> Result<Applied, EngineError>,
    {
        let mut outcome = BatchOutcome::default();
        for (index, delivery) in deliveries.iter().enumerate() {
            if let Some(reason) = panicked.get(&index) {
                outcome
                    .verdicts
                    .push(Verdict::Rejected(BadInput::Panicked(reason.clone())));
                continue;
            }
            let state = &mut *self;
            let handled = patchbay_bus::pull::contain_panic(async {
                state.apply_one(now, cc, delivery, enter_hop, apply)
            })
            .await
            .map_err(|reason| (index, reason))?;
            let (verdict, decided) = handled;
            if let Some((hops, outputs)) = decided {
                outcome.changed = true;
                outcome
                    .outputs
                    .extend(outputs.into_iter().map(|output| Decided {
                        delivery: index,
                        output,
                        hops: hops.clone(),
                    }));
            }
            outcome.verdicts.push(verdict);
        }
        Ok(outcome)
    }

    /// The verdict on one delivery and, when it was applied, its chain and outputs.
    fn apply_one<H, A>(
        &mut self,
        now: u64,
        cc: &CcSubjects,
        delivery: &Delivery<'_>,
        enter_hop: &H,
        apply: &mut A,
    ) -> (Verdict, Option<(HopChain, Vec<Output>)>)
    where
        H: Fn(Option<&HeaderMap>) -> Result<HopChain, HopLimitExceeded>,
        A: FnMut(&mut Engine, u64, Input) -> Result<Applied, EngineError>,
    {
        if let Some(seq) = delivery.seq
            && self
                .applied
                .get(delivery.consumer)
                .is_some_and(|applied| applied.contains(seq))
        {
            return (Verdict::Duplicate, None);
        }
        let hops = match enter_hop(delivery.headers) {
            Ok(hops) => hops,
            Err(refused) => {
                return (
                    Verdict::Rejected(BadInput::HopLimit(refused.to_string())),
                    None,
                );
            }
        };
        let input = match input::decode(cc, delivery.subject, delivery.headers, delivery.payload) {
            Ok(Decoded::Input(input)) => input,
            Ok(Decoded::NotForEngine(reason)) => return (Verdict::NotForEngine(reason), None),
            Err(bad) => return (Verdict::Rejected(bad), None),
        };
        match apply(&mut self.engine, now, input) {
            Ok(done) => {
                if let Some(seq) = delivery.seq {
                    self.applied
                        .entry(delivery.consumer.to_owned())
                        .or_default()
                        .insert(seq);
                }
                (Verdict::Applied(done.ignored), Some((hops, done.outputs)))
            }
            Err(refused) => (Verdict::Rejected(BadInput::Engine(refused)), None),
        }
    }
}

/// The chain a `patchbay-hops` value names (as stored beside the outbox).
#[must_use]
pub fn chain_of(text: &str) -> HopChain {
    let mut headers = HeaderMap::new();
    headers.insert(HOPS_HEADER, text);
    HopChain::from_headers(Some(&headers))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use patchbay_bus::CloudEvent;
    use serde_json::json;

    use super::*;

    const MAX_HOPS: usize = 4;
    const CALLS: &str = "CC_CALLS/agents";
    const COMMANDS: &str = "CC_AGENT_CMDS/agents";

    /// A consumed message, owned (a [`Delivery`] borrows it).
    struct Msg {
        consumer: &'static str,
        seq: u64,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    }

    impl Msg {
        fn new(consumer: &'static str, seq: u64, subject: &str, data: &serde_json::Value) -> Self {
            let event = CloudEvent::new("/test", "t").json(data).unwrap();
            Self {
                consumer,
                seq,
                subject: subject.to_owned(),
                headers: event.to_headers(),
                payload: event.data,
            }
        }

        fn with_hops(mut self, hops: usize) -> Self {
            let chain: Vec<String> = (0..hops).map(|i| format!("fn/f{i}")).collect();
            self.headers.insert(HOPS_HEADER, chain.join(",").as_str());
            self
        }

        fn delivery(&self) -> Delivery<'_> {
            Delivery {
                consumer: self.consumer,
                seq: Some(self.seq),
                subject: &self.subject,
                headers: Some(&self.headers),
                payload: &self.payload,
            }
        }
    }

    fn log_in(seq: u64, agent: &str) -> Msg {
        Msg::new(
            COMMANDS,
            seq,
            &format!("cc.v1.agents.{agent}.cmd.state"),
            &json!({
                "agent_id": agent, "state": "available",
                "profile": { "skills": [], "queues": [{ "queue": "sales" }] }
            }),
        )
    }

    fn routed(seq: u64, call: &str) -> Msg {
        Msg::new(
            CALLS,
            seq,
            &format!("cc.v1.calls.{call}.routed"),
            &json!({
                "call_id": call, "seq": 1, "queue": "sales", "priority": 0,
                "requirements": [], "channel": "voice", "customer_tier": "standard",
                "rule": "default", "lookup_ok": true, "routed_at_ms": 1
            }),
        )
    }

    fn enter_hop(headers: Option<&HeaderMap>) -> Result<HopChain, HopLimitExceeded> {
        HopChain::from_headers(headers).enter(HOP_HANDLER, MAX_HOPS)
    }

    fn engine_apply(engine: &mut Engine, now: u64, input: Input) -> Result<Applied, EngineError> {
        engine.apply(now, input)
    }

    /// Applies every input for real, then panics on a routed call `call`: the engine has
    /// taken the call half-way when the panic leaves it.
    fn panicking_on(
        call: &str,
    ) -> impl FnMut(&mut Engine, u64, Input) -> Result<Applied, EngineError> {
        move |engine, now, input| {
            let poisoned = matches!(&input, Input::Routed(r) if r.call_id == call);
            let applied = engine.apply(now, input);
            if poisoned {
                panic!("engine bug on {call}");
            }
            applied
        }
    }

    async fn apply(state: &mut State, now: u64, msgs: &[Msg]) -> BatchOutcome {
        let deliveries: Vec<Delivery<'_>> = msgs.iter().map(Msg::delivery).collect();
        state
            .apply_batch(
                now,
                &CcSubjects::default(),
                &deliveries,
                enter_hop,
                engine_apply,
            )
            .await
    }

    fn ids(outcome: &BatchOutcome) -> Vec<String> {
        outcome
            .outputs
            .iter()
            .map(|d| d.output.id().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn the_outputs_of_a_delivery_carry_its_chain_extended_by_this_service() {
        let mut state = State::new(EngineConfig::default());
        let msgs = [log_in(1, "a-1").with_hops(MAX_HOPS - 1), routed(1, "c-1")];
        let outcome = apply(&mut state, 1_000, &msgs).await;
        assert_eq!(
            outcome.verdicts,
            [Verdict::Applied(None), Verdict::Applied(None)]
        );
        let from_log_in: Vec<&Decided> =
            outcome.outputs.iter().filter(|d| d.delivery == 0).collect();
        assert!(!from_log_in.is_empty());
        for decided in from_log_in {
            assert_eq!(decided.hops.len(), MAX_HOPS, "{decided:?}");
            assert_eq!(decided.hops.handlers()[..3], ["fn/f0", "fn/f1", "fn/f2"]);
            assert_eq!(decided.hops.handlers().last().unwrap(), HOP_HANDLER);
        }
        // A message without a chain starts one.
        let from_routed: Vec<&Decided> =
            outcome.outputs.iter().filter(|d| d.delivery == 1).collect();
        assert!(!from_routed.is_empty());
        assert!(
            from_routed
                .iter()
                .all(|d| d.hops.handlers() == [HOP_HANDLER])
        );
    }

    #[tokio::test]
    async fn a_delivery_at_the_hop_limit_is_refused_with_its_chain_and_not_applied() {
        let mut state = State::new(EngineConfig::default());
        let msgs = [log_in(1, "a-1").with_hops(MAX_HOPS), log_in(2, "a-2")];
        let outcome = apply(&mut state, 1_000, &msgs).await;
        let Verdict::Rejected(BadInput::HopLimit(reason)) = &outcome.verdicts[0] else {
            panic!("not refused: {:?}", outcome.verdicts);
        };
        assert!(
            reason.contains("hop limit of 4 exceeded")
                && reason.contains("fn/f0,fn/f1,fn/f2,fn/f3,service/agents"),
            "{reason}"
        );
        assert_eq!(
            BadInput::HopLimit(reason.clone()).label(),
            "hop-limit",
            "counted under its own reason"
        );
        assert_eq!(outcome.verdicts[1], Verdict::Applied(None));
        assert!(outcome.outputs.iter().all(|d| d.delivery == 1));
        // a-1 never logged in: the refused command changed nothing, and its sequence is
        // not recorded as applied (it is dead-lettered, not acknowledged as done).
        let stats = serde_json::to_string(&state.engine.snapshot()).unwrap();
        assert!(
            !stats.contains("\"a-1\"") && stats.contains("\"a-2\""),
            "{stats}"
        );
        assert!(!state.applied.get(COMMANDS).unwrap().contains(1));
    }

    #[tokio::test]
    async fn a_panic_on_one_delivery_dead_letters_it_and_the_rest_decide_as_if_it_never_came() {
        // What the batch decides without the poisoned call, on a clean engine.
        let mut clean = State::new(EngineConfig::default());
        let without = [log_in(1, "a-1"), routed(2, "c-2")];
        let reference = apply(&mut clean, 1_000, &without).await;

        let mut state = State::new(EngineConfig::default());
        let msgs = [log_in(1, "a-1"), routed(1, "c-1"), routed(2, "c-2")];
        let deliveries: Vec<Delivery<'_>> = msgs.iter().map(Msg::delivery).collect();
        let outcome = state
            .apply_batch(
                1_000,
                &CcSubjects::default(),
                &deliveries,
                enter_hop,
                panicking_on("c-1"),
            )
            .await;
        assert_eq!(outcome.rewinds, 1);
        assert_eq!(outcome.verdicts[0], Verdict::Applied(None));
        assert_eq!(outcome.verdicts[2], Verdict::Applied(None));
        let Verdict::Rejected(bad @ BadInput::Panicked(reason)) = &outcome.verdicts[1] else {
            panic!("not refused: {:?}", outcome.verdicts);
        };
        assert!(reason.contains("engine bug on c-1"), "{reason}");
        assert_eq!(bad.label(), "panic");
        // c-2 is offered to a-1 exactly as if c-1 had never arrived: the half-applied c-1
        // (it had been offered to a-1 when the panic struck) is gone.
        assert_eq!(ids(&outcome), ids(&reference));
        assert_eq!(state.engine.snapshot(), clean.engine.snapshot());
        assert!(!state.applied.get(CALLS).unwrap().contains(1));
        assert!(state.applied.get(CALLS).unwrap().contains(2));
    }

    #[tokio::test]
    async fn a_panic_goes_back_to_the_last_persisted_state_not_further() {
        let mut state = State::new(EngineConfig::default());
        let first = apply(&mut state, 1_000, &[log_in(1, "a-1")]).await;
        assert!(first.changed);
        let applied = state.applied.clone();
        state.persisted(state.engine.snapshot(), applied);
        let persisted = state.engine.snapshot();

        let deliveries = [routed(1, "c-1")];
        let deliveries: Vec<Delivery<'_>> = deliveries.iter().map(Msg::delivery).collect();
        let outcome = state
            .apply_batch(
                2_000,
                &CcSubjects::default(),
                &deliveries,
                enter_hop,
                panicking_on("c-1"),
            )
            .await;
        assert_eq!(outcome.rewinds, 1);
        assert!(outcome.outputs.is_empty() && !outcome.changed);
        assert_eq!(state.engine.snapshot(), persisted, "a-1 is still logged in");
        assert!(state.applied.get(COMMANDS).unwrap().contains(1));
    }

    #[tokio::test]
    async fn every_delivery_of_a_batch_may_panic_and_each_is_refused_once() {
        let mut state = State::new(EngineConfig::default());
        let msgs = [routed(1, "c-1"), routed(2, "c-1"), routed(3, "c-1")];
        let deliveries: Vec<Delivery<'_>> = msgs.iter().map(Msg::delivery).collect();
        let outcome = state
            .apply_batch(
                1_000,
                &CcSubjects::default(),
                &deliveries,
                enter_hop,
                panicking_on("c-1"),
            )
            .await;
        assert_eq!(outcome.rewinds, 3);
        assert!(
            outcome
                .verdicts
                .iter()
                .all(|v| matches!(v, Verdict::Rejected(BadInput::Panicked(_))))
        );
        assert_eq!(
            state.engine.snapshot(),
            Engine::new(EngineConfig::default()).snapshot()
        );
    }

    #[tokio::test]
    async fn a_redelivered_input_already_applied_is_a_duplicate_and_decides_nothing() {
        let mut state = State::new(EngineConfig::default());
        let _ = apply(&mut state, 1_000, &[log_in(1, "a-1")]).await;
        let again = apply(&mut state, 2_000, &[log_in(1, "a-1")]).await;
        assert_eq!(again.verdicts, [Verdict::Duplicate]);
        assert!(again.outputs.is_empty() && !again.changed);
    }

    #[test]
    fn a_stored_chain_reads_back_as_the_chain_it_was_written_from() {
        let chain = HopChain::default()
            .enter("fn/a", 8)
            .unwrap()
            .enter(HOP_HANDLER, 8)
            .unwrap();
        assert_eq!(chain_of(&chain.to_string()), chain);
        assert!(chain_of("").is_empty());
    }
}
