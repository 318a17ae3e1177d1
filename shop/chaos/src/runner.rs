//! The chaos run: load at a steady rate, faults on the schedule, heal, settle, check, report.
//!
//! The runner acts on the shop through a [`Target`] (kill a process, set a network fault into
//! a service); [`crate::processes`] implements it for the shop started as supervised processes
//! behind fault proxies. Provider faults go through the gateway's admin API
//! (`PUT /api/admin/provider`), as an operator would set them.
//!
//! Recovery after a kill is measured from the outside: from the kill, a probe customer places
//! an order every 250 ms; the time to recover is the time until the first probe order that
//! ends `CONFIRMED` was placed (bounded by [`RECOVERY_MAX`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::checks::{self, DbReport, ProviderStats, Stores};
use crate::scenario::{Action, BackendFault, Backends, NetFault, Planned, Scenario};

/// The longest a recovery is waited for after a kill.
pub const RECOVERY_MAX: Duration = Duration::from_secs(60);
/// How often the probe places an order while it waits for a recovery.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// The longest the run waits for the shop to answer before the load starts.
pub const READY_MAX: Duration = Duration::from_secs(60);

/// A boxed future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the runner needs from the shop it tortures.
pub trait Target: Send + Sync {
    /// The gateway's base URL.
    fn gateway_url(&self) -> String;
    /// The payment-provider simulator's base URL (its public `/v1/stats`).
    fn provider_url(&self) -> String;
    /// Where the services' databases and the bus keep their data (what the checks read).
    fn stores(&self) -> Stores;
    /// What this target can do to its database and broker (nothing on embedded backends).
    fn backends(&self) -> Backends {
        Backends::default()
    }
    /// Whether this target can inject `action`; a run whose schedule holds one it cannot is
    /// refused before it starts, with this message.
    ///
    /// # Errors
    /// Why the action cannot be injected here.
    fn supports(&self, action: &Action) -> Result<(), String> {
        if self.backends().allow(action) {
            Ok(())
        } else {
            Err(
                "a network fault into postgres or nats or a pg_terminate needs --db \
                 postgres:// or --bus nats://, a nats_restart needs --nats-server"
                    .to_owned(),
            )
        }
    }
    /// Injects a backend fault (answers once it is injected: connections killed, the server
    /// stopped and started); the future it gives answers when the backend serves again
    /// (`None`: not within [`RECOVERY_MAX`]).
    ///
    /// # Errors
    /// A message when the fault could not be injected (or this target has no such backend).
    fn backend(
        &self,
        fault: BackendFault,
    ) -> BoxFuture<'_, Result<BoxFuture<'static, Option<Instant>>, String>> {
        Box::pin(async move { Err(format!("this shop has no backend for {}", fault.as_str())) })
    }
    /// SIGKILLs one service's process (its supervisor restarts it); the future answers when a
    /// new process of it started (`None`: not within [`RECOVERY_MAX`]).
    ///
    /// # Errors
    /// A message when the process could not be signalled.
    fn kill(&self, service: &str) -> Result<BoxFuture<'static, Option<Instant>>, String>;
    /// SIGKILLs one process and keeps it down for the rest of the run (a replica lost for
    /// good); answers once it is down.
    ///
    /// # Errors
    /// A message when this target cannot hold a process down, or the process could not be
    /// signalled.
    fn stop(&self, service: &str) -> BoxFuture<'_, Result<(), String>> {
        let service = service.to_owned();
        Box::pin(async move { Err(format!("this shop cannot keep {service} down")) })
    }
    /// Sets (or clears, with `None`) the network fault on connections into `service`.
    ///
    /// # Errors
    /// A message when the fault could not be set.
    fn network(&self, service: &str, fault: Option<(&NetFault, f64)>) -> Result<(), String>;
    /// Whether the payment-provider simulator ran without a restart since the run began (its
    /// counters then cover the run).
    fn provider_intact(&self) -> bool;
}

