//! Simulation tests: agreement with Erlang C, sensitivity to the engine's rules, replay.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

const ERLANG_SCENARIO: &str = include_str!("../../scenarios/erlang-14-agents.toml");

#[test]
fn the_example_scenario_asks_the_planners_question() {
    let scenario = Scenario::from_toml(ERLANG_SCENARIO).unwrap();
    let erlang = scenario.erlang().expect("steady load and staffing");
    assert_eq!(erlang.agents, 14);
    assert!((erlang.traffic - 10.0).abs() < 1e-9);
    assert!((erlang.p_wait - 0.17).abs() < 0.01);
    assert!((erlang.service_level - 0.89).abs() < 0.01);
    assert!((erlang.asa_secs - 7.8).abs() < 0.1);
}

#[test]
fn the_simulation_agrees_with_erlang_c_inside_its_confidence_interval() {
    // The planner's question exactly as the example scenario asks it: 30 replications of
    // an 8-hour day (30 minutes of warm-up), Poisson arrivals, exponential handle times,
    // no abandonment, fixed seed.
    let scenario = Scenario::from_toml(ERLANG_SCENARIO).unwrap();
    let report = run(&scenario).unwrap();
    let erlang = report.erlang.unwrap();
    assert_eq!(report.abandon_rate.mean, 0.0);
    for (name, estimate, expected) in [
        ("P(wait)", report.p_wait, erlang.p_wait),
        (
            "SL 20 s",
            report.service_level_of_answered,
            erlang.service_level,
        ),
        ("ASA", report.asa_secs, erlang.asa_secs),
        ("occupancy", report.occupancy, erlang.occupancy),
    ] {
        assert!(
            estimate.contains(expected),
            "{name}: simulated {:.4} ± {:.4}, Erlang C {expected:.4}\n{report}",
            estimate.mean,
            estimate.half_width
        );
        // And the interval is tight enough to mean something.
        assert!(
            estimate.half_width < 0.3 * expected,
            "{name} interval too wide"
        );
    }
}

fn relaxation_scenario(ignore_relaxation: bool) -> Scenario {
    let text = r#"
        seed = 11
        replications = 6
        warmup_secs = 600
        cycles = 4

        [engine]
        wrap_up_ms = 0

        [[groups]]
        name = "expert"
        skills = [{ skill = "billing", level = 9 }]

        [[groups]]
        name = "generalist"
        skills = [{ skill = "billing", level = 3 }]

        [[call_types]]
        queue = "billing"
        requirements = [{ skill = "billing", min_level = 8 }]
        relaxation = [{ after_secs = 10, requirements = [{ skill = "billing", min_level = 1 }] }]
        handle = { kind = "exponential", mean_secs = 180 }
        patience = { kind = "exponential", mean_secs = 90 }

        [[intervals]]
        duration_secs = 1800
        calls = 80
        agents = { expert = 3, generalist = 8 }
    "#;
    let mut scenario = Scenario::from_toml(text).unwrap();
    scenario.engine.ignore_relaxation = ignore_relaxation;
    scenario
}

#[test]
fn a_broken_selection_rule_changes_the_simulated_result() {
    // Same arrivals, same agents; the only difference is whether the engine applies the
    // calls' relaxation steps. Experts alone cannot carry 8 Erlangs.
    let working = run(&relaxation_scenario(false)).unwrap();
    let broken = run(&relaxation_scenario(true)).unwrap();
    let (good, bad) = (
        working.service_level_of_offered,
        broken.service_level_of_offered,
    );
    assert!(
        good.mean - good.half_width > bad.mean + bad.half_width,
        "relaxation on: {:.3} ± {:.3}, off: {:.3} ± {:.3}",
        good.mean,
        good.half_width,
        bad.mean,
        bad.half_width
    );
    assert!(broken.abandon_rate.mean > working.abandon_rate.mean + 0.2);
}

#[test]
fn replications_with_the_same_seed_are_identical() {
    let scenario = relaxation_scenario(false);
    let a = run_replication(&scenario, 3).unwrap();
    let b = run_replication(&scenario, 3).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.counters, run_replication(&scenario, 4).unwrap().counters);
}

