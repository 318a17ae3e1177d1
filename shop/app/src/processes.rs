//! The shop as real processes (`trellis up --processes`): each service, the mcp service, the
//! payment provider simulator, the admin console and the gateway is a child `trellis serve NAME …` under a
//! [`Supervisor`], which restarts it with backoff when it exits or is killed.
//!
//! Why: in one process ([`up`]) a crash takes the whole shop down and nothing can be killed
//! alone. As processes, `trellis chaos` kills one service through [`ProcessShop::supervisor`]
//! and measures how long the shop takes to recover, and what survives a crash is what is
//! durable, as in production.
//!
//! The same shop as [`up`]: the same ports ([`ShopConfig::fixed_service_ports`]), data
//! directory, embedded databases (or the URLs in [`ShopConfig::database_urls`]), bus, saga
//! style and first start (the admin account, made here before the users service starts, and
//! the seed catalog, created through the products service once it answers). One difference:
//! the services must share a key across processes, so it is read from (or created in)
//! `DATA_DIR/service.key` (or `TRELLIS_SERVICE_KEY`), as `trellis serve` does, instead of
//! being made afresh per start.
//!
//! Children are started with `--exit-with-parent`: they stop when their stdin (a pipe the
//! supervisor holds) reaches end-of-file, so even a SIGKILLed parent leaves no orphan.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), shop_app::Error> {
//! let config = shop_app::ProcessConfig::new(shop_app::ShopConfig::ephemeral("trellis-data"))?;
//! let shop = shop_app::processes::spawn(config).await?;
//! let mut events = shop.supervisor().events();
//! shop.supervisor().kill("orders")?; // SIGKILL; restarted after 100 ms
//! shop.wait_ready("orders", std::time::Duration::from_secs(30)).await?;
//! shop.shutdown().await;
//! # drop(events); Ok(()) }
//! ```

use std::time::{Duration, Instant};

#[allow(clippy::wildcard_imports)]
use super::*;
use trellis_chaos::supervisor::{ChildSpec, Options, Supervisor};

/// The supervisor the children run under (re-exported, so a caller of [`spawn`] needs no
/// dependency of its own on trellis-chaos).
pub use trellis_chaos::supervisor;

/// The name of the gateway's child (the services' are in [`SERVICES`]).
pub const GATEWAY: &str = "gateway";

/// Environment variables a child must not inherit from the parent, because its flags say
/// otherwise (a `TRELLIS_DB` meant for one service would otherwise point every one at it).
const CLEARED_ENV: [&str; 5] = [
    "TRELLIS_DB",
    "TRELLIS_BUS",
    "TRELLIS_SAGA_OWNER",
    "TRELLIS_ADMIN_EMAIL",
    "TRELLIS_ADMIN_PASSWORD",
];

/// What [`spawn`] runs.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// The shop: ports, data directory, databases, bus, saga style, first start. `metrics` is
    /// ignored (every child serves its own `/metrics`); of `provider`, the latency, failure
    /// and decline rates and the outage are passed on (`trellis serve`'s flags).
    pub shop: ShopConfig,
    /// The `trellis` executable the children run (`trellis serve NAME …`).
    pub program: PathBuf,
    /// How the supervisor runs them (backoff, grace, where their output goes).
    pub options: Options,
    /// How long each child may take to answer `/healthz` at start.
    pub ready_timeout: Duration,
    /// Ports chosen by the caller for some services (they win over DESIGN.md's ports and
    /// `fixed_service_ports = false`).
    pub service_ports: BTreeMap<String, u16>,
    /// Where the other processes dial a service, when not at its own address: `trellis
    /// chaos` puts a fault proxy there.
    pub peers: BTreeMap<String, SocketAddr>,
    /// Processes per service, for those with more than one: each extra replica is a child
    /// named `SERVICE-2`, `SERVICE-3`, ... on a free port, running `trellis serve SERVICE`
    /// on the same database; the gateway and the other services spread their calls over
    /// them. Only on PostgreSQL (a service's SQLite file belongs to one process), and not for
    /// the payment provider simulator (its charges live in its memory) or the console.
    pub replicas: BTreeMap<String, usize>,
}

