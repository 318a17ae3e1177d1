//! What the driver counts while it runs: arrivals, requests in flight, latency histograms per
//! operation, errors by kind.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::client::Failure;
use crate::config::Op;
use crate::report::{Latency, OpReport};

/// Highest latency a histogram tracks, in microseconds (a day); longer ones saturate.
const LATENCY_HIGHEST_US: u64 = 24 * 3600 * 1_000_000;
/// Significant decimal digits the histograms keep.
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_HIGHEST_US, LATENCY_SIGNIFICANT_DIGITS)
        .expect("constant bounds are valid: 1 <= low, high >= 2 * low, digits <= 5")
}

#[derive(Debug)]
struct OpAccumulator {
    latency: Histogram<u64>,
    ok: u64,
    errors: u64,
}

#[derive(Debug)]
struct Inner {
    ops: [OpAccumulator; 3],
    overall: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

/// Shared counters; the atomics feed the progress bar without taking the lock.
#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) arrivals: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) errors: AtomicU64,
    inner: Mutex<Inner>,
}

impl Stats {
    pub(crate) fn new() -> Self {
        let op = || OpAccumulator {
            latency: histogram(),
            ok: 0,
            errors: 0,
        };
        Self {
            arrivals: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                ops: [op(), op(), op()],
                overall: histogram(),
                errors: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain counters behind: still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the outcome of one sent request; `latency` runs from its due time.
    pub(crate) fn record(&self, op: Op, latency: Duration, outcome: Result<(), Failure>) {
        match outcome {
            Ok(()) => {
                let us = u64::try_from(latency.as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1);
                let mut inner = self.lock();
                let acc = &mut inner.ops[op.index()];
                acc.ok += 1;
                acc.latency.saturating_record(us);
                inner.overall.saturating_record(us);
            }
            Err(failure) => self.error(op, &failure.kind()),
        }
    }

    /// Counts an error of `kind` against `op`.
    pub(crate) fn error(&self, op: Op, kind: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        inner.ops[op.index()].errors += 1;
        *inner.errors.entry(kind.to_owned()).or_insert(0) += 1;
    }

    /// Per-operation rows, the overall row, and errors by kind.
    pub(crate) fn summarize(&self) -> (Vec<OpReport>, OpReport, BTreeMap<String, u64>) {
        let inner = self.lock();
        let ops: Vec<OpReport> = Op::ALL
            .iter()
            .map(|op| {
                let acc = &inner.ops[op.index()];
                OpReport {
                    op: op.as_str().to_owned(),
                    arrivals: acc.ok + acc.errors,
                    ok: acc.ok,
                    errors: acc.errors,
                    latency: Latency::of(&acc.latency),
                }
            })
            .collect();
        let ok = ops.iter().map(|o| o.ok).sum();
        let errors = ops.iter().map(|o| o.errors).sum();
        let overall = OpReport {
            op: "all".into(),
            arrivals: ok + errors,
            ok,
            errors,
            latency: Latency::of(&inner.overall),
        };
        (ops, overall, inner.errors.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_land_in_their_operation_and_kind() {
        let stats = Stats::new();
        stats.record(Op::Order, Duration::from_millis(10), Ok(()));
        stats.record(Op::Order, Duration::from_millis(30), Ok(()));
        stats.record(
            Op::Order,
            Duration::from_millis(5),
            Err(Failure::Status(503)),
        );
        stats.error(Op::Browse, "overloaded");
        let (ops, overall, errors) = stats.summarize();
        assert_eq!((ops[1].ok, ops[1].errors, ops[1].arrivals), (2, 1, 3));
        assert_eq!(ops[1].latency.count, 2);
        assert!((ops[1].latency.max_ms - 30.0).abs() < 0.1);
        assert_eq!((ops[0].ok, ops[0].errors), (0, 1));
        assert_eq!(overall.arrivals, 4);
        assert_eq!(errors.get("503"), Some(&1));
        assert_eq!(errors.get("overloaded"), Some(&1));
    }
}
