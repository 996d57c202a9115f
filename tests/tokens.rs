//! API tokens end to end: the real `patchbay token` CLI (as `cli/admin`) creates, lists and
//! revokes tokens in the real `patchbay-tokens` bucket; the gateway identity
//! (`gateway/gateway`, read-only on that bucket) authenticates them through `TokenStore`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use futures::TryStreamExt as _;
use patchbay_bus::{Clock as _, SystemClock};
use patchbay_cli::token::{AuthError, NewToken, Scope, TOKENS_BUCKET, TokenStore, token_key};
use patchbay_tests::{Stack, eventually};

/// `patchbay token create … --json` → (token, id).
fn create(stack: &Stack, args: &[&str]) -> (String, String, serde_json::Value) {
    let mut all = vec!["token", "create", "--json"];
    all.extend_from_slice(args);
    let out = stack.cli(&all).success().json();
    (
        out["token"].as_str().unwrap().to_owned(),
        out["id"].as_str().unwrap().to_owned(),
        out,
    )
}

fn now() -> u64 {
    SystemClock.now_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_token_authenticates_for_the_gateway_identity_with_its_scopes() {
    let stack = Stack::start().await;
    let (token, id, out) = create(
        &stack,
        &[
            "--name",
            "crm",
            "--scope",
            "publish:cc.v1.calls.*.incoming",
            "--scope",
            "invoke:recording-index",
            "--rate",
            "5",
            "--burst",
            "10",
        ],
    );
    assert!(token.starts_with(&format!("pbt_{id}_")), "{token}");
    assert_eq!(out["name"], "crm");
    assert_eq!(
        out["scopes"],
        serde_json::json!(["publish:cc.v1.calls.*.incoming", "invoke:recording-index"])
    );

    let gateway = stack.connect("gateway/gateway").await;
    let store = TokenStore::open(&gateway).await.unwrap();
    let record = store.authenticate(&token, now()).await.unwrap();
    assert_eq!(record.id, id);
    assert_eq!(record.name, "crm");
    assert_eq!(record.rate_per_sec, Some(5.0));
    assert_eq!(record.burst, Some(10));
    assert!(record.allows_publish("cc.v1.calls.c1.incoming"));
    assert!(!record.allows_publish("cc.v1.calls.c1.routed"));
    assert!(record.allows_invoke("recording-index"));
    assert!(!record.allows_invoke("other"));
    // The cached answer is the same.
    assert_eq!(store.authenticate(&token, now()).await.unwrap(), record);

    // A token that differs only in its secret is a different token.
    let forged = format!(
        "{}{}",
        &token[..token.len() - 1],
        if token.ends_with('0') { '1' } else { '0' }
    );
    assert_eq!(
        store.authenticate(&forged, now()).await,
        Err(AuthError::Unknown)
    );
    assert_eq!(
        store.authenticate("pbt_nothex", now()).await,
        Err(AuthError::Malformed)
    );
    assert_eq!(
        store.authenticate("  ", now()).await,
        Err(AuthError::Missing)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucket_holds_only_the_hash_of_the_token() {
    let stack = Stack::start().await;
    let (token, id, _) = create(&stack, &["--name", "dev", "--scope", "admin"]);
    let secret = token.rsplit('_').next().unwrap().to_owned();

    let admin = stack.admin().await;
    let kv = admin
        .jetstream()
        .get_key_value(TOKENS_BUCKET)
        .await
        .unwrap();
    let keys: Vec<String> = kv.keys().await.unwrap().try_collect().await.unwrap();
    assert_eq!(keys, vec![token_key(&token)]);
    let value = kv.get(keys[0].as_str()).await.unwrap().unwrap();
    let value = String::from_utf8(value.to_vec()).unwrap();
    assert!(!value.contains(&secret), "secret stored: {value}");
    assert!(!keys[0].contains(&secret));
    assert!(value.contains(&id), "{value}");

    // Neither does `token ls`, in either format.
    let ls = stack.cli(&["token", "ls", "--json"]).success();
    assert!(!ls.stdout().contains(&secret), "{ls:?}");
    let rows = ls.json();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["id"], id.as_str());
    assert_eq!(rows[0]["name"], "dev");
    assert_eq!(rows[0]["scopes"], serde_json::json!(["admin"]));
    assert!(rows[0].get("token").is_none(), "{rows}");
    let table = stack.cli(&["token", "ls"]).success();
    assert!(table.stdout().contains(&id), "{table:?}");
    assert!(!table.stdout().contains(&secret), "{table:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_is_refused_by_a_running_store_without_restart() {
    let stack = Stack::start().await;
    let (keep, _, _) = create(&stack, &["--name", "keep", "--scope", "invoke:*"]);
    let (token, id, _) = create(&stack, &["--name", "gone", "--scope", "invoke:*"]);
    let gateway = stack.connect("gateway/gateway").await;
    let store = TokenStore::open(&gateway).await.unwrap();
    // Authenticated, hence cached: only the watch can make the store forget it.
    store.authenticate(&token, now()).await.unwrap();

    let revoked = stack.cli(&["token", "revoke", &id]).success();
    assert!(revoked.stdout().contains(&id), "{revoked:?}");
    eventually(
        Duration::from_secs(5),
        "the revoked token to be refused",
        || async {
            (store.authenticate(&token, now()).await == Err(AuthError::Unknown)).then_some(())
        },
    )
    .await;
    store.authenticate(&keep, now()).await.unwrap();

    let again = stack.cli(&["token", "revoke", &id]).failure();
    assert!(again.stderr().contains("no token with id"), "{again:?}");
    let rows = stack.cli(&["token", "ls", "--json"]).success().json();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["name"], "keep");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_written_after_a_refused_lookup_is_accepted() {
    let stack = Stack::start().await;
    let gateway = stack.connect("gateway/gateway").await;
    let store = TokenStore::open(&gateway).await.unwrap();
    let (token, id) = unborn_token();
    // Refused and remembered as unknown…
    assert_eq!(
        store.authenticate(&token, now()).await,
        Err(AuthError::Unknown)
    );
    // …until the admin writes its record: the watch evicts the negative entry.
    let admin = stack.admin().await;
    let kv = admin
        .jetstream()
        .get_key_value(TOKENS_BUCKET)
        .await
        .unwrap();
    let record = serde_json::json!({"id": id, "name": "late", "scopes": ["admin"],
                                    "created_at_ms": now()});
    kv.put(
        token_key(&token),
        serde_json::to_vec(&record).unwrap().into(),
    )
    .await
    .unwrap();
    let accepted = eventually(
        Duration::from_secs(5),
        "the new token to be accepted",
        || async { store.authenticate(&token, now()).await.ok() },
    )
    .await;
    assert_eq!(accepted.name, "late");
}

/// A well-formed token nobody created yet.
fn unborn_token() -> (String, String) {
    let id = "0badc0de".to_owned();
    (format!("pbt_{id}_{}", "ab".repeat(32)), id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_refused_from_its_expiry_on() {
    let stack = Stack::start().await;
    let (token, id, out) = create(
        &stack,
        &["--name", "short", "--scope", "admin", "--expires", "30d"],
    );
    let expires_at = out["expires_at_ms"].as_u64().unwrap();
    assert!(expires_at > now() + 29 * 86_400_000, "{out}");
    let store = TokenStore::open(&stack.connect("gateway/gateway").await)
        .await
        .unwrap();
    store.authenticate(&token, expires_at - 1).await.unwrap();
    assert_eq!(
        store.authenticate(&token, expires_at).await,
        Err(AuthError::Expired { id })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_scopes_and_settings_exit_non_zero_with_a_clear_message() {
    let stack = Stack::start().await;
    for (args, message) in [
        (
            vec!["--scope", "publish:"],
            "scope \"publish:\" has an empty subject pattern",
        ),
        (
            vec!["--scope", "publish:cc..x"],
            "is not a valid subject pattern",
        ),
        (
            vec!["--scope", "invoke:a.b"],
            "is not a valid function name",
        ),
        (vec!["--scope", "root"], "unknown scope \"root\""),
        (vec![], "--scope <SCOPE>"),
        (
            vec!["--scope", "admin", "--rate", "0"],
            "invalid token rate",
        ),
        (
            vec!["--scope", "admin", "--burst", "0"],
            "invalid token burst",
        ),
    ] {
        let mut all = vec!["token", "create", "--name", "x"];
        all.extend(args.iter().copied());
        let out = stack.cli(&all).failure();
        assert!(out.stderr().contains(message), "{args:?}: {out:?}");
    }
    let rows = stack.cli(&["token", "ls", "--json"]).success().json();
    assert_eq!(rows, serde_json::json!([]), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_identity_cannot_create_tokens() {
    let stack = Stack::start().await;
    let store = TokenStore::open(&stack.connect("gateway/gateway").await)
        .await
        .unwrap();
    let refused = store
        .create(NewToken::new("sneaky", vec![Scope::Admin]), now())
        .await;
    // The server refuses the publish to `$KV.patchbay-tokens.<key>`; the client sees no ack.
    let refused = refused.unwrap_err().to_string();
    assert!(refused.contains("failed to write key"), "{refused}");
    let rows = stack.cli(&["token", "ls", "--json"]).success().json();
    assert_eq!(rows, serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_token_returns_a_token_the_gateway_accepts() {
    let stack = Stack::start().await;
    let admin = stack.admin().await;
    let token = patchbay_cli::token::create_token(&admin, "dev", vec![Scope::Admin], None)
        .await
        .unwrap();
    let store = TokenStore::open(&stack.connect("gateway/gateway").await)
        .await
        .unwrap();
    let record = store.authenticate(&token, now()).await.unwrap();
    assert!(record.is_admin());
    assert_eq!(record.expires_at_ms, None);
}
