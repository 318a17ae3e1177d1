//! One service per process (`trellis serve NAME`): what [`serve_one`] runs and how.

#[allow(clippy::wildcard_imports)]
use super::*;

/// What [`serve_one`] runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The service's name (`orders`, `payment-provider`, …).
    pub name: String,
    /// Where it listens.
    pub listen: SocketAddr,
    /// Its database (for the payment provider simulator its ledger, which must be SQLite).
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
    /// For `orders` on a PostgreSQL saga log: this replica's stable lease owner name (see
    /// `shop_orders::Config::saga_owner`).
    pub saga_owner: Option<String>,
}

/// The `--peer` name of the gateway's operator listener (its `/healthz`, `/readyz` and
/// `/metrics`), which `trellis serve console` reads.
pub const GATEWAY_OPERATOR_PEER: &str = "gateway-operator";

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
        saga_owner,
    } = config;
    let name = name.as_str();
    let bus_prefix = bus_prefix.as_str();
    let participant = matches!(name, "orders" | "inventory" | "payments" | "shipping");
    if saga == SagaStyle::Choreography && participant && bus_url.is_none() {
        return Err(Error::NoBus(name.to_owned()));
    }
    let metrics = trellis_telemetry::metrics::install_prometheus().ok();
    // The service label of the request metrics; an unknown name is refused below.
    let label = SERVICES
        .iter()
        .copied()
        .chain([CONSOLE])
        .find(|service| *service == name)
        .unwrap_or("unknown");
    let measured = |router: axum::Router| measured(label, router);
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
            let ledger = shop_payment_provider::Ledger::open(
                &database_url,
                shop_payment_provider::CHARGES_KEPT_MAX,
            )
            .await
            .map_err(|e| Error::Service {
                service: "payment-provider",
                message: e.to_string(),
            })?;
            let (router, _handle) = shop_payment_provider::app(provider, ledger, &service_key);
            trellis_service::serve(listener, measured(router), None, metrics, shutdown)
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
            trellis_service::serve(listener, measured(router), Some(db), metrics, shutdown)
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
            let result =
                trellis_service::serve(listener, measured(router), Some(db), metrics, shutdown)
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
            trellis_service::serve(listener, measured(router), Some(db), metrics, shutdown)
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
            trellis_service::serve(listener, measured(router), Some(db), metrics, shutdown)
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
            trellis_service::serve(listener, measured(router), Some(db), metrics, shutdown)
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
            trellis_service::serve(listener, measured(router), Some(db), metrics, shutdown)
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
            config.saga_owner = saga_owner;
            let orders = shop_orders::start(config)
                .await
                .map_err(|e| service_err("orders")(&e))?;
            let result = trellis_service::serve(
                listener,
                measured(orders.router()),
                Some(orders.db()),
                metrics,
                shutdown,
            )
            .await
            .map_err(serve_err);
            orders.shutdown().await;
            result
        }
        "mcp" => {
            // The tools call the shop's public API through the gateway (`--peer gateway=…`).
            let gateway = peers
                .get("gateway")
                .cloned()
                .unwrap_or_else(|| format!("127.0.0.1:{}", shop_contracts::ports::GATEWAY));
            let router =
                mcp::router(&format!("http://{gateway}"), &service_key).map_err(|message| {
                    Error::Service {
                        service: "mcp",
                        message,
                    }
                })?;
            trellis_service::serve(listener, measured(router), None, metrics, shutdown)
                .await
                .map_err(serve_err)
        }
        "console" => {
            let config = console_config_for_serve(&peer, &peers, database_url, service_key);
            let (router, db) = shop_console::app(config)
                .await
                .map_err(|e| service_err("console")(&e))?;
            trellis_service::serve(listener, measured(router), Some(db), metrics, shutdown)
                .await
                .map_err(serve_err)
        }
        other => Err(Error::UnknownService(other.to_owned())),
    }
}

/// The console of a shop whose processes are at `peers` (`trellis serve console`): it calls
/// the admin API through the gateway (`--peer gateway=…`), and reads the health and
/// `/metrics` of the gateway's operator listener (`--peer gateway-operator=…`, DESIGN.md's
/// 8089 by default) and of every service, each process having its own recorder.
fn console_config_for_serve(
    peer: &dyn Fn(&str) -> String,
    peers: &BTreeMap<String, String>,
    database_url: String,
    service_key: ServiceKey,
) -> shop_console::ConsoleConfig {
    let gateway = peers
        .get("gateway")
        .cloned()
        .unwrap_or_else(|| format!("127.0.0.1:{}", shop_contracts::ports::GATEWAY));
    let operator = peers
        .get(GATEWAY_OPERATOR_PEER)
        .cloned()
        .unwrap_or_else(|| format!("127.0.0.1:{}", shop_contracts::ports::GATEWAY_OPERATOR));
    let mut health_targets = vec![shop_console::Target {
        name: "gateway".to_owned(),
        url: format!("http://{operator}"),
    }];
    let mut metrics_urls = vec![format!("http://{operator}/metrics")];
    for service in SERVICES {
        // Replicas (`--peer orders=A --peer orders=B`) are watched one by one: orders,
        // orders-2, ...
        let addrs = peer(service);
        let replicas = addrs.split(',').map(str::trim).filter(|a| !a.is_empty());
        for (i, addr) in replicas.enumerate() {
            let url = format!("http://{addr}");
            metrics_urls.push(format!("{url}/metrics"));
            let name = if i == 0 {
                service.to_owned()
            } else {
                format!("{service}-{}", i + 1)
            };
            health_targets.push(shop_console::Target { name, url });
        }
    }
    shop_console::ConsoleConfig {
        gateway_url: format!("http://{gateway}"),
        database_url,
        service_key,
        health_targets,
        metrics_urls,
        secure_cookie: false,
    }
}
