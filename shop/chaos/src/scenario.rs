//! Scenarios: what faults a chaos run injects, and when. A scenario is a TOML file (or one of
//! the built-ins) of explicit events and an optional random storm; [`Scenario::schedule`]
//! turns it into a seeded timeline of [`Planned`] faults.
//!
//! ```toml
//! name = "my-scenario"
//! description = "orders dies twice, payments is slow for a while"
//! duration = "3m"          # default run length (the CLI's --duration wins)
//! rate = 50                # default orders load (the CLI's --rate wins)
//!
//! [[events]]
//! at = "25%"               # a share of the run, or a time such as "40s"
//! fault = { kind = "kill", services = ["orders"] }
//!
//! [[events]]
//! at = "60s"
//! hold = "20s"             # healed after this long (network and provider faults)
//! fault = { kind = "latency", service = "payments", ms = 300, jitter_ms = 100, share = 1.0 }
//!
//! [random]                 # a storm on top (or instead) of the events
//! kills_per_minute = 4
//! double_kill_share = 0.25 # a share of kills that take two services at once
//! network_per_minute = 2
//! provider_per_minute = 1
//! ```
//!
//! Fault kinds: `kill` (`services`, or `random = N` services), `latency` (`ms`, `jitter_ms`),
//! `reset`, `blackhole`, `bandwidth` (`bytes_per_second`), `slice` (`bytes`), `partition`
//! (the service unreachable from everyone), each on the connections into `service` (or
//! `"random"`), `share` of them; and `provider` (`latency_ms`, `failure_rate`, `outage`).
//! With remote backends (`trellis chaos --db postgres://… --bus nats://…`) the network faults
//! may also name `postgres` or `nats` (the connections of every service to it go through a
//! proxy), and two more kinds apply: `nats_restart` (the NATS server stopped and started
//! again; only for a server the run started itself, `--nats-server`) and `pg_terminate`
//! (every PostgreSQL connection of the shop's databases killed with
//! `pg_terminate_backend`). `[random] backend_per_minute` spreads these over a storm.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Services a kill may take (DESIGN.md's processes, the simulator excepted: its charges live in
/// its memory, and the shop's invariants are checked against them).
pub const KILLABLE: &[&str] = &[
    "orders",
    "payments",
    "inventory",
    "shipping",
    "users",
    "gateway",
];
/// Services whose incoming connections go through a fault proxy.
pub const PROXIED: &[&str] = &[
    "users",
    "products",
    "inventory",
    "orders",
    "payments",
    "shipping",
];
/// Backends a network fault may name when the run has them remote (the services reach them
/// through a proxy).
pub const BACKEND_PROXIED: &[&str] = &["postgres", "nats"];
/// The longest run a scenario may ask for.
pub const DURATION_MAX: Duration = Duration::from_secs(24 * 3600);
/// The most events a schedule may hold.
pub const EVENTS_MAX: usize = 10_000;
/// How long a network or provider fault lasts when the event does not say.
pub const HOLD_DEFAULT: Duration = Duration::from_secs(15);

/// Why a scenario was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scenario {scenario}: {message}")]
pub struct ScenarioError {
    scenario: String,
    message: String,
}

impl ScenarioError {
    fn new(scenario: &str, message: impl Into<String>) -> Self {
        Self {
            scenario: scenario.to_owned(),
            message: message.into(),
        }
    }
}

/// A point in the run: a time from its start, or a share of its duration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum At {
    /// This long after the start.
    Time(Duration),
    /// This share (0..=1) of the run's duration.
    Share(f64),
}

impl TryFrom<String> for At {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, String> {
        let raw = raw.trim();
        if let Some(percent) = raw.strip_suffix('%') {
            let value: f64 = percent
                .trim()
                .parse()
                .map_err(|_| format!("{raw:?} is not a share such as 25%"))?;
            if !(0.0..=100.0).contains(&value) {
                return Err(format!("{raw:?} must be between 0% and 100%"));
            }
            return Ok(Self::Share(value / 100.0));
        }
        parse_duration(raw).map(Self::Time)
    }
}

