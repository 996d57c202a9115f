//! One system, two layouts: the same call flow through `--topology split` (a process per
//! service) and `--topology monolith` (one `patchbay-node` running them all) yields the
//! same events; inside the monolith each service keeps its own identity; and a service
//! whose task panics comes back while the others keep answering.
//!
//! Everything is real: nats-server with mTLS, the service binaries or `patchbay-node`,
//! the example components. The flow goes through the gateway's HTTP API as a telephony
//! adapter and an agent desktop would.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use patchbay_tests::gateway::http_client;
use patchbay_tests::{Process, Stack, eventually, free_port, http_get, metric_value, wait_ready};
use reqwest::StatusCode;
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Split,
    Monolith,
}

/// The services of a started layout: its processes, the gateway's URL and each
/// process's admin listener.
struct System {
    processes: Vec<Process>,
    gateway: String,
    admins: Vec<String>,
}

fn agents_config(stack: &Stack) -> PathBuf {
    let path = stack.state_dir().join("agents.toml");
    std::fs::write(&path, "offer_timeout_ms = 60000\nwrap_up_ms = 300\n").unwrap();
    path
}

fn address_file(stack: &Stack) -> PathBuf {
    stack
        .state_dir()
        .join(format!("gateway-{}.addr", free_port()))
}

