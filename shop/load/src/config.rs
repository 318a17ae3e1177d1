//! What a load run does: [`LoadConfig`] and the operation [`Mix`].

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::LoadError;

/// Highest arrival rate, in arrivals per second.
pub const RATE_MAX: f64 = 100_000.0;
/// Longest run.
pub const DURATION_MAX: Duration = Duration::from_secs(24 * 3600);
/// Most arrivals one run may schedule (`rate × duration`).
pub const ARRIVALS_MAX: u64 = 50_000_000;
/// Most customers one run registers.
pub const USERS_MAX: usize = 10_000;
/// Highest `max_in_flight`.
pub const IN_FLIGHT_MAX: usize = 100_000;
/// Longest settle wait.
pub const SETTLE_TIMEOUT_MAX: Duration = Duration::from_secs(3600);
/// Longest per-request timeout.
pub const REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(300);

/// Default number of customers.
pub const USERS_DEFAULT: usize = 20;
/// Default cap on requests in flight.
pub const IN_FLIGHT_DEFAULT: usize = 1024;
/// Default wait for placed orders to leave `PENDING` after the run.
pub const SETTLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Default per-request timeout.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// One operation the generator performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// `GET /api/products?limit=20` (sometimes with `cursor` or `q`).
    Browse,
    /// `POST /api/orders` with a fresh `Idempotency-Key`.
    Order,
    /// `GET /api/orders/{id}` of one of the caller's earlier orders.
    Check,
}

impl Op {
    /// Every operation, in report order.
    pub const ALL: [Op; 3] = [Op::Browse, Op::Order, Op::Check];

    /// `browse`, `order` or `check`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Browse => "browse",
            Op::Order => "order",
            Op::Check => "check",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Op::Browse => 0,
            Op::Order => 1,
            Op::Check => 2,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Relative weights of the operations; each arrival picks one with probability
/// `weight / sum`. Default 30/40/30.
///
/// Parses from `"30/40/30"` (browse/order/check) or `"browse=30,order=40,check=30"`
/// (names left out weigh 0).
///
/// ```
/// let mix: shop_load::Mix = "browse=1,order=3".parse().unwrap();
/// assert_eq!((mix.browse, mix.order, mix.check), (1, 3, 0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Weight of browsing the catalogue.
    pub browse: u32,
    /// Weight of placing an order.
    pub order: u32,
    /// Weight of checking an earlier order.
    pub check: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            browse: 30,
            order: 40,
            check: 30,
        }
    }
}

impl Mix {
    /// Sum of the weights.
    pub fn total(&self) -> u64 {
        u64::from(self.browse) + u64::from(self.order) + u64::from(self.check)
    }

    /// The operation a uniform draw `roll` in `0..total()` selects.
    pub(crate) fn pick(&self, roll: u64) -> Op {
        if roll < u64::from(self.browse) {
            Op::Browse
        } else if roll < u64::from(self.browse) + u64::from(self.order) {
            Op::Order
        } else {
            Op::Check
        }
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "browse={},order={},check={}",
            self.browse, self.order, self.check
        )
    }
}

impl FromStr for Mix {
    type Err = LoadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| LoadError::Config(format!("mix {s:?}: {why}"));
        let weight = |w: &str| {
            w.trim()
                .parse::<u32>()
                .map_err(|_| bad(format!("{w:?} is not a whole number")))
        };
        let mix = if s.contains('=') {
            let mut mix = Mix {
                browse: 0,
                order: 0,
                check: 0,
            };
            for part in s.split(',') {
                let (name, w) = part
                    .split_once('=')
                    .ok_or_else(|| bad(format!("{part:?} is not name=weight")))?;
                let slot = match name.trim() {
                    "browse" => &mut mix.browse,
                    "order" => &mut mix.order,
                    "check" => &mut mix.check,
                    other => {
                        return Err(bad(format!(
                            "unknown operation {other:?} (browse, order, check)"
                        )));
                    }
                };
                *slot = weight(w)?;
            }
            mix
        } else {
            let parts: Vec<&str> = s.split('/').collect();
            let [b, o, c] = parts.as_slice() else {
                return Err(bad(
                    "expected browse/order/check weights such as 30/40/30".into()
                ));
            };
            Mix {
                browse: weight(b)?,
                order: weight(o)?,
                check: weight(c)?,
            }
        };
        if mix.total() == 0 {
            return Err(bad("the weights sum to 0".into()));
        }
        Ok(mix)
    }
}

