//! `trellis chaos`: the shop as supervised processes behind fault proxies, orders at a steady
//! rate, faults on a seeded schedule, then the invariants, checked through the API and in each
//! service's database. Exits 1 when any invariant is broken. On the embedded backends by
//! default; on PostgreSQL and NATS JetStream with `--db`, `--bus` or `--nats-server`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use shop_chaos::checks::{BusStore, CHECKED, Stores};
use shop_chaos::processes::{ProcessTarget, RemoteBackends};
use shop_chaos::running::{RunningConfig, RunningTarget};

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
    /// Target a shop that is already running at this gateway URL instead of starting one
    /// (kills need --kill-command; network faults are refused: nothing proxies its services).
    /// Its data: --data-dir (SQLite files, read only), or --database SERVICE=URL for
    /// orders, payments, shipping and inventory, and --bus/--bus-prefix.
    #[arg(long, value_name = "URL", conflicts_with_all = ["db", "nats_server"])]
    gateway: Option<String>,
    /// With --gateway: the payment-provider simulator (its counters are checked against the
    /// confirmed orders; give it only when it ran as long as the databases held orders).
    #[arg(long, value_name = "URL", requires = "gateway")]
    provider: Option<String>,
    /// With --gateway: one service's database, SERVICE=URL (repeat for orders, payments,
    /// shipping and inventory; the others default to --data-dir's files).
    #[arg(long, value_name = "SERVICE=URL", requires = "gateway")]
    database: Vec<String>,
    /// With --gateway and --bus nats://: the shop's stream prefix.
    #[arg(long, default_value = "shop", requires = "gateway")]
    bus_prefix: String,
    /// With --gateway: the command that SIGKILLs one service, `{service}` replaced by its
    /// name, run with `sh -c` (e.g. `pkill -KILL -f "trellis serve {service} "`); the
    /// shop's own supervisor must restart it.
    #[arg(long, value_name = "COMMAND", requires = "gateway")]
    kill_command: Option<String>,
    /// With --gateway: the admin's email.
    #[arg(long, env = "TRELLIS_ADMIN_EMAIL")]
    admin_email: Option<String>,
    /// With --gateway: the admin's password.
    #[arg(long, env = "TRELLIS_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// With --db: more than one process of some services, as SERVICE=N[,SERVICE=N...]
    /// (e.g. orders=2,payments=2); a scenario's kill may then name a replica (`orders-2`),
    /// with `restart = false` to keep it down.
    #[arg(long, value_parser = crate::shop::parse_replicas, requires = "db")]
    replicas: Option<std::collections::BTreeMap<String, usize>>,
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
        if let Some(bus) = &self.bus
            && !bus.starts_with("nats://")
        {
            bail!("--bus {bus:?}: expected nats://host:port (the embedded bus is the default)");
        }
        if self.gateway.is_some() {
            return self
                .run_against_running(scenario, duration, rate, seed)
                .await;
        }
        let (data_dir, temporary) = match self.data_dir.clone() {
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
        if let Some(db) = &self.db
            && !(db.starts_with("postgres://") || db.starts_with("postgresql://"))
        {
            bail!("--db {db:?}: expected postgres://… (SQLite files are the default)");
        }
        let remote = RemoteBackends {
            postgres: self.db.clone(),
            nats: self.bus.clone(),
            nats_server: self.nats_server.clone(),
            replicas: self.replicas.clone().unwrap_or_default(),
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
        // Ctrl-C stops the run: the shop's processes are stopped and its data kept.
        let result = tokio::select! {
            result = runner::run(config, target.clone()) => Some(result),
            _ = tokio::signal::ctrl_c() => None,
        };
        let target =
            Arc::try_unwrap(target).map_err(|_| anyhow::anyhow!("the target is still shared"))?;
        let Some(result) = result else {
            eprintln!("\n[chaos] interrupted: stopping the shop");
            target.shutdown(false).await;
            bail!(
                "interrupted; the shop's data is kept in {}",
                data_dir.display()
            );
        };
        let passed = result.as_ref().is_ok_and(runner::ChaosReport::ok);
        target.shutdown(passed && temporary).await;
        self.finish(result?, temporary.then_some(&data_dir))
    }

    /// `trellis chaos --gateway URL`: a shop someone else runs.
    async fn run_against_running(
        &self,
        scenario: Scenario,
        duration: Duration,
        rate: f64,
        seed: u64,
    ) -> anyhow::Result<()> {
        let gateway = self.gateway.clone().unwrap_or_default();
        let (Some(email), Some(password)) = (self.admin_email.clone(), self.admin_password.clone())
        else {
            bail!(
                "--gateway needs the admin's login: --admin-email and --admin-password (or \
                 TRELLIS_ADMIN_EMAIL and TRELLIS_ADMIN_PASSWORD)"
            );
        };
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("trellis-data"));
        let mut stores = Stores::embedded(&data_dir);
        for pair in &self.database {
            let Some((service, url)) = pair.split_once('=') else {
                bail!("--database {pair:?}: expected SERVICE=URL");
            };
            if !CHECKED.contains(&service) {
                bail!(
                    "--database {pair:?}: the checks read {} only",
                    CHECKED.join(", ")
                );
            }
            stores.databases.insert(service.to_owned(), url.to_owned());
        }
        if let Some(bus) = &self.bus {
            stores.bus = BusStore::Nats {
                url: bus.clone(),
                prefix: self.bus_prefix.clone(),
            };
        }
        eprintln!(
            "[chaos] scenario {} ({}), {} s at {rate}/s, seed {seed}, against the shop at {gateway}",
            scenario.name,
            scenario.description,
            duration.as_secs()
        );
        let target = Arc::new(RunningTarget::new(RunningConfig {
            gateway,
            provider: self.provider.clone(),
            stores,
            kill_command: self.kill_command.clone(),
        }));
        let config = ChaosConfig {
            scenario,
            duration,
            rate,
            seed,
            admin: (email, password),
            settle_timeout: self.settle,
            progress: !self.quiet,
        };
        let report = tokio::select! {
            result = runner::run(config, target) => result?,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        };
        self.finish(report, None)
    }

    /// Prints the report; an error when an invariant broke. `temporary`: the data directory
    /// to remove after a run that passed.
    fn finish(
        &self,
        report: runner::ChaosReport,
        temporary: Option<&PathBuf>,
    ) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.render());
        }
        if report.ok() {
            if let Some(dir) = temporary {
                let _ = std::fs::remove_dir_all(dir);
            }
            Ok(())
        } else {
            bail!(
                "chaos run failed ({}){}",
                report.violations().join("; "),
                temporary
                    .map(|dir| format!("; the shop's data is kept in {}", dir.display()))
                    .unwrap_or_default()
            )
        }
    }
}
