//! The invariants, checked directly in each service's database after a run (the `trellis
//! load` engine checks them through the API as well): every order terminal; a confirmed order
//! has a captured payment, a created shipment and committed stock; a cancelled one none of
//! these; stock balances (`reserved` equals what live reservations hold, nothing reserved once
//! every order is terminal, the stock committed per product equals what confirmed orders
//! bought); the provider captured exactly once per confirmed order; every event of the orders
//! log relayed to the bus and projected into the read model; no message left undelivered.
//!
//! Reads each service's database where [`Stores`] says it is: the embedded SQLite files of a
//! data directory (read-only), as `trellis up` and `trellis up --processes` lay them out, or
//! PostgreSQL databases; and the bus, a SQLite file or NATS JetStream (its consumers' pending
//! counts and its dead-letter stream).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::Serialize;
use sqlx::Row as _;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use trellis_service::Db;

/// Where a run's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stores {
    /// The database URL (`sqlite://PATH` or `postgres://…`) of `orders`, `payments`,
    /// `shipping` and `inventory`. The orders service keeps its read model in
    /// `orders-read.db` beside `orders.db` on SQLite, and everything in one database on
    /// PostgreSQL.
    pub databases: BTreeMap<String, String>,
    /// The bus.
    pub bus: BusStore,
}

/// Where the bus keeps its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusStore {
    /// The embedded bus: this SQLite file.
    Sqlite(PathBuf),
    /// NATS JetStream: the server's URL and the shop's stream prefix.
    Nats {
        /// `nats://host:port`.
        url: String,
        /// The prefix of the streams (`<PREFIX>_BUS`, `_PARK`, `_DLQ`).
        prefix: String,
    },
}

/// The services whose databases the checks read.
pub const CHECKED: [&str; 4] = ["orders", "payments", "shipping", "inventory"];

impl Stores {
    /// The embedded layout of data directory `dir`.
    pub fn embedded(dir: &Path) -> Self {
        Self {
            databases: CHECKED
                .iter()
                .map(|s| {
                    (
                        (*s).to_owned(),
                        format!("sqlite://{}/{s}.db", dir.display()),
                    )
                })
                .collect(),
            bus: BusStore::Sqlite(dir.join("bus.db")),
        }
    }
}

/// How long a check waits for a database or the broker to answer.
const ANSWER_MAX: Duration = Duration::from_secs(10);

/// The most violations a report lists (all are counted).
pub const LISTED_MAX: usize = 50;

/// What the databases hold after a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DbReport {
    /// Orders by status in the orders read model.
    pub orders: BTreeMap<String, u64>,
    /// Cancelled orders by reason.
    pub cancelled_by_reason: BTreeMap<String, u64>,
    /// Orders accepted but not terminal (PENDING after the settle wait).
    pub lost_orders: u64,
    /// Confirmed orders whose payment is not captured, or captured payments of orders that
    /// are not confirmed.
    pub payment_mismatches: u64,
    /// Charges the provider kept beyond the payments the shop holds as captured (captures −
    /// refunds − captured payments).
    pub double_captures: i64,
    /// Shipments that disagree with their order (missing for a confirmed one, live for a
    /// cancelled one).
    pub shipment_mismatches: u64,
    /// Products whose stock does not balance.
    pub stock_mismatches: u64,
    /// Events of the orders log not relayed to the bus, plus relay dead letters.
    pub unrelayed_events: u64,
    /// Events of the orders log not in the read model.
    pub unprojected_events: u64,
    /// Bus messages neither acknowledged nor dead-lettered (choreography's groups).
    pub undelivered_messages: u64,
    /// Bus dead letters (reported; not a violation by themselves: an operator redrives them).
    pub dead_letters: u64,
    /// Violations found, counted.
    pub violation_count: u64,
    /// The first [`LISTED_MAX`] violations.
    pub violations: Vec<String>,
}

impl DbReport {
    fn violate(&mut self, message: String) {
        self.violation_count += 1;
        if self.violations.len() < LISTED_MAX {
            self.violations.push(message);
        }
    }

    /// No violation.
    pub fn hold(&self) -> bool {
        self.violation_count == 0
    }
}