/// What a load run does. Build with [`LoadConfig::new`] and adjust the public fields.
#[derive(Clone)]
pub struct LoadConfig {
    /// The gateway's base URL, e.g. `http://127.0.0.1:8080` (plain HTTP).
    pub target: String,
    /// Arrivals per second (constant, open model).
    pub rate: f64,
    /// How long arrivals are scheduled for.
    pub duration: Duration,
    /// Customers registered for the run.
    pub users: usize,
    /// Operation weights.
    pub mix: Mix,
    /// Admin login for the invariant checks; without it only "every order is terminal" is checked.
    pub admin_email: Option<String>,
    /// The admin's password.
    pub admin_password: Option<String>,
    /// Most requests in flight; an arrival beyond it is an `overloaded` error, not queued.
    pub max_in_flight: usize,
    /// How long to wait after the run for placed orders to leave `PENDING`.
    pub settle_timeout: Duration,
    /// Per-request timeout (whole request, body included).
    pub request_timeout: Duration,
    /// Draw a live progress bar on stderr.
    pub progress: bool,
    /// Seed of the random choices (operation, user, product); `None` picks one, and the report
    /// shows it so a run can be repeated.
    pub seed: Option<u64>,
}

impl fmt::Debug for LoadConfig {
    // The admin password stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadConfig")
            .field("target", &self.target)
            .field("rate", &self.rate)
            .field("duration", &self.duration)
            .field("users", &self.users)
            .field("mix", &self.mix)
            .field("admin_email", &self.admin_email)
            .field(
                "admin_password",
                &self.admin_password.as_ref().map(|_| "<redacted>"),
            )
            .field("max_in_flight", &self.max_in_flight)
            .field("settle_timeout", &self.settle_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("progress", &self.progress)
            .field("seed", &self.seed)
            .finish()
    }
}

impl Default for LoadConfig {
    /// The local gateway (`http://127.0.0.1:8080`) at 50 arrivals per second for 10 s.
    fn default() -> Self {
        Self::new(
            format!("http://127.0.0.1:{}", shop_contracts::ports::GATEWAY),
            50.0,
            Duration::from_secs(10),
        )
    }
}

impl LoadConfig {
    /// A run against `target` at `rate` arrivals per second for `duration`, with defaults for
    /// the rest: 20 users, mix 30/40/30, no admin, 1,024 in flight, 30 s settle, 10 s request
    /// timeout, no progress bar.
    pub fn new(target: impl Into<String>, rate: f64, duration: Duration) -> Self {
        Self {
            target: target.into(),
            rate,
            duration,
            users: USERS_DEFAULT,
            mix: Mix::default(),
            admin_email: None,
            admin_password: None,
            max_in_flight: IN_FLIGHT_DEFAULT,
            settle_timeout: SETTLE_TIMEOUT_DEFAULT,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            progress: false,
            seed: None,
        }
    }

    /// Sets the admin login used for the invariant checks.
    #[must_use]
    pub fn with_admin(mut self, email: impl Into<String>, password: impl Into<String>) -> Self {
        self.admin_email = Some(email.into());
        self.admin_password = Some(password.into());
        self
    }

    /// How many arrivals the run schedules: those due strictly before `duration`.
    pub fn arrivals(&self) -> u64 {
        arrivals(self.rate, self.duration)
    }