impl ProcessConfig {
    /// `shop` run by this executable (`std::env::current_exe`), with the supervisor's
    /// defaults (100 ms doubling to 5 s; output to this process, prefixed) and 60 s for each
    /// child to come up.
    ///
    /// # Errors
    /// [`Error::Process`] when the current executable cannot be found.
    pub fn new(shop: ShopConfig) -> Result<Self, Error> {
        let program = std::env::current_exe()
            .map_err(|e| Error::Process(format!("cannot find the trellis executable: {e}")))?;
        Ok(Self {
            shop,
            program,
            options: Options::default(),
            ready_timeout: Duration::from_secs(60),
            service_ports: BTreeMap::new(),
            peers: BTreeMap::new(),
            replicas: BTreeMap::new(),
        })
    }
}

/// The shop running as supervised child processes.
#[derive(Debug)]
pub struct ProcessShop {
    supervisor: Supervisor,
    gateway: SocketAddr,
    operator: SocketAddr,
    addrs: BTreeMap<&'static str, SocketAddr>,
    /// The extra replicas' addresses, by child name (`orders-2`).
    replica_addrs: BTreeMap<String, SocketAddr>,
    admin: AdminAccount,
    service_key: ServiceKey,
    http: reqwest::Client,
}

impl ProcessShop {
    /// `http://ip:port` of the gateway.
    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.gateway)
    }

    /// `http://ip:port` of the gateway's operator listener (`/metrics`, `/healthz`, `/readyz`).
    pub fn operator_url(&self) -> String {
        format!("http://{}", self.operator)
    }

    /// Each service's address (REST and gRPC share it; its first replica's, when it has
    /// several); the gateway is not among them.
    pub fn addrs(&self) -> &BTreeMap<&'static str, SocketAddr> {
        &self.addrs
    }

    /// The extra replicas' addresses, by child name (`orders-2`, ...).
    pub fn replica_addrs(&self) -> &BTreeMap<String, SocketAddr> {
        &self.replica_addrs
    }

    /// The admin account.
    pub fn admin(&self) -> &AdminAccount {
        &self.admin
    }

    /// The key the gateway and the services share (from `DATA_DIR/service.key` or
    /// `TRELLIS_SERVICE_KEY`).
    pub fn service_key(&self) -> &ServiceKey {
        &self.service_key
    }

    /// The supervisor: kill, terminate, stop and start children by name ([`SERVICES`] and
    /// [`GATEWAY`]), read their restart counts and subscribe to their events.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The children's names in start order: [`SERVICES`], [`CONSOLE`], then [`GATEWAY`].
    pub fn children(&self) -> Vec<String> {
        self.supervisor.names()
    }

    /// The running process of a child.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.supervisor.pid(name)
    }

    /// The `/healthz` URL of a child (the gateway's is on its operator listener).
    pub fn health_url(&self, name: &str) -> Option<String> {
        if name == GATEWAY {
            return Some(format!("{}/healthz", self.operator_url()));
        }
        self.addrs
            .get(name)
            .or_else(|| self.replica_addrs.get(name))
            .map(|addr| format!("http://{addr}/healthz"))
    }

    /// Waits until a child answers `/healthz` with 200 (after a kill, say), polling every
    /// 50 ms.
    ///
    /// # Errors
    /// [`Error::NotReady`] after `timeout`; [`Error::UnknownService`] for a name not run here.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<(), Error> {
        let url = self
            .health_url(name)
            .ok_or_else(|| Error::UnknownService(name.to_owned()))?;
        wait_healthy(&self.http, name, &url, timeout).await
    }

    /// Stops every child: SIGTERM (they drain in-flight requests), SIGKILL after the grace.
    pub async fn shutdown(self) {
        self.supervisor.shutdown().await;
    }
}

