//! Starts the orders service on SQLite in a temporary directory, against one gRPC server that
//! plays users, products, inventory, payments and shipping (every call succeeds), and calls
//! its router as the gateway would.

use std::path::{Path, PathBuf};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::Value;
use shop_contracts::proto::inventory_server::{Inventory, InventoryServer};
use shop_contracts::proto::payments_server::{Payments, PaymentsServer};
use shop_contracts::proto::products_server::{Products, ProductsServer};
use shop_contracts::proto::shipping_server::{Shipping, ShippingServer};
use shop_contracts::proto::users_server::{Users, UsersServer};
use shop_contracts::proto::{
    ChargeRequest, ChargeResponse, CreateShipmentRequest, GetStockRequest, GetStockResponse,
    GetUserRequest, OrderRef, PaymentState, PriceItemsRequest, PriceItemsResponse, ProductPrice,
    RefundResponse, ReservationState, ReserveRequest, ReserveResponse, SetStockRequest, Shipment,
    Stock, User,
};
use tonic::codegen::Service as _;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};
use trellis_service::auth::{IDENTITY_HEADER, ServiceKey};

/// Every product costs this much, in cents.
pub(crate) const PRICE_CENTS: i64 = 250;

/// A directory removed when dropped.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        let path = std::env::temp_dir().join(format!("shop-orders-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The other five services, each answering every call with success.
#[derive(Debug, Clone, Copy)]
struct Participants;

#[tonic::async_trait]
impl Users for Participants {
    async fn get_user(
        &self,
        request: GrpcRequest<GetUserRequest>,
    ) -> Result<GrpcResponse<User>, Status> {
        Ok(GrpcResponse::new(User {
            id: request.into_inner().id,
            email: "customer@test.local".to_owned(),
            name: "customer".to_owned(),
            role: "customer".to_owned(),
        }))
    }
}

#[tonic::async_trait]
impl Products for Participants {
    async fn price_items(
        &self,
        request: GrpcRequest<PriceItemsRequest>,
    ) -> Result<GrpcResponse<PriceItemsResponse>, Status> {
        let products = request
            .into_inner()
            .product_ids
            .into_iter()
            .map(|id| ProductPrice {
                name: format!("product {id}"),
                id,
                price_cents: PRICE_CENTS,
            })
            .collect();
        Ok(GrpcResponse::new(PriceItemsResponse { products }))
    }
}

fn state(state: &str) -> Result<GrpcResponse<ReservationState>, Status> {
    Ok(GrpcResponse::new(ReservationState {
        state: state.to_owned(),
    }))
}

#[tonic::async_trait]
impl Inventory for Participants {
    async fn reserve(
        &self,
        _request: GrpcRequest<ReserveRequest>,
    ) -> Result<GrpcResponse<ReserveResponse>, Status> {
        Ok(GrpcResponse::new(ReserveResponse {
            reserved: true,
            reason: String::new(),
        }))
    }

    async fn release(
        &self,
        _request: GrpcRequest<OrderRef>,
    ) -> Result<GrpcResponse<ReservationState>, Status> {
        state("released")
    }

    async fn commit(
        &self,
        _request: GrpcRequest<OrderRef>,
    ) -> Result<GrpcResponse<ReservationState>, Status> {
        state("committed")
    }

    async fn set_stock(
        &self,
        _request: GrpcRequest<SetStockRequest>,
    ) -> Result<GrpcResponse<Stock>, Status> {
        Err(Status::unimplemented("the orders service never sets stock"))
    }

    async fn get_stock(
        &self,
        _request: GrpcRequest<GetStockRequest>,
    ) -> Result<GrpcResponse<GetStockResponse>, Status> {
        Err(Status::unimplemented(
            "the orders service never reads stock",
        ))
    }
}

#[tonic::async_trait]
impl Payments for Participants {
    async fn charge(
        &self,
        request: GrpcRequest<ChargeRequest>,
    ) -> Result<GrpcResponse<ChargeResponse>, Status> {
        Ok(GrpcResponse::new(ChargeResponse {
            status: "captured".to_owned(),
            payment_id: format!("payment-{}", request.into_inner().order_id),
            message: String::new(),
        }))
    }

    async fn refund(
        &self,
        _request: GrpcRequest<OrderRef>,
    ) -> Result<GrpcResponse<RefundResponse>, Status> {
        Ok(GrpcResponse::new(RefundResponse {
            status: "refunded".to_owned(),
        }))
    }

