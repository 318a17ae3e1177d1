//! Several engines on one log: leases keep each saga with one engine at a time, and an engine
//! that dies loses its sagas to the others once its leases expire.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use trellis_saga::{
    InMemorySagaStore, PostgresSagaStore, SagaDefinition, SagaEngine, SagaFilter, SagaId,
    SagaStatus, SagaStore, Step, StepContext,
};

/// Which (saga, step) pairs are running right now, which engines ran each saga's steps, and
/// every time a pair started while it was already running.
#[derive(Debug, Default)]
struct TrackerState {
    running: HashSet<(SagaId, String)>,
    overlaps: Vec<(SagaId, String)>,
    engines: BTreeMap<SagaId, BTreeSet<&'static str>>,
    finished: BTreeMap<SagaId, BTreeSet<String>>,
}

#[derive(Debug, Clone, Default)]
struct Tracker(Arc<Mutex<TrackerState>>);

/// Marks a (saga, step) as running until dropped, which also happens when the engine running
/// it dies (its task is aborted) or gives the step up.
struct Running {
    tracker: Tracker,
    key: (SagaId, String),
    finished: bool,
}

impl Tracker {
    fn enter(&self, engine: &'static str, step: &StepContext) -> Running {
        let key = (step.saga_id(), step.step().to_owned());
        let mut state = self.0.lock().expect("tracker lock");
        if !state.running.insert(key.clone()) {
            state.overlaps.push(key.clone());
        }
        state
            .engines
            .entry(step.saga_id())
            .or_default()
            .insert(engine);
        Running {
            tracker: self.clone(),
            key,
            finished: false,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut state = self.tracker.0.lock().expect("tracker lock");
        state.running.remove(&self.key);
        if self.finished {
            state
                .finished
                .entry(self.key.0)
                .or_default()
                .insert(self.key.1.clone());
        }
    }
}

/// Three no-compensation steps that take a few milliseconds (a fifth of the second steps take
/// longer than the lease); engine `a` signals `crash`
/// when it starts its `crash_after`-th step.
fn definition(
    engine: &'static str,
    tracker: &Tracker,
    started: Arc<AtomicU32>,
    crash_after: u32,
    crash: Arc<Notify>,
) -> SagaDefinition<u32> {
    let mut builder = SagaDefinition::builder("relay", 1);
    for (index, name) in ["one", "two", "three"].into_iter().enumerate() {
        let tracker = tracker.clone();
        let started = started.clone();
        let crash = crash.clone();
        builder = builder.step(Step::new(name, move |_: &mut u32, step: StepContext| {
            let tracker = tracker.clone();
            let started = started.clone();
            let crash = crash.clone();
            Box::pin(async move {
                let mut running = tracker.enter(engine, &step);
                if started.fetch_add(1, Ordering::SeqCst) + 1 == crash_after {
                    crash.notify_one();
                }
                // A few steps outlast the lease (500 ms), so their engine must renew it.
                let seed = step.saga_id().as_uuid().as_u128() as u64;
                let millis = if index == 1 && seed.is_multiple_of(5) {
                    1_200
                } else {
                    2 + (seed + index as u64) % 8
                };
                tokio::time::sleep(Duration::from_millis(millis)).await;
                running.finished = true;
                Ok(())
            })
        }));
    }
    builder.build().expect("valid definition")
}

/// Two engines on one log (each with its own store handle, as two processes would have) start
/// `sagas` sagas each and poll for work; engine `a` dies after starting `crash_after` steps.
/// Checks no (saga, step) ever ran twice at once, and that `b` finishes every saga.
async fn two_engines<S: SagaStore>(store_a: S, store_b: S, inspect: S, sagas: u32) {
    let lease = Duration::from_millis(500);
    let poll = Duration::from_millis(50);
    let tracker = Tracker::default();
    let crash = Arc::new(Notify::new());
    let crash_after = sagas + sagas / 2; // a dies with about half of its steps started
    let a = Arc::new(
        SagaEngine::new(store_a)
            .with_owner("a")
            .with_lease_duration(lease)
            .register(definition(
                "a",
                &tracker,
                Arc::default(),
                crash_after,
                crash.clone(),
            )),
    );
    let b = Arc::new(
        SagaEngine::new(store_b)
            .with_owner("b")
            .with_lease_duration(lease)
            .register(definition(
                "b",
                &tracker,
                Arc::default(),
                u32::MAX,
                Arc::new(Notify::new()),
            )),
    );
    let mut tasks_a = JoinSet::new();
    let mut tasks_b = JoinSet::new();
    for _ in 0..sagas {
        let a = a.clone();
        tasks_a.spawn(async move { a.start("relay", &0_u32).await.map(drop) });
        let b = b.clone();
        tasks_b.spawn(async move { b.start("relay", &0_u32).await.map(drop) });
    }
    {
        let a = a.clone();
        tasks_a.spawn(async move {
            a.run_recovery(poll).await;
            Ok(())
        });
        let b = b.clone();
        tasks_b.spawn(async move {
            b.run_recovery(poll).await;
            Ok(())
        });
    }

    // The crash hook fires: engine a dies mid-way, its steps in flight dropped with it.
    tokio::time::timeout(Duration::from_secs(60), crash.notified())
        .await
        .expect("engine a reaches its crash point");
    tasks_a.abort_all();
    while tasks_a.join_next().await.is_some() {}
    drop(a);

    // b finishes its own sagas and, once a's leases expire, a's.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let all = loop {
        let all = inspect.list(&SagaFilter::new()).await.expect("list");
        if all.iter().all(|saga| saga.status.is_terminal()) {
            break all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sagas still active: {:?}",
            all.iter().filter(|saga| saga.status.is_active()).count()
        );
        tokio::time::sleep(poll).await;
    };
    tasks_b.abort_all();
    while tasks_b.join_next().await.is_some() {}

