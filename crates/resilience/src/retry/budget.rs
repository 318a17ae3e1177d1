//! A retry budget: retries as a fraction of calls, so an outage cannot multiply the load.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

const TOKEN: i64 = 1_000;

/// Limits retries to a fraction of calls, shared by every clone (and every policy holding it).
///
/// Each call (first attempt) deposits `ratio` of a token, each retry withdraws one whole
/// token, and the balance is capped, so over any stretch of time
/// `retries <= ratio * calls + banked`, where `banked` is at most `max_banked`. When the
/// upstream is down and every call fails, load stays within `1 + ratio` of the offered load
/// instead of `max_attempts` times it. This is the token-bucket form of Finagle's and
/// Linkerd's retry budgets; it needs no clock.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    inner: Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    deposit: i64,
    cap: i64,
    tokens: AtomicI64,
}

impl RetryBudget {
    /// A budget allowing `ratio` retries per call (0..=1000), starting with `initial_retries`
    /// banked and never banking more than `max_banked` retries.
    pub fn new(ratio: f64, initial_retries: u32, max_banked: u32) -> Self {
        let deposit = (ratio.clamp(0.0, 1000.0) * TOKEN as f64).round() as i64;
        let cap = i64::from(max_banked.max(initial_retries)) * TOKEN;
        Self {
            inner: Arc::new(BudgetInner {
                deposit,
                cap,
                tokens: AtomicI64::new(i64::from(initial_retries) * TOKEN),
            }),
        }
    }

    /// Records a call's first attempt.
    pub fn deposit(&self) {
        let inner = &*self.inner;
        if inner.deposit == 0 {
            return;
        }
        let _ = inner
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tokens| {
                (tokens < inner.cap).then(|| (tokens + inner.deposit).min(inner.cap))
            });
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn try_withdraw(&self) -> bool {
        self.inner
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tokens| {
                (tokens >= TOKEN).then_some(tokens - TOKEN)
            })
            .is_ok()
    }

    /// Retries currently available.
    pub fn available(&self) -> u64 {
        (self.inner.tokens.load(Ordering::Acquire) / TOKEN).max(0) as u64
    }
}

impl Default for RetryBudget {
    /// 20 % retries, 10 banked at start, at most 100 banked.
    fn default() -> Self {
        Self::new(0.2, 10, 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_the_ratio_of_calls() {
        let budget = RetryBudget::new(0.1, 0, 100);
        let mut retries = 0;
        for _ in 0..1_000 {
            budget.deposit();
            while budget.try_withdraw() {
                retries += 1;
            }
        }
        assert_eq!(retries, 100);
    }

    #[test]
    fn the_bank_is_capped() {
        let budget = RetryBudget::new(0.5, 0, 3);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 3);
    }
}
