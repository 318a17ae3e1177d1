//! The OWASP API Security Top 10 (2023), against the running shop through its gateway. Each
//! test is named after the item it checks (`api1_…` to `api10_…`); what is checked elsewhere
//! is named here instead of repeated.
//!
//! - **API1 broken object level authorization**: `api1_*` below: every customer route that
//!   takes an id (`GET /api/orders/{id}`, `POST /api/orders/{id}/cancel`,
//!   `GET /api/orders?user_id=`, an `Idempotency-Key` another customer used, the MCP tools
//!   `get_order` and `cancel_order` at `/mcp`) with another customer's ids. The payments and
//!   shipments lookups by order id are admin-only (API5). Also:
//!   `orders::a_customer_sees_only_their_own_orders` and
//!   `agent_tools::one_customers_tools_cannot_see_or_cancel_anothers_order`.
//! - **API2 broken authentication**: `api2_*` below: `alg: none`, HS256 keyed with the public
//!   JWK, expired, not yet valid, wrong audience or issuer, missing claims, a tampered payload,
//!   keys outside the JWKS (also named by `jku` or embedded as `jwk`, which are never
//!   fetched), garbage and oversized `Authorization` headers, and a flood of unknown `kid`s
//!   against the JWKS refetch limit. Login limits (per account, per address) are in
//!   `trust::one_flooding_client_leaves_another_users_login_working` and
//!   `trust::guessing_one_accounts_password_is_limited_whatever_the_address`. Not here yet:
//!   logout/revocation, refresh tokens, key rotation (issue 18, being built).
//! - **API3 broken object property level authorization**: `api3_*` below: mass assignment
//!   (`role` at registration; `status`, `price_cents`, `total_cents`, `user_id`, `id` in an
//!   order; `available`, `reserved`, `id` in admin writes) and no answer carrying a password
//!   hash, a salt or a private key.
//! - **API4 unrestricted resource consumption**: `api4_*` below: page-size caps, body and
//!   header limits, bounded order lines and quantities, deeply nested JSON, and the per-user
//!   rate limit (on a second gateway built from the shop's own configuration with the rate
//!   lowered: the shop's 500 requests/s per user cannot be reached from a test on two
//!   cores). Slow clients (slowloris) and the connection cap are covered at the gateway level in
//!   crates/gateway/tests/it/limits.rs.
//! - **API5 broken function level authorization**: in trust.rs:
//!   `every_admin_route_refuses_a_customer_and_an_anonymous_caller` (every admin route of the
//!   shop's gateway configuration), `operator_surfaces_refuse_customers_and_anonymous_callers`,
//!   `forged_identity_headers_are_refused` (straight to a service's port),
//!   `grpc_calls_need_a_service_identity` and
//!   `the_gateways_metrics_are_served_only_on_the_operator_listener`.
//! - **API6 unrestricted access to sensitive business flows**: `api6_*` below. The only limit
//!   on one customer placing orders is the per-user request rate of the `orders` route
//!   (`shop_app::RATE_PER_CLIENT`, 500/s, shared with reads), which is above what the whole
//!   shop confirms per second; there is no order-placement limit of its own.
//! - **API7 server side request forgery**: no operation of the shop takes a URL: the services
//!   call only addresses fixed by their configuration (the payment provider, each other, the
//!   users service's JWKS), and the gateway ignores the `jku`/`x5u` headers of a token.
//!   `api7_*` below checks the public /openapi.json and the MCP tools' input schemas for
//!   URL-typed or URL-named inputs; `api2_keys_outside_the_jwks_*` checks `jku` is not fetched.
//! - **API8 security misconfiguration**: `api8_*` below: error answers of every service are
//!   `{"error":{"code","message"}}` JSON with `X-Content-Type-Options: nosniff` and no stack
//!   trace, panic, SQL or file path. The gateway's own headers (CSP, no-store on its errors,
//!   request ids) are checked in crates/gateway/tests/it/headers.rs.
//! - **API9 improper inventory management**: `api9_*` below: plausible undocumented paths and
//!   undocumented methods on documented paths are not served, and every route of the shop's
//!   gateway configuration that answers is in /openapi.json.
//! - **API10 unsafe consumption of APIs**: the payment provider is the one outside API the shop
//!   consumes: shop/payments/tests/it/provider_answers.rs checks that non-JSON, oversized,
//!   wrongly shaped, unknown-status and id-less answers fail the charge cleanly (never
//!   `captured`) and that a redirect from the provider is not followed; timeouts, outages and
//!   lost answers are in the other files of shop/payments/tests/it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::harness::{Backend, TestShop, stock_ok};

// ---------------------------------------------------------------------------------------------
// Helpers

/// One answer, whole.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
    json: Value,
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("the gateway answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        text,
        json,
    }
}

/// A request through the gateway, with `token` as bearer when given.
fn request(
    shop: &TestShop,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> reqwest::RequestBuilder {
    let mut request = shop.http.request(method, shop.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request
}

/// Text that gives away the inside of a service: a panic, a backtrace, a source or file path,
/// SQL, a driver's name.
const INTERNALS: [&str; 22] = [
    "panicked",
    "backtrace",
    "RUST_BACKTRACE",
    "thread '",
    ".rs:",
    "src/",
    "/home/",
    "/root/",
    "/work/",
    "/tmp/",
    "/usr/",
    "target/debug",
    "sqlx",
    "sqlite",
    "postgres",
    "SELECT ",
    "INSERT ",
    "UPDATE ",
    "DELETE FROM",
    "syntax error at",
    "tonic::",
    "hyper::",
];

/// Asserts `answer` is an error as DESIGN.md shapes them: a 4xx/5xx status, a JSON
/// `{"error":{"code","message"}}` body and nothing else in it, `nosniff`, and no internals.
fn assert_json_error(what: &str, answer: &Answer) {
    assert!(
        answer.status >= 400,
        "{what}: status {} is not an error: {}",
        answer.status,
        answer.text
    );
    let content_type = answer
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{what}: {} with content-type {content_type:?} and body {:?}",
        answer.status,
        answer.text
    );
    let error = answer.json.as_object().and_then(|o| {
        (o.len() == 1)
            .then(|| o.get("error"))
            .flatten()
            .and_then(Value::as_object)
    });
    let shaped = error.is_some_and(|e| {
        e.len() == 2
            && e.get("code").is_some_and(Value::is_string)
            && e.get("message").is_some_and(Value::is_string)
    });
    assert!(
        shaped,
        "{what}: {} body is not {{\"error\":{{\"code\",\"message\"}}}}: {:?}",
        answer.status, answer.text
    );
    assert_eq!(
        answer
            .headers
            .get("x-content-type-options")
            .and_then(|v| v.to_str().ok()),
        Some("nosniff"),
        "{what}: {:?}",
        answer.headers
    );
    assert_no_internals(what, &answer.text);
}

fn assert_no_internals(what: &str, text: &str) {
    let lower = text.to_lowercase();
    for marker in INTERNALS {
        assert!(
            !lower.contains(&marker.to_lowercase()),
            "{what}: the answer gives away internals ({marker:?}): {text}"
        );
    }
}

/// The caller's user id.
async fn user_id(shop: &TestShop, token: &str) -> String {
    let (status, me) = shop
        .call(Method::GET, "/api/users/me", Some(token), None)
        .await;
    assert_eq!(status, 200, "{me}");
    me["id"].as_str().expect("id").to_owned()
}

/// Sets the payment provider's latency, so orders stay PENDING (and cancellable) meanwhile.
fn provider_latency(shop: &TestShop, latency_ms: u64) {
    let provider = shop.shop.provider();
    let mut config = provider.config();
    config.latency_ms = latency_ms;
    provider.set_config(config).expect("a valid setting");
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410), before its 32-byte seed.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// An Ed25519 signing key from a seed.
fn ed25519(seed: &[u8; 32]) -> EncodingKey {
    let mut der = PKCS8_ED25519_PREFIX.to_vec();
    der.extend_from_slice(seed);
    EncodingKey::from_ed_der(&der)
}

/// A fresh Ed25519 key that is not the shop's, and the `x` of its public JWK.
fn foreign_key() -> (EncodingKey, String) {
    let mut seed = [0_u8; 32];
    getrandom::fill(&mut seed).expect("OS randomness");
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    (ed25519(&seed), b64(&public))
}

/// The users service's own signing key (kid and key), read from its database in the shop's
/// data directory: what lets a test sign a token the gateway would accept but for the one
/// claim under test.
async fn shop_signing_key(shop: &TestShop) -> (String, EncodingKey) {
    use std::str::FromStr as _;
    let url = format!("sqlite://{}/users.db", shop.dir.path().display());
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)
        .expect("a SQLite URL")
        .read_only(true);
    let pool = sqlx::SqlitePool::connect_with(options)
        .await
        .expect("the users database opens");
    let (kid, seed): (String, String) =
        sqlx::query_as("SELECT kid, seed FROM signing_keys ORDER BY created_at, kid LIMIT 1")
            .fetch_one(&pool)
            .await
            .expect("the users service stored its signing key");
    pool.close().await;
    let seed: [u8; 32] = URL_SAFE_NO_PAD
        .decode(seed)
        .ok()
        .and_then(|b| b.try_into().ok())
        .expect("a 32-byte seed");
    (kid, ed25519(&seed))
}

/// How a hand-made token is signed.
enum Signature<'a> {
    /// No signature at all (`alg: none`).
    Empty,
    /// With `key` and `algorithm`.
    With(&'a EncodingKey, Algorithm),
}

/// A JWS of `header` and `claims`, both written as given.
fn token(header: &Value, claims: &Value, signature: Signature<'_>) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = match signature {
        Signature::Empty => String::new(),
        Signature::With(key, algorithm) => {
            jsonwebtoken::crypto::sign(input.as_bytes(), key, algorithm).expect("signs")
        }
    };
    format!("{input}.{signature}")
}

/// Claims the gateway accepts, for `sub` with `role`, valid for ten minutes (with a `jti`:
/// the shop's gateway checks revocations, so it refuses tokens without one).
fn good_claims(sub: &str, role: &str) -> Value {
    let now = unix_now();
    json!({
        "sub": sub, "role": role, "email": "forged@test.local",
        "iss": "trellis-shop", "aud": "trellis-shop",
        "iat": now, "exp": now + 600,
        "jti": uuid::Uuid::now_v7().to_string(),
    })
}

