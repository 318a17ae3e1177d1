//! The shipping service, driven through its gRPC server and REST routes on a real listener,
//! on SQLite and on PostgreSQL.

mod shipments;

use shop_contracts::proto::shipping_client::ShippingClient;
use shop_contracts::proto::{CreateShipmentRequest, Line, OrderRef, Shipment};
use trellis_service::auth::ServiceKey;
use trellis_service::{GrpcChannel, GrpcClientConfig, grpc_channel};

/// The key the service under test trusts (one per test binary).
pub(crate) fn key() -> ServiceKey {
    static KEY: std::sync::OnceLock<ServiceKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| ServiceKey::generate().expect("OS randomness"))
        .clone()
}

/// Which database a test runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// Runs an `async fn(Backend)` test once per backend, as `name::sqlite` and `name::postgres`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(crate::Backend::Sqlite).await;
            }

            #[tokio::test]
            async fn postgres() {
                super::$name(crate::Backend::Postgres).await;
            }
        }
    )*};
}
pub(crate) use on_both_backends;

enum Keep {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Postgres(#[allow(dead_code)] trellis_testkit::TestPostgres),
}

/// A running shipping service.
pub(crate) struct Harness {
    pub(crate) client: ShippingClient<GrpcChannel>,
    pub(crate) http_base: String,
    _keep: Keep,
}

/// Starts the service; `None` when PostgreSQL is unreachable outside CI.
pub(crate) async fn start(backend: Backend, test: &str) -> Option<Harness> {
    let (database_url, keep) = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            (
                format!("sqlite://{}/shipping.db", dir.path().display()),
                Keep::Dir(dir),
            )
        }
        Backend::Postgres => {
            let db = trellis_testkit::postgres(test).await?;
            (db.url.clone(), Keep::Postgres(db))
        }
    };
    let (router, db) = shop_shipping::app(shop_shipping::Config {
        database_url,
        service_key: key(),
    })
    .await
    .expect("shipping app");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(trellis_service::serve(
        listener,
        router,
        Some(db),
        None,
        std::future::pending(),
    ));
    let channel = grpc_channel(
        &addr.to_string(),
        GrpcClientConfig::default(),
        key().service_identity("orders"),
    )
    .expect("channel");
    Some(Harness {
        client: ShippingClient::new(channel),
        http_base: format!("http://{addr}"),
        _keep: keep,
    })
}

impl Harness {
    pub(crate) async fn create(
        &self,
        order_id: &str,
        lines: &[(&str, i64)],
    ) -> Result<Shipment, tonic::Status> {
        self.client
            .clone()
            .create_shipment(CreateShipmentRequest {
                order_id: order_id.to_owned(),
                user_id: "user-1".to_owned(),
                lines: lines
                    .iter()
                    .map(|(p, q)| Line {
                        product_id: (*p).to_owned(),
                        quantity: *q,
                    })
                    .collect(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub(crate) async fn cancel(&self, order_id: &str) -> Shipment {
        self.client
            .clone()
            .cancel_shipment(OrderRef {
                order_id: order_id.to_owned(),
            })
            .await
            .expect("cancel")
            .into_inner()
    }

    pub(crate) async fn get(&self, order_id: &str) -> Shipment {
        self.client
            .clone()
            .get_shipment(OrderRef {
                order_id: order_id.to_owned(),
            })
            .await
            .expect("get")
            .into_inner()
    }
}