/// Why the databases could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A database is missing or unreadable.
    #[error("{path}: {source}")]
    Db {
        /// The database (a file, or a URL without its password).
        path: String,
        /// The error.
        source: sqlx::Error,
    },
    /// A database URL that is neither `sqlite://` nor `postgres://`, or a service without
    /// one.
    #[error("{0}")]
    Url(String),
    /// The NATS server could not be read.
    #[error("NATS {url}: {message}")]
    Nats {
        /// The server.
        url: String,
        /// What failed.
        message: String,
    },
}

/// One database, opened for reading.
struct Reader {
    db: Db,
    name: String,
}

impl Reader {
    /// Opens `url`: a SQLite file read-only (a missing file is an error, not a new empty
    /// database), or a PostgreSQL database through a one-connection pool.
    async fn open(url: &str) -> Result<Self, CheckError> {
        let name = trellis_service::redact_url(url);
        let failed = |source| CheckError::Db {
            path: name.clone(),
            source,
        };
        let db = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(ANSWER_MAX)
                .connect(url)
                .await
                .map_err(failed)?;
            Db::Postgres(pool)
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            let options = SqliteConnectOptions::new().filename(path).read_only(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(ANSWER_MAX)
                .connect_with(options)
                .await
                .map_err(failed)?;
            Db::Sqlite(pool)
        } else {
            return Err(CheckError::Url(format!(
                "{name}: expected sqlite://PATH or postgres://…"
            )));
        };
        Ok(Self { db, name })
    }

    /// Runs `sql`, whose every column is `CAST(… AS TEXT)` (so one body reads both engines),
    /// and returns the rows as strings.
    async fn rows(&self, sql: &'static str) -> Result<Vec<Vec<String>>, CheckError> {
        let rows: Result<Vec<Vec<String>>, sqlx::Error> =
            trellis_service::on_db!(&self.db, |pool| {
                match sqlx::query(sql).fetch_all(pool).await {
                    Ok(rows) => rows
                        .iter()
                        .map(|row| {
                            (0..row.len())
                                .map(|i| row.try_get::<String, _>(i))
                                .collect::<Result<Vec<String>, sqlx::Error>>()
                        })
                        .collect(),
                    Err(e) => Err(e),
                }
            });
        rows.map_err(|source| CheckError::Db {
            path: self.name.clone(),
            source,
        })
    }

