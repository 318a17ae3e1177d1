//! Saga throughput against the raw insert baseline measured in the same run.
//!
//! - `saga/{backend}/c{concurrency}`: three-step sagas with no-op participants run to
//!   `Completed` through `SagaEngine::start`, `concurrency` sagas in flight at a time. Each saga
//!   writes 8 transitions (started, 3 x executing + succeeded, completed), each durable before
//!   the engine acts on it, fenced by the lease owner and the expected sequence.
//! - `raw_insert/{backend}/c{concurrency}`: the same 8 log rows per saga written with plain
//!   single-row INSERTs, each its own transaction (autocommit), by the same driver with the same
//!   durability settings (SQLite: WAL, `synchronous = FULL`; PostgreSQL: defaults, so
//!   `synchronous_commit = on`), `concurrency` writers at a time. Throughput is counted in
//!   sagas (8 rows) so the two compare directly.
//!
//! PostgreSQL cases run only when `TRELLIS_TEST_POSTGRES_URL` (or the local default) answers.
//! Run: `cargo bench -p trellis-saga --bench saga`.
#![allow(missing_docs)]

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use trellis_saga::{
    PostgresSagaStore, SagaDefinition, SagaEngine, SagaStore, SqliteSagaStore, Step, StepContext,
};
use uuid::Uuid;

/// Sagas in flight at a time.
const CONCURRENCY: [usize; 2] = [1, 256];

/// Sagas per measured batch: enough to fill the pipeline at each concurrency.
fn batch(concurrency: usize) -> usize {
    if concurrency == 1 { 64 } else { 2_048 }
}
/// Transitions a three-step saga writes.
const TRANSITIONS_PER_SAGA: usize = 8;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Order {
    order_id: String,
    reserved: bool,
    charged: bool,
    shipped: bool,
}

fn no_op(name: &'static str) -> Step<Order> {
    Step::new(name, |_order: &mut Order, _step: StepContext| {
        Box::pin(async { Ok(()) })
    })
}

fn definition() -> SagaDefinition<Order> {
    SagaDefinition::builder("place-order", 1)
        .step(no_op("reserve").compensate(|_order: &mut Order, _step| Box::pin(async { Ok(()) })))
        .step(no_op("charge"))
        .step(no_op("ship"))
        .build()
        .expect("valid definition")
}

/// Runs `sagas` sagas, at most `concurrency` at a time, and returns the time it took.
async fn run_sagas<S: SagaStore>(
    engine: &Arc<SagaEngine<S>>,
    sagas: usize,
    concurrency: usize,
) -> Duration {
    let started = Instant::now();
    let mut running: JoinSet<Result<(), trellis_saga::SagaError>> = JoinSet::new();
    for _ in 0..sagas {
        if running.len() >= concurrency {
            running
                .join_next()
                .await
                .expect("a task")
                .expect("join")
                .expect("saga");
        }
        let engine = engine.clone();
        running.spawn(async move {
            let order = Order {
                order_id: Uuid::now_v7().to_string(),
                ..Order::default()
            };
            engine.start("place-order", &order).await.map(drop)
        });
    }
    while let Some(done) = running.join_next().await {
        done.expect("join").expect("saga");
    }
    started.elapsed()
}