impl From<At> for String {
    fn from(at: At) -> Self {
        match at {
            At::Time(d) => format!("{}ms", d.as_millis()),
            At::Share(s) => format!("{}%", s * 100.0),
        }
    }
}

impl At {
    fn resolve(self, run: Duration) -> Duration {
        match self {
            Self::Time(d) => d,
            Self::Share(s) => run.mul_f64(s),
        }
    }
}

/// A duration written as `500ms`, `30s`, `2m`, `1h` or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Span(pub Duration);

impl TryFrom<String> for Span {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, String> {
        parse_duration(&raw).map(Self)
    }
}

impl From<Span> for String {
    fn from(span: Span) -> Self {
        format!("{}ms", span.0.as_millis())
    }
}

pub use shop_load::parse_duration;

fn restart_default() -> bool {
    true
}

/// Whether `name` is a process a kill may take: one of [`KILLABLE`], or a replica of one
/// (`orders-2`; the run must have it, `trellis chaos --replicas`).
fn killable(name: &str) -> bool {
    KILLABLE.contains(&name)
        || name.rsplit_once('-').is_some_and(|(service, replica)| {
            KILLABLE.contains(&service) && replica.parse::<u32>().is_ok_and(|n| n >= 2)
        })
}

/// One fault, as a scenario writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultSpec {
    /// SIGKILL of processes (the supervisor restarts them, unless `restart = false`).
    Kill {
        /// These services (or replicas: `orders-2` with `trellis chaos --replicas`).
        #[serde(default)]
        services: Vec<String>,
        /// Or this many services picked at random from [`KILLABLE`].
        #[serde(default)]
        random: u32,
        /// Whether the supervisor restarts them (default); `false` keeps them down for the
        /// rest of the run (a replica lost for good: the others must take its work over).
        #[serde(default = "restart_default")]
        restart: bool,
    },
    /// Added latency on the connections into `service`.
    Latency {
        /// The service (or `random`).
        service: String,
        /// Fixed delay, milliseconds.
        ms: u64,
        /// Uniform extra delay up to this, milliseconds.
        #[serde(default)]
        jitter_ms: u64,
        /// Share of connections affected.
        #[serde(default = "one")]
        share: f64,
    },
    /// Connections into `service` reset.
    Reset {
        /// The service (or `random`).
        service: String,
        /// Share of connections affected.
        #[serde(default = "one")]
        share: f64,
    },
    /// Connections into `service` accepted and never answered.
    Blackhole {
        /// The service (or `random`).
        service: String,
        /// Share of connections affected.
        #[serde(default = "one")]
        share: f64,
    },
    /// Connections into `service` limited in bandwidth.
    Bandwidth {
        /// The service (or `random`).
        service: String,
        /// Bytes per second per connection.
        bytes_per_second: u64,
        /// Share of connections affected.
        #[serde(default = "one")]
        share: f64,
    },
    /// Writes into `service` cut into small pieces.
    Slice {
        /// The service (or `random`).
        service: String,
        /// The largest piece, bytes.
        bytes: usize,
        /// Share of connections affected.
        #[serde(default = "one")]
        share: f64,
    },
    /// `service` unreachable from every other process (new connections refused, open ones
    /// cut).
    Partition {
        /// The service (or `random`).
        service: String,
    },
    /// The NATS server stopped (SIGTERM) and started again (needs `--nats-server`).
    NatsRestart,
    /// Every connection to the shop's PostgreSQL databases killed (`pg_terminate_backend`;
    /// needs `--db postgres://…`).
    PgTerminate,
    /// The payment-provider simulator's settings (see its `PUT /admin/config`).
    Provider {
        /// Latency of every call, milliseconds.
        #[serde(default)]
        latency_ms: Option<u64>,
        /// Share of calls answered 503.
        #[serde(default)]
        failure_rate: Option<f64>,
        /// Every call answered 503.
        #[serde(default)]
        outage: Option<bool>,
    },
}

