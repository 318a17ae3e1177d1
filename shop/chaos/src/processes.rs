//! The shop as supervised processes behind fault proxies: the [`Target`] `trellis chaos`
//! tortures by default.
//!
//! Every service in [`PROXIED`] listens on a port of its own, and every other process (the
//! gateway, and the services calling each other) dials it through a
//! [`trellis_chaos::proxy::FaultProxy`] in front of that port; a network fault "into
//! payments" is set on the payments proxy, so it hits every caller of payments. Kills go
//! through the supervisor (`SIGKILL`; it restarts the process with backoff). The children's
//! output goes to `DATA_DIR/chaos-children.log`.
//!
//! With [`RemoteBackends`] the services keep their data in PostgreSQL (one database per
//! service, made for the run) and talk over NATS JetStream (streams under the run's prefix),
//! each reached through a proxy of its own (`postgres`, `nats`), so a partition of the
//! database or the broker is a network fault like any other. `pg_terminate` kills every
//! server-side connection of the run's databases; `nats_restart` stops and starts a NATS
//! server this run started itself ([`RemoteBackends::nats_server`]), its JetStream store in
//! `DATA_DIR/nats`. That server is not covered by the stdin-pipe watch the shop's children
//! have (it does not read its stdin): if this process is SIGKILLed, stop it by hand (its pid
//! is in the children's log).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use shop_app::processes::supervisor::{ChildSpec, EventKind, LogLine, Options, Output, Supervisor};
use shop_app::{ProcessConfig, ProcessShop, ShopConfig};
use tokio::sync::broadcast;
use tokio::time::Instant;
use trellis_chaos::proxy::{Bandwidth, Blackhole, Down, FaultProxy, Faults, Latency, Reset, Slice};

use crate::checks::{BusStore, CHECKED, Stores};
use crate::runner::{BoxFuture, RECOVERY_MAX, Target};
use crate::scenario::{BackendFault, Backends, NetFault, PROXIED};

/// The services that keep data in a database of their own.
pub const WITH_DATABASE: [&str; 6] = [
    "users",
    "products",
    "inventory",
    "orders",
    "payments",
    "shipping",
];
/// How long a NATS server this run started may take to accept connections.
pub const NATS_READY_MAX: Duration = Duration::from_secs(30);

/// Database and broker servers for a run, instead of the embedded ones.
#[derive(Debug, Clone, Default)]
pub struct RemoteBackends {
    /// A PostgreSQL server (`postgres://user@host:port/any`): each service gets database
    /// `{prefix}_{service}` on it, created when missing.
    pub postgres: Option<String>,
    /// An existing NATS server (`nats://host:port`); the run's streams are `{PREFIX}_*`.
    pub nats: Option<String>,
    /// A `nats-server` executable to start for the run instead (on a free port, with
    /// JetStream), which `nats_restart` faults restart.
    pub nats_server: Option<PathBuf>,
    /// Names the run's databases and streams (`[a-z0-9_]`).
    pub prefix: String,
    /// Processes per service for the shop the run starts (`orders = 2`: a child `orders-2`
    /// beside `orders`, on the same database); needs `postgres`. A kill may name a replica,
    /// and `restart = false` keeps it down.
    pub replicas: BTreeMap<String, usize>,
}

/// What a run made on the remote backends, to drop when it is over.
#[derive(Debug, Default)]
struct Remote {
    postgres: Option<String>,
    databases: Vec<String>,
    nats: Option<String>,
    prefix: String,
    nats_supervisor: Option<Supervisor>,
}

/// The shop as processes, with a fault proxy in front of each proxied service.
#[derive(Debug)]
pub struct ProcessTarget {
    shop: ProcessShop,
    proxies: BTreeMap<String, FaultProxy>,
    stores: Stores,
    remote: Remote,
    provider_pid: Option<u32>,
}

/// A loopback port outside the kernel's ephemeral range, free now
/// ([`shop_app::processes::unused_port`]: an outgoing connection cannot take it before the
/// child binds it).
fn free_port() -> std::io::Result<u16> {
    shop_app::processes::unused_port(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .map(|addr| addr.port())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::AddrInUse, e.to_string()))
}