/// The raw baseline: one INSERT per transition, autocommit.
#[derive(Clone)]
enum Raw {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Raw {
    async fn insert(&self, saga: &str, seq: i64, transition: &str, context: &str) {
        let at = chrono::Utc::now();
        match self {
            Self::Sqlite(pool) => {
                sqlx::query("INSERT INTO raw_log (saga_id, seq, transition, context, at) VALUES (?, ?, ?, ?, ?)")
                    .bind(saga)
                    .bind(seq)
                    .bind(transition)
                    .bind(context)
                    .bind(at)
                    .execute(pool)
                    .await
                    .expect("insert");
            }
            Self::Postgres(pool) => {
                sqlx::query("INSERT INTO raw_log (saga_id, seq, transition, context, at) VALUES ($1, $2, $3::jsonb, $4::jsonb, $5)")
                    .bind(saga)
                    .bind(seq)
                    .bind(transition)
                    .bind(context)
                    .bind(at)
                    .execute(pool)
                    .await
                    .expect("insert");
            }
        }
    }
}

async fn run_raw(raw: &Raw, sagas: usize, concurrency: usize) -> Duration {
    let started = Instant::now();
    let mut running = JoinSet::new();
    for _ in 0..sagas {
        if running.len() >= concurrency {
            running.join_next().await.expect("a task").expect("join");
        }
        let raw = raw.clone();
        running.spawn(async move {
            let saga = Uuid::now_v7().to_string();
            let context = serde_json::to_string(&Order {
                order_id: saga.clone(),
                ..Order::default()
            })
            .expect("json");
            for seq in 1..=TRANSITIONS_PER_SAGA as i64 {
                raw.insert(
                    &saga,
                    seq,
                    r#"{"type":"step_succeeded","step":"charge"}"#,
                    &context,
                )
                .await;
            }
        });
    }
    while running.join_next().await.is_some() {}
    started.elapsed()
}

fn sagas(c: &mut Criterion) {
    let runtime = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let postgres = runtime.block_on(trellis_testkit::postgres("saga_bench"));

    let mut group = c.benchmark_group("saga");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.warm_up_time(Duration::from_secs(2));

    // SQLite: the store, and the raw baseline on its own file with the same settings.
    let url = format!("sqlite://{}", dir.path().join("saga.db").display());
    let store = runtime.block_on(SqliteSagaStore::open(&url)).expect("open");
    let engine = Arc::new(SagaEngine::new(store).register(definition()));
    for concurrency in CONCURRENCY {
        group.throughput(Throughput::Elements(batch(concurrency) as u64));
        group.bench_function(BenchmarkId::new("sqlite", format!("c{concurrency}")), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| runtime.block_on(run_sagas(&engine, batch(concurrency), concurrency)))
                    .sum()
            });
        });
    }
    let raw_url = format!("sqlite://{}", dir.path().join("raw.db").display());
    let raw = runtime.block_on(async {
        let options = SqliteConnectOptions::from_str(&raw_url)
            .expect("url")
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("raw pool");
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS raw_log (saga_id TEXT NOT NULL, seq INTEGER NOT NULL,
             transition TEXT NOT NULL, context TEXT NOT NULL, at TEXT NOT NULL,
             PRIMARY KEY (saga_id, seq))",
        )
        .execute(&pool)
        .await
        .expect("raw schema");
        Raw::Sqlite(pool)
    });
    for concurrency in CONCURRENCY {
        group.throughput(Throughput::Elements(batch(concurrency) as u64));
        group.bench_function(
            BenchmarkId::new("raw_insert_sqlite", format!("c{concurrency}")),
            |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| runtime.block_on(run_raw(&raw, batch(concurrency), concurrency)))
                        .sum()
                });
            },
        );
    }

    if let Some(db) = &postgres {
        let store = runtime
            .block_on(PostgresSagaStore::connect(&db.url))
            .expect("connect");
        let engine = Arc::new(SagaEngine::new(store).register(definition()));
        for concurrency in CONCURRENCY {
            group.throughput(Throughput::Elements(batch(concurrency) as u64));
            group.bench_function(
                BenchmarkId::new("postgres", format!("c{concurrency}")),
                |b| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| {
                                runtime.block_on(run_sagas(
                                    &engine,
                                    batch(concurrency),
                                    concurrency,
                                ))
                            })
                            .sum()
                    });
                },
            );
        }
        let raw = runtime.block_on(async {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .connect(&db.url)
                .await
                .expect("raw pool");
            sqlx::raw_sql(
                "CREATE TABLE IF NOT EXISTS raw_log (saga_id TEXT NOT NULL, seq BIGINT NOT NULL,
                 transition JSONB NOT NULL, context JSONB NOT NULL, at TIMESTAMPTZ NOT NULL,
                 PRIMARY KEY (saga_id, seq))",
            )
            .execute(&pool)
            .await
            .expect("raw schema");
            Raw::Postgres(pool)
        });
        for concurrency in CONCURRENCY {
            group.throughput(Throughput::Elements(batch(concurrency) as u64));
            group.bench_function(
                BenchmarkId::new("raw_insert_postgres", format!("c{concurrency}")),
                |b| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| {
                                runtime.block_on(run_raw(&raw, batch(concurrency), concurrency))
                            })
                            .sum()
                    });
                },
            );
        }
    }
    group.finish();
    drop(engine);
    drop(postgres);
}

criterion_group!(benches, sagas);
criterion_main!(benches);
