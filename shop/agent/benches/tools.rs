//! What a shop tool adds to a call of the shop's API, against the same request made directly
//! with reqwest, measured in the same run.
//!
//! The whole shop runs in this process (`shop_app::up` on SQLite files in a temporary
//! directory, as its end-to-end tests start it). The bench creates one product as the admin,
//! registers a customer and places one order as them, then times, as that customer:
//!
//! - `list_products/direct`: `GET /api/products?limit=20` through the gateway, the body read
//!   and parsed as JSON;
//! - `list_products/tool`: `registry.call("list_products", {})`, the same request (the tool
//!   asks for 20 products) plus argument validation, the registry's timeout, breaker and
//!   bulkhead, the typed answer and its compact output;
//! - `get_order/direct` and `get_order/tool`: `GET /api/orders/{id}` against
//!   `registry.call("get_order", {"order_id": id})`.
//!
//! Both sides use a reqwest client with the same settings (the tools' `ShopClient`: 3 s
//! connect timeout, 10 s request timeout, no redirects, keep-alive pool) and send the
//! customer's bearer token. The gateway limits each client to `shop_app::RATE_PER_CLIENT`
//! requests per second (per IP for the catalogue, per user for orders), so calls are paced
//! below it: a call that would exceed a client-side bucket (420/s, burst 600) first waits,
//! outside the timed section. Every figure is therefore the latency of one call at a few
//! hundred calls per second, not of back-to-back calls.
//!
//! Criterion's cases are measured one after the other, and a call through the gateway drifts by
//! tens of microseconds between them (the shop's background work, WAL checkpoints), more than
//! the tool adds. So after the cases, `paired/*` calls the two sides alternately (3,000 pairs
//! each; `TRELLIS_BENCH_PAIRS` changes it, 0 skips it) and prints both medians and the median
//! of the paired differences: the figure of record for what a tool adds.
//!
//! Run: `cargo bench -p shop-agent --bench tools`.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use shop_agent::client::{CONNECT_TIMEOUT, REQUEST_TIMEOUT};
use tokio::runtime::Runtime;
use trellis_agent::{Caller, ToolContext, ToolRegistry};

const ADMIN_EMAIL: &str = "admin@bench.local";
const ADMIN_PASSWORD: &str = "admin-password-1";
/// Products per page, as `list_products` asks when the model does not say.
const PRODUCTS_LIMIT: u32 = shop_agent::catalogue::PRODUCTS_LIMIT_DEFAULT;

/// Calls per second the pacer allows (below the gateway's limit per client).
const PACE_PER_SECOND: f64 = 420.0;
/// Calls the pacer lets through at once (below the gateway's burst).
const PACE_BURST: f64 = 600.0;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A client-side token bucket that keeps the bench under the gateway's rate limit.
struct Pacer {
    tokens: f64,
    at: Instant,
}

impl Pacer {
    fn new() -> Self {
        Self {
            tokens: PACE_BURST,
            at: Instant::now(),
        }
    }