async fn wait_healthy(
    http: &reqwest::Client,
    name: &str,
    url: &str,
    timeout: Duration,
) -> Result<(), Error> {
    let began = Instant::now();
    loop {
        let answer = http.get(url).timeout(Duration::from_secs(2)).send().await;
        if answer.is_ok_and(|a| a.status().is_success()) {
            return Ok(());
        }
        if began.elapsed() >= timeout {
            return Err(Error::NotReady {
                service: name.to_owned(),
                waited: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A port on `ip` no one listens on now, or `port` itself when it is free (a port other than
/// 0 that is taken is an error now rather than a child that keeps failing to start). For 0,
/// a port outside the kernel's ephemeral range ([`unused_port`]).
fn free_port(ip: IpAddr, port: u16) -> Result<SocketAddr, Error> {
    if port == 0 {
        return unused_port(ip);
    }
    let addr = SocketAddr::new(ip, port);
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| Error::Bind { addr, source })?;
    listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })
}

/// Connections each PostgreSQL pool of a child may hold when the shop runs replicas: orders
/// opens three pools, every other service one, so two orders, two payments and the rest stay
/// near 80 connections, under PostgreSQL's default `max_connections` of 100 (uncapped, about
/// 180: services were refused connections and waited, docs/BENCHMARKS.md).
pub const REPLICA_POOL_CONNECTIONS_MAX: u32 = 6;

/// Ports [`unused_port`] picks from when the kernel's ephemeral range cannot be read.
const PICKED_PORTS: std::ops::RangeInclusive<u16> = 20_000..=32_767;

/// A port on `ip` nothing listens on now, picked at random outside the kernel's ephemeral
/// range (`/proc/sys/net/ipv4/ip_local_port_range`). The port is only checked, then a child
/// binds it later: a port the kernel hands out (port 0) may meanwhile become the source port
/// of any outgoing connection on the machine, which then holds it for as long as it lives
/// and the child cannot start (seen in CI: a service restarted for minutes on "address
/// already in use").
///
/// # Errors
/// [`Error::Bind`] when no port could be bound in 200 tries.
pub fn unused_port(ip: IpAddr) -> Result<SocketAddr, Error> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok());
    let range = match ephemeral_low {
        Some(low) if low > 11_000 => 10_000..=low - 1,
        _ => PICKED_PORTS,
    };
    let mut last = None;
    for _ in 0..200 {
        let addr = SocketAddr::new(ip, fastrand::u16(range.clone()));
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => {
                return listener
                    .local_addr()
                    .map_err(|source| Error::Bind { addr, source });
            }
            Err(source) => last = Some(Error::Bind { addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| Error::Process("no port to try".to_owned())))
}

/// A loopback address for a peer to dial when the shop binds every interface.
fn dialable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    addr
}

/// Starts the shop as child processes, one at a time in [`SERVICES`] order, then the
/// [`CONSOLE`] and the gateway last, each once the one before answers `/healthz`; then seeds the catalog.
///
/// # Errors
/// [`Error`] naming what could not start; whatever started is stopped.
pub async fn spawn(config: ProcessConfig) -> Result<ProcessShop, Error> {
    let shop = &config.shop;
    let mut addrs = BTreeMap::new();
    for service in SERVICES.into_iter().chain([CONSOLE]) {
        let port = if let Some(port) = config.service_ports.get(service) {
            *port
        } else if shop.fixed_service_ports {
            port_of(service)
        } else {
            0
        };
        addrs.insert(service, free_port(shop.bind, port)?);
    }
    let mut replica_addrs: BTreeMap<String, (&'static str, SocketAddr)> = BTreeMap::new();
    for (service, count) in &config.replicas {
        let Some(service) = SERVICES.into_iter().find(|s| s == service) else {
            return Err(Error::UnknownService(service.clone()));
        };
        if *count <= 1 {
            continue;
        }
        if service == "payment-provider" {
            return Err(Error::Process(
                "the payment provider simulator cannot have replicas: its ledger is one SQLite file"
                    .to_owned(),
            ));
        }
        if service != "mcp" && !shop.database_url(service).starts_with("postgres") {
            return Err(Error::Process(format!(
                "replicas of {service} need PostgreSQL (a service's SQLite file belongs to one process)"
            )));
        }
        for replica in 2..=*count {
            let addr = free_port(shop.bind, 0)?;
            replica_addrs.insert(format!("{service}-{replica}"), (service, addr));
        }
    }
    let gateway = free_port(shop.bind, shop.gateway_port)?;
    let operator = free_port(shop.bind, shop.operator_port)?;
    std::fs::create_dir_all(&shop.data_dir).map_err(|e| {
        Error::Process(format!(
            "cannot create the data directory {}: {e}",
            shop.data_dir.display()
        ))
    })?;
    let service_key = ServiceKey::from_env_or_file(&shop.data_dir)?;

    // The admin account, before the users service starts (so this start knows whether it
    // made it, and a generated password is shown once).
    let (_, users_db) = shop_users::app(shop_users::Config {
        database_url: shop.database_url("users"),
        service_key: service_key.clone(),
    })
    .await
    .map_err(|e| service_err("users")(&e))?;
    let admin = seed::ensure_admin(&users_db, shop.admin.clone()).await;
    users_db.close().await;
    let admin = admin?;

    let supervisor = Supervisor::new(config.options.clone());
    let http = reqwest::Client::new();
    let started = start_children(
        &config,
        &supervisor,
        &http,
        &addrs,
        &replica_addrs,
        gateway,
        operator,
    )
    .await;
    if let Err(error) = started {
        supervisor.shutdown().await;
        return Err(error);
    }
    let process_shop = ProcessShop {
        supervisor,
        gateway: dialable(gateway),
        operator: dialable(operator),
        addrs: addrs.iter().map(|(k, v)| (*k, dialable(*v))).collect(),
        replica_addrs: replica_addrs
            .iter()
            .map(|(name, (_, addr))| (name.clone(), dialable(*addr)))
            .collect(),
        admin,
        service_key,
        http,
    };
    if shop.seed_catalog {
        let products = format!("http://{}", process_shop.addrs["products"]);
        if let Err(error) =
            seed_catalog_at(&products, &process_shop.service_key, SEED_TRIES_SERVE).await
        {
            process_shop.shutdown().await;
            return Err(error);
        }
    }
    Ok(process_shop)
}

async fn start_children(
    config: &ProcessConfig,
    supervisor: &Supervisor,
    http: &reqwest::Client,
    addrs: &BTreeMap<&'static str, SocketAddr>,
    replica_addrs: &BTreeMap<String, (&'static str, SocketAddr)>,
    gateway: SocketAddr,
    operator: SocketAddr,
) -> Result<(), Error> {
    let shop = &config.shop;
    let mut peers: Vec<String> = addrs
        .iter()
        .map(|(name, addr)| {
            let dial = config.peers.get(*name).copied().unwrap_or(dialable(*addr));
            format!("{name}={dial}")
        })
        .collect();
    // Each extra replica is one more `--peer SERVICE=…`: callers spread over them.
    for (service, addr) in replica_addrs.values() {
        peers.push(format!("{service}={}", dialable(*addr)));
    }
    peers.push(format!("{GATEWAY}={}", dialable(gateway)));
    peers.push(format!("{GATEWAY_OPERATOR_PEER}={}", dialable(operator)));
    let bus = shop.bus_url();
    let pool_cap = (!replica_addrs.is_empty()
        && std::env::var_os(trellis_service::PG_POOL_MAX_ENV).is_none())
    .then_some(REPLICA_POOL_CONNECTIONS_MAX);
    let base_as = |child: &str, name: &str, listen: SocketAddr| {
        let mut spec = ChildSpec::new(child, &config.program)
            .args(["serve", name, "--exit-with-parent", "--listen"])
            .arg(listen.to_string())
            .arg("--data-dir")
            .arg(&shop.data_dir)
            .args([
                "--saga",
                shop.saga.as_str(),
                "--bus-prefix",
                &shop.bus_prefix,
            ]);
        for peer in &peers {
            spec = spec.args(["--peer", peer]);
        }
        for key in CLEARED_ENV {
            spec = spec.env_remove(key);
        }
        // With replicas the children's PostgreSQL pools share one server's max_connections
        // (100 by default): each pool is capped (unless the caller set the cap itself).
        if let Some(cap) = pool_cap {
            spec = spec.env(trellis_service::PG_POOL_MAX_ENV, cap.to_string());
        }
        // The OTEL_* variables pass through (the children export where this process does);
        // each child's spans carry its own service name.
        spec.env("OTEL_SERVICE_NAME", name)
    };
    let base = |name: &str, listen: SocketAddr| base_as(name, name, listen);
    // Each service's replicas right after it, one at a time (a replica's schema statements
    // then find the tables made).
    let mut children: Vec<(String, &'static str, SocketAddr)> = Vec::new();
    for service in SERVICES {
        children.push((service.to_owned(), service, addrs[service]));
        for (child, (of, addr)) in replica_addrs {
            if *of == service {
                children.push((child.clone(), service, *addr));
            }
        }
    }
    for (child, service, addr) in children {
        let mut spec = base_as(&child, service, addr);
        match service {
            "payment-provider" | "mcp" => {}
            _ => spec = spec.args(["--db", &shop.database_url(service)]),
        }
        if service == "orders"
            || (shop.saga == SagaStyle::Choreography
                && matches!(service, "inventory" | "payments" | "shipping"))
        {
            spec = spec.args(["--bus", &bus]);
        }
        if service == "orders" {
            // A stable lease owner per orders process (its address), so its restart takes
            // back the sagas it was driving (and the outbox's lease) on its first pass instead
            // of after their leases (30 s) on a shared PostgreSQL log; on SQLite the owner is
            // derived from the log's path anyway.
            spec = spec.args(["--saga-owner", &format!("orders@{}", dialable(addr))]);
        }
        if service == "payment-provider" {
            let provider = &shop.provider;
            spec = spec
                .arg(format!("--provider-latency-ms={}", provider.latency_ms))
                .arg(format!("--provider-failure-rate={}", provider.failure_rate))
                .arg(format!("--provider-decline-rate={}", provider.decline_rate));
            if provider.outage {
                spec = spec.arg("--provider-outage");
            }
        }
        supervisor.add(spec).await?;
        let url = format!("http://{}/healthz", dialable(addr));
        wait_healthy(http, &child, &url, config.ready_timeout).await?;
    }
    // The console after the services (its overview reads them) and before the gateway
    // (which routes `/admin` to it).
    let addr = addrs[CONSOLE];
    supervisor
        .add(base(CONSOLE, addr).args(["--db", &shop.database_url(CONSOLE)]))
        .await?;
    let url = format!("http://{}/healthz", dialable(addr));
    wait_healthy(http, CONSOLE, &url, config.ready_timeout).await?;
    let spec = base(GATEWAY, gateway)
        .arg("--operator-listen")
        .arg(operator.to_string());
    supervisor.add(spec).await?;
    let url = format!("http://{}/healthz", dialable(operator));
    wait_healthy(http, GATEWAY, &url, config.ready_timeout).await
}

/// Completes when this process's stdin reaches end-of-file (or cannot be read): what
/// `trellis serve --exit-with-parent` stops on. A supervising parent holds the pipe's other
/// end and never writes to it, so this completes when the parent dies, however it dies.
/// Anything written to stdin is read and ignored.
///
/// The read runs on a plain thread, not tokio's blocking pool, so a process that stops for
/// another reason does not wait for it at exit.
pub fn parent_gone() -> impl std::future::Future<Output = ()> + Send + 'static {
    let (closed, on_closed) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("parent-watch".to_owned())
        .spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin().lock();
            let mut buffer = [0_u8; 512];
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = closed.send(());
        });
    async move {
        if spawned.is_ok() {
            let _ = on_closed.await;
        } else {
            // No thread, no watch: never complete rather than stop at once.
            std::future::pending::<()>().await;
        }
    }
}
