//! Starts the service on 127.0.0.1:0 against a fresh database and calls it.

use std::net::SocketAddr;

use reqwest::StatusCode;
use serde_json::{Value, json};
use shop_contracts::proto::users_client::UsersClient;
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

/// A running users service and what keeps its database alive.
pub(crate) struct Service {
    pub(crate) addr: SocketAddr,
    pub(crate) url: String,
    pub(crate) db: trellis_service::Db,
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

/// Serves the service on `database_url`; answers its address, database and shutdown switch.
pub(crate) async fn start(
    database_url: &str,
) -> (SocketAddr, trellis_service::Db, oneshot::Sender<()>) {
    let (router, db) = shop_users::app(shop_users::Config {
        database_url: database_url.to_owned(),
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
        Some(db.clone()),
        None,
        async {
            let _ = rx.await;
        },
    ));
    (addr, db, tx)
}

/// The service on SQLite in a fresh tempdir.
pub(crate) async fn sqlite() -> Option<Service> {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/users.db", dir.path().display());
    let (addr, db, tx) = start(&url).await;
    Some(Service {
        addr,
        url,
        db,
        http: reqwest::Client::new(),
        shutdown: Some(tx),
        _dir: Some(dir),
        _postgres: None,
    })
}

/// The service on a fresh PostgreSQL database, or `None` (outside CI) when there is none.
pub(crate) async fn postgres(test_name: &str) -> Option<Service> {
    let pg = trellis_testkit::postgres(test_name).await?;
    let (addr, db, tx) = start(&pg.url).await;
    Some(Service {
        addr,
        url: pg.url.clone(),
        db,
        http: reqwest::Client::new(),
        shutdown: Some(tx),
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

    pub(crate) fn grpc(&self) -> UsersClient<ServiceIdentityClient<Channel>> {
        let channel = Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect_lazy();
        UsersClient::new(ServiceIdentityClient::new(
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

    pub(crate) async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(self.http.post(self.endpoint(path)).json(&body))
            .await
    }

    pub(crate) async fn register(&self, email: &str, password: &str, name: &str) -> Answer {
        self.post(
            "/api/users",
            json!({"email": email, "password": password, "name": name}),
        )
        .await
    }

    pub(crate) async fn login(&self, email: &str, password: &str) -> Answer {
        self.post(
            "/api/auth/token",
            json!({"email": email, "password": password}),
        )
        .await
    }

    pub(crate) async fn jwks(&self) -> Value {
        self.send(self.http.get(self.endpoint("/.well-known/jwks.json")))
            .await
            .body
    }
}

/// Runs an async check against SQLite and PostgreSQL, as two tests.
#[macro_export]
macro_rules! on_both {
    ($check:ident) => {
        mod $check {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let service = $crate::helpers::sqlite().await.expect("sqlite");
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
