//! The shop as supervised processes behind fault proxies: the [`Target`] `trellis chaos`
//! tortures by default.
//!
//! Every service in [`PROXIED`] listens on a port of its own, and every other process (the
//! gateway, and the services calling each other) dials it through a
//! [`trellis_chaos::proxy::FaultProxy`] in front of that port; a network fault "into
//! payments" is set on the payments proxy, so it hits every caller of payments. Kills go
//! through the supervisor (`SIGKILL`; it restarts the process with backoff). The children's
//! output goes to `DATA_DIR/chaos-children.log`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use shop_app::processes::supervisor::{LogLine, Options, Output};
use shop_app::{ProcessConfig, ProcessShop, ShopConfig};
use trellis_chaos::proxy::{Bandwidth, Blackhole, Down, FaultProxy, Faults, Latency, Reset, Slice};

use shop_app::processes::supervisor::EventKind;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::runner::{BoxFuture, RECOVERY_MAX, Target};
use crate::scenario::{NetFault, PROXIED};

/// The shop as processes, with a fault proxy in front of each proxied service.
#[derive(Debug)]
pub struct ProcessTarget {
    shop: ProcessShop,
    proxies: BTreeMap<String, FaultProxy>,
    data_dir: PathBuf,
    provider_pid: Option<u32>,
}

fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

impl ProcessTarget {
    /// Starts `shop` (its data directory, admin and saga style; every port is chosen free) as
    /// children of `program` (the `trellis` executable), with a fault proxy seeded by `seed` in
    /// front of each service of [`PROXIED`].
    ///
    /// # Errors
    /// A message naming what could not start; whatever started is stopped.
    pub async fn start(mut shop: ShopConfig, program: PathBuf, seed: u64) -> Result<Self, String> {
        shop.gateway_port = 0;
        shop.operator_port = 0;
        shop.fixed_service_ports = false;
        let data_dir = shop.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| format!("creating {}: {e}", data_dir.display()))?;
        let mut config = ProcessConfig::new(shop).map_err(|e| e.to_string())?;
        config.program = program;
        config.options = Options {
            output: Output::Capture(log_writer(&data_dir.join("chaos-children.log"))?),
            ..Options::default()
        };
        let mut proxies = BTreeMap::new();
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
        let shop = shop_app::processes::spawn(config)
            .await
            .map_err(|e| format!("starting the shop as processes: {e}"))?;
        let provider_pid = shop.pid("payment-provider");
        Ok(Self {
            shop,
            proxies,
            data_dir,
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

    /// Stops every child and every proxy.
    pub async fn shutdown(self) {
        self.shop.shutdown().await;
        for proxy in self.proxies.into_values() {
            proxy.shutdown().await;
        }
    }
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

    fn data_dir(&self) -> &Path {
        &self.data_dir
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