/// Asserts the gateway refuses `bearer` (401 `unauthenticated` with `WWW-Authenticate`) on a
/// customer route and on an admin write, which must leave `product`'s stock at `total`.
async fn assert_refused(shop: &TestShop, what: &str, bearer: &str, product: &str, total: i64) {
    let calls = [
        (Method::GET, "/api/users/me".to_owned(), None),
        (Method::GET, "/api/orders".to_owned(), None),
        (
            Method::PUT,
            format!("/api/inventory/{product}"),
            Some(json!({"total": 0})),
        ),
    ];
    for (method, path, body) in calls {
        let mut call = request(shop, method.clone(), &path, None)
            .header("authorization", format!("Bearer {bearer}"));
        if let Some(body) = body {
            call = call.json(&body);
        }
        let answer = send(call).await;
        assert_eq!(
            answer.status, 401,
            "{what}: {method} {path} answered {}",
            answer.text
        );
        assert_eq!(answer.json["error"]["code"], "unauthenticated", "{what}");
        assert!(
            answer.headers.contains_key("www-authenticate"),
            "{what}: no WWW-Authenticate"
        );
        assert_json_error(what, &answer);
    }
    assert_eq!(
        shop.stock(product).await["total"],
        total,
        "{what}: the stock changed"
    );
}

/// A gateway of the shop's own configuration ([`shop_app::config_toml`] and
/// [`shop_app::ShopHooks`]) in front of the running shop's services, with `addrs` changed by
/// `route` and the parsed configuration by `tune`: for what the test cannot do to the shop's
/// own gateway (lower its rate limits, watch its JWKS fetches). Stops when the test ends.
async fn shop_gateway(
    shop: &TestShop,
    route: impl FnOnce(&mut BTreeMap<&'static str, SocketAddr>),
    tune: impl FnOnce(&mut trellis_gateway::Config),
) -> String {
    let mut addrs = shop.shop.addrs().clone();
    route(&mut addrs);
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config =
        trellis_gateway::Config::from_toml(&shop_app::config_toml(loopback, loopback, &addrs))
            .expect("the shop's gateway configuration");
    tune(&mut config);
    let gateway = trellis_gateway::Gateway::from_config(config)
        .await
        .expect("the gateway starts")
        .with_hooks(Arc::new(shop_app::ShopHooks::new(shop.shop.service_key())));
    let listener = tokio::net::TcpListener::bind(loopback).await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = gateway.serve(listener, std::future::pending()).await;
    });
    base
}

/// The per-user rate and burst the rate-limit tests lower the shop's to.
const LOWERED_RATE_PER_S: u32 = 1;
const LOWERED_BURST: u32 = 3;

/// How many requests the lowered limit lets through in `elapsed`: the burst, and what refills
/// meanwhile (rounded up, plus one for a refill landing between two calls).
fn lowered_allowance(elapsed: Duration) -> usize {
    let refilled = (elapsed.as_secs_f64() * f64::from(LOWERED_RATE_PER_S)).ceil() as usize;
    LOWERED_BURST as usize + refilled + 1
}

/// The `per_user` rate limit of the shop's gateway configuration.
fn per_user_limit(
    config: &mut trellis_gateway::Config,
) -> &mut trellis_gateway::config::RateLimitConfig {
    config
        .rate_limits
        .get_mut("per_user")
        .expect("the shop limits each user")
}