fn one() -> f64 {
    1.0
}

/// An event of a scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    /// When.
    pub at: At,
    /// How long a network or provider fault lasts (default [`HOLD_DEFAULT`]); kills are
    /// instantaneous.
    #[serde(default)]
    pub hold: Option<Span>,
    /// What.
    pub fault: FaultSpec,
}

/// A random storm: faults spread over the run at these rates, each at a seeded random moment
/// of its slot (so the counts are exact and the times vary with the seed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomSpec {
    /// Kill events per minute.
    #[serde(default)]
    pub kills_per_minute: f64,
    /// Share of kill events that kill two services at once.
    #[serde(default)]
    pub double_kill_share: f64,
    /// Network faults per minute (latency, reset, blackhole, bandwidth, slice, partition).
    #[serde(default)]
    pub network_per_minute: f64,
    /// Provider faults per minute (latency, failures, outage).
    #[serde(default)]
    pub provider_per_minute: f64,
    /// Backend faults per minute, when the run has remote backends: a NATS restart, a
    /// PostgreSQL connection kill, or a partition of the database or the broker (ignored
    /// on embedded backends).
    #[serde(default)]
    pub backend_per_minute: f64,
    /// The shortest and longest hold of a network or provider fault.
    #[serde(default = "hold_range")]
    pub hold: (Span, Span),
}

fn hold_range() -> (Span, Span) {
    (Span(Duration::from_secs(5)), Span(Duration::from_secs(20)))
}

/// A chaos scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// What it does, in a sentence.
    #[serde(default)]
    pub description: String,
    /// The run's length unless the CLI says otherwise.
    #[serde(default)]
    pub duration: Option<Span>,
    /// Orders load (arrivals per second) unless the CLI says otherwise.
    #[serde(default)]
    pub rate: Option<f64>,
    /// Explicit events.
    #[serde(default)]
    pub events: Vec<EventSpec>,
    /// A random storm.
    #[serde(default)]
    pub random: Option<RandomSpec>,
}

/// The built-in scenarios' names.
pub const BUILT_IN: &[&str] = &["kill-each", "partition-payments", "flaky-provider", "storm"];

impl Scenario {
    /// A built-in scenario by name.
    pub fn built_in(name: &str) -> Option<Self> {
        let at = |share: f64| At::Share(share);
        let event = |share: f64, hold: Option<u64>, fault: FaultSpec| EventSpec {
            at: at(share),
            hold: hold.map(|s| Span(Duration::from_secs(s))),
            fault,
        };
        Some(match name {
            "kill-each" => Self {
                name: name.into(),
                description: "each service SIGKILLed once under load, evenly spread".into(),
                duration: Some(Span(Duration::from_secs(180))),
                rate: Some(50.0),
                events: KILLABLE
                    .iter()
                    .enumerate()
                    .map(|(i, service)| {
                        let share = (i as f64 + 1.0) / (KILLABLE.len() as f64 + 1.0);
                        event(
                            share,
                            None,
                            FaultSpec::Kill {
                                services: vec![(*service).to_owned()],
                                random: 0,
                                restart: true,
                            },
                        )
                    })
                    .collect(),
                random: None,
            },
            "partition-payments" => Self {
                name: name.into(),
                description: "payments cut off from everyone twice, 20 s each".into(),
                duration: Some(Span(Duration::from_secs(120))),
                rate: Some(50.0),
                events: vec![
                    event(
                        0.2,
                        Some(20),
                        FaultSpec::Partition {
                            service: "payments".into(),
                        },
                    ),
                    event(
                        0.6,
                        Some(20),
                        FaultSpec::Partition {
                            service: "payments".into(),
                        },
                    ),
                ],
                random: None,
            },
            "flaky-provider" => Self {
                name: name.into(),
                description: "the payment provider slow, then failing a third of calls, then down"
                    .into(),
                duration: Some(Span(Duration::from_secs(120))),
                rate: Some(50.0),
                events: vec![
                    event(
                        0.1,
                        Some(20),
                        FaultSpec::Provider {
                            latency_ms: Some(400),
                            failure_rate: None,
                            outage: None,
                        },
                    ),
                    event(
                        0.35,
                        Some(20),
                        FaultSpec::Provider {
                            latency_ms: None,
                            failure_rate: Some(0.33),
                            outage: None,
                        },
                    ),
                    event(
                        0.6,
                        Some(15),
                        FaultSpec::Provider {
                            latency_ms: None,
                            failure_rate: None,
                            outage: Some(true),
                        },
                    ),
                ],
                random: None,
            },
            "storm" => Self {
                name: name.into(),
                description:
                    "kills (some two at once), network and provider faults, and with remote backends \
                     database and broker faults, at random"
                        .into(),
                duration: Some(Span(Duration::from_secs(600))),
                rate: Some(100.0),
                events: Vec::new(),
                random: Some(RandomSpec {
                    kills_per_minute: 4.0,
                    double_kill_share: 0.25,
                    network_per_minute: 2.5,
                    provider_per_minute: 1.0,
                    backend_per_minute: 0.6,
                    hold: hold_range(),
                }),
            },
            _ => return None,
        })
    }

