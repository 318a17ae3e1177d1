//! `trellis up` and `trellis serve`: the reference shop in one process, or one service per
//! process.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use shop_app::{ProviderConfig, ShopConfig};

/// Which saga style drives orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SagaStyle {
    /// The orders service orchestrates reserve → charge → ship with compensation.
    Orchestrated,
    /// Inventory, payments, shipping and orders react to each other's events on the bus;
    /// nothing drives the flow.
    Choreography,
}

impl From<SagaStyle> for shop_app::SagaStyle {
    fn from(style: SagaStyle) -> Self {
        match style {
            SagaStyle::Orchestrated => Self::Orchestrated,
            SagaStyle::Choreography => Self::Choreography,
        }
    }
}

/// Fault settings of the payment provider simulator.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ProviderArgs {
    /// Latency the payment provider simulator adds to every call, in milliseconds.
    #[arg(long, default_value_t = 0)]
    provider_latency_ms: u64,
    /// Share of provider calls that fail with 503 (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    provider_failure_rate: f64,
    /// Share of charges the provider declines (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    provider_decline_rate: f64,
    /// Start with the provider down (every call 503).
    #[arg(long)]
    provider_outage: bool,
}

impl ProviderArgs {
    fn config(&self) -> anyhow::Result<ProviderConfig> {
        for (name, value) in [
            ("--provider-failure-rate", self.provider_failure_rate),
            ("--provider-decline-rate", self.provider_decline_rate),
        ] {
            if !(0.0..=1.0).contains(&value) {
                bail!("{name} must be between 0 and 1, not {value}");
            }
        }
        Ok(ProviderConfig {
            latency_ms: self.provider_latency_ms,
            failure_rate: self.provider_failure_rate,
            decline_rate: self.provider_decline_rate,
            outage: self.provider_outage,
            ..ProviderConfig::default()
        })
    }
}

/// Settings of `trellis up`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// The gateway's port.
    #[arg(long, env = "TRELLIS_GATEWAY_PORT", default_value_t = shop_contracts::ports::GATEWAY)]
    port: u16,
    /// The gateway's operator port (/metrics, /healthz, /readyz), on loopback.
    #[arg(long, env = "TRELLIS_OPERATOR_PORT", default_value_t = shop_contracts::ports::GATEWAY_OPERATOR)]
    operator_port: u16,
    /// Where the embedded databases live.
    #[arg(long, env = "TRELLIS_DATA_DIR", default_value = "trellis-data")]
    data_dir: PathBuf,
    /// How orders are driven.
    #[arg(long, value_enum, default_value_t = SagaStyle::Orchestrated)]
    saga: SagaStyle,
    /// The bus order events are relayed to, and the choreographed saga runs on (default:
    /// sqlite://DATA_DIR/bus.db).
    #[arg(long, env = "TRELLIS_BUS")]
    bus: Option<String>,
    /// Run each service, the mcp service, the payment provider simulator and the gateway as
    /// a child process (`trellis serve NAME`) of this one, supervised: one that exits or is
    /// killed is restarted with backoff, its log lines prefixed with its name; the children
    /// stop when this process stops, however it stops.
    #[arg(long)]
    processes: bool,
    /// Put every service on a free port instead of DESIGN.md's (8101…); the banner prints
    /// them. With --port 0 and --operator-port 0 nothing is fixed (tests, several shops on
    /// one machine).
    #[arg(long)]
    free_ports: bool,
    /// Put every service's data on this PostgreSQL server instead of SQLite files: one
    /// database per service, `trellis_SERVICE`, created when missing (any database of the
    /// server in the URL, e.g. postgres://postgres@127.0.0.1:5432/postgres).
    #[arg(long, env = "TRELLIS_DB_SERVER")]
    db: Option<String>,
    /// With --processes and --db: more than one process of some services, as
    /// SERVICE=N[,SERVICE=N...] (e.g. orders=2,payments=2,inventory=2). Calls to a service are
    /// spread over its replicas; a replica that dies is passed over (and restarted).
    #[arg(long, value_parser = parse_replicas)]
    replicas: Option<BTreeMap<String, usize>>,
    #[command(flatten)]
    provider: ProviderArgs,
}

/// Most processes `--replicas` starts for one service.
const REPLICAS_MAX: usize = 8;