/// A chaos run's settings.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// The scenario.
    pub scenario: Scenario,
    /// How long faults and load go on.
    pub duration: Duration,
    /// Orders load, arrivals per second.
    pub rate: f64,
    /// Seed of the schedule and of the load's choices.
    pub seed: u64,
    /// The admin's login (invariant checks through the API, provider faults).
    pub admin: (String, String),
    /// How long to wait after the load for every order to end (through the API), and then
    /// for the databases to agree. A compensation may retry for minutes
    /// (`shop_orders::saga::MUST_FINISH_ATTEMPTS`), so give it five.
    pub settle_timeout: Duration,
    /// Print a live progress line on stderr.
    pub progress: bool,
}

/// One injected fault, as it happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultRecord {
    /// Seconds from the run's start when it was injected.
    pub at_s: f64,
    /// What (`SIGKILL orders`, `partition into payments`, …).
    pub what: String,
    /// `kill`, `network`, `backend` or `provider`.
    pub kind: String,
    /// Seconds from the run's start when it was healed (network and provider faults).
    pub healed_s: Option<f64>,
    /// For a kill or a backend restart or connection kill: seconds until the first order
    /// placed after the killed processes (or the backend) ran again was accepted (it then
    /// ended `CONFIRMED`); `None`: not within [`RECOVERY_MAX`].
    pub recovered_after_s: Option<f64>,
    /// For a kill or a backend restart: seconds until every killed process (or the backend)
    /// ran again.
    pub restarted_after_s: Option<f64>,
    /// Whether the recovery after it is measured (kills, NATS restarts, PostgreSQL
    /// connection kills).
    pub measured: bool,
    /// Why it could not be injected, if it could not.
    pub error: Option<String>,
}

/// A chaos run's report.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// The scenario.
    pub scenario: String,
    /// The seed (pass `--seed` to run the same schedule again).
    pub seed: u64,
    /// The run's length, seconds.
    pub duration_s: f64,
    /// Every fault, in order.
    pub faults: Vec<FaultRecord>,
    /// Processes killed.
    pub kills: u64,
    /// Network faults injected.
    pub network_faults: u64,
    /// Provider faults injected.
    pub provider_faults: u64,
    /// Faults of the database or the broker injected (restarts, connection kills,
    /// partitions).
    pub backend_faults: u64,
    /// The load's report (latency, orders by outcome, errors, the API invariants).
    pub load: Option<shop_load::Report>,
    /// Why the load could not run, if it could not.
    pub load_error: Option<String>,
    /// The checks in the databases.
    pub databases: Option<DbReport>,
    /// Why the databases could not be checked, if they could not.
    pub database_error: Option<String>,
    /// Share of the load's requests that failed (the error budget spent).
    pub error_rate: f64,
    /// The slowest recovery after a kill or a backend restart, seconds.
    pub slowest_recovery_s: Option<f64>,
    /// Kills and backend restarts the shop did not recover from within [`RECOVERY_MAX`].
    pub unrecovered_kills: u64,
}

