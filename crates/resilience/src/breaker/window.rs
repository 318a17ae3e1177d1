//! Sliding windows that count calls, failures and slow calls without a lock.
//!
//! Both windows are written on every call in the CLOSED state, so they are built from plain
//! atomics. The count-based window is a ring of per-call outcomes plus running totals, where
//! a writer applies only the difference between the slot's old and new outcome (a success
//! replacing a success touches no total at all). The time-based window keeps cumulative
//! totals and a short history of the totals at each bucket start; only the first call of a new
//! bucket takes a (then uncontended) lock to roll the history forward.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// The outcome bits recorded for one call.
pub(crate) const CALL: u8 = 0b001;
pub(crate) const FAILED: u8 = 0b010;
pub(crate) const SLOW: u8 = 0b100;

/// Number of buckets a time-based window is split into.
const TIME_BUCKETS: u32 = 10;

/// Totals over the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

#[derive(Debug)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    pub(crate) fn count(size: u32) -> Self {
        Self::Count(CountWindow::new(size))
    }

    pub(crate) fn time(duration: Duration) -> Self {
        Self::Time(TimeWindow::new(duration))
    }

    /// Whether recording needs the current time.
    pub(crate) fn needs_time(&self) -> bool {
        matches!(self, Self::Time(_))
    }

    #[inline]
    pub(crate) fn record(&self, bits: u8, now: Duration) {
        match self {
            Self::Count(w) => w.record(bits),
            Self::Time(w) => w.record(bits, now),
        }
    }

    pub(crate) fn counts(&self, now: Duration) -> Counts {
        match self {
            Self::Count(w) => w.counts(),
            Self::Time(w) => w.counts(now),
        }
    }

    pub(crate) fn reset(&self, now: Duration) {
        match self {
            Self::Count(w) => w.reset(),
            Self::Time(w) => w.reset(now),
        }
    }
}

/// The last `size` calls.
#[derive(Debug)]
pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    len: u32,
    cursor: AtomicUsize,
    calls: AtomicI64,
    failures: AtomicI64,
    slow: AtomicI64,
}

impl CountWindow {
    fn new(size: u32) -> Self {
        assert!(size > 0, "the builder rejects an empty window");
        Self {
            slots: (0..size).map(|_| AtomicU8::new(0)).collect(),
            len: size,
            cursor: AtomicUsize::new(0),
            calls: AtomicI64::new(0),
            failures: AtomicI64::new(0),
            slow: AtomicI64::new(0),
        }
    }

    #[inline]
    fn record(&self, bits: u8) {
        // 32-bit modulo is cheaper than 64-bit; the cursor wrapping at 2^32 only moves which
        // slot is overwritten next, once every four billion calls.
        let index = (self.cursor.fetch_add(1, Ordering::Relaxed) as u32 % self.len) as usize;
        // In the steady state a success replaces a success: a plain load then skips the write,
        // which keeps the slot's cache line shared between cores.
        if self.slots[index].load(Ordering::Relaxed) == bits {
            return;
        }
        self.replace(index, bits);
    }

    /// Puts `bits` into a slot and moves the totals by the difference. Every slot change goes
    /// through a swap, so the totals equal the sum of the slots whenever no writer is between
    /// its swap and its total update; in between they are off by at most one call per writer.
    #[inline]
    fn replace(&self, index: usize, bits: u8) {
        let old = self.slots[index].swap(bits, Ordering::AcqRel);
        if old != bits {
            adjust(&self.calls, old, bits, CALL);
            adjust(&self.failures, old, bits, FAILED);
            adjust(&self.slow, old, bits, SLOW);
        }
    }

    fn counts(&self) -> Counts {
        let size = self.slots.len() as i64;
        let read = |total: &AtomicI64| total.load(Ordering::Relaxed).clamp(0, size) as u64;
        Counts {
            calls: read(&self.calls),
            failures: read(&self.failures),
            slow: read(&self.slow),
        }
    }

    fn reset(&self) {
        for index in 0..self.slots.len() {
            self.replace(index, 0);
        }
    }
}

#[inline]
fn adjust(total: &AtomicI64, old: u8, new: u8, flag: u8) {
    let delta = i64::from(new & flag != 0) - i64::from(old & flag != 0);
    if delta != 0 {
        total.fetch_add(delta, Ordering::Relaxed);
    }
}

/// The calls of the last `duration`, in buckets of `duration / 10`.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    bucket_nanos: u64,
    /// Totals since the window was created; never decrease.
    cumulative: [AtomicU64; 3],
    /// Totals at the start of the oldest bucket still inside the window.
    base: [AtomicU64; 3],
    /// The bucket the base was last computed for.
    current_bucket: AtomicU64,
    /// (bucket, cumulative totals at its start), oldest first. Touched only on a bucket change.
    history: Mutex<VecDeque<(u64, [u64; 3])>>,
}

