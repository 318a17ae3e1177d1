//! A small in-memory shop with the public API's shapes, and switches that break it on purpose.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

pub(crate) const ADMIN_EMAIL: &str = "admin@shop.test";
pub(crate) const ADMIN_PASSWORD: &str = "admin-password";

/// What the fake does wrong.
#[derive(Debug, Clone, Default)]
pub(crate) struct Faults {
    /// Confirmed orders get no payment.
    pub(crate) confirm_without_payment: bool,
    /// A confirmed order's reservation is never released.
    pub(crate) leak_reservation: bool,
    /// Orders cancelled for lack of stock keep a captured payment.
    pub(crate) charge_cancelled: bool,
    /// Orders stay PENDING forever.
    pub(crate) never_settle: bool,
    /// The first load browse (`limit=20`) sleeps this long (async: other requests go on).
    pub(crate) stall_browse_once: Option<Duration>,
    /// The first load browse blocks the runtime thread this long (the client stalls too).
    pub(crate) block_runtime_once: Option<Duration>,
    /// Every n-th load browse answers this status.
    pub(crate) browse_status_every: Option<(u64, u16)>,
    /// Every n-th order answers this status.
    pub(crate) order_status_every: Option<(u64, u16)>,
    /// Every order answer is delayed this long.
    pub(crate) order_delay: Option<Duration>,
}

#[derive(Debug)]
struct Product {
    id: String,
    name: String,
    total: i64,
    reserved: i64,
}

#[derive(Debug)]
struct Order {
    user: String,
    product: String,
    status: &'static str,
    reason: Option<&'static str>,
}

#[derive(Debug, Default)]
struct Inner {
    /// email -> (id, password)
    users: HashMap<String, (String, String)>,
    products: Vec<Product>,
    orders: HashMap<String, Order>,
    payments: HashMap<String, &'static str>,
    shipments: HashMap<String, &'static str>,
}

/// Counters the tests compare with the report.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) load_browses: AtomicU64,
    pub(crate) orders_posted: AtomicU64,
    pub(crate) orders_accepted: AtomicU64,
    pub(crate) orders_without_stock_product: AtomicU64,
    /// Orders for products only a second listing page shows (index 100 and up).
    pub(crate) orders_beyond_first_page: AtomicU64,
    pub(crate) order_reads: AtomicU64,
    pub(crate) browse_injected: AtomicU64,
    pub(crate) order_injected: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Fake {
    faults: Faults,
    confirm_after: Duration,
    inner: Mutex<Inner>,
    stalled: AtomicBool,
    next_id: AtomicU64,
    pub(crate) counters: Counters,
}

type Shared = Arc<Fake>;

impl Fake {
    fn id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:06}",
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("fake shop lock")
    }
}

/// Starts a fake shop on 127.0.0.1:0 with `stock` per product (one product per entry);
/// orders settle after `confirm_after`. Returns its base URL and state.
pub(crate) async fn start(
    stock: &[i64],
    confirm_after: Duration,
    faults: Faults,
) -> (String, Shared) {
    let fake = Arc::new(Fake {
        faults,
        confirm_after,
        inner: Mutex::new(Inner::default()),
        stalled: AtomicBool::new(false),
        next_id: AtomicU64::new(1),
        counters: Counters::default(),
    });
    {
        let mut inner = fake.lock();
        for (i, &total) in stock.iter().enumerate() {
            inner.products.push(Product {
                id: format!("prod-{i:04}"),
                name: format!("Widget{} deluxe", i % 7),
                total,
                reserved: 0,
            });
        }
        inner
            .users
            .insert(ADMIN_EMAIL.into(), ("admin".into(), ADMIN_PASSWORD.into()));
    }
    let router = Router::new()
        .route("/api/users", post(register))
        .route("/api/auth/token", post(token))
        .route("/api/products", get(products))
        .route("/api/orders", post(place_order))
        .route("/api/orders/{id}", get(read_order))
        .route("/api/payments/{id}", get(payment))
        .route("/api/shipments/{id}", get(shipment))
        .route("/api/inventory/{id}", get(inventory))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake shop");
    let addr = listener.local_addr().expect("fake shop address");
    tokio::spawn(async move {
        axum::serve(listener, router)
            .await
            .expect("fake shop serves");
    });
    (format!("http://{addr}"), fake)
}