impl ProcessTarget {
    /// Starts `shop` (its data directory, admin and saga style; every port is chosen free) as
    /// children of `program` (the `trellis` executable), with a fault proxy seeded by `seed` in
    /// front of each service of [`PROXIED`], on the embedded backends or on `remote` ones
    /// (each behind a proxy too).
    ///
    /// # Errors
    /// A message naming what could not start; whatever started is stopped.
    pub async fn start(
        mut shop: ShopConfig,
        program: PathBuf,
        seed: u64,
        remote: RemoteBackends,
    ) -> Result<Self, String> {
        shop.gateway_port = 0;
        shop.operator_port = 0;
        shop.fixed_service_ports = false;
        let data_dir = shop.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| format!("creating {}: {e}", data_dir.display()))?;
        let log = log_writer(&data_dir.join("chaos-children.log"))?;
        let mut proxies = BTreeMap::new();
        let mut stores = Stores::embedded(&data_dir);
        let mut made = Remote {
            prefix: remote.prefix.clone(),
            ..Remote::default()
        };
        if let Err(error) = backends(
            &remote,
            &mut shop,
            &mut stores,
            &mut made,
            &mut proxies,
            seed,
            log.clone(),
        )
        .await
        {
            stop_remote(made, proxies, false).await;
            return Err(error);
        }
        let mut config = ProcessConfig::new(shop).map_err(|e| e.to_string())?;
        config.program = program;
        config.replicas = remote.replicas.clone();
        config.options = Options {
            output: Output::Capture(log),
            ..Options::default()
        };
        for (i, service) in PROXIED.iter().enumerate() {
            let port = free_port().map_err(|e| format!("a free port: {e}"))?;
            let upstream = format!("127.0.0.1:{port}");
            let proxy = FaultProxy::start(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                upstream,
                seed.wrapping_add(i as u64),
            )
            .await
            .map_err(|e| format!("the fault proxy of {service}: {e}"))?;
            config.service_ports.insert((*service).to_owned(), port);
            config
                .peers
                .insert((*service).to_owned(), proxy.local_addr());
            proxies.insert((*service).to_owned(), proxy);
        }
        let shop = match shop_app::processes::spawn(config).await {
            Ok(shop) => shop,
            Err(e) => {
                stop_remote(made, proxies, false).await;
                return Err(format!("starting the shop as processes: {e}"));
            }
        };
        let provider_pid = shop.pid("payment-provider");
        Ok(Self {
            shop,
            proxies,
            stores,
            remote: made,
            provider_pid,
        })
    }

    /// The running shop.
    pub fn shop(&self) -> &ProcessShop {
        &self.shop
    }

    /// The proxy in front of `service`.
    pub fn proxy(&self, service: &str) -> Option<&FaultProxy> {
        self.proxies.get(service)
    }

    /// Stops every child and every proxy; with `drop_data`, drops the run's PostgreSQL
    /// databases and NATS streams too (what a passed run on a temporary data directory does).
    pub async fn shutdown(self, drop_data: bool) {
        self.shop.shutdown().await;
        stop_remote(self.remote, self.proxies, drop_data).await;
    }
}

