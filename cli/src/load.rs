//! `trellis load`: drives the shop's public API at a constant arrival rate and reports.

use std::time::Duration;

use anyhow::{Context, bail};
use shop_load::{LoadConfig, Mix};

/// Settings of `trellis load`.
#[derive(Debug, clap::Args)]
pub(crate) struct LoadArgs {
    /// The gateway's URL.
    #[arg(long, env = "TRELLIS_TARGET", default_value = "http://127.0.0.1:8080")]
    target: String,
    /// Arrivals per second (open model: requests are sent on schedule, whether or not
    /// earlier ones answered).
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// How long to send, such as 30s, 2m or 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Customers registered for the run.
    #[arg(long, default_value_t = 20)]
    users: usize,
    /// Operation weights browse/order/check, such as 30/40/30 or order=1.
    #[arg(long, default_value = "30/40/30")]
    mix: Mix,
    /// Admin email, for the invariant checks.
    #[arg(long, env = "TRELLIS_ADMIN_EMAIL")]
    admin_email: Option<String>,
    /// Admin password, for the invariant checks.
    #[arg(long, env = "TRELLIS_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// Most requests in flight; arrivals beyond it count as `overloaded` errors.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// How long to wait for placed orders to end after the run.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    settle_timeout: Duration,
    /// Seed of the random choices, to repeat a run.
    #[arg(long)]
    seed: Option<u64>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// No live progress bar.
    #[arg(long)]
    quiet: bool,
}

/// A duration above zero (see [`shop_load::parse_duration`]).
pub(crate) fn parse_duration(raw: &str) -> Result<Duration, String> {
    let duration = shop_load::parse_duration(raw)?;
    if duration.is_zero() {
        return Err(format!("{:?} must be above 0", raw.trim()));
    }
    Ok(duration)
}

impl LoadArgs {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let mut config = LoadConfig::new(self.target.clone(), self.rate, self.duration);
        config.users = self.users;
        config.mix = self.mix;
        config.max_in_flight = self.max_in_flight;
        config.settle_timeout = self.settle_timeout;
        config.seed = self.seed;
        config.progress = !self.quiet && !self.json;
        match (self.admin_email, self.admin_password) {
            (Some(email), Some(password)) => config = config.with_admin(email, password),
            (None, None) => eprintln!(
                "note: without --admin-email/--admin-password only \"every order ends\" is checked"
            ),
            _ => bail!("give both --admin-email and --admin-password, or neither"),
        }
        let report = shop_load::run(config)
            .await
            .with_context(|| format!("load against {}", self.target))?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report.to_json())?);
        } else {
            println!("{}", report.render());
        }
        if !report.ok() {
            bail!("the run had errors or broken invariants (see the report)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("").is_err());
    }
}