fn error(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": code.replace('_', " ")}})),
    )
        .into_response()
}

/// The caller's user id from `Authorization: Bearer token:<id>` (or `admin`).
fn caller(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?;
    token.strip_prefix("token:").map(str::to_owned)
}

async fn register(State(fake): State<Shared>, Json(body): Json<Value>) -> Response {
    let (Some(email), Some(password)) = (body["email"].as_str(), body["password"].as_str()) else {
        return error(StatusCode::BAD_REQUEST, "invalid_body");
    };
    let mut inner = fake.lock();
    if inner.users.contains_key(email) {
        return error(StatusCode::CONFLICT, "email_taken");
    }
    let id = fake.id("user");
    inner
        .users
        .insert(email.into(), (id.clone(), password.into()));
    (
        StatusCode::CREATED,
        Json(json!({"id": id, "email": email, "name": body["name"]})),
    )
        .into_response()
}

async fn token(State(fake): State<Shared>, Json(body): Json<Value>) -> Response {
    let inner = fake.lock();
    match inner.users.get(body["email"].as_str().unwrap_or_default()) {
        Some((id, password)) if Some(password.as_str()) == body["password"].as_str() => Json(
            json!({"access_token": format!("token:{id}"), "token_type": "Bearer", "expires_in": 3600}),
        )
        .into_response(),
        _ => error(StatusCode::UNAUTHORIZED, "bad_credentials"),
    }
}

async fn products(
    State(fake): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(20)
        .min(100);
    let offset: usize = q.get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
    if limit == 20 {
        let n = fake.counters.load_browses.fetch_add(1, Ordering::Relaxed) + 1;
        if !fake.stalled.swap(true, Ordering::Relaxed) {
            if let Some(stall) = fake.faults.stall_browse_once {
                tokio::time::sleep(stall).await;
            }
            if let Some(block) = fake.faults.block_runtime_once {
                std::thread::sleep(block);
            }
        }
        if let Some((every, status)) = fake.faults.browse_status_every
            && n % every == 0
        {
            fake.counters
                .browse_injected
                .fetch_add(1, Ordering::Relaxed);
            return error(StatusCode::from_u16(status).expect("status"), "injected");
        }
    }
    let inner = fake.lock();
    let matching: Vec<&Product> = inner
        .products
        .iter()
        .filter(|p| q.get("q").is_none_or(|w| p.name.to_lowercase().contains(w)))
        .collect();
    let items: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|p| json!({"id": p.id, "name": p.name, "price_cents": 999, "available": p.total - p.reserved}))
        .collect();
    let next = offset + limit;
    let next_cursor = (next < matching.len()).then(|| next.to_string());
    Json(json!({"items": items, "next_cursor": next_cursor})).into_response()
}