#[test]
fn staffing_follows_the_interval_plan() {
    // Nobody works the second interval: its calls all abandon.
    let text = r#"
        replications = 1
        [engine]
        wrap_up_ms = 0
        [[call_types]]
        handle = { kind = "fixed", secs = 60 }
        patience = { kind = "fixed", secs = 30 }
        [[intervals]]
        duration_secs = 3600
        calls = 30
        agents = 5
        [[intervals]]
        duration_secs = 3600
        calls = 30
        agents = 0
    "#;
    let scenario = Scenario::from_toml(text).unwrap();
    assert!(scenario.erlang().is_none(), "staffing is not steady");
    let run = run_replication(&scenario, 0).unwrap();
    let c = run.counters;
    assert!(c.answered > 10 && c.abandoned > 10, "{c:?}");
    // In the first hour five agents at 0.5 Erlang answer at once.
    assert_eq!(c.answered_within_threshold, c.answered);
}

#[test]
fn invalid_scenarios_are_refused_with_a_reason() {
    let no_calls = "[[intervals]]\nduration_secs = 60\ncalls = 1\nagents = 1\ncall_types = []";
    assert!(Scenario::from_toml(no_calls).is_err());
    let unknown_group = r#"
        [[call_types]]
        handle = { kind = "fixed", secs = 60 }
        [[intervals]]
        duration_secs = 60
        calls = 1
        agents = { nobody = 2 }
    "#;
    let err = Scenario::from_toml(unknown_group).unwrap_err();
    assert!(err.to_string().contains("nobody"), "{err}");
}

#[test]
fn a_recorded_log_replays_through_the_engine() {
    let log = r#"
{"at_ms":0,"input":{"set-state":{"agent_id":"a1","state":"available","profile":{"skills":[]}}}}
{"at_ms":1000,"input":{"routed":{"call_id":"c1","seq":2,"queue":"q","priority":0,"requirements":[],"channel":"voice","customer_tier":"gold","rule":"r","lookup_ok":true,"routed_at_ms":1000}}}
{"at_ms":2000,"input":{"routed":{"call_id":"c2","seq":2,"queue":"q","priority":0,"requirements":[],"channel":"voice","customer_tier":"gold","rule":"r","lookup_ok":true,"routed_at_ms":2000}}}
{"at_ms":3000,"input":{"accept":{"agent_id":"a1","call_id":"c1"}}}
{"at_ms":3000,"input":{"accept":{"agent_id":"a1","call_id":"c1"}}}
{"at_ms":9000,"input":{"hangup":{"call_id":"c2"}}}
{"at_ms":60000,"input":{"hangup":{"call_id":"c1"}}}
{"at_ms":61000,"input":{"accept":{"agent_id":"a1","call_id":"c2"}}}
"#;
    let config = EngineConfig {
        wrap_up_ms: 0,
        ..EngineConfig::default()
    };
    let report = replay(config, log.as_bytes()).unwrap();
    assert_eq!(report.inputs, 8);
    assert_eq!(report.ignored, 2, "the duplicate accept and the late one");
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    assert_eq!((report.total.answered, report.total.abandoned), (1, 1));
    assert_eq!(report.total.answer_wait_ms_total, 2000);

    let backwards = "{\"at_ms\":5,\"input\":{\"hangup\":{\"call_id\":\"x\"}}}\n{\"at_ms\":4,\"input\":{\"hangup\":{\"call_id\":\"x\"}}}";
    assert!(matches!(
        replay(EngineConfig::default(), backwards.as_bytes()),
        Err(SimError::LogOrder { line: 2, .. })
    ));
}

#[test]
fn estimates_carry_a_student_t_interval() {
    let e = Estimate::from_samples([Some(1.0), Some(2.0), Some(3.0), None]);
    assert_eq!(e.n, 3);
    assert!((e.mean - 2.0).abs() < 1e-12);
    // s = 1, t(2) = 4.303, n = 3.
    assert!((e.half_width - 4.303 / 3f64.sqrt()).abs() < 1e-9);
    assert!(e.contains(4.0) && !e.contains(4.5));
}
