//! Event store throughput against the raw baseline measured in the same run.
//!
//! - `append/{backend}/b{batch}/w{writers}`: events/s through `EventStore::append` (version
//!   check, idempotency check, group commit), `writers` tasks appending `batch` events at a
//!   time to their own streams.
//! - `raw_insert/{backend}/b{batch}/w{writers}`: the same rows written with plain INSERTs by the
//!   same driver with the same durability settings, one transaction per batch (SQLite: one
//!   `INSERT` per row, as the store does; PostgreSQL: one multi-row `INSERT … SELECT FROM
//!   UNNEST`, as the store does). This is the baseline the store is compared with.
//! - `load/{events}/{snapshot|replay}`: loading an aggregate of N events, with a snapshot at
//!   its last version or by replaying every event (SQLite).
//! - `read_all/{backend}`: catching up 10,000 events with `read_all` in batches of 512.
//!
//! PostgreSQL cases run only when `TRELLIS_TEST_POSTGRES_URL` (or the local default) answers.
//! Run: `cargo bench -p trellis-eventstore --bench eventstore`; `bench/eventstore.sh` prints
//! the ratios.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Connection as _;
use tokio::runtime::Runtime;
use trellis_eventstore::{
    Aggregate, DomainEvent, EventStore, ExpectedVersion, Metadata, NewEvent, PostgresStore,
    Repository, SqliteStore, StreamId,
};
use uuid::Uuid;

const BATCHES: [usize; 2] = [1, 100];
const WRITERS: [usize; 2] = [1, 4];

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A ~1 KB event like the shop writes.
fn payload() -> serde_json::Value {
    json!({ "order_id": Uuid::now_v7(), "items": (0..12).map(|i| json!({"sku": format!("sku-{i:04}"), "quantity": i, "price_cents": 1999})).collect::<Vec<_>>(), "note": "x".repeat(200) })
}

fn new_events(batch: usize) -> Vec<NewEvent> {
    (0..batch)
        .map(|_| NewEvent::new("OrderPlaced", payload()))
        .collect()
}

enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(trellis_testkit::TestPostgres),
}

