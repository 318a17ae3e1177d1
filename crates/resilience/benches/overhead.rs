//! Per-call overhead of the trellis policies in the CLOSED state, against a bare call and
//! against a published breaker (`failsafe` 1.3), on 1 thread and on 2 threads contending.
//!
//! Run with `cargo bench -p trellis-resilience --bench overhead` (append `-- 1_thread` or
//! `-- 2_threads` to run one group). Results and their meaning are in `docs/BENCHMARKS.md`.
//!
//! Every call measured here is immediately ready: futures are polled once with a no-op waker
//! (see [`run_ready`]), so no executor cost is included, only the policy's own bookkeeping.
//! By default no `metrics` recorder is installed, so the policies' metric handles are no-ops.
//! With `TRELLIS_BENCH_RECORDER=prometheus-like` in the environment a recorder is installed
//! before the policies are built whose counters and gauges do what
//! `metrics-exporter-prometheus`'s do on the hot path (see [`GenerationalAtomic`]).
//!
//! - `1_thread/<case>`: time per call, one thread.
//! - `2_threads/<case>`: two threads (the bench thread and one helper) each make `iters` calls
//!   on the same shared policy at the same time; the figure is wall time / `iters`, i.e. the
//!   time per call seen by each thread while the other one hammers the same state. If the
//!   two threads did not really run at the same time (a busy or overcommitted machine), the
//!   bare cases show it: their 2-thread figure rises towards twice the 1-thread one.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use criterion::Criterion;
use failsafe::CircuitBreaker as _;
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use trellis_resilience::{
    CircuitBreaker, Outcome, Resilience, RetryPolicy, SlidingWindow, with_timeout,
};

/// Polls `future` once with a no-op waker and returns its output.
///
/// # Panics
/// If the future is not ready on its first poll: every call benchmarked here must be.
#[inline]
fn run_ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!(
            "run_ready: the future returned Pending on its first poll; this bench measures only \
             immediately-ready calls (is the policy not CLOSED, or does it need a runtime?)"
        ),
    }
}

/// Runs `iters` calls; shared by the bench thread and the helper thread.
type Batch = Arc<dyn Fn(u64) + Send + Sync>;

/// One benchmarked case: a name and a batch runner.
struct Case {
    name: &'static str,
    batch: Batch,
}

/// Makes a case from one call. The loop is monomorphised per case; `black_box` keeps each
/// call's output alive. The call is checked once before measuring.
fn case<O>(name: &'static str, op: O) -> Case
where
    O: Fn() -> Option<u64> + Send + Sync + 'static,
{
    assert_eq!(op(), Some(1), "{name}: the call must succeed (CLOSED path)");
    let batch: Batch = Arc::new(move |iters| {
        for _ in 0..iters {
            black_box(op());
        }
    });
    Case { name, batch }
}

/// Like [`case`], but the batch runs inside the given tokio runtime's context (the timeout
/// needs a time driver to create its `Sleep`, even when the call is ready at once).
fn case_in_runtime<O>(name: &'static str, handle: tokio::runtime::Handle, op: O) -> Case
where
    O: Fn() -> Option<u64> + Send + Sync + 'static,
{
    {
        let _guard = handle.enter();
        assert_eq!(op(), Some(1), "{name}: the call must succeed (CLOSED path)");
    }
    let batch: Batch = Arc::new(move |iters| {
        let _guard = handle.enter();
        for _ in 0..iters {
            black_box(op());
        }
    });
    Case { name, batch }
}

fn trellis_breaker(name: &str) -> CircuitBreaker {
    CircuitBreaker::builder(name)
        .build()
        .expect("valid breaker settings")
}

fn cases(runtime: &tokio::runtime::Runtime) -> Vec<Case> {
    let mut cases = Vec::new();

    // Baselines: the same call with no policy around it.
    cases.push(case("bare_async", || {
        let f = || async { Ok::<u64, ()>(black_box(1)) };
        run_ready(f()).ok()
    }));
    cases.push(case("bare_sync", || {
        let result = Ok::<u64, ()>(black_box(1));
        result.ok()
    }));

    // trellis breaker, default settings: count window of 100 calls, no slow-call detection.
    let breaker = trellis_breaker("bench-count");
    cases.push(case("trellis_breaker_call", move || {
        run_ready(breaker.call(|| async { Ok::<u64, ()>(black_box(1)) })).ok()
    }));

    // The same breaker used by hand, the sync-API equivalent of failsafe's `call`.
    let breaker = trellis_breaker("bench-permit");
    cases.push(case("trellis_breaker_permit", move || {
        let permit = breaker.try_acquire().expect("breaker is closed");
        let result = Ok::<u64, ()>(black_box(1));
        permit.record(Outcome::Success);
        result.ok()
    }));

    // failsafe with its default policy: EMA success rate over a time window (reads the clock
    // on every success), or 5 consecutive failures.
    let failsafe_default = failsafe::Config::new().build();
    cases.push(case("failsafe_default", move || {
        failsafe_default.call(|| Ok::<u64, ()>(black_box(1))).ok()
    }));

    // failsafe with only the consecutive-failures policy (no clock read on success).
    let failsafe_consecutive = failsafe::Config::new()
        .failure_policy(failsafe::failure_policy::consecutive_failures(
            5,
            failsafe::backoff::constant(Duration::from_secs(30)),
        ))
        .build();
    cases.push(case("failsafe_consecutive", move || {
        failsafe_consecutive
            .call(|| Ok::<u64, ()>(black_box(1)))
            .ok()
    }));

    // Time-based window plus slow-call detection: the clock is read three times per call
    // (admission, slow-call check, window record).
    let breaker = CircuitBreaker::builder("bench-time")
        .sliding_window(SlidingWindow::Time(Duration::from_secs(60)))
        .slow_calls(Duration::from_secs(2), 0.8)
        .build()
        .expect("valid breaker settings");
    cases.push(case("trellis_breaker_time_slow", move || {
        run_ready(breaker.call(|| async { Ok::<u64, ()>(black_box(1)) })).ok()
    }));

    // Retry with the default budget (on), the call succeeding first time.
    let retry = RetryPolicy::builder()
        .build()
        .expect("valid retry settings");
    cases.push(case("trellis_retry", move || {
        run_ready(retry.call(|| async { Ok::<u64, ()>(black_box(1)) })).ok()
    }));

    // The timeout alone (tokio's timeout; the `Sleep` is created but never polled).
    cases.push(case_in_runtime(
        "trellis_timeout",
        runtime.handle().clone(),
        || {
            run_ready(with_timeout(Duration::from_secs(1), async {
                Ok::<u64, ()>(black_box(1))
            }))
            .ok()
        },
    ));

    // The full stack: retry (budget on) + breaker (default) + timeout.
    let stack = Resilience::builder()
        .retry(
            RetryPolicy::builder()
                .build()
                .expect("valid retry settings"),
        )
        .circuit_breaker(trellis_breaker("bench-stack"))
        .timeout(Duration::from_secs(1))
        .build();
    cases.push(case_in_runtime(
        "trellis_stack",
        runtime.handle().clone(),
        move || run_ready(stack.call(|| async { Ok::<u64, ()>(black_box(1)) })).ok(),
    ));

    cases
}

/// Both threads start on `start`, the bench thread times until both passed `done`.
struct Shared {
    start: Barrier,
    done: Barrier,
    iters: AtomicU64,
}

const STOP: u64 = u64::MAX;

fn bench_single(c: &mut Criterion, cases: &[Case]) {
    let mut group = c.benchmark_group("1_thread");
    for Case { name, batch } in cases {
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                batch(iters);
                started.elapsed()
            });
        });
    }
    group.finish();
}