pub(crate) fn parse_replicas(text: &str) -> Result<BTreeMap<String, usize>, String> {
    let mut replicas = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, count) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected SERVICE=N"))?;
        let count: usize = count
            .parse()
            .map_err(|_| format!("{part:?}: N must be a whole number"))?;
        if !(1..=REPLICAS_MAX).contains(&count) {
            return Err(format!("{part:?}: N must be 1 to {REPLICAS_MAX}"));
        }
        replicas.insert(name.to_owned(), count);
    }
    Ok(replicas)
}

impl UpArgs {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        // Listen for Ctrl-C before anything starts, so one sent during start-up stops the shop
        // as soon as it is up instead of being lost.
        let stop_signal = tokio::spawn(trellis_gateway::shutdown_signal());
        let mut config = ShopConfig::new(&self.data_dir);
        config.saga = self.saga.into();
        config.gateway_port = self.port;
        config.operator_port = self.operator_port;
        config.provider = self.provider.config()?;
        config.bus_url = self.bus.clone();
        config.admin = admin_from_env()?;
        config.fixed_service_ports = !self.free_ports;
        if self.replicas.is_some() && !(self.processes && self.db.is_some()) {
            bail!("--replicas needs --processes and --db postgres://… (replicas share a database)");
        }
        if let Some(server) = &self.db {
            for service in shop_app::SERVICES.into_iter().chain([shop_app::CONSOLE]) {
                if matches!(service, "payment-provider" | "mcp") {
                    continue;
                }
                let name = format!("trellis_{}", service.replace('-', "_"));
                let url = trellis_service::create_postgres_database(server, &name)
                    .await
                    .with_context(|| format!("creating the {service} database on --db"))?;
                config.database_urls.insert(service.to_owned(), url);
            }
        }
        if self.processes {
            return self.run_processes(config, stop_signal).await;
        }
        let shop = shop_app::up(config).await.with_context(|| {
            format!("starting the shop with data in {}", self.data_dir.display())
        })?;
        let services = shop
            .addrs()
            .iter()
            .map(|(name, addr)| ((*name).to_owned(), format!("http://{addr}")))
            .collect::<Vec<_>>();
        self.banner(
            &shop.gateway_url(),
            &shop.operator_url(),
            &services,
            shop.admin(),
        );
        println!("Ctrl-C stops it.");
        let _ = stop_signal.await;
        println!("stopping: draining in-flight requests");
        shop.shutdown().await;
        Ok(())
    }

    /// `trellis up --processes`: the shop as supervised child processes.
    async fn run_processes(
        &self,
        config: ShopConfig,
        stop_signal: tokio::task::JoinHandle<()>,
    ) -> anyhow::Result<()> {
        let mut config = shop_app::ProcessConfig::new(config)?;
        config.replicas = self.replicas.clone().unwrap_or_default();
        let shop = shop_app::processes::spawn(config).await.with_context(|| {
            format!(
                "starting the shop as processes with data in {}",
                self.data_dir.display()
            )
        })?;
        let reporter = tokio::spawn(report_restarts(shop.supervisor().events()));
        let pid = |name: &str| {
            shop.pid(name)
                .map_or_else(|| "down".to_owned(), |pid| format!("pid {pid}"))
        };
        let mut services = shop
            .addrs()
            .iter()
            .map(|(name, addr)| {
                (
                    (*name).to_owned(),
                    format!("http://{addr}   ({})", pid(name)),
                )
            })
            .collect::<Vec<_>>();
        services.extend(
            shop.replica_addrs()
                .iter()
                .map(|(name, addr)| (name.clone(), format!("http://{addr}   ({})", pid(name)))),
        );
        self.banner(
            &shop.gateway_url(),
            &shop.operator_url(),
            &services,
            shop.admin(),
        );
        println!(
            "  processes      one per service, supervised (gateway {}); a child that exits is \
             restarted with backoff",
            pid(shop_app::processes::GATEWAY)
        );
        println!("Ctrl-C stops it.");
        let _ = stop_signal.await;
        println!("stopping: SIGTERM to every child (they drain in-flight requests)");
        shop.shutdown().await;
        reporter.abort();
        println!("stopped");
        Ok(())
    }

    /// What `up` prints once the shop answers.
    fn banner(
        &self,
        gateway: &str,
        operator: &str,
        services: &[(String, String)],
        admin: &shop_app::AdminAccount,
    ) {
        println!(
            "trellis shop is up (data in {}, {} order saga{})",
            self.data_dir.display(),
            shop_app::SagaStyle::from(self.saga).as_str(),
            if self.processes {
                ", one process per service"
            } else {
                ""
            }
        );
        println!("  gateway        {gateway}   (public API; OpenAPI at {gateway}/openapi.json)");
        println!(
            "  mcp            {gateway}/mcp   (the shop's agent tools over MCP, with a user's \
             bearer token; `trellis mcp` on stdio)"
        );
        println!(
            "  console        {gateway}/admin   (the admin console; sign in with the admin account)"
        );
        println!(
            "  operator       {operator}   (/metrics, /healthz, /readyz; not on the public port)"
        );
        for (name, addr) in services {
            println!("  {name:<16} {addr}");
        }
        match (&admin.password, admin.created, admin.generated) {
            (Some(password), true, true) => println!(
                "  admin account created: {} / {password}  (set TRELLIS_ADMIN_EMAIL and \
                 TRELLIS_ADMIN_PASSWORD to choose it)",
                admin.email
            ),
            // A password the user chose is never echoed (it would land in logs).
            (_, true, false) => println!(
                "  admin account created: {} (the password from TRELLIS_ADMIN_PASSWORD)",
                admin.email
            ),
            (_, false, false) => println!(
                "  admin account: {} (the password from TRELLIS_ADMIN_PASSWORD when it was \
                 created)",
                admin.email
            ),
            _ => println!(
                "  admin account: {} (its password was printed when it was created)",
                admin.email
            ),
        }
        println!(
            "  try: curl -s {gateway}/api/products | head -c 300; echo\n  \
             log in: curl -s -X POST {gateway}/api/auth/token -H 'content-type: application/json' \
             -d '{{\"email\":\"{}\",\"password\":\"…\"}}'",
            admin.email
        );
    }
}