impl ChaosReport {
    /// Lost orders, double captures, stock mismatches, vanished messages, an invariant broken
    /// through the API, a kill not recovered from, or a check that could not run: any of these
    /// fails the run.
    pub fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        match (&self.load, &self.load_error) {
            (Some(load), _) => {
                if load.orders.pending > 0 {
                    out.push(format!(
                        "{} accepted orders never ended",
                        load.orders.pending
                    ));
                }
                if !load.invariants.hold() {
                    out.push(format!(
                        "{} invariant violations through the API",
                        load.invariants.violation_count
                    ));
                }
            }
            (None, Some(error)) => out.push(format!("the load did not run: {error}")),
            (None, None) => out.push("the load did not run".into()),
        }
        match (&self.databases, &self.database_error) {
            (Some(db), _) => {
                if !db.hold() {
                    out.push(format!(
                        "{} violations in the databases",
                        db.violation_count
                    ));
                }
            }
            (None, error) => out.push(format!(
                "the databases were not checked: {}",
                error.as_deref().unwrap_or("unknown")
            )),
        }
        if self.unrecovered_kills > 0 {
            out.push(format!(
                "{} kills or backend restarts not recovered from within {} s",
                self.unrecovered_kills,
                RECOVERY_MAX.as_secs()
            ));
        }
        out
    }

    /// No violation.
    pub fn ok(&self) -> bool {
        self.violations().is_empty()
    }

    /// The report as text.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "chaos: scenario {}, seed {}, {:.0} s",
            self.scenario, self.seed, self.duration_s
        );
        let _ = writeln!(
            out,
            "faults: {} kills, {} network, {} provider, {} backend",
            self.kills, self.network_faults, self.provider_faults, self.backend_faults
        );
        for fault in &self.faults {
            let healed = fault
                .healed_s
                .map(|h| format!(", healed at {h:.1} s"))
                .unwrap_or_default();
            let recovered = match (fault.measured, fault.recovered_after_s) {
                (true, Some(r)) => format!(
                    ", back up in {:.1} s, an order confirmed {r:.1} s after it",
                    fault.restarted_after_s.unwrap_or(f64::NAN)
                ),
                (true, None) if fault.error.is_none() => ", NOT recovered".into(),
                _ => String::new(),
            };
            let error = fault
                .error
                .as_ref()
                .map(|e| format!(" (failed: {e})"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {:>7.1} s  {}{healed}{recovered}{error}",
                fault.at_s, fault.what
            );
        }
        if let Some(load) = &self.load {
            let o = &load.orders;
            let _ = writeln!(
                out,
                "orders: accepted {}, confirmed {}, cancelled {} {:?}, pending {}, in doubt {}",
                o.placed,
                o.confirmed,
                o.cancelled_total(),
                o.cancelled,
                o.pending,
                o.in_doubt
            );
            let errors: u64 = load.errors.values().sum();
            let _ = writeln!(
                out,
                "requests: {} sent, {} failed ({:.2}% of the error budget spent), errors {:?}",
                load.sent,
                errors,
                self.error_rate * 100.0,
                load.errors
            );
            let _ = writeln!(
                out,
                "p99 latency: {:.1} ms overall",
                load.overall.latency.p99_ms
            );
        }
        if let Some(error) = &self.load_error {
            let _ = writeln!(out, "load: {error}");
        }
        if let Some(db) = &self.databases {
            let _ = writeln!(
                out,
                "databases: orders {:?}; lost {}, double captures {}, payment mismatches {}, \
                 shipment mismatches {}, stock mismatches {}, unrelayed events {}, unprojected \
                 events {}, undelivered messages {}, dead letters {}",
                db.orders,
                db.lost_orders,
                db.double_captures,
                db.payment_mismatches,
                db.shipment_mismatches,
                db.stock_mismatches,
                db.unrelayed_events,
                db.unprojected_events,
                db.undelivered_messages,
                db.dead_letters
            );
            for violation in &db.violations {
                let _ = writeln!(out, "  - {violation}");
            }
        }
        if let Some(error) = &self.database_error {
            let _ = writeln!(out, "databases: not checked: {error}");
        }
        if let Some(slowest) = self.slowest_recovery_s {
            let _ = writeln!(
                out,
                "slowest recovery after a kill or backend restart: {slowest:.1} s"
            );
        }
        let violations = self.violations();
        if violations.is_empty() {
            let _ = writeln!(out, "result: OK, every invariant holds");
        } else {
            let _ = writeln!(out, "result: FAILED");
            for v in violations {
                let _ = writeln!(out, "  - {v}");
            }
        }
        out
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// The shop never answered.
    #[error("the shop did not answer at {0} within {READY_MAX:?}")]
    NotReady(String),
    /// A setup call failed.
    #[error("setup: {0}")]
    Setup(String),
}

/// The admin's login and current token.
struct Admin {
    email: String,
    password: String,
    token: tokio::sync::Mutex<String>,
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        key: Option<&str>,
    ) -> Result<(u16, Value), String> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    async fn login(&self, email: &str, password: &str) -> Result<String, String> {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/api/auth/token",
                None,
                Some(json!({"email": email, "password": password})),
                None,
            )
            .await?;
        body["access_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("login of {email}: {status} {body}"))
    }
}

/// The stock every catalogue product gets before the run, so orders keep going through
/// payment and shipping instead of ending `out_of_stock` once the seed catalogue's small stock
/// is sold.
pub const RESTOCK_TOTAL: i64 = 1_000_000;