    /// A built-in by name, or a TOML file by path.
    ///
    /// # Errors
    /// A [`ScenarioError`] when the name is unknown and no such file reads as a scenario.
    pub fn load(name_or_path: &str) -> Result<Self, ScenarioError> {
        if let Some(scenario) = Self::built_in(name_or_path) {
            return Ok(scenario);
        }
        let text = std::fs::read_to_string(name_or_path).map_err(|e| {
            ScenarioError::new(
                name_or_path,
                format!(
                    "not a built-in ({}) and not a readable file: {e}",
                    BUILT_IN.join(", ")
                ),
            )
        })?;
        Self::parse(name_or_path, &text)
    }

    /// Parses and checks a TOML scenario.
    ///
    /// # Errors
    /// A [`ScenarioError`] naming the problem.
    pub fn parse(origin: &str, text: &str) -> Result<Self, ScenarioError> {
        let scenario: Self =
            toml::from_str(text).map_err(|e| ScenarioError::new(origin, e.to_string()))?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks every field's range and every service name.
    ///
    /// # Errors
    /// A [`ScenarioError`] naming the problem.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |message: String| Err(ScenarioError::new(&self.name, message));
        if let Some(Span(d)) = self.duration
            && (d.is_zero() || d > DURATION_MAX)
        {
            return bad("duration must be above 0 and at most 24h".into());
        }
        if let Some(rate) = self.rate
            && !(rate > 0.0 && rate <= 10_000.0)
        {
            return bad("rate must be above 0 and at most 10000".into());
        }
        if self.events.len() > EVENTS_MAX {
            return bad(format!("at most {EVENTS_MAX} events"));
        }
        for (i, event) in self.events.iter().enumerate() {
            if let Err(message) = check_fault(&event.fault) {
                return bad(format!("event {}: {message}", i + 1));
            }
        }
        if let Some(random) = &self.random {
            for (field, value) in [
                ("kills_per_minute", random.kills_per_minute),
                ("network_per_minute", random.network_per_minute),
                ("provider_per_minute", random.provider_per_minute),
                ("backend_per_minute", random.backend_per_minute),
            ] {
                if !(0.0..=60.0).contains(&value) {
                    return bad(format!("random.{field} must be between 0 and 60"));
                }
            }
            if !(0.0..=1.0).contains(&random.double_kill_share) {
                return bad("random.double_kill_share must be between 0 and 1".into());
            }
            if random.hold.0.0 > random.hold.1.0 {
                return bad("random.hold is (shortest, longest)".into());
            }
        }
        Ok(())
    }