impl Backend {
    fn url(&self) -> String {
        match self {
            Self::Sqlite(dir) => format!("sqlite://{}", dir.path().join("bench.db").display()),
            Self::Postgres(db) => db.url.clone(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

async fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Sqlite(tempfile::tempdir().expect("temp dir"))];
    if let Some(db) = trellis_testkit::postgres("eventstore_bench").await {
        backends.push(Backend::Postgres(db));
    }
    backends
}

/// Runs `total` appends of `batch` events split across `writers` tasks; returns the wall time.
async fn run_appends<S: EventStore>(
    store: &S,
    total: u64,
    batch: usize,
    writers: usize,
) -> Duration {
    let per_writer = total.div_ceil(writers as u64);
    let prepared: Vec<Vec<Vec<NewEvent>>> = (0..writers)
        .map(|_| (0..per_writer).map(|_| new_events(batch)).collect())
        .collect();
    let started = Instant::now();
    let tasks: Vec<_> = prepared
        .into_iter()
        .map(|appends| {
            let store = store.clone();
            tokio::spawn(async move {
                let stream =
                    StreamId::new(format!("bench-{}", Uuid::now_v7().simple())).expect("valid");
                let mut version = 0;
                for events in appends {
                    let expected = if version == 0 {
                        ExpectedVersion::NoStream
                    } else {
                        ExpectedVersion::Exact(version)
                    };
                    version = store
                        .append(&stream, expected, events)
                        .await
                        .expect("append")
                        .next_version;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    started.elapsed()
}

/// The baseline: the same rows, inserted by plain SQL with the same driver and settings.
async fn run_raw_inserts(backend: &Backend, total: u64, batch: usize, writers: usize) -> Duration {
    let per_writer = total.div_ceil(writers as u64);
    let url = backend.url();
    let is_pg = matches!(backend, Backend::Postgres(_));
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let url = url.clone();
            let rows: Vec<Vec<NewEvent>> = (0..per_writer).map(|_| new_events(batch)).collect();
            tokio::spawn(async move {
                let stream = format!("raw-{}", Uuid::now_v7().simple());
                if is_pg {
                    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
                    let mut version = 0i64;
                    for events in rows {
                        let mut tx = conn.begin().await.expect("begin");
                        let n = events.len();
                        let versions: Vec<i64> = (0..n as i64).map(|i| version + i + 1).collect();
                        version += n as i64;
                        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
                        let data: Vec<String> = events.iter().map(|e| e.data.to_string()).collect();
                        sqlx::query(
                            "INSERT INTO raw_events (stream_id, version, event_id, event_type, schema_version, data, metadata, recorded_at)
                             SELECT $1, v, i, 'OrderPlaced', 1, d::jsonb, '{}'::jsonb, now()
                             FROM UNNEST($2::bigint[], $3::uuid[], $4::text[]) AS x(v, i, d)",
                        )
                        .bind(&stream)
                        .bind(versions)
                        .bind(ids)
                        .bind(data)
                        .execute(&mut *tx)
                        .await
                        .expect("insert");
                        tx.commit().await.expect("commit");
                    }
                } else {
                    let options: sqlx::sqlite::SqliteConnectOptions = url.parse().expect("url");
                    let options = options
                        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                        .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
                        .busy_timeout(Duration::from_secs(30));
                    let mut conn = sqlx::SqliteConnection::connect_with(&options).await.expect("connect");
                    let mut version = 0i64;
                    for events in rows {
                        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.expect("begin");
                        for event in events {
                            version += 1;
                            sqlx::query(
                                "INSERT INTO raw_events (stream_id, version, event_id, event_type, schema_version, data, metadata, recorded_at)
                                 VALUES (?, ?, ?, 'OrderPlaced', 1, ?, '{}', ?)",
                            )
                            .bind(&stream)
                            .bind(version)
                            .bind(event.id.to_string())
                            .bind(event.data.to_string())
                            .bind(chrono::Utc::now().to_rfc3339())
                            .execute(&mut *tx)
                            .await
                            .expect("insert");
                        }
                        tx.commit().await.expect("commit");
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    started.elapsed()
}

async fn create_raw_table(backend: &Backend) {
    let sql = match backend {
        Backend::Postgres(_) => {
            "CREATE TABLE IF NOT EXISTS raw_events (position BIGSERIAL PRIMARY KEY, stream_id TEXT NOT NULL, version BIGINT NOT NULL,
             event_id UUID NOT NULL UNIQUE, event_type TEXT NOT NULL, schema_version INTEGER NOT NULL, data JSONB NOT NULL,
             metadata JSONB NOT NULL, recorded_at TIMESTAMPTZ NOT NULL, UNIQUE (stream_id, version))"
        }
        Backend::Sqlite(_) => {
            "CREATE TABLE IF NOT EXISTS raw_events (position INTEGER PRIMARY KEY, stream_id TEXT NOT NULL, version INTEGER NOT NULL,
             event_id TEXT NOT NULL UNIQUE, event_type TEXT NOT NULL, schema_version INTEGER NOT NULL, data TEXT NOT NULL,
             metadata TEXT NOT NULL, recorded_at TEXT NOT NULL, UNIQUE (stream_id, version))"
        }
    };
    match backend {
        Backend::Postgres(db) => {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
            sqlx::raw_sql(sql).execute(&mut conn).await.expect("create");
        }
        Backend::Sqlite(_) => {
            let options: sqlx::sqlite::SqliteConnectOptions = backend.url().parse().expect("url");
            let mut conn = sqlx::SqliteConnection::connect_with(&options.create_if_missing(true))
                .await
                .expect("connect");
            sqlx::raw_sql(sql).execute(&mut conn).await.expect("create");
        }
    }
}

fn appends(c: &mut Criterion) {
    let rt = runtime();
    let backends = rt.block_on(backends());
    for backend in &backends {
        rt.block_on(create_raw_table(backend));
        let url = backend.url();
        let name = backend.name();
        let store: Box<dyn Fn(u64, usize, usize) -> Duration> = match backend {
            Backend::Sqlite(_) => {
                let store = rt.block_on(SqliteStore::open(&url)).expect("open");
                let rt = &rt;
                Box::new(move |total, batch, writers| {
                    rt.block_on(run_appends(&store, total, batch, writers))
                })
            }
            Backend::Postgres(_) => {
                let store = rt.block_on(PostgresStore::open(&url)).expect("open");
                let rt = &rt;
                Box::new(move |total, batch, writers| {
                    rt.block_on(run_appends(&store, total, batch, writers))
                })
            }
        };
        let mut group = c.benchmark_group(format!("append/{name}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4));
        for batch in BATCHES {
            for writers in WRITERS {
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_function(
                    BenchmarkId::new(format!("b{batch}"), format!("w{writers}")),
                    |b| {
                        b.iter_custom(|iters| store(iters, batch, writers));
                    },
                );
                group.bench_function(
                    BenchmarkId::new(format!("raw_b{batch}"), format!("w{writers}")),
                    |b| {
                        b.iter_custom(|iters| {
                            rt.block_on(run_raw_inserts(backend, iters, batch, writers))
                        });
                    },
                );
            }
        }
        group.finish();
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Counter {
    total: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum CounterEvent {
    Added { amount: i64 },
}

impl DomainEvent for CounterEvent {}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = i64;
    type Event = CounterEvent;
    type Error = Never;

    fn handle(&self, amount: i64) -> Result<Vec<CounterEvent>, Never> {
        Ok(vec![CounterEvent::Added { amount }])
    }

    fn apply(&mut self, CounterEvent::Added { amount }: &CounterEvent) {
        self.total += amount;
    }
}

fn loads(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("load.db").display());
    let store = rt.block_on(SqliteStore::open(&url)).expect("open");
    let mut group = c.benchmark_group("load");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for events in [1_000u64, 10_000, 100_000] {
        let id = format!("n{events}");
        let stream = StreamId::new(format!("counter-{id}")).expect("valid");
        rt.block_on(async {
            let mut version = 0;
            while version < events {
                let n = (events - version).min(5_000) as usize;
                let batch: Vec<_> = (0..n)
                    .map(|_| NewEvent::new("Added", json!({"amount": 1})))
                    .collect();
                version = store
                    .append(&stream, ExpectedVersion::Any, batch)
                    .await
                    .expect("append")
                    .next_version;
            }
        });
        let replay = Repository::<Counter, _>::new(store.clone());
        let snapshotted = Repository::<Counter, _>::new(store.clone()).with_snapshots(events);
        let first = rt
            .block_on(snapshotted.load(&id))
            .expect("load saves a snapshot");
        assert_eq!(first.state.total, events as i64);
        if events == 10_000 {
            group.bench_function(BenchmarkId::new("replay", events), |b| {
                b.iter(|| rt.block_on(replay.load(&id)).expect("load"));
            });
        }
        group.bench_function(BenchmarkId::new("snapshot", events), |b| {
            b.iter(|| {
                let loaded = rt.block_on(snapshotted.load(&id)).expect("load");
                assert_eq!(loaded.events_read, 0);
            });
        });
    }
    group.finish();
    let _ = Metadata::default();
}

fn read_all(c: &mut Criterion) {
    let rt = runtime();
    let backends = rt.block_on(backends());
    let mut group = c.benchmark_group("read_all");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for backend in &backends {
        let url = backend.url();
        let catch_up = |store: &dyn Fn(u64) -> usize| {
            let mut next = 1;
            let mut seen = 0;
            loop {
                let n = store(next);
                if n == 0 {
                    break seen;
                }
                seen += n;
                next += n as u64;
            }
        };
        let reader: Box<dyn Fn(u64) -> usize> = match backend {
            Backend::Sqlite(_) => {
                let store = rt.block_on(SqliteStore::open(&url)).expect("open");
                rt.block_on(seed(&store));
                let rt = &rt;
                Box::new(move |from| rt.block_on(store.read_all(from, 512)).expect("read").len())
            }
            Backend::Postgres(_) => {
                let store = rt.block_on(PostgresStore::open(&url)).expect("open");
                rt.block_on(seed(&store));
                let rt = &rt;
                Box::new(move |from| rt.block_on(store.read_all(from, 512)).expect("read").len())
            }
        };
        let total = catch_up(&*reader) as u64;
        group.throughput(Throughput::Elements(total));
        group.bench_function(backend.name(), |b| b.iter(|| catch_up(&*reader)));
    }
    group.finish();
}

/// Makes sure the log holds at least 10,000 events.
async fn seed<S: EventStore>(store: &S) {
    let head = store.head().await.expect("head");
    if head >= 10_000 {
        return;
    }
    let stream = StreamId::new(format!("seed-{}", Uuid::now_v7().simple())).expect("valid");
    for _ in 0..(10_000 - head).div_ceil(1_000) {
        store
            .append(&stream, ExpectedVersion::Any, new_events(1_000))
            .await
            .expect("seed");
    }
}

criterion_group!(benches, appends, loads, read_all);
criterion_main!(benches);
