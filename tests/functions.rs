//! Functions end to end: the real `patchbay` CLI deploys real components into a real
//! registry; real `patchbay-runtime` nodes run them on a real nats-server with mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use patchbay_bus::{CloudEvent, RequestOptions, Token};
use patchbay_host::reply::{ErrorKind, InvokeReply};
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