/// Sets every catalogue product's stock to [`RESTOCK_TOTAL`] (at most 1,000 products).
async fn restock(api: &Api, admin: &str) -> Result<(), String> {
    let mut cursor: Option<String> = None;
    let mut done = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/products?limit=100&cursor={c}"),
            None => "/api/products?limit=100".to_owned(),
        };
        let (status, page) = api
            .call(reqwest::Method::GET, &path, None, None, None)
            .await?;
        if status != 200 {
            return Err(format!("listing the catalogue: {status} {page}"));
        }
        for product in page["items"].as_array().into_iter().flatten() {
            let Some(id) = product["id"].as_str() else {
                continue;
            };
            let (status, body) = api
                .call(
                    reqwest::Method::PUT,
                    &format!("/api/inventory/{id}"),
                    Some(admin),
                    Some(json!({ "total": RESTOCK_TOTAL })),
                    None,
                )
                .await?;
            if status != 200 {
                return Err(format!("restocking {id}: {status} {body}"));
            }
            done += 1;
        }
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() || done >= 1_000 {
            return Ok(());
        }
    }
}

/// What the probe uses: a customer and a product with stock enough for every probe order.
struct Probe {
    token: String,
    product: String,
}

async fn setup_probe(api: &Api, admin: &str, seed: u64) -> Result<Probe, String> {
    let (status, product) = api
        .call(
            reqwest::Method::POST,
            "/api/products",
            Some(admin),
            Some(json!({"name": format!("chaos probe {seed}"), "price_cents": 100, "stock": 1_000_000})),
            None,
        )
        .await?;
    if status != 201 {
        return Err(format!("creating the probe product: {status} {product}"));
    }
    let email = format!("probe-{seed}-{}@chaos.test", std::process::id());
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            "/api/users",
            None,
            Some(json!({"email": email, "password": "chaos-probe-1", "name": "chaos probe"})),
            None,
        )
        .await?;
    if status != 201 {
        return Err(format!("registering the probe customer: {status} {body}"));
    }
    Ok(Probe {
        token: api.login(&email, "chaos-probe-1").await?,
        product: product["id"].as_str().unwrap_or_default().to_owned(),
    })
}

/// Waits for the killed processes to run again, then places probe orders until one ends
/// CONFIRMED; answers how long after `since` the processes were back, and how long until that
/// order was accepted.
async fn recovery(
    api: Arc<Api>,
    probe: Arc<Probe>,
    since: Instant,
    restarts: Vec<BoxFuture<'static, Option<Instant>>>,
    counter: Arc<AtomicU64>,
) -> (Option<Duration>, Option<Duration>) {
    let deadline = since + RECOVERY_MAX;
    let mut back = since;
    // A kill that keeps its processes down has nothing to wait for, and no restart time.
    let restarting = !restarts.is_empty();
    for restart in restarts {
        match restart.await {
            Some(at) => back = back.max(at),
            None => return (None, None),
        }
    }
    let restarted = back.saturating_duration_since(since);
    let confirmed = first_confirmed(&api, &probe, deadline, &counter).await;
    (
        restarting.then_some(restarted),
        confirmed.map(|at| at.saturating_duration_since(since)),
    )
}