// ---------------------------------------------------------------------------------------------
// API1 broken object level authorization

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api1_bola_another_customers_order_cannot_be_read_listed_replayed_or_cancelled() {
    // Goal: no customer route reads or changes another customer's order by its id. Method:
    // Alice's order is held PENDING (a slow provider, so a cancel would take effect); Mallory
    // tries every id-taking route with Alice's ids (and spellings of them), through REST and
    // through the MCP tools; each is refused exactly as an unknown id is, and Alice's order
    // then ends CONFIRMED with no cancel in its timeline.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api1")
        .await
        .expect("sqlite");
    let alice = shop.customer("alice").await;
    let mallory = shop.customer("mallory").await;
    let alice_id = user_id(&shop, &alice).await;
    let product = shop.product("Safe", 2_500, 5).await;
    provider_latency(&shop, 3_000);
    let alice_key = uuid::Uuid::now_v7().to_string();
    let items = json!([{"product_id": product, "quantity": 1}]);
    let (status, placed) = shop.place(&alice, &alice_key, items.clone()).await;
    assert_eq!(status, 202, "{placed}");
    let order = placed["id"].as_str().expect("id").to_owned();
    let unknown = uuid::Uuid::now_v7().to_string();

    // An unknown order's answer: what every refusal must look like (no existence oracle).
    let (status, not_found) = shop
        .call(
            Method::GET,
            &format!("/api/orders/{unknown}"),
            Some(&mallory),
            None,
        )
        .await;
    assert_eq!(status, 404, "{not_found}");
    let (status, not_cancelled) = shop
        .call(
            Method::POST,
            &format!("/api/orders/{unknown}/cancel"),
            Some(&mallory),
            None,
        )
        .await;
    assert_eq!(status, 404, "{not_cancelled}");

    let parsed = uuid::Uuid::parse_str(&order).expect("a UUID");
    let spellings = [
        order.clone(),
        order.to_uppercase(),
        parsed.simple().to_string(),
        format!("%7B{order}%7D"),
        format!("urn:uuid:{order}"),
    ];
    for id in &spellings {
        let (status, body) = shop
            .call(
                Method::GET,
                &format!("/api/orders/{id}"),
                Some(&mallory),
                None,
            )
            .await;
        assert_eq!(
            (status, &body),
            (404, &not_found),
            "GET Alice's order as {id}"
        );
        let (status, body) = shop
            .call(
                Method::POST,
                &format!("/api/orders/{id}/cancel"),
                Some(&mallory),
                None,
            )
            .await;
        assert_eq!(
            (status, &body),
            (404, &not_cancelled),
            "cancel Alice's order as {id}"
        );
    }
    // Listing by owner: refused, not quietly answered with Mallory's own.
    for query in [
        format!("user_id={alice_id}"),
        format!("user_id=%20{alice_id}"),
        format!("status=PENDING&user_id={alice_id}"),
    ] {
        let (status, body) = shop
            .call(
                Method::GET,
                &format!("/api/orders?{query}"),
                Some(&mallory),
                None,
            )
            .await;
        assert_eq!(status, 403, "?{query}: {body}");
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
    }
    // Mallory's own listing, whatever the filters and a cursor naming Alice's order.
    let cursor = b64(order.as_bytes());
    for query in [
        "",
        "?status=PENDING",
        "?limit=100",
        &format!("?cursor={cursor}"),
    ] {
        let (status, page) = shop
            .call(
                Method::GET,
                &format!("/api/orders{query}"),
                Some(&mallory),
                None,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        assert!(!page.to_string().contains(&order), "{query}: {page}");
    }
    // Alice's Idempotency-Key with Alice's body: a key is the caller's own, so Mallory gets
    // his own new order, not Alice's.
    let (status, replay) = shop.place(&mallory, &alice_key, items.clone()).await;
    assert_eq!(status, 202, "{replay}");
    assert_ne!(
        replay["id"],
        order.as_str(),
        "Mallory was answered Alice's order"
    );

    // The same through the MCP tools at /mcp, with Mallory's token.
    for (tool, arguments) in [
        ("get_order", json!({"order_id": order})),
        ("cancel_order", json!({"order_id": order})),
        ("search_orders", json!({"customer_id": alice_id})),
    ] {
        let answer = send(
            request(&shop, Method::POST, shop_app::MCP_PATH, Some(&mallory))
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2025-06-18")
                .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": tool, "arguments": arguments}})),
        )
        .await;
        assert_eq!(answer.status, 200, "{tool}: {}", answer.text);
        assert_eq!(
            answer.json["result"]["isError"], true,
            "{tool}: {}",
            answer.text
        );
        assert!(
            !answer.text.contains("PENDING") && !answer.text.contains("\"total_cents\""),
            "{tool} gave away Alice's order: {}",
            answer.text
        );
    }
    // What an order id also names: its payment and shipment, for administrators only.
    for path in [
        format!("/api/payments/{order}"),
        format!("/api/shipments/{order}"),
    ] {
        let (status, body) = shop.call(Method::GET, &path, Some(&mallory), None).await;
        assert_eq!(status, 403, "{path}: {body}");
    }

    // Alice's order is untouched, and hers to see.
    let (status, seen) = shop
        .call(
            Method::GET,
            &format!("/api/orders/{order}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, 200, "{seen}");
    assert!(!seen["timeline"].to_string().contains("cancel"), "{seen}");
    provider_latency(&shop, 0);
    let settled = shop.settled(&alice, &order).await;
    assert_eq!(settled["status"], "CONFIRMED", "{settled}");
    assert!(
        !settled["timeline"].to_string().contains("cancel"),
        "{settled}"
    );
    let (status, page) = shop
        .call(
            Method::GET,
            &format!("/api/orders?user_id={alice_id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert!(page.to_string().contains(&order), "{page}");
    shop.stop().await;
}

// ---------------------------------------------------------------------------------------------
// API2 broken authentication

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api2_tokens_signed_with_the_shops_key_but_with_bad_claims_are_refused() {
    // Goal: the gateway checks every claim, not only the signature. Method: sign tokens with
    // the users service's own key (read from its database), first with good claims (which must
    // work: the control), then each with one claim wrong (expired, not yet valid, another
    // audience or issuer, a required claim missing) or the payload of a real token changed;
    // every one claims the admin role and must get 401 and change nothing.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api2-claims")
        .await
        .expect("sqlite");
    let (kid, key) = shop_signing_key(&shop).await;
    let customer = shop.customer("carol").await;
    let carol = user_id(&shop, &customer).await;
    let product = shop.product("Vault", 10_000, 3).await;
    let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": kid});
    let sign = |claims: &Value| token(&header, claims, Signature::With(&key, Algorithm::EdDSA));

    // The control: the forging is right, so each refusal below is for its one claim.
    let control = sign(&good_claims(&carol, "customer"));
    let (status, me) = shop
        .call(Method::GET, "/api/users/me", Some(&control), None)
        .await;
    assert_eq!(status, 200, "a well-formed forged token must pass: {me}");
    assert_eq!(me["id"], carol.as_str());

    let now = unix_now();
    let with = |change: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut claims = good_claims(&carol, "admin");
        change(claims.as_object_mut().expect("an object"));
        sign(&claims)
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "expired an hour ago",
            with(&|c| {
                c.insert("exp".into(), json!(now - 3_600));
                c.insert("iat".into(), json!(now - 7_200));
            }),
        ),
        (
            "not valid for an hour",
            with(&|c| {
                c.insert("nbf".into(), json!(now + 3_600));
            }),
        ),
        (
            "another audience",
            with(&|c| {
                c.insert("aud".into(), json!("another-shop"));
            }),
        ),
        (
            "another audience among several",
            with(&|c| {
                c.insert("aud".into(), json!(["another-shop", "yet-another"]));
            }),
        ),
        (
            "another issuer",
            with(&|c| {
                c.insert("iss".into(), json!("https://attacker.example"));
            }),
        ),
        (
            "no expiry",
            with(&|c| {
                c.remove("exp");
            }),
        ),
        (
            "no audience",
            with(&|c| {
                c.remove("aud");
            }),
        ),
        (
            "no issuer",
            with(&|c| {
                c.remove("iss");
            }),
        ),
        (
            "a null audience",
            with(&|c| {
                c.insert("aud".into(), Value::Null);
            }),
        ),
        (
            "an expiry as text",
            with(&|c| {
                c.insert("exp".into(), json!((now + 600).to_string()));
            }),
        ),
        (
            "no token id (it could never be revoked)",
            with(&|c| {
                c.remove("jti");
            }),
        ),
    ];
    for (what, bearer) in &cases {
        assert_refused(&shop, what, bearer, &product, 3).await;
    }
    // A real token with its payload changed to the admin role keeps its signature: refused.
    let parts: Vec<&str> = customer.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("base64")).expect("json");
    claims["role"] = json!("admin");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(claims.to_string().as_bytes()),
        parts[2]
    );
    assert_refused(&shop, "a payload changed to admin", &tampered, &product, 3).await;
    // A token with no subject gets no identity: the gateway signs none and the service
    // answers 401 too.
    let no_subject = with(&|c| {
        c.remove("sub");
    });
    let (status, body) = shop
        .call(Method::GET, "/api/users/me", Some(&no_subject), None)
        .await;
    assert_eq!(status, 401, "no sub: {body}");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api2_alg_none_and_hs256_keyed_with_the_public_jwk_are_refused() {
    // Goal: algorithm confusion gets nowhere. Method: tokens with good claims (admin role)
    // for a real user, with `alg: none` (several spellings, with and without a trailing
    // signature) and HS256/HS512 tokens whose secret is the public key as the JWKS publishes
    // it (raw bytes, its base64 text, the JWK, the whole document), with and without the
    // real `kid`; each must get 401 and change nothing.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api2-alg")
        .await
        .expect("sqlite");
    let customer = shop.customer("dave").await;
    let dave = user_id(&shop, &customer).await;
    let product = shop.product("Crown", 50_000, 2).await;
    let answer = send(request(&shop, Method::GET, "/.well-known/jwks.json", None)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let jwk = answer.json["keys"][0].clone();
    let kid = jwk["kid"].as_str().expect("kid").to_owned();
    let x = jwk["x"].as_str().expect("an OKP key").to_owned();
    let claims = good_claims(&dave, "admin");

    let mut cases: Vec<(String, String)> = Vec::new();
    for alg in ["none", "None", "NONE", "nOnE"] {
        for kid in [Some(kid.as_str()), None] {
            let mut header = json!({"alg": alg, "typ": "JWT"});
            if let Some(kid) = kid {
                header["kid"] = json!(kid);
            }
            let bare = token(&header, &claims, Signature::Empty);
            cases.push((format!("alg {alg}, kid {kid:?}"), bare.clone()));
            cases.push((
                format!("alg {alg}, kid {kid:?}, a signature"),
                format!("{bare}c2lnbmF0dXJl"),
            ));
        }
    }
    let secrets: [(&str, Vec<u8>); 4] = [
        ("the raw public key", URL_SAFE_NO_PAD.decode(&x).expect("x")),
        ("the key's base64 text", x.clone().into_bytes()),
        ("the JWK", jwk.to_string().into_bytes()),
        ("the JWKS document", answer.text.clone().into_bytes()),
    ];
    for (what, secret) in &secrets {
        let key = EncodingKey::from_secret(secret);
        for algorithm in [Algorithm::HS256, Algorithm::HS512] {
            for kid in [Some(kid.as_str()), None] {
                let mut header = json!({"alg": format!("{algorithm:?}"), "typ": "JWT"});
                if let Some(kid) = kid {
                    header["kid"] = json!(kid);
                }
                cases.push((
                    format!("{algorithm:?} keyed with {what}, kid {kid:?}"),
                    token(&header, &claims, Signature::With(&key, algorithm)),
                ));
            }
        }
    }
    for (what, bearer) in &cases {
        assert_refused(&shop, what, bearer, &product, 2).await;
    }
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api2_keys_outside_the_jwks_are_refused_and_never_fetched() {
    // Goal: only the users service's published keys verify tokens, whatever the token says
    // about its key. Method: admin-role tokens signed by a foreign Ed25519 key under the
    // shop's `kid`, under the foreign key's own `kid`, with no `kid`, with the foreign key
    // embedded as `jwk`, and with `jku`/`x5u` naming a key server run by the test; each must
    // get 401, change nothing, and the key server must never be asked.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api2-keys")
        .await
        .expect("sqlite");
    let customer = shop.customer("erin").await;
    let erin = user_id(&shop, &customer).await;
    let product = shop.product("Jewel", 70_000, 4).await;
    let (status, jwks) = shop
        .call(Method::GET, "/.well-known/jwks.json", None, None)
        .await;
    assert_eq!(status, 200);
    let shop_kid = jwks["keys"][0]["kid"].as_str().expect("kid").to_owned();
    let (foreign, foreign_x) = foreign_key();
    let foreign_jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": foreign_x, "alg": "EdDSA",
        "use": "sig", "kid": "attacker-key"});

    // A key server the token points at: it counts the requests it gets.
    let asked = Arc::new(AtomicUsize::new(0));
    let key_server = {
        let asked = Arc::clone(&asked);
        let keys = json!({"keys": [foreign_jwk.clone()]});
        let router = axum::Router::new().fallback(move || {
            asked.fetch_add(1, Ordering::SeqCst);
            let keys = keys.clone();
            async move { axum::Json(keys) }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        format!("http://{addr}/jwks.json")
    };

    let claims = good_claims(&erin, "admin");
    let headers = [
        (
            "the shop's kid",
            json!({"alg": "EdDSA", "typ": "JWT", "kid": shop_kid}),
        ),
        (
            "its own kid",
            json!({"alg": "EdDSA", "typ": "JWT", "kid": "attacker-key"}),
        ),
        ("no kid", json!({"alg": "EdDSA", "typ": "JWT"})),
        (
            "an embedded jwk",
            json!({"alg": "EdDSA", "typ": "JWT", "kid": "attacker-key", "jwk": foreign_jwk}),
        ),
        (
            "an embedded jwk under the shop's kid",
            json!({"alg": "EdDSA", "typ": "JWT", "kid": shop_kid, "jwk": foreign_jwk}),
        ),
        (
            "jku naming the attacker's key set",
            json!({"alg": "EdDSA", "typ": "JWT", "kid": "attacker-key", "jku": key_server}),
        ),
        (
            "x5u naming the attacker's server",
            json!({"alg": "EdDSA", "typ": "JWT", "kid": "attacker-key", "x5u": key_server}),
        ),
    ];
    for (what, header) in &headers {
        let bearer = token(header, &claims, Signature::With(&foreign, Algorithm::EdDSA));
        assert_refused(
            &shop,
            &format!("a foreign key, {what}"),
            &bearer,
            &product,
            4,
        )
        .await;
    }
    assert_eq!(
        asked.load(Ordering::SeqCst),
        0,
        "the gateway fetched a key from a URL a token named"
    );
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api2_garbage_and_oversized_authorization_headers_get_a_json_401() {
    // Goal: whatever arrives as `Authorization`, the answer is a clean 401 (never a 5xx, a
    // hang or a pass). Method: empty, malformed, non-JWT, other schemes, three-part garbage,
    // non-UTF-8 bytes, a token over the gateway's 8 KiB token limit and one just under the
    // header limit, on a customer route and an admin write.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api2-garbage")
        .await
        .expect("sqlite");
    let product = shop.product("Box", 100, 7).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", b"".to_vec()),
        ("Bearer only", b"Bearer".to_vec()),
        ("Bearer and a space", b"Bearer ".to_vec()),
        ("Basic credentials", b"Basic YWRtaW46YWRtaW4=".to_vec()),
        ("a bare word", b"Bearer garbage".to_vec()),
        ("three dots", b"Bearer ...".to_vec()),
        ("three garbage parts", b"Bearer a.b.c".to_vec()),
        ("JSON parts", b"Bearer e30.e30.e30".to_vec()),
        ("non-base64", b"Bearer !!!.$$$.%%%".to_vec()),
        ("two tokens", b"Bearer a.b.c, Bearer d.e.f".to_vec()),
        ("non-UTF-8 bytes", b"Bearer \xff\xfe.\xfd.\xfc".to_vec()),
        (
            "a 9 KiB token",
            format!("Bearer {}", "a".repeat(9 * 1024)).into_bytes(),
        ),
        (
            "a 15 KiB three-part token",
            format!(
                "Bearer {}.{}.{}",
                "e".repeat(5_000),
                "f".repeat(5_000),
                "g".repeat(5_000)
            )
            .into_bytes(),
        ),
    ];
    for (what, value) in cases {
        let value = reqwest::header::HeaderValue::from_bytes(&value).expect("a header value");
        for (method, path, body) in [
            (Method::GET, "/api/users/me".to_owned(), None),
            (
                Method::PUT,
                format!("/api/inventory/{product}"),
                Some(json!({"total": 0})),
            ),
        ] {
            let mut call =
                request(&shop, method.clone(), &path, None).header("authorization", value.clone());
            if let Some(body) = body {
                call = call.json(&body);
            }
            let answer = send(call).await;
            assert_eq!(
                answer.status, 401,
                "{what}: {method} {path}: {}",
                answer.text
            );
            assert_json_error(what, &answer);
        }
    }
    assert_eq!(stock_ok(&shop, &product).await, (7, 0, 7));
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api2_a_flood_of_unknown_kids_fetches_the_jwks_at_most_once_per_refetch_interval() {
    // Goal: tokens naming random `kid`s cannot make the gateway hammer the users service with
    // JWKS fetches. Method: a gateway of the shop's own configuration whose JWKS URL goes
    // through a proxy that counts fetches (the users service's request metrics are shared by
    // every shop in this test process, so they cannot tell one gateway's fetches); 600 tokens
    // with random kids, 60 at a time; the fetches during the flood must stay within one per
    // `jwks_refetch_min_interval_ms`, and a real token must still pass.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api2-kid-flood")
        .await
        .expect("sqlite");
    let customer = shop.customer("frank").await;
    let users = shop.shop.addrs()["users"];
    let fetches = Arc::new(AtomicUsize::new(0));
    let proxy = {
        let fetches = Arc::clone(&fetches);
        let client = reqwest::Client::new();
        let router = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                fetches.fetch_add(1, Ordering::SeqCst);
                let client = client.clone();
                async move {
                    let jwks = client
                        .get(format!("http://{users}/.well-known/jwks.json"))
                        .send()
                        .await
                        .expect("the users service answers")
                        .text()
                        .await
                        .expect("the JWKS");
                    ([("content-type", "application/json")], jwks)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        addr
    };
    let mut interval = Duration::ZERO;
    let gateway = shop_gateway(
        &shop,
        |addrs| {
            addrs.insert("users", proxy);
        },
        |config| {
            if let Some(trellis_gateway::config::AuthConfig::Jwt(jwt)) = config.auth.get("shop") {
                interval = Duration::from_millis(jwt.jwks_refetch_min_interval_ms);
            }
        },
    )
    .await;
    assert!(
        interval > Duration::ZERO,
        "the shop's JWT policy has a refetch interval"
    );
    let at_start = fetches.load(Ordering::SeqCst);
    assert!(at_start >= 1, "the gateway fetches the JWKS when it starts");

    let (foreign, _) = foreign_key();
    let claims = good_claims("nobody", "admin");
    let started = Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    let statuses = Arc::new(std::sync::Mutex::new(BTreeMap::<u16, usize>::new()));
    for wave in 0..10 {
        for i in 0..60 {
            let kid = format!("random-{wave}-{i}-{}", uuid::Uuid::now_v7().simple());
            let bearer = token(
                &json!({"alg": "EdDSA", "typ": "JWT", "kid": kid}),
                &claims,
                Signature::With(&foreign, Algorithm::EdDSA),
            );
            let client = shop.http.clone();
            let url = format!("{gateway}/api/orders");
            let statuses = Arc::clone(&statuses);
            flood.spawn(async move {
                let status = client
                    .get(url)
                    .bearer_auth(bearer)
                    .send()
                    .await
                    .expect("the gateway answers")
                    .status()
                    .as_u16();
                *statuses
                    .lock()
                    .expect("not poisoned")
                    .entry(status)
                    .or_default() += 1;
            });
        }
        while !flood.is_empty() {
            flood.join_next().await.expect("a task").expect("no panic");
        }
    }
    let elapsed = started.elapsed();
    let during = fetches.load(Ordering::SeqCst) - at_start;
    let allowed = usize::try_from(elapsed.as_millis() / interval.as_millis()).expect("small") + 1;
    let statuses = statuses.lock().expect("not poisoned").clone();
    assert_eq!(statuses.get(&401), Some(&600), "{statuses:?}");
    assert!(
        during <= allowed,
        "{during} JWKS fetches in {elapsed:?} of flood; at most {allowed} allowed \
         (one per {interval:?})"
    );
    // The gateway still serves real tokens.
    let answer = send(
        shop.http
            .get(format!("{gateway}/api/orders"))
            .bearer_auth(&customer),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    shop.stop().await;
}

// ---------------------------------------------------------------------------------------------
// API3 broken object property level authorization

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api3_registering_with_a_role_or_an_id_gives_no_admin_and_writes_nothing() {
    // Goal: a registration cannot choose its role, id or password hash. Method: register with
    // each extra field; the answer must be a 400 (and the account not created: logging in
    // fails and the same email registers cleanly afterwards) or a 201 of a plain customer
    // whose token the admin routes refuse.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api3-register")
        .await
        .expect("sqlite");
    let product = shop.product("Mug", 900, 3).await;
    let chosen_id = uuid::Uuid::now_v7().to_string();
    let extras = [
        json!({"role": "admin"}),
        json!({"role": ["admin"]}),
        json!({"roles": ["admin"]}),
        json!({"is_admin": true}),
        json!({"id": chosen_id}),
        json!({"password_hash": "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g"}),
        json!({"user": {"role": "admin"}}),
    ];
    for extra in extras {
        let email = format!("eve-{}@test.local", uuid::Uuid::now_v7().simple());
        let mut body = json!({"email": email, "password": "password-123", "name": "Eve"});
        for (k, v) in extra.as_object().expect("an object") {
            body[k] = v.clone();
        }
        let (status, answer) = shop
            .call(Method::POST, "/api/users", None, Some(body.clone()))
            .await;
        match status {
            400 => {
                assert_eq!(answer["error"]["code"], "invalid_json", "{extra}: {answer}");
                let login = send(
                    request(&shop, Method::POST, "/api/auth/token", None)
                        .json(&json!({"email": email, "password": "password-123"})),
                )
                .await;
                assert_eq!(login.status, 401, "{extra}: a refused registration logs in");
                let (status, clean) = shop
                    .call(
                        Method::POST,
                        "/api/users",
                        None,
                        Some(json!({"email": email, "password": "password-123", "name": "Eve"})),
                    )
                    .await;
                assert_eq!(status, 201, "{extra}: the refused one left a row: {clean}");
            }
            201 => {
                assert_eq!(answer["role"], "customer", "{extra}: {answer}");
                assert_ne!(answer["id"], chosen_id.as_str(), "{extra}: {answer}");
            }
            other => panic!("{extra}: registration answered {other}: {answer}"),
        }
        let token = shop.login(&email, "password-123").await;
        let (status, me) = shop
            .call(Method::GET, "/api/users/me", Some(&token), None)
            .await;
        assert_eq!(
            (status, &me["role"]),
            (200, &json!("customer")),
            "{extra}: {me}"
        );
        assert_ne!(me["id"], chosen_id.as_str());
        let (status, _) = shop
            .call(
                Method::PUT,
                &format!("/api/inventory/{product}"),
                Some(&token),
                Some(json!({"total": 0})),
            )
            .await;
        assert_eq!(status, 403, "{extra}: the new account is an admin");
    }
    assert_eq!(stock_ok(&shop, &product).await, (3, 0, 3));
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api3_an_order_cannot_set_its_status_prices_total_owner_or_id() {
    // Goal: a customer sets only what to buy; the price comes from the catalog, the owner from
    // the token, the status from the saga. Method: orders whose body or lines add `status`,
    // `price_cents`, `total_cents`, `user_id`, `id` or `reason`; each must be refused (400,
    // nothing placed, nothing reserved) or, if accepted, priced from the catalog and owned by
    // the caller. A clean order then shows the catalog price and total.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api3-order")
        .await
        .expect("sqlite");
    let grace = shop.customer("grace").await;
    let other = shop.customer("heidi").await;
    let grace_id = user_id(&shop, &grace).await;
    let heidi_id = user_id(&shop, &other).await;
    let product = shop.product("Telescope", 123_456, 10).await;
    let line = |extra: Value| {
        let mut line = json!({"product_id": product, "quantity": 2});
        for (k, v) in extra.as_object().expect("an object") {
            line[k] = v.clone();
        }
        line
    };
    let chosen_id = uuid::Uuid::now_v7().to_string();
    let bodies = [
        json!({"items": [line(json!({}))], "status": "CONFIRMED"}),
        json!({"items": [line(json!({}))], "total_cents": 1}),
        json!({"items": [line(json!({}))], "user_id": heidi_id}),
        json!({"items": [line(json!({}))], "id": chosen_id}),
        json!({"items": [line(json!({}))], "reason": null, "timeline": []}),
        json!({"items": [line(json!({"price_cents": 1}))]}),
        json!({"items": [line(json!({"total_cents": 1}))]}),
        json!({"items": [line(json!({"user_id": heidi_id}))]}),
        json!({"items": [line(json!({"status": "CONFIRMED"}))]}),
    ];
    let mut accepted = Vec::new();
    for body in &bodies {
        let answer = send(
            request(&shop, Method::POST, "/api/orders", Some(&grace))
                .header("idempotency-key", uuid::Uuid::now_v7().to_string())
                .json(body),
        )
        .await;
        match answer.status {
            400 => assert_json_error(&body.to_string(), &answer),
            202 => accepted.push(answer.json["id"].as_str().expect("id").to_owned()),
            other => panic!("{body} answered {other}: {}", answer.text),
        }
    }
    for id in &accepted {
        assert_ne!(id, &chosen_id, "the client chose the order id");
        let order = shop.settled(&grace, id).await;
        assert_eq!(order["user_id"], grace_id.as_str(), "{order}");
        assert_eq!(order["total_cents"], 2 * 123_456, "{order}");
        assert_eq!(order["items"][0]["price_cents"], 123_456, "{order}");
    }
    if accepted.is_empty() {
        // Every such body refused: nothing placed and nothing reserved.
        let (_, page) = shop
            .call(Method::GET, "/api/orders", Some(&grace), None)
            .await;
        assert_eq!(page["items"], json!([]), "{page}");
        assert_eq!(stock_ok(&shop, &product).await, (10, 0, 10));
    }
    let (_, page) = shop
        .call(Method::GET, "/api/orders", Some(&other), None)
        .await;
    assert_eq!(
        page["items"],
        json!([]),
        "an order was placed for Heidi: {page}"
    );

    // A clean order: the catalog's price, the computed total, the caller as owner.
    let id = shop.order(&grace, &product, 2).await;
    let order = shop.settled(&grace, &id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    assert_eq!(order["total_cents"], 2 * 123_456, "{order}");
    assert_eq!(order["items"][0]["price_cents"], 123_456, "{order}");
    assert_eq!(order["user_id"], grace_id.as_str(), "{order}");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api3_product_and_stock_writes_take_only_their_own_fields() {
    // Goal: an admin write sets only the fields it documents: a product cannot be created
    // with its id or availability chosen, a stock update cannot set `reserved` or `available`
    // or move another product. Method: each such body is refused (400) or, if accepted, the
    // stock shows only the documented effect.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api3-admin")
        .await
        .expect("sqlite");
    let product = shop.product("Globe", 4_000, 5).await;
    let neighbour = shop.product("Atlas", 3_000, 6).await;
    let chosen_id = uuid::Uuid::now_v7().to_string();
    for extra in [
        json!({"id": chosen_id}),
        json!({"available": 999}),
        json!({"reserved": 3}),
        json!({"price": 1}),
    ] {
        let mut body = json!({"name": "Sneaky", "price_cents": 100, "stock": 1});
        for (k, v) in extra.as_object().expect("an object") {
            body[k] = v.clone();
        }
        let (status, answer) = shop
            .call(
                Method::POST,
                "/api/products",
                Some(shop.admin()),
                Some(body),
            )
            .await;
        match status {
            400 => assert_eq!(answer["error"]["code"], "invalid_json", "{extra}: {answer}"),
            201 => {
                assert_ne!(answer["id"], chosen_id.as_str(), "{extra}: {answer}");
                let id = answer["id"].as_str().expect("id");
                assert_eq!(stock_ok(&shop, id).await, (1, 0, 1), "{extra}");
            }
            other => panic!("{extra}: create answered {other}: {answer}"),
        }
    }
    let (_, page) = shop
        .call(Method::GET, "/api/products?q=Sneaky", None, None)
        .await;
    for item in page["items"].as_array().expect("items") {
        assert_ne!(item["id"], chosen_id.as_str(), "{page}");
        assert_eq!(item["available"], 1, "{page}");
    }
    for extra in [
        json!({"reserved": 5}),
        json!({"available": 100}),
        json!({"product_id": neighbour}),
    ] {
        let mut body = json!({"total": 8});
        for (k, v) in extra.as_object().expect("an object") {
            body[k] = v.clone();
        }
        let (status, answer) = shop
            .call(
                Method::PUT,
                &format!("/api/inventory/{product}"),
                Some(shop.admin()),
                Some(body),
            )
            .await;
        match status {
            400 => assert_eq!(answer["error"]["code"], "invalid_json", "{extra}: {answer}"),
            200 => assert_eq!(stock_ok(&shop, &product).await, (8, 0, 8), "{extra}"),
            other => panic!("{extra}: stock update answered {other}: {answer}"),
        }
    }
    let (total, reserved, _) = stock_ok(&shop, &product).await;
    assert!(total == 5 || total == 8, "{total}");
    assert_eq!(reserved, 0);
    assert_eq!(stock_ok(&shop, &neighbour).await, (6, 0, 6));
    shop.stop().await;
}

/// Every object key (lower case) in `value`, and every string, collected.
fn walk(value: &Value, keys: &mut BTreeSet<String>, strings: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                keys.insert(k.to_lowercase());
                walk(v, keys, strings);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| walk(v, keys, strings)),
        Value::String(s) => strings.push(s.clone()),
        _ => {}
    }
}

/// Asserts no key of `value` names a secret and no string in it is a password hash.
fn assert_no_secrets(what: &str, value: &Value) {
    let (mut keys, mut strings) = (BTreeSet::new(), Vec::new());
    walk(value, &mut keys, &mut strings);
    for key in &keys {
        for secret in ["password", "hash", "salt", "secret", "seed", "private"] {
            assert!(!key.contains(secret), "{what}: a field {key:?} in {value}");
        }
    }
    for text in &strings {
        assert!(
            !text.contains("$argon2") && !text.contains("$2b$") && !text.contains("$scrypt$"),
            "{what}: a password hash in {value}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api3_no_answer_carries_a_password_hash_or_a_private_key() {
    // Goal: the API shows users, orders and products without their internal fields. Method:
    // the answers of registration, login (and the token's claims), the profile, orders (one,
    // listed, as admin), products, the JWKS and the OpenAPI document are scanned for fields
    // named like secrets and for password hashes; the JWKS must carry public keys only.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api3-leaks")
        .await
        .expect("sqlite");
    let email = format!("ivan-{}@test.local", uuid::Uuid::now_v7().simple());
    let (status, registered) = shop
        .call(
            Method::POST,
            "/api/users",
            None,
            Some(json!({"email": email, "password": "password-123", "name": "Ivan"})),
        )
        .await;
    assert_eq!(status, 201, "{registered}");
    assert_no_secrets("registration", &registered);
    let (status, login) = shop
        .call(
            Method::POST,
            "/api/auth/token",
            None,
            Some(json!({"email": email, "password": "password-123"})),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let token = login["access_token"].as_str().expect("token").to_owned();
    let mut scanned = vec![("login", login.clone())];
    for (i, part) in token.split('.').take(2).enumerate() {
        let decoded: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url"))
                .expect("JSON");
        scanned.push((
            if i == 0 {
                "token header"
            } else {
                "token claims"
            },
            decoded,
        ));
    }
    let product = shop.product("Lamp", 1_999, 3).await;
    let order = shop.order(&token, &product, 1).await;
    shop.settled(&token, &order).await;
    for (what, token, path) in [
        ("profile", Some(token.as_str()), "/api/users/me".to_owned()),
        (
            "admin profile",
            Some(shop.admin()),
            "/api/users/me".to_owned(),
        ),
        (
            "order",
            Some(token.as_str()),
            format!("/api/orders/{order}"),
        ),
        ("orders", Some(token.as_str()), "/api/orders".to_owned()),
        ("every order", Some(shop.admin()), "/api/orders".to_owned()),
        ("products", None, "/api/products".to_owned()),
        ("product", None, format!("/api/products/{product}")),
        (
            "stock",
            Some(shop.admin()),
            format!("/api/inventory/{product}"),
        ),
        (
            "payment",
            Some(shop.admin()),
            format!("/api/payments/{order}"),
        ),
        (
            "shipment",
            Some(shop.admin()),
            format!("/api/shipments/{order}"),
        ),
        ("jwks", None, "/.well-known/jwks.json".to_owned()),
    ] {
        let (status, body) = shop.call(Method::GET, &path, token, None).await;
        assert_eq!(status, 200, "{what}: {body}");
        scanned.push((what, body));
    }
    assert!(scanned.iter().any(|(_, v)| v.to_string().contains(&email)));
    for (what, value) in &scanned {
        assert_no_secrets(what, value);
    }
    let (_, jwks) = shop
        .call(Method::GET, "/.well-known/jwks.json", None, None)
        .await;
    let keys = jwks["keys"].as_array().expect("keys");
    assert!(!keys.is_empty());
    for key in keys {
        for private in ["d", "p", "q", "dp", "dq", "qi", "k", "oth"] {
            assert!(
                key.get(private).is_none(),
                "a private JWK member {private}: {key}"
            );
        }
    }
    shop.stop().await;
}

// ---------------------------------------------------------------------------------------------
// API4 unrestricted resource consumption

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api4_list_pages_are_capped_at_the_documented_maximum() {
    // Goal: no list call answers more than PAGE_LIMIT_MAX items, whatever it is asked. Method:
    // more products than one page holds; `limit` far over the maximum, negative, not a number
    // or huge must be a 400 `invalid_limit` (or at most the maximum); the maximum itself gives
    // a full page and a cursor.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api4-pages")
        .await
        .expect("sqlite");
    let max = shop_contracts::api::PAGE_LIMIT_MAX as usize;
    for i in 0..=max {
        shop.product(&format!("Item {i}"), 100, 1).await;
    }
    let customer = shop.customer("judy").await;
    let product = shop.product("Pen", 150, 5).await;
    shop.order(&customer, &product, 1).await;
    for path in ["/api/products", "/api/orders"] {
        for limit in [
            "1000000",
            "101",
            "4294967296",
            "99999999999999999999",
            "-1",
            "0",
            "1e3",
            "abc",
            "",
        ] {
            let (status, body) = shop
                .call(
                    Method::GET,
                    &format!("{path}?limit={limit}"),
                    Some(&customer),
                    None,
                )
                .await;
            match status {
                // Orders parse `limit` as a number first (`invalid_query`), products as text.
                400 => assert!(
                    ["invalid_limit", "invalid_query"]
                        .contains(&body["error"]["code"].as_str().unwrap_or_default()),
                    "{path}?limit={limit}: {body}"
                ),
                200 => {
                    let items = body["items"].as_array().expect("items").len();
                    assert!(items <= max, "{path}?limit={limit}: {items} items");
                }
                other => panic!("{path}?limit={limit} answered {other}: {body}"),
            }
        }
    }
    let (status, page) = shop
        .call(
            Method::GET,
            &format!("/api/products?limit={max}"),
            None,
            None,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"].as_array().expect("items").len(), max);
    assert!(page["next_cursor"].is_string(), "{page}");
    shop.stop().await;
}

/// Sends `head` (a request head, CRLF-terminated) and then `body` on a fresh connection to
/// the gateway, reading at the same time, and answers what comes back until the gateway
/// closes or 10 s pass. Write errors are ignored: the gateway may refuse before reading all.
async fn raw(shop: &TestShop, head: &str, body: Vec<u8>) -> String {
    let addr = shop
        .shop
        .gateway_url()
        .trim_start_matches("http://")
        .to_owned();
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let head = head.as_bytes().to_vec();
    let writing = tokio::spawn(async move {
        if writer.write_all(&head).await.is_err() {
            return;
        }
        for chunk in body.chunks(16 * 1024) {
            if writer.write_all(chunk).await.is_err() {
                return;
            }
        }
        // The write half stays open: closing it could end the exchange before the answer.
        std::future::pending::<()>().await;
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut answer)).await;
    writing.abort();
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status and JSON body of a raw HTTP/1.1 answer.
fn parse_raw(answer: &str) -> (u16, Value) {
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api4_a_body_over_the_limit_gets_a_json_413() {
    // Goal: a large body is refused with a JSON 413 and never buffered whole. Method: a 2 MiB
    // order body declared by Content-Length (over the gateway's 1 MiB limit), the same sent
    // chunked without a length, and bodies under the gateway's limit but over a service's own
    // (users 16 KiB, inventory 4 KiB); nothing is placed or changed.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api4-body")
        .await
        .expect("sqlite");
    let customer = shop.customer("ken").await;
    let product = shop.product("Rug", 5_000, 4).await;
    let padding = "x".repeat(2 * 1024 * 1024);
    let big =
        format!(r#"{{"items":[{{"product_id":"{product}","quantity":1}}],"padding":"{padding}"}}"#);
    let head = |framing: &str| {
        format!(
            "POST /api/orders HTTP/1.1\r\nhost: shop\r\nauthorization: Bearer {customer}\r\n\
             idempotency-key: {}\r\ncontent-type: application/json\r\n{framing}\r\n\r\n",
            uuid::Uuid::now_v7()
        )
    };
    let declared = raw(
        &shop,
        &head(&format!("content-length: {}", big.len())),
        big.as_bytes().to_vec(),
    )
    .await;
    let (status, body) = parse_raw(&declared);
    assert_eq!(status, 413, "{declared:.300}");
    assert_eq!(body["error"]["code"], "body_too_large", "{declared:.300}");

    let mut chunked = Vec::new();
    for chunk in big.as_bytes().chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let streamed = raw(&shop, &head("transfer-encoding: chunked"), chunked).await;
    let (status, body) = parse_raw(&streamed);
    assert_eq!(status, 413, "{streamed:.300}");
    assert!(body["error"]["code"].is_string(), "{streamed:.300}");

    let name = "n".repeat(20 * 1024);
    let register = send(
        request(&shop, Method::POST, "/api/users", None)
            .json(&json!({"email": "big@test.local", "password": "password-123", "name": name})),
    )
    .await;
    assert_eq!(register.status, 413, "{}", register.text);
    assert_json_error("a 20 KiB registration", &register);

    let stock = send(
        request(
            &shop,
            Method::PUT,
            &format!("/api/inventory/{product}"),
            Some(shop.admin()),
        )
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"total": 0, "pad": "{}"}}"#,
            "p".repeat(5 * 1024)
        )),
    )
    .await;
    assert_eq!(stock.status, 413, "{}", stock.text);
    assert_json_error("a 5 KiB stock update", &stock);

    let (_, page) = shop
        .call(Method::GET, "/api/orders", Some(&customer), None)
        .await;
    assert_eq!(page["items"], json!([]), "{page}");
    assert_eq!(stock_ok(&shop, &product).await, (4, 0, 4));
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api4_too_many_or_too_large_headers_are_refused() {
    // Goal: a request head past the gateway's limits (100 headers, 16 KiB) is refused before
    // routing, and the gateway goes on serving. Method: raw requests with 150 headers, with
    // one 20 KiB header, and with a 20 KiB path; each must be answered 431 (or 414/400) and
    // the connection closed; a normal call then works. These answers come from hyper's parser,
    // before the gateway sees a request: 431 with an empty body and none of the gateway's
    // headers, the one error answer that is not `{"error":…}` JSON (hyper has no hook for it).
    let shop = TestShop::start(Backend::Sqlite, "owasp-api4-headers")
        .await
        .expect("sqlite");
    let many: String = (0..150).map(|i| format!("x-h{i}: {i}\r\n")).collect();
    let cases = [
        (
            "150 headers",
            format!("GET /api/products HTTP/1.1\r\nhost: shop\r\n{many}\r\n"),
        ),
        (
            "a 20 KiB header",
            format!(
                "GET /api/products HTTP/1.1\r\nhost: shop\r\nx-big: {}\r\n\r\n",
                "b".repeat(20 * 1024)
            ),
        ),
        (
            "a 20 KiB path",
            format!(
                "GET /api/products/{} HTTP/1.1\r\nhost: shop\r\n\r\n",
                "p".repeat(20 * 1024)
            ),
        ),
    ];
    for (what, head) in cases {
        let answer = raw(&shop, &head, Vec::new()).await;
        let status_line = answer.lines().next().unwrap_or_default().to_owned();
        assert!(
            ["HTTP/1.1 431", "HTTP/1.1 414", "HTTP/1.1 400"]
                .iter()
                .any(|s| status_line.starts_with(s)),
            "{what}: {answer:?}"
        );
        assert_no_internals(what, &answer);
    }
    let (status, _) = shop.call(Method::GET, "/api/products", None, None).await;
    assert_eq!(status, 200, "the gateway still serves");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api4_an_order_with_too_many_lines_or_units_is_refused() {
    // Goal: one order cannot ask for unbounded work or stock. Method: orders with more lines
    // than ORDER_LINES_MAX (51, 10,000; 100,000 is over the body limit), quantities over
    // LINE_QUANTITY_MAX or out of range for an integer, and a deeply nested body; each is a
    // 400 (413 for the body over the limit) with a JSON error, and nothing is reserved.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api4-order")
        .await
        .expect("sqlite");
    let customer = shop.customer("leo").await;
    let product = shop.product("Grain", 10, 1_000_000).await;
    let lines = |n: usize| -> Value {
        (0..n)
            .map(|_| json!({"product_id": uuid::Uuid::now_v7().to_string(), "quantity": 1}))
            .collect()
    };
    let max = shop_contracts::api::ORDER_LINES_MAX;
    let quantity = shop_contracts::api::LINE_QUANTITY_MAX;
    let cases: Vec<(String, String, u16, &str)> = vec![
        (
            format!("{} lines", max + 1),
            json!({"items": lines(max + 1)}).to_string(),
            400,
            "too_many_items",
        ),
        (
            "10,000 lines".into(),
            json!({"items": lines(10_000)}).to_string(),
            400,
            "too_many_items",
        ),
        (
            "100,000 lines".into(),
            json!({"items": lines(100_000)}).to_string(),
            413,
            "body_too_large",
        ),
        (
            format!("quantity {}", quantity + 1),
            json!({"items": [{"product_id": product, "quantity": quantity + 1}]}).to_string(),
            400,
            "invalid_quantity",
        ),
        (
            "quantity i64::MAX".into(),
            json!({"items": [{"product_id": product, "quantity": i64::MAX}]}).to_string(),
            400,
            "invalid_quantity",
        ),
        (
            "quantity -1".into(),
            json!({"items": [{"product_id": product, "quantity": -1}]}).to_string(),
            400,
            "invalid_quantity",
        ),
        (
            "quantity 1e30".into(),
            format!(r#"{{"items":[{{"product_id":"{product}","quantity":1e30}}]}}"#),
            400,
            "invalid_json",
        ),
        (
            "quantity 2^64".into(),
            format!(
                r#"{{"items":[{{"product_id":"{product}","quantity":18446744073709551616}}]}}"#
            ),
            400,
            "invalid_json",
        ),
        (
            "nested 100,000 deep".into(),
            format!(
                r#"{{"items":{}{}}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
            400,
            "invalid_json",
        ),
    ];
    for (what, body, status, code) in cases {
        if body.len() > 1024 * 1024 {
            // Over the gateway's limit: sent raw, since it is refused before it is read.
            let head = format!(
                "POST /api/orders HTTP/1.1\r\nhost: shop\r\nauthorization: Bearer {customer}\r\n\
                 idempotency-key: {}\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\n\r\n",
                uuid::Uuid::now_v7(),
                body.len()
            );
            let answer = raw(&shop, &head, body.into_bytes()).await;
            let (answered, json) = parse_raw(&answer);
            assert_eq!(
                (answered, &json["error"]["code"]),
                (status, &json!(code)),
                "{what}: {answer:.300}"
            );
            continue;
        }
        let answer = send(
            request(&shop, Method::POST, "/api/orders", Some(&customer))
                .header("idempotency-key", uuid::Uuid::now_v7().to_string())
                .header("content-type", "application/json")
                .body(body),
        )
        .await;
        assert_eq!(answer.status, status, "{what}: {}", answer.text);
        assert_eq!(
            answer.json["error"]["code"], code,
            "{what}: {}",
            answer.text
        );
        assert_json_error(&what, &answer);
    }
    let (_, page) = shop
        .call(Method::GET, "/api/orders", Some(&customer), None)
        .await;
    assert_eq!(page["items"], json!([]), "{page}");
    assert_eq!(stock_ok(&shop, &product).await, (1_000_000, 0, 1_000_000));
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api4_a_user_over_the_per_user_rate_gets_429_with_retry_after() {
    // Goal: one user's request rate is limited per user, with a 429 that says when to come
    // back, and another user is not affected. Method: the shop's gateway shows its per-user
    // limit in RateLimit-Limit; a gateway of the shop's configuration with that limit lowered
    // to 1/s (burst 3) then takes 20 quick calls from one customer: no more pass than the
    // limit allows in the time they took, the rest are 429 with Retry-After and a JSON body,
    // and another customer's call passes.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api4-rate")
        .await
        .expect("sqlite");
    let mallory = shop.customer("mallory").await;
    let alice = shop.customer("alice").await;
    for path in ["/api/users/me", "/api/orders"] {
        let answer = send(request(&shop, Method::GET, path, Some(&mallory))).await;
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(
            answer
                .headers
                .get("ratelimit-limit")
                .and_then(|v| v.to_str().ok()),
            Some((shop_app::RATE_PER_CLIENT * 2).to_string().as_str()),
            "{path}: the shop's per-user burst"
        );
    }
    let gateway = shop_gateway(
        &shop,
        |_| {},
        |config| {
            let limit = per_user_limit(config);
            limit.requests_per_second = LOWERED_RATE_PER_S;
            limit.burst = LOWERED_BURST;
        },
    )
    .await;
    let mut statuses = BTreeMap::<u16, usize>::new();
    let mut limited = None;
    let started = Instant::now();
    for _ in 0..20 {
        let answer = send(
            shop.http
                .get(format!("{gateway}/api/orders"))
                .bearer_auth(&mallory),
        )
        .await;
        *statuses.entry(answer.status).or_default() += 1;
        if answer.status == 429 {
            limited = Some(answer);
        }
    }
    let allowed = lowered_allowance(started.elapsed());
    let passed = statuses.get(&200).copied().unwrap_or_default();
    assert!(
        (1..=allowed).contains(&passed),
        "{statuses:?}; at most {allowed} may pass"
    );
    assert_eq!(statuses.get(&429), Some(&(20 - passed)), "{statuses:?}");
    let limited = limited.expect("a 429");
    assert_eq!(
        limited.json["error"]["code"], "rate_limited",
        "{}",
        limited.text
    );
    assert_json_error("over the per-user rate", &limited);
    let retry_after: u64 = limited
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let other = send(
        shop.http
            .get(format!("{gateway}/api/orders"))
            .bearer_auth(&alice),
    )
    .await;
    assert_eq!(
        other.status, 200,
        "another user was limited: {}",
        other.text
    );
    shop.stop().await;
}

// ---------------------------------------------------------------------------------------------
// API6 unrestricted access to sensitive business flows

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api6_one_customer_placing_orders_in_a_tight_loop_is_limited_per_user() {
    // Goal: what limits one customer placing orders as fast as they can, and that a refused
    // order leaves nothing behind. Method: the route serving POST /api/orders in the shop's
    // configuration is limited per user (the only limit there is); a gateway of that
    // configuration with the per-user rate lowered to 1/s (burst 3) takes 20 orders in a tight
    // loop from one customer: the excess is 429, exactly the accepted orders exist, and
    // another customer can still order.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api6")
        .await
        .expect("sqlite");
    let loopback = SocketAddr::from(([127, 0, 0, 1], 1));
    let addrs = shop_app::SERVICES
        .into_iter()
        .map(|name| (name, loopback))
        .collect();
    let config =
        trellis_gateway::Config::from_toml(&shop_app::config_toml(loopback, loopback, &addrs))
            .expect("the shop's gateway configuration");
    let orders_route = config
        .routes
        .iter()
        .find(|r| {
            r.path_prefix.as_deref() == Some("/api/orders")
                && (r.methods.is_empty() || r.methods.iter().any(|m| m == "POST"))
        })
        .expect("a route serves POST /api/orders");
    let limit = orders_route
        .rate_limit
        .as_deref()
        .expect("the orders route is rate limited");
    assert_eq!(config.rate_limits[limit].key, "jwt_sub", "limited per user");

    let bot = shop.customer("bot").await;
    let human = shop.customer("human").await;
    let product = shop.product("Concert ticket", 8_000, 1_000).await;
    let gateway = shop_gateway(
        &shop,
        |_| {},
        |config| {
            let limit = per_user_limit(config);
            limit.requests_per_second = LOWERED_RATE_PER_S;
            limit.burst = LOWERED_BURST;
        },
    )
    .await;
    let mut accepted = Vec::new();
    let mut limited = 0;
    let started = Instant::now();
    for _ in 0..20 {
        let answer = send(
            shop.http
                .post(format!("{gateway}/api/orders"))
                .bearer_auth(&bot)
                .header("idempotency-key", uuid::Uuid::now_v7().to_string())
                .json(&json!({"items": [{"product_id": product, "quantity": 1}]})),
        )
        .await;
        match answer.status {
            202 => accepted.push(answer.json["id"].as_str().expect("id").to_owned()),
            429 => {
                limited += 1;
                assert!(answer.headers.contains_key("retry-after"));
            }
            other => panic!("an order answered {other}: {}", answer.text),
        }
    }
    let allowed = lowered_allowance(started.elapsed());
    assert!(
        (1..=allowed).contains(&accepted.len()),
        "{accepted:?}; at most {allowed} may pass"
    );
    assert_eq!(limited, 20 - accepted.len());
    for id in &accepted {
        shop.settled(&bot, id).await;
    }
    let (_, page) = shop
        .call(Method::GET, "/api/orders?limit=100", Some(&bot), None)
        .await;
    let listed: BTreeSet<String> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|o| o["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(
        listed,
        accepted.iter().cloned().collect(),
        "a refused order was placed"
    );
    let (_, _, available) = stock_ok(&shop, &product).await;
    assert_eq!(
        available,
        1_000 - i64::try_from(accepted.len()).expect("small")
    );
    let answer = send(
        shop.http
            .post(format!("{gateway}/api/orders"))
            .bearer_auth(&human)
            .header("idempotency-key", uuid::Uuid::now_v7().to_string())
            .json(&json!({"items": [{"product_id": product, "quantity": 1}]})),
    )
    .await;
    assert_eq!(
        answer.status, 202,
        "another customer was limited: {}",
        answer.text
    );
    shop.stop().await;
}

// ---------------------------------------------------------------------------------------------
// API7 server side request forgery

/// Whether `name` (a field or parameter) or `schema` looks like it takes a URL.
fn url_like(name: &str, schema: &Value) -> bool {
    let name = name.to_lowercase();
    let named = [
        "url", "uri", "href", "link", "callback", "webhook", "redirect", "endpoint", "host",
        "domain", "address",
    ]
    .iter()
    .any(|word| name.contains(word));
    let format = schema["format"].as_str().unwrap_or_default().to_lowercase();
    let typed = [
        "uri",
        "url",
        "iri",
        "hostname",
        "idn-hostname",
        "uri-reference",
        "uri-template",
    ]
    .contains(&format.as_str());
    named || typed
}

/// Every input field of `doc` (request bodies' properties, parameters), with its schema,
/// as (where, name, schema).
fn inputs(doc: &Value) -> Vec<(String, String, Value)> {
    let mut found = Vec::new();
    let mut schemas: Vec<(String, Value)> = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            let where_ = format!("{method} {path}");
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                found.push((
                    where_.clone(),
                    parameter["name"].as_str().unwrap_or_default().to_owned(),
                    parameter["schema"].clone(),
                ));
            }
            for content in operation["requestBody"]["content"]
                .as_object()
                .into_iter()
                .flat_map(|c| c.values())
            {
                schemas.push((where_.clone(), content["schema"].clone()));
            }
        }
    }
    // Request schemas, following references into components (each once).
    let mut seen = BTreeSet::new();
    while let Some((where_, schema)) = schemas.pop() {
        if let Some(reference) = schema["$ref"].as_str() {
            let name = reference.rsplit('/').next().unwrap_or_default().to_owned();
            if seen.insert(name.clone()) {
                schemas.push((
                    format!("{where_} > {name}"),
                    doc["components"]["schemas"][&name].clone(),
                ));
            }
            continue;
        }
        for (name, property) in schema["properties"].as_object().into_iter().flatten() {
            found.push((where_.clone(), name.clone(), property.clone()));
            schemas.push((format!("{where_}.{name}"), property.clone()));
        }
        for key in ["items", "additionalProperties"] {
            if schema[key].is_object() {
                schemas.push((where_.clone(), schema[key].clone()));
            }
        }
        for key in ["allOf", "anyOf", "oneOf"] {
            for part in schema[key].as_array().into_iter().flatten() {
                schemas.push((where_.clone(), part.clone()));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api7_no_operation_or_tool_takes_a_url() {
    // Goal: the shop never fetches an address a client gives it, because no input is one.
    // Method: every input of the public /openapi.json (parameters and request bodies,
    // references followed) and of the MCP tools at /mcp is checked for URL formats and
    // URL-like names; the scan must find the inputs it knows are there (the control) and no
    // URL among them.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api7")
        .await
        .expect("sqlite");
    let (status, doc) = shop.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    let found = inputs(&doc);
    let names: BTreeSet<&str> = found.iter().map(|(_, n, _)| n.as_str()).collect();
    for known in [
        "email",
        "password",
        "product_id",
        "quantity",
        "price_cents",
        "total",
        "limit",
    ] {
        assert!(names.contains(known), "the scan missed {known}: {names:?}");
    }
    let urls: Vec<String> = found
        .iter()
        .filter(|(_, name, schema)| url_like(name, schema))
        .map(|(at, name, schema)| format!("{at}: {name} {schema}"))
        .collect();
    assert!(urls.is_empty(), "inputs that take a URL: {urls:#?}");

    let customer = shop.customer("nina").await;
    let answer = send(
        request(&shop, Method::POST, shop_app::MCP_PATH, Some(&customer))
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-06-18")
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let tools = answer.json["result"]["tools"].as_array().expect("tools");
    assert!(tools.len() >= 6, "{}", answer.text);
    let mut tool_inputs = 0;
    for tool in tools {
        let doc =
            json!({"paths": {}, "components": {"schemas": tool["inputSchema"]["$defs"].clone()}});
        let mut stack = vec![tool["inputSchema"].clone()];
        while let Some(schema) = stack.pop() {
            if let Some(reference) = schema["$ref"].as_str() {
                let name = reference.rsplit('/').next().unwrap_or_default();
                stack.push(doc["components"]["schemas"][name].clone());
                continue;
            }
            for (name, property) in schema["properties"].as_object().into_iter().flatten() {
                tool_inputs += 1;
                assert!(
                    !url_like(name, property),
                    "tool {} takes a URL: {name} {property}",
                    tool["name"]
                );
                stack.push(property.clone());
            }
            if schema["items"].is_object() {
                stack.push(schema["items"].clone());
            }
        }
    }
    assert!(
        tool_inputs >= 6,
        "the tool scan found only {tool_inputs} inputs"
    );
    shop.stop().await;
}

// ---------------------------------------------------------------------------------------------
// API8 security misconfiguration

/// What to send and the status expected: (what, method, path, bearer, (content type,
/// body), status).
type Provocation<'a> = (
    &'a str,
    Method,
    String,
    Option<&'a str>,
    (Option<&'a str>, String),
    u16,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api8_error_answers_are_json_without_stack_traces_sql_or_paths() {
    // Goal: whatever goes wrong, a client learns what was wrong with its request and nothing
    // about the inside. Method: provoke 400, 401, 403, 404, 405, 413 and 415 on every
    // service through the gateway (malformed and mistyped JSON, bad query values, unknown ids
    // and paths, wrong methods, wrong content types, ambiguous paths); each answer must be a
    // JSON error of DESIGN.md's shape with nosniff and no internals.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api8")
        .await
        .expect("sqlite");
    let customer = shop.customer("oscar").await;
    let product = shop.product("Bell", 300, 3).await;
    let admin = shop.admin().to_owned();
    let random = uuid::Uuid::now_v7().to_string();
    let json_body = |text: &str| (Some("application/json"), text.to_owned());
    let cases: Vec<Provocation<'_>> = vec![
        (
            "orders: malformed JSON",
            Method::POST,
            "/api/orders".into(),
            Some(&customer),
            json_body("{\"items\": ["),
            400,
        ),
        (
            "orders: mistyped JSON",
            Method::POST,
            "/api/orders".into(),
            Some(&customer),
            json_body("{\"items\": \"all\"}"),
            400,
        ),
        (
            "orders: text/plain",
            Method::POST,
            "/api/orders".into(),
            Some(&customer),
            (Some("text/plain"), "{}".into()),
            415,
        ),
        (
            "orders: no content type",
            Method::POST,
            "/api/orders".into(),
            Some(&customer),
            (None, "{}".into()),
            415,
        ),
        (
            "orders: bad status filter",
            Method::GET,
            "/api/orders?status=';DROP TABLE orders;--".into(),
            Some(&customer),
            (None, String::new()),
            400,
        ),
        (
            "orders: unknown parameter",
            Method::GET,
            "/api/orders?debug=1".into(),
            Some(&customer),
            (None, String::new()),
            400,
        ),
        (
            "orders: bad cursor",
            Method::GET,
            "/api/orders?cursor=../../etc/passwd".into(),
            Some(&customer),
            (None, String::new()),
            400,
        ),
        (
            "orders: bad date",
            Method::GET,
            "/api/orders?placed_from=1' OR '1'='1".into(),
            Some(&customer),
            (None, String::new()),
            400,
        ),
        (
            "orders: unknown id",
            Method::GET,
            format!("/api/orders/{random}"),
            Some(&customer),
            (None, String::new()),
            404,
        ),
        (
            "orders: a quote in the id",
            Method::GET,
            "/api/orders/1'%20OR%20'1'='1".into(),
            Some(&customer),
            (None, String::new()),
            404,
        ),
        (
            "orders: wrong method",
            Method::DELETE,
            format!("/api/orders/{random}"),
            Some(&customer),
            (None, String::new()),
            405,
        ),
        (
            "orders: no token",
            Method::GET,
            "/api/orders".into(),
            None,
            (None, String::new()),
            401,
        ),
        (
            "users: malformed JSON",
            Method::POST,
            "/api/users".into(),
            None,
            json_body("{\"email\":"),
            400,
        ),
        (
            "users: mistyped JSON",
            Method::POST,
            "/api/users".into(),
            None,
            json_body("{\"email\": 1, \"password\": [], \"name\": {}}"),
            400,
        ),
        (
            "users: form encoded",
            Method::POST,
            "/api/users".into(),
            None,
            (
                Some("application/x-www-form-urlencoded"),
                "email=a&password=b".into(),
            ),
            415,
        ),
        (
            "users: login malformed",
            Method::POST,
            "/api/auth/token".into(),
            None,
            json_body("not json"),
            400,
        ),
        (
            "users: login null bytes",
            Method::POST,
            "/api/auth/token".into(),
            None,
            json_body("{\"email\": \"a\\u0000@x.io\", \"password\": \"\\u0000\"}"),
            401,
        ),
        (
            "products: bad limit",
            Method::GET,
            "/api/products?limit=x".into(),
            None,
            (None, String::new()),
            400,
        ),
        (
            "products: bad cursor",
            Method::GET,
            "/api/products?cursor=%27%3B--".into(),
            None,
            (None, String::new()),
            400,
        ),
        (
            "products: a long query",
            Method::GET,
            format!("/api/products?q={}", "q".repeat(5_000)),
            None,
            (None, String::new()),
            400,
        ),
        (
            "products: unknown id",
            Method::GET,
            format!("/api/products/{random}"),
            None,
            (None, String::new()),
            404,
        ),
        (
            "products: not an id",
            Method::GET,
            "/api/products/..%5c..%5cwin.ini".into(),
            None,
            (None, String::new()),
            400,
        ),
        (
            "products: malformed create",
            Method::POST,
            "/api/products".into(),
            Some(&admin),
            json_body("{\"name\": \"x\", \"price_cents\": \"free\"}"),
            400,
        ),
        (
            "products: a customer creating",
            Method::POST,
            "/api/products".into(),
            Some(&customer),
            json_body("{\"name\": \"x\", \"price_cents\": 1}"),
            403,
        ),
        (
            "products: wrong method",
            Method::PATCH,
            "/api/products".into(),
            Some(&admin),
            (None, String::new()),
            404,
        ),
        (
            "inventory: mistyped total",
            Method::PUT,
            format!("/api/inventory/{product}"),
            Some(&admin),
            json_body("{\"total\": \"lots\"}"),
            400,
        ),
        (
            "inventory: a huge total",
            Method::PUT,
            format!("/api/inventory/{product}"),
            Some(&admin),
            json_body("{\"total\": 1e400}"),
            400,
        ),
        (
            "inventory: wrong method",
            Method::POST,
            format!("/api/inventory/{product}"),
            Some(&admin),
            json_body("{}"),
            405,
        ),
        (
            "payments: unknown order",
            Method::GET,
            format!("/api/payments/{random}"),
            Some(&admin),
            (None, String::new()),
            404,
        ),
        (
            "payments: wrong method",
            Method::DELETE,
            format!("/api/payments/{random}"),
            Some(&admin),
            (None, String::new()),
            405,
        ),
        (
            "shipping: unknown order",
            Method::GET,
            format!("/api/shipments/{random}"),
            Some(&admin),
            (None, String::new()),
            404,
        ),
        (
            "shipping: wrong method",
            Method::PUT,
            format!("/api/shipments/{random}"),
            Some(&admin),
            json_body("{}"),
            405,
        ),
        (
            "gateway: an encoded slash",
            Method::GET,
            "/api/orders/a%2F..%2F..%2Fadmin".into(),
            Some(&customer),
            (None, String::new()),
            400,
        ),
        (
            "gateway: no route",
            Method::GET,
            "/nowhere".into(),
            None,
            (None, String::new()),
            404,
        ),
    ];
    for (what, method, path, token, (content_type, body), status) in cases {
        let mut call = request(&shop, method, &path, token);
        if let Some(content_type) = content_type {
            call = call.header("content-type", content_type);
        }
        if !body.is_empty() {
            call = call.body(body);
        }
        let answer = send(call).await;
        assert_eq!(answer.status, status, "{what}: {}", answer.text);
        assert_json_error(what, &answer);
        assert!(
            !answer.headers.contains_key("x-powered-by"),
            "{what}: {:?}",
            answer.headers
        );
    }
    assert_eq!(stock_ok(&shop, &product).await, (3, 0, 3));
    shop.stop().await;
}

// ---------------------------------------------------------------------------------------------
// API9 improper inventory management

/// The documented operations of the served /openapi.json: (method in upper case, template).
async fn documented(shop: &TestShop) -> BTreeSet<(String, String)> {
    let (status, doc) = shop.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("a path item").keys() {
            if [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                operations.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    operations
}

/// Whether `path` (a concrete path, no query) is an instance of `template`.
fn matches_template(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && !p.is_empty()) || t == p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api9_plausible_undocumented_paths_are_not_served() {
    // Goal: nothing answers that the inventory does not list: no debug, internal, versioned,
    // backup or framework path, and no service-internal path reached through the gateway.
    // Method: each probe, as an administrator, a customer and anonymously, must get a JSON
    // 4xx (404/405, or 401/403 where a route needs more), never 2xx or 3xx.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api9-probes")
        .await
        .expect("sqlite");
    let customer = shop.customer("peggy").await;
    let admin = shop.admin().to_owned();
    let id = uuid::Uuid::now_v7().to_string();
    let probes: Vec<(Method, String)> = [
        "/api/debug",
        "/api/admin",
        "/api/internal",
        "/api/users",
        "/api/users/list",
        &format!("/api/users/{id}"),
        "/api/users/me/password",
        "/api/auth/token",
        "/api/auth/refresh",
        "/api/v1/orders",
        "/api/v2/orders",
        "/v1/orders",
        "/api/orders.json",
        "/api/ORDERS",
        "/api/orders/export",
        &format!("/api/orders/{id}/saga"),
        &format!("/api/orders/{id}/refund"),
        "/api/orders/x/../../admin",
        "/api/orders/x/../../../v1/stats",
        &format!("/api/products/{id}/stock"),
        "/api/products/../../v1/charges",
        "/api/payments",
        "/api/shipments",
        "/api/inventory",
        "/v1/charges",
        "/v1/stats",
        "/admin/config",
        "/healthz",
        "/readyz",
        "/metrics",
        "/.env",
        "/.git/config",
        "/config.json",
        "/swagger",
        "/swagger-ui.html",
        "/docs",
        "/openapi.yaml",
        "/api/openapi.json",
        "/graphql",
        "/actuator/env",
        "/server-status",
        "/console",
        "/debug/pprof",
    ]
    .into_iter()
    .flat_map(|p| [(Method::GET, p.to_owned()), (Method::POST, p.to_owned())])
    .collect();
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    for (method, path) in probes {
        for (who, token) in [
            ("admin", Some(admin.as_str())),
            ("customer", Some(customer.as_str())),
            ("anonymous", None),
        ] {
            let mut call = no_redirects
                .request(method.clone(), shop.url(&path))
                .json(&json!({}));
            if let Some(token) = token {
                call = call.bearer_auth(token);
            }
            let answer = send(call).await;
            let what = format!("{method} {path} as {who}");
            if method == Method::POST && path == "/api/auth/token" {
                // Documented: a login with an empty body is refused as such.
                assert_eq!(answer.status, 400, "{what}: {}", answer.text);
                continue;
            }
            if token.is_none() && path.starts_with("/admin/") {
                // The console's pages send a caller without a credential to its login page.
                assert_eq!(answer.status, 303, "{what}: {}", answer.text);
                assert_eq!(
                    answer.headers.get("location").and_then(|v| v.to_str().ok()),
                    Some(shop_console::LOGIN_PATH),
                    "{what}"
                );
                continue;
            }
            assert!(
                [400, 401, 403, 404, 405].contains(&answer.status),
                "{what} answered {}: {}",
                answer.status,
                answer.text
            );
            assert_json_error(&what, &answer);
        }
    }
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api9_documented_paths_answer_no_undocumented_method() {
    // Goal: a documented path does not quietly serve other methods (a forgotten DELETE, a
    // debugging TRACE). Method: every path of /openapi.json, its parameters filled with a
    // fresh id, with each method it does not document, as an administrator: the answer is
    // a JSON 404 or 405, never 2xx.
    let shop = TestShop::start(Backend::Sqlite, "owasp-api9-methods")
        .await
        .expect("sqlite");
    let admin = shop.admin().to_owned();
    let operations = documented(&shop).await;
    let paths: BTreeSet<&String> = operations.iter().map(|(_, p)| p).collect();
    assert!(paths.len() >= 10, "{paths:?}");
    let id = uuid::Uuid::now_v7().to_string();
    let mut checked = 0;
    for template in paths {
        let path: String = template
            .split('/')
            .map(|s| if s.starts_with('{') { id.as_str() } else { s })
            .collect::<Vec<_>>()
            .join("/");
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"] {
            if operations.contains(&(method.to_owned(), template.clone())) {
                continue;
            }
            let mut call = request(
                &shop,
                method.parse().expect("a method"),
                &path,
                Some(&admin),
            );
            if ["POST", "PUT", "PATCH"].contains(&method) {
                call = call.json(&json!({}));
            }
            let answer = send(call).await;
            let what = format!("{method} {template}");
            assert!(
                [404, 405].contains(&answer.status),
                "{what} answered {}: {}",
                answer.status,
                answer.text
            );
            assert_json_error(&what, &answer);
            checked += 1;
        }
    }
    assert!(checked >= 50, "only {checked} calls");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api9_every_route_that_answers_is_in_the_openapi_document() {
    // Goal: what the gateway serves is what /openapi.json documents. Method: every route of
    // the shop's gateway configuration (so a route added later is covered) and every path the
    // services' routers declare, called through the gateway as an administrator with each
    // method; any answer but 404/405 must be a documented operation. Excepted, by name: the
    // document itself, the admin console (HTML pages for browsers) and /mcp (JSON-RPC).
    let shop = TestShop::start(Backend::Sqlite, "owasp-api9-routes")
        .await
        .expect("sqlite");
    let admin = shop.admin().to_owned();
    let operations = documented(&shop).await;
    let id = uuid::Uuid::now_v7().to_string();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 1));
    let addrs = shop_app::SERVICES
        .into_iter()
        .chain([shop_app::CONSOLE])
        .map(|name| (name, loopback))
        .collect();
    let config =
        trellis_gateway::Config::from_toml(&shop_app::config_toml(loopback, loopback, &addrs))
            .expect("the shop's gateway configuration");
    let excepted = [
        "openapi",
        "mcp",
        shop_app::CONSOLE_ROUTE,
        "console-login",
        "console-assets",
    ];
    // Paths the services' routers declare (shop/*/src/*.rs, the bus's DLQ router, the saga
    // inspector), as the gateway exposes them.
    let declared = [
        "/api/users",
        "/api/auth/token",
        "/api/users/me",
        "/.well-known/jwks.json",
        "/api/products",
        &format!("/api/products/{id}"),
        &format!("/api/inventory/{id}"),
        "/api/orders",
        &format!("/api/orders/{id}"),
        &format!("/api/orders/{id}/cancel"),
        &format!("/api/payments/{id}"),
        &format!("/api/shipments/{id}"),
        "/api/admin/provider",
        "/api/admin/dlq/dead-letters",
        "/api/admin/dlq/dead-letters/groups",
        "/api/admin/dlq/dead-letters/actions",
        "/api/admin/dlq/dead-letters/redrive",
        &format!("/api/admin/dlq/dead-letters/{id}"),
        &format!("/api/admin/dlq/dead-letters/{id}/redrive"),
        &format!("/api/admin/dlq/dead-letters/{id}/archive"),
        "/api/admin/sagas",
        "/api/admin/sagas/purge",
        &format!("/api/admin/sagas/{id}"),
        &format!("/api/admin/sagas/{id}/cancel"),
        &format!("/api/admin/sagas/{id}/retry"),
        &format!("/api/admin/sagas/{id}/skip"),
        &format!("/api/admin/orders/{id}/saga"),
    ];
    let mut samples: BTreeSet<String> = declared.iter().map(|p| (*p).to_owned()).collect();
    for route in &config.routes {
        if excepted.contains(&route.name.as_str()) {
            continue;
        }
        if let Some(exact) = &route.path_exact {
            samples.insert(exact.clone());
        }
        if let Some(prefix) = &route.path_prefix {
            samples.insert(prefix.clone());
            samples.insert(format!("{prefix}/{id}"));
        }
    }
    let mut undocumented = Vec::new();
    let mut served = 0;
    for path in &samples {
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            let mut call = request(&shop, method.parse().expect("a method"), path, Some(&admin));
            if ["POST", "PUT", "PATCH"].contains(&method) {
                call = call.json(&json!({}));
            }
            let answer = send(call).await;
            // No such path or method (the gateway's `no_route`, a service's fallback), as
            // opposed to a resource the path names not existing.
            let unrouted = answer.status == 405
                || (answer.status == 404
                    && (answer.json["error"]["code"] == "no_route"
                        || answer.json["error"]["message"] == "no such path"));
            if unrouted {
                continue;
            }
            served += 1;
            let known = operations
                .iter()
                .any(|(m, template)| m == method && matches_template(template, path));
            if !known {
                undocumented.push(format!("{method} {path} answered {}", answer.status));
            }
        }
    }
    assert!(served >= 15, "only {served} calls were served");
    assert!(
        undocumented.is_empty(),
        "served but not in /openapi.json: {undocumented:#?}"
    );
    shop.stop().await;
}
