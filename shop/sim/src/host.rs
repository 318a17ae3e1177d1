//! The participants' host: the real inventory, payments and shipping services (their
//! `app()` routers: service-identity check, tonic server, handlers, SQLite store) and the
//! fake payment provider, on a thread and runtime of their own.
//!
//! The simulation thread hands it one request at a time and waits (blocking) for the answer,
//! so in simulated time a participant call is one atomic step: no simulated time passes and
//! no other simulated task runs while SQLite works on its own threads. That keeps a seed's
//! run exact even though sqlx is not under tokio's paused clock. Restarting a participant
//! drops its router and closes its database, then opens both again from the file: its
//! durable state is all that survives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};
use http_body_util::BodyExt as _;
use sqlx::Row as _;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use tokio::sync::mpsc;
use tower::ServiceExt as _;
use trellis_service::Db;
use trellis_service::auth::ServiceKey;

use crate::provider::Provider;
use crate::trace::{SimClock, Trace};

/// A participant service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Service {
    Inventory,
    Payments,
    Shipping,
}

impl Service {
    pub(crate) const ALL: [Service; 3] = [Self::Inventory, Self::Payments, Self::Shipping];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Inventory => "inventory",
            Self::Payments => "payments",
            Self::Shipping => "shipping",
        }
    }
}

/// A request as it crosses the simulated wire.
#[derive(Debug, Clone)]
pub(crate) struct Wire {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// An answer as it crosses the simulated wire (gRPC status in the trailers).
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
}

impl Answer {
    /// The gRPC status code (`0` is OK), from the trailers or a trailers-only answer.
    pub(crate) fn grpc_status(&self) -> String {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned()
    }
}

/// Where a participant crashes around a delivered request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Crash {
    /// It handles the request and answers.
    No,
    /// It dies before reading the request (the request is lost) and restarts.
    Before,
    /// It handles the request, commits, and dies before answering; it restarts.
    After,
}

/// What the participants and the provider hold at the end of a run.
#[derive(Debug, Default)]
pub(crate) struct Facts {
    /// Product → (total, reserved).
    pub(crate) stock: BTreeMap<String, (i64, i64)>,
    /// Order → (state, lines).
    pub(crate) reservations: BTreeMap<String, (String, Vec<(String, i64)>)>,
    /// Order → (status, amount, provider charge id).
    pub(crate) payments: BTreeMap<String, (String, i64, Option<String>)>,
    /// Order → (shipment id, status).
    pub(crate) shipments: BTreeMap<String, (String, String)>,
    /// (service, order, effect) for every row change the audit triggers saw, in order.
    pub(crate) effects: Vec<(Service, String, String)>,
    /// Idempotency key → the provider's charges; charge id → refunds applied.
    pub(crate) charges: BTreeMap<String, Vec<crate::provider::Charge>>,
    pub(crate) refunds: BTreeMap<String, u32>,
}

enum Job {
    Call {
        service: Service,
        wire: Box<Wire>,
        crash: Crash,
        reply: std_mpsc::Sender<Option<Answer>>,
    },
    Facts {
        reply: std_mpsc::Sender<Result<Facts, String>>,
    },
}

/// The participants' host thread.
#[derive(Debug)]
pub(crate) struct Host {
    jobs: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<JoinHandle<()>>,
    dir: PathBuf,
}

/// Audit triggers: every row change of a participant's table is an effect, counted.
const AUDIT: [(Service, &str, &str, &str); 3] = [
    (Service::Inventory, "reservations", "order_id", "state"),
    (Service::Payments, "payments", "order_id", "status"),
    (Service::Shipping, "shipments", "order_id", "status"),
];

fn audit_sql(table: &str, key: &str, column: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS sim_effects (seq INTEGER PRIMARY KEY AUTOINCREMENT, \
         order_id TEXT NOT NULL, effect TEXT NOT NULL);
         CREATE TRIGGER IF NOT EXISTS sim_insert AFTER INSERT ON {table} BEGIN
           INSERT INTO sim_effects (order_id, effect) VALUES (NEW.{key}, 'insert:' || NEW.{column});
         END;
         CREATE TRIGGER IF NOT EXISTS sim_update AFTER UPDATE OF {column} ON {table}
           WHEN OLD.{column} <> NEW.{column} BEGIN
           INSERT INTO sim_effects (order_id, effect) VALUES (NEW.{key}, OLD.{column} || '->' || NEW.{column});
         END;"
    )
}

struct Running {
    router: Router,
    db: Db,
}

struct Participants {
    dir: PathBuf,
    key: ServiceKey,
    provider_url: String,
    clock: SimClock,
    running: BTreeMap<Service, Running>,
    /// The simulation's own connections (audit and final facts), not the participants'.
    observers: BTreeMap<Service, SqlitePool>,
}