    let state = tracker.0.lock().expect("tracker lock");
    assert!(
        state.overlaps.is_empty(),
        "steps ran twice at once: {:?}",
        state.overlaps
    );
    assert!(
        all.len() as u32 > sagas,
        "b's sagas and at least one of a's exist"
    );
    for saga in &all {
        assert_eq!(saga.status, SagaStatus::Completed, "{saga:?}");
        let finished = state.finished.get(&saga.id).cloned().unwrap_or_default();
        assert_eq!(finished.len(), 3, "every step of {} finished", saga.id);
    }
    let taken_over = state
        .engines
        .values()
        .filter(|engines| engines.len() == 2)
        .count();
    let a_only = state
        .engines
        .values()
        .filter(|engines| engines.len() == 1 && engines.contains("a"))
        .count();
    assert!(
        taken_over > 0,
        "b took over at least one saga a had started"
    );
    eprintln!(
        "{} sagas completed; {taken_over} taken over from a mid-way, {a_only} finished by a before it died",
        all.len()
    );
}

#[tokio::test(start_paused = true)]
async fn two_engines_on_one_in_memory_log_never_overlap_and_take_over_a_dead_one() {
    // Goal: the leasing protocol on the in-memory store under paused time: two engines, one
    // killed mid-way by its crash hook, no step ever runs twice at once, every saga completes.
    let store = InMemorySagaStore::new();
    two_engines(store.clone(), store.clone(), store, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_one_postgres_log_never_overlap_and_take_over_a_dead_one() {
    // Goal: the test: two engines (separate connection pools) on one PostgreSQL log run
    // many sagas; engine a dies mid-way; no (saga, step) runs twice concurrently, and b
    // finishes a's sagas after their leases (500 ms) expire. Real time: leases use the
    // server's clock.
    let Some(db) = trellis_testkit::postgres("saga_two_engines").await else {
        return;
    };
    let connect = || PostgresSagaStore::connect(&db.url);
    let (a, b, inspect) = (
        connect().await.expect("connect a"),
        connect().await.expect("connect b"),
        connect().await.expect("connect inspector"),
    );
    two_engines(a, b, inspect, 40).await;
}

#[tokio::test(start_paused = true)]
async fn an_engine_whose_lease_was_taken_abandons_its_step_at_the_next_renewal() {
    // Goal: fencing by renewal: when another engine has taken the saga (an operator released
    // the lease and b claimed it), a's next renewal fails, a drops its step in flight and
    // leaves the saga, active, to b.
    use crate::support::{Crash, CrashingStore};

    let store = InMemorySagaStore::new();
    let blocked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let definition = {
        let blocked = blocked.clone();
        SagaDefinition::builder("slow", 1)
            .step(Step::new("wait", move |_: &mut u32, _step: StepContext| {
                let blocked = blocked.clone();
                Box::pin(async move {
                    blocked.store(true, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    Ok(())
                })
            }))
            .build()
            .expect("valid")
    };
    let engine = SagaEngine::new(CrashingStore::new(store.clone(), 0, Crash::AfterWrite))
        .with_owner("a")
        .with_lease_duration(Duration::from_secs(3))
        .register(definition);
    let started = tokio::time::Instant::now();
    let run = tokio::spawn(async move { engine.start("slow", &0_u32).await });
    while !blocked.load(Ordering::SeqCst) {
        tokio::task::yield_now().await;
    }
    let id = store.list_active(1).await.expect("list")[0];
    store.release(id, "a").await.expect("release");
    store
        .claim(id, &trellis_saga::Lease::new("b", Duration::from_secs(60)))
        .await
        .expect("b claims");
    let error = run.await.expect("join").expect_err("a gives up");
    assert!(
        matches!(error, trellis_saga::SagaError::Leased { .. }),
        "{error}"
    );
    assert!(
        started.elapsed() <= Duration::from_secs(3),
        "a noticed at its first renewal, within the lease: {:?}",
        started.elapsed()
    );
    assert_eq!(
        store.load(id).await.expect("load").expect("exists").status,
        SagaStatus::Running
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_one_sqlite_log_never_overlap_and_take_over_a_dead_one() {
    // Goal: the same protocol on SQLite, where the two engines' concurrent transitions share
    // group-commit transactions (the bulk create/append path with fencing refusals).
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("saga.db").display());
    let store = trellis_saga::SqliteSagaStore::open(&url)
        .await
        .expect("open");
    two_engines(store.clone(), store.clone(), store, 40).await;
}