    /// Waits (untimed by the caller) until a call may go.
    async fn wait(&mut self) {
        loop {
            let now = Instant::now();
            self.tokens = (self.tokens
                + now.duration_since(self.at).as_secs_f64() * PACE_PER_SECOND)
                .min(PACE_BURST);
            self.at = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            let wait = (1.0 - self.tokens) / PACE_PER_SECOND;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

/// The shop, a customer's token and what the bench reads.
struct Fixture {
    _shop: shop_app::Shop,
    _dir: tempfile::TempDir,
    base: String,
    http: reqwest::Client,
    token: String,
    order: String,
}

async fn expect_json(response: reqwest::Response, status: u16) -> Value {
    let got = response.status().as_u16();
    let body = response.text().await.expect("a body");
    assert_eq!(got, status, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

impl Fixture {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = shop_app::ShopConfig::ephemeral(dir.path());
        config.admin = Some((ADMIN_EMAIL.into(), ADMIN_PASSWORD.into()));
        config.seed_catalog = false;
        let shop = shop_app::up(config).await.expect("the shop starts");
        let base = shop.gateway_url();
        // The tools' client settings (shop_agent::ShopClient::new).
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let token = |email: &'static str, password: &'static str| {
            let http = http.clone();
            let url = format!("{base}/api/auth/token");
            async move {
                let response = http
                    .post(url)
                    .json(&json!({"email": email, "password": password}))
                    .send()
                    .await
                    .expect("token call");
                let body = expect_json(response, 200).await;
                body["access_token"].as_str().expect("token").to_owned()
            }
        };
        let admin = token(ADMIN_EMAIL, ADMIN_PASSWORD).await;
        let response = http
            .post(format!("{base}/api/products"))
            .bearer_auth(&admin)
            .json(&json!({"name": "Bench lamp", "price_cents": 1_999, "stock": 1_000}))
            .send()
            .await
            .expect("create a product");
        let product = expect_json(response, 201).await["id"]
            .as_str()
            .expect("id")
            .to_owned();
        let response = http
            .post(format!("{base}/api/users"))
            .json(&json!({
                "email": "customer@bench.local", "password": "password-123", "name": "Bench"
            }))
            .send()
            .await
            .expect("register");
        expect_json(response, 201).await;
        let token = token("customer@bench.local", "password-123").await;
        let response = http
            .post(format!("{base}/api/orders"))
            .bearer_auth(&token)
            .header("idempotency-key", "bench-order-1")
            .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
            .send()
            .await
            .expect("place an order");
        let order = expect_json(response, 202).await["id"]
            .as_str()
            .expect("id")
            .to_owned();
        Self {
            _shop: shop,
            _dir: dir,
            base,
            http,
            token,
            order,
        }
    }

    async fn direct(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("the request");
        assert_eq!(response.status().as_u16(), 200);
        let body = response.bytes().await.expect("the body");
        serde_json::from_slice(&body).expect("JSON")
    }

    async fn tool(&self, tools: &ToolRegistry, name: &str, args: &Value) -> Value {
        let caller = Caller::new("bench-customer", "customer").with_bearer(&self.token);
        let ctx = ToolContext::new(caller, Duration::from_secs(30), "bench");
        match tools.call(name, args.clone(), &ctx).await {
            Ok(value) => value,
            Err(failure) => panic!("{name}: {failure}"),
        }
    }
}

/// Times `call`, one paced call per iteration; only the calls are timed.
fn paced<F, Fut>(rt: &Runtime, pacer: &mut Pacer, iters: u64, mut call: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    rt.block_on(async {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            pacer.wait().await;
            let started = Instant::now();
            call().await;
            total += started.elapsed();
        }
        total
    })
}

fn tools(c: &mut Criterion) {
    let rt = runtime();
    let fixture = rt.block_on(Fixture::start());
    let tools = shop_agent::registry(&fixture.base).expect("the tools register");
    let products_path = format!("/api/products?limit={PRODUCTS_LIMIT}");
    let order_path = format!("/api/orders/{}", fixture.order);
    let order_args = json!({"order_id": fixture.order});

    // The order saga settles the order first, so every read below sees the same order; then
    // both sides must read the same thing before anything is timed.
    rt.block_on(async {
        let settled = Instant::now();
        while fixture.direct(&order_path).await["status"] == "PENDING" {
            assert!(
                settled.elapsed() < Duration::from_secs(30),
                "the order settles"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let direct = fixture.direct(&products_path).await;
        let tool = fixture.tool(&tools, "list_products", &json!({})).await;
        assert_eq!(direct["items"].as_array().map(Vec::len), Some(1));
        assert_eq!(tool["products"].as_array().map(Vec::len), Some(1));
        let direct = fixture.direct(&order_path).await;
        let tool = fixture.tool(&tools, "get_order", &order_args).await;
        assert_eq!(direct["id"], fixture.order);
        assert_eq!(tool["id"], fixture.order);
    });

    let mut pacer = Pacer::new();
    let mut group = c.benchmark_group("list_products");
    group.bench_function("direct", |b| {
        b.iter_custom(|iters| {
            paced(&rt, &mut pacer, iters, || async {
                std::hint::black_box(fixture.direct(&products_path).await);
            })
        });
    });
    group.bench_function("tool", |b| {
        b.iter_custom(|iters| {
            paced(&rt, &mut pacer, iters, || async {
                std::hint::black_box(fixture.tool(&tools, "list_products", &json!({})).await);
            })
        });
    });
    group.finish();

    let mut group = c.benchmark_group("get_order");
    group.bench_function("direct", |b| {
        b.iter_custom(|iters| {
            paced(&rt, &mut pacer, iters, || async {
                std::hint::black_box(fixture.direct(&order_path).await);
            })
        });
    });
    group.bench_function("tool", |b| {
        b.iter_custom(|iters| {
            paced(&rt, &mut pacer, iters, || async {
                std::hint::black_box(fixture.tool(&tools, "get_order", &order_args).await);
            })
        });
    });
    group.finish();

    // Paired: the figure of record for the difference (see `paired`).
    let pairs = std::env::var("TRELLIS_BENCH_PAIRS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3_000);
    // Not in `cargo test`'s quick pass over the benches (criterion runs each case once there).
    if pairs > 0 && std::env::args().any(|a| a == "--bench") {
        paired(
            &rt,
            &mut pacer,
            "list_products",
            pairs,
            || async {
                std::hint::black_box(fixture.direct(&products_path).await);
            },
            || async {
                std::hint::black_box(fixture.tool(&tools, "list_products", &json!({})).await);
            },
        );
        paired(
            &rt,
            &mut pacer,
            "get_order",
            pairs,
            || async {
                std::hint::black_box(fixture.direct(&order_path).await);
            },
            || async {
                std::hint::black_box(fixture.tool(&tools, "get_order", &order_args).await);
            },
        );
    }
}

/// Calls `direct` and `tool` alternately (which goes first alternates too), `pairs` times, and
/// prints the median of each and the median of the paired differences: the two sides see the
/// same moment of the shop, which criterion's cases, measured one after the other, do not.
fn paired<D, DF, T, TF>(
    rt: &Runtime,
    pacer: &mut Pacer,
    name: &str,
    pairs: usize,
    mut direct: D,
    mut tool: T,
) where
    D: FnMut() -> DF,
    DF: std::future::Future<Output = ()>,
    T: FnMut() -> TF,
    TF: std::future::Future<Output = ()>,
{
    let (mut d, mut t) = (Vec::with_capacity(pairs), Vec::with_capacity(pairs));
    rt.block_on(async {
        for i in 0..pairs {
            for side in [i % 2, 1 - i % 2] {
                pacer.wait().await;
                let started = Instant::now();
                if side == 0 {
                    direct().await;
                    d.push(started.elapsed().as_secs_f64() * 1e6);
                } else {
                    tool().await;
                    t.push(started.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
    });
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut diff: Vec<f64> = t.iter().zip(&d).map(|(t, d)| t - d).collect();
    let (md, mt, mdiff) = (median(&mut d), median(&mut t), median(&mut diff));
    println!(
        "paired/{name}: {pairs} pairs, direct median {md:.1} µs, tool median {mt:.1} µs, \
         tool/direct {:.3}x, median of paired differences {mdiff:+.1} µs",
        mt / md
    );
}

criterion_group!(benches, tools);
criterion_main!(benches);