async fn place_order(
    State(fake): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let Some(user) = caller(&headers) else {
        return error(StatusCode::UNAUTHORIZED, "unauthenticated");
    };
    if !headers.contains_key("idempotency-key") {
        return error(StatusCode::BAD_REQUEST, "idempotency_key_required");
    }
    let n = fake.counters.orders_posted.fetch_add(1, Ordering::Relaxed) + 1;
    if let Some(delay) = fake.faults.order_delay {
        tokio::time::sleep(delay).await;
    }
    if let Some((every, status)) = fake.faults.order_status_every
        && n % every == 0
    {
        fake.counters.order_injected.fetch_add(1, Ordering::Relaxed);
        return error(StatusCode::from_u16(status).expect("status"), "injected");
    }
    let Some(product) = body["items"][0]["product_id"].as_str().map(str::to_owned) else {
        return error(StatusCode::BAD_REQUEST, "invalid_body");
    };
    let id = fake.id("order");
    {
        let mut inner = fake.lock();
        let Some(p) = inner.products.iter_mut().find(|p| p.id == product) else {
            return error(StatusCode::UNPROCESSABLE_ENTITY, "unknown_product");
        };
        let reserved = p.total - p.reserved > 0;
        if p.id.as_str() >= "prod-0100" {
            fake.counters
                .orders_beyond_first_page
                .fetch_add(1, Ordering::Relaxed);
        }
        if reserved {
            p.reserved += 1;
        } else {
            fake.counters
                .orders_without_stock_product
                .fetch_add(1, Ordering::Relaxed);
        }
        inner.orders.insert(
            id.clone(),
            Order {
                user,
                product: product.clone(),
                status: "PENDING",
                reason: None,
            },
        );
        if !fake.faults.never_settle {
            let (fake, id) = (fake.clone(), id.clone());
            tokio::spawn(async move {
                tokio::time::sleep(fake.confirm_after).await;
                settle(&fake, &id, &product, reserved);
            });
        }
    }
    fake.counters
        .orders_accepted
        .fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "status": "PENDING"})),
    )
        .into_response()
}

fn settle(fake: &Fake, id: &str, product: &str, reserved: bool) {
    let mut inner = fake.lock();
    if reserved {
        if !fake.faults.leak_reservation {
            let p = inner
                .products
                .iter_mut()
                .find(|p| p.id == product)
                .expect("ordered product exists");
            p.reserved -= 1;
            p.total -= 1;
        }
        if !fake.faults.confirm_without_payment {
            inner.payments.insert(id.into(), "captured");
        }
        inner.shipments.insert(id.into(), "created");
    }
    if !reserved && fake.faults.charge_cancelled {
        inner.payments.insert(id.into(), "captured");
    }
    let order = inner.orders.get_mut(id).expect("order exists");
    if reserved {
        order.status = "CONFIRMED";
    } else {
        order.status = "CANCELLED";
        order.reason = Some("out_of_stock");
    }
}

async fn read_order(
    State(fake): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Some(user) = caller(&headers) else {
        return error(StatusCode::UNAUTHORIZED, "unauthenticated");
    };
    fake.counters.order_reads.fetch_add(1, Ordering::Relaxed);
    let inner = fake.lock();
    match inner.orders.get(&id) {
        Some(o) if o.user == user || user == "admin" => Json(json!({
            "id": id, "user_id": o.user, "status": o.status,
            "items": [{"product_id": o.product, "quantity": 1, "price_cents": 999}],
            "total_cents": 999, "reason": o.reason, "timeline": [],
        }))
        .into_response(),
        _ => error(StatusCode::NOT_FOUND, "order_not_found"),
    }
}

/// The refusal for a caller who is not the admin.
fn not_admin(headers: &HeaderMap) -> Option<Response> {
    match caller(headers).as_deref() {
        Some("admin") => None,
        Some(_) => Some(error(StatusCode::FORBIDDEN, "admin_only")),
        None => Some(error(StatusCode::UNAUTHORIZED, "unauthenticated")),
    }
}

async fn payment(
    State(fake): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(refusal) = not_admin(&headers) {
        return refusal;
    }
    match fake.lock().payments.get(&id) {
        Some(status) => {
            Json(json!({"order_id": id, "status": status, "amount_cents": 999})).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "payment_not_found"),
    }
}

async fn shipment(
    State(fake): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(refusal) = not_admin(&headers) {
        return refusal;
    }
    match fake.lock().shipments.get(&id) {
        Some(status) => Json(json!({"order_id": id, "status": status})).into_response(),
        None => error(StatusCode::NOT_FOUND, "shipment_not_found"),
    }
}

async fn inventory(
    State(fake): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(refusal) = not_admin(&headers) {
        return refusal;
    }
    let inner = fake.lock();
    match inner.products.iter().find(|p| p.id == id) {
        Some(p) => Json(json!({
            "product_id": p.id, "total": p.total, "reserved": p.reserved,
            "available": p.total - p.reserved,
        }))
        .into_response(),
        None => error(StatusCode::NOT_FOUND, "product_not_found"),
    }
}