    /// The first column of the first row, as a number (0 when there is none).
    async fn number(&self, sql: &'static str) -> Result<i64, CheckError> {
        Ok(self
            .rows(sql)
            .await?
            .first()
            .and_then(|row| row.first())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    async fn close(self) {
        self.db.close().await;
    }
}

/// Where the orders service keeps its read model, given its event log's URL.
fn orders_read_url(orders: &str) -> String {
    match orders.strip_prefix("sqlite://") {
        Some(path) => {
            let path = Path::new(path);
            let dir = path.parent().unwrap_or(Path::new("."));
            format!("sqlite://{}", dir.join("orders-read.db").display())
        }
        None => orders.to_owned(),
    }
}

fn number(value: &str) -> i64 {
    value.parse().unwrap_or(0)
}

/// The provider's counters, from its `GET /v1/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProviderStats {
    /// Charges captured since the simulator started.
    pub captures: u64,
    /// Refunds.
    pub refunds: u64,
}

/// Checks the databases and the bus `stores` names; `provider` is the simulator's counters
/// (`None` when it was restarted during the run, so its counts do not cover it).
///
/// # Errors
/// [`CheckError`] when a database or the broker cannot be read.
pub async fn check(
    stores: &Stores,
    provider: Option<ProviderStats>,
) -> Result<DbReport, CheckError> {
    let mut report = DbReport::default();
    let url = |service: &str| {
        stores
            .databases
            .get(service)
            .cloned()
            .ok_or_else(|| CheckError::Url(format!("no database given for {service}")))
    };

    // Orders: status and items from the read model.
    let orders_url = url("orders")?;
    let read = Reader::open(&orders_read_url(&orders_url)).await?;
    let mut orders: HashMap<String, (String, String)> = HashMap::new();
    let mut bought: HashMap<String, i64> = HashMap::new();
    for row in read
        .rows(
            "SELECT CAST(id AS TEXT), CAST(status AS TEXT), CAST(COALESCE(reason, '') AS TEXT), \
             CAST(items AS TEXT) FROM order_view",
        )
        .await?
    {
        let [id, status, reason, items] = <[String; 4]>::try_from(row).unwrap_or_default();
        *report.orders.entry(status.clone()).or_default() += 1;
        match status.as_str() {
            "CONFIRMED" => {
                let lines: Vec<serde_json::Value> =
                    serde_json::from_str(&items).unwrap_or_default();
                for line in lines {
                    if let (Some(product), Some(quantity)) =
                        (line["product_id"].as_str(), line["quantity"].as_i64())
                    {
                        *bought.entry(product.to_owned()).or_default() += quantity;
                    }
                }
            }
            "CANCELLED" => {
                let reason = if reason.is_empty() {
                    "unknown".into()
                } else {
                    reason.clone()
                };
                *report.cancelled_by_reason.entry(reason).or_default() += 1;
            }
            _ => {
                report.lost_orders += 1;
                report.violate(format!("order {id}: still {status} after the run"));
            }
        }
        orders.insert(id, (status, reason));
    }

    // Payments.
    let payments = Reader::open(&url("payments")?).await?;
    let mut payment: HashMap<String, String> = HashMap::new();
    for row in payments
        .rows("SELECT CAST(order_id AS TEXT), CAST(status AS TEXT) FROM payments")
        .await?
    {
        let [order, status] = <[String; 2]>::try_from(row).unwrap_or_default();
        payment.insert(order, status);
    }
    // Shipments.
    let shipping = Reader::open(&url("shipping")?).await?;
    let mut shipment: HashMap<String, (String, String)> = HashMap::new();
    for row in shipping
        .rows(
            "SELECT CAST(order_id AS TEXT), CAST(id AS TEXT), CAST(status AS TEXT) FROM shipments",
        )
        .await?
    {
        let [order, id, status] = <[String; 3]>::try_from(row).unwrap_or_default();
        shipment.insert(order, (id, status));
    }
    // Reservations.
    let inventory = Reader::open(&url("inventory")?).await?;
    let mut reservation: HashMap<String, String> = HashMap::new();
    for row in inventory
        .rows("SELECT CAST(order_id AS TEXT), CAST(state AS TEXT) FROM reservations")
        .await?
    {
        let [order, state] = <[String; 2]>::try_from(row).unwrap_or_default();
        reservation.insert(order, state);
    }

    let mut confirmed = 0i64;
    for (id, (status, _)) in &orders {
        let paid = payment.get(id).map(String::as_str);
        let shipped = shipment.get(id);
        let held = reservation.get(id).map(String::as_str);
        match status.as_str() {
            "CONFIRMED" => {
                confirmed += 1;
                if paid != Some("captured") {
                    report.payment_mismatches += 1;
                    report.violate(format!("order {id}: CONFIRMED but payment {paid:?}"));
                }
                if !shipped.is_some_and(|(sid, s)| s == "created" && !sid.is_empty()) {
                    report.shipment_mismatches += 1;
                    report.violate(format!("order {id}: CONFIRMED but shipment {shipped:?}"));
                }
                if held != Some("committed") {
                    report.violate(format!("order {id}: CONFIRMED but stock {held:?}"));
                }
            }
            "CANCELLED" => {
                if matches!(paid, Some("captured" | "pending" | "unavailable")) {
                    report.payment_mismatches += 1;
                    report.violate(format!("order {id}: CANCELLED but payment {paid:?}"));
                }
                if shipped.is_some_and(|(_, s)| s == "created") {
                    report.shipment_mismatches += 1;
                    report.violate(format!("order {id}: CANCELLED but a live shipment"));
                }
                if matches!(held, Some("reserved" | "committed")) {
                    report.violate(format!("order {id}: CANCELLED but stock {held:?}"));
                }
            }
            _ => {}
        }
    }
    for (id, status) in &payment {
        if status == "captured" && orders.get(id).is_none_or(|(s, _)| s != "CONFIRMED") {
            report.payment_mismatches += 1;
            report.violate(format!(
                "payment of order {id} captured, order {:?}",
                orders.get(id).map(|o| &o.0)
            ));
        }
    }
    if let Some(stats) = provider {
        // A double capture is a charge the provider kept that the payments service does not
        // hold as captured; a captured payment of an order that is not (yet) confirmed is a
        // payment mismatch above (or a lost order), not a double capture.
        let kept = i64::try_from(stats.captures).unwrap_or(i64::MAX)
            - i64::try_from(stats.refunds).unwrap_or(i64::MAX);
        let held = payment.values().filter(|s| *s == "captured").count() as i64;
        report.double_captures = kept - held;
        if kept != held || kept != confirmed {
            report.violate(format!(
                "provider: {} captures − {} refunds = {kept} kept; the payments service holds \
                 {held} captured, {confirmed} orders confirmed",
                stats.captures, stats.refunds
            ));
        }
    }

    // Stock.
    let mut held_by_product: HashMap<String, i64> = HashMap::new();
    let mut committed_by_product: HashMap<String, i64> = HashMap::new();
    for row in inventory
        .rows(
            "SELECT CAST(r.state AS TEXT), CAST(l.product_id AS TEXT), CAST(l.quantity AS TEXT) \
             FROM reservation_lines l JOIN reservations r ON r.order_id = l.order_id",
        )
        .await?
    {
        let [state, product, quantity] = <[String; 3]>::try_from(row).unwrap_or_default();
        let quantity = number(&quantity);
        match state.as_str() {
            "reserved" => *held_by_product.entry(product).or_default() += quantity,
            "committed" => *committed_by_product.entry(product).or_default() += quantity,
            _ => {}
        }
    }
    for row in inventory
        .rows(
            "SELECT CAST(product_id AS TEXT), CAST(total AS TEXT), CAST(reserved AS TEXT) \
             FROM stock",
        )
        .await?
    {
        let [product, total, reserved] = <[String; 3]>::try_from(row).unwrap_or_default();
        let (total, reserved) = (number(&total), number(&reserved));
        let held = held_by_product.get(&product).copied().unwrap_or(0);
        let mut wrong = Vec::new();
        if reserved != held {
            wrong.push(format!(
                "reserved {reserved} but live reservations hold {held}"
            ));
        }
        if reserved < 0 || total < reserved {
            wrong.push(format!("total {total}, reserved {reserved}"));
        }
        if reserved != 0 && report.lost_orders == 0 {
            wrong.push(format!(
                "{reserved} still reserved with every order terminal"
            ));
        }
        let committed = committed_by_product.get(&product).copied().unwrap_or(0);
        let sold = bought.get(&product).copied().unwrap_or(0);
        if committed != sold {
            wrong.push(format!(
                "{committed} committed but confirmed orders bought {sold}"
            ));
        }
        if !wrong.is_empty() {
            report.stock_mismatches += 1;
            report.violate(format!("product {product}: {}", wrong.join("; ")));
        }
    }

    // The orders log: relayed to the bus and projected.
    let log = Reader::open(&orders_url).await?;
    // The global log's positions: a column of `es_events` on SQLite, a table of its own on
    // PostgreSQL (positions assigned in commit order).
    let head = log
        .number(if log.db.is_postgres() {
            "SELECT CAST(COALESCE(MAX(position), 0) AS TEXT) FROM es_log"
        } else {
            "SELECT CAST(COALESCE(MAX(position), 0) AS TEXT) FROM es_events"
        })
        .await?;
    let relayed = read
        .number("SELECT CAST(COALESCE(MAX(position), 0) AS TEXT) FROM bus_relay_checkpoints")
        .await?;
    let relay_dead = read
        .number("SELECT CAST(COUNT(*) AS TEXT) FROM relay_dead_letters")
        .await?;
    let projected = read
        .number(
            "SELECT CAST(COALESCE(MAX(c.position), 0) AS TEXT) FROM projection_checkpoints c \
             JOIN projection_active a ON a.name = c.name AND a.generation = c.generation",
        )
        .await
        .unwrap_or(0);
    report.unrelayed_events = u64::try_from((head - relayed).max(0) + relay_dead).unwrap_or(0);
    if report.unrelayed_events > 0 {
        report.violate(format!(
            "orders log: head {head}, relayed to {relayed}, {relay_dead} relay dead letters"
        ));
    }
    report.unprojected_events = u64::try_from((head - projected).max(0)).unwrap_or(0);
    if report.unprojected_events > 0 {
        report.violate(format!(
            "orders log: head {head}, read model at {projected}"
        ));
    }
    for reader in [read, payments, shipping, inventory, log] {
        reader.close().await;
    }

    // The bus: every group's messages acknowledged or dead-lettered.
    let (undelivered, dead_letters) = match &stores.bus {
        BusStore::Sqlite(path) => {
            let bus = Reader::open(&format!("sqlite://{}", path.display())).await?;
            let pending = bus
                .number("SELECT CAST(COUNT(*) AS TEXT) FROM bus_pending")
                .await?;
            let dead = bus
                .number("SELECT CAST(COUNT(*) AS TEXT) FROM bus_dead_letters")
                .await?;
            bus.close().await;
            (
                u64::try_from(pending).unwrap_or(0),
                u64::try_from(dead).unwrap_or(0),
            )
        }
        BusStore::Nats { url, prefix } => nats_counts(url, prefix).await?,
    };
    report.undelivered_messages = undelivered;
    if report.undelivered_messages > 0 {
        report.violate(format!(
            "bus: {} messages neither acknowledged nor dead-lettered",
            report.undelivered_messages
        ));
    }
    report.dead_letters = dead_letters;
    Ok(report)
}

/// On NATS: the messages the groups' durable consumers of the bus stream and its park lanes
/// have not acknowledged (pending delivery or awaiting an ack), and the dead-letter stream's
/// message count.
async fn nats_counts(url: &str, prefix: &str) -> Result<(u64, u64), CheckError> {
    let failed = |message: String| CheckError::Nats {
        url: url.to_owned(),
        message,
    };
    let within = |what: &'static str| {
        move |_| CheckError::Nats {
            url: url.to_owned(),
            message: format!("{what}: no answer within {} s", ANSWER_MAX.as_secs()),
        }
    };
    let client = tokio::time::timeout(ANSWER_MAX, async_nats::connect(url))
        .await
        .map_err(within("connect"))?
        .map_err(|e| failed(format!("connect: {e}")))?;
    let context = async_nats::jetstream::new(client);
    let upper = prefix.to_uppercase();
    let mut undelivered = 0u64;
    for suffix in ["BUS", "PARK"] {
        let name = format!("{upper}_{suffix}");
        let stream = match tokio::time::timeout(ANSWER_MAX, context.get_stream(&name))
            .await
            .map_err(within("stream info"))?
        {
            Ok(stream) => stream,
            // No park lane was ever needed (or nothing was ever published).
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::jetstream::context::GetStreamErrorKind::JetStream(_)
                ) =>
            {
                continue;
            }
            Err(e) => return Err(failed(format!("stream {name}: {e}"))),
        };
        let mut consumers = stream.consumers();
        loop {
            let next = tokio::time::timeout(ANSWER_MAX, consumers.next())
                .await
                .map_err(within("consumer list"))?;
            match next {
                None => break,
                Some(Ok(info)) => {
                    undelivered += info.num_pending + info.num_ack_pending as u64;
                }
                Some(Err(e)) => return Err(failed(format!("consumers of {name}: {e}"))),
            }
        }
    }
    let dlq = format!("{upper}_DLQ");
    let dead_letters = match tokio::time::timeout(ANSWER_MAX, context.get_stream(&dlq))
        .await
        .map_err(within("stream info"))?
    {
        Ok(mut stream) => {
            tokio::time::timeout(ANSWER_MAX, stream.info())
                .await
                .map_err(within("stream info"))?
                .map_err(|e| failed(format!("stream {dlq}: {e}")))?
                .state
                .messages
        }
        Err(_) => 0,
    };
    Ok((undelivered, dead_letters))
}