    /// The seeded timeline of a run of `run` length: every event resolved (shares of the run,
    /// `random` services picked) and the storm laid out, sorted by time. The same scenario,
    /// length, seed and `backends` give the same timeline. `backends` are what this run can
    /// do to its database and broker (nothing on embedded backends): a storm's backend faults
    /// are picked among them, and none are planned when there are none.
    pub fn schedule(&self, run: Duration, seed: u64, backends: &Backends) -> Vec<Planned> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut plan = Vec::new();
        for event in &self.events {
            let at = event.at.resolve(run).min(run);
            let hold = event.hold.map_or(HOLD_DEFAULT, |s| s.0);
            plan.push(resolve(&event.fault, at, hold, &mut rng));
        }
        if let Some(random) = &self.random {
            storm(random, run, &mut rng, &mut plan, backends);
        }
        plan.sort_by_key(|p| p.at);
        plan.truncate(EVENTS_MAX);
        plan
    }
}

fn check_share(share: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&share) {
        Ok(())
    } else {
        Err(format!("share {share} must be between 0 and 1"))
    }
}

fn check_service(service: &str) -> Result<(), String> {
    if service == "random" || PROXIED.contains(&service) || BACKEND_PROXIED.contains(&service) {
        Ok(())
    } else {
        Err(format!(
            "unknown service {service:?} for a network fault (one of {}, {}, or random)",
            PROXIED.join(", "),
            BACKEND_PROXIED.join(", ")
        ))
    }
}

fn check_fault(fault: &FaultSpec) -> Result<(), String> {
    match fault {
        FaultSpec::Kill {
            services, random, ..
        } => {
            if services.is_empty() && *random == 0 {
                return Err("a kill names services or a random count".into());
            }
            if *random as usize > KILLABLE.len() {
                return Err(format!("at most {} random services", KILLABLE.len()));
            }
            for service in services {
                if !killable(service) {
                    return Err(format!(
                        "cannot kill {service:?} (one of {}, or a replica such as orders-2)",
                        KILLABLE.join(", ")
                    ));
                }
            }
            Ok(())
        }
        FaultSpec::Latency {
            service,
            ms,
            jitter_ms,
            share,
        } => {
            check_service(service)?;
            check_share(*share)?;
            if *ms > 60_000 || *jitter_ms > 60_000 {
                return Err("latency is at most 60000 ms".into());
            }
            Ok(())
        }
        FaultSpec::Reset { service, share } | FaultSpec::Blackhole { service, share } => {
            check_service(service)?;
            check_share(*share)
        }
        FaultSpec::Bandwidth {
            service,
            bytes_per_second,
            share,
        } => {
            check_service(service)?;
            check_share(*share)?;
            if *bytes_per_second == 0 {
                return Err("bytes_per_second must be at least 1".into());
            }
            Ok(())
        }
        FaultSpec::Slice {
            service,
            bytes,
            share,
        } => {
            check_service(service)?;
            check_share(*share)?;
            if *bytes == 0 {
                return Err("bytes must be at least 1".into());
            }
            Ok(())
        }
        FaultSpec::Partition { service } => check_service(service),
        FaultSpec::NatsRestart | FaultSpec::PgTerminate => Ok(()),
        FaultSpec::Provider {
            latency_ms,
            failure_rate,
            outage,
        } => {
            if latency_ms.is_none() && failure_rate.is_none() && outage.is_none() {
                return Err("a provider fault sets latency_ms, failure_rate or outage".into());
            }
            if latency_ms.is_some_and(|ms| ms > 60_000) {
                return Err("provider latency is at most 60000 ms".into());
            }
            if let Some(rate) = failure_rate {
                check_share(*rate)?;
            }
            Ok(())
        }
    }
}

