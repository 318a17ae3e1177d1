//! Runs the reference shop.
//!
//! [`up`] starts the gateway and every service in one process, each on its own loopback
//! listener with its own database, talking over real HTTP and gRPC: what `trellis up` runs and
//! what the end-to-end tests start on port 0. [`serve_one`] runs a single service, for one
//! process per service (`trellis serve NAME --db postgres://…`). [`processes::spawn`] runs
//! each service as a supervised child process of this one (`trellis up --processes`, and
//! what `trellis chaos` kills services in).
//!
//! On first start `up` creates the admin account (from `TRELLIS_ADMIN_EMAIL` /
//! `TRELLIS_ADMIN_PASSWORD` or generated) and a small catalog; a second start on the same data
//! directory reuses both.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let shop = shop_app::up(shop_app::ShopConfig::new("trellis-data")).await?;
//! println!("gateway at {}", shop.gateway_url());
//! shop.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod gateway;
mod mcp;
mod openapi;
pub mod processes;
mod seed;
mod serve;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_service::Db;
use trellis_service::auth::{IDENTITY_HEADER, ServiceKey};
use trellis_telemetry::metrics::PrometheusHandle;
use trellis_telemetry::service::ServiceScopeExt as _;

pub use gateway::{
    CONSOLE_ROUTE, RATE_PER_CLIENT, ShopHooks, config_toml, config_toml_with_replicas,
};
pub use mcp::MCP_PATH;
pub use openapi::{BEARER_SCHEME, openapi};
pub use processes::{ProcessConfig, ProcessShop};
pub use seed::{CATALOG, Seeded, seed_catalog_at};
pub use serve::{GATEWAY_OPERATOR_PEER, SEED_TRIES_SERVE, ServeConfig, serve_one};
pub use shop_contracts::events::SagaStyle;
pub use shop_payment_provider::{ProviderConfig, ProviderHandle};

/// The services, in start order. `mcp` serves the shop's agent tools over MCP (the gateway
/// routes `/mcp` to it); its tools call the shop back through the gateway.
pub const SERVICES: [&str; 8] = [
    "payment-provider",
    "users",
    "inventory",
    "products",
    "payments",
    "shipping",
    "orders",
    "mcp",
];

/// The admin console's service name: `trellis serve console`, and a child of
/// `trellis up --processes` started after [`SERVICES`] (it is not one of them: the chaos
/// runner's faults and checks are about the order flow).
pub const CONSOLE: &str = "console";

/// What [`up`] runs.
#[derive(Debug, Clone)]
pub struct ShopConfig {
    /// Where the embedded databases live (one SQLite file per service).
    pub data_dir: PathBuf,
    /// Per-service database URLs overriding the SQLite default (`postgres://…`).
    pub database_urls: BTreeMap<String, String>,
    /// Address every listener binds.
    pub bind: IpAddr,
    /// Gateway port; 0 picks a free one.
    pub gateway_port: u16,
    /// The gateway's operator port (`/metrics`, `/healthz`, `/readyz`, on `bind`); 0 picks a
    /// free one.
    pub operator_port: u16,
    /// Whether services use DESIGN.md's ports (8101…) or free ones (tests).
    pub fixed_service_ports: bool,
    /// Admin account to create when missing; generated when `None`.
    pub admin: Option<(String, String)>,
    /// Create a small catalog when the products service has none.
    pub seed_catalog: bool,
    /// The payment provider simulator's faults at start.
    pub provider: ProviderConfig,
    /// Serve `/metrics` from the process's Prometheus recorder.
    pub metrics: bool,
    /// The bus order events are relayed to; `sqlite://DATA_DIR/bus.db` when `None`.
    pub bus_url: Option<String>,
    /// Prefix of NATS streams and subjects (`[a-z0-9_]`).
    pub bus_prefix: String,
    /// How the order saga runs: orchestrated by the orders service (default) or
    /// choreographed on the bus.
    pub saga: SagaStyle,
}

