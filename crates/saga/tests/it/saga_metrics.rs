//! The orchestrator's metrics: lifecycle counters, step latency and the status gauges.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use trellis_saga::{InMemorySagaStore, SagaEngine, SagaStatus};

use crate::support::{Behaviour, Ledger, Trip, trip, trip_with_pivot};

/// Every counter, gauge and histogram sample by `name{label=value,…}` (labels sorted).
#[derive(Debug, Clone, Default)]
struct Recorded(Arc<Mutex<BTreeMap<String, f64>>>);

impl Recorded {
    fn get(&self, series: &str) -> f64 {
        let values = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        values.get(series).copied().unwrap_or_else(|| {
            panic!(
                "no series {series}; recorded: {:#?}",
                values.keys().collect::<Vec<_>>()
            )
        })
    }

    fn has(&self, series: &str) -> bool {
        let values = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        values.contains_key(series)
    }
}

/// One series of [`Recorded`]: counters add, gauges set, histograms count samples.
#[derive(Debug)]
struct Series {
    values: Recorded,
    series: String,
}

impl Series {
    fn update(&self, change: impl FnOnce(f64) -> f64) {
        let mut values = self.values.0.lock().unwrap_or_else(PoisonError::into_inner);
        let value = values.entry(self.series.clone()).or_default();
        *value = change(*value);
    }
}

impl metrics::CounterFn for Series {
    fn increment(&self, value: u64) {
        self.update(|old| old + value as f64);
    }

    fn absolute(&self, value: u64) {
        self.update(|_| value as f64);
    }
}

impl metrics::GaugeFn for Series {
    fn increment(&self, value: f64) {
        self.update(|old| old + value);
    }

    fn decrement(&self, value: f64) {
        self.update(|old| old - value);
    }

    fn set(&self, value: f64) {
        self.update(|_| value);
    }
}

impl metrics::HistogramFn for Series {
    fn record(&self, _: f64) {
        self.update(|old| old + 1.0);
    }
}

#[derive(Debug, Default)]
struct Recorder(Recorded);

impl Recorder {
    fn series(&self, key: &metrics::Key) -> Arc<Series> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|label| format!("{}={}", label.key(), label.value()))
            .collect();
        labels.sort();
        let series = format!("{}{{{}}}", key.name(), labels.join(","));
        // Registering makes the series exist (at 0), as the Prometheus recorder does.
        self.0
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(series.clone())
            .or_default();
        Arc::new(Series {
            values: self.0.clone(),
            series,
        })
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(self.series(key))
    }

    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::from_arc(self.series(key))
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::from_arc(self.series(key))
    }
}

fn ada() -> Trip {
    Trip {
        customer: "ada".to_owned(),
        done: Vec::new(),
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_completed_and_a_failed_saga_are_counted_with_their_steps() {
    // Goal: one saga completes, one fails at its third step and compensates two; the counters
    // and the step histogram say exactly that (a thread-local recorder on one thread).
    let recorder = Recorder::default();
    let recorded = recorder.0.clone();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let ledger = Ledger::default();
    let good =
        SagaEngine::new(InMemorySagaStore::new()).register(trip(&ledger, Behaviour::Succeeds));
    let id = good.start("book-trip", &ada()).await.expect("start");
    assert_eq!(
        good.status(id).await.expect("status"),
        SagaStatus::Completed
    );
    let bad = SagaEngine::new(InMemorySagaStore::new())
        .register(trip(&ledger, Behaviour::FailsPermanently));
    let id = bad.start("book-trip", &ada()).await.expect("start");
    assert_eq!(bad.status(id).await.expect("status"), SagaStatus::Failed);

    assert_eq!(
        recorded.get("trellis_saga_started_total{definition=book-trip}"),
        2.0
    );
    assert_eq!(
        recorded.get("trellis_saga_completed_total{definition=book-trip}"),
        1.0
    );
    assert_eq!(
        recorded.get("trellis_saga_failed_total{definition=book-trip,step=car}"),
        1.0
    );
    for step in ["flight", "hotel"] {
        assert_eq!(
            recorded.get(&format!(
                "trellis_saga_compensated_total{{definition=book-trip,step={step}}}"
            )),
            1.0
        );
    }
    assert!(!recorded.has("trellis_saga_stuck_total{definition=book-trip}"));
    // flight and hotel ran twice (once per saga), car once each way.
    let attempts = |step: &str, phase: &str, outcome: &str| {
        recorded.get(&format!(
            "trellis_saga_step_duration_seconds{{definition=book-trip,outcome={outcome},phase={phase},step={step}}}"
        ))
    };
    assert_eq!(attempts("flight", "execute", "ok"), 2.0);
    assert_eq!(attempts("car", "execute", "ok"), 1.0);
    assert_eq!(attempts("car", "execute", "error"), 1.0);
    assert_eq!(attempts("hotel", "compensate", "ok"), 1.0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_status_gauges_count_stuck_sagas_and_fall_to_zero_when_none_are_left() {
    // Goal: with one stuck saga the gauge reads 1; on an engine whose log has none, every
    // registered definition still gets a 0, so an alert resolves rather than going stale.
    let recorder = Recorder::default();
    let recorded = recorder.0.clone();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let ledger = Ledger::default();
    let engine = SagaEngine::new(InMemorySagaStore::new()).register(trip_with_pivot(
        &ledger,
        Behaviour::Succeeds,
        Behaviour::FailsPermanently,
    ));
    let id = engine.start("book-trip", &ada()).await.expect("start");
    assert_eq!(engine.status(id).await.expect("status"), SagaStatus::Stuck);
    engine.export_status_gauges().await.expect("gauges");
    assert_eq!(
        recorded.get("trellis_saga_instances{definition=book-trip,status=stuck}"),
        1.0
    );
    assert_eq!(
        recorded.get("trellis_saga_instances{definition=book-trip,status=compensating}"),
        0.0
    );
    assert_eq!(
        recorded.get("trellis_saga_stuck_total{definition=book-trip}"),
        1.0
    );

    let fresh =
        SagaEngine::new(InMemorySagaStore::new()).register(trip(&ledger, Behaviour::Succeeds));
    fresh.export_status_gauges().await.expect("gauges");
    assert_eq!(
        recorded.get("trellis_saga_instances{definition=book-trip,status=stuck}"),
        0.0
    );
}