/// Prints the supervisor's exits and restarts (`[supervisor] orders exited (signal: 9) …`).
async fn report_restarts(
    mut events: tokio::sync::broadcast::Receiver<shop_app::processes::supervisor::Event>,
) {
    use shop_app::processes::supervisor::EventKind;
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        match event.kind {
            EventKind::Exited { status, uptime } => println!(
                "[supervisor] {} exited ({status}) after {:.1}s",
                event.name,
                uptime.as_secs_f64()
            ),
            EventKind::RestartScheduled { delay } => println!(
                "[supervisor] {} restarts in {} ms",
                event.name,
                delay.as_millis()
            ),
            EventKind::Started { pid, restarts } if restarts > 0 => println!(
                "[supervisor] {} restarted (pid {pid}, restart {restarts})",
                event.name
            ),
            EventKind::SpawnFailed { error } => {
                println!("[supervisor] {} could not start: {error}", event.name);
            }
            _ => {}
        }
    }
}

/// The administrator account `TRELLIS_ADMIN_EMAIL` / `TRELLIS_ADMIN_PASSWORD` name, created on
/// first start by `up` and by `serve users`.
fn admin_from_env() -> anyhow::Result<Option<(String, String)>> {
    let email = std::env::var("TRELLIS_ADMIN_EMAIL").ok();
    let password = std::env::var("TRELLIS_ADMIN_PASSWORD").ok();
    match (email, password) {
        (Some(email), Some(password)) => Ok(Some((email, password))),
        (None, None) => Ok(None),
        _ => bail!("set both TRELLIS_ADMIN_EMAIL and TRELLIS_ADMIN_PASSWORD, or neither"),
    }
}

