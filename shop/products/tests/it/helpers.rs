//! A fake inventory service, and the products service started against it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use reqwest::StatusCode;
use serde_json::{Value, json};
use shop_contracts::proto::inventory_server::{Inventory, InventoryServer};
use shop_contracts::proto::products_client::ProductsClient;
use shop_contracts::proto::{
    GetStockRequest, GetStockResponse, OrderRef, ReservationState, ReserveRequest, ReserveResponse,
    SetStockRequest, Stock,
};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};
use trellis_service::auth::{ServiceIdentityClient, ServiceKey};

/// The key the service under test trusts (one per test binary).
pub(crate) fn key() -> ServiceKey {
    static KEY: std::sync::OnceLock<ServiceKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| ServiceKey::generate().expect("OS randomness"))
        .clone()
}

/// An identity token for `user_id` with `role`, as the shop's gateway signs one.
pub(crate) fn identity(user_id: &str, role: &str) -> reqwest::header::HeaderValue {
    key().signer("gateway").token(user_id, role).expect("signs")
}
use tonic::{Request, Response, Status};

/// An inventory that keeps totals in memory, counts calls, and answers UNAVAILABLE while
/// `down` is set.
#[derive(Debug, Default)]
pub(crate) struct FakeInventory {
    pub(crate) totals: Mutex<HashMap<String, i64>>,
    pub(crate) down: AtomicBool,
    pub(crate) get_stock_calls: AtomicUsize,
    pub(crate) set_stock_calls: AtomicUsize,
}

#[derive(Debug, Clone)]
struct Shared(Arc<FakeInventory>);

impl FakeInventory {
    fn check_up(&self) -> Result<(), Status> {
        if self.down.load(Ordering::SeqCst) {
            Err(Status::unavailable("inventory is down"))
        } else {
            Ok(())
        }
    }
}

#[tonic::async_trait]
impl Inventory for Shared {
    async fn reserve(
        &self,
        _: Request<ReserveRequest>,
    ) -> Result<Response<ReserveResponse>, Status> {
        Err(Status::unimplemented("not used by products"))
    }

    async fn release(&self, _: Request<OrderRef>) -> Result<Response<ReservationState>, Status> {
        Err(Status::unimplemented("not used by products"))
    }

    async fn commit(&self, _: Request<OrderRef>) -> Result<Response<ReservationState>, Status> {
        Err(Status::unimplemented("not used by products"))
    }

    async fn set_stock(
        &self,
        request: Request<SetStockRequest>,
    ) -> Result<Response<Stock>, Status> {
        self.0.check_up()?;
        self.0.set_stock_calls.fetch_add(1, Ordering::SeqCst);
        let request = request.into_inner();
        self.0
            .totals
            .lock()
            .unwrap()
            .insert(request.product_id.clone(), request.total);
        Ok(Response::new(Stock {
            product_id: request.product_id,
            total: request.total,
            reserved: 0,
            available: request.total,
        }))
    }

    async fn get_stock(
        &self,
        request: Request<GetStockRequest>,
    ) -> Result<Response<GetStockResponse>, Status> {
        self.0.check_up()?;
        self.0.get_stock_calls.fetch_add(1, Ordering::SeqCst);
        let totals = self.0.totals.lock().unwrap();
        let stock = request
            .into_inner()
            .product_ids
            .into_iter()
            .map(|id| {
                let total = totals.get(&id).copied().unwrap_or(0);
                Stock {
                    product_id: id,
                    total,
                    reserved: 0,
                    available: total,
                }
            })
            .collect();
        Ok(Response::new(GetStockResponse { stock }))
    }
}

/// A running products service with its fake inventory.
pub(crate) struct Service {
    pub(crate) addr: SocketAddr,
    pub(crate) inventory: Arc<FakeInventory>,
    pub(crate) http: reqwest::Client,
    stops: Vec<oneshot::Sender<()>>,
    _dir: Option<tempfile::TempDir>,
    _postgres: Option<trellis_testkit::TestPostgres>,
}

impl Drop for Service {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

async fn serve(
    router: axum::Router,
    db: Option<trellis_service::Db>,
) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel();
    tokio::spawn(trellis_service::serve(listener, router, db, None, async {
        let _ = rx.await;
    }));
    (addr, tx)
}

/// Starts the products service on `database_url`; `inventory_addr` overrides the fake's.
async fn start(
    database_url: &str,
    inventory_addr: Option<&str>,
) -> (SocketAddr, Arc<FakeInventory>, Vec<oneshot::Sender<()>>) {
    let inventory = Arc::new(FakeInventory::default());
    let fake = tonic::service::Routes::new(InventoryServer::new(Shared(Arc::clone(&inventory))))
        .into_axum_router();
    let (inventory_at, stop_inventory) = serve(fake, None).await;
    let (router, db) = shop_products::app(shop_products::Config {
        database_url: database_url.to_owned(),
        inventory_addr: inventory_addr.map_or_else(|| inventory_at.to_string(), str::to_owned),
        service_key: key(),
    })
    .await
    .expect("the service starts");
    let (addr, stop) = serve(router, Some(db)).await;
    (addr, inventory, vec![stop, stop_inventory])
}

/// The service on SQLite in a fresh tempdir.
pub(crate) async fn sqlite_with(inventory_addr: Option<&str>) -> Service {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/products.db", dir.path().display());
    let (addr, inventory, stops) = start(&url, inventory_addr).await;
    Service {
        addr,
        inventory,
        http: reqwest::Client::new(),
        stops,
        _dir: Some(dir),
        _postgres: None,
    }
}

/// The service on a fresh PostgreSQL database, or `None` (outside CI) when there is none.
pub(crate) async fn postgres(test_name: &str) -> Option<Service> {
    let pg = trellis_testkit::postgres(test_name).await?;
    let (addr, inventory, stops) = start(&pg.url, None).await;
    Some(Service {
        addr,
        inventory,
        http: reqwest::Client::new(),
        stops,
        _dir: None,
        _postgres: Some(pg),
    })
}

/// A JSON answer.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Value,
}

impl Answer {
    pub(crate) fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }
}

impl Service {
    pub(crate) fn endpoint(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) fn grpc(&self) -> ProductsClient<ServiceIdentityClient<Channel>> {
        let channel = Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect_lazy();
        ProductsClient::new(ServiceIdentityClient::new(
            channel,
            key().service_identity("orders"),
        ))
    }

    pub(crate) async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("the service answers");
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        Answer { status, body }
    }

    pub(crate) async fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(self.endpoint(path))).await
    }

    /// `POST /api/products` as an admin, with an optional idempotency key.
    pub(crate) async fn create(&self, body: Value, key: Option<&str>) -> Answer {
        let mut request = self
            .http
            .post(self.endpoint("/api/products"))
            .header(
                trellis_service::auth::IDENTITY_HEADER,
                identity("admin-1", "admin"),
            )
            .json(&body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        self.send(request).await
    }

    /// Creates a product and answers its id.
    pub(crate) async fn product(&self, name: &str, price_cents: i64, stock: i64) -> String {
        let answer = self
            .create(
                json!({"name": name, "price_cents": price_cents, "stock": stock}),
                None,
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
        answer.body["id"].as_str().expect("an id").to_owned()
    }
}

/// Runs an async check against SQLite and PostgreSQL, as two tests.
#[macro_export]
macro_rules! on_both {
    ($check:ident) => {
        mod $check {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let service = $crate::helpers::sqlite_with(None).await;
                super::$check(service).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(service) = $crate::helpers::postgres(stringify!($check)).await else {
                    return;
                };
                super::$check(service).await;
            }
        }
    };
}