async fn start(stack: &Stack, layout: Layout, extra: &[&str]) -> System {
    // Open around the clock: the flow must not depend on the hour the test runs at.
    let rules = patchbay_tests::always_open_rules(stack.state_dir());
    let rules = rules.to_str().unwrap();
    let agents = agents_config(stack);
    let agents = agents.to_str().unwrap();
    let address_file = address_file(stack);
    let address = address_file.to_str().unwrap();
    let mut processes = Vec::new();
    let mut admins = Vec::new();
    match layout {
        Layout::Split => {
            let runs: [(&str, &str, Vec<&str>); 4] = [
                (
                    "patchbay-runtime",
                    "runtime/node-1",
                    vec!["--node", "node-1"],
                ),
                (
                    "patchbay-routing",
                    "service/routing",
                    vec!["--rules", rules],
                ),
                (
                    "patchbay-agents",
                    "service/agents",
                    vec!["run", "--config", agents],
                ),
                (
                    "patchbay-gateway",
                    "gateway/gateway",
                    vec!["--listen", "127.0.0.1:0", "--address-file", address],
                ),
            ];
            for (binary, identity, args) in runs {
                let admin = format!("127.0.0.1:{}", free_port());
                let env = [
                    ("PATCHBAY_ADMIN_LISTEN", admin.as_str()),
                    ("PATCHBAY_DRAIN_TIMEOUT", "5s"),
                ];
                processes.push(stack.spawn_binary(binary, identity, binary, &args, &env));
                admins.push(admin);
            }
        }
        Layout::Monolith => {
            let admin = format!("127.0.0.1:{}", free_port());
            let certs = stack.state_dir().join("certs");
            let flags = [
                "runtime=--node=node-1".to_owned(),
                format!("routing=--rules={rules}"),
                format!("agents=--config={agents}"),
                "gateway=--listen=127.0.0.1:0".to_owned(),
                format!("gateway=--address-file={address}"),
            ];
            let mut args: Vec<String> = flags
                .iter()
                .flat_map(|f| ["--service-arg".to_owned(), f.clone()])
                .collect();
            args.extend(extra.iter().map(|s| (*s).to_owned()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env = [
                ("PATCHBAY_ADMIN_LISTEN", admin.as_str()),
                ("PATCHBAY_DRAIN_TIMEOUT", "5s"),
                ("PATCHBAY_CERTS_DIR", certs.to_str().unwrap()),
            ];
            // Its own certificate variables are those of the admin identity: the node must
            // not use them for any service.
            processes.push(stack.spawn_binary("patchbay-node", "cli/admin", "node", &args, &env));
            admins.push(admin);
        }
    }
    for admin in &admins {
        wait_ready(admin, READY).await;
    }
    let gateway = eventually(READY, "gateway address file", || {
        let file = address_file.clone();
        async move { std::fs::read_to_string(file).ok().filter(|a| !a.is_empty()) }
    })
    .await;
    System {
        processes,
        gateway: format!("http://{gateway}"),
        admins,
    }
}

/// POST a CloudEvent (binary mode) through the gateway.
async fn post_event(
    client: &reqwest::Client,
    system: &System,
    token: &str,
    subject: &str,
    ty: &str,
    data: Value,
) {
    let id = format!("{subject}-{}", free_port());
    let response = client
        .post(format!("{}/v1/events/{subject}", system.gateway))
        .bearer_auth(token)
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "/topology-test")
        .header("ce-type", ty)
        .header("content-type", "application/json")
        .body(data.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert!(
        status.is_success(),
        "{subject}: {status} {}",
        response.text().await.unwrap()
    );
}

/// The events the flow is judged by, in the order each subject first showed them:
/// `<subject> <type> <what changed>`.
async fn call_flow(stack: &Stack, system: &System) -> Vec<String> {
    let admin = stack.admin().await;
    let mut seen = admin.client().subscribe("cc.v1.>").await.unwrap();
    let token = stack.token("flow", &["admin"], &[]);
    let client = http_client(None);
    let _ = stack.deploy_customer_lookup();
    let _ = stack.deploy(
        "survey-scheduler",
        "survey-scheduler",
        &[
            "--trigger",
            "stream:CC_CALLS:cc.v1.calls.*.ended",
            "--publish",
            "cc.v1.surveys.*.scheduled",
            "--config",
            "delay_minutes=0",
            "--config",
            "min_duration_s=0",
        ],
    );

    let profile = json!({ "skills": [], "queues": [{ "queue": "general" }] });
    post_event(
        &client,
        system,
        &token,
        "cc.v1.agents.a-1.cmd.state",
        "cc.agent.command.v1",
        json!({ "agent_id": "a-1", "state": "available", "profile": profile }),
    )
    .await;
    post_event(
        &client,
        system,
        &token,
        "cc.v1.calls.c-1.incoming",
        "cc.call.incoming.v1",
        json!({ "call_id": "c-1", "dialled": "+442079460000", "caller": "+44 20 7946 0000" }),
    )
    .await;

    let mut lines = Vec::new();
    let mut accepted = false;
    let mut hung_up = false;
    let deadline = tokio::time::Instant::now() + READY;
    // Done when the downstream function has run and the agent is back from wrap-up: the
    // two ends of the flow, whichever comes first.
    let done = |lines: &[String]| {
        lines
            .iter()
            .any(|l| l.starts_with("cc.v1.surveys.c-1.scheduled"))
            && lines.iter().any(|l| {
                l.starts_with("cc.v1.agents.a-1.") && l.contains("from=wrap-up to=available")
            })
    };
    while !done(&lines) {
        let message = tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut seen))
            .await
            .unwrap_or_else(|_| panic!("the flow stalled after {lines:#?}"))
            .unwrap();
        let subject = message.subject.to_string();
        if subject.contains(".cmd.")
            || subject.ends_with(".reply")
            || subject.starts_with("cc.v1.customers")
        {
            continue;
        }
        let event =
            patchbay_bus::CloudEvent::from_message(message.headers.as_ref(), &message.payload)
                .unwrap();
        let data: Value = serde_json::from_slice(&message.payload).unwrap_or(Value::Null);
        let what = ["state", "from", "to", "queue", "agent", "customer_tier"]
            .iter()
            .filter_map(|k| {
                data.get(*k)
                    .and_then(Value::as_str)
                    .map(|v| format!("{k}={v}"))
            })
            .collect::<Vec<_>>()
            .join(" ");
        lines.push(format!("{subject} {} {what}", event.ty));
        if subject == "cc.v1.calls.c-1.offered" && !accepted {
            accepted = true;
            post_event(
                &client,
                system,
                &token,
                "cc.v1.agents.a-1.cmd.accept",
                "cc.agent.command.v1",
                json!({ "agent_id": "a-1", "call_id": "c-1" }),
            )
            .await;
        }
        if subject == "cc.v1.calls.c-1.assigned" && !hung_up {
            hung_up = true;
            post_event(
                &client,
                system,
                &token,
                "cc.v1.calls.c-1.hangup",
                "cc.call.hangup.v1",
                json!({ "call_id": "c-1" }),
            )
            .await;
        }
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_flow_yields_the_same_events_split_and_monolith() {
    let mut flows = Vec::new();
    for layout in [Layout::Split, Layout::Monolith] {
        let stack = Stack::start().await;
        let mut system = start(&stack, layout, &[]).await;
        let flow = call_flow(&stack, &system).await;
        for process in &mut system.processes {
            assert!(
                process.terminate(Duration::from_secs(30)),
                "{layout:?} must drain and exit 0:\n{}",
                process.log()
            );
        }
        flows.push((layout, flow));
    }
    let (split, monolith) = (&flows[0].1, &flows[1].1);
    for step in [
        "cc.v1.calls.c-1.incoming",
        "cc.v1.calls.c-1.routed",
        "cc.v1.calls.c-1.queued",
        "cc.v1.calls.c-1.offered",
        "cc.v1.calls.c-1.assigned",
        "cc.v1.calls.c-1.ended",
        "cc.v1.surveys.c-1.scheduled",
    ] {
        assert!(
            split.iter().any(|l| l.starts_with(step)),
            "split never showed {step}: {split:#?}"
        );
    }
    assert!(
        split
            .iter()
            .any(|l| l.starts_with("cc.v1.calls.c-1.routed") && l.contains("customer_tier=")),
        "routing used the customer lookup: {split:#?}"
    );
    let calls = |flow: &[String]| -> Vec<String> {
        flow.iter()
            .filter(|l| l.starts_with("cc.v1.calls.") || l.starts_with("cc.v1.surveys."))
            .cloned()
            .collect()
    };
    assert_eq!(
        calls(monolith),
        calls(split),
        "the same call events in both layouts"
    );
    let agent = |flow: &[String]| -> Vec<String> {
        flow.iter()
            .filter(|l| l.starts_with("cc.v1.agents.a-1"))
            .cloned()
            .collect()
    };
    assert_eq!(
        agent(monolith),
        agent(split),
        "the same agent events in both layouts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_the_monolith_each_service_connects_as_itself_and_reports_its_own_readiness() {
    let stack = Stack::start_monitored().await;
    let system = start(&stack, Layout::Monolith, &[]).await;
    let connz: Value = eventually(READY, "four service connections", || async {
        let body = http_get(&stack.monitoring(), "/connz?auth=true").await?.1;
        let connz: Value = serde_json::from_str(&body).ok()?;
        (connz["connections"].as_array()?.len() >= 4).then_some(connz)
    })
    .await;
    let mut users: Vec<String> = connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["authorized_user"].as_str())
        .map(|u| {
            u.rsplit('/')
                .take(2)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    users.sort();
    assert_eq!(
        users,
        [
            "gateway/gateway",
            "runtime/node-1",
            "service/agents",
            "service/routing"
        ],
        "one connection per service, each with its own identity (never the process's admin certificate): {connz:#}"
    );

    let (status, body) = http_get(&system.admins[0], "/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let checks: Value = serde_json::from_str::<Value>(&body).unwrap()["checks"].clone();
    for service in ["gateway", "routing", "agents", "runtime"] {
        assert!(
            checks
                .as_object()
                .unwrap()
                .iter()
                .any(|(name, ready)| name.starts_with(&format!("{service}/")) && ready == true),
            "{service} reports its readiness: {checks}"
        );
    }
    let (_, metrics) = http_get(&system.admins[0], "/metrics").await.unwrap();
    let unnamed: Vec<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter(|l| !l.starts_with("patchbay_telemetry_") && !l.starts_with("patchbay_node_"))
        .filter(|l| !l.contains("service=\""))
        .collect();
    assert!(
        unnamed.is_empty(),
        "every service series names its service: {unnamed:#?}"
    );
    assert!(metrics.contains("service=\"runtime\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_service_comes_back_while_the_others_keep_answering() {
    let stack = Stack::start().await;
    let system = start(&stack, Layout::Monolith, &["--inject-panic", "routing=3s"]).await;
    let admin = &system.admins[0];
    let token = stack.token("during", &["admin"], &[]);
    let client = http_client(None);
    let _ = stack.deploy_customer_lookup();

    // Until routing has been restarted, the gateway and the runtime keep serving: every
    // invocation through the gateway succeeds.
    let mut invocations = 0;
    let deadline = tokio::time::Instant::now() + READY;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "routing never came back"
        );
        let response = client
            .post(format!(
                "{}/v1/functions/customer-lookup/invoke",
                system.gateway
            ))
            .bearer_auth(&token)
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("lookup-{invocations}"))
            .header("ce-source", "/topology-test")
            .header("ce-type", "cc.customer.lookup.v1")
            .header("content-type", "application/json")
            .body(json!({ "phone": "+44 20 7946 0000" }).to_string())
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert_eq!(
            status,
            StatusCode::OK,
            "invocation {invocations}: {}",
            response.text().await.unwrap()
        );
        invocations += 1;
        let (_, metrics) = http_get(admin, "/metrics").await.unwrap();
        let restarts = metric_value(
            &metrics,
            r#"patchbay_node_service_restarts_total{service="routing"}"#,
        );
        let (ready, _) = http_get(admin, "/readyz").await.unwrap();
        if restarts >= 1.0 && ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        invocations >= 5,
        "requests were made while routing was down ({invocations})"
    );

    // And the restarted routing routes.
    let admin_bus = stack.admin().await;
    let mut routed = admin_bus
        .client()
        .subscribe("cc.v1.calls.c-9.routed")
        .await
        .unwrap();
    post_event(
        &client,
        &system,
        &token,
        "cc.v1.calls.c-9.incoming",
        "cc.call.incoming.v1",
        json!({ "call_id": "c-9", "dialled": "+442079460000", "caller": "+44 20 7946 0000" }),
    )
    .await;
    tokio::time::timeout(READY, futures::StreamExt::next(&mut routed))
        .await
        .expect("the restarted routing service routes the next call");
}
