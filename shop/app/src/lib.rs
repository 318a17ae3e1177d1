//! Runs the reference shop.
//!
//! [`up`] starts the gateway and every service in one process, each on its own loopback
//! listener with its own database, talking over real HTTP and gRPC: what `trellis up` runs and
//! what the end-to-end tests start on port 0. [`serve_one`] runs a single service, for one
//! process per service (`trellis serve NAME --db postgres://…`).
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

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_service::Db;
use trellis_service::auth::{IDENTITY_HEADER, ServiceKey};
use trellis_telemetry::metrics::PrometheusHandle;

pub use gateway::{RATE_PER_CLIENT, ShopHooks, config_toml};
pub use shop_contracts::events::SagaStyle;
pub use shop_payment_provider::{ProviderConfig, ProviderHandle};

/// The services, in start order.
pub const SERVICES: [&str; 7] = [
    "payment-provider",
    "users",
    "inventory",
    "products",
    "payments",
    "shipping",
    "orders",
];

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
    /// An unknown service name.
    #[error(
        "no service named {0:?}; known: users, products, inventory, orders, payments, shipping, payment-provider"
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
    tasks.push(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(error) = trellis_service::serve(listener, router, db, metrics, shutdown).await {
            tracing::error!(%error, service, "service stopped");
        }
    }));
}

/// The whole public API: the services' OpenAPI documents merged.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = shop_users::openapi();
    for part in [
        shop_products::openapi(),
        shop_inventory::openapi(),
        shop_orders::openapi(),
        shop_payments::openapi(),
        shop_shipping::openapi(),
    ] {
        doc.merge(part);
    }
    doc.info.title = "trellis shop".to_owned();
    doc.info.description = Some(
        "The reference shop's public API, served by the trellis gateway. Errors are \
         {\"error\":{\"code\",\"message\"}} with a 4xx/5xx status. Operations marked \
         with the `bearer` scheme need `Authorization: Bearer TOKEN`, a token from \
         `POST /api/auth/token`."
            .to_owned(),
    );
    gateway_answers(&mut doc);
    doc
}

/// The name of the bearer-token security scheme in [`openapi`].
pub const BEARER_SCHEME: &str = "bearer";

/// Adds what the gateway in front of every service answers to each operation of `doc`,
/// reading the gateway's own routes ([`config_toml`]): the bearer token and 401 where the route
/// authenticates, 403 where it needs a role, 429 where it is rate limited, 413 for a body over
/// the gateway's limit, 400 `invalid_path` for a path parameter it cannot normalise, and
/// 500/502/503/504 everywhere (the gateway's own fault, an upstream that is down, has no
/// healthy endpoint, or does not answer in time).
fn gateway_answers(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::SecurityScheme;
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement};

    let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1);
    let addrs = SERVICES.iter().map(|name| (*name, loopback)).collect();
    let config = trellis_gateway::Config::from_toml(&config_toml(loopback, loopback, &addrs))
        .expect("the shop's gateway configuration is valid");
    let body_limit = config.server.body_bytes_max / 1024;
    let routes = config.routes;

    for (path, item) in &mut doc.paths.paths {
        for (method, operation) in [
            ("GET", &mut item.get),
            ("PUT", &mut item.put),
            ("POST", &mut item.post),
            ("DELETE", &mut item.delete),
            ("PATCH", &mut item.patch),
        ] {
            let Some(operation) = operation.as_mut() else {
                continue;
            };
            let route = routes
                .iter()
                .find(|route| route_serves(route, method, path));
            let answers = &mut operation.responses.responses;
            if let Some(route) = route {
                if !route.auth.is_empty() {
                    operation.security = Some(vec![SecurityRequirement::new(
                        BEARER_SCHEME,
                        Vec::<String>::new(),
                    )]);
                    add_answer(
                        answers,
                        401,
                        "the gateway: no bearer token, or one that does not verify \
                         (`unauthenticated`, with `WWW-Authenticate`)",
                        None,
                    );
                }
                if !route.required_roles.is_empty() {
                    add_answer(
                        answers,
                        403,
                        &format!(
                            "the gateway: the token lacks the role {} (`forbidden`)",
                            route.required_roles.join(" or ")
                        ),
                        None,
                    );
                }
                if route.rate_limit.is_some() {
                    add_answer(
                        answers,
                        429,
                        "the gateway: over this caller's rate limit (`rate_limited`); \
                         `Retry-After` says when to try again",
                        Some("Retry-After"),
                    );
                }
            }
            if operation.request_body.is_some() {
                add_answer(
                    answers,
                    413,
                    &format!("the gateway: a body over {body_limit} KiB (`body_too_large`)"),
                    None,
                );
            }
            if path.contains('{') {
                add_answer(
                    answers,
                    400,
                    "the gateway: a path it cannot normalise safely, such as an encoded slash \
                     or control character (`invalid_path`)",
                    None,
                );
            }
            add_answer(
                answers,
                500,
                "the gateway: internal error (`internal`)",
                None,
            );
            add_answer(
                answers,
                502,
                "the gateway: the service is unreachable or broke the exchange \
                 (`upstream_unreachable`, `upstream_failed`)",
                None,
            );
            add_answer(
                answers,
                503,
                "the gateway: no healthy endpoint of the service (`no_healthy_upstream`; \
                 `Retry-After` when a breaker will admit a trial call)",
                Some("Retry-After"),
            );
            add_answer(
                answers,
                504,
                "the gateway: the service did not answer in time (`upstream_timeout`)",
                None,
            );
        }
    }
    let scheme = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .bearer_format("JWT")
        .description(Some(
            "An access token from POST /api/auth/token, as `Authorization: Bearer TOKEN`",
        ))
        .build();
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(BEARER_SCHEME, SecurityScheme::Http(scheme));
}

