//! Functions end to end: the real `patchbay` CLI deploys real components into a real
//! registry; real `patchbay-runtime` nodes run them on a real nats-server with mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use patchbay_bus::reply::{ErrorKind, InvokeReply};
use patchbay_bus::{CloudEvent, RequestOptions, Token};
use patchbay_tests::{Stack, next_message};

async fn invoke(
    stack_bus: &patchbay_bus::Bus,
    name: &str,
    ty: &str,
    data: serde_json::Value,
) -> InvokeReply {
    let event = CloudEvent::new("/test", ty).json(&data).unwrap();
    let subject = stack_bus.subjects().fn_invoke(&Token::new(name).unwrap());
    let reply = stack_bus
        .request(
            &subject,
            &event,
            RequestOptions::timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployed_function_answers_invoke_and_ls_shows_version_trigger_and_digest() {
    let stack = Stack::start().await;
    let _node = stack.spawn_runtime("node-1");
    let deployed = stack.deploy(
        "misbehave",
        "misbehave",
        patchbay_tests::MISBEHAVE_ON_SUBJECT,
    );
    assert_eq!(deployed["version"], 1);

    let admin = stack.admin().await;
    match invoke(&admin, "misbehave", "ok", serde_json::json!({"n": 1})).await {
        InvokeReply::Ok {
            version, outputs, ..
        } => {
            assert_eq!(version, 1);
            assert_eq!(outputs.len(), 1);
            assert_eq!(outputs[0]["natssubject"], "cc.v1.tests.out");
        }
        other => panic!("unexpected reply {other:?}"),
    }
    match invoke(&admin, "nope", "ok", serde_json::json!({})).await {
        InvokeReply::Error { kind, .. } => assert_eq!(kind, ErrorKind::UnknownFunction),
        other => panic!("unexpected reply {other:?}"),
    }

    let ls = stack.cli(&["fn", "ls", "--json"]).success().json();
    let row = &ls[0];
    assert_eq!(row["name"], "misbehave");
    assert_eq!(row["version"], 1);
    assert_eq!(row["trigger"], "subject:cc.v1.tests.in");
    assert_eq!(row["digest"], deployed["digest"]);
    let described = stack
        .cli(&["fn", "describe", "misbehave", "--json"])
        .success()
        .json();
    assert_eq!(described["versions"][0]["config"]["out"], "cc.v1.tests.out");

    // A publish on the trigger subject runs it too; its output arrives.
    let mut outputs = admin.client().subscribe("cc.v1.tests.out").await.unwrap();
    admin.client().flush().await.unwrap();
    let event = CloudEvent::new("/test", "ok")
        .json(&serde_json::json!({}))
        .unwrap();
    admin.publish("cc.v1.tests.in", &event, None).await.unwrap();
    let got = next_message(&mut outputs, Duration::from_secs(10), "the output event").await;
    let out = CloudEvent::from_message(got.headers.as_ref(), &got.payload).unwrap();
    assert_eq!(out.ty, "ok");
}

/// `fn deploy <misbehave> --name <name> <flags>`, expected to be refused; its stderr.
fn refused_deploy(stack: &Stack, name: &str, flags: &[&str]) -> String {
    let path = patchbay_tests::component("misbehave");
    let mut args = vec!["fn", "deploy", path.to_str().unwrap(), "--name", name];
    args.extend_from_slice(&["--wait", "0s"]);
    args.extend_from_slice(flags);
    stack.cli(&args).failure().stderr()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_the_access_policy_would_break_are_refused_naming_what_is_allowed_and_store_nothing()
 {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let js = admin.jetstream();
    // A stream runtime nodes may pull from, gone: the deploy must fail before any upload.
    js.delete_stream("CC_RECORDINGS").await.unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--trigger", "subject:>"],
            &[
                "runtime nodes may subscribe to",
                "cc.v1.>",
                "`>` is not covered",
            ],
        ),
        (
            &["--trigger", "subject:$SYS.>"],
            &["patchbay.v1.fn.*.invoke", "`$SYS.>` is not covered"],
        ),
        (
            &["--trigger", "subject:crm.v1.in"],
            &["`crm.v1.in` is not covered"],
        ),
        (
            &["--publish", "$JS.API.>"],
            &["runtime nodes may publish", "`$JS.API.>` is not covered"],
        ),
        (&["--publish", "_INBOX.>"], &["`_INBOX.>` is not covered"]),
        (
            &["--publish", "cc.v1.calls.*.routed"],
            &["owned by routing"],
        ),
        (
            &["--trigger", "stream:CC_AGENT_CMDS:cc.v1.agents.*.cmd.>"],
            &[
                "may pull from",
                "CC_CALLS/fn-*",
                "CC_AGENT_CMDS/fn-refused-6",
            ],
        ),
        (
            &["--trigger", "stream:CC_RECORDINGS:cc.v1.recordings.>"],
            &["stream CC_RECORDINGS does not exist"],
        ),
        (&["--canary", "150"], &["canary"]),
    ];
    for (i, (flags, expected)) in cases.iter().enumerate() {
        let name = format!("refused-{i}");
        let stderr = refused_deploy(&stack, &name, flags);
        for text in *expected {
            assert!(stderr.contains(text), "{flags:?}: {text:?} not in {stderr}");
        }
        assert!(!stderr.contains("uploaded"), "{flags:?} uploaded: {stderr}");
    }
    // Nothing was stored: no function, no artifact.
    let ls = stack.cli(&["fn", "ls", "--json"]).success().json();
    assert_eq!(ls, serde_json::json!([]));
    let bytes = std::fs::read(patchbay_tests::component("misbehave")).unwrap();
    let digest = patchbay_registry::digest(&bytes);
    let artifacts = js.get_object_store("patchbay-artifacts").await.unwrap();
    assert!(
        artifacts.info(&digest).await.is_err(),
        "a refused deploy uploaded the artifact"
    );

    // The same component with workable settings goes through (and only then is uploaded).
    let path = patchbay_tests::component("misbehave");
    let out = stack
        .cli(&[
            "fn",
            "deploy",
            path.to_str().unwrap(),
            "--name",
            "accepted",
            "--wait",
            "0s",
            "--trigger",
            "subject:cc.v1.tests.in",
            "--publish",
            "cc.v1.calls.>",
        ])
        .success();
    assert!(out.stderr().contains("uploaded"), "{out:?}");
    // A broad allow-list entry is accepted, with a note on what the server will refuse.
    assert!(
        out.stderr().contains("cc.v1.calls.*.routed (routing)"),
        "{out:?}"
    );
    assert!(artifacts.info(&digest).await.is_ok());
}

/// Make the access policy stored at bootstrap (what `fn deploy` checks triggers against)
/// let runtime nodes subscribe to `pattern` too, while the server's own configuration,
/// rendered from the policy at `patchbay up`, still refuses it: a stale stored policy,
/// say `deploy/access.toml` widened but the server config not re-rendered.
async fn widen_stored_runtime_subscribe(admin: &patchbay_bus::Bus, pattern: &str) {
    use patchbay_control::admission::{ACCESS_BUCKET, RULES_KEY, StoredRules};
    let store = admin
        .jetstream()
        .get_key_value(ACCESS_BUCKET)
        .await
        .unwrap();
    let stored = store.get(RULES_KEY).await.unwrap().unwrap();
    let mut rules: StoredRules = serde_json::from_slice(&stored).unwrap();
    rules
        .hosts
        .get_mut("runtime")
        .unwrap()
        .subscribe
        .push(pattern.to_owned());
    store
        .put(RULES_KEY, serde_json::to_vec(&rules).unwrap().into())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_the_server_refuses_is_reported_failed_with_the_reason_by_deploy_ls_and_describe()
{
    // `fn deploy` accepts a subject the node may not subscribe to (the stored policy is
    // stale); the server refuses the subscription. The node reports the function failed,
    // and every view of it says so instead of "serving on node-1".
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    widen_stored_runtime_subscribe(&admin, "crm.v1.>").await;
    let _node = stack.spawn_runtime("node-1");
    let _ = stack.deploy("misbehave", "working", patchbay_tests::MISBEHAVE_ON_SUBJECT);

    let path = patchbay_tests::component("misbehave");
    let out = stack
        .cli(&[
            "fn",
            "deploy",
            path.to_str().unwrap(),
            "--name",
            "refused-sub",
            "--trigger",
            "subject:crm.v1.in",
            "--wait",
            "20s",
        ])
        .failure();
    let stderr = out.stderr().to_lowercase();
    assert!(
        stderr.contains("trigger failed on node-1"),
        "{}",
        out.stderr()
    );
    let refusal = "permissions violation for subscription to \"crm.v1.in\"";
    assert!(stderr.contains(refusal), "{}", out.stderr());
    assert!(!out.stdout().contains("serving on"), "{}", out.stdout());

    // `fn ls`: the node's state per function, the reason in the JSON.
    let ls = stack.cli(&["fn", "ls", "--json"]).success().json();
    let row = |name: &str| {
        ls.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {ls:#}"))
            .clone()
    };
    let refused = row("refused-sub");
    assert_eq!(refused["nodes"].as_array().unwrap().len(), 1, "{refused:#}");
    let on_node = &refused["nodes"][0];
    assert_eq!(on_node["node"], "node-1", "{refused:#}");
    assert_eq!(on_node["state"], "failed", "{refused:#}");
    assert_eq!(on_node["trigger"], "subject:crm.v1.in", "{refused:#}");
    let reason = on_node["reason"].as_str().unwrap().to_lowercase();
    assert!(reason.contains(refusal), "{refused:#}");
    let working = row("working");
    assert_eq!(working["nodes"][0]["node"], "node-1", "{working:#}");
    assert_eq!(working["nodes"][0]["state"], "serving", "{working:#}");
    assert!(working["nodes"][0]["reason"].is_null(), "{working:#}");

    let table = stack.cli(&["fn", "ls"]).success().stdout();
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{table}"))
            .to_owned()
    };
    assert!(table.lines().next().unwrap().contains("NODES"), "{table}");
    assert!(line("refused-sub").contains("node-1 FAILED"), "{table}");
    let working_line = line("working");
    assert!(
        working_line.contains("node-1") && !working_line.contains("FAILED"),
        "{table}"
    );

    // `fn describe`: which node, which trigger, and the server's reason.
    let described = stack
        .cli(&["fn", "describe", "refused-sub"])
        .success()
        .stdout();
    let node_line = described
        .lines()
        .find(|l| l.contains("node-1"))
        .unwrap_or_else(|| panic!("node-1 missing from\n{described}"));
    assert!(
        node_line.contains("FAILED  trigger subject:crm.v1.in: "),
        "{described}"
    );
    assert!(node_line.to_lowercase().contains(refusal), "{described}");
    let described = stack
        .cli(&["fn", "describe", "refused-sub", "--json"])
        .success()
        .json();
    assert_eq!(described["nodes"][0]["state"], "failed", "{described:#}");
    assert!(
        described["nodes"][0]["reason"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains(refusal),
        "{described:#}"
    );
    let described = stack.cli(&["fn", "describe", "working"]).success().stdout();
    assert!(described.contains("node-1  v1  serving"), "{described}");
}