impl Participants {
    fn url(&self, service: Service) -> String {
        format!("sqlite://{}/{}.db", self.dir.display(), service.name())
    }

    async fn open(&self, service: Service) -> Result<Running, String> {
        let url = self.url(service);
        let key = self.key.clone();
        let (router, db) = match service {
            Service::Inventory => shop_inventory::app(shop_inventory::Config {
                database_url: url,
                service_key: key,
            })
            .await
            .map_err(|e| e.to_string())?,
            Service::Payments => {
                let mut config = shop_payments::Config::new(url, &self.provider_url, key);
                // Retries wait real time on this thread: keep them short. The breaker reads
                // simulated time, so it opens and half-opens as a seed says.
                config.resilience.backoff_initial = Duration::from_millis(1);
                config.resilience.backoff_max = Duration::from_millis(2);
                config.resilience.clock = trellis_resilience::SharedClock::new(self.clock.clone());
                shop_payments::app(config)
                    .await
                    .map_err(|e| e.to_string())?
            }
            Service::Shipping => shop_shipping::app(shop_shipping::Config {
                database_url: url,
                service_key: key,
            })
            .await
            .map_err(|e| e.to_string())?,
        };
        Ok(Running { router, db })
    }

    async fn restart(&mut self, service: Service) -> Result<(), String> {
        if let Some(running) = self.running.remove(&service) {
            drop(running.router);
            running.db.close().await;
        }
        let running = self.open(service).await?;
        self.running.insert(service, running);
        Ok(())
    }

    async fn facts(
        &self,
        charges: BTreeMap<String, Vec<crate::provider::Charge>>,
        refunds: BTreeMap<String, u32>,
    ) -> Result<Facts, sqlx::Error> {
        let mut facts = Facts::default();
        let inventory = &self.observers[&Service::Inventory];
        for row in sqlx::query("SELECT product_id, total, reserved FROM stock ORDER BY product_id")
            .fetch_all(inventory)
            .await?
        {
            facts
                .stock
                .insert(row.get(0), (row.get::<i64, _>(1), row.get::<i64, _>(2)));
        }
        for row in sqlx::query("SELECT order_id, state FROM reservations ORDER BY order_id")
            .fetch_all(inventory)
            .await?
        {
            facts
                .reservations
                .insert(row.get(0), (row.get(1), Vec::new()));
        }
        for row in sqlx::query(
            "SELECT order_id, product_id, quantity FROM reservation_lines ORDER BY order_id, product_id",
        )
        .fetch_all(inventory)
        .await?
        {
            let order: String = row.get(0);
            if let Some((_, lines)) = facts.reservations.get_mut(&order) {
                lines.push((row.get(1), row.get(2)));
            }
        }
        for row in sqlx::query(
            "SELECT order_id, status, amount_cents, provider_charge_id FROM payments ORDER BY order_id",
        )
        .fetch_all(&self.observers[&Service::Payments])
        .await?
        {
            facts
                .payments
                .insert(row.get(0), (row.get(1), row.get(2), row.get(3)));
        }
        for row in sqlx::query("SELECT order_id, id, status FROM shipments ORDER BY order_id")
            .fetch_all(&self.observers[&Service::Shipping])
            .await?
        {
            facts.shipments.insert(row.get(0), (row.get(1), row.get(2)));
        }
        for service in Service::ALL {
            for row in sqlx::query("SELECT order_id, effect FROM sim_effects ORDER BY seq")
                .fetch_all(&self.observers[&service])
                .await?
            {
                facts.effects.push((service, row.get(0), row.get(1)));
            }
        }
        facts.charges = charges;
        facts.refunds = refunds;
        Ok(facts)
    }
}

async fn handle(router: Router, wire: Wire) -> Answer {
    let mut request = http::Request::new(axum::body::Body::from(wire.body));
    *request.method_mut() = wire.method;
    *request.uri_mut() = wire.uri;
    *request.headers_mut() = wire.headers;
    let response = match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let (body, trailers) = match body.collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            (collected.to_bytes(), trailers)
        }
        Err(_) => (Bytes::new(), None),
    };
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
        trailers,
    }
}