    /// Checks every field; the error names the first problem.
    ///
    /// # Errors
    /// [`LoadError::Config`] naming the bad field.
    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |why: String| Err(LoadError::Config(why));
        self.base_url()?;
        if !self.rate.is_finite() || self.rate <= 0.0 || self.rate > RATE_MAX {
            return bad(format!(
                "rate must be above 0 and at most {RATE_MAX} per second, not {}",
                self.rate
            ));
        }
        if self.duration.is_zero() || self.duration > DURATION_MAX {
            return bad(format!(
                "duration must be above 0 and at most {} s, not {:?}",
                DURATION_MAX.as_secs(),
                self.duration
            ));
        }
        if self.arrivals() > ARRIVALS_MAX {
            return bad(format!(
                "rate × duration schedules {} arrivals; at most {ARRIVALS_MAX}",
                self.arrivals()
            ));
        }
        if self.users == 0 || self.users > USERS_MAX {
            return bad(format!(
                "users must be 1 to {USERS_MAX}, not {}",
                self.users
            ));
        }
        if self.mix.total() == 0 {
            return bad("mix weights sum to 0".into());
        }
        if self.max_in_flight == 0 || self.max_in_flight > IN_FLIGHT_MAX {
            return bad(format!(
                "max_in_flight must be 1 to {IN_FLIGHT_MAX}, not {}",
                self.max_in_flight
            ));
        }
        if self.settle_timeout > SETTLE_TIMEOUT_MAX {
            return bad(format!(
                "settle_timeout must be at most {} s",
                SETTLE_TIMEOUT_MAX.as_secs()
            ));
        }
        if self.request_timeout.is_zero() || self.request_timeout > REQUEST_TIMEOUT_MAX {
            return bad(format!(
                "request_timeout must be above 0 and at most {} s",
                REQUEST_TIMEOUT_MAX.as_secs()
            ));
        }
        match (&self.admin_email, &self.admin_password) {
            (Some(_), None) => return bad("admin_email given without admin_password".into()),
            (None, Some(_)) => return bad("admin_password given without admin_email".into()),
            _ => {}
        }
        Ok(())
    }

    /// The target as a base URL without a trailing slash.
    pub(crate) fn base_url(&self) -> Result<String, LoadError> {
        let url = reqwest::Url::parse(self.target.trim()).map_err(|e| {
            LoadError::Config(format!(
                "target {:?} is not a URL ({e}); expected e.g. http://127.0.0.1:8080",
                self.target
            ))
        })?;
        if url.scheme() != "http" {
            return Err(LoadError::Config(format!(
                "target {:?}: only http:// is supported (the gateway's plain listener)",
                self.target
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(LoadError::Config(format!(
                "target {:?} must not have a query or fragment",
                self.target
            )));
        }
        Ok(url.as_str().trim_end_matches('/').to_owned())
    }
}

/// Arrivals due strictly before `duration` at `rate`: arrival `i` is due at `i / rate`.
pub(crate) fn arrivals(rate: f64, duration: Duration) -> u64 {
    if !rate.is_finite() || rate <= 0.0 {
        return 0;
    }
    // A tiny epsilon keeps 50.000000001 (float noise) from scheduling a 51st arrival.
    let n = (rate * duration.as_secs_f64() - 1e-9).ceil();
    if n <= 0.0 {
        0
    } else if n >= u64::MAX as f64 {
        u64::MAX
    } else {
        n as u64
    }
}

/// When arrival `i` is due, counted from the start.
pub(crate) fn due_offset(i: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(i as f64 / rate)
}

/// Parses a duration written `500ms`, `30s`, `2m`, `1h` or as a bare number of seconds, from 0
/// to [`DURATION_MAX`] (what `trellis load` and `trellis chaos` take on their command lines;
/// a caller that needs more than zero checks that itself).
///
/// # Errors
/// A message naming the problem.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// assert_eq!(shop_load::parse_duration("2m"), Ok(Duration::from_secs(120)));
/// assert_eq!(shop_load::parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert!(shop_load::parse_duration("3 weeks").is_err());
/// ```
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration such as 30s, 2m or 500ms"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {raw:?}: use ms, s, m or h"
            ));
        }
    };
    if !seconds.is_finite() || !(0.0..=DURATION_MAX.as_secs_f64()).contains(&seconds) {
        return Err(format!("{raw:?} must be between 0 and 24h"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_are_those_due_before_the_end() {
        assert_eq!(arrivals(50.0, Duration::from_secs(1)), 50);
        assert_eq!(arrivals(2.5, Duration::from_secs(1)), 3);
        assert_eq!(arrivals(0.1, Duration::from_secs(1)), 1);
        assert_eq!(arrivals(100.0, Duration::from_millis(1500)), 150);
        assert_eq!(arrivals(1.0 / 3.0, Duration::from_secs(3)), 1);
        assert_eq!(due_offset(25, 50.0), Duration::from_millis(500));
    }

    #[test]
    fn mix_parses_both_forms_and_refuses_nonsense() {
        assert_eq!("30/40/30".parse::<Mix>().unwrap(), Mix::default());
        assert_eq!(
            "check=2, browse=1".parse::<Mix>().unwrap(),
            Mix {
                browse: 1,
                order: 0,
                check: 2
            }
        );
        assert!("0/0/0".parse::<Mix>().is_err());
        assert!("1/2".parse::<Mix>().is_err());
        assert!("buy=3".parse::<Mix>().is_err());
        assert!("a/b/c".parse::<Mix>().is_err());
    }

    #[test]
    fn mix_pick_follows_the_weights() {
        let mix = Mix {
            browse: 1,
            order: 2,
            check: 1,
        };
        let picks: Vec<Op> = (0..mix.total()).map(|r| mix.pick(r)).collect();
        assert_eq!(picks, [Op::Browse, Op::Order, Op::Order, Op::Check]);
    }

    #[test]
    fn the_default_drives_the_local_gateway() {
        let config = LoadConfig::default();
        assert_eq!(config.target, "http://127.0.0.1:8080");
        assert_eq!((config.users, config.max_in_flight), (20, 1024));
        assert_eq!(config.mix, Mix::default());
        assert!(config.validate().is_ok());
    }

    #[test]
    fn validation_names_the_bad_field() {
        let ok = LoadConfig::new("http://127.0.0.1:8080/", 10.0, Duration::from_secs(1));
        assert!(ok.validate().is_ok());
        assert_eq!(ok.base_url().unwrap(), "http://127.0.0.1:8080");
        let err = |c: LoadConfig| c.validate().unwrap_err().to_string();
        assert!(
            err(LoadConfig {
                rate: 0.0,
                ..ok.clone()
            })
            .contains("rate")
        );
        assert!(
            err(LoadConfig {
                rate: f64::NAN,
                ..ok.clone()
            })
            .contains("rate")
        );
        assert!(
            err(LoadConfig {
                users: 0,
                ..ok.clone()
            })
            .contains("users")
        );
        assert!(
            err(LoadConfig {
                max_in_flight: 0,
                ..ok.clone()
            })
            .contains("max_in_flight")
        );
        assert!(
            err(LoadConfig {
                duration: Duration::ZERO,
                ..ok.clone()
            })
            .contains("duration")
        );
        assert!(
            err(LoadConfig {
                target: "nope".into(),
                ..ok.clone()
            })
            .contains("target")
        );
        assert!(
            err(LoadConfig {
                target: "https://x".into(),
                ..ok.clone()
            })
            .contains("http://")
        );
        assert!(
            err(LoadConfig {
                rate: RATE_MAX,
                duration: DURATION_MAX,
                ..ok.clone()
            })
            .contains("arrivals")
        );
        let half_admin = LoadConfig {
            admin_email: Some("a@b".into()),
            ..ok.clone()
        };
        assert!(err(half_admin).contains("admin_password"));
    }
}
