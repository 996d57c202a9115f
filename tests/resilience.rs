//! Resilience policies end to end: the real `patchbay resilience` CLI (as `cli/admin`)
//! validates `deploy/resilience.toml` and stores one key per target in the real
//! `patchbay-resilience` bucket; `show --json` reads them back; a `ResilienceWatch`
//! connected as `service/routing` (read-only on that bucket) follows changes without a
//! restart.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use futures::TryStreamExt as _;
use patchbay_bus::resilience::{
    RESILIENCE_BUCKET, ResiliencePolicy, ResilienceWatch, Target, TargetPolicy,
};
use patchbay_tests::{Stack, eventually, repo_root};

fn example() -> (String, ResiliencePolicy) {
    let path = repo_root().join("deploy/resilience.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let policy = ResiliencePolicy::from_toml(&text).unwrap();
    (path.display().to_string(), policy)
}

async fn stored_keys(stack: &Stack) -> Vec<String> {
    let admin = stack.admin().await;
    let kv = admin
        .jetstream()
        .get_key_value(RESILIENCE_BUCKET)
        .await
        .unwrap();
    let mut keys: Vec<String> = kv.keys().await.unwrap().try_collect().await.unwrap();
    keys.sort();
    keys
}

fn lookup() -> Target {
    "subject:cc.v1.customers.lookup".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_stores_every_target_of_the_example_and_show_reads_them_back() {
    let stack = Stack::start().await;
    let (file, policy) = example();

    // A dry run writes nothing.
    let dry = stack
        .cli(&["resilience", "apply", "--file", &file, "--dry-run"])
        .success();
    assert!(dry.stdout().contains("+ added"), "{dry:?}");
    assert!(stored_keys(&stack).await.is_empty());

    let out = stack
        .cli(&["resilience", "apply", "--file", &file])
        .success();
    for target in policy.targets.keys() {
        assert!(out.stdout().contains(&target.to_string()), "{out:?}");
    }
    let mut expected: Vec<String> = policy.targets.keys().map(Target::key).collect();
    expected.sort();
    assert_eq!(stored_keys(&stack).await, expected);

    let shown = stack
        .cli(&["resilience", "show", "--json"])
        .success()
        .json();
    let shown: ResiliencePolicy = serde_json::from_value(shown).unwrap();
    assert_eq!(shown, policy);
    let table = stack.cli(&["resilience", "show"]).success();
    assert!(
        table.stdout().contains("subject:cc.v1.customers.lookup"),
        "{table:?}"
    );

    // Applying the same file again changes nothing.
    let again = stack
        .cli(&["resilience", "apply", "--file", &file])
        .success();
    assert!(
        again
            .stdout()
            .contains(&format!("changed 0 of {}", policy.targets.len())),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_refused_naming_the_field_and_changes_nothing() {
    let stack = Stack::start().await;
    let (file, policy) = example();
    let _ = stack
        .cli(&["resilience", "apply", "--file", &file])
        .success();
    let before = stack
        .cli(&["resilience", "show", "--json"])
        .success()
        .json();

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("resilience.toml");
    std::fs::write(
        &bad,
        "[targets.\"subject:cc.v1.customers.lookup\"]\ntimeout = \"100ms\"\n\
         [targets.\"function:customer-lookup\"]\nbreaker = { failure_rate = 1.5 }\n",
    )
    .unwrap();
    let out = stack
        .cli(&["resilience", "apply", "--file", bad.to_str().unwrap()])
        .failure();
    let err = out.stderr();
    assert!(err.contains("function:customer-lookup"), "{out:?}");
    assert!(err.contains("breaker.failure_rate"), "{out:?}");
    assert!(err.contains("nothing was changed"), "{out:?}");

    let after = stack
        .cli(&["resilience", "show", "--json"])
        .success()
        .json();
    assert_eq!(after, before);
    assert_eq!(stored_keys(&stack).await.len(), policy.targets.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_as_the_routing_service_sees_applied_changes_without_restart() {
    let stack = Stack::start().await;
    let routing = stack.connect("service/routing").await;
    // Started on an empty bucket: defaults everywhere.
    let watch = ResilienceWatch::start(&routing).await.unwrap();
    assert!(watch.configured(&lookup()).is_none());
    assert_eq!(
        watch.policy_for(&lookup()).timeout,
        TargetPolicy::default().timeout
    );

    let (file, _) = example();
    let _ = stack
        .cli(&["resilience", "apply", "--file", &file])
        .success();
    let policy = eventually(Duration::from_secs(10), "the applied policy", || {
        let p = watch.configured(&lookup());
        async move { p }
    })
    .await;
    assert_eq!(policy.timeout, Duration::from_millis(250));
    assert_eq!(policy.retry.max_attempts, 2);
    // Wildcard targets apply to concrete subjects.
    let agents = watch.policy_for(&"subject:cc.v1.agents.a7.cmd.state".parse().unwrap());
    assert_eq!(agents.timeout, Duration::from_secs(1));

    // A change and a removal arrive too.
    let dir = tempfile::tempdir().unwrap();
    let changed = dir.path().join("resilience.toml");
    std::fs::write(
        &changed,
        "[targets.\"subject:cc.v1.customers.lookup\"]\ntimeout = \"400ms\"\n",
    )
    .unwrap();
    let out = stack
        .cli(&["resilience", "apply", "--file", changed.to_str().unwrap()])
        .success();
    assert!(
        out.stdout()
            .contains("~ updated   subject:cc.v1.customers.lookup"),
        "{out:?}"
    );
    assert!(
        out.stdout()
            .contains("- removed   function:recording-index"),
        "{out:?}"
    );
    eventually(Duration::from_secs(10), "the updated policy", || {
        let done = watch.policy_for(&lookup()).timeout == Duration::from_millis(400)
            && watch.targets().len() == 1;
        async move { done.then_some(()) }
    })
    .await;

    // A watch started now loads the stored state at once.
    let late = ResilienceWatch::start(&routing).await.unwrap();
    assert_eq!(late.targets(), vec![lookup()]);
    assert_eq!(
        late.policy_for(&lookup()).timeout,
        Duration::from_millis(400)
    );
}

/// Retries during a total outage: a responder that answers every request with an error,
/// 1,000 requests from one process under `max_attempts = 3` with a 20 % budget. Without a
/// budget that would be 3,000 requests on the wire; with it, the extra load measured on the
/// wire stays within `ratio × requests + min_per_sec × (seconds + 1)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_the_bus_stop_at_the_budget_under_a_total_outage() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::StreamExt as _;
    use patchbay_bus::CloudEvent;
    use patchbay_bus::resilience::{CallError, Resilience};

    const REQUESTS: usize = 1_000;
    const RATIO: f64 = 0.2;
    const MIN_PER_SEC: f64 = 1.0;
    let stack = Stack::start().await;
    let file = stack.state_dir().join("outage.toml");
    std::fs::write(
        &file,
        format!(
            r#"
            [targets."subject:cc.v1.tests.outage"]
            timeout = "5s"
            retry = {{ max_attempts = 3, backoff_base = "1ms", backoff_max = "2ms", retry_on = ["error"] }}
            budget = {{ ratio = {RATIO}, min_per_sec = {MIN_PER_SEC} }}
            # The breaker is off, so only the budget limits retries.
            breaker = {{ consecutive_failures = 0, failure_rate = 0.0 }}
            "#
        ),
    )
    .unwrap();
    let _ = stack
        .cli(&["resilience", "apply", "--file", file.to_str().unwrap()])
        .success();

    // The target, down: every request is answered with an error reply.
    let admin = stack.admin().await;
    let received = Arc::new(AtomicUsize::new(0));
    let mut requests = admin
        .client()
        .subscribe("cc.v1.tests.outage")
        .await
        .unwrap();
    admin.client().flush().await.unwrap();
    tokio::spawn({
        let (client, received) = (admin.client().clone(), Arc::clone(&received));
        async move {
            while let Some(msg) = requests.next().await {
                received.fetch_add(1, Ordering::SeqCst);
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("patchbay-outcome", "error");
                if let Some(reply) = msg.reply {
                    let _ = client
                        .publish_with_headers(reply, headers, "down".into())
                        .await;
                }
            }
        }
    });

    let caller = stack.connect("cli/admin").await;
    let resilience = Resilience::new(
        ResilienceWatch::start(&caller).await.unwrap(),
        caller.shared_clock(),
    );
    let event = CloudEvent::new("/test", "cc.tests.outage.v1");
    let started = std::time::Instant::now();
    let failures: Vec<u32> = futures::stream::iter(0..REQUESTS)
        .map(|_| {
            let (caller, resilience, event) = (&caller, &resilience, &event);
            async move {
                let result = caller
                    .request_resilient(
                        resilience,
                        "cc.v1.tests.outage",
                        event,
                        Duration::from_secs(5),
                        None,
                    )
                    .await;
                match result {
                    Err(CallError::Failed { attempts, .. }) => attempts,
                    other => panic!("expected a failure, got {other:?}"),
                }
            }
        })
        .buffer_unordered(25)
        .collect()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    admin.client().flush().await.unwrap();
    let attempts: u32 = failures.iter().sum();
    eventually(
        Duration::from_secs(10),
        "every attempt to reach the target",
        || async { (received.load(Ordering::SeqCst) >= attempts as usize).then_some(()) },
    )
    .await;

    let on_the_wire = received.load(Ordering::SeqCst);
    let extra = on_the_wire - REQUESTS;
    #[allow(clippy::cast_precision_loss)]
    let budget = RATIO * REQUESTS as f64 + MIN_PER_SEC * (seconds + 1.0) + 1.0;
    assert_eq!(
        on_the_wire, attempts as usize,
        "every attempt is one request"
    );
    assert!(
        (extra as f64) <= budget,
        "{extra} retries over {REQUESTS} requests in {seconds:.1} s exceed the budget of {budget:.0}"
    );
    eprintln!(
        "{REQUESTS} requests in {seconds:.1} s: {extra} retries on the wire (budget {budget:.0}, without it {})",
        REQUESTS * 2
    );
    // The budget was used, not bypassed: some calls were retried.
    assert!(extra > 0, "no call was retried");
}