impl ShopConfig {
    /// DESIGN.md's defaults with data under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            database_urls: BTreeMap::new(),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            gateway_port: shop_contracts::ports::GATEWAY,
            operator_port: shop_contracts::ports::GATEWAY_OPERATOR,
            fixed_service_ports: true,
            admin: None,
            seed_catalog: true,
            provider: ProviderConfig::default(),
            metrics: true,
            bus_url: None,
            bus_prefix: "shop".to_owned(),
            saga: SagaStyle::Orchestrated,
        }
    }

    /// Every listener on a free port (for tests).
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            gateway_port: 0,
            operator_port: 0,
            fixed_service_ports: false,
            metrics: false,
            ..Self::new(data_dir)
        }
    }

    /// The bus URL in use.
    pub fn bus_url(&self) -> String {
        self.bus_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}/bus.db", self.data_dir.display()))
    }

    fn database_url(&self, service: &str) -> String {
        self.database_urls
            .get(service)
            .cloned()
            .unwrap_or_else(|| format!("sqlite://{}/{service}.db", self.data_dir.display()))
    }
}

/// Why the shop could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A service could not start.
    #[error("the {service} service could not start: {message}")]
    Service {
        /// Which one.
        service: &'static str,
        /// Why.
        message: String,
    },
    /// The gateway could not start.
    #[error("the gateway could not start: {0}")]
    Gateway(String),
    /// No service key: the services could not check who calls them.
    #[error("no service key: {0}")]
    ServiceKey(#[from] trellis_service::auth::AuthError),
    /// The bus could not be opened.
    #[error("cannot open the bus {url}: {message}")]
    Bus {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// A choreographed service was asked for without a bus.
    #[error("the {0} service takes part in the choreographed saga and needs --bus")]
    NoBus(String),
    /// A child process could not be started or signalled (`trellis up --processes`).
    #[error(transparent)]
    Supervisor(#[from] trellis_chaos::supervisor::Error),
    /// A child process did not answer `/healthz` in time.
    #[error("{service} did not answer /healthz within {waited:?}")]
    NotReady {
        /// Which one.
        service: String,
        /// How long it was given.
        waited: std::time::Duration,
    },
    /// The processes of the shop could not be set up.
    #[error("{0}")]
    Process(String),
    /// An unknown service name.
    #[error(
        "no service named {0:?}; known: users, products, inventory, orders, payments, shipping, payment-provider, mcp"
    )]
    UnknownService(String),
}

fn service_err(service: &'static str) -> impl Fn(&dyn std::fmt::Display) -> Error {
    move |e| Error::Service {
        service,
        message: e.to_string(),
    }
}

/// The admin account `up` made or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminAccount {
    /// Login email.
    pub email: String,
    /// The password, when this start created the account or was given it.
    pub password: Option<String>,
    /// Whether this start created it.
    pub created: bool,
    /// Whether the password was generated here (and so must be shown once), rather than given.
    pub generated: bool,
}

/// The running shop.
#[derive(Debug)]
pub struct Shop {
    gateway: SocketAddr,
    operator: SocketAddr,
    addrs: BTreeMap<&'static str, SocketAddr>,
    admin: AdminAccount,
    provider: ProviderHandle,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    orders: Option<shop_orders::Orders>,
    dbs: Vec<Db>,
    service_key: ServiceKey,
}

impl Shop {
    /// `http://ip:port` of the gateway.
    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.gateway)
    }

    /// `http://ip:port` of the gateway's operator listener (`/metrics`, `/healthz`, `/readyz`).
    pub fn operator_url(&self) -> String {
        format!("http://{}", self.operator)
    }

    /// Each service's address (REST and gRPC share it).
    pub fn addrs(&self) -> &BTreeMap<&'static str, SocketAddr> {
        &self.addrs
    }

    /// The admin account.
    pub fn admin(&self) -> &AdminAccount {
        &self.admin
    }

    /// The payment provider simulator's fault switches.
    pub fn provider(&self) -> &ProviderHandle {
        &self.provider
    }

    /// The key this shop's gateway and services sign identity tokens with (made afresh by
    /// every [`up`]; it never leaves the process unless asked for here, e.g. by a test that
    /// calls a service directly).
    pub fn service_key(&self) -> &ServiceKey {
        &self.service_key
    }

    /// Stops accepting, lets in-flight requests finish, stops background work and closes
    /// the databases.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if let Some(orders) = self.orders.take() {
            orders.shutdown().await;
        }
        for db in &self.dbs {
            db.close().await;
        }
    }
}

