//! Engine benchmark: 5,000 agents, 200 queues, the assignment engine alone (no NATS).
//!
//! `cargo run --release -p patchbay-agents --example bench_engine [calls]`
//!
//! Each agent serves 4 of the 200 queues (two at membership priority 1, two at 2) with a
//! skill per queue at proficiency 1–10; each call needs its queue's skill at level 1–6,
//! relaxed to 1 after 20 s, and abandons after an exponential patience (mean 60 s).
//! Arrivals are Poisson at 102 % of the agents' capacity (AHT 300 s), so queues build up
//! and both decision paths run: a call arriving picks among free agents, an agent freeing
//! up picks among waiting calls. Offers are accepted at once. Every `apply` / `tick` is
//! timed on the wall clock; a *decision* is an offer made. Reports decisions per second
//! of engine time and the latency of the engine calls that made a decision.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use patchbay_agents::engine::{Engine, EngineConfig, Input, Output};
use patchbay_protocol::CallEvent;
use patchbay_protocol::payload::{
    AgentProfile, AgentSkill, AgentState, CallHangup, CallRouted, Channel, OfferAnswer,
    QueueMembership, RelaxationStep, SetAgentState, SkillRequirement,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const AGENTS: usize = 5_000;
const QUEUES: usize = 200;
const AHT_SECS: f64 = 300.0;
const PATIENCE_SECS: f64 = 60.0;

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrival,
    Accept(String, String),
    Abandon(String),
    End(String),
}

fn exp_ms(rng: &mut SmallRng, mean_secs: f64) -> u64 {
    let u: f64 = rng.random();
    (-mean_secs * (1.0 - u).ln() * 1000.0) as u64
}

struct Timing {
    decision_latencies: Vec<Duration>,
    all_latencies: Vec<Duration>,
    engine_time: Duration,
    decisions: u64,
}

