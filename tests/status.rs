//! Discovery and `patchbay status` against a real stack: a runtime node, a gateway and the
//! routing service answer the NATS micro protocol (`$SRV.INFO|STATS`) over mTLS, and the
//! real `patchbay status --json` agrees with a raw `$SRV.INFO` scatter-gather.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::time::Duration;

use patchbay_bus::discovery::{self, InfoResponse, StatsResponse, Verb};
use patchbay_bus::reply::InvokeReply;
use patchbay_bus::{Bus, CloudEvent, RequestOptions, Token};
use patchbay_tests::{Stack, eventually, repo_root};
use serde_json::Value;

const WINDOW: Duration = Duration::from_millis(500);
const LIMIT: Duration = Duration::from_secs(30);

async fn infos(bus: &Bus) -> Vec<InfoResponse> {
    discovery::gather(bus, &Verb::Info.subject(None), WINDOW)
        .await
        .unwrap()
}

/// `(name, identity)` of every answer.
fn who(infos: &[InfoResponse]) -> BTreeSet<(String, String)> {
    infos
        .iter()
        .map(|i| {
            (
                i.name.clone(),
                i.metadata.get("identity").cloned().unwrap_or_default(),
            )
        })
        .collect()
}

fn expected(members: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    members
        .iter()
        .map(|(n, i)| ((*n).to_owned(), (*i).to_owned()))
        .collect()
}

fn status(stack: &Stack) -> Value {
    stack
        .cli(&[
            "status",
            "--json",
            "--interval",
            "200ms",
            "--timeout",
            "500ms",
        ])
        .success()
        .json()
}