/// Sets the remote backends up: databases, the NATS server, the proxies in front of them, and
/// the shop's URLs pointed at the proxies.
async fn backends(
    remote: &RemoteBackends,
    shop: &mut ShopConfig,
    stores: &mut Stores,
    made: &mut Remote,
    proxies: &mut BTreeMap<String, FaultProxy>,
    seed: u64,
    log: tokio::sync::mpsc::UnboundedSender<LogLine>,
) -> Result<(), String> {
    if !remote
        .prefix
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        || remote.prefix.is_empty()
    {
        return Err(format!("prefix {:?}: expected [a-z0-9_]+", remote.prefix));
    }
    if let Some(server) = &remote.postgres {
        let upstream = authority(server)
            .ok_or_else(|| format!("--db {server:?}: expected postgres://[user@]host[:port]/…"))?;
        let proxy = start_proxy("postgres", &upstream, seed.wrapping_add(100)).await?;
        let through = proxy.local_addr().to_string();
        proxies.insert("postgres".into(), proxy);
        made.postgres = Some(server.clone());
        for service in WITH_DATABASE {
            let name = format!("{}_{service}", remote.prefix);
            let direct = trellis_service::create_postgres_database(server, &name)
                .await
                .map_err(|e| format!("creating database {name}: {e}"))?;
            made.databases.push(name);
            shop.database_urls
                .insert(service.to_owned(), with_authority(&direct, &through));
            if CHECKED.contains(&service) {
                stores.databases.insert(service.to_owned(), direct);
            }
        }
    }
    let nats = match (&remote.nats_server, &remote.nats) {
        (Some(program), _) => {
            let port = free_port().map_err(|e| format!("a free port: {e}"))?;
            let store = shop.data_dir.join("nats");
            let spec = ChildSpec::new("nats", program)
                .args(["-a", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .args(["-js", "-sd"])
                .arg(&store);
            let supervisor = Supervisor::new(Options {
                output: Output::Capture(log),
                ..Options::default()
            });
            let added = supervisor.add(spec).await;
            made.nats_supervisor = Some(supervisor);
            added.map_err(|e| format!("starting {}: {e}", program.display()))?;
            let addr = format!("127.0.0.1:{port}");
            if !nats_answers(&addr, NATS_READY_MAX).await {
                return Err(format!(
                    "the NATS server on {addr} did not answer within {} s",
                    NATS_READY_MAX.as_secs()
                ));
            }
            Some(format!("nats://{addr}"))
        }
        (None, Some(url)) => Some(url.clone()),
        (None, None) => None,
    };
    if let Some(url) = nats {
        let upstream =
            authority(&url).ok_or_else(|| format!("--bus {url:?}: expected nats://host[:port]"))?;
        let upstream = if upstream.contains(':') {
            upstream
        } else {
            format!("{upstream}:4222")
        };
        let proxy = start_proxy("nats", &upstream, seed.wrapping_add(101)).await?;
        shop.bus_url = Some(format!("nats://{}", proxy.local_addr()));
        shop.bus_prefix = remote.prefix.clone();
        proxies.insert("nats".into(), proxy);
        stores.bus = BusStore::Nats {
            url: url.clone(),
            prefix: remote.prefix.clone(),
        };
        made.nats = Some(url);
    }
    Ok(())
}

async fn start_proxy(name: &str, upstream: &str, seed: u64) -> Result<FaultProxy, String> {
    FaultProxy::start(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        upstream.to_owned(),
        seed,
    )
    .await
    .map_err(|e| format!("the fault proxy of {name}: {e}"))
}

/// Stops the proxies and the NATS server this run started; with `drop_data`, drops the run's
/// databases and streams.
async fn stop_remote(remote: Remote, proxies: BTreeMap<String, FaultProxy>, drop_data: bool) {
    for proxy in proxies.into_values() {
        proxy.shutdown().await;
    }
    if drop_data {
        if let Some(server) = &remote.postgres {
            for name in &remote.databases {
                if let Err(e) = trellis_service::drop_postgres_database(server, name).await {
                    eprintln!("[chaos] could not drop database {name}: {e}");
                }
            }
        }
        if let Some(url) = &remote.nats
            && remote.nats_supervisor.is_none()
            && let Ok(client) = async_nats::connect(url.as_str()).await
        {
            let context = async_nats::jetstream::new(client);
            let upper = remote.prefix.to_uppercase();
            for suffix in ["BUS", "PARK", "DLQ"] {
                let _ = context.delete_stream(format!("{upper}_{suffix}")).await;
            }
        }
    }
    if let Some(supervisor) = remote.nats_supervisor {
        supervisor.shutdown().await;
    }
}

/// `host:port` (or `host`) of a `scheme://[user[:password]@]host[:port][/…]` URL.
fn authority(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host.is_empty()).then(|| {
        if url.starts_with("postgres") && !host.contains(':') {
            format!("{host}:5432")
        } else {
            host.to_owned()
        }
    })
}

/// `url` with its host and port replaced by `host_port` (user and path kept).
fn with_authority(url: &str, host_port: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let user = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!("{scheme}://{}{host_port}{tail}", user.unwrap_or_default())
}

/// Whether a NATS server at `addr` greets a new connection (`INFO {…}`) within `wait`.
async fn nats_answers(addr: &str, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt as _;
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
        {
            let mut greeting = [0u8; 5];
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut greeting)).await
                && &greeting == b"INFO "
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Kills every server-side connection to `databases` on `server`; answers how many.
pub(crate) async fn pg_terminate(server: &str, databases: &[String]) -> Result<i64, String> {
    use sqlx::Connection as _;
    let mut admin =
        tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect(server))
            .await
            .map_err(|_| "PostgreSQL did not answer within 10 s".to_owned())?
            .map_err(|e| format!("connecting to PostgreSQL: {e}"))?;
    let killed: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity          WHERE datname = ANY($1) AND pid <> pg_backend_pid()) AS t",
    )
    .bind(databases)
    .fetch_one(&mut admin)
    .await
    .map_err(|e| format!("pg_terminate_backend: {e}"))?;
    let _ = admin.close().await;
    Ok(killed)
}

/// A channel whose lines are appended to `path` by a task.
fn log_writer(path: &Path) -> Result<tokio::sync::mpsc::UnboundedSender<LogLine>, String> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    let (lines, mut received) = tokio::sync::mpsc::unbounded_channel::<LogLine>();
    tokio::spawn(async move {
        while let Some(line) = received.recv().await {
            let _ = writeln!(file, "[{}] {}", line.name, line.line);
        }
    });
    Ok(lines)
}

