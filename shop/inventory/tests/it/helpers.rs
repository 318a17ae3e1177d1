//! Starts the service on 127.0.0.1:0 against a fresh database and hands out clients.

use std::net::SocketAddr;

use shop_contracts::proto::inventory_client::InventoryClient;
use shop_contracts::proto::{GetStockRequest, Line, OrderRef, ReserveRequest, SetStockRequest};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};
use trellis_service::auth::{ServiceIdentityClient, ServiceKey};

/// A gRPC channel that calls as a service of the shop under test.
pub(crate) type Grpc = ServiceIdentityClient<Channel>;

/// The key the services under test trust (one per test binary).
pub(crate) fn key() -> ServiceKey {
    static KEY: std::sync::OnceLock<ServiceKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| ServiceKey::generate().expect("OS randomness"))
        .clone()
}

/// An identity token for `user_id` with `role`, as the shop's gateway signs one.
pub(crate) fn identity(user_id: &str, role: &str) -> reqwest::header::HeaderValue {
    let token = key().signer("gateway").token(user_id, role).expect("signs");
    reqwest::header::HeaderValue::from_bytes(token.as_bytes()).expect("a header value")
}

/// A running inventory service and what keeps its database alive.
pub(crate) struct Service {
    pub(crate) addr: SocketAddr,
    pub(crate) http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    _dir: Option<tempfile::TempDir>,
    _postgres: Option<trellis_testkit::TestPostgres>,
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn start(url: &str) -> (SocketAddr, oneshot::Sender<()>) {
    let (router, db) = shop_inventory::app(shop_inventory::Config {
        database_url: url.to_owned(),
        service_key: key(),
    })
    .await
    .expect("the service starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel();
    tokio::spawn(trellis_service::serve(
        listener,
        router,
        Some(db),
        None,
        async {
            let _ = rx.await;
        },
    ));
    (addr, tx)
}

/// The service on SQLite in a fresh tempdir.
pub(crate) async fn sqlite() -> Option<Service> {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/inventory.db", dir.path().display());
    let (addr, tx) = start(&url).await;
    Some(Service {
        addr,
        http: reqwest::Client::new(),
        shutdown: Some(tx),
        _dir: Some(dir),
        _postgres: None,
    })
}

/// The service on a fresh PostgreSQL database, or `None` (outside CI) when there is none.
pub(crate) async fn postgres(test_name: &str) -> Option<Service> {
    let pg = trellis_testkit::postgres(test_name).await?;
    let (addr, tx) = start(&pg.url).await;
    Some(Service {
        addr,
        http: reqwest::Client::new(),
        shutdown: Some(tx),
        _dir: None,
        _postgres: Some(pg),
    })
}

impl Service {
    pub(crate) fn grpc(&self) -> InventoryClient<Grpc> {
        let channel = Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect_lazy();
        InventoryClient::new(ServiceIdentityClient::new(
            channel,
            key().service_identity("orders"),
        ))
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

pub(crate) async fn set_stock(client: &mut InventoryClient<Grpc>, product_id: &str, total: i64) {
    client
        .set_stock(SetStockRequest {
            product_id: product_id.to_owned(),
            total,
        })
        .await
        .expect("SetStock");
}

/// `(total, reserved, available)` of a product.
pub(crate) async fn level(client: &mut InventoryClient<Grpc>, product_id: &str) -> (i64, i64, i64) {
    let stock = client
        .get_stock(GetStockRequest {
            product_ids: vec![product_id.to_owned()],
        })
        .await
        .expect("GetStock")
        .into_inner()
        .stock;
    assert_eq!(stock.len(), 1);
    (stock[0].total, stock[0].reserved, stock[0].available)
}

pub(crate) fn reserve_request(order_id: &str, lines: &[(&str, i64)]) -> ReserveRequest {
    ReserveRequest {
        order_id: order_id.to_owned(),
        lines: lines
            .iter()
            .map(|(p, q)| Line {
                product_id: (*p).to_owned(),
                quantity: *q,
            })
            .collect(),
    }
}

pub(crate) fn order(order_id: &str) -> OrderRef {
    OrderRef {
        order_id: order_id.to_owned(),
    }
}

/// Runs an async check against SQLite and PostgreSQL, as two tests.
#[macro_export]
macro_rules! on_both {
    ($check:ident) => {
        mod $check {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let service = $crate::helpers::sqlite().await.expect("sqlite");
                super::$check(service).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let Some(service) = $crate::helpers::postgres(stringify!($check)).await else {
                    return;
                };
                super::$check(service).await;
            }
        }
    };
}