impl Timing {
    fn record(&mut self, elapsed: Duration, outputs: &[Output]) {
        let offers = outputs
            .iter()
            .filter(|o| o.call_event() == Some(CallEvent::Offered))
            .count() as u64;
        self.engine_time += elapsed;
        self.all_latencies.push(elapsed);
        if offers > 0 {
            self.decisions += offers;
            self.decision_latencies.push(elapsed);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let calls: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300_000);
    let mut rng = SmallRng::seed_from_u64(42);
    let mut engine = Engine::new(EngineConfig {
        wrap_up_ms: 0,
        ..EngineConfig::default()
    });

    let setup = Instant::now();
    for a in 0..AGENTS {
        let mut queues = Vec::new();
        while queues.len() < 4 {
            let q = rng.random_range(0..QUEUES);
            if !queues.contains(&q) {
                queues.push(q);
            }
        }
        let profile = AgentProfile {
            skills: queues
                .iter()
                .map(|q| AgentSkill {
                    skill: format!("s{q}"),
                    level: rng.random_range(1..=10),
                })
                .collect(),
            queues: queues
                .iter()
                .enumerate()
                .map(|(i, q)| QueueMembership {
                    queue: format!("q{q}"),
                    priority: if i < 2 { 1 } else { 2 },
                    delay_secs: 0,
                })
                .collect(),
            capacity: Default::default(),
        };
        let login = SetAgentState {
            agent_id: format!("agent-{a}"),
            state: AgentState::Available,
            profile: Some(profile),
        };
        if let Err(e) = engine.apply(0, Input::SetState(login)) {
            eprintln!("login refused: {e}");
            return;
        }
    }
    println!(
        "setup: {AGENTS} agents over {QUEUES} queues logged in in {:.1} ms",
        setup.elapsed().as_secs_f64() * 1000.0
    );

    let capacity_per_sec = AGENTS as f64 / AHT_SECS;
    let mean_gap_secs = 1.0 / (capacity_per_sec * 1.02);
    let mut events: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut order = 0u64;
    let mut push = |events: &mut BinaryHeap<_>, at: u64, e: Event| {
        order += 1;
        events.push(Reverse((at, order, e)));
    };
    let mut handle: HashMap<String, u64> = HashMap::new();
    let mut assigned: HashMap<String, bool> = HashMap::new();
    let mut timing = Timing {
        decision_latencies: Vec::new(),
        all_latencies: Vec::new(),
        engine_time: Duration::ZERO,
        decisions: 0,
    };
    let mut created = 0u64;
    let mut max_waiting = 0usize;
    let (mut answered, mut abandoned) = (0u64, 0u64);
    push(&mut events, exp_ms(&mut rng, mean_gap_secs), Event::Arrival);
    let wall = Instant::now();
    loop {
        let next_event = events.peek().map(|Reverse((t, _, _))| *t);
        let due = engine.next_due();
        let (now, outputs) = match (next_event, due) {
            (None, None) => break,
            (e, Some(d)) if e.is_none_or(|e| d <= e) => {
                let start = Instant::now();
                let out = engine.tick(d);
                timing.record(start.elapsed(), &out);
                (d, out)
            }
            _ => {
                let Some(Reverse((now, _, event))) = events.pop() else {
                    break;
                };
                let input = match event {
                    Event::Arrival => {
                        created += 1;
                        if created < calls {
                            push(
                                &mut events,
                                now + exp_ms(&mut rng, mean_gap_secs),
                                Event::Arrival,
                            );
                        }
                        let id = format!("call-{created}");
                        let q = rng.random_range(0..QUEUES);
                        handle.insert(id.clone(), exp_ms(&mut rng, AHT_SECS));
                        push(
                            &mut events,
                            now + exp_ms(&mut rng, PATIENCE_SECS),
                            Event::Abandon(id.clone()),
                        );
                        Input::Routed(CallRouted {
                            call_id: id,
                            seq: 2,
                            queue: format!("q{q}"),
                            priority: rng.random_range(0..3),
                            requirements: vec![SkillRequirement {
                                skill: format!("s{q}"),
                                min_level: rng.random_range(1..=6),
                            }],
                            relaxation: vec![RelaxationStep {
                                after_secs: 20,
                                requirements: vec![SkillRequirement {
                                    skill: format!("s{q}"),
                                    min_level: 1,
                                }],
                            }],
                            overflow: Vec::new(),
                            channel: Channel::Voice,
                            customer_tier: "standard".into(),
                            customer_id: None,
                            rule: "bench".into(),
                            lookup_ok: true,
                            routed_at_ms: now,
                        })
                    }
                    Event::Accept(agent, call) => Input::Accept(OfferAnswer {
                        agent_id: agent,
                        call_id: call,
                    }),
                    Event::Abandon(call) => {
                        if assigned.contains_key(&call) || !handle.contains_key(&call) {
                            continue;
                        }
                        Input::Hangup(CallHangup {
                            call_id: call,
                            reason: None,
                        })
                    }
                    Event::End(call) => Input::Hangup(CallHangup {
                        call_id: call,
                        reason: None,
                    }),
                };
                let start = Instant::now();
                let result = engine.apply(now, input);
                let elapsed = start.elapsed();
                match result {
                    Ok(applied) => {
                        timing.record(elapsed, &applied.outputs);
                        (now, applied.outputs)
                    }
                    Err(e) => {
                        eprintln!("engine refused an input at {now}: {e}");
                        return;
                    }
                }
            }
        };
        for o in &outputs {
            if let Output::Call { event, update } = o {
                match event {
                    CallEvent::Offered => {
                        if let Some(agent) = &update.agent {
                            push(
                                &mut events,
                                now,
                                Event::Accept(agent.clone(), update.call_id.clone()),
                            );
                        }
                    }
                    CallEvent::Assigned => {
                        answered += 1;
                        assigned.insert(update.call_id.clone(), true);
                        let h = handle.get(&update.call_id).copied().unwrap_or(0);
                        push(&mut events, now + h, Event::End(update.call_id.clone()));
                    }
                    CallEvent::Abandoned | CallEvent::Ended => {
                        abandoned += u64::from(*event == CallEvent::Abandoned);
                        handle.remove(&update.call_id);
                        assigned.remove(&update.call_id);
                    }
                    _ => {}
                }
            }
        }
        max_waiting = max_waiting.max(engine.active_calls().saturating_sub(assigned.len()));
    }
    let wall = wall.elapsed();
    timing.decision_latencies.sort();
    timing.all_latencies.sort();
    let d = &timing.decision_latencies;
    let us = |x: Duration| x.as_secs_f64() * 1e6;
    println!(
        "{created} calls ({answered} answered, {abandoned} abandoned), {} engine calls, \
         up to {max_waiting} calls waiting, wall {:.1} s (driver included)",
        timing.all_latencies.len(),
        wall.as_secs_f64()
    );
    println!(
        "decisions: {} in {:.2} s of engine time = {:.0} decisions/s",
        timing.decisions,
        timing.engine_time.as_secs_f64(),
        timing.decisions as f64 / timing.engine_time.as_secs_f64()
    );
    println!(
        "decision latency (engine calls that made an offer): p50 {:.1} µs, p99 {:.1} µs, \
         p99.9 {:.1} µs, max {:.1} µs",
        us(percentile(d, 0.50)),
        us(percentile(d, 0.99)),
        us(percentile(d, 0.999)),
        us(percentile(d, 1.0))
    );
    // On a shared machine a few calls are preempted by the OS scheduler (a few ms each);
    // show the throughput without calls slower than 1 ms too, and how many there were.
    let slow: Vec<&Duration> = timing
        .all_latencies
        .iter()
        .filter(|d| **d > Duration::from_millis(1))
        .collect();
    let slow_time: Duration = slow.iter().copied().sum();
    println!(
        "  without the {} engine calls slower than 1 ms ({:.2} s): {:.0} decisions/s",
        slow.len(),
        slow_time.as_secs_f64(),
        timing.decisions as f64 / (timing.engine_time - slow_time).as_secs_f64()
    );
    let a = &timing.all_latencies;
    println!(
        "all engine calls: p50 {:.1} µs, p99 {:.1} µs",
        us(percentile(a, 0.50)),
        us(percentile(a, 0.99))
    );
    let stats = engine.stats(0);
    let waiting: u64 = stats.iter().map(|s| s.waiting).sum();
    println!(
        "queues reporting: {}, waiting at end: {waiting}",
        stats.len()
    );
    // The adapter persists this in a KV bucket: its size matters (NATS max payload).
    let started = Instant::now();
    let snapshot = serde_json::to_vec(&engine.snapshot()).unwrap_or_default();
    println!(
        "snapshot: {} KiB of JSON ({} agents), serialised in {:.1} ms",
        snapshot.len() / 1024,
        AGENTS,
        started.elapsed().as_secs_f64() * 1000.0
    );
}