/// A network fault on the connections into one service.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NetFault {
    /// Added latency.
    Latency {
        /// Fixed, ms.
        ms: u64,
        /// Jitter, ms.
        jitter_ms: u64,
    },
    /// Resets.
    Reset,
    /// Accepted, never answered.
    Blackhole,
    /// Bandwidth limit.
    Bandwidth {
        /// Bytes per second.
        bytes_per_second: u64,
    },
    /// Small writes.
    Slice {
        /// Largest piece.
        bytes: usize,
    },
    /// Unreachable.
    Partition,
}

/// What a planned fault does.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// SIGKILL these services at once.
    Kill {
        /// The services.
        services: Vec<String>,
        /// Whether the supervisor restarts them (otherwise they stay down to the end).
        restart: bool,
    },
    /// A network fault into `service`, on `share` of its new connections.
    Network {
        /// The service.
        service: String,
        /// The fault.
        fault: NetFault,
        /// Share of connections.
        share: f64,
    },
    /// A fault of the database or the broker.
    Backend {
        /// Which.
        fault: BackendFault,
    },
    /// The provider's settings.
    Provider {
        /// Latency, ms.
        latency_ms: Option<u64>,
        /// Failure rate.
        failure_rate: Option<f64>,
        /// Outage.
        outage: Option<bool>,
    },
}

impl Action {
    /// `kill`, `network`, `backend` or `provider` (a network fault into `postgres` or
    /// `nats` is a `backend` fault).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kill { .. } => "kill",
            Self::Network { service, .. } if BACKEND_PROXIED.contains(&service.as_str()) => {
                "backend"
            }
            Self::Network { .. } => "network",
            Self::Backend { .. } => "backend",
            Self::Provider { .. } => "provider",
        }
    }

    /// A short description for the report.
    pub fn describe(&self) -> String {
        match self {
            Self::Kill {
                services,
                restart: true,
            } => format!("SIGKILL {}", services.join(" + ")),
            Self::Kill {
                services,
                restart: false,
            } => format!("SIGKILL {} (kept down)", services.join(" + ")),
            Self::Network {
                service,
                fault,
                share,
            } => {
                let what = match fault {
                    NetFault::Latency { ms, jitter_ms } => format!("latency {ms}±{jitter_ms} ms"),
                    NetFault::Reset => "resets".into(),
                    NetFault::Blackhole => "blackhole".into(),
                    NetFault::Bandwidth { bytes_per_second } => format!("{bytes_per_second} B/s"),
                    NetFault::Slice { bytes } => format!("writes sliced to {bytes} B"),
                    NetFault::Partition => "partition".into(),
                };
                if *share < 1.0 && !matches!(fault, NetFault::Partition) {
                    format!(
                        "{what} into {service} ({:.0}% of connections)",
                        share * 100.0
                    )
                } else {
                    format!("{what} into {service}")
                }
            }
            Self::Backend { fault } => fault.describe().to_owned(),
            Self::Provider {
                latency_ms,
                failure_rate,
                outage,
            } => {
                let mut parts = Vec::new();
                if let Some(ms) = latency_ms {
                    parts.push(format!("latency {ms} ms"));
                }
                if let Some(rate) = failure_rate {
                    parts.push(format!("{:.0}% failures", rate * 100.0));
                }
                if *outage == Some(true) {
                    parts.push("outage".into());
                }
                format!("provider {}", parts.join(", "))
            }
        }
    }
}

/// What a run can do to its database and broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backends {
    /// The backend faults it can inject.
    pub faults: Vec<BackendFault>,
    /// The backends of [`BACKEND_PROXIED`] behind a fault proxy.
    pub proxied: Vec<String>,
}

impl Backends {
    /// Whether `action` can run here: every action but a backend fault or a network fault
    /// into a backend, and those when this run has them.
    pub fn allow(&self, action: &Action) -> bool {
        match action {
            Action::Backend { fault } => self.faults.contains(fault),
            Action::Network { service, .. } if BACKEND_PROXIED.contains(&service.as_str()) => {
                self.proxied.iter().any(|p| p == service)
            }
            _ => true,
        }
    }
}

