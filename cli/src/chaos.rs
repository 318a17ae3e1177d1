//! `trellis chaos`: the shop as supervised processes behind fault proxies, orders at a steady
//! rate, faults on a seeded schedule, then the invariants, checked through the API and in each
//! service's database. Exits 1 when any invariant is broken. On the embedded backends by
//! default; on PostgreSQL and NATS JetStream with `--db`, `--bus` or `--nats-server`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use shop_chaos::processes::{ProcessTarget, RemoteBackends};

use crate::shop::SagaStyle;
use shop_chaos::runner::{self, ChaosConfig};
use shop_chaos::scenario::{BUILT_IN, Scenario, parse_duration};

/// Settings of `trellis chaos`.
#[derive(Debug, Args)]
pub(crate) struct ChaosArgs {
    /// A built-in scenario (kill-each, partition-payments, flaky-provider, storm) or a TOML
    /// scenario file.
    #[arg(long, default_value = "kill-each")]
    scenario: String,
    /// How long faults and load go on (default: the scenario's).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Orders load, arrivals per second (default: the scenario's).
    #[arg(long)]
    rate: Option<f64>,
    /// Seed of the fault schedule and the load (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the shop's databases go (default: a new directory under the system's temp
    /// directory, removed after a run that passed).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// How long to wait after the load for every order to end, and then for the databases
    /// to agree (a compensation may retry for about 4.5 minutes).
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    settle: Duration,
    /// A PostgreSQL server for the services' data (`postgres://user@host:port/any`): each
    /// service gets a database `chaos_<seed>_<pid>_<service>` on it, reached through a fault
    /// proxy; `pg_terminate` faults kill their connections. Dropped after a run that passed,
    /// unless --data-dir is given.
    #[arg(long, value_name = "URL")]
    db: Option<String>,
    /// A NATS JetStream server for the bus (`nats://host:port`), reached through a fault
    /// proxy; the run's streams are `CHAOS_<seed>_<pid>_*`.
    #[arg(long, value_name = "URL", conflicts_with = "nats_server")]
    bus: Option<String>,
    /// Start this `nats-server` executable for the run (a free port, JetStream stored in the
    /// data directory) and use it as the bus: `nats_restart` faults restart it.
    #[arg(long, value_name = "PATH")]
    nats_server: Option<PathBuf>,
    /// How orders are driven: orchestrated by the orders service, or choreographed on the
    /// bus (every step a message, so bus faults hit every order).
    #[arg(long, value_enum, default_value_t = SagaStyle::Orchestrated)]
    saga: SagaStyle,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
}

impl ChaosArgs {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let scenario = Scenario::load(&self.scenario)
            .with_context(|| format!("the built-in scenarios are {}", BUILT_IN.join(", ")))?;
        let duration = self
            .duration
            .or(scenario.duration.map(|s| s.0))
            .unwrap_or(Duration::from_secs(120));
        let rate = self.rate.or(scenario.rate).unwrap_or(50.0);
        if !(rate > 0.0 && rate <= 5_000.0) {
            bail!("--rate must be above 0 and at most 5000");
        }
        let seed = self.seed.unwrap_or_else(|| fastrand::u64(..));
        let (data_dir, temporary) = match self.data_dir {
            Some(dir) => (dir, false),
            None => (
                std::env::temp_dir().join(format!("trellis-chaos-{seed}-{}", std::process::id())),
                true,
            ),
        };
        let password = format!("chaos-{:016x}", fastrand::u64(..));
        let mut shop = shop_app::ShopConfig::new(&data_dir);
        shop.admin = Some(("admin@chaos.local".into(), password.clone()));
        shop.seed_catalog = true;
        shop.saga = self.saga.into();
        eprintln!(
            "[chaos] scenario {} ({}), {} s at {rate}/s, seed {seed}, data in {}",
            scenario.name,
            scenario.description,
            duration.as_secs(),
            data_dir.display()
        );
        if let Some(bus) = &self.bus
            && !bus.starts_with("nats://")
        {
            bail!("--bus {bus:?}: expected nats://host:port (the embedded bus is the default)");
        }
        if let Some(db) = &self.db
            && !(db.starts_with("postgres://") || db.starts_with("postgresql://"))
        {
            bail!("--db {db:?}: expected postgres://… (SQLite files are the default)");
        }
        let remote = RemoteBackends {
            postgres: self.db.clone(),
            nats: self.bus.clone(),
            nats_server: self.nats_server.clone(),
            prefix: format!("chaos_{seed:x}_{}", std::process::id()),
        };
        let program = std::env::current_exe().context("finding the trellis executable")?;
        let target = Arc::new(
            ProcessTarget::start(shop, program, seed, remote)
                .await
                .map_err(anyhow::Error::msg)?,
        );
        eprintln!(
            "[chaos] shop up at {} (services behind fault proxies; their logs in {})",
            target.shop().gateway_url(),
            data_dir.join("chaos-children.log").display()
        );
        let config = ChaosConfig {
            scenario,
            duration,
            rate,
            seed,
            admin: ("admin@chaos.local".into(), password),
            settle_timeout: self.settle,
            progress: !self.quiet,
        };
        let result = runner::run(config, target.clone()).await;
        let target =
            Arc::try_unwrap(target).map_err(|_| anyhow::anyhow!("the target is still shared"))?;
        let passed = result.as_ref().is_ok_and(runner::ChaosReport::ok);
        target.shutdown(passed && temporary).await;
        let report = result?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.render());
        }
        if report.ok() {
            if temporary {
                let _ = std::fs::remove_dir_all(&data_dir);
            }
            Ok(())
        } else {
            bail!(
                "chaos run failed ({}); the shop's data is kept in {}",
                report.violations().join("; "),
                data_dir.display()
            )
        }
    }
}