impl Host {
    /// Starts the host: the provider on a loopback port and the three participants on
    /// SQLite files under `dir`.
    pub(crate) fn start(
        dir: &Path,
        provider: Provider,
        key: ServiceKey,
        clock: SimClock,
        trace: Trace,
    ) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (jobs, mut inbox) = mpsc::unbounded_channel::<Job>();
        let (ready, started) = std_mpsc::channel::<Result<(), String>>();
        let host_dir = dir.to_owned();
        let thread = std::thread::Builder::new()
            .name("sim-participants".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready.send(Err(e.to_string()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                        Ok(listener) => listener,
                        Err(e) => {
                            let _ = ready.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let provider_url = match listener.local_addr() {
                        Ok(addr) => format!("http://{addr}"),
                        Err(e) => {
                            let _ = ready.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let server = tokio::spawn(
                        axum::serve(listener, crate::provider::router(provider.clone()))
                            .into_future(),
                    );
                    let mut participants = Participants {
                        dir: host_dir,
                        key,
                        provider_url,
                        clock,
                        running: BTreeMap::new(),
                        observers: BTreeMap::new(),
                    };
                    for service in Service::ALL {
                        if let Err(e) = participants.restart(service).await {
                            let _ = ready.send(Err(e));
                            return;
                        }
                        let (_, table, key, column) = AUDIT
                            .iter()
                            .find(|(s, ..)| *s == service)
                            .copied()
                            .unwrap_or(AUDIT[0]);
                        let observer = async {
                            let options =
                                SqliteConnectOptions::from_str(&participants.url(service))?
                                    .busy_timeout(Duration::from_secs(30));
                            let pool = SqlitePoolOptions::new()
                                .max_connections(1)
                                .connect_with(options)
                                .await?;
                            sqlx::raw_sql(sqlx::AssertSqlSafe(audit_sql(table, key, column)))
                                .execute(&pool)
                                .await?;
                            Ok::<_, sqlx::Error>(pool)
                        };
                        match observer.await {
                            Ok(pool) => {
                                participants.observers.insert(service, pool);
                            }
                            Err(e) => {
                                let _ =
                                    ready.send(Err(format!("audit of {}: {e}", service.name())));
                                return;
                            }
                        }
                    }
                    let _ = ready.send(Ok(()));
                    while let Some(job) = inbox.recv().await {
                        match job {
                            Job::Call {
                                service,
                                wire,
                                crash,
                                reply,
                            } => {
                                let answer = call(
                                    &mut participants,
                                    &provider,
                                    &trace,
                                    service,
                                    *wire,
                                    crash,
                                )
                                .await;
                                let _ = reply.send(answer);
                            }
                            Job::Facts { reply } => {
                                let (charges, refunds) = {
                                    let ledger =
                                        provider.ledger.lock().unwrap_or_else(|p| p.into_inner());
                                    (ledger.charges.clone(), ledger.refunds.clone())
                                };
                                let facts = participants
                                    .facts(charges, refunds)
                                    .await
                                    .map_err(|e| e.to_string());
                                let _ = reply.send(facts);
                            }
                        }
                    }
                    for (_, running) in std::mem::take(&mut participants.running) {
                        running.db.close().await;
                    }
                    for (_, pool) in std::mem::take(&mut participants.observers) {
                        pool.close().await;
                    }
                    server.abort();
                });
            })
            .map_err(|e| e.to_string())?;
        let host = Self {
            jobs: Some(jobs),
            thread: Some(thread),
            dir: dir.to_owned(),
        };
        started
            .recv()
            .map_err(|_| "the participants' host died while starting".to_owned())??;
        Ok(host)
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
    }

    /// Delivers `wire` to `service` and waits for it (blocking the simulation thread: the
    /// call is atomic in simulated time). `None`: the participant crashed, no answer.
    pub(crate) fn call(&self, service: Service, wire: Wire, crash: Crash) -> Option<Answer> {
        let (reply, answer) = std_mpsc::channel();
        self.send(Job::Call {
            service,
            wire: Box::new(wire),
            crash,
            reply,
        });
        answer.recv().ok().flatten()
    }

    /// The participants' and the provider's state and effect counts.
    pub(crate) fn facts(&self) -> Result<Facts, String> {
        let (reply, facts) = std_mpsc::channel();
        self.send(Job::Facts { reply });
        facts
            .recv()
            .map_err(|_| "the participants' host died".to_owned())?
    }
}

async fn call(
    participants: &mut Participants,
    provider: &Provider,
    trace: &Trace,
    service: Service,
    wire: Wire,
    crash: Crash,
) -> Option<Answer> {
    if crash == Crash::Before {
        let _ = participants.restart(service).await;
        return None;
    }
    let router = participants.running.get(&service)?.router.clone();
    let answer = if service == Service::Payments {
        let kill = provider.kill_payments.clone();
        tokio::select! {
            biased;
            () = kill.notified() => None,
            answer = handle(router, wire) => Some(answer),
        }
    } else {
        Some(handle(router, wire).await)
    };
    let Some(answer) = answer else {
        trace.log("payments crashed inside its call; restarting from its database");
        let _ = participants.restart(service).await;
        return None;
    };
    if crash == Crash::After {
        let _ = participants.restart(service).await;
        return None;
    }
    Some(answer)
}

impl Drop for Host {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