fn component_ids(status: &Value) -> BTreeSet<String> {
    status["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

fn function<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no function {name} in {status:#}"))
}

fn served_by(function: &Value) -> Vec<String> {
    function["served_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["component"].as_str().unwrap().to_owned())
        .collect()
}

async fn invoke_echo(admin: &Bus) {
    let event = CloudEvent::new("/test", "status.test")
        .json(&serde_json::json!({}))
        .unwrap();
    let subject = admin.subjects().fn_invoke(&Token::new("echo").unwrap());
    let reply = admin
        .request(
            &subject,
            &event,
            RequestOptions::timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let reply: InvokeReply = serde_json::from_slice(&reply.payload).unwrap();
    assert!(matches!(reply, InvokeReply::Ok { .. }), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_info_and_status_list_the_running_components_functions_and_invocations() {
    let stack = Stack::start().await;
    let _node = stack.spawn_runtime("node-1");
    let gateway = stack.spawn_gateway(&[]).await;
    let rules = repo_root().join("deploy/routing.toml");
    let mut routing = stack.spawn_binary(
        "patchbay-routing",
        "service/routing",
        "routing",
        &["--rules", rules.to_str().unwrap()],
        &[],
    );
    let _ = stack.deploy(
        "echo",
        "echo",
        &[
            "--config",
            "out=cc.v1.tests.echoed",
            "--publish",
            "cc.v1.tests.>",
        ],
    );
    let _ = stack
        .cli(&[
            "fn",
            "deploy",
            patchbay_tests::component("http-echo").to_str().unwrap(),
            "--name",
            "hello",
            "--trigger",
            "http:/hello",
            "--json",
        ])
        .success();
    let admin = stack.admin().await;

    // A raw scatter-gather sees exactly the three running components, each once.
    let all = expected(&[
        ("patchbay-runtime", "runtime/node-1"),
        ("patchbay-gateway", "gateway/gateway"),
        ("patchbay-routing", "service/routing"),
    ]);
    let answered = eventually(LIMIT, "all three components answer $SRV.INFO", || async {
        let infos = infos(&admin).await;
        (who(&infos) == all).then_some(infos)
    })
    .await;
    assert_eq!(answered.len(), 3, "one answer per component: {answered:#?}");
    let node_info = answered
        .iter()
        .find(|i| i.name == "patchbay-runtime")
        .unwrap();
    assert_eq!(node_info.metadata["node"], "node-1");
    let gateway_info = answered
        .iter()
        .find(|i| i.name == "patchbay-gateway")
        .unwrap();
    assert_eq!(
        Some(gateway_info.metadata["listen"].as_str()),
        gateway.url.strip_prefix("http://")
    );

    // Five invocations of the event function, then status shows them on node-1.
    for _ in 0..5 {
        invoke_echo(&admin).await;
    }
    let info_ids: BTreeSet<String> = answered.iter().map(|i| i.id.clone()).collect();
    let now = eventually(LIMIT, "status shows both functions served", || async {
        let now = status(&stack);
        let hello = function(&now, "hello");
        (served_by(hello) == ["gateway/gateway"]).then_some(now)
    })
    .await;
    assert_eq!(component_ids(&now), info_ids, "{now:#}");
    for c in now["components"].as_array().unwrap() {
        assert_eq!(c["health"], "ok", "{c:#}");
        assert!(c["requests_per_second"].is_number(), "{c:#}");
    }
    let echo = function(&now, "echo");
    assert_eq!(echo["active_version"], 1);
    assert_eq!(echo["trigger"], "invoke");
    assert_eq!(served_by(echo), ["runtime/node-1"]);
    assert_eq!(echo["invocations"], 5, "{echo:#}");
    assert_eq!(echo["errors"], 0, "{echo:#}");
    let hello = function(&now, "hello");
    assert_eq!(hello["trigger"], "http:/hello");
    assert_eq!(hello["served_by"][0]["version"], 1);

    // The table names every component and function.
    let table = stack
        .cli(&["status", "--interval", "0s", "--timeout", "500ms"])
        .success()
        .stdout();
    eprintln!("{table}");
    for needle in [
        "runtime/node-1",
        "gateway/gateway",
        "service/routing",
        "echo",
        "hello",
    ] {
        assert!(table.contains(needle), "{needle} missing from:\n{table}");
    }

    // STATS carries the same count, per endpoint, in the protocol's own fields.
    let stats: Vec<StatsResponse> = discovery::gather(
        &admin,
        &Verb::Stats.subject(Some("patchbay-runtime")),
        WINDOW,
    )
    .await
    .unwrap();
    assert_eq!(stats.len(), 1, "{stats:#?}");
    let endpoint = stats[0]
        .endpoints
        .iter()
        .find(|e| e.name == "echo")
        .unwrap();
    assert_eq!((endpoint.num_requests, endpoint.num_errors), (5, 0));
    assert_eq!(endpoint.subject, "patchbay.v1.fn.echo.invoke");

    // A stopped component disappears from both.
    assert!(
        routing.terminate(Duration::from_secs(15)),
        "routing did not stop cleanly"
    );
    let without_routing = expected(&[
        ("patchbay-runtime", "runtime/node-1"),
        ("patchbay-gateway", "gateway/gateway"),
    ]);
    let remaining = eventually(LIMIT, "routing no longer answers $SRV.INFO", || async {
        let infos = infos(&admin).await;
        (who(&infos) == without_routing).then_some(infos)
    })
    .await;
    let remaining_ids: BTreeSet<String> = remaining.iter().map(|i| i.id.clone()).collect();
    let after = status(&stack);
    assert_eq!(component_ids(&after), remaining_ids, "{after:#}");
    assert!(
        after["components"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["name"] != "patchbay-routing"),
        "{after:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_whose_trigger_the_server_refuses_is_failed_in_srv_and_status_not_served() {
    // The access policy stored at bootstrap (what `fn deploy` checks against) lets runtime
    // nodes subscribe to `crm.v1.>`; the server's configuration, rendered at `patchbay up`,
    // does not. So the deploy is accepted, node-1 loads the function, the server refuses
    // its trigger's subscription — and discovery must not report it as served.
    use patchbay_control::admission::{ACCESS_BUCKET, RULES_KEY, StoredRules};
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let store = admin
        .jetstream()
        .get_key_value(ACCESS_BUCKET)
        .await
        .unwrap();
    let mut rules: StoredRules =
        serde_json::from_slice(&store.get(RULES_KEY).await.unwrap().unwrap()).unwrap();
    let runtime = rules.hosts.get_mut("runtime").unwrap();
    runtime.subscribe.push("crm.v1.>".to_owned());
    store
        .put(RULES_KEY, serde_json::to_vec(&rules).unwrap().into())
        .await
        .unwrap();
    let _node = stack.spawn_runtime("node-1");
    let _ = stack.deploy(
        "echo",
        "echo",
        &[
            "--config",
            "out=cc.v1.tests.echoed",
            "--publish",
            "cc.v1.tests.>",
        ],
    );
    let refused = stack
        .cli(&[
            "fn",
            "deploy",
            patchbay_tests::component("misbehave").to_str().unwrap(),
            "--name",
            "crm-in",
            "--trigger",
            "subject:crm.v1.in",
            "--wait",
            "20s",
        ])
        .failure();
    let refusal = "permissions violation for subscription to \"crm.v1.in\"";
    assert!(
        refused.stderr().to_lowercase().contains(refusal),
        "{refused:?}"
    );

    // On the wire: the node's endpoint for the function carries the reason, in INFO
    // metadata and as the STATS `last_error`; the working function's does not.
    let node_info = eventually(
        LIMIT,
        "node-1 reports crm-in failed in $SRV.INFO",
        || async {
            infos(&admin).await.into_iter().find(|i| {
                i.name == "patchbay-runtime"
                    && i.endpoints
                        .iter()
                        .any(|e| e.name == "crm-in" && e.failed().is_some())
            })
        },
    )
    .await;
    let endpoint = |name: &str| {
        node_info
            .endpoints
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no endpoint {name}: {node_info:#?}"))
    };
    let why = endpoint("crm-in").metadata[discovery::FAILED].clone();
    assert!(why.to_lowercase().contains(refusal), "{why}");
    assert_eq!(endpoint("crm-in").metadata["trigger"], "subject:crm.v1.in");
    assert_eq!(endpoint("echo").failed(), None, "{node_info:#?}");
    let stats: Vec<StatsResponse> = discovery::gather(
        &admin,
        &Verb::Stats.subject(Some("patchbay-runtime")),
        WINDOW,
    )
    .await
    .unwrap();
    let last_errors: Vec<(&str, &str)> = stats[0]
        .endpoints
        .iter()
        .map(|e| (e.name.as_str(), e.last_error.as_str()))
        .collect();
    assert!(
        last_errors.contains(&("crm-in", why.as_str())),
        "{last_errors:?}"
    );
    assert!(last_errors.contains(&("echo", "")), "{last_errors:?}");

    // `patchbay status --json`: counted, flagged, the reason per component, node degraded.
    let now = status(&stack);
    assert_eq!(now["failed_functions"], 1, "{now:#}");
    let crm = function(&now, "crm-in");
    assert_eq!(crm["failed"], true, "{crm:#}");
    assert_eq!(served_by(crm), ["runtime/node-1"], "{crm:#}");
    assert_eq!(crm["served_by"][0]["failed"], why.as_str(), "{crm:#}");
    let echo = function(&now, "echo");
    assert_eq!(echo["failed"], false, "{echo:#}");
    assert!(echo["served_by"][0]["failed"].is_null(), "{echo:#}");
    let node = now["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == "runtime/node-1")
        .unwrap();
    assert_eq!(node["health"], "degraded", "{node:#}");

    // The table flags it and names the node, the trigger and the reason.
    let table = stack
        .cli(&["status", "--interval", "0s", "--timeout", "500ms"])
        .success()
        .stdout();
    let crm_line = table
        .lines()
        .find(|l| l.starts_with("crm-in "))
        .unwrap_or_else(|| panic!("no crm-in row in\n{table}"));
    assert!(crm_line.contains("runtime/node-1 FAILED"), "{table}");
    assert!(table.contains("degraded"), "{table}");
    assert!(table.contains("1 function failed"), "{table}");
    assert!(
        table.contains(&format!(
            "crm-in on runtime/node-1 (trigger subject:crm.v1.in): {why}"
        )),
        "{table}"
    );
}