/// A fault of a remote backend that is not a network fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendFault {
    /// The NATS server stopped (SIGTERM) and started again.
    NatsRestart,
    /// Every connection to the shop's PostgreSQL databases killed.
    PgTerminate,
}

impl BackendFault {
    /// `nats_restart` or `pg_terminate`, as a scenario writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NatsRestart => "nats_restart",
            Self::PgTerminate => "pg_terminate",
        }
    }

    /// A short description for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NatsRestart => "NATS server restart",
            Self::PgTerminate => "pg_terminate_backend of every shop connection",
        }
    }
}

/// A fault at a time of the run, healed `hold` later (kills: never healed, the supervisor
/// restarts the process).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Planned {
    /// When, from the run's start.
    pub at: Duration,
    /// What.
    pub action: Action,
    /// How long until it is healed (`None` for a kill).
    pub hold: Option<Duration>,
}

fn pick<'a>(rng: &mut fastrand::Rng, from: &[&'a str]) -> &'a str {
    from[rng.usize(..from.len())]
}

fn resolve(fault: &FaultSpec, at: Duration, hold: Duration, rng: &mut fastrand::Rng) -> Planned {
    let service = |rng: &mut fastrand::Rng, s: &str| {
        if s == "random" {
            pick(rng, PROXIED).to_owned()
        } else {
            s.to_owned()
        }
    };
    let network = |rng: &mut fastrand::Rng, s: &str, fault: NetFault, share: f64| Planned {
        at,
        action: Action::Network {
            service: service(rng, s),
            fault,
            share,
        },
        hold: Some(hold),
    };
    match fault {
        FaultSpec::Kill {
            services,
            random,
            restart,
        } => {
            let mut chosen: BTreeSet<String> = services.iter().cloned().collect();
            let mut left: Vec<&str> = KILLABLE
                .iter()
                .copied()
                .filter(|s| !chosen.contains(*s))
                .collect();
            for _ in 0..*random {
                if left.is_empty() {
                    break;
                }
                let i = rng.usize(..left.len());
                chosen.insert(left.swap_remove(i).to_owned());
            }
            Planned {
                at,
                action: Action::Kill {
                    services: chosen.into_iter().collect(),
                    restart: *restart,
                },
                hold: None,
            }
        }
        FaultSpec::Latency {
            service: s,
            ms,
            jitter_ms,
            share,
        } => network(
            rng,
            s,
            NetFault::Latency {
                ms: *ms,
                jitter_ms: *jitter_ms,
            },
            *share,
        ),
        FaultSpec::Reset { service: s, share } => network(rng, s, NetFault::Reset, *share),
        FaultSpec::Blackhole { service: s, share } => network(rng, s, NetFault::Blackhole, *share),
        FaultSpec::Bandwidth {
            service: s,
            bytes_per_second,
            share,
        } => network(
            rng,
            s,
            NetFault::Bandwidth {
                bytes_per_second: *bytes_per_second,
            },
            *share,
        ),
        FaultSpec::Slice {
            service: s,
            bytes,
            share,
        } => network(rng, s, NetFault::Slice { bytes: *bytes }, *share),
        FaultSpec::Partition { service: s } => network(rng, s, NetFault::Partition, 1.0),
        FaultSpec::NatsRestart => Planned {
            at,
            action: Action::Backend {
                fault: BackendFault::NatsRestart,
            },
            hold: None,
        },
        FaultSpec::PgTerminate => Planned {
            at,
            action: Action::Backend {
                fault: BackendFault::PgTerminate,
            },
            hold: None,
        },
        FaultSpec::Provider {
            latency_ms,
            failure_rate,
            outage,
        } => Planned {
            at,
            action: Action::Provider {
                latency_ms: *latency_ms,
                failure_rate: *failure_rate,
                outage: *outage,
            },
            hold: Some(hold),
        },
    }
}