    async fn get_payment(
        &self,
        _request: GrpcRequest<OrderRef>,
    ) -> Result<GrpcResponse<PaymentState>, Status> {
        Err(Status::unimplemented(
            "the orders service never reads payments",
        ))
    }
}

fn shipment(order_id: String, status: &str) -> Result<GrpcResponse<Shipment>, Status> {
    Ok(GrpcResponse::new(Shipment {
        id: format!("shipment-{order_id}"),
        order_id,
        status: status.to_owned(),
    }))
}

#[tonic::async_trait]
impl Shipping for Participants {
    async fn create_shipment(
        &self,
        request: GrpcRequest<CreateShipmentRequest>,
    ) -> Result<GrpcResponse<Shipment>, Status> {
        shipment(request.into_inner().order_id, "created")
    }

    async fn cancel_shipment(
        &self,
        request: GrpcRequest<OrderRef>,
    ) -> Result<GrpcResponse<Shipment>, Status> {
        shipment(request.into_inner().order_id, "cancelled")
    }

    async fn get_shipment(
        &self,
        request: GrpcRequest<OrderRef>,
    ) -> Result<GrpcResponse<Shipment>, Status> {
        shipment(request.into_inner().order_id, "created")
    }
}

/// Serves the fake participants on 127.0.0.1:0 until the test's runtime ends; answers the
/// address.
async fn participants() -> String {
    let router = tonic::service::Routes::new(UsersServer::new(Participants))
        .add_service(ProductsServer::new(Participants))
        .add_service(InventoryServer::new(Participants))
        .add_service(PaymentsServer::new(Participants))
        .add_service(ShippingServer::new(Participants))
        .into_axum_router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(trellis_service::serve(
        listener,
        router,
        None,
        None,
        std::future::pending(),
    ));
    addr
}

/// The orders service under test, with its data directory.
pub(crate) struct TestOrders {
    pub(crate) orders: Option<shop_orders::Orders>,
    pub(crate) router: Router,
    pub(crate) dir: TempDir,
    key: ServiceKey,
}

impl TestOrders {
    /// Starts the service (orchestrated saga) in a fresh directory.
    pub(crate) async fn start() -> Self {
        let dir = TempDir::new();
        let addr = participants().await;
        let key = ServiceKey::generate().expect("OS randomness");
        let url = format!("sqlite://{}", dir.path().join("orders.db").display());
        let config = shop_orders::Config::new(url, [addr.as_str(); 5], key.clone());
        let orders = shop_orders::start(config).await.expect("orders starts");
        Self {
            router: orders.router(),
            orders: Some(orders),
            dir,
            key,
        }
    }

    /// The read-model database file (idempotency rows live there).
    pub(crate) fn read_db_url(&self) -> String {
        format!(
            "sqlite://{}",
            self.dir.path().join("orders-read.db").display()
        )
    }

    /// Calls the service as `user_id` (a customer), with `headers` besides the identity.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        user_id: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_as(method, path, (user_id, "customer"), headers, body)
            .await
    }

    /// Calls the service as `(user_id, role)`, with `headers` besides the identity.
    pub(crate) async fn call_as(
        &self,
        method: Method,
        path: &str,
        (user_id, role): (&str, &str),
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let token = self
            .key
            .signer("gateway")
            .token(user_id, role)
            .expect("signs");
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(IDENTITY_HEADER, token)
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let response = self
            .router
            .clone()
            .call(request.body(body).expect("request"))
            .await
            .expect("the router is infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        (status, value)
    }

    /// Reads the order until it reaches `status`, giving up after `reads_max` reads 20 ms apart.
    pub(crate) async fn wait_for_status(
        &self,
        user_id: &str,
        order_id: &str,
        status: &str,
    ) -> Value {
        const READS_MAX: usize = 1_500;
        let mut last = Value::Null;
        for _ in 0..READS_MAX {
            let (code, order) = self
                .call(
                    Method::GET,
                    &format!("/api/orders/{order_id}"),
                    user_id,
                    &[],
                    None,
                )
                .await;
            if code == StatusCode::OK && order["status"] == status {
                return order;
            }
            last = order;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("order {order_id} never reached {status}: {last}");
    }
}

impl Drop for TestOrders {
    fn drop(&mut self) {
        // Shutting down needs the runtime; dropping the tasks with it is enough for a test.
        drop(self.orders.take());
    }
}