/// The proxy faults for a scenario's network fault on `share` of connections.
pub fn faults_for(fault: &NetFault, share: f64) -> Faults {
    let mut faults = Faults::default();
    match fault {
        NetFault::Latency { ms, jitter_ms } => {
            faults.latency = Some(Latency::new(*ms, *jitter_ms).with_probability(share));
        }
        NetFault::Reset => faults.reset = Some(Reset::at_accept().with_probability(share)),
        NetFault::Blackhole => faults.blackhole = Some(Blackhole::new().with_probability(share)),
        NetFault::Bandwidth { bytes_per_second } => {
            faults.bandwidth = Some(Bandwidth::new(*bytes_per_second).with_probability(share));
        }
        NetFault::Slice { bytes } => {
            faults.slice = Some(Slice::new(*bytes, 0).with_probability(share));
        }
        NetFault::Partition => {
            faults.down = Some(Down {
                close_existing: true,
            });
        }
    }
    faults
}

impl Target for ProcessTarget {
    fn gateway_url(&self) -> String {
        self.shop.gateway_url()
    }

    fn provider_url(&self) -> String {
        self.shop
            .addrs()
            .get("payment-provider")
            .map(|addr| format!("http://{addr}"))
            .unwrap_or_default()
    }

    fn stores(&self) -> Stores {
        self.stores.clone()
    }

    fn backends(&self) -> Backends {
        let mut backends = Backends::default();
        if self.remote.postgres.is_some() {
            backends.faults.push(BackendFault::PgTerminate);
        }
        if self.remote.nats_supervisor.is_some() {
            backends.faults.push(BackendFault::NatsRestart);
        }
        backends.proxied = ["postgres", "nats"]
            .into_iter()
            .filter(|name| self.proxies.contains_key(*name))
            .map(str::to_owned)
            .collect();
        backends
    }

    fn backend(
        &self,
        fault: BackendFault,
    ) -> BoxFuture<'_, Result<BoxFuture<'static, Option<Instant>>, String>> {
        Box::pin(async move {
            match fault {
                BackendFault::PgTerminate => {
                    let server = self
                        .remote
                        .postgres
                        .as_deref()
                        .ok_or("the shop is not on PostgreSQL")?;
                    pg_terminate(server, &self.remote.databases).await?;
                    let done = Instant::now();
                    let back: BoxFuture<'static, Option<Instant>> =
                        Box::pin(async move { Some(done) });
                    Ok(back)
                }
                BackendFault::NatsRestart => {
                    let supervisor = self
                        .remote
                        .nats_supervisor
                        .as_ref()
                        .ok_or("this run did not start the NATS server (--nats-server)")?;
                    let addr = self
                        .remote
                        .nats
                        .as_deref()
                        .and_then(authority)
                        .ok_or("no NATS address")?;
                    supervisor.stop("nats").await.map_err(|e| e.to_string())?;
                    supervisor.start("nats").map_err(|e| e.to_string())?;
                    let back: BoxFuture<'static, Option<Instant>> = Box::pin(async move {
                        nats_answers(&addr, RECOVERY_MAX).await.then(Instant::now)
                    });
                    Ok(back)
                }
            }
        })
    }

    fn kill(&self, service: &str) -> Result<BoxFuture<'static, Option<Instant>>, String> {
        // Subscribe before the kill, so the restart cannot be missed.
        let mut events = self.shop.supervisor().events();
        let killed = self
            .shop
            .supervisor()
            .kill(service)
            .map_err(|e| e.to_string())?;
        let service = service.to_owned();
        Ok(Box::pin(async move {
            let deadline = Instant::now() + RECOVERY_MAX;
            loop {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Ok(event)) if event.name == service => {
                        if let EventKind::Started { pid, .. } = event.kind
                            && pid != killed
                        {
                            return Some(Instant::from_std(event.at));
                        }
                    }
                    Ok(Ok(_) | Err(broadcast::error::RecvError::Lagged(_))) => {}
                    Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return None,
                }
            }
        }))
    }

    fn stop(&self, service: &str) -> BoxFuture<'_, Result<(), String>> {
        let service = service.to_owned();
        Box::pin(async move {
            let supervisor = self.shop.supervisor();
            supervisor.kill(&service).map_err(|e| e.to_string())?;
            // Held down: the supervisor does not restart a stopped child.
            supervisor
                .stop(&service)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn network(&self, service: &str, fault: Option<(&NetFault, f64)>) -> Result<(), String> {
        let proxy = self
            .proxies
            .get(service)
            .ok_or_else(|| format!("no proxy in front of {service}"))?;
        match fault {
            Some((fault, share)) => proxy
                .set(faults_for(fault, share))
                .map_err(|e| e.to_string()),
            None => {
                proxy.clear();
                Ok(())
            }
        }
    }

    fn provider_intact(&self) -> bool {
        self.provider_pid.is_some() && self.shop.pid("payment-provider") == self.provider_pid
    }
}