/// `count` moments spread over `[start, end)`: one per equal slot, at a random point of the
/// middle 80% of it.
fn slots(rng: &mut fastrand::Rng, count: usize, start: Duration, end: Duration) -> Vec<Duration> {
    if count == 0 || end <= start {
        return Vec::new();
    }
    let width = (end - start) / u32::try_from(count).unwrap_or(u32::MAX);
    (0..count)
        .map(|i| {
            let slot = start + width * u32::try_from(i).unwrap_or(u32::MAX);
            slot + width.mul_f64(0.1 + 0.8 * rng.f64())
        })
        .collect()
}

fn storm(
    random: &RandomSpec,
    run: Duration,
    rng: &mut fastrand::Rng,
    plan: &mut Vec<Planned>,
    backends: &Backends,
) {
    // Faults start in the first 90% of the run, so the last ones have time to heal and the
    // shop to recover before the load stops.
    let start = run.mul_f64(0.05);
    let end = run.mul_f64(0.9);
    let minutes = run.as_secs_f64() / 60.0;
    let count = |per_minute: f64| (per_minute * minutes).round() as usize;
    let hold = |rng: &mut fastrand::Rng| {
        let (low, high) = (random.hold.0.0, random.hold.1.0);
        low + (high - low).mul_f64(rng.f64())
    };
    for at in slots(rng, count(random.kills_per_minute), start, end) {
        let random_count = if rng.f64() < random.double_kill_share {
            2
        } else {
            1
        };
        plan.push(resolve(
            &FaultSpec::Kill {
                services: Vec::new(),
                random: random_count,
                restart: true,
            },
            at,
            Duration::ZERO,
            rng,
        ));
    }
    for at in slots(rng, count(random.network_per_minute), start, end) {
        let service = pick(rng, PROXIED).to_owned();
        let share = [0.5, 1.0][rng.usize(..2)];
        let fault = match rng.usize(..6) {
            0 => FaultSpec::Latency {
                service,
                ms: rng.u64(50..=500),
                jitter_ms: rng.u64(0..=200),
                share,
            },
            1 => FaultSpec::Reset { service, share },
            2 => FaultSpec::Blackhole { service, share },
            3 => FaultSpec::Bandwidth {
                service,
                bytes_per_second: rng.u64(2_000..=50_000),
                share,
            },
            4 => FaultSpec::Slice {
                service,
                bytes: rng.usize(1..=64),
                share,
            },
            _ => FaultSpec::Partition { service },
        };
        let held = hold(rng);
        plan.push(resolve(&fault, at, held, rng));
    }
    for at in slots(rng, count(random.provider_per_minute), start, end) {
        let fault = match rng.usize(..3) {
            0 => FaultSpec::Provider {
                latency_ms: Some(rng.u64(100..=1_000)),
                failure_rate: None,
                outage: None,
            },
            1 => FaultSpec::Provider {
                latency_ms: None,
                failure_rate: Some(0.2 + 0.5 * rng.f64()),
                outage: None,
            },
            _ => FaultSpec::Provider {
                latency_ms: None,
                failure_rate: None,
                outage: Some(true),
            },
        };
        let held = hold(rng);
        plan.push(resolve(&fault, at, held, rng));
    }
    // Drawn last and only when the run has remote backends, so an embedded run's timeline
    // for a seed is what it was before backend faults existed.
    let choices = backends.faults.len() + backends.proxied.len();
    if choices > 0 {
        for at in slots(rng, count(random.backend_per_minute), start, end) {
            let choice = rng.usize(..choices);
            let (fault, held) = match backends.faults.get(choice) {
                Some(BackendFault::NatsRestart) => (FaultSpec::NatsRestart, Duration::ZERO),
                Some(BackendFault::PgTerminate) => (FaultSpec::PgTerminate, Duration::ZERO),
                // A partition of the database or the broker, at most 10 s.
                None => (
                    FaultSpec::Partition {
                        service: backends.proxied[choice - backends.faults.len()].clone(),
                    },
                    hold(rng).min(Duration::from_secs(10)),
                ),
            };
            plan.push(resolve(&fault, at, held, rng));
        }
    }
}