impl TimeWindow {
    fn new(duration: Duration) -> Self {
        let bucket_nanos = (duration.as_nanos() / u128::from(TIME_BUCKETS)).max(1);
        Self {
            bucket_nanos: u64::try_from(bucket_nanos).unwrap_or(u64::MAX),
            cumulative: Default::default(),
            base: Default::default(),
            current_bucket: AtomicU64::new(0),
            history: Mutex::new(VecDeque::from([(0, [0; 3])])),
        }
    }

    fn bucket_of(&self, now: Duration) -> u64 {
        u64::try_from(now.as_nanos()).unwrap_or(u64::MAX) / self.bucket_nanos
    }

    #[inline]
    fn record(&self, bits: u8, now: Duration) {
        let bucket = self.bucket_of(now);
        if bucket > self.current_bucket.load(Ordering::Acquire) {
            self.roll_to(bucket);
        }
        for (slot, flag) in [CALL, FAILED, SLOW].into_iter().enumerate() {
            if bits & flag != 0 {
                self.cumulative[slot].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn snapshot(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.cumulative[i].load(Ordering::Relaxed))
    }

    fn roll_to(&self, bucket: u64) {
        let mut history = self
            .history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if bucket <= self.current_bucket.load(Ordering::Acquire) {
            return; // another caller rolled the window while we waited for the lock
        }
        history.push_back((bucket, self.snapshot()));
        let oldest_kept = bucket.saturating_sub(u64::from(TIME_BUCKETS) - 1);
        while history.front().is_some_and(|(b, _)| *b < oldest_kept) {
            history.pop_front();
        }
        let (_, base) = *history.front().expect("the bucket just pushed is kept");
        for (slot, value) in base.into_iter().enumerate() {
            self.base[slot].store(value, Ordering::Relaxed);
        }
        self.current_bucket.store(bucket, Ordering::Release);
    }

    fn counts(&self, now: Duration) -> Counts {
        let bucket = self.bucket_of(now);
        if bucket > self.current_bucket.load(Ordering::Acquire) {
            self.roll_to(bucket);
        }
        let total = |i: usize| {
            self.cumulative[i]
                .load(Ordering::Relaxed)
                .saturating_sub(self.base[i].load(Ordering::Relaxed))
        };
        let calls = total(0);
        Counts {
            calls,
            failures: total(1).min(calls),
            slow: total(2).min(calls),
        }
    }

    fn reset(&self, now: Duration) {
        let bucket = self.bucket_of(now);
        let mut history = self
            .history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let snapshot = self.snapshot();
        history.clear();
        history.push_back((bucket, snapshot));
        for (slot, value) in snapshot.into_iter().enumerate() {
            self.base[slot].store(value, Ordering::Relaxed);
        }
        self.current_bucket.store(bucket, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_keeps_only_the_last_calls() {
        let window = CountWindow::new(4);
        for bits in [CALL | FAILED, CALL | FAILED, CALL, CALL | SLOW] {
            window.record(bits);
        }
        assert_eq!(
            window.counts(),
            Counts {
                calls: 4,
                failures: 2,
                slow: 1
            }
        );
        window.record(CALL);
        window.record(CALL);
        assert_eq!(
            window.counts(),
            Counts {
                calls: 4,
                failures: 0,
                slow: 1
            }
        );
        window.reset();
        assert_eq!(window.counts(), Counts::default());
    }

    #[test]
    fn time_window_forgets_calls_older_than_its_duration() {
        let window = TimeWindow::new(Duration::from_secs(10));
        window.record(CALL | FAILED, Duration::from_millis(500));
        window.record(CALL, Duration::from_secs(5));
        assert_eq!(
            window.counts(Duration::from_secs(9)),
            Counts {
                calls: 2,
                failures: 1,
                slow: 0
            }
        );
        // At 10.5 s the bucket [0 s, 1 s) has left the window.
        assert_eq!(
            window.counts(Duration::from_millis(10_500)),
            Counts {
                calls: 1,
                failures: 0,
                slow: 0
            }
        );
        assert_eq!(window.counts(Duration::from_secs(60)), Counts::default());
    }

    #[test]
    fn count_window_totals_are_exact_after_concurrent_writers() {
        let window = std::sync::Arc::new(CountWindow::new(64));
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let window = window.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u32 {
                        let bits = if (i + w) % 3 == 0 {
                            CALL | FAILED
                        } else {
                            CALL
                        };
                        window.record(bits);
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer thread");
        }
        let failures = window
            .slots
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) & FAILED != 0)
            .count();
        assert_eq!(
            window.counts(),
            Counts {
                calls: 64,
                failures: failures as u64,
                slow: 0
            }
        );
    }
}
