//! `trellis fault-proxy`: a TCP fault proxy between a client and one upstream, with its faults
//! switched at run time over HTTP (see `trellis_chaos::proxy` for what each fault does).
//!
//! ```text
//! trellis fault-proxy --listen 127.0.0.1:15432 --upstream 127.0.0.1:5432 --control 127.0.0.1:9900
//! curl -X PUT 127.0.0.1:9900/faults -d '{"latency":{"delay_ms":100,"jitter_ms":20}}'
//! curl 127.0.0.1:9900/stats
//! curl -X DELETE 127.0.0.1:9900/faults
//! ```

use std::net::SocketAddr;

use anyhow::Context as _;
use trellis_chaos::proxy::{FaultProxy, serve_control};

/// `trellis fault-proxy`.
#[derive(Debug, clap::Args)]
pub(crate) struct FaultProxyArgs {
    /// Accept client connections here (for example 127.0.0.1:15432).
    #[arg(long)]
    listen: SocketAddr,
    /// Forward every connection to this `host:port`.
    #[arg(long)]
    upstream: String,
    /// Serve the HTTP control endpoint here (GET/PUT/DELETE /faults, GET /stats); it has no
    /// authentication, so keep it on loopback.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Seed of the per-connection fault choices and jitter (random when absent; printed so a
    /// run can be replayed).
    #[arg(long)]
    seed: Option<u64>,
}

impl FaultProxyArgs {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let seed = self.seed.unwrap_or_else(|| fastrand::u64(..));
        let proxy = FaultProxy::start(self.listen, self.upstream.clone(), seed)
            .await
            .with_context(|| format!("cannot listen on {}", self.listen))?;
        println!(
            "fault proxy on {} -> {} (seed {seed}); no faults yet",
            proxy.local_addr(),
            self.upstream
        );
        let control = match self.control {
            Some(addr) => {
                let control = serve_control(proxy.clone(), addr)
                    .await
                    .with_context(|| format!("cannot serve the control endpoint on {addr}"))?;
                println!(
                    "control on http://{}/faults (GET, PUT, DELETE) and /stats",
                    control.local_addr()
                );
                Some(control)
            }
            None => None,
        };
        tokio::signal::ctrl_c()
            .await
            .context("cannot wait for Ctrl-C")?;
        if let Some(control) = control {
            control.shutdown().await;
        }
        proxy.shutdown().await;
        let stats = proxy.stats();
        println!(
            "stopped after {} connections ({} bytes up, {} down)",
            stats.connections, stats.bytes_to_upstream, stats.bytes_to_client
        );
        Ok(())
    }
}