/// Settings of `trellis serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// The service: users, products, inventory, orders, payments, shipping, payment-provider,
    /// mcp, console (the admin console: `--peer gateway=…` and `--peer gateway-operator=…`,
    /// the gateway's operator listener, besides the services), or gateway (routing to the
    /// others, `/admin` to the console).
    name: String,
    /// Listen address (default: 127.0.0.1 and the service's port from DESIGN.md).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The service's database: sqlite://PATH or postgres://… (default
    /// sqlite://DATA_DIR/NAME.db; the payment provider simulator's ledger is SQLite only).
    #[arg(long, env = "TRELLIS_DB")]
    db: Option<String>,
    /// The event bus (nats://…, sqlite://PATH or memory://): the orders service relays order
    /// events to it (order.created, order.confirmed, order.cancelled); with --saga
    /// choreography, orders, inventory, payments and shipping run the order saga on it.
    #[arg(long, env = "TRELLIS_BUS")]
    bus: Option<String>,
    /// Prefix of the NATS streams and subjects (`[a-z0-9_]`); the same for every service.
    #[arg(long, env = "TRELLIS_BUS_PREFIX", default_value = "shop")]
    bus_prefix: String,
    /// How orders are driven; every service of one shop must use the same.
    #[arg(long, value_enum, default_value_t = SagaStyle::Orchestrated)]
    saga: SagaStyle,
    /// Where another service listens, as NAME=HOST:PORT (repeatable; defaults to DESIGN.md's
    /// ports on 127.0.0.1). A NAME given more than once is a service with replicas: calls to
    /// it are spread over them (the gateway checks each one's /readyz).
    #[arg(long = "peer", value_parser = parse_peer)]
    peers: Vec<(String, String)>,
    /// For `products`: create the small seed catalog `trellis up` creates, when the catalog is
    /// empty (once the inventory answers; never twice).
    #[arg(long)]
    seed_catalog: bool,
    /// For `orders` on PostgreSQL: this replica's stable saga lease owner (its host and port,
    /// say; unique per replica), so after a restart it resumes its sagas at once instead of
    /// after their 30 s leases.
    #[arg(long, env = "TRELLIS_SAGA_OWNER")]
    saga_owner: Option<String>,
    /// For `gateway`: where its operator endpoints (/metrics, /healthz, /readyz) listen; they
    /// are not served on the public listener.
    #[arg(long, default_value = "127.0.0.1:8089")]
    operator_listen: SocketAddr,
    /// For `gateway`: serve HTTPS with this PEM certificate chain (with `--tls-key`); the
    /// files are read again on SIGHUP, so a renewed certificate needs no restart.
    #[arg(long, env = "TRELLIS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// For `gateway`: the PEM private key of `--tls-cert`.
    #[arg(long, env = "TRELLIS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Where the service key lives when TRELLIS_SERVICE_KEY is unset: DATA_DIR/service.key,
    /// created by the first process that needs it. The gateway and every service of one shop
    /// must share it (copy the file, or set the variable, on every machine).
    #[arg(long, env = "TRELLIS_DATA_DIR", default_value = "trellis-data")]
    data_dir: PathBuf,
    /// Stop (as on SIGTERM) when stdin reaches end-of-file. A supervising parent (`trellis up
    /// --processes`) holds a pipe on the child's stdin, so the service never outlives it,
    /// even when the parent is killed.
    #[arg(long, env = "TRELLIS_EXIT_WITH_PARENT")]
    exit_with_parent: bool,
    #[command(flatten)]
    provider: ProviderArgs,
}

/// SIGTERM or Ctrl-C, or with `exit_with_parent` also end-of-file on stdin.
fn serve_shutdown(
    exit_with_parent: bool,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    if !exit_with_parent {
        return Box::pin(trellis_gateway::shutdown_signal());
    }
    let parent_gone = shop_app::processes::parent_gone();
    Box::pin(async move {
        tokio::select! {
            () = trellis_gateway::shutdown_signal() => {}
            () = parent_gone => eprintln!("stdin closed (the parent is gone): stopping"),
        }
    })
}

fn parse_peer(raw: &str) -> Result<(String, String), String> {
    let (name, addr) = raw
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=HOST:PORT, got {raw:?}"))?;
    if addr.parse::<SocketAddr>().is_err() && !addr.contains(':') {
        return Err(format!("{addr:?} is not HOST:PORT"));
    }
    Ok((name.to_owned(), addr.to_owned()))
}

impl ServeArgs {
    /// The service this process serves (its spans' `service.name`).
    pub(crate) fn service_name(&self) -> &str {
        &self.name
    }