/// Whether the gateway sends `method path` (an OpenAPI path template) to `route`; the first
/// route that does is the one that serves it, as in the gateway.
fn route_serves(route: &trellis_gateway::config::RouteConfig, method: &str, path: &str) -> bool {
    let method_ok = route.methods.is_empty() || route.methods.iter().any(|m| m == method);
    let path_ok = match (&route.path_exact, &route.path_prefix) {
        (Some(exact), _) => exact == path,
        (None, Some(prefix)) => {
            path.starts_with(prefix.as_str())
                && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
        }
        (None, None) => false,
    };
    method_ok && path_ok
}

/// Documents `status` with `description`, the error body and `header` (seconds to wait), or,
/// when the service documents the status already, adds `description` (and `header`) to the
/// service's.
fn add_answer(
    answers: &mut BTreeMap<String, utoipa::openapi::RefOr<utoipa::openapi::response::Response>>,
    status: u16,
    description: &str,
    header: Option<&str>,
) {
    use utoipa::openapi::header::HeaderBuilder;
    use utoipa::openapi::response::ResponseBuilder;
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    use utoipa::openapi::{ContentBuilder, Ref, RefOr};

    let response = answers.entry(status.to_string()).or_insert_with(|| {
        let mut first = description.chars();
        let capitalised: String = first
            .next()
            .map(|c| c.to_uppercase().chain(first).collect())
            .unwrap_or_default();
        RefOr::T(
            ResponseBuilder::new()
                .description(capitalised)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build(),
        )
    });
    let RefOr::T(response) = response else {
        return;
    };
    if !response
        .description
        .to_lowercase()
        .contains(&description.to_lowercase())
    {
        response.description.push_str("; ");
        response.description.push_str(description);
    }
    if let Some(name) = header {
        response.headers.entry(name.to_owned()).or_insert_with(|| {
            RefOr::T(
                HeaderBuilder::new()
                    .schema(Some(
                        ObjectBuilder::new().schema_type(Type::Integer).build(),
                    ))
                    .description(Some("Seconds to wait"))
                    .build(),
            )
        });
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
    let (router, provider) = shop_payment_provider::app(config.provider.clone(), &service_key);
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
    .await
    .map_err(|e| service_err("users")(&e))?;
    let admin = ensure_admin(&users_db, config.admin.clone()).await?;
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
    let orders = shop_orders::start(orders_config)
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
    let toml = config_toml(gateway_addr, operator_addr, &addrs);
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
    tasks.push(tokio::spawn(async move {
        let shutdown = async move {
            let _ = gateway_stop.wait_for(|s| *s).await;
        };
        if let Err(error) = gateway.serve(gateway_listener, shutdown).await {
            tracing::error!(%error, "gateway stopped");
        }
    }));

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

async fn ensure_admin(db: &Db, given: Option<(String, String)>) -> Result<AdminAccount, Error> {
    let (email, password, generated) = match given {
        Some((email, password)) => (email, password, false),
        None => (
            "admin@trellis.local".to_owned(),
            generated_password()?,
            true,
        ),
    };
    let created = shop_users::ensure_admin(db, &email, &password, "Admin")
        .await
        .map_err(|e| service_err("users")(&e))?;
    Ok(AdminAccount {
        password: (created || !generated).then_some(password),
        email,
        created,
        generated,
    })
}

/// 16 random bytes from the OS, hex-encoded.
fn generated_password() -> Result<String, Error> {
    let mut bytes = [0_u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| Error::Service {
        service: "users",
        message: format!("no randomness for the admin password: {e}"),
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The catalog a first start creates.
pub const CATALOG: &[(&str, i64, i64)] = &[
    ("Trellis mug", 1_200, 500),
    ("Circuit breaker t-shirt", 2_500, 300),
    ("Saga sticker pack", 400, 1_000),
    ("Event-sourced notebook", 1_800, 200),
    ("Idempotent hoodie", 5_500, 100),
];

/// What [`seed_catalog_at`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seeded {
    /// The catalog was empty; the seed [`CATALOG`] was created.
    Created,
    /// The catalog had products already; nothing was created.
    AlreadyStocked,
}

/// Pause between two tries of a seeding call that found the products service (or the
/// inventory behind it) not answering yet.
const SEED_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Creates the seed [`CATALOG`] through the products service at `products_url`
/// (`http://host:port`), as an administrator signed with `service_key`, when its catalog is
/// empty. Never twice: a catalog with any product is left alone, and each seed product is
/// created under its own idempotency key, so a repeat after a partial run answers the first
/// result. Each call is tried up to `tries` times, a second apart, while the service (or the
/// inventory it sets stock through) does not answer: `trellis serve products --seed-catalog`
/// may start before them.
///
/// # Errors
/// [`Error::Service`] naming the call that kept failing or was refused.
pub async fn seed_catalog_at(
    products_url: &str,
    service_key: &ServiceKey,
    tries: u32,
) -> Result<Seeded, Error> {
    let err = |e: &dyn std::fmt::Display| Error::Service {
        service: "products",
        message: format!("seeding the catalog: {e}"),
    };
    let admin_token = service_key
        .signer("seed-catalog")
        .token("seed-catalog", trellis_service::ROLE_ADMIN)
        .map_err(|e| err(&e))?;
    let client = reqwest_client().map_err(|e| err(&e))?;
    let tries = tries.max(1);
    // One call, tried again on a connection error or a 5xx.
    let call = |request: reqwest::RequestBuilder| async move {
        let mut last = String::new();
        for attempt in 1..=tries {
            let request = request
                .try_clone()
                .expect("the seeding requests have plain bodies");
            match request.send().await {
                Ok(response) if response.status().is_server_error() => {
                    last = format!("{}", response.status());
                }
                Ok(response) => return Ok(response),
                Err(e) => last = e.to_string(),
            }
            if attempt < tries {
                tokio::time::sleep(SEED_RETRY_PAUSE).await;
            }
        }
        Err(last)
    };
    let page: serde_json::Value = call(client.get(format!("{products_url}/api/products?limit=1")))
        .await
        .map_err(|e| err(&e))?
        .json()
        .await
        .map_err(|e| err(&e))?;
    if page["items"]
        .as_array()
        .is_some_and(|items| !items.is_empty())
    {
        return Ok(Seeded::AlreadyStocked);
    }
    for (i, (name, price_cents, stock)) in CATALOG.iter().enumerate() {
        let request = client
            .post(format!("{products_url}/api/products"))
            .header(IDENTITY_HEADER, admin_token.clone())
            .header("idempotency-key", format!("seed-catalog-{i}"))
            .json(&serde_json::json!({"name": name, "price_cents": price_cents, "stock": stock}));
        let response = call(request).await.map_err(|e| err(&e))?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            return Err(err(&format!("{status}: {body}")));
        }
    }
    Ok(Seeded::Created)
}

fn reqwest_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
}

/// What [`serve_one`] runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The service's name (`orders`, `payment-provider`, …).
    pub name: String,
    /// Where it listens.
    pub listen: SocketAddr,
    /// Its database.
    pub database_url: String,
    /// The service names it calls, mapped to their addresses (DESIGN.md's ports on loopback
    /// when absent).
    pub peers: BTreeMap<String, String>,
    /// The bus: orders relays its events to it; the participants of a choreographed saga
    /// need it.
    pub bus_url: Option<String>,
    /// Prefix of NATS streams and subjects.
    pub bus_prefix: String,
    /// How the order saga runs; the same for every service of one shop.
    pub saga: SagaStyle,
    /// The payment provider simulator's faults (for `payment-provider`).
    pub provider: ProviderConfig,
    /// The key the gateway and every service of this shop share (see
    /// [`trellis_service::auth`]): `ServiceKey::from_env_or_file` in `trellis serve`.
    pub service_key: ServiceKey,
    /// For `users`: the administrator account (email, password) to create when no account has
    /// that email, as `trellis up` does (`TRELLIS_ADMIN_EMAIL` / `TRELLIS_ADMIN_PASSWORD`).
    pub admin: Option<(String, String)>,
    /// For `products`: create the seed [`CATALOG`] when the catalog is empty, once the service
    /// and the inventory answer (see [`seed_catalog_at`]).
    pub seed_catalog: bool,
}

/// How long `serve products --seed-catalog` keeps trying while the inventory is not up yet:
/// one try a second.
pub const SEED_TRIES_SERVE: u32 = 120;

/// Runs one service until `shutdown` completes: what `trellis serve NAME` does. With
/// [`SagaStyle::Choreography`], orders, inventory, payments and shipping take part in the
/// choreographed saga on the bus, which they then need.
///
/// # Errors
/// [`Error`] naming what could not start.
pub async fn serve_one(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let ServeConfig {
        name,
        listen,
        database_url,
        peers,
        bus_url,
        bus_prefix,
        saga,
        provider,
        service_key,
        admin,
        seed_catalog,
    } = config;
    let name = name.as_str();
    let bus_prefix = bus_prefix.as_str();
    let participant = matches!(name, "orders" | "inventory" | "payments" | "shipping");
    if saga == SagaStyle::Choreography && participant && bus_url.is_none() {
        return Err(Error::NoBus(name.to_owned()));
    }
    let metrics = trellis_telemetry::metrics::install_prometheus().ok();
    let peer = |service: &str| {
        peers
            .get(service)
            .cloned()
            .unwrap_or_else(|| format!("127.0.0.1:{}", port_of(service)))
    };
    let listener = bind(listen.ip(), listen.port()).await?;
    let serve_err = |e: trellis_service::ServeError| Error::Service {
        service: "serve",
        message: e.to_string(),
    };
    match name {
        "payment-provider" => {
            let (router, _handle) = shop_payment_provider::app(provider, &service_key);
            trellis_service::serve(listener, router, None, metrics, shutdown)
                .await
                .map_err(serve_err)
        }
        "users" => {
            let (router, db) = shop_users::app(shop_users::Config {
                database_url,
                service_key,
            })
            .await
            .map_err(|e| service_err("users")(&e))?;
            if let Some((email, password)) = admin {
                let created = shop_users::ensure_admin(&db, &email, &password, "Admin")
                    .await
                    .map_err(|e| service_err("users")(&e))?;
                if created {
                    tracing::info!(%email, "admin account created");
                } else {
                    tracing::info!(%email, "admin account exists; left as it is");
                }
            }
            trellis_service::serve(listener, router, Some(db), metrics, shutdown)
                .await
                .map_err(serve_err)
        }
        "inventory" | "payments" | "shipping" if saga == SagaStyle::Choreography => {
            let Some(url) = bus_url else {
                return Err(Error::NoBus(name.to_owned()));
            };
            let bus = trellis_service::choreography::AnyBus::connect(&url, bus_prefix)
                .await
                .map_err(|e| Error::Bus {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            let (stop, stopped) = watch::channel(false);
            let (router, db, tasks) = match name {
                "inventory" => shop_inventory::app_choreographed(
                    shop_inventory::Config {
                        database_url,
                        service_key,
                    },
                    bus,
                    stopped,
                )
                .await
                .map_err(|e| service_err("inventory")(&e))?,
                "payments" => shop_payments::app_choreographed(
                    shop_payments::Config::new(
                        database_url,
                        format!("http://{}", peer("payment-provider")),
                        service_key,
                    ),
                    bus,
                    stopped,
                )
                .await
                .map_err(|e| service_err("payments")(&e))?,
                _ => shop_shipping::app_choreographed(
                    shop_shipping::Config {
                        database_url,
                        service_key,
                    },
                    bus,
                    stopped,
                )
                .await
                .map_err(|e| service_err("shipping")(&e))?,
            };
            let result = trellis_service::serve(listener, router, Some(db), metrics, shutdown)
                .await
                .map_err(serve_err);
            let _ = stop.send(true);
            for task in tasks {
                let _ = task.await;
            }
            result
        }
        "inventory" => {
            let (router, db) = shop_inventory::app(shop_inventory::Config {
                database_url,
                service_key,
            })
            .await
            .map_err(|e| service_err("inventory")(&e))?;
            trellis_service::serve(listener, router, Some(db), metrics, shutdown)
                .await
                .map_err(serve_err)
        }
        "products" => {
            let service_key_for_seed = service_key.clone();
            let (router, db) = shop_products::app(shop_products::Config {
                database_url,
                inventory_addr: peer("inventory"),
                service_key,
            })
            .await
            .map_err(|e| service_err("products")(&e))?;
            if seed_catalog {
                let mut own = listener.local_addr().map_err(|source| Error::Bind {
                    addr: listen,
                    source,
                })?;
                if own.ip().is_unspecified() {
                    own.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
                }
                let key = service_key_for_seed.clone();
                tokio::spawn(async move {
                    match seed_catalog_at(&format!("http://{own}"), &key, SEED_TRIES_SERVE).await {
                        Ok(Seeded::Created) => tracing::info!("seed catalog created"),
                        Ok(Seeded::AlreadyStocked) => {
                            tracing::info!("the catalog has products; not seeded");
                        }
                        Err(error) => tracing::error!(%error, "the seed catalog was not created"),
                    }
                });
            }
            trellis_service::serve(listener, router, Some(db), metrics, shutdown)
                .await
                .map_err(serve_err)
        }
        "payments" => {
            let (router, db) = shop_payments::app(shop_payments::Config::new(
                database_url,
                format!("http://{}", peer("payment-provider")),
                service_key,
            ))
            .await
            .map_err(|e| service_err("payments")(&e))?;
            trellis_service::serve(listener, router, Some(db), metrics, shutdown)
                .await
                .map_err(serve_err)
        }
        "shipping" => {
            let (router, db) = shop_shipping::app(shop_shipping::Config {
                database_url,
                service_key,
            })
            .await
            .map_err(|e| service_err("shipping")(&e))?;
            trellis_service::serve(listener, router, Some(db), metrics, shutdown)
                .await
                .map_err(serve_err)
        }
        "orders" => {
            let mut config = shop_orders::Config::new(
                database_url,
                [
                    &peer("users"),
                    &peer("products"),
                    &peer("inventory"),
                    &peer("payments"),
                    &peer("shipping"),
                ],
                service_key,
            );
            config.bus_url = bus_url;
            config.bus_prefix = bus_prefix.to_owned();
            config.saga = saga;
            let orders = shop_orders::start(config)
                .await
                .map_err(|e| service_err("orders")(&e))?;
            let result = trellis_service::serve(
                listener,
                orders.router(),
                Some(orders.db()),
                metrics,
                shutdown,
            )
            .await
            .map_err(serve_err);
            orders.shutdown().await;
            result
        }
        other => Err(Error::UnknownService(other.to_owned())),
    }
}
