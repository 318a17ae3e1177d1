//! The payments service, driven through its gRPC server and REST routes, against the payment
//! provider simulator on a real listener, on SQLite and on PostgreSQL.

mod breaker;
mod charges;
mod outage;
mod provider_answers;
mod refunds;
mod replicas;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use shop_contracts::proto::payments_client::PaymentsClient;
use shop_contracts::proto::{ChargeRequest, ChargeResponse, OrderRef};
use shop_payment_provider::{ProviderConfig, ProviderHandle};
use shop_payments::{Config, ResilienceConfig};
use trellis_resilience::{Clock, SharedClock};
use trellis_service::auth::ServiceKey;
use trellis_service::{GrpcChannel, GrpcClientConfig, grpc_channel};

/// The key the services under test trust (one per test binary).
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
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(crate::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(crate::Backend::Postgres).await;
            }
        }
    )*};
}
pub(crate) use on_both_backends;

/// A breaker clock the test moves by hand.
#[derive(Debug, Clone, Default)]
pub(crate) struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub(crate) fn advance(&self, by: Duration) {
        self.0.fetch_add(
            u64::try_from(by.as_nanos()).expect("small"),
            Ordering::SeqCst,
        );
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

enum Keep {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Postgres(#[allow(dead_code)] trellis_testkit::TestPostgres),
}

/// A running payments service and provider simulator.
pub(crate) struct Harness {
    pub(crate) client: PaymentsClient<GrpcChannel>,
    pub(crate) http_base: String,
    pub(crate) provider: ProviderHandle,
    pub(crate) clock: ManualClock,
    /// The service's database, for a second replica.
    pub(crate) database_url: String,
    /// The provider's own address (no front), for a second replica.
    pub(crate) provider_url: String,
    _keep: Keep,
    /// For [`Front::Nobody`]: the provider's port, bound and never listened on, so every
    /// connection is refused and no other test can take the port meanwhile.
    _reserved: Option<tokio::net::TcpSocket>,
}

/// Test resilience settings: fast backoff and a breaker on a manual clock.
pub(crate) fn test_resilience(clock: &ManualClock) -> ResilienceConfig {
    ResilienceConfig {
        backoff_initial: Duration::from_millis(1),
        backoff_max: Duration::from_millis(5),
        breaker_open: Duration::from_secs(30),
        clock: SharedClock::new(clock.clone()),
        ..ResilienceConfig::default()
    }
}

/// What stands between the payments service and the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Front {
    /// Nothing: payments calls the provider directly.
    Direct,
    /// A TCP relay whose first connection is accepted and read but never answered (a request
    /// that may have reached the provider, then timed out); later ones reach the provider.
    FirstConnectionHangs,
    /// An address nothing listens on: every connection is refused.
    Nobody,
    /// Another server, run by the test, stands in for the provider (the simulator is
    /// started but not called).
    Elsewhere(std::net::SocketAddr),
}

/// Starts the provider and the payments service; `None` when PostgreSQL is unreachable
/// outside CI.
pub(crate) async fn start(
    backend: Backend,
    test: &str,
    provider_config: ProviderConfig,
    tune: impl FnOnce(&mut ResilienceConfig),
) -> Option<Harness> {
    start_behind(backend, test, provider_config, tune, Front::Direct).await
}

/// Relays connections to `provider`, except the first, which is held open unanswered.
async fn hanging_first_relay(provider: std::net::SocketAddr) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut inbound, _)) = listener.accept().await {
            let hang = std::mem::take(&mut first);
            tokio::spawn(async move {
                if hang {
                    // Read (so the request is sent in full) and never answer.
                    let mut sink = tokio::io::sink();
                    let _ = tokio::io::copy(&mut inbound, &mut sink).await;
                    return;
                }
                let Ok(mut outbound) = tokio::net::TcpStream::connect(provider).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    url
}

/// As [`start`], with `front` between payments and the provider.
pub(crate) async fn start_behind(
    backend: Backend,
    test: &str,
    provider_config: ProviderConfig,
    tune: impl FnOnce(&mut ResilienceConfig),
    front: Front,
) -> Option<Harness> {
    let (database_url, keep) = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            (
                format!("sqlite://{}/payments.db", dir.path().display()),
                Keep::Dir(dir),
            )
        }
        Backend::Postgres => {
            let db = trellis_testkit::postgres(test).await?;
            (db.url.clone(), Keep::Postgres(db))
        }
    };
    let ledger = shop_payment_provider::Ledger::in_memory(shop_payment_provider::CHARGES_KEPT_MAX)
        .await
        .expect("the provider's ledger");
    let (provider_router, provider) = shop_payment_provider::app(provider_config, ledger, &key());
    let provider_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let provider_addr = provider_listener.local_addr().expect("addr");
    let mut reserved = None;
    let provider_url = match front {
        Front::Direct => format!("http://{provider_addr}"),
        Front::FirstConnectionHangs => hanging_first_relay(provider_addr).await,
        Front::Nobody => {
            // Bound but not listening: connections are refused, and the port stays ours (a
            // listener dropped at once could hand its port to another test's server).
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind("127.0.0.1:0".parse().expect("address"))
                .expect("bind");
            let url = format!("http://{}", socket.local_addr().expect("addr"));
            reserved = Some(socket);
            url
        }
        Front::Elsewhere(addr) => format!("http://{addr}"),
    };
    tokio::spawn(trellis_service::serve(
        provider_listener,
        provider_router,
        None,
        None,
        std::future::pending(),
    ));
    let clock = ManualClock::default();
    let mut resilience = test_resilience(&clock);
    tune(&mut resilience);
    let (client, http_base) = serve_payments(&database_url, &provider_url, resilience).await;
    Some(Harness {
        client,
        http_base,
        provider,
        clock,
        database_url,
        provider_url: format!("http://{provider_addr}"),
        _keep: keep,
        _reserved: reserved,
    })
}