    pub(crate) async fn run(self) -> anyhow::Result<()> {
        if self.tls_cert.is_some() && self.name != "gateway" {
            bail!("--tls-cert and --tls-key are for `serve gateway`; services speak plain HTTP");
        }
        // A name given twice or more is a service with replicas: `--peer orders=A --peer
        // orders=B` dials "A,B" (gRPC clients and the gateway spread calls over both).
        let mut peers: BTreeMap<String, String> = BTreeMap::new();
        for (name, addr) in &self.peers {
            peers
                .entry(name.clone())
                .and_modify(|known| {
                    known.push(',');
                    known.push_str(addr);
                })
                .or_insert_with(|| addr.clone());
        }
        if let Some(bus) = &self.bus
            && !(bus.starts_with("nats://") || bus.starts_with("sqlite://") || bus == "memory://")
        {
            bail!("--bus {bus:?}: expected nats://…, sqlite://PATH or memory://");
        }
        let port = if self.name == "gateway" {
            shop_contracts::ports::GATEWAY
        } else {
            shop_contracts::ports::SERVICES
                .iter()
                .find(|(name, _)| *name == self.name)
                .map(|(_, port)| *port)
                .with_context(|| {
                    format!(
                        "no service named {:?}; known: users, products, inventory, orders, \
                         payments, shipping, payment-provider, mcp, console, gateway",
                        self.name
                    )
                })?
        };
        let listen = self
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], port)));
        let service_key = trellis_service::auth::ServiceKey::from_env_or_file(&self.data_dir)
            .context("the service key the gateway and the services share")?;
        if self.name == "gateway" {
            let mut addrs: BTreeMap<&'static str, Vec<SocketAddr>> = BTreeMap::new();
            for (name, default_port) in shop_contracts::ports::SERVICES {
                let mut resolved = Vec::new();
                match peers.get(*name) {
                    Some(list) => {
                        for addr in list.split(',') {
                            let found = tokio::net::lookup_host(addr)
                                .await
                                .ok()
                                .and_then(|mut a| a.next())
                                .with_context(|| {
                                    format!("--peer {name}={addr} does not resolve")
                                })?;
                            resolved.push(found);
                        }
                    }
                    None => resolved.push(SocketAddr::from(([127, 0, 0, 1], *default_port))),
                }
                addrs.insert(*name, resolved);
            }
            let mut toml =
                shop_app::config_toml_with_replicas(listen, self.operator_listen, &addrs);
            if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                // JSON string syntax is TOML basic-string syntax for any path.
                toml.push_str(&format!(
                    "\n[server.tls]\ncert_file = {}\nkey_file = {}\n",
                    serde_json::to_string(&cert.display().to_string())?,
                    serde_json::to_string(&key.display().to_string())?,
                ));
            }
            let config = trellis_gateway::Config::from_toml(&toml)
                .context("the shop's gateway configuration")?;
            let mut gateway = trellis_gateway::Gateway::from_config(config)
                .await
                .context("starting the gateway")?
                .with_hooks(std::sync::Arc::new(shop_app::ShopHooks::new(&service_key)));
            if let Ok(handle) = trellis_telemetry::metrics::install_prometheus() {
                gateway = gateway.with_metrics(handle);
            }
            let operator_listener = gateway
                .bind_admin()
                .await
                .with_context(|| format!("cannot listen on {}", self.operator_listen))?
                .context("the operator listener")?;
            let (operator_stop, operator_stopped) = tokio::sync::oneshot::channel::<()>();
            let operator = tokio::spawn(gateway.clone().serve_admin(operator_listener, async {
                let _ = operator_stopped.await;
            }));
            println!(
                "gateway operator endpoints on http://{}/metrics",
                self.operator_listen
            );
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let scheme = if self.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            println!("gateway listening on {scheme}://{listen}");
            reload_on_hangup(gateway.clone(), toml);
            let served = gateway
                .serve(listener, serve_shutdown(self.exit_with_parent))
                .await
                .context("gateway");
            let _ = operator_stop.send(());
            let _ = operator.await;
            served?;
            return Ok(());
        }
        let db = self
            .db
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}/{}.db", self.data_dir.display(), self.name));
        println!("{} listening on http://{listen} (database {db})", self.name);
        shop_app::serve_one(
            shop_app::ServeConfig {
                name: self.name.clone(),
                listen,
                database_url: db,
                peers,
                bus_url: self.bus.clone(),
                bus_prefix: self.bus_prefix.clone(),
                saga: self.saga.into(),
                provider: self.provider.config()?,
                service_key,
                admin: admin_from_env()?,
                seed_catalog: self.seed_catalog,
                saga_owner: self.saga_owner.clone(),
            },
            serve_shutdown(self.exit_with_parent),
        )
        .await
        .with_context(|| format!("serving {}", self.name))?;
        Ok(())
    }
}

/// On SIGHUP, reloads the gateway's configuration `toml` (the same routes; the TLS
/// certificate and key files are read again): a renewed certificate without a restart. A
/// reload that fails is logged and the running configuration and certificate stay.
#[cfg(unix)]
fn reload_on_hangup(gateway: trellis_gateway::Gateway, toml: String) {
    let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP; certificate reloads need a restart");
        return;
    };
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let reloaded = match trellis_gateway::Config::from_toml(&toml) {
                Ok(config) => gateway.reload(config).await.map_err(anyhow::Error::from),
                Err(error) => Err(anyhow::Error::from(error)),
            };
            match reloaded {
                Ok(()) => tracing::info!("SIGHUP: gateway configuration and certificate reloaded"),
                Err(error) => {
                    tracing::error!(%error, "SIGHUP: reload refused; the running one stays")
                }
            }
        }
    });
}

#[cfg(not(unix))]
fn reload_on_hangup(_gateway: trellis_gateway::Gateway, _toml: String) {}
