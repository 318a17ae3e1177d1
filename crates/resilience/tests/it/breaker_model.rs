//! A proptest that drives random call outcomes and clock moves through the breaker and through
//! a small reference model of the specified behaviour, and checks that they agree at every step.

use std::collections::VecDeque;
use std::time::Duration;

use proptest::prelude::*;
use trellis_resilience::{BreakerState, CircuitBreaker, Outcome, SlidingWindow};

use crate::support::ManualClock;

const WINDOW: usize = 8;
const MINIMUM: usize = 4;
const THRESHOLD: f64 = 0.5;
const OPEN_MS: u64 = 1_000;
const PERMITTED: u32 = 3;

#[derive(Debug, Clone, Copy)]
enum Op {
    Call(Outcome),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Call(Outcome::Success)),
        3 => Just(Op::Call(Outcome::Failure)),
        1 => Just(Op::Call(Outcome::Ignored)),
        2 => (1u64..1_500).prop_map(Op::Advance),
    ]
}

#[derive(Debug)]
enum Model {
    Closed(VecDeque<bool>),
    Open { until_ms: u64 },
    HalfOpen { admitted: u32, succeeded: u32 },
}

impl Model {
    fn state(&self) -> BreakerState {
        match self {
            Self::Closed(_) => BreakerState::Closed,
            Self::Open { .. } => BreakerState::Open,
            Self::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// One call made and finished at `now_ms`; returns whether it was admitted.
    fn call(&mut self, outcome: Outcome, now_ms: u64) -> bool {
        if let Self::Open { until_ms } = *self {
            if now_ms < until_ms {
                return false;
            }
            *self = Self::HalfOpen {
                admitted: 0,
                succeeded: 0,
            };
        }
        match self {
            Self::Closed(window) => {
                if outcome != Outcome::Ignored {
                    window.push_back(outcome == Outcome::Failure);
                    if window.len() > WINDOW {
                        window.pop_front();
                    }
                    let failures = window.iter().filter(|failed| **failed).count();
                    if outcome == Outcome::Failure
                        && window.len() >= MINIMUM
                        && failures as f64 / window.len() as f64 >= THRESHOLD
                    {
                        *self = Self::Open {
                            until_ms: now_ms + OPEN_MS,
                        };
                    }
                }
                true
            }
            Self::HalfOpen {
                admitted,
                succeeded,
            } => {
                if *admitted >= PERMITTED {
                    return false;
                }
                *admitted += 1;
                match outcome {
                    Outcome::Ignored => *admitted -= 1,
                    Outcome::Failure => {
                        *self = Self::Open {
                            until_ms: now_ms + OPEN_MS,
                        }
                    }
                    Outcome::Success => {
                        *succeeded += 1;
                        if *succeeded >= PERMITTED {
                            *self = Self::Closed(VecDeque::new());
                        }
                    }
                }
                true
            }
            Self::Open { .. } => unreachable!("handled above"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_breaker_agrees_with_the_reference_model(ops in proptest::collection::vec(op(), 1..200)) {
        let clock = ManualClock::default();
        let breaker = CircuitBreaker::builder("model")
            .sliding_window(SlidingWindow::Count(WINDOW as u32))
            .minimum_calls(MINIMUM as u32)
            .failure_rate_threshold(THRESHOLD)
            .open_duration(Duration::from_millis(OPEN_MS))
            .half_open_calls(PERMITTED)
            .clock(clock.shared())
            .build()
            .expect("valid settings");
        let mut model = Model::Closed(VecDeque::new());
        let mut now_ms = 0;
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Advance(ms) => {
                    clock.advance(Duration::from_millis(ms));
                    now_ms += ms;
                }
                Op::Call(outcome) => {
                    let expected = model.call(outcome, now_ms);
                    let admitted = match breaker.try_acquire() {
                        Ok(permit) => {
                            permit.record(outcome);
                            true
                        }
                        Err(_) => false,
                    };
                    prop_assert_eq!(admitted, expected, "admission differs at step {} ({:?})", step, op);
                }
            }
            // An OPEN breaker whose time has come reports OPEN until the next call, as does the model.
            prop_assert_eq!(breaker.state(), model.state(), "state differs after step {} ({:?})", step, op);
            if let Model::Closed(window) = &model {
                prop_assert_eq!(breaker.window().calls, window.len() as u64);
            }
        }
    }
}