async fn bind(ip: IpAddr, port: u16) -> Result<TcpListener, Error> {
    let addr = SocketAddr::new(ip, port);
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

fn port_of(service: &str) -> u16 {
    shop_contracts::ports::SERVICES
        .iter()
        .find(|(name, _)| *name == service)
        .map_or(0, |(_, port)| *port)
}

/// `router` with its requests counted and timed under `service="<service>"` (the RED metrics
/// of docs/metrics.md). In `trellis up` every service shares the process's recorder, so the
/// label is what tells their series apart.
fn measured(service: &'static str, router: axum::Router) -> axum::Router {
    router.layer(trellis_telemetry::http::RequestMetricsLayer::new(service))
}

fn spawn_serve(
    tasks: &mut Vec<JoinHandle<()>>,
    service: &'static str,
    listener: TcpListener,
    router: axum::Router,
    db: Option<Db>,
    metrics: Option<PrometheusHandle>,
    stop: &watch::Receiver<bool>,
) {
    let mut stop = stop.clone();
    let router = measured(service, router);
    // In the service's scope, so its server spans are exported under its own name although
    // every service shares this process (see trellis_telemetry::service).
    tasks.push(tokio::spawn(
        async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(error) =
                trellis_service::serve(listener, router, db, metrics, shutdown).await
            {
                tracing::error!(%error, service, "service stopped");
            }
        }
        .in_service(service),
    ));
}