fn bench_contended(c: &mut Criterion, cases: &[Case]) {
    let mut group = c.benchmark_group("2_threads");
    for Case { name, batch } in cases {
        let shared = Arc::new(Shared {
            start: Barrier::new(2),
            done: Barrier::new(2),
            iters: AtomicU64::new(0),
        });
        let helper = {
            let shared = Arc::clone(&shared);
            let batch = Arc::clone(batch);
            thread::spawn(move || {
                loop {
                    shared.start.wait();
                    let iters = shared.iters.load(Ordering::Relaxed);
                    if iters == STOP {
                        return;
                    }
                    batch(iters);
                    shared.done.wait();
                }
            })
        };
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                assert_ne!(iters, STOP, "iteration count reserved as the stop signal");
                shared.iters.store(iters, Ordering::Relaxed);
                shared.start.wait();
                let started = Instant::now();
                batch(iters);
                shared.done.wait();
                started.elapsed()
            });
        });
        shared.iters.store(STOP, Ordering::Relaxed);
        shared.start.wait();
        helper.join().expect("helper thread panicked");
    }
    group.finish();
}

/// A metric handle that costs what `metrics-exporter-prometheus` 0.18's does per update: its
/// registry hands out metrics-util `Generational<Arc<AtomicU64>>` handles, so every update is
/// one atomic on the value plus one on a separate generation counter. Nothing is exported.
#[derive(Debug, Default)]
struct GenerationalAtomic {
    value: Arc<AtomicU64>,
    generation: Arc<AtomicUsize>,
}

impl GenerationalAtomic {
    fn touched(&self) {
        let _ = self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

impl CounterFn for GenerationalAtomic {
    fn increment(&self, value: u64) {
        CounterFn::increment(&*self.value, value);
        self.touched();
    }

    fn absolute(&self, value: u64) {
        CounterFn::absolute(&*self.value, value);
        self.touched();
    }
}

impl GaugeFn for GenerationalAtomic {
    fn increment(&self, value: f64) {
        GaugeFn::increment(&*self.value, value);
        self.touched();
    }

    fn decrement(&self, value: f64) {
        GaugeFn::decrement(&*self.value, value);
        self.touched();
    }

    fn set(&self, value: f64) {
        GaugeFn::set(&*self.value, value);
        self.touched();
    }
}

/// Hands out a fresh [`GenerationalAtomic`] per registration (the policies register each
/// handle once, at build time); histograms are not used by the policies.
#[derive(Debug)]
struct PrometheusLikeRecorder;

impl Recorder for PrometheusLikeRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(GenerationalAtomic::default()))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Arc::new(GenerationalAtomic::default()))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn main() {
    match std::env::var("TRELLIS_BENCH_RECORDER").as_deref() {
        Err(_) | Ok("" | "none") => {}
        Ok("prometheus-like") => {
            metrics::set_global_recorder(PrometheusLikeRecorder).expect("no recorder installed yet")
        }
        Ok(other) => panic!("TRELLIS_BENCH_RECORDER={other}: expected `none` or `prometheus-like`"),
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime");
    let cases = cases(&runtime);
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
        .configure_from_args();
    bench_single(&mut c, &cases);
    bench_contended(&mut c, &cases);
    c.final_summary();
}