/// Serves a payments service on `database_url` calling `provider_url`; its gRPC client and
/// REST base URL.
async fn serve_payments(
    database_url: &str,
    provider_url: &str,
    resilience: ResilienceConfig,
) -> (PaymentsClient<GrpcChannel>, String) {
    let (router, db) = shop_payments::app(Config {
        database_url: database_url.to_owned(),
        provider_url: provider_url.to_owned(),
        resilience,
        service_key: key(),
    })
    .await
    .expect("payments app");
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
    (PaymentsClient::new(channel), format!("http://{addr}"))
}

impl Harness {
    /// A second payments process on the same database, calling the provider directly: its
    /// gRPC client.
    pub(crate) async fn replica(&self) -> PaymentsClient<GrpcChannel> {
        let resilience = test_resilience(&self.clock);
        serve_payments(&self.database_url, &self.provider_url, resilience)
            .await
            .0
    }

    pub(crate) async fn charge(
        &self,
        order_id: &str,
        amount_cents: i64,
    ) -> Result<ChargeResponse, tonic::Status> {
        self.client
            .clone()
            .charge(ChargeRequest {
                order_id: order_id.to_owned(),
                user_id: "user-1".to_owned(),
                amount_cents,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub(crate) async fn refund(&self, order_id: &str) -> String {
        self.client
            .clone()
            .refund(OrderRef {
                order_id: order_id.to_owned(),
            })
            .await
            .expect("refund answers")
            .into_inner()
            .status
    }

    pub(crate) async fn payment_status(&self, order_id: &str) -> String {
        self.client
            .clone()
            .get_payment(OrderRef {
                order_id: order_id.to_owned(),
            })
            .await
            .expect("get payment")
            .into_inner()
            .status
    }

    pub(crate) fn outage(&self, on: bool) {
        self.provider
            .set_config(ProviderConfig {
                outage: on,
                ..self.provider.config()
            })
            .expect("valid config");
    }
}