/// The admin console of a shop whose services are at `addrs`: it calls the admin API through
/// the gateway at `gateway`, checks every service's `/readyz` (the gateway's on its operator
/// listener), reads `/metrics` from the operator listener when metrics are on (every service
/// shares the process's recorder), and keeps its audit log in `console.db` beside the others.
fn console_config(
    config: &ShopConfig,
    addrs: &BTreeMap<&'static str, SocketAddr>,
    gateway: SocketAddr,
    operator: SocketAddr,
    service_key: &ServiceKey,
    metrics: bool,
) -> shop_console::ConsoleConfig {
    let mut operator = operator;
    if operator.ip().is_unspecified() {
        operator.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let mut health_targets = vec![shop_console::Target {
        name: "gateway".to_owned(),
        url: format!("http://{operator}"),
    }];
    for (name, addr) in addrs {
        let mut addr = *addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        health_targets.push(shop_console::Target {
            name: (*name).to_owned(),
            url: format!("http://{addr}"),
        });
    }
    shop_console::ConsoleConfig {
        gateway_url: format!("http://{gateway}"),
        database_url: config.database_url("console"),
        service_key: service_key.clone(),
        health_targets,
        metrics_urls: if metrics {
            vec![format!("http://{operator}/metrics")]
        } else {
            Vec::new()
        },
        secure_cookie: false,
    }
}

/// Starts the whole shop in this process.
///
/// # Errors
/// [`Error`] naming the part that could not start; whatever started is stopped.
pub async fn up(config: ShopConfig) -> Result<Shop, Error> {
    let metrics = if config.metrics {
        trellis_telemetry::metrics::install_prometheus().ok()
    } else {
        None
    };
    let mut listeners = BTreeMap::new();
    let mut addrs = BTreeMap::new();
    for service in SERVICES {
        let port = if config.fixed_service_ports {
            port_of(service)
        } else {
            0
        };
        let listener = bind(config.bind, port).await?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: SocketAddr::new(config.bind, port),
            source,
        })?;
        addrs.insert(service, addr);
        listeners.insert(service, listener);
    }
    let addr = |name: &str| addrs[name].to_string();
    // One process: a key per start, never written anywhere (tokens live a minute).
    let service_key = ServiceKey::generate()?;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut dbs = Vec::new();
    let mut take = |name: &str| listeners.remove(name).expect("bound above");

    // payment provider
    let ledger = shop_payment_provider::Ledger::open(
        &config.database_url("payment-provider"),
        shop_payment_provider::CHARGES_KEPT_MAX,
    )
    .await
    .map_err(|e| service_err("payment-provider")(&e))?;
    let (router, provider) =
        shop_payment_provider::app(config.provider.clone(), ledger, &service_key);
    spawn_serve(
        &mut tasks,
        "payment-provider",
        take("payment-provider"),
        router,
        None,
        metrics.clone(),
        &stopped,
    );

    // users
    let users_db_url = config.database_url("users");
    let (router, users_db) = shop_users::app(shop_users::Config {
        database_url: users_db_url,
        service_key: service_key.clone(),
    })
    .in_service("users")
    .await
    .map_err(|e| service_err("users")(&e))?;
    let admin = seed::ensure_admin(&users_db, config.admin.clone()).await?;
    dbs.push(users_db.clone());
    spawn_serve(
        &mut tasks,
        "users",
        take("users"),
        router,
        Some(users_db),
        metrics.clone(),
        &stopped,
    );

    // The participants of a choreographed saga share one bus connection.
    let choreography_bus = match config.saga {
        SagaStyle::Orchestrated => None,
        SagaStyle::Choreography => {
            let url = config.bus_url();
            Some(
                trellis_service::choreography::AnyBus::connect(&url, &config.bus_prefix)
                    .await
                    .map_err(|e| Error::Bus {
                        url: url.clone(),
                        message: e.to_string(),
                    })?,
            )
        }
    };

    // inventory
    let inventory_config = shop_inventory::Config {
        database_url: config.database_url("inventory"),
        service_key: service_key.clone(),
    };
    let (router, db) = match &choreography_bus {
        None => shop_inventory::app(inventory_config).await,
        Some(bus) => {
            shop_inventory::app_choreographed(inventory_config, bus.clone(), stopped.clone())
                .in_service("inventory")
                .await
                .map(|(router, db, more)| {
                    tasks.extend(more);
                    (router, db)
                })
        }
    }
    .map_err(|e| service_err("inventory")(&e))?;
    dbs.push(db.clone());
    spawn_serve(
        &mut tasks,
        "inventory",
        take("inventory"),
        router,
        Some(db),
        metrics.clone(),
        &stopped,
    );

    // products
    let (router, db) = shop_products::app(shop_products::Config {
        database_url: config.database_url("products"),
        inventory_addr: addr("inventory"),
        service_key: service_key.clone(),
    })
    .await
    .map_err(|e| service_err("products")(&e))?;
    dbs.push(db.clone());
    spawn_serve(
        &mut tasks,
        "products",
        take("products"),
        router,
        Some(db),
        metrics.clone(),
        &stopped,
    );

    // payments
    let payments_config = shop_payments::Config::new(
        config.database_url("payments"),
        format!("http://{}", addr("payment-provider")),
        service_key.clone(),
    );
    let (router, db) = match &choreography_bus {
        None => shop_payments::app(payments_config).await,
        Some(bus) => {
            shop_payments::app_choreographed(payments_config, bus.clone(), stopped.clone())
                .in_service("payments")
                .await
                .map(|(router, db, more)| {
                    tasks.extend(more);
                    (router, db)
                })
        }
    }
    .map_err(|e| service_err("payments")(&e))?;
    dbs.push(db.clone());
    spawn_serve(
        &mut tasks,
        "payments",
        take("payments"),
        router,
        Some(db),
        metrics.clone(),
        &stopped,
    );

    // shipping
    let shipping_config = shop_shipping::Config {
        database_url: config.database_url("shipping"),
        service_key: service_key.clone(),
    };
    let (router, db) = match &choreography_bus {
        None => shop_shipping::app(shipping_config).await,
        Some(bus) => {
            shop_shipping::app_choreographed(shipping_config, bus.clone(), stopped.clone())
                .in_service("shipping")
                .await
                .map(|(router, db, more)| {
                    tasks.extend(more);
                    (router, db)
                })
        }
    }
    .map_err(|e| service_err("shipping")(&e))?;
    dbs.push(db.clone());
    spawn_serve(
        &mut tasks,
        "shipping",
        take("shipping"),
        router,
        Some(db),
        metrics.clone(),
        &stopped,
    );

    // orders
    let mut orders_config = shop_orders::Config::new(
        config.database_url("orders"),
        [
            &addr("users"),
            &addr("products"),
            &addr("inventory"),
            &addr("payments"),
            &addr("shipping"),
        ],
        service_key.clone(),
    );
    orders_config.bus_url = Some(config.bus_url());
    orders_config.bus_prefix = config.bus_prefix.clone();
    orders_config.saga = config.saga;
    // In the orders scope: the saga runner, projection and relay it starts keep the name.
    let orders = shop_orders::start(orders_config)
        .in_service("orders")
        .await
        .map_err(|e| service_err("orders")(&e))?;
    spawn_serve(
        &mut tasks,
        "orders",
        take("orders"),
        orders.router(),
        Some(orders.db()),
        metrics.clone(),
        &stopped,
    );

    // gateway
    let gateway_listener = bind(config.bind, config.gateway_port).await?;
    let gateway_addr = gateway_listener
        .local_addr()
        .map_err(|source| Error::Bind {
            addr: SocketAddr::new(config.bind, config.gateway_port),
            source,
        })?;
    let operator_addr = SocketAddr::new(config.bind, config.operator_port);

    // mcp: its tools call the shop back through the gateway, with the caller's token.
    let mut gateway_for_tools = gateway_addr;
    if gateway_for_tools.ip().is_unspecified() {
        gateway_for_tools.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let router =
        mcp::router(&format!("http://{gateway_for_tools}"), &service_key).map_err(|message| {
            Error::Service {
                service: "mcp",
                message,
            }
        })?;
    spawn_serve(
        &mut tasks,
        "mcp",
        take("mcp"),
        router,
        None,
        metrics.clone(),
        &stopped,
    );

    // The admin console, behind the gateway's `/admin`: its port is for the gateway alone.
    let console_listener = bind(config.bind, 0).await?;
    let console_addr = console_listener
        .local_addr()
        .map_err(|source| Error::Bind {
            addr: SocketAddr::new(config.bind, 0),
            source,
        })?;
    let mut routed = addrs.clone();
    routed.insert("console", console_addr);

    let toml = config_toml(gateway_addr, operator_addr, &routed);
    let gateway_config =
        trellis_gateway::Config::from_toml(&toml).map_err(|e| Error::Gateway(e.to_string()))?;
    let mut gateway = trellis_gateway::Gateway::from_config(gateway_config)
        .await
        .map_err(|e| Error::Gateway(e.to_string()))?
        .with_hooks(std::sync::Arc::new(ShopHooks::new(&service_key)));
    if let Some(handle) = metrics.clone() {
        gateway = gateway.with_metrics(handle);
    }
    let operator_listener = gateway
        .bind_admin()
        .await
        .map_err(|e| Error::Gateway(format!("the operator listener {operator_addr}: {e}")))?
        .ok_or_else(|| Error::Gateway("no operator listener configured".to_owned()))?;
    let operator_addr = operator_listener
        .local_addr()
        .map_err(|source| Error::Bind {
            addr: operator_addr,
            source,
        })?;
    let (router, db) = shop_console::app(console_config(
        &config,
        &addrs,
        gateway_for_tools,
        operator_addr,
        &service_key,
        metrics.is_some(),
    ))
    .await
    .map_err(|e| service_err("console")(&e))?;
    dbs.push(db.clone());
    spawn_serve(
        &mut tasks,
        "console",
        console_listener,
        router,
        Some(db),
        metrics.clone(),
        &stopped,
    );

    let operator = gateway.clone();
    let mut operator_stop = stopped.clone();
    tasks.push(tokio::spawn(async move {
        let shutdown = async move {
            let _ = operator_stop.wait_for(|s| *s).await;
        };
        if let Err(error) = operator.serve_admin(operator_listener, shutdown).await {
            tracing::error!(%error, "gateway operator listener stopped");
        }
    }));
    let mut gateway_stop = stopped.clone();
    tasks.push(tokio::spawn(
        async move {
            let shutdown = async move {
                let _ = gateway_stop.wait_for(|s| *s).await;
            };
            if let Err(error) = gateway.serve(gateway_listener, shutdown).await {
                tracing::error!(%error, "gateway stopped");
            }
        }
        .in_service("gateway"),
    ));

    let shop = Shop {
        gateway: gateway_addr,
        operator: operator_addr,
        addrs,
        admin,
        provider,
        stop,
        tasks,
        orders: Some(orders),
        dbs,
        service_key,
    };
    if config.seed_catalog {
        let products = format!("http://{}", shop.addrs["products"]);
        seed_catalog_at(&products, &shop.service_key, 1).await?;
    }
    Ok(shop)
}