/// Places probe orders until one ends CONFIRMED; answers when that order was accepted.
async fn first_confirmed(
    api: &Api,
    probe: &Probe,
    deadline: Instant,
    counter: &AtomicU64,
) -> Option<Instant> {
    while Instant::now() < deadline {
        let placed_at = Instant::now();
        let key = format!("chaos-probe-{}", counter.fetch_add(1, Ordering::Relaxed));
        let placed = api
            .call(
                reqwest::Method::POST,
                "/api/orders",
                Some(&probe.token),
                Some(json!({"items": [{"product_id": probe.product, "quantity": 1}]})),
                Some(&key),
            )
            .await;
        if let Ok((202, body)) = placed
            && let Some(id) = body["id"].as_str()
        {
            let accepted_at = Instant::now();
            let path = format!("/api/orders/{id}");
            while Instant::now() < deadline {
                match api
                    .call(reqwest::Method::GET, &path, Some(&probe.token), None, None)
                    .await
                {
                    Ok((200, order)) if order["status"] == "CONFIRMED" => {
                        return Some(accepted_at);
                    }
                    Ok((200, order)) if order["status"] == "CANCELLED" => break,
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        tokio::time::sleep_until(placed_at + PROBE_INTERVAL).await;
    }
    None
}

fn provider_body(
    latency_ms: Option<u64>,
    failure_rate: Option<f64>,
    outage: Option<bool>,
) -> Value {
    let mut body = serde_json::Map::new();
    if let Some(ms) = latency_ms {
        body.insert("latency_ms".into(), json!(ms));
    }
    if let Some(rate) = failure_rate {
        body.insert("failure_rate".into(), json!(rate));
    }
    if let Some(outage) = outage {
        body.insert("outage".into(), json!(outage));
    }
    Value::Object(body)
}

const PROVIDER_CLEAN: fn() -> Value =
    || json!({"latency_ms": 0, "failure_rate": 0.0, "outage": false});

/// Runs a chaos scenario against `target` and reports.
///
/// # Errors
/// [`ChaosError`] when the shop never answers or the probe cannot be set up; everything that
/// goes wrong after that is in the report.
pub async fn run(config: ChaosConfig, target: Arc<dyn Target>) -> Result<ChaosReport, ChaosError> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| ChaosError::Setup(e.to_string()))?;
    let api = Arc::new(Api {
        http,
        base: target.gateway_url(),
    });
    let backends = target.backends();
    let plan = config
        .scenario
        .schedule(config.duration, config.seed, &backends);
    // Refuse a schedule this shop cannot carry out before touching the shop.
    for planned in &plan {
        if let Err(why) = target.supports(&planned.action) {
            return Err(ChaosError::Setup(format!(
                "the scenario asks for \"{}\", which this shop cannot do: {why}",
                planned.action.describe()
            )));
        }
    }

    // The shop answers a catalogue before every service is up: wait for an admin login.
    let ready = Instant::now() + READY_MAX;
    let admin = loop {
        match api.login(&config.admin.0, &config.admin.1).await {
            Ok(token) => break token,
            Err(_) if Instant::now() < ready => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(_) => return Err(ChaosError::NotReady(api.base.clone())),
        }
    };
    restock(&api, &admin).await.map_err(ChaosError::Setup)?;
    let probe = Arc::new(
        setup_probe(&api, &admin, config.seed)
            .await
            .map_err(ChaosError::Setup)?,
    );
    let admin = Admin {
        email: config.admin.0.clone(),
        password: config.admin.1.clone(),
        token: tokio::sync::Mutex::new(admin),
    };
    let mut load = shop_load::LoadConfig::new(api.base.clone(), config.rate, config.duration)
        .with_admin(config.admin.0.clone(), config.admin.1.clone());
    load.seed = Some(config.seed);
    load.settle_timeout = config.settle_timeout;
    load.progress = false;
    let load_task = tokio::spawn(shop_load::run(load));

    let start = Instant::now();
    let since_start = |at: Instant| (at - start).as_secs_f64();
    let counter = Arc::new(AtomicU64::new(0));
    let mut records: Vec<FaultRecord> = Vec::new();
    let mut heals: Vec<(Instant, usize, Planned)> = Vec::new();
    type Recovery = (Option<Duration>, Option<Duration>);
    let mut recoveries: Vec<(usize, tokio::task::JoinHandle<Recovery>)> = Vec::new();
    let mut progress_at = start;
    let mut next = 0;
    loop {
        let now = Instant::now();
        // Heal what is due.
        heals.sort_by_key(|h| h.0);
        while let Some((at, _, _)) = heals.first() {
            if *at > now {
                break;
            }
            let (_, index, planned) = heals.remove(0);
            let result = heal(&api, &admin, target.as_ref(), &planned.action).await;
            records[index].healed_s = Some(since_start(Instant::now()));
            if let Err(error) = result {
                records[index].error.get_or_insert(format!("heal: {error}"));
            }
        }
        // Inject what is due.
        while next < plan.len() && start + plan[next].at <= now {
            let planned = plan[next].clone();
            next += 1;
            let injected_at = Instant::now();
            let index = records.len();
            let (error, restarts) = match &planned.action {
                Action::Kill { services, restart } => {
                    let mut errors = Vec::new();
                    let mut restarts = Vec::new();
                    for service in services {
                        if *restart {
                            match target.kill(service) {
                                Ok(restart) => restarts.push(restart),
                                Err(e) => errors.push(format!("{service}: {e}")),
                            }
                        } else if let Err(e) = target.stop(service).await {
                            errors.push(format!("{service}: {e}"));
                        }
                    }
                    ((!errors.is_empty()).then(|| errors.join("; ")), restarts)
                }
                Action::Backend { fault } => match target.backend(*fault).await {
                    Ok(back) => (None, vec![back]),
                    Err(e) => (Some(e), Vec::new()),
                },
                action => (
                    inject(&api, &admin, target.as_ref(), action).await.err(),
                    Vec::new(),
                ),
            };
            let measured = matches!(planned.action, Action::Kill { .. } | Action::Backend { .. });
            let injected = matches!(planned.action, Action::Kill { .. }) || !restarts.is_empty();
            records.push(FaultRecord {
                at_s: since_start(injected_at),
                what: planned.action.describe(),
                kind: planned.action.kind().to_owned(),
                healed_s: None,
                recovered_after_s: None,
                restarted_after_s: None,
                measured,
                error,
            });
            if measured && injected {
                recoveries.push((
                    index,
                    tokio::spawn(recovery(
                        api.clone(),
                        probe.clone(),
                        injected_at,
                        restarts,
                        counter.clone(),
                    )),
                ));
            } else if let Some(hold) = planned.hold {
                heals.push((injected_at + hold, index, planned));
            }
        }
        let elapsed = now - start;
        if config.progress && now >= progress_at {
            progress_at = now + Duration::from_secs(1);
            let kills = records.iter().filter(|r| r.kind == "kill").count();
            let last = records.last().map(|r| r.what.as_str()).unwrap_or("-");
            eprint!(
                "\r[chaos {:>4}/{:<4} s] faults {:>3} (kills {:>3}) active {:>2} · last: {last:<48.48}",
                elapsed.as_secs(),
                config.duration.as_secs(),
                records.len(),
                kills,
                heals.len()
            );
        }
        if elapsed >= config.duration && next >= plan.len() {
            break;
        }
        let wake = [
            plan.get(next).map(|p| start + p.at),
            heals.iter().map(|h| h.0).min(),
            Some(progress_at),
            Some(start + config.duration),
        ]
        .into_iter()
        .flatten()
        .filter(|at| *at > now)
        .min()
        .unwrap_or(now + Duration::from_millis(100));
        tokio::time::sleep_until(wake).await;
    }
    // Heal everything still active.
    for (_, index, planned) in std::mem::take(&mut heals) {
        let result = heal(&api, &admin, target.as_ref(), &planned.action).await;
        records[index].healed_s = Some(since_start(Instant::now()));
        if let Err(error) = result {
            records[index].error.get_or_insert(format!("heal: {error}"));
        }
    }
    if config.progress {
        eprintln!("\n[chaos] faults healed; waiting for the load to settle and checking");
    }
    for (index, task) in recoveries {
        let (restarted, recovered) = task.await.unwrap_or((None, None));
        records[index].restarted_after_s = restarted.map(|d| d.as_secs_f64());
        records[index].recovered_after_s = recovered.map(|d| d.as_secs_f64());
    }
    let (load, load_error) = match load_task.await {
        Ok(Ok(report)) => (Some(report), None),
        Ok(Err(error)) => (None, Some(error.to_string())),
        Err(error) => (None, Some(format!("the load task failed: {error}"))),
    };
    // Quiescence: the probe's last orders, the relay and the projection catch up.
    // Quiescence: orders still in flight when the load's settle wait ended (compensations
    // may retry for minutes), the probe's last orders, the relay and the projection catch up.
    // The provider's counters are read on each pass, after the orders they must match.
    let mut databases = None;
    let mut database_error = None;
    let stores = target.stores();
    let settle_until = Instant::now() + config.settle_timeout;
    loop {
        let provider = if target.provider_intact() {
            provider_stats(&api.http, &target.provider_url()).await
        } else {
            None
        };
        match checks::check(&stores, provider).await {
            Ok(report) if report.hold() || Instant::now() >= settle_until => {
                databases = Some(report);
                break;
            }
            Ok(_) => {}
            Err(error) if Instant::now() >= settle_until => {
                database_error = Some(error.to_string());
                break;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let kills: u64 = plan
        .iter()
        .map(|p| match &p.action {
            Action::Kill { services, .. } => services.len() as u64,
            _ => 0,
        })
        .sum();
    let count = |kind: &str| records.iter().filter(|r| r.kind == kind).count() as u64;
    let error_rate = load.as_ref().map_or(0.0, |l| {
        let errors: u64 = l.errors.values().sum();
        if l.arrivals == 0 {
            0.0
        } else {
            errors as f64 / l.arrivals as f64
        }
    });
    let kill_records: Vec<&FaultRecord> = records
        .iter()
        .filter(|r| r.measured && (r.kind == "kill" || r.error.is_none()))
        .collect();
    let slowest_recovery_s = kill_records
        .iter()
        .filter_map(|r| r.recovered_after_s)
        .fold(None, |max: Option<f64>, r| {
            Some(max.map_or(r, |m| m.max(r)))
        });
    let unrecovered_kills = kill_records
        .iter()
        .filter(|r| r.recovered_after_s.is_none())
        .count() as u64;
    Ok(ChaosReport {
        scenario: config.scenario.name.clone(),
        seed: config.seed,
        duration_s: config.duration.as_secs_f64(),
        network_faults: count("network"),
        provider_faults: count("provider"),
        backend_faults: count("backend"),
        kills,
        faults: records,
        load,
        load_error,
        databases,
        database_error,
        error_rate,
        slowest_recovery_s,
        unrecovered_kills,
    })
}

async fn provider_stats(http: &reqwest::Client, base: &str) -> Option<ProviderStats> {
    let response = http.get(format!("{base}/v1/stats")).send().await.ok()?;
    response.json().await.ok()
}

async fn inject(
    api: &Api,
    admin: &Admin,
    target: &dyn Target,
    action: &Action,
) -> Result<(), String> {
    match action {
        Action::Kill { .. } | Action::Backend { .. } => {
            Err("kills and backend faults are injected by the run loop".into())
        }
        Action::Network {
            service,
            fault,
            share,
        } => target.network(service, Some((fault, *share))),
        Action::Provider {
            latency_ms,
            failure_rate,
            outage,
        } => {
            let body = provider_body(*latency_ms, *failure_rate, *outage);
            provider_config(api, admin, body).await
        }
    }
}

async fn heal(
    api: &Api,
    admin: &Admin,
    target: &dyn Target,
    action: &Action,
) -> Result<(), String> {
    match action {
        Action::Kill { .. } | Action::Backend { .. } => Ok(()),
        Action::Network { service, .. } => target.network(service, None),
        Action::Provider { .. } => provider_config(api, admin, PROVIDER_CLEAN()).await,
    }
}

async fn provider_config(api: &Api, admin: &Admin, body: Value) -> Result<(), String> {
    // The gateway may itself be down for a moment (a kill): try for a few seconds.
    let mut last = String::new();
    for _ in 0..20 {
        let token = admin.token.lock().await.clone();
        match api
            .call(
                reqwest::Method::PUT,
                "/api/admin/provider",
                Some(&token),
                Some(body.clone()),
                None,
            )
            .await
        {
            Ok((200, _)) => return Ok(()),
            Ok((401, _)) => {
                // The token expired (a run longer than its lifetime): log in again.
                if let Ok(fresh) = api.login(&admin.email, &admin.password).await {
                    *admin.token.lock().await = fresh;
                }
                last = "401".into();
            }
            Ok((status, body)) => last = format!("{status} {body}"),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!("PUT /api/admin/provider: {last}"))
}

/// Counts of a report's faults by kind, for summaries.
pub fn fault_counts(report: &ChaosReport) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for fault in &report.faults {
        *counts.entry(fault.kind.clone()).or_default() += 1;
    }
    counts
}
