//! A shop that is already running, given by its URLs: the [`Target`] `trellis chaos --gateway
//! URL` tortures. Nothing here started the shop, so what the run can do is what the operator
//! hands it:
//!
//! - kills run the operator's command ([`RunningConfig::kill_command`], `{service}` replaced
//!   by the service's name, through `sh -c`), e.g. `pkill -KILL -f "trellis serve {service} "`
//!   for a shop under `trellis up --processes` or `systemctl kill -s KILL trellis-{service}`
//!   under systemd; whatever supervises the shop restarts it. The run cannot see the restart,
//!   so the time to recover is measured from the kill to the first probe order that confirms,
//!   and "back up" is not reported;
//! - provider faults go through the gateway's admin API, as on every target;
//! - `pg_terminate` works when the checked databases are on PostgreSQL (it kills the
//!   connections of those databases);
//! - network faults need a proxy in front of each service, which a running shop does not
//!   have: a scenario with one is refused before the run starts.
//!
//! The checks read the databases where [`RunningConfig::stores`] says they are (read-only),
//! and the provider's counters only when its URL is given: they cover the simulator's life,
//! so give it only when the simulator has run as long as the databases have held orders.
//!
//! The run changes the shop as the process target does: every catalogue product's stock is
//! set to [`crate::runner::RESTOCK_TOTAL`], and a probe customer and product are created.

use std::time::Duration;

use tokio::time::Instant;

use crate::checks::Stores;
use crate::runner::{BoxFuture, Target};
use crate::scenario::{Action, BackendFault, Backends, KILLABLE};

/// The longest a kill command may run.
pub const KILL_COMMAND_MAX: Duration = Duration::from_secs(30);

/// A running shop.
#[derive(Debug, Clone)]
pub struct RunningConfig {
    /// The gateway's base URL.
    pub gateway: String,
    /// The payment-provider simulator's base URL (its public `/v1/stats`), when its counters
    /// cover the databases' history.
    pub provider: Option<String>,
    /// Where the services keep their data.
    pub stores: Stores,
    /// The command that SIGKILLs one service (`{service}` is replaced by its name).
    pub kill_command: Option<String>,
}

/// The [`Target`] of a running shop.
#[derive(Debug)]
pub struct RunningTarget {
    config: RunningConfig,
    postgres: Vec<String>,
}

impl RunningTarget {
    /// A target for the shop `config` describes.
    pub fn new(config: RunningConfig) -> Self {
        let postgres = config
            .stores
            .databases
            .values()
            .filter(|url| url.starts_with("postgres://") || url.starts_with("postgresql://"))
            .cloned()
            .collect();
        Self { config, postgres }
    }
}

/// Runs `template` with `{service}` replaced, through `sh -c`, within [`KILL_COMMAND_MAX`].
async fn run_kill_command(template: &str, service: &str) -> Result<(), String> {
    let command = template.replace("{service}", service);
    let run = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(KILL_COMMAND_MAX, run)
        .await
        .map_err(|_| format!("`{command}` did not finish within {KILL_COMMAND_MAX:?}"))?
        .map_err(|e| format!("`{command}`: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{command}` exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

impl Target for RunningTarget {
    fn gateway_url(&self) -> String {
        self.config.gateway.clone()
    }

    fn provider_url(&self) -> String {
        self.config.provider.clone().unwrap_or_default()
    }

    fn stores(&self) -> Stores {
        self.config.stores.clone()
    }

    fn backends(&self) -> Backends {
        Backends {
            faults: if self.postgres.is_empty() {
                Vec::new()
            } else {
                vec![BackendFault::PgTerminate]
            },
            proxied: Vec::new(),
        }
    }

    fn supports(&self, action: &Action) -> Result<(), String> {
        match action {
            Action::Kill { restart: false, .. } => Err(
                "keeping a process down needs a shop started by `trellis chaos` (its own \
                 supervisor)"
                    .into(),
            ),
            Action::Kill { services, .. } => {
                if self.config.kill_command.is_none() {
                    return Err("killing a service of a running shop needs --kill-command".into());
                }
                match services.iter().find(|s| !KILLABLE.contains(&s.as_str())) {
                    Some(unknown) => Err(format!("{unknown} cannot be killed")),
                    None => Ok(()),
                }
            }
            Action::Network { .. } => Err(
                "network faults need a fault proxy in front of each service, which only a shop \
                 started by `trellis chaos` has"
                    .into(),
            ),
            Action::Backend { fault } => {
                if self.backends().faults.contains(fault) {
                    Ok(())
                } else {
                    Err(format!(
                        "{} is not possible here (pg_terminate needs the databases on \
                         PostgreSQL; nats_restart needs --nats-server)",
                        fault.as_str()
                    ))
                }
            }
            Action::Provider { .. } => Ok(()),
        }
    }

    fn kill(&self, service: &str) -> Result<BoxFuture<'static, Option<Instant>>, String> {
        let template = self
            .config
            .kill_command
            .clone()
            .ok_or("no --kill-command")?;
        let service = service.to_owned();
        // The command runs in the background; the restart is the operator's supervisor's,
        // and invisible here: "back" is when the command finished.
        Ok(Box::pin(async move {
            run_kill_command(&template, &service)
                .await
                .ok()
                .map(|()| Instant::now())
        }))
    }

    fn network(
        &self,
        service: &str,
        _fault: Option<(&crate::scenario::NetFault, f64)>,
    ) -> Result<(), String> {
        Err(format!(
            "no fault proxy in front of {service} in a running shop"
        ))
    }

    fn backend(
        &self,
        fault: BackendFault,
    ) -> BoxFuture<'_, Result<BoxFuture<'static, Option<Instant>>, String>> {
        Box::pin(async move {
            match fault {
                BackendFault::PgTerminate => {
                    for url in &self.postgres {
                        let database = url
                            .split_once("://")
                            .and_then(|(_, rest)| rest.split_once('/'))
                            .map(|(_, path)| path.split('?').next().unwrap_or_default())
                            .unwrap_or_default()
                            .to_owned();
                        crate::processes::pg_terminate(url, &[database]).await?;
                    }
                    let done = Instant::now();
                    let back: BoxFuture<'static, Option<Instant>> =
                        Box::pin(async move { Some(done) });
                    Ok(back)
                }
                BackendFault::NatsRestart => {
                    Err("a running shop's NATS server is not this run's to restart".into())
                }
            }
        })
    }

    fn provider_intact(&self) -> bool {
        self.config.provider.is_some()
    }
}
